"""Word error rate and speed of an ASR model, measured the way the Open ASR Leaderboard measures them: the
library behind ``eval.py`` (datasets, runs that resume, scoring, comparison of two runs).

How models load, and how WER and RTFx are measured: ``eval.py``'s docstring.

``--task describe`` asks the model to describe each clip instead and scores what the sentence says of the speaker's
gender and accent, the channel, the noise and the speaking rate against what the offline kit's corpora record of
the clip (``offline_kit.descriptions``): accuracy per attribute and a confusion table of each.
"""

from __future__ import annotations

import datetime
import json
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from offline_kit.descriptions import (
    ATTRIBUTES,
    attribute_scores,
    clip_facts,
    format_confusion,
    read_attributes,
    reference_attributes,
)
from pipeline_asr import read_audio
from training.preflight import (
    PreflightError,
    check_hub_dataset,
    differences,
    looks_like_path,
    missing_local_data_message,
)
from training.sources import load_speech_rows
from training.wer import WordErrors, normalize

SEED = 42
# Streaming Hub sets are shuffled through a buffer of this many clips; fixed so the selection never changes.
SHUFFLE_BUFFER = 1000
DEFAULT_OUTPUT_DIR = Path("outputs/eval")
# Clips per generate call unless --batch-size says otherwise; the README's RTFx figures are measured at this size.
DEFAULT_BATCH_SIZE = 16
ESB = "hf-audio/esb-datasets-test-only-sorted"
# Tedlium marks unscorable segments with this reference; the Open ASR Leaderboard drops them like empty ones.
IGNORED_REFERENCES = {"", "ignore time segment in scoring"}
ID_COLUMNS = ("id", "ID", "clip_id", "segment_id", "utterance_id", "file_name", "audio_filepath", "path")
# How the user names a column the dataset loader did not find (shown in its error).
COLUMN_OPTION = "--{kind}-column"
# What eval.py scores: transcripts by WER, descriptions by the attributes they state; a description run's folder
# is the dataset's, with a suffix.
TRANSCRIBE, DESCRIBE = "transcribe", "describe"
SCORED_TASKS = (TRANSCRIBE, DESCRIBE)
TASK_SUFFIX = {DESCRIBE: "-describe"}
# Resamples of the clips behind the 95% interval of a paired comparison (--compare-with).
BOOTSTRAP_DRAWS = 2000


@dataclass(frozen=True)
class HubDataset:
    """Where a standard test set lives on the Hub and which columns hold the audio and the transcript."""

    path: str
    config: str | None
    split: str
    audio_column: str = "audio"
    text_column: str = "text"


DATASETS: dict[str, HubDataset] = {
    "loquacious": HubDataset("speechbrain/LoquaciousSet", "small", "test", audio_column="wav"),
    "librispeech-clean": HubDataset(ESB, "librispeech", "test.clean"),
    "librispeech-other": HubDataset(ESB, "librispeech", "test.other"),
    "ami": HubDataset(ESB, "ami", "test"),
    "earnings22": HubDataset(ESB, "earnings22", "test"),
    "gigaspeech": HubDataset(ESB, "gigaspeech", "test"),
    "tedlium": HubDataset(ESB, "tedlium", "test"),
    "voxpopuli": HubDataset(ESB, "voxpopuli", "test"),
    "spgispeech": HubDataset(ESB, "spgispeech", "test"),
    "commonvoice": HubDataset(ESB, "common_voice", "test"),
}


@dataclass
class DatasetSource:
    """A dataset chosen on the command line: its display name, rows, and the columns to read."""

    name: str
    location: str
    split: str
    rows: Iterable[dict[str, Any]]
    audio_column: str
    text_column: str
    base_dir: Path | None = None  # audio paths of a manifest or audio folder are named relative to this


# ----------------------------------------------------------------------------- datasets


