"""The one way eval.py, the demo and the server load a model to serve: a stock ASR pipeline over remote code, with
Tiny Audio's LoRA folded into its LLM and, when asked, the LLM quantized to int8."""

from __future__ import annotations

from typing import Any

import transformers


class Int8Unsupported(ValueError):
    """int8 was asked of a model whose code cannot quantize (a stock model, or a checkpoint saved before it)."""


def load_asr_pipeline(
    model: str, device: str | None = None, dtype: str = "auto", int8: bool = False
) -> transformers.Pipeline:
    """A Tiny Audio checkpoint (its own pipeline, from the checkpoint's code) or any stock ASR model.

    ``int8`` quantizes a Tiny Audio LLM's linear layers to dynamic int8 (CPU only): faster, a little less accurate
    (README "Benchmarks").
    """
    import torch

    torch_dtype: Any = "auto" if dtype == "auto" else getattr(torch, dtype)
    pipe = transformers.pipeline(
        "automatic-speech-recognition", model=model, trust_remote_code=True, device=device, dtype=torch_dtype
    )
    if hasattr(pipe.model, "merge_lora"):  # absent from the code of checkpoints saved before it existed
        pipe.model.merge_lora()  # LoRA folded into the LLM: the same transcripts sooner
    if int8:
        if not hasattr(pipe.model, "quantize_llm_int8"):
            raise Int8Unsupported(
                f"int8 serving needs a Tiny Audio checkpoint whose code has quantize_llm_int8; {model} has none"
            )
        pipe.model.quantize_llm_int8()
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is not None and tokenizer.pad_token_id is None:
        # The stock pipeline refuses to batch without one (some converted Whisper folders lack it); EOS is what
        # the pipeline itself suggests and what the Hub's Whisper tokenizers use.
        tokenizer.pad_token_id = pipe.model.config.eos_token_id
    return pipe
