"""Training data: speech datasets (loaded by `training.sources`), checked and mixed by weight.

Every source is mapped onto the same columns (`audio` undecoded, `text`, `task`), then each row is checked once
(`duration`, `audio_hash`, `skip`): rows that would crash or poison a run (undecodable audio, clips longer than the
encoder window, empty transcripts, unknown tasks) are dropped and counted instead of failing the run.
Audio is decoded by the pipeline's own reader (`pipeline_asr.read_audio`), as at inference.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable
from typing import Any

import huggingface_hub
import numpy as np
import yaml
from datasets import Dataset, Features, IterableDataset, Value, interleave_datasets

from pipeline_asr import AudioInputError, NonFiniteAudioError, NoSamplesError, read_audio
from training.preflight import (
    LOCAL_DATA_BUILDERS,
    PreflightError,
    check_hub_dataset,
    looks_like_path,
    missing_local_data_message,
)
from training.sources import SpeechRows, load_speech_rows

logger = logging.getLogger(__name__)

SKIP_REASONS = (
    "undecodable_audio",
    "empty_audio",
    "nonfinite_audio",
    "too_long",
    "empty_transcript",
    "unknown_task",
)
# Decoding failures that are counted under their own reason rather than as undecodable audio.
DECODE_SKIP_REASONS = {NonFiniteAudioError: "nonfinite_audio", NoSamplesError: "empty_audio"}
# Clips shorter than this carry no speech worth a training step (and break some encoders' convolutions).
MIN_AUDIO_SECONDS = 0.1


@dataclasses.dataclass
class DatasetSpec:
    """One training source. `path` is a Hub id, a `save_to_disk` folder, an audio folder or a CSV/TSV/JSONL manifest."""

    path: str
    name: str | None = None  # Hub config name (e.g. "small" for LoquaciousSet, "clean" for LibriSpeech)
    split: str = "train"
    audio_column: str | None = None  # None -> the first of training.sources.AUDIO_COLUMNS the source has
    text_column: str | None = None  # None -> the first of training.sources.TEXT_COLUMNS
    task_column: str = "task"  # used when present; otherwise every row gets `task`
    task: str | None = None  # None -> the model's default task
    weight: float = 1.0  # relative sampling weight when several sources are interleaved
    streaming: bool | None = None  # None -> stream Hub datasets, load local ones
    max_samples: int | None = None

    @classmethod
    def from_value(cls, value: str | dict) -> DatasetSpec:
        if isinstance(value, str):
            value = {"path": value}
        unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"Unknown dataset option(s) {sorted(unknown)} in {value}")
        return cls(**{**value, "path": os.path.expanduser(value["path"])})

    @property
    def is_local(self) -> bool:
        return os.path.exists(self.path)

    @property
    def is_streaming(self) -> bool:
        return (not self.is_local) if self.streaming is None else self.streaming


def parse_dataset_specs(value: str | list | None) -> list[DatasetSpec]:
    """Dataset list from YAML/JSON text (as given on the command line) or an already parsed list."""
    if value is None:
        return []
    if isinstance(value, str):
        stripped = value.strip()
        value = yaml.safe_load(stripped) if stripped.startswith(("[", "{", "-")) else [stripped]
    if isinstance(value, (str, dict)):
        value = [value]
    return [DatasetSpec.from_value(item) for item in value]


def data_fingerprint(path: str) -> str | None:
    """A content key of a local dataset, to tell whether a run's data changed (None for a Hub dataset).

    `save_to_disk` folders carry `datasets`' own fingerprint per split; a manifest is hashed; an audio folder is
    keyed by its file names and sizes.
    """
    path = os.path.expanduser(path)
    digest = hashlib.sha1()
    if os.path.isfile(path):
        with open(path, "rb") as handle:
            digest.update(handle.read())
    elif os.path.isdir(path):
        for root, folders, names in os.walk(path):
            folders.sort()
            for name in sorted(names):
                full = os.path.join(root, name)
                if name == "state.json":
                    with open(full) as handle:
                        digest.update(json.load(handle).get("_fingerprint", "").encode())
                elif not name.endswith(".arrow"):  # arrow files are covered by their split's fingerprint
                    digest.update(f"{os.path.relpath(full, path)}:{os.path.getsize(full)}".encode())
    else:
        return None
    return digest.hexdigest()


def audio_hash(array: np.ndarray) -> str:
    """Content key of decoded audio: the feature cache is keyed by it (plus the encoder), not by file names."""
    return hashlib.sha1(array.tobytes()).hexdigest()


def check_row(
    row: dict, *, sampling_rate: int, max_audio_seconds: float, tasks: Iterable[str]
) -> dict[str, Any]:
    """The columns the filter needs: duration, content hash, and why the row must be skipped ("" = keep)."""
    result = {"duration": 0.0, "audio_hash": "", "skip": ""}
    if row["task"] not in tasks:
        result["skip"] = "unknown_task"
    elif not (row["text"] or "").strip():
        result["skip"] = "empty_transcript"
    else:
        try:
            array = read_audio(row["audio"], sampling_rate)
        except AudioInputError as error:
            result["skip"] = DECODE_SKIP_REASONS.get(type(error.__cause__), "undecodable_audio")
            return result
        result["duration"] = len(array) / sampling_rate
        if result["duration"] < MIN_AUDIO_SECONDS:
            result["skip"] = "empty_audio"
        elif result["duration"] > max_audio_seconds:
            result["skip"] = "too_long"
        else:
            result["audio_hash"] = audio_hash(array)
    return result


class StreamSkipCounter:
    """Keeps count of rows dropped from a stream (per process: dataloader workers each count their own)."""

    def __init__(self, source: str):
        self.source = source
        self.counts: Counter[str] = Counter()

    def keep(self, row: dict) -> bool:
        if not row["skip"]:
            return True
        self.counts[row["skip"]] += 1
        total = sum(self.counts.values())
        if total <= 10 or total % 100 == 0:
            logger.warning(
                "Skipping a row of %s (%s); skipped so far: %s", self.source, row["skip"], dict(self.counts)
            )
        return False


def _load_rows(spec: DatasetSpec, cache_dir: str | None) -> SpeechRows:
    """The raw rows of one source, with its own column names."""
    return load_speech_rows(
        spec.path,
        spec.name,
        spec.split,
        streaming=spec.is_streaming,
        audio_column=spec.audio_column,
        text_column=spec.text_column,
        cache_dir=cache_dir,
    )


def check_dataset_spec(spec: DatasetSpec, cache_dir: str | None = None) -> None:
    """Before any model loads: a local source exists and has its columns; a Hub one can be reached."""
    if not spec.is_local:
        if looks_like_path(spec.path) or os.path.normpath(spec.path) in LOCAL_DATA_BUILDERS:
            raise PreflightError(missing_local_data_message(spec.path))
        # A downloaded (not streamed) Hub set may be in the datasets cache: offline, `datasets` itself decides.
        if spec.is_streaming or not huggingface_hub.is_offline_mode():
            check_hub_dataset(spec.path)
        return
    try:
        _load_rows(spec, cache_dir)
    except ValueError as error:
        raise PreflightError(str(error)) from None


# A row's facts: a JSON object {attribute: value}, e.g. {"gender": "female", "channel": "telephone"}.
FACTS_COLUMN = "facts"


def _normalize(source: SpeechRows, spec: DatasetSpec, default_task: str) -> Dataset | IterableDataset:
    """Map a source's own column names onto `audio`, `text`, `task` and `facts` (what its clips sound like, as JSON:
    the voice-attribute heads learn from it; empty when the source has none), dropping everything else."""
    dataset = source.rows
    columns = dataset.column_names or list(dataset.features or {})
    keep = [source.audio_column, source.text_column]
    keep += [spec.task_column] if spec.task_column in columns else []
    keep += [FACTS_COLUMN] if FACTS_COLUMN in columns and FACTS_COLUMN not in keep else []
    dataset = dataset.select_columns(keep)
    renames = {source.audio_column: "audio", source.text_column: "text", spec.task_column: "task"}
    dataset = dataset.rename_columns({old: new for old, new in renames.items() if old in keep and old != new})
    missing = {"task": spec.task or default_task} if "task" not in keep else {}
    missing |= {FACTS_COLUMN: ""} if FACTS_COLUMN not in keep else {}
    if missing:
        # Named features: a stream's map would otherwise forget them all, and the casts below need them.
        features = (
            None
            if dataset.features is None
            else Features({**dataset.features, **{column: Value("string") for column in missing}})
        )
        dataset = dataset.map(lambda _: missing, features=features)
    for column in ("text", "task", FACTS_COLUMN):
        dataset = dataset.cast_column(column, Value("string"))
    if spec.max_samples is not None:
        if isinstance(dataset, IterableDataset):
            dataset = dataset.take(spec.max_samples)
        else:
            dataset = dataset.select(range(min(spec.max_samples, len(dataset))))
    return dataset


def load_speech_data(
    specs: list[DatasetSpec],
    *,
    sampling_rate: int,
    max_audio_seconds: float,
    tasks: Iterable[str],
    default_task: str,
    seed: int = 0,
    num_proc: int | None = None,
    shuffle_buffer_size: int = 1000,
    cache_dir: str | None = None,
    task_weights: dict[str, float] | None = None,
) -> tuple[Dataset | IterableDataset, Counter[str]]:
    """Load, check and interleave `specs`: a dataset of good rows plus the counts of skipped rows by reason.

    Sources are mixed by their `weight`; with `task_weights` ({task: share}) each task gets its share of the rows,
    split among the sources that hold it by their weights.

    Local datasets are checked up front (exact counts, cached by `datasets`); streamed ones are checked as they
    flow, and their counts are logged as rows are dropped.
    The result has columns audio, text, task, facts, duration, audio_hash, length (= duration, for group_by_length).
    """
    if not specs:
        raise ValueError("No training datasets given")
    tasks = tuple(tasks)
    for spec in specs:
        if spec.task is not None and spec.task not in tasks:
            raise ValueError(f"dataset {spec.path}: {unknown_task_message(spec.task, tasks)}")
    for task in task_weights or {}:
        if task not in tasks:
            raise ValueError(f"task_weights: {unknown_task_message(task, tasks)}")
    check = functools.partial(
        check_row, sampling_rate=sampling_rate, max_audio_seconds=max_audio_seconds, tasks=tasks
    )
    skipped: Counter[str] = Counter()
    sources = []
    for spec in specs:
        dataset = _normalize(_load_rows(spec, cache_dir), spec, default_task)
        if isinstance(dataset, IterableDataset):
            counter = StreamSkipCounter(spec.path)
            dataset = dataset.map(check).filter(counter.keep)
            dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer_size)
        else:
            dataset = dataset.map(check, num_proc=num_proc, desc=f"Checking {spec.path}")
            reasons = Counter(dataset["skip"])
            reasons.pop("", None)
            if reasons:
                logger.warning("Skipping %d rows of %s: %s", sum(reasons.values()), spec.path, dict(reasons))
            skipped.update(reasons)
            dataset = dataset.filter(lambda skip: not skip, input_columns="skip", num_proc=num_proc)
            if len(dataset) == 0:
                raise ValueError(f"Dataset {spec.path} has no usable rows (skipped: {dict(reasons)})")
        sources.append((dataset.remove_columns("skip"), spec))
    if task_weights:
        sources = by_task(sources, task_weights)
    else:
        sources = [(dataset, spec.weight) for dataset, spec in sources]
    if len(sources) == 1:
        mixed = sources[0][0]
    else:
        parts = [dataset for dataset, _ in sources]
        if any(isinstance(part, IterableDataset) for part in parts):
            parts = [p if isinstance(p, IterableDataset) else p.to_iterable_dataset() for p in parts]
        total = sum(weight for _, weight in sources)
        mixed = interleave_datasets(
            parts,
            probabilities=[weight / total for _, weight in sources],
            seed=seed,
            stopping_strategy="all_exhausted",
        )
    mixed = mixed.map(lambda duration: {"length": duration}, input_columns="duration")
    return mixed, skipped


def unknown_task_message(task: str, tasks: Iterable[str]) -> str:
    """What train.py says of a task the model has no prompt for."""
    return (
        f"unknown task {task!r}; the model's tasks are {', '.join(sorted(tasks))} (add one with task_prompts)"
    )


def parse_task_weights(value: str | dict | None) -> dict[str, float]:
    """`{task: share}` from YAML/JSON text (as given on the command line) or a parsed mapping; shares are positive."""
    if value is None or value == "":
        return {}
    parsed = yaml.safe_load(value) if isinstance(value, str) else value
    if not isinstance(parsed, dict):
        raise ValueError(
            f"task_weights must map tasks to shares, e.g. {{transcribe: 0.8, describe: 0.2}}; got {value!r}"
        )
    for task, share in parsed.items():
        if isinstance(share, bool) or not isinstance(share, (int, float)) or share <= 0:
            raise ValueError(
                f"task_weights: the share of task {task!r} must be a positive number, got {share!r}"
            )
    return {str(task): float(share) for task, share in parsed.items()}


def by_task(
    sources: list[tuple[Dataset | IterableDataset, DatasetSpec]], task_weights: dict[str, float]
) -> list[tuple[Dataset | IterableDataset, float]]:
    """Each source split into one per task it holds, weighted so that every task gets its share of the mix."""
    parts: list[tuple[Dataset | IterableDataset, str, float]] = []
    for dataset, spec in sources:
        if isinstance(dataset, Dataset):
            present = sorted(set(dataset["task"]))
        elif spec.task is not None:
            present = [spec.task]
        else:
            raise ValueError(
                f"task_weights: give the task of streamed dataset {spec.path} (task: ... in its entry), so that "
                "its rows can be counted towards it"
            )
        for task in present:
            if task not in task_weights:
                raise ValueError(
                    f"rows of {spec.path} have task {task!r}, which task_weights ({task_weights}) gives no share"
                )
            part = (
                dataset
                if len(present) == 1
                else dataset.filter(lambda t, task=task: t == task, input_columns="task")
            )
            parts.append((part, task, spec.weight))
    for task in task_weights:
        if not any(part_task == task for _, part_task, _ in parts):
            raise ValueError(
                f"task_weights gives task {task!r} a share, but no training dataset has its rows"
            )
    totals: Counter[str] = Counter()
    for _, task, weight in parts:
        totals[task] += weight
    return [(part, task_weights[task] * weight / totals[task]) for part, task, weight in parts]


def write_skip_report(path: str, skipped: Counter[str]) -> None:
    """Skipped-row counts next to the checkpoints, so a run's data losses are on record."""
    with open(path, "w") as handle:
        json.dump({reason: skipped.get(reason, 0) for reason in SKIP_REASONS}, handle, indent=2)