def load_source(
    name: str, split: str | None = None, audio_column: str | None = None, text_column: str | None = None
) -> DatasetSource:
    """A registry name (streamed from the Hub) or a local path: a `save_to_disk` folder, an audio folder or a
    CSV/TSV/JSONL manifest of audio paths + text (`training.sources`, as train.py loads them)."""
    if name in DATASETS:
        spec = DATASETS[name]
        path, config, split, streaming = spec.path, spec.config, split or spec.split, True
        audio_column, text_column = audio_column or spec.audio_column, text_column or spec.text_column
        shown, location = name, f"{spec.path} ({spec.config})" if spec.config else spec.path
    elif Path(name).exists():
        path, config, streaming, shown, location = name, None, None, Path(name).name, str(Path(name))
    else:
        known = ", ".join(DATASETS)
        raise ValueError(
            f"unknown dataset '{name}': known datasets are {known} (or give a path to a local dataset)"
        )
    loaded = load_speech_rows(
        path,
        config,
        split,
        streaming=streaming,
        audio_column=audio_column,
        text_column=text_column,
        column_option=COLUMN_OPTION,
    )
    base_dir = Path(loaded.base_dir) if loaded.base_dir else None
    return DatasetSource(
        shown, location, loaded.split, loaded.rows, loaded.audio_column, loaded.text_column, base_dir
    )


def select(rows: Any, max_samples: int | None, seed: int = SEED) -> Iterable[dict[str, Any]]:
    """The same `max_samples` clips on every run: a seeded shuffle, then the first N."""
    if max_samples is None:
        return rows
    from datasets import Dataset

    if isinstance(rows, Dataset):  # map-style: an exact seeded permutation
        shuffled = rows.shuffle(seed=seed)
        return shuffled.select(range(min(max_samples, len(shuffled))))
    return rows.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER).take(max_samples)


# ----------------------------------------------------------------------------- running


def _sample_id(row: dict[str, Any], index: int, source: DatasetSource) -> str:
    """The dataset's id column, else the audio file path as the dataset names it, else the position in the
    selection."""
    for column in ID_COLUMNS:
        if column != source.audio_column and row.get(column) not in (None, ""):
            return str(row[column])
    audio = row.get(source.audio_column)
    path = audio if isinstance(audio, str) else audio.get("path") if isinstance(audio, dict) else None
    if path and source.base_dir is not None and Path(path).is_relative_to(source.base_dir):
        path = Path(path).relative_to(source.base_dir).as_posix()
    return str(path or index)


def read_finished(samples_path: Path) -> list[dict[str, Any]]:
    """Rows of an interrupted run, in selection order; a half-written last line is dropped."""
    if not samples_path.exists():
        return []
    rows = []
    for line_no, line in enumerate(samples_path.read_text().splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"[resume] ignoring unreadable line {line_no} of {samples_path}", file=sys.stderr)
            break
    if [r["index"] for r in rows] != list(range(len(rows))):
        raise ValueError(
            f"{samples_path}: rows are not the samples 0..{len(rows) - 1} in order; cannot resume"
        )
    return rows


def git_hash() -> str:
    """Short commit of the code that produced the numbers (`unknown` outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def git_user() -> str:
    try:
        out = subprocess.run(["git", "config", "user.name"], capture_output=True, text=True, check=False)
        return out.stdout.strip() or "anonymous"
    except OSError:
        return "anonymous"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip("/")).strip("_") or "model"


def pipeline_sampling_rate(pipe: Any) -> int:
    """The rate the pipeline's feature extractor expects (Whisper and Tiny Audio: 16 kHz)."""
    extractor = getattr(pipe, "feature_extractor", None)
    rate = getattr(extractor, "sampling_rate", None) or getattr(pipe.model.config, "sampling_rate", None)
    return int(rate or 16000)


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"


