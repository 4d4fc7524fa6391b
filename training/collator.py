"""Batches for the Trainer: prompts + answers as token ids, and the audio either live or from the feature cache."""

from __future__ import annotations

import json

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import BatchFeature

from configuration_tiny_audio import projector_token_lengths
from pipeline_asr import read_audio
from processing_tiny_audio import IGNORE_INDEX
from training.feature_cache import FeatureStore


class SpeechCollator:
    """Turns checked rows (audio, text, task, facts, audio_hash) into a training batch.

    Without a store the batch carries `input_features` for the live encoder; with one it carries the cached
    `encoder_hidden_states` (trimmed clips padded to the longest of the batch) and `encoder_mask`, and with
    `layer_statistics` (heads with `TinyAudioConfig.voice_layer_mix`) `encoder_layer_statistics`. With the CTC
    head's `ctc_blank_token_id` it adds `ctc_targets`, the targets of the model's CTC loss; with the model's
    `voice_attributes` (`TinyAudioConfig.voice_attributes`), `voice_attribute_targets`, read from each row's facts.
    """

    def __init__(
        self,
        processor,
        store: FeatureStore | None = None,
        ctc_blank_token_id: int | None = None,
        voice_attributes: list[dict] | None = None,
        layer_statistics: bool = False,
    ):
        self.processor = processor
        self.layer_statistics = layer_statistics
        self.store = store
        self.ctc_blank_token_id = ctc_blank_token_id
        self.voice_attributes = voice_attributes

    def __call__(self, rows: list[dict]) -> BatchFeature:
        if self.store is None:
            clips = [
                self.processor.validate_audio(read_audio(row["audio"], self.processor.sampling_rate), index)
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
            if self.layer_statistics:
                audio["encoder_layer_statistics"] = torch.stack(
                    [self.store.get_layer_statistics(row["audio_hash"]) for row in rows]
                )
            counts = projector_token_lengths(lengths, self.processor.projector_downsample).tolist()
        instructions = [self.processor.instruction(row["task"], None) for row in rows]
        batch = self.processor.text_inputs(counts, instructions, [row["text"] for row in rows])
        batch.update(audio)
        if self.ctc_blank_token_id is not None:
            batch["ctc_targets"] = self.ctc_targets(
                batch["labels"], [row["task"] == "transcribe" for row in rows]
            )
        if self.voice_attributes:
            batch["voice_attribute_targets"] = self.voice_attribute_targets(rows)
        return batch

    def voice_attribute_targets(self, rows: list[dict]) -> torch.Tensor:
        """[batch, attributes]: the index of each clip's value of each attribute, from its facts (JSON); IGNORE_INDEX
        where its facts state no value the heads know."""
        labels = torch.full((len(rows), len(self.voice_attributes)), IGNORE_INDEX, dtype=torch.long)
        for row_index, row in enumerate(rows):
            facts = json.loads(row.get("facts") or "{}")
            for column, entry in enumerate(self.voice_attributes):
                if facts.get(entry["attribute"]) in entry["values"]:
                    labels[row_index, column] = entry["values"].index(facts[entry["attribute"]])
        return labels

    def ctc_targets(self, labels: torch.Tensor, transcript_rows: list[bool]) -> torch.Tensor:
        """The spoken tokens of each transcript row: its answer without special tokens (EOS) or the blank, padded
        with IGNORE_INDEX; a row whose answer is no transcript is padding only."""
        silent = torch.tensor(sorted({*self.processor.tokenizer.all_special_ids, self.ctc_blank_token_id}))
        spoken = []
        for row, is_transcript in zip(labels, transcript_rows, strict=True):
            answer = row[row != IGNORE_INDEX] if is_transcript else row[:0]
            spoken.append(answer[~torch.isin(answer, silent)])
        return pad_sequence(spoken, batch_first=True, padding_value=IGNORE_INDEX)
