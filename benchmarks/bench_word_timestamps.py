"""Word-timestamp accuracy of ``pipeline(..., return_timestamps="word")`` against known word boundaries.

Reference times come from construction: each word of a Harvard sentence is synthesised on its own by an offline TTS
voice (``offline_kit.voices``), trimmed to where its sound starts and ends (the first and last 10 ms frame within
30 dB of the word's loudest), and the words are joined with random pauses of 30-300 ms. Each clip's true word
boundaries are therefore exact. Hypothesis words are matched to reference words after Whisper normalisation
(``training.wer.normalize``) with difflib; only matched words are scored, and the count is printed. Prints the median and
90th-percentile absolute start and end error in milliseconds (target: median <= 80 ms, one projected frame).

``--noise-snr DB`` adds white noise at that signal-to-noise ratio (against the words' mean power), so that the
pauses are not digital silence, as in a real recording.

Model: ``--model`` if given, else the offline preset (``python -m offline_kit.preset``), loaded with this checkout's
code. Run: ``python -m benchmarks.bench_word_timestamps [--clips 8] [--voice kokoro/af_heart] [--noise-snr 20]``.
"""

from __future__ import annotations

import argparse
import difflib
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modeling_tiny_audio import TinyAudioForConditionalGeneration
from offline_kit.text_sources import harvard_sentences
from offline_kit.voices import SAMPLE_RATE, Voice, synthesize
from pipeline_asr import TinyAudioASRPipeline
from training.wer import normalize

OFFLINE_PRESET = Path("~/.cache/tiny_audio/offline/tiny-audio-offline").expanduser()
FRAME = SAMPLE_RATE // 100
TRIM_DB = 30.0
PAUSE_SECONDS = (0.03, 0.3)
EDGE_SECONDS = 0.3


@dataclass
class Clip:
    audio: np.ndarray
    words: list[tuple[str, float, float]]  # normalised word, start, end (seconds)


def trim(audio: np.ndarray) -> np.ndarray:
    """The word's sounding part: from the first to the last 10 ms frame within TRIM_DB of its loudest frame."""
    frames = audio[: len(audio) // FRAME * FRAME].reshape(-1, FRAME)
    level = 10 * np.log10(np.square(frames).mean(axis=1) + 1e-12)
    loud = np.flatnonzero(level > level.max() - TRIM_DB)
    return audio[loud[0] * FRAME : (loud[-1] + 1) * FRAME]


def build_clip(sentence: str, voice: Voice, rng: random.Random) -> Clip:
    """The sentence spoken word by word with known pauses; the reference keeps words that normalise to one word."""
    pieces = [np.zeros(int(EDGE_SECONDS * SAMPLE_RATE), dtype=np.float32)]
    words, position = [], len(pieces[0])
    for index, word in enumerate(sentence.split()):
        if index:
            pause = np.zeros(int(rng.uniform(*PAUSE_SECONDS) * SAMPLE_RATE), dtype=np.float32)
            pieces.append(pause)
            position += len(pause)
        sound = trim(synthesize(voice, word, rng)[0])
        words.append((normalize(word), position / SAMPLE_RATE, (position + len(sound)) / SAMPLE_RATE))
        pieces.append(sound)
        position += len(sound)
    pieces.append(np.zeros(int(EDGE_SECONDS * SAMPLE_RATE), dtype=np.float32))
    return Clip(np.concatenate(pieces), [w for w in words if w[0] and " " not in w[0]])


def add_noise(clip: Clip, snr_db: float, rng: np.random.Generator) -> Clip:
    """The clip with white noise ``snr_db`` under the mean power of its words (pauses excluded)."""
    spoken = np.concatenate(
        [clip.audio[int(start * SAMPLE_RATE) : int(end * SAMPLE_RATE)] for _, start, end in clip.words]
    )
    noise_power = np.mean(np.square(spoken)) / 10 ** (snr_db / 10)
    noise = rng.normal(0.0, np.sqrt(noise_power), len(clip.audio)).astype(np.float32)
    return Clip(clip.audio + noise, clip.words)


def matched_errors(clip: Clip, chunks: list[dict]) -> list[tuple[float, float]]:
    """(start error, end error) in seconds for each hypothesis word that matches a reference word."""
    hypothesis = [(normalize(chunk["text"]), *chunk["timestamp"]) for chunk in chunks]
    matcher = difflib.SequenceMatcher(
        a=[w[0] for w in clip.words], b=[w[0] for w in hypothesis], autojunk=False
    )
    errors = []
    for block in matcher.get_matching_blocks():
        for offset in range(block.size):
            _, ref_start, ref_end = clip.words[block.a + offset]
            _, hyp_start, hyp_end = hypothesis[block.b + offset]
            errors.append((abs(hyp_start - ref_start), abs(hyp_end - ref_end)))
    return errors


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=str(OFFLINE_PRESET), help="checkpoint folder (default: offline preset)"
    )
    parser.add_argument("--clips", type=int, default=8, help="Harvard sentences to synthesise (the last N)")
    parser.add_argument("--voice", default="kokoro/af_heart", help="FAMILY/NAME from offline_kit.voices")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--noise-snr", type=float, help="add white noise at this SNR in dB (default: none)")
    args = parser.parse_args(argv)

    family, name = args.voice.split("/", 1)
    rng = random.Random(0)
    sentences = harvard_sentences()[-args.clips :]
    clips = [build_clip(sentence, Voice(family, name), rng) for sentence in sentences]
    if args.noise_snr is not None:
        noise_rng = np.random.default_rng(0)
        clips = [add_noise(clip, args.noise_snr, noise_rng) for clip in clips]
    model = TinyAudioForConditionalGeneration.from_pretrained(args.model).eval()
    pipe = TinyAudioASRPipeline(model=model)
    started = time.perf_counter()
    results = pipe(
        [clip.audio for clip in clips],
        sampling_rate=SAMPLE_RATE,
        return_timestamps="word",
        batch_size=args.batch_size,
    )
    elapsed = time.perf_counter() - started
    errors = np.array(
        [e for clip, out in zip(clips, results, strict=True) for e in matched_errors(clip, out["chunks"])]
    )
    reference_words = sum(len(clip.words) for clip in clips)
    audio_seconds = sum(len(clip.audio) for clip in clips) / SAMPLE_RATE
    noise = "no noise" if args.noise_snr is None else f"white noise at {args.noise_snr:g} dB SNR"
    print(
        f"model: {args.model}; voice {args.voice}; {len(clips)} clips, {audio_seconds:.1f} s of audio, {noise}"
    )
    print(f"transcribed with word timestamps in {elapsed:.1f} s (batch {args.batch_size})")
    print(f"matched words: {len(errors)} of {reference_words} reference words")
    for label, column in (("start", 0), ("end", 1)):
        median, p90 = np.percentile(errors[:, column] * 1000, [50, 90])
        print(f"{label} error: median {median:.0f} ms, 90th percentile {p90:.0f} ms")
    frame_ms = model.config.audio_token_seconds * 1000
    print(f"target: median <= {frame_ms:.0f} ms (one projected frame)")


if __name__ == "__main__":
    main()
