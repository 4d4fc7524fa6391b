"""Turn a GGUF LLM file into a normal transformers causal-LM folder (safetensors + tokenizer + chat template).

Many users keep their LLMs as llama.cpp GGUF files.  transformers can read them (``gguf_file=``), dequantizing
every tensor, but that takes seconds to minutes each time; saving the dequantized model once as safetensors
makes every later load fast and lets Tiny Audio point ``text_model_id`` at a plain local folder.

Run: ``python -m offline_kit.gguf_llm MODEL.gguf OUT_DIR [--dtype float32]``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from offline_kit import DTYPE_NAMES, run_converter_cli, save_converted


def _check_gguf_file(gguf_path: Path) -> None:
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    with gguf_path.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ValueError(f"{gguf_path} is not a GGUF file (its first bytes are not the 'GGUF' magic)")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("reading GGUF files needs the 'gguf' package: pip install gguf")


def load_gguf_llm(
    gguf_path: str | Path, dtype: str = "float32"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (and dequantize) a GGUF causal LM and its tokenizer, chat template included, via transformers."""
    gguf_path = Path(gguf_path)
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {DTYPE_NAMES}, got {dtype!r}")
    _check_gguf_file(gguf_path)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # dequantize=True: plain dense nn.Linear weights, so the model trains, runs anywhere and can be saved.
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=getattr(torch, dtype), quantization_config=GgufConfig(dequantize=True)
    )
    if tokenizer.chat_template is None:
        raise ValueError(f"{gguf_path} carries no chat template (tokenizer.chat_template metadata)")
    return model, tokenizer


def convert_gguf_llm(gguf_path: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """Save the dequantized GGUF model at ``gguf_path`` as a safetensors folder with its tokenizer at ``out``."""
    return save_converted(out, *load_gguf_llm(gguf_path, dtype))


def main(argv: list[str] | None = None) -> None:
    run_converter_cli(
        argv,
        "offline_kit.gguf_llm",
        "Convert a GGUF causal LM into a transformers safetensors folder with its tokenizer.",
        "path to the .gguf file",
        convert_gguf_llm,
    )


if __name__ == "__main__":
    main()
