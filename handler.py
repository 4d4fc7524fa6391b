"""Hugging Face Inference Endpoints handler for a Tiny Audio checkpoint (saved with every checkpoint's code).

An Endpoint created from a repository that holds `handler.py` builds `EndpointHandler(path)` once, with the
repository's local folder, and calls it with each request's deserialized body: ``{"inputs": ..., "parameters":
{...}}``. A request with an audio Content-Type arrives as ``{"inputs": <the file's bytes>}``; a JSON request
carries the audio as a base64 string. ``parameters`` are the ASR pipeline's call options (``return_timestamps``,
``prompt``, ``skip_non_speech``, ``generate_kwargs``...).

It needs only `transformers` (and what the model's own code imports), like loading with `trust_remote_code`.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from transformers import pipeline


class EndpointHandler:
    def __init__(self, path: str = "") -> None:
        # No device: the pipeline picks the best one there is (a GPU when the Endpoint has one).
        self.pipe = pipeline("automatic-speech-recognition", model=path, trust_remote_code=True)
        self.pipe.model.merge_lora()  # serving only: the same outputs without the adapters' extra matmuls

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        parameters = data.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise ValueError(
                f"'parameters' must be an object of pipeline options, got {type(parameters).__name__}"
            )
        return self.pipe(audio_bytes(data.get("inputs")), **parameters)


def audio_bytes(inputs: Any) -> bytes:
    """An encoded audio file from a request's ``inputs``: raw bytes, or the file as a base64 string."""
    if isinstance(inputs, (bytes, bytearray)):
        return bytes(inputs)
    if isinstance(inputs, str):
        try:
            return base64.b64decode(inputs, validate=True)
        except binascii.Error as error:
            raise ValueError(f"'inputs' is a string but not base64-encoded audio: {error}") from None
    raise ValueError(
        "'inputs' must be an audio file's bytes (send it with an audio Content-Type) or the file as a base64 "
        f"string, got {type(inputs).__name__}"
    )
