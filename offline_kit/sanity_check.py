"""Can a real ASR model understand our speech data?  WER of Whisper tiny.en per voice family and real source.

    python -m offline_kit.sanity_check --corpus data/synthetic --real data/real_speech

Transcribes a seeded sample of each voice family of the synthetic corpus (both splits), each augmentation
condition, and each source of the real-speech set with the converted Whisper tiny.en (its own decoder, through
the transformers ASR pipeline; built by ``python -m offline_kit.preset``) and prints WER per group, scored
exactly like ``eval.py`` (Whisper English normalisation, jiwer).  A family above ``--max-wer`` is flagged: speech
that Whisper cannot understand is not worth training on.
"""

from __future__ import annotations

import argparse
import os
import random
from collections import defaultdict
from pathlib import Path

import datasets
import torch

from offline_kit.preset import CACHE_ENV, DEFAULT_CACHE, WHISPER_FOLDER
from offline_kit.real_speech import DEFAULT_OUT as DEFAULT_REAL
from offline_kit.synthetic_corpus import DEFAULT_OUT as DEFAULT_CORPUS
from pipeline_asr import read_audio
from serving.loading import load_asr_pipeline
from training.evaluation import pipeline_sampling_rate
from training.wer import score


def default_model() -> Path:
    return Path(os.environ.get(CACHE_ENV, DEFAULT_CACHE)).expanduser() / WHISPER_FOLDER


def aug_condition(row: dict) -> str:
    """clean / telephone / noise / telephone+noise (gain alone counts as clean)."""
    parts = ["telephone"] if row.get("aug_telephone") else []
    if row.get("aug_noise", "none") != "none":
        parts.append(f"noise {row['aug_snr_db']:g} dB")
    return "+".join(parts) or "clean"


def sample_rows(path: Path, group_column: str, per_group: int, seed: int) -> list[dict]:
    """Up to ``per_group`` rows of each value of ``group_column`` across all splits, audio left undecoded."""
    loaded = datasets.load_from_disk(str(path))
    splits = loaded.values() if isinstance(loaded, datasets.DatasetDict) else [loaded]
    rows_by_group: dict[str, list[dict]] = defaultdict(list)
    for split in splits:
        split = split.cast_column("audio", datasets.Audio(decode=False))
        for index, value in enumerate(split[group_column]):
            rows_by_group[value].append((split, index))
    rng = random.Random(seed)
    picked = []
    for group in sorted(rows_by_group):
        members = rows_by_group[group]
        for split, index in rng.sample(members, min(per_group, len(members))):
            picked.append(split[index])
    return picked


def transcribe(pipe, rows: list[dict], batch_size: int) -> list[str]:
    """Whisper transcripts of undecoded dataset rows."""
    rate = pipeline_sampling_rate(pipe)
    inputs = [{"raw": read_audio(row["audio"], rate), "sampling_rate": rate} for row in rows]
    return [out["text"] for out in pipe(inputs, batch_size=batch_size)]


def wer_table(rows: list[dict], predictions: list[str], key) -> dict[str, tuple[int, float]]:
    """group -> (clips, corpus WER), scored as eval.py scores."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        groups[key(row)].append(i)
    return {
        group: (len(idx), score([rows[i]["text"] for i in idx], [predictions[i] for i in idx]).wer)
        for group, idx in sorted(groups.items())
    }


def main(argv: list[str] | None = None) -> dict[str, dict[str, tuple[int, float]]]:
    """Print WER tables; returns them (title -> group -> (clips, WER)) for callers and tests."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--corpus", type=Path, default=DEFAULT_CORPUS, help="synthetic corpus (skip: --corpus '')"
    )
    parser.add_argument("--real", type=Path, default=DEFAULT_REAL, help="real-speech set (skip: --real '')")
    parser.add_argument(
        "--model", type=Path, default=None, help="Whisper folder (default: the offline preset's)"
    )
    parser.add_argument("--per-group", type=int, default=30, help="clips sampled per family / real source")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-wer", type=float, default=0.35, help="flag families above this WER")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1 is ~10x faster than 2 on a busy 2-core box)",
    )
    args = parser.parse_args(argv)
    model = args.model or default_model()
    if not (model / "config.json").exists():
        raise SystemExit(
            f"no Whisper model at {model}: run python -m offline_kit.preset first (or pass --model)"
        )
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        pipe = load_asr_pipeline(str(model), device="cpu", dtype="float32")

        tables = {}
        if str(args.corpus) not in ("", "."):
            rows = sample_rows(args.corpus, "family", args.per_group, args.seed)
            predictions = transcribe(pipe, rows, args.batch_size)
            tables["synthetic: voice family"] = wer_table(rows, predictions, lambda r: r["family"])
            tables["synthetic: family / augmentation"] = wer_table(
                rows, predictions, lambda r: f"{r['family']} / {aug_condition(r)}"
            )
        if str(args.real) not in ("", "."):
            rows = sample_rows(args.real, "source", args.per_group, args.seed)
            tables["real speech: source"] = wer_table(
                rows, transcribe(pipe, rows, args.batch_size), lambda r: r["source"]
            )
    finally:
        torch.set_num_threads(previous_threads)

    print(f"Whisper tiny.en sanity check ({model})")
    for title, table in tables.items():
        print(f"\n{title}")
        for group, (clips, wer) in table.items():
            flagged = title == "synthetic: voice family" and wer > args.max_wer
            flag = "  <- above --max-wer: not worth training on" if flagged else ""
            print(f"  {group:<32} {clips:>5} clips  WER {100 * wer:6.2f}%{flag}")
    return tables


if __name__ == "__main__":
    main()
