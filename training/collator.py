"""Batches for the Trainer: prompts + answers as token ids, and the audio either live or from the feature cache."""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import BatchFeature

from training.data import decode_audio
from training.feature_cache import FeatureStore


def text_inputs(processor, token_counts: list[int], tasks: list[str], texts: list[str]) -> BatchFeature:
    """input_ids/attention_mask/labels for clips of known audio-token counts, each with its own task prompt.

    The processor's own `__call__` takes one task per batch and needs the audio; the feature cache has neither.
    """
    prompts = []
    for count, task in zip(token_counts, tasks, strict=True):
        template = processor.prompt_text(f"{processor.audio_token}\n{processor.instruction(task, None)}")
        prompts.append(template.replace(processor.audio_token, processor.audio_token * count, 1))
    return processor._tokenize(prompts, texts, padding_side="right")


class SpeechCollator:
    """Turns checked rows (audio, text, task, audio_hash) into a training batch.

    Without a store the batch carries `input_features` for the live encoder; with one it carries the cached
    `encoder_hidden_states` (trimmed clips padded to the longest of the batch) and `encoder_mask`.
    """

    def __init__(self, processor, store: FeatureStore | None = None):
        self.processor = processor
        self.store = store

    def __call__(self, rows: list[dict]) -> BatchFeature:
        if self.store is None:
            clips = [
                self.processor.validate_audio(decode_audio(row["audio"], self.processor.sampling_rate), index)
                for index, row in enumerate(rows)
            ]
            audio = self.processor.extract_features(clips)
            counts = self.processor.audio_token_counts(audio["input_features_mask"]).tolist()
        else:
            hidden = [self.store.get(row["audio_hash"]) for row in rows]
            lengths = torch.tensor([clip.shape[0] for clip in hidden])
            audio = {
                "encoder_hidden_states": pad_sequence(hidden, batch_first=True),
                "encoder_mask": torch.arange(int(lengths.max()))[None, :] < lengths[:, None],
            }
            downsample = self.processor.projector_downsample
            counts = torch.div(lengths + downsample - 1, downsample, rounding_mode="floor").tolist()
        batch = text_inputs(
            self.processor, counts, [row["task"] for row in rows], [row["text"] for row in rows]
        )
        batch.update(audio)
        return batch
