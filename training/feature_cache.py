"""Feature cache: the frozen encoder runs once per clip; training reads its outputs back from disk.

Outputs are trimmed to the clip's real frames and stored in fp16 as safetensors shards, one tensor per clip named
by the hash of its decoded audio (and beside it the mean and spread of its frames after every frozen layer, what
voice heads with `voice_layer_mix` read: a few KB), in a folder named by a hash of the encoder (id, config,
feature extractor and a checksum of its weights). A cache therefore serves any dataset holding the same audio, survives restarts, and is
never reused across encoders.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid

import torch
from datasets import Dataset
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from checkpoint_tiny_audio import AUDIO_TOWER_PREFIX
from pipeline_asr import read_audio

logger = logging.getLogger(__name__)

LAYER_STATISTICS = "/layer_statistics"  # a clip's hash + this names its per-layer frame statistics
SHARD_CLIPS = (
    1024  # clips per shard: big enough to keep file counts low, small enough to flush progress often
)


def encoder_key(model, processor) -> str:
    """Hash naming the encoder: its id, config, feature extractor settings and a checksum of its frozen weights
    (and where they end, when its top layers train)."""
    digest = hashlib.sha256()
    model_id = str(model.config.audio_model_id)
    if os.path.isdir(os.path.expanduser(model_id)):  # "~/x", "./x" and "/abs/x" name the same local folder
        model_id = os.path.realpath(os.path.expanduser(model_id))
    digest.update(model_id.encode())
    digest.update(model.config.audio_config.to_json_string(use_diff=False).encode())
    settings = json.loads(processor.feature_extractor.to_json_string())
    # Saved processors also record where their code lives; that does not change the features.
    for where_the_code_lives in ("auto_map", "processor_class"):
        settings.pop(where_the_code_lives, None)
    digest.update((json.dumps(settings, indent=2, sort_keys=True) + "\n").encode())
    if model.config.encoder_trainable_layers:  # the cache holds the frozen layers' output, not the encoder's
        digest.update(f"frozen layers: {model.config.frozen_encoder_layers}".encode())
    if model.config.encoder_real_length:  # other frames than those of the 30-s window
        digest.update(b"real length")
    # The weights' bytes, not a float sum: a sum's rounding depends on the thread count, so the same encoder
    # would name a new cache whenever torch ran with another number of threads.
    for name, parameter in model.audio_tower.named_parameters():
        if not model.is_trainable(AUDIO_TOWER_PREFIX + name):
            digest.update(parameter.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:24]


class FeatureStore:
    """Encoder outputs of many clips on disk, fetched by audio hash (safe to read from dataloader workers)."""

    def __init__(self, root: str, key: str):
        self.directory = os.path.join(root, key)
        os.makedirs(self.directory, exist_ok=True)
        self._index: dict[str, str] = {}
        self._handles: dict[str, object] = {}
        self._pid = os.getpid()
        self.refresh()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}  # open files stay with the process that opened them

    def refresh(self) -> None:
        """Re-read the list of shards (another process may have added some)."""
        known = set(self._index.values())
        for name in sorted(os.listdir(self.directory)):
            if name.endswith(".safetensors") and name not in known:
                with safe_open(os.path.join(self.directory, name), framework="pt") as handle:
                    self._index.update(dict.fromkeys(handle.keys(), name))

    def __contains__(self, audio_hash: str) -> bool:
        return audio_hash in self._index

    def __len__(self) -> int:
        """The clips whose frames are stored."""
        return sum(not name.endswith(LAYER_STATISTICS) for name in self._index)

    def get(self, audio_hash: str) -> torch.Tensor:
        """The [frames, dim] fp16 encoder output of one clip."""
        if os.getpid() != self._pid:  # a forked dataloader worker must not share file handles
            self._handles, self._pid = {}, os.getpid()
        shard = self._index.get(audio_hash)
        if shard is None:
            raise KeyError(f"Clip {audio_hash} is not in the feature cache {self.directory}")
        if shard not in self._handles:
            self._handles[shard] = safe_open(os.path.join(self.directory, shard), framework="pt")
        return self._handles[shard].get_tensor(audio_hash)

    def get_layer_statistics(self, audio_hash: str) -> torch.Tensor:
        """The [layers, 2 * dim] fp32 mean and spread of one clip's frames after every frozen encoder layer."""
        return self.get(audio_hash + LAYER_STATISTICS).float()

    def write_shard(self, tensors: dict[str, torch.Tensor]) -> None:
        """Adds one shard; written under a temporary name and renamed, so readers never see half a file."""
        name = f"shard-{uuid.uuid4().hex[:12]}.safetensors"
        temporary = os.path.join(self.directory, f".{name}.tmp")
        save_file(tensors, temporary)
        os.replace(temporary, os.path.join(self.directory, name))
        self._index.update(dict.fromkeys(tensors, name))


class _ClipFeatures:
    """Collate function for the cache build: decode clips and compute the encoder's input features."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, rows: list[dict]) -> tuple[list[str], dict[str, torch.Tensor]]:
        clips = [read_audio(row["audio"], self.processor.sampling_rate) for row in rows]
        return [row["audio_hash"] for row in rows], self.processor.extract_features(clips)


def build_feature_cache(
    model,
    processor,
    dataset: Dataset,
    root: str,
    batch_size: int = 16,
    num_workers: int = 0,
    layer_statistics: bool = False,
) -> FeatureStore:
    """Runs the encoder over every clip of `dataset` not yet cached and returns the store holding all of them; with
    `layer_statistics`, also over the clips cached before their per-layer statistics were kept."""
    store = FeatureStore(root, encoder_key(model, processor))
    hashes = dataset["audio_hash"]
    todo, seen = [], set()
    for index, audio_hash in enumerate(hashes):
        complete = audio_hash in store and (not layer_statistics or audio_hash + LAYER_STATISTICS in store)
        if not complete and audio_hash not in seen:
            seen.add(audio_hash)
            todo.append(index)
    logger.info("Feature cache %s: %d clips cached, %d to encode", store.directory, len(store), len(todo))
    if not todo:
        return store
    loader = DataLoader(
        dataset.select(todo).select_columns(["audio", "audio_hash"]),
        batch_size=batch_size,
        collate_fn=_ClipFeatures(processor),
        num_workers=num_workers,
    )
    device = next(model.audio_tower.parameters()).device
    pending: dict[str, torch.Tensor] = {}
    with open(os.path.join(store.directory, "encoder.json"), "w") as handle:
        json.dump({"audio_model_id": str(model.config.audio_model_id)}, handle)
    for batch_hashes, features in tqdm(loader, desc="Encoding audio for the feature cache", unit="batch"):
        hidden, mask, statistics = model.encode_audio(
            features["input_features"].to(device),
            features["input_features_mask"].to(device),
            output_layer_statistics=True,
        )
        for audio_hash, clip_hidden, clip_mask, clip_statistics in zip(
            batch_hashes, hidden, mask, statistics, strict=True
        ):
            pending[audio_hash] = clip_hidden[: int(clip_mask.sum())].to(torch.float16).cpu().contiguous()
            pending[audio_hash + LAYER_STATISTICS] = clip_statistics.to(torch.float16).cpu().contiguous()
        if len(pending) >= SHARD_CLIPS:
            store.write_shard(pending)
            pending = {}
    if pending:
        store.write_shard(pending)
    return store