@dataclass
class RunSettings:
    """What a run needs besides the pipeline and the dataset."""

    model: str
    model_name: str  # shown in results and on the leaderboard (a local checkpoint path is not a good name)
    max_samples: int | None
    batch_size: int
    device: str
    dtype: str
    int8: bool  # the LLM quantized to dynamic int8 (--int8)
    checkpoint_every: int
    generate_kwargs: dict[str, Any]
    chunk_length_s: float | None
    contributor: str
    git_hash: str  # taken when the run starts: the code that produced the numbers
    seed: int = SEED
    task: str = TRANSCRIBE  # or DESCRIBE: scored by attribute, not by WER


# Clips handed to the pipeline per call, in batches: Tiny Audio's pipeline batches a window of 4 batches shortest
# first (less padding; 64 shuffled real-speech clips at batch 16: 101 s -> 63 s), given that many to choose from.
CALL_BATCHES = 4


def _batches(
    rows: Iterable[dict[str, Any]], skip: int, size: int
) -> Iterator[list[tuple[int, dict[str, Any]]]]:
    """Groups of (position in selection, row), after the `skip` rows an interrupted run already finished."""
    batch: list[tuple[int, dict[str, Any]]] = []
    for index, row in enumerate(rows):
        if index < skip:
            continue
        batch.append((index, row))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _transcribe(pipe: Any, audios: list[np.ndarray], rate: int, settings: RunSettings) -> list[str]:
    # The pipeline pops keys from its input dicts, so each call gets fresh ones.
    inputs = [{"raw": a, "sampling_rate": rate} for a in audios]
    kwargs: dict[str, Any] = {"generate_kwargs": settings.generate_kwargs} if settings.generate_kwargs else {}
    if settings.task != TRANSCRIBE:  # stock ASR pipelines know no task
        kwargs["task"] = settings.task
    if settings.chunk_length_s:
        kwargs["chunk_length_s"] = settings.chunk_length_s
    outputs = pipe(inputs, batch_size=settings.batch_size, **kwargs)
    return [o["text"] for o in outputs]


def _timed_transcripts(
    pipe: Any, audios: list[np.ndarray], rate: int, settings: RunSettings
) -> list[tuple[str, float, int] | Exception]:
    """(text, seconds, clips in the call) per clip: one pipeline call transcribes many clips together, so a clip's
    seconds are its share of the call's time. A batch the pipeline rejects (e.g. stock Whisper cannot batch a clip
    over 30 s with shorter ones) is retried clip by clip, so one clip cannot sink a run; a clip that still fails
    comes back as its error."""
    start = time.perf_counter()
    try:
        texts = _transcribe(pipe, audios, rate, settings)
    except Exception as error:  # whatever the model raises, the run goes on and the clip is counted as failed
        if len(audios) == 1:
            return [error]
        print(f"Batch of {len(audios)} failed ({error}); retrying its clips one at a time")
        return [result for audio in audios for result in _timed_transcripts(pipe, [audio], rate, settings)]
    per_clip = (time.perf_counter() - start) / len(audios)
    return [(text, per_clip, len(audios)) for text in texts]


def _scored_row(
    index: int,
    sample_id: str,
    reference: str,
    prediction: str,
    audio_seconds: float,
    time_s: float,
    call_clips: int,
) -> dict[str, Any]:
    ref_norm, pred_norm = normalize(reference), normalize(prediction)
    errors = WordErrors.of([ref_norm], [pred_norm])
    return {
        "index": index,
        "id": sample_id,
        "status": "ok",
        "reference": reference,
        "prediction": prediction,
        "reference_normalized": ref_norm,
        "prediction_normalized": pred_norm,
        "wer": errors.wer,
        "substitutions": errors.substitutions,
        "deletions": errors.deletions,
        "insertions": errors.insertions,
        "reference_words": errors.reference_words,
        "audio_seconds": audio_seconds,
        "time_s": time_s,  # this clip's share of its pipeline call
        "call_clips": call_clips,
    }


