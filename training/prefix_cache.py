"""Prompt-prefix cache: the chat-template text before the audio is the same in every row, and the LLM is frozen.

Its keys/values are computed once and handed to the LLM as its `cache`, so each step runs the LLM only from
the first audio token on (SmolLM2's default system turn is ~24 of ~90 tokens for a 3.4 s clip, SmolLM3's is longer).
The loss is unchanged: prefix positions carry no labels and no gradient reaches them.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import DynamicCache


class PromptPrefixCache:
    """Keys/values of the shared prompt prefix, computed on first use in the caller's autocast setting."""

    def __init__(self, model, audio_token_id: int):
        self.model = model
        self.audio_token_id = audio_token_id
        self.prefix_ids: torch.Tensor | None = None
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _prefix_length(self, input_ids: torch.Tensor) -> int:
        """Length of the prefix all rows share before their first audio token (0 when they differ)."""
        is_audio = input_ids == self.audio_token_id
        if not is_audio.any(dim=1).all():
            return 0
        first = is_audio.int().argmax(dim=1)
        length = int(first[0])
        if not bool((first == length).all()) or not bool(
            (input_ids[:, :length] == input_ids[:1, :length]).all()
        ):
            return 0
        return length

    @torch.no_grad()
    def _compute(self, prefix_ids: torch.Tensor, autocast: contextlib.AbstractContextManager) -> None:
        with autocast:
            output = self.model.language_model(input_ids=prefix_ids[None], use_cache=True)
        self.prefix_ids = prefix_ids
        self.layers = [(keys, values) for keys, values, *_ in output.cache]

    def apply(self, inputs: dict, autocast: contextlib.AbstractContextManager | None = None) -> dict:
        """`inputs` without the shared prefix tokens, plus a `cache` standing in for them."""
        input_ids = inputs["input_ids"]
        config = self.model.config
        if config.voice_lora_rank and (input_ids == config.voice_token_id).any():
            return inputs  # voice prompts turn the voice adapter on, which the cached prefix was computed without
        length = self._prefix_length(input_ids)
        if length == 0 or "cache" in inputs:
            return inputs
        prefix_ids = input_ids[0, :length]
        if self.prefix_ids is None or not torch.equal(self.prefix_ids, prefix_ids):
            self._compute(prefix_ids, autocast or contextlib.nullcontext())
        batch = input_ids.shape[0]
        past = DynamicCache(
            ddp_cache_data=[
                (keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1))
                for keys, values in self.layers
            ],
            config=self.model.language_model.config,
        )
        trimmed = dict(inputs)
        trimmed["input_ids"] = input_ids[:, length:]
        if "labels" in trimmed:
            trimmed["labels"] = trimmed["labels"][:, length:]
        trimmed["cache"] = past  # attention_mask keeps its full width: it covers cached + new tokens
        return trimmed
