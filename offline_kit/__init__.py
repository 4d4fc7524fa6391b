"""Offline kit: real pretrained weights and speech data for Tiny Audio without the Hugging Face Hub."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Weight dtypes the converters can store (names of torch dtypes); kept here so both converters share one list.
DTYPE_NAMES = ("float32", "float16", "bfloat16")


def save_converted(out: str | Path, model: Any, processor: Any) -> Path:
    """A converter's output folder: the weights and, beside them, the tokenizer or processor that reads them."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def run_converter_cli(
    argv: list[str] | None,
    module: str,
    description: str,
    source_help: str,
    convert: Callable[[str, str, str], Path],
) -> None:
    """The shared command line of the weight converters: ``SOURCE OUT [--dtype ...]``, printing the output folder."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    parser.add_argument("source", help=source_help)
    parser.add_argument("out", help="output folder (created)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="stored weight dtype")
    args = parser.parse_args(argv)
    print(convert(args.source, args.out, args.dtype))