def _described_row(
    index: int,
    sample_id: str,
    facts: str,
    prediction: str,
    audio_seconds: float,
    time_s: float,
    call_clips: int,
) -> dict[str, Any]:
    """A described clip: the attributes its facts state and those its description says."""
    return {
        "index": index,
        "id": sample_id,
        "status": "ok",
        "prediction": prediction,
        "reference_attributes": reference_attributes(json.loads(facts)),
        "predicted_attributes": read_attributes(prediction),
        "audio_seconds": audio_seconds,
        "time_s": time_s,
        "call_clips": call_clips,
    }


def _print_described(number: int, row: dict[str, Any]) -> None:
    said = row["predicted_attributes"]
    marks = [
        f"{name} {'ok' if said[name] == truth else f'{said[name]} (is {truth})'}"
        for name, truth in row["reference_attributes"].items()
        if truth is not None
    ]
    tqdm.write(f"Sample {number}: {', '.join(marks)}")
    tqdm.write(f"  Said: {row['prediction']}")


def _print_sample(number: int, row: dict[str, Any]) -> None:
    clips = row.get("call_clips", 1)
    shared = f" (1/{clips} of a {clips}-clip call)" if clips > 1 else ""
    tqdm.write(f"Sample {number}: WER = {_pct(row['wer'])}, Time = {row['time_s']:.2f}s{shared}")
    tqdm.write(f"  Ref:  {row['reference_normalized']}")
    tqdm.write(f"  Pred: {row['prediction_normalized']}")


def _print_checkpoint(scored: list[dict[str, Any]]) -> None:
    errors = WordErrors.of(
        [r["reference_normalized"] for r in scored], [r["prediction_normalized"] for r in scored]
    )
    tqdm.write(f"CHECKPOINT @ {len(scored)} samples:")
    tqdm.write(f"  Corpus WER: {_pct(errors.wer)}")
    tqdm.write(f"  Avg Time/Sample: {sum(r['time_s'] for r in scored) / len(scored):.2f}s")


def summarize(rows: list[dict[str, Any]], source: DatasetSource, settings: RunSettings) -> dict[str, Any]:
    """results.json content from the per-sample rows."""
    scored = [r for r in rows if r["status"] == "ok"]
    if settings.task == DESCRIBE:
        pairs = [(r["reference_attributes"], r["predicted_attributes"]) for r in scored]
        return {
            **_run_facts(rows, source, settings),
            "task": settings.task,
            "attributes": attribute_scores(pairs),
        }
    errors = WordErrors.of(
        [r["reference_normalized"] for r in scored], [r["prediction_normalized"] for r in scored]
    )
    return {
        **_run_facts(rows, source, settings),
        "wer": errors.wer,
        "substitutions": errors.substitutions,
        "deletions": errors.deletions,
        "insertions": errors.insertions,
        "reference_words": errors.reference_words,
    }


def _run_facts(rows: list[dict[str, Any]], source: DatasetSource, settings: RunSettings) -> dict[str, Any]:
    """What every results.json says of its run, whatever the task."""
    scored = [r for r in rows if r["status"] == "ok"]
    audio_s = sum(r["audio_seconds"] for r in scored)
    wall_s = sum(r["time_s"] for r in scored)
    return {
        "model": settings.model_name,
        "model_path": settings.model,
        "dataset": source.name,
        "dataset_location": source.location,
        "split": source.split,
        "n": len(scored),
        "skipped_bad_audio": sum(r["status"] == "bad_audio" for r in rows),
        "skipped_empty_reference": sum(r["status"] == "empty_reference" for r in rows),
        "skipped_failed": sum(r["status"] == "failed" for r in rows),
        "max_samples": settings.max_samples,
        "seed": settings.seed,
        "audio_seconds": audio_s,
        "wall_seconds": wall_s,
        "rtfx": audio_s / wall_s if wall_s > 0 else 0.0,
        "batch_size": settings.batch_size,
        "chunk_length_s": settings.chunk_length_s,
        "generate_kwargs": settings.generate_kwargs,
        "device": settings.device,
        "dtype": settings.dtype,
        "int8": settings.int8,
        "contributor": settings.contributor,
        "git_hash": settings.git_hash,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
    }


