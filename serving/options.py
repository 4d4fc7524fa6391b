"""Command-line options that eval.py, the demo and the server share: one spelling, one help text, one check."""

from __future__ import annotations

import argparse
from collections.abc import Iterable


def add_int8_option(parser: argparse.ArgumentParser) -> None:
    """`--int8`: what `load_asr_pipeline(int8=True)` does, offered the same way by every command that serves."""
    parser.add_argument(
        "--int8",
        action="store_true",
        help="quantize the LLM's linear layers to dynamic int8 (CPU; README Benchmarks)",
    )


def require_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, names: Iterable[str]) -> None:
    """A zero or negative limit stops the command before a model loads, with the flag's name and value."""
    for name in names:
        value = getattr(args, name)
        if value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
