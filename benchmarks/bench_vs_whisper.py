"""Serving speed side by side with Whisper tiny.en's own pipeline, on the same real clips, in one run (issue 28).

Tiny Audio with its shipped decoding (the checkpoint's generation_config: 5 beams + joint CTC for the offline
model), and greedy (one beam, the CTC weight kept), against the Whisper checkpoint whose encoder it uses, decoded by
Whisper's own 4-layer decoder, greedy and with 5 beams. Every model is loaded as eval.py loads it (`serving.loading.load_asr_pipeline`: LoRA merged) and
fed the clips as eval.py feeds them: `batch_size` clips per pipeline call. They alternate, round after round,
so that all see the same load on a shared machine; each keeps its fastest round. Accuracy is eval.py's job
(`--compare-with`); this script times.

    python -m benchmarks.bench_vs_whisper [--clips 48] [--batch-sizes 1 16] [--rounds 2] [--threads 2] \
      [--reference /tmp/reference/tiny_audio]

With `--reference` (the reference project's `tiny_audio` folder: `benchmarks/reference_project.py` says how to get
it), the reference project joins at batch size 1, its batched generation failing on clips of unequal length. Its
model is built fresh over the same Whisper and LLM, so it has no trained weights to stop on: it generates, greedy
(its default decoding), exactly as many tokens for each clip as ours did, and its time per clip is comparable.

By default the offline preset (`python -m offline_kit.preset`) and its Whisper tiny.en on the real-speech set
(`python -m offline_kit.real_speech`).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import reference_project
from pipeline_asr import read_audio
from serving.loading import load_asr_pipeline
from training.evaluation import load_source, select

PRESET = Path(os.environ.get("TINY_AUDIO_CACHE", "~/.cache/tiny_audio/offline")).expanduser()
RATE = 16000


def transcribe_all(pipe, clips: list[np.ndarray], batch_size: int, generate_kwargs: dict) -> float:
    """Seconds to transcribe every clip, `batch_size` clips per pipeline call (as eval.py calls it)."""
    kwargs = {"generate_kwargs": generate_kwargs} if generate_kwargs else {}
    start = time.perf_counter()
    for first in range(0, len(clips), batch_size):
        batch = [{"raw": clip, "sampling_rate": RATE} for clip in clips[first : first + batch_size]]
        pipe(batch, batch_size=batch_size, **kwargs)
    return time.perf_counter() - start


class ReferenceTranscriber:
    """The reference project's model behind `transcribe_all`'s pipeline call: one clip at a time, its processor and
    its `generate`, as many new tokens for each clip as `new_tokens` gives it."""

    def __init__(self, package: Path, audio_model_id: str, text_model_id: str, new_tokens: dict[int, int]):
        self.model, self.processor = reference_project.build(package, audio_model_id, text_model_id)
        self.model.eval()
        self.new_tokens = new_tokens  # id() of a clip's array -> tokens

    @torch.no_grad()
    def __call__(self, batch: list[dict], batch_size: int, **_) -> None:
        for clip in batch:
            count = self.new_tokens[id(clip["raw"])]
            self.model.generate(
                **self.processor(audio=clip["raw"]), max_new_tokens=count, min_new_tokens=count
            )


def new_token_counts(pipe, clips: list[np.ndarray]) -> dict[int, int]:
    """How many tokens our pipeline generates for each clip (by the id() of its array): its transcript's tokens and
    the end-of-text token."""
    counts = {}
    for clip in clips:
        text = pipe({"raw": clip, "sampling_rate": RATE})["text"]
        counts[id(clip)] = len(pipe.tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(PRESET / "tiny-audio-offline"))
    parser.add_argument("--whisper", default=str(PRESET / "whisper-tiny.en"))
    parser.add_argument("--dataset", default="data/real_speech")
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--reference", type=Path, default=None, help="the reference project's tiny_audio folder"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    source = load_source(args.dataset)
    clips = [read_audio(row[source.audio_column], RATE) for row in select(source.rows, args.clips)]
    audio_seconds = sum(len(clip) for clip in clips) / RATE
    ours = load_asr_pipeline(args.model, dtype="float32")
    whisper = load_asr_pipeline(args.whisper, dtype="float32")
    contenders = {
        "tiny-audio (shipped decoding)": (ours, {}),
        "tiny-audio greedy": (ours, {"num_beams": 1}),
        "whisper greedy": (whisper, {"num_beams": 1}),
        "whisper 5 beams": (whisper, {"num_beams": 5}),
    }
    if args.reference:
        counts = new_token_counts(ours, clips)
        reference = ReferenceTranscriber(
            args.reference, args.whisper, ours.model.config.text_model_id, counts
        )
        contenders["reference project greedy"] = (reference, {})
        print(
            f"reference project: {sum(counts.values())} new tokens in all, as many per clip as ours generates"
        )
    print(
        f"{len(clips)} clips of {args.dataset}, {audio_seconds:.1f} s of audio; fp32, {args.threads} threads; "
        f"tiny-audio decoding: {ours.model.generation_config.num_beams} beams, "
        f"CTC weight {ours.model.generation_config.ctc_decoding_weight}"
    )
    print(f"load average before: {os.getloadavg()[0]:.1f} (the machine may be shared)")
    for pipe, generate_kwargs in contenders.values():  # warm-up: first calls pay one-time costs
        transcribe_all(pipe, clips[:2], 2, generate_kwargs)
    print("| Batch | " + " | ".join(f"{name}, RTFx" for name in contenders) + " | Ours against each |")
    print("| ---: " * (len(contenders) + 2) + "|")
    for batch_size in args.batch_sizes:
        best = dict.fromkeys(contenders, float("inf"))
        for _ in range(args.rounds):
            for name, (pipe, generate_kwargs) in contenders.items():
                if isinstance(pipe, ReferenceTranscriber) and batch_size > 1:
                    continue
                best[name] = min(best[name], transcribe_all(pipe, clips, batch_size, generate_kwargs))
        rtfx = {name: audio_seconds / seconds for name, seconds in best.items()}
        ours_rtfx = rtfx["tiny-audio (shipped decoding)"]
        ratios = ", ".join(
            f"{ours_rtfx / value:.2f}x {name}"
            for name, value in rtfx.items()
            if value and not name.startswith("tiny-audio")
        )
        cells = " | ".join(f"{value:.2f}" if value else "-" for value in rtfx.values())
        print(f"| {batch_size} | {cells} | {ratios} |")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