def _print_summary(results: dict[str, Any], out_dir: Path) -> None:
    if results.get("task") == DESCRIBE:
        print("=" * 60)
        print(
            f"DESCRIPTIONS: {results['model']} on {results['dataset']} ({results['split']}), {results['n']} clips"
        )
        for attribute, score in results["attributes"].items():
            print(format_confusion(attribute, score))
        print(f"  Results: {out_dir}")
        print("=" * 60)
        return
    print("=" * 60)
    print(f"RESULTS: {results['model']} on {results['dataset']} ({results['split']})")
    print(
        f"  Samples: {results['n']} (skipped: {results['skipped_bad_audio']} bad audio, "
        f"{results['skipped_empty_reference']} empty references, {results['skipped_failed']} failed)"
    )
    print(f"  Corpus WER: {_pct(results['wer'])}")
    print(
        f"  Substitutions: {results['substitutions']}, Deletions: {results['deletions']}, "
        f"Insertions: {results['insertions']} (reference words: {results['reference_words']})"
    )
    print(f"  Total audio: {results['audio_seconds']:.1f}s")
    print(f"  RTFx: {results['rtfx']:.1f} (batch size {results['batch_size']}, {results['device']})")
    print(f"  Results: {out_dir}")
    print("=" * 60)


def _skip(index: int, sample_id: str, status: str, reason: str) -> dict[str, Any]:
    """The row of a clip that is counted but not scored."""
    tqdm.write(f"Skipped {sample_id}: {reason}")
    return {"index": index, "id": sample_id, "status": status, "error": reason}


def _prepare_batch(
    batch: list[tuple[int, dict[str, Any]]], source: DatasetSource, rate: int, task: str = TRANSCRIBE
) -> tuple[dict[int, dict[str, Any]], list[tuple[int, str, np.ndarray, str]]]:
    """Rows skipped for an empty reference or undecodable audio, and (index, id, audio, reference) to transcribe;
    a described clip's reference is its facts (JSON)."""
    skipped: dict[int, dict[str, Any]] = {}
    todo: list[tuple[int, str, np.ndarray, str]] = []
    for index, row in batch:
        sample_id = _sample_id(row, index, source)
        reference = str(row.get(source.text_column) or "")
        if task == DESCRIBE:
            reference = json.dumps(clip_facts(row))
        elif normalize(reference) in IGNORED_REFERENCES:
            skipped[index] = _skip(index, sample_id, "empty_reference", "empty reference")
            continue
        try:
            audio = read_audio(row.get(source.audio_column), rate)
        except Exception as error:  # any decoder failure is one bad clip, not a failed run
            skipped[index] = _skip(index, sample_id, "bad_audio", f"audio failed to decode: {error}")
            continue
        todo.append((index, sample_id, audio, reference))
    return skipped, todo


class NoScoredClips(RuntimeError):
    """A run in which not one clip could be scored: there is no WER to report."""


def partial_dir(out_dir: Path) -> Path:
    """Where a run writes until it finishes; it then takes `out_dir`'s place (a finished run is never touched
    before that)."""
    return out_dir.with_name(out_dir.name + ".partial")


def run_key(settings: RunSettings, source: DatasetSource) -> dict[str, Any]:
    """What makes a run: the same clips transcribed the same way, by the same weights' precision. `--resume`
    continues only a run of equal key."""
    key = {
        "model": settings.model,
        "dataset": source.location,
        "split": source.split,
        "max_samples": settings.max_samples,
        "seed": settings.seed,
        "generate_kwargs": settings.generate_kwargs,
        "chunk_length_s": settings.chunk_length_s,
        "dtype": settings.dtype,
        "int8": settings.int8,
    }
    if settings.task != TRANSCRIBE:  # transcription runs keep the key they always had
        key["task"] = settings.task
    return key


