"""Speech datasets for training and evaluation, loaded one way: a Hub id, a `save_to_disk` folder, an audio folder
(audio files plus a metadata.csv/.tsv/.jsonl) or a manifest (.csv, .tsv, .json, .jsonl) of audio paths and
transcripts.

Whatever the source, the audio column comes back undecoded as a plain {bytes, path} struct with manifest paths made
absolute, so `pipeline_asr.read_audio` decodes any row without knowing where it came from. `datasets`' own Audio
feature is left aside: it needs torchcodec to decode, and even to re-encode rows passing through a streamed `map`.
"""

from __future__ import annotations

import dataclasses
import os

from datasets import (
    Audio,
    Dataset,
    DatasetDict,
    IterableDataset,
    IterableDatasetDict,
    Value,
    load_dataset,
    load_from_disk,
)

RAW_AUDIO = {"bytes": Value("binary"), "path": Value("string")}
MANIFEST_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}
# The metadata file of an audio folder (`datasets`' layout: a `file_name` column of paths relative to the folder).
AUDIO_FOLDER_METADATA = ("metadata.csv", "metadata.tsv", "metadata.jsonl")
# Column names that speech datasets commonly use, in order of preference, for a source whose columns are not given.
AUDIO_COLUMNS = ("audio", "wav", "audio_filepath", "audio_path", "path", "file_name", "file")
TEXT_COLUMNS = ("text", "sentence", "transcription", "transcript", "normalized_text", "reference")
# The split taken from a source with several when none is named (evaluation's case; training always names one).
DEFAULT_SPLIT = "test"


@dataclasses.dataclass
class SpeechRows:
    """The rows of one source and the names of its audio and transcript columns."""

    rows: Dataset | IterableDataset
    audio_column: str
    text_column: str
    split: str  # "all" for a source without splits (a manifest, a saved Dataset)
    base_dir: str | None = None  # the folder a manifest's or audio folder's audio paths are relative to


def load_speech_rows(
    path: str,
    config: str | None = None,
    split: str | None = None,
    *,
    streaming: bool | None = None,
    audio_column: str | None = None,
    text_column: str | None = None,
    cache_dir: str | None = None,
    column_option: str = "{kind}_column for it in the dataset list",
) -> SpeechRows:
    """Load a Hub id (with its ``config``), `save_to_disk` folder, audio folder or manifest and find its audio and
    text columns.

    ``split`` None takes the only split, or DEFAULT_SPLIT. ``streaming`` None streams Hub sets and loads local
    ones. A column not given is found among AUDIO_COLUMNS / TEXT_COLUMNS; ``column_option`` tells the user how to
    name one instead (train.py's dataset list by default; eval.py says "--{kind}-column").
    """
    streaming = (not os.path.exists(path)) if streaming is None else streaming
    manifest = _manifest_of(path)
    base_dir = None
    if manifest is not None:
        extension = os.path.splitext(manifest)[1].lower()
        options = {"delimiter": "\t"} if extension == ".tsv" else {}
        rows = load_dataset(
            MANIFEST_BUILDERS[extension], data_files=manifest, split="train", cache_dir=cache_dir, **options
        )
        split, base_dir = split or "all", os.path.dirname(os.path.abspath(manifest))
    elif any(os.path.exists(os.path.join(path, name)) for name in ("dataset_dict.json", "state.json")):
        rows, split = _one_split(load_from_disk(path), split, path)
    else:  # a Hub id, or a folder in a layout `datasets` recognises (e.g. the Hub's parquet files)
        rows = load_dataset(path, config, split=split, streaming=streaming, cache_dir=cache_dir)
        rows, split = _one_split(rows, split, path)
    if streaming and isinstance(rows, Dataset):
        rows = rows.to_iterable_dataset()
    columns = rows.column_names or list(rows.features or {})
    audio = _pick_column(columns, audio_column, AUDIO_COLUMNS, "audio", path, column_option)
    text = _pick_column(columns, text_column, TEXT_COLUMNS, "text", path, column_option)
    return SpeechRows(_undecoded_audio(rows, audio, base_dir), audio, text, split, base_dir)


def _manifest_of(path: str) -> str | None:
    """The manifest behind a path: the file itself, or an audio folder's metadata file (read the same way, which
    needs no torchcodec, unlike `datasets`' audiofolder builder)."""
    if os.path.isfile(path):
        if os.path.splitext(path)[1].lower() not in MANIFEST_BUILDERS:
            raise ValueError(
                f"{path}: a dataset file must be a manifest, one of {', '.join(MANIFEST_BUILDERS)}"
            )
        return path
    return next(
        (
            os.path.join(path, name)
            for name in AUDIO_FOLDER_METADATA
            if os.path.isfile(os.path.join(path, name))
        ),
        None,
    )


def _one_split(
    loaded: Dataset | IterableDataset | DatasetDict | IterableDatasetDict, split: str | None, path: str
) -> tuple[Dataset | IterableDataset, str]:
    """The named split of a multi-split source; unnamed: its only split, else DEFAULT_SPLIT."""
    if not isinstance(loaded, (DatasetDict, IterableDatasetDict)):
        return loaded, split or "all"
    if split is None:
        split = next(iter(loaded)) if len(loaded) == 1 else DEFAULT_SPLIT
    if split not in loaded:
        raise ValueError(f"{path} has no split '{split}' (splits: {', '.join(loaded)})")
    return loaded[split], split


def _pick_column(
    columns: list[str], wanted: str | None, candidates: tuple[str, ...], kind: str, path: str, option: str
) -> str:
    """The column asked for, else the first conventional name present."""
    how = option.format(kind=kind)
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(
                f"{path} has no {kind} column '{wanted}' (columns: {', '.join(columns)}); set {how}"
            )
        return wanted
    found = next((name for name in candidates if name in columns), None)
    if found is None:
        raise ValueError(
            f"{path}: no {kind} column found (columns: {', '.join(columns)}); "
            f"expected one of {', '.join(candidates)}, or set {how}"
        )
    return found


def _undecoded_audio(
    rows: Dataset | IterableDataset, column: str, base_dir: str | None
) -> Dataset | IterableDataset:
    """The audio column as {bytes, path}: an Audio feature is cast, a column of paths is resolved against
    ``base_dir``. Cast before any select/rename: on streamed datasets a later cast is lost (datasets 5.2)."""
    feature = (rows.features or {}).get(column)
    if isinstance(feature, Audio) or feature == RAW_AUDIO:
        return rows.cast_column(column, RAW_AUDIO)
    if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
        return rows  # undeclared (a streamed source without features): decoded per row as it comes
    features = rows.features.copy()
    features[column] = RAW_AUDIO
    return rows.map(
        lambda audio_path: {
            column: {"bytes": None, "path": audio_path and os.path.join(base_dir or "", audio_path)}
        },
        input_columns=column,
        features=features,
    )