def check_output_dir(out_dir: Path, resume: bool, overwrite: bool, key: dict[str, Any]) -> None:
    """Refuse, before any model loads, a folder whose run this one would replace without being asked to, or that
    `--resume` would continue though it holds another run."""
    partial = partial_dir(out_dir)
    finished = (out_dir / "results.json").is_file()
    if resume and not overwrite:
        runs = ([(out_dir, "a finished")] if finished else []) + [(partial, "an interrupted")]
        for folder, state in runs:
            recorded = _recorded_key(folder)
            if recorded is not None and recorded != key:
                changes = "; ".join(differences(recorded, key))
                raise PreflightError(
                    f"{folder} holds {state} run of other settings, so --resume does not continue it; what "
                    f"differs: {changes}. --overwrite replaces it once the new run completes, or choose another "
                    "--output-dir"
                )
    if partial.exists() and not (resume or overwrite):
        raise PreflightError(
            f"{partial} holds an interrupted run: --resume continues it, --overwrite starts it again"
        )
    if finished and not (resume or overwrite):
        raise PreflightError(
            f"{out_dir} holds a finished run (results.json): --resume reuses it, --overwrite replaces it once "
            "the new run completes, or choose another --output-dir"
        )
    if not finished and out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise PreflightError(
            f"{out_dir} is not empty and holds no finished eval run: choose another --output-dir, or --overwrite "
            "to replace it once the new run completes"
        )


def _recorded_key(folder: Path) -> dict[str, Any] | None:
    """The run.json of the run in `folder`, if it has one."""
    path = folder / "run.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _replace_dir(partial: Path, out_dir: Path) -> None:
    """Put the finished run in place; a run it replaces (--overwrite) is removed only after that."""
    if not out_dir.exists():
        partial.rename(out_dir)
        return
    replaced = out_dir.with_name(out_dir.name + ".replaced")
    shutil.rmtree(replaced, ignore_errors=True)
    out_dir.rename(replaced)
    partial.rename(out_dir)
    shutil.rmtree(replaced)


def _selection_size(rows: Any, max_samples: int | None) -> int | None:
    """How many clips the run will go through, when known (streamed Hub sets have no length)."""
    length = len(rows) if hasattr(rows, "__len__") else None
    if max_samples is None:
        return length
    return max_samples if length is None else min(max_samples, length)


def evaluate(
    pipe: Any,
    source: DatasetSource,
    settings: RunSettings,
    out_dir: Path,
    resume: bool,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Transcribe, score and time the selected clips. Rows go to `OUT.partial/samples.jsonl` after every batch;
    the finished run then replaces `out_dir` (a finished run of other settings only with `overwrite`)."""
    key = run_key(settings, source)
    if resume and (out_dir / "results.json").exists():
        previous = _recorded_key(out_dir)
        if previous == key:  # finished before: nothing to stream again
            results = json.loads((out_dir / "results.json").read_text())
            print(f"[resume] {source.name} already finished")
            _print_summary(results, out_dir)
            return results
        if not overwrite:
            raise ValueError(f"{out_dir} holds another run ({previous}); not resuming {key}")
    work = partial_dir(out_dir)
    samples_path, run_path = work / "samples.jsonl", work / "run.json"
    rows: list[dict[str, Any]] = []
    interrupted = _recorded_key(work) if resume else None
    if interrupted == key:
        rows = read_finished(samples_path)
        print(f"[resume] {len(rows)} samples already done in {samples_path}")
    elif interrupted is not None and not overwrite:
        raise ValueError(f"{work} holds another run ({interrupted}); not resuming {key}")
    else:
        shutil.rmtree(work, ignore_errors=True)  # an interrupted run the user asked to start again
    work.mkdir(parents=True, exist_ok=True)
    run_path.write_text(json.dumps(key, indent=2) + "\n")
    samples_path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    rate = pipeline_sampling_rate(pipe)
    scored = [r for r in rows if r["status"] == "ok"]
    warmed_up = False
    progress = tqdm(
        total=_selection_size(source.rows, settings.max_samples),
        initial=len(rows),
        desc=source.name,
        unit="clip",
    )
    with samples_path.open("a") as out, progress:
        for batch in _batches(
            select(source.rows, settings.max_samples, settings.seed),
            len(rows),
            settings.batch_size * CALL_BATCHES,
        ):
            done, todo = _prepare_batch(batch, source, rate, settings.task)
            if todo:
                audios = [t[2] for t in todo]
                if not warmed_up:  # first call pays for lazy init / kernel compilation: not timed
                    try:
                        _transcribe(pipe, audios[: settings.batch_size], rate, settings)
                    except Exception:  # the timed call below reports and handles it
                        pass
                    warmed_up = True
                outcomes = _timed_transcripts(pipe, audios, rate, settings)
                for (index, sample_id, audio, reference), outcome in zip(todo, outcomes, strict=True):
                    if isinstance(outcome, Exception):
                        done[index] = _skip(index, sample_id, "failed", f"transcription failed: {outcome}")
                        continue
                    prediction, seconds, call_clips = outcome
                    score = _described_row if settings.task == DESCRIBE else _scored_row
                    done[index] = score(
                        index, sample_id, reference, prediction, len(audio) / rate, seconds, call_clips
                    )
            for index in sorted(done):
                row = done[index]
                rows.append(row)
                out.write(json.dumps(row) + "\n")
                progress.update()
                if row["status"] != "ok":
                    continue
                scored.append(row)
                if settings.task == DESCRIBE:
                    _print_described(len(scored), row)
                    continue
                _print_sample(len(scored), row)
                if len(scored) % settings.checkpoint_every == 0:
                    _print_checkpoint(scored)
            out.flush()

    results = summarize(rows, source, settings)
    if results["n"] == 0:
        what = "description score" if settings.task == DESCRIBE else "WER"
        raise NoScoredClips(
            f"no clip of {source.name} could be scored ({len(rows)} selected: {results['skipped_bad_audio']} "
            f"bad audio, {results['skipped_empty_reference']} empty references, {results['skipped_failed']} "
            f"failed transcriptions), so there is no {what}; each clip's reason is in {samples_path}"
        )
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    _replace_dir(work, out_dir)
    _print_summary(results, out_dir)
    return results


# ----------------------------------------------------------------------------- paired comparison


def baseline_samples(directory: Path, dataset_slug: str) -> Path:
    """The samples.jsonl of one dataset in an earlier run's --output-dir (or in its model folder)."""
    found = [
        path
        for path in [
            directory / dataset_slug / "samples.jsonl",
            *directory.glob(f"*/{dataset_slug}/samples.jsonl"),
        ]
        if path.is_file()
    ]
    if len(found) != 1:
        what = (
            "no run"
            if not found
            else f"runs of {len(found)} models ({', '.join(str(p.parent.parent) for p in found)})"
        )
        raise ValueError(
            f"--compare-with {directory}: {what} of dataset {dataset_slug}; pass the folder of one eval.py run"
        )
    return found[0]


def _scored_by_clip(rows: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """Scored rows keyed by (clip id, how many rows with that id came before): a dataset may repeat an id."""
    seen: Counter[str] = Counter()
    keyed = {}
    for row in rows:
        key = (row["id"], seen[row["id"]])
        seen[row["id"]] += 1
        if row["status"] == "ok":
            keyed[key] = row
    return keyed


def _errors(row: dict[str, Any]) -> int:
    return row["substitutions"] + row["deletions"] + row["insertions"]


def compare_runs(
    baseline: list[dict[str, Any]],
    candidate: list[dict[str, Any]],
    draws: int = BOOTSTRAP_DRAWS,
    seed: int = SEED,
) -> dict[str, Any]:
    """Candidate against baseline on the clips both scored: corpus WERs, clips better and worse, and a 95% interval
    of the WER change from resampling those clips with replacement (the same clips for both runs, so the
    interval reflects which model is better, not which clips happen to be hard)."""
    before, after = _scored_by_clip(baseline), _scored_by_clip(candidate)
    shared = [key for key in after if key in before]
    if not shared:
        raise ValueError("the two runs share no scored clip: were they made on the same dataset?")
    for key in shared:
        if before[key]["reference_normalized"] != after[key]["reference_normalized"]:
            raise ValueError(f"clip {key[0]} has a different reference in each run: not the same dataset")
    words = np.array([before[key]["reference_words"] for key in shared])
    errors_before = np.array([_errors(before[key]) for key in shared])
    errors_after = np.array([_errors(after[key]) for key in shared])
    picks = np.random.default_rng(seed).integers(0, len(shared), (draws, len(shared)))
    changes = (errors_after[picks].sum(axis=1) - errors_before[picks].sum(axis=1)) / words[picks].sum(axis=1)
    low, high = np.percentile(changes, [2.5, 97.5])
    return {
        "clips": len(shared),
        "baseline_wer": errors_before.sum() / words.sum(),
        "candidate_wer": errors_after.sum() / words.sum(),
        "wer_change": (errors_after.sum() - errors_before.sum()) / words.sum(),
        "wer_change_95": [float(low), float(high)],
        "bootstrap_draws": draws,
        "clips_better": int((errors_after < errors_before).sum()),
        "clips_worse": int((errors_after > errors_before).sum()),
        "clips_same": int((errors_after == errors_before).sum()),
    }


def format_comparison(comparison: dict[str, Any], baseline: Path) -> str:
    low, high = comparison["wer_change_95"]
    return (
        f"Against {baseline} ({comparison['clips']} clips): WER {_pct(comparison['baseline_wer'])} -> "
        f"{_pct(comparison['candidate_wer'])}, change {100 * comparison['wer_change']:+.2f} points "
        f"(95% interval {100 * low:+.2f} to {100 * high:+.2f}); clips better {comparison['clips_better']}, "
        f"worse {comparison['clips_worse']}, same {comparison['clips_same']}"
    )


def format_attribute_table(results: list[dict[str, Any]]) -> str:
    """Markdown table of one model's description accuracy per attribute over several datasets."""
    names = [name for name in ATTRIBUTES if any(name in r["attributes"] for r in results)]
    lines = ["| Dataset | Samples | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for r in results:
        cells = [_pct(r["attributes"][n]["accuracy"]) if n in r["attributes"] else "" for n in names]
        lines.append(f"| {r['dataset']} | {r['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_table(results: list[dict[str, Any]]) -> str:
    """Markdown table of one model over several datasets, with the plain average WER the leaderboard uses."""
    lines = ["| Dataset | Split | Samples | WER | RTFx (batch size) |", "|---|---|---:|---:|---:|"]
    for r in results:
        lines.append(
            f"| {r['dataset']} | {r['split']} | {r['n']} | {_pct(r['wer'])} | {r['rtfx']:.1f} ({r['batch_size']}) |"
        )
    if len(results) > 1:
        average = sum(r["wer"] for r in results) / len(results)
        lines.append(f"| **average** | | {sum(r['n'] for r in results)} | {_pct(average)} | |")
    return "\n".join(lines)


def resolve_dataset(
    name: str, split: str | None, audio_column: str | None, text_column: str | None
) -> DatasetSource:
    """`load_source` after the checks a user can act on: an unknown name, a folder not built yet, a Hub set that
    cannot be reached (checked first, so nothing waits on a model load or a network timeout)."""
    if name in DATASETS:
        check_hub_dataset(DATASETS[name].path, shown=f"'{name}'")
    elif not Path(name).exists():
        if looks_like_path(name) or "/" in name:
            raise PreflightError(missing_local_data_message(name))
        raise PreflightError(
            f"unknown dataset '{name}': known datasets are {', '.join(DATASETS)} (or a local path)"
        )
    return load_source(name, split, audio_column, text_column)
