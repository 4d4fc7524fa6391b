"""Serving benchmark for the ASR pipeline: real-time factor by batch size, and peak memory on a long file.

RTFx = seconds of audio transcribed per wall-clock second, over a fixed set of clips (seeded, ~3.5 s each), with
exactly ``--new-tokens`` generated per clip as in the reference measurement (Whisper tiny.en + SmolLM2-135M,
one ~3.4 s clip at a time, 24 new tokens, bf16: RTFx ~5). Peak memory is the peak RSS of a fresh process while it
transcribes a long WAV file (44.1 kHz stereo, streamed, resampled and chunked by the pipeline) for 1, 5 and 10
minutes: flat memory means 5 and 10 minutes peak the same (1 minute fills only part of a batch). A model with
LoRA adapters is timed twice, adapters apart and merged into the LLM (``pipeline(..., merge_lora=True)``).

Model: ``--model`` if given, else the offline preset (``python -m offline_kit.preset``) when built, else a tiny
random model; the script prints which.

Run: ``python -m benchmarks.bench_serving [--model DIR] [--threads 1] [--dtype bfloat16] [--batch-sizes 1 4 16] [--int8]``
(on a busy shared CPU, ``--threads 1`` avoids thread thrashing that makes torch's default far slower).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
OFFLINE_PRESET = Path("~/.cache/tiny_audio/offline/tiny-audio-offline").expanduser()
RATE = 16000


def resolve_model(requested: str | None, scratch: Path) -> tuple[str, str]:
    """(folder, description) of the model to benchmark."""
    if requested:
        return requested, f"given model {requested}"
    if (OFFLINE_PRESET / "config.json").is_file():
        return str(OFFLINE_PRESET), f"offline preset {OFFLINE_PRESET} (Whisper tiny.en + SmolLM2-135M)"
    from testing.tiny_models import make_tiny_tiny_audio

    model, processor = make_tiny_tiny_audio(scratch / "components")
    model.save_pretrained(scratch / "tiny")
    processor.save_pretrained(scratch / "tiny")
    return str(scratch / "tiny"), "tiny random model (offline preset not built: python -m offline_kit.preset)"


def speech_with_pauses(seconds: float, rate: int, rng: np.random.Generator) -> np.ndarray:
    """Harmonic 'syllables' of 0.15-0.5 s with short pauses: a speech-like envelope, deterministic per seed."""
    audio = np.zeros(int(seconds * rate), dtype=np.float32)
    position = 0
    while position < len(audio):
        length = int(rng.uniform(0.15, 0.5) * rate)
        t = np.arange(min(length, len(audio) - position)) / rate
        pitch = rng.uniform(100, 250)
        voiced = sum(np.sin(2 * np.pi * pitch * k * t) / k for k in (1, 2, 3))
        audio[position : position + len(t)] = 0.2 * voiced * np.hanning(len(t))
        position += length + int(rng.uniform(0.05, 0.3) * rate)
    return audio


def fixed_clips(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1234)
    return [speech_with_pauses(rng.uniform(2.5, 4.5), RATE, rng) for _ in range(count)]


def load_pipeline(model_dir: str, dtype: str, merge_lora: bool = True, int8: bool = False):
    """The standard factory, but with this checkout's pipeline class (a checkpoint holds a copy that may be older)."""
    from transformers import pipeline

    from pipeline_asr import TinyAudioASRPipeline

    return pipeline(
        "automatic-speech-recognition",
        model=model_dir,
        trust_remote_code=True,
        dtype=dtype,
        pipeline_class=TinyAudioASRPipeline,
        merge_lora=merge_lora,
        int8=int8,
    )


def bench_rtfx(
    model_dir: str, dtype: str, batch_sizes: list[int], clip_count: int, new_tokens: int, int8: bool = False
) -> None:
    """RTFx per batch size; a model with LoRA is timed with its adapters apart and merged (as eval.py serves it),
    and with ``int8`` also with its LLM quantized to dynamic int8 (``--int8`` of eval.py, the demo, the server)."""
    unmerged = load_pipeline(model_dir, dtype, merge_lora=False)
    if unmerged.model.config.lora_rank:
        variants = {"unmerged": unmerged, "merged": load_pipeline(model_dir, dtype, merge_lora=True)}
    else:
        variants = {"fp": unmerged}
    if int8:
        variants["int8"] = load_pipeline(model_dir, dtype, int8=True)
    clips = fixed_clips(clip_count)
    audio_seconds = sum(len(clip) for clip in clips) / RATE
    exact = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "loop_guard": False}
    for warm in variants.values():
        warm(clips[:2], batch_size=2, **exact)
    print(
        f"clips: {len(clips)}, {audio_seconds:.1f} s of audio (mean {audio_seconds / len(clips):.2f} s), "
        f"{new_tokens} new tokens each, dtype {dtype}, torch threads {__import__('torch').get_num_threads()}"
    )
    print(f"load average before: {os.getloadavg()[0]:.1f} (the machine may be shared)")
    print(f"{'variant':>8} {'batch':>5} {'wall s':>8} {'RTFx':>7}")
    for batch_size in batch_sizes:
        walls = {}
        for name, variant in variants.items():  # alternated, so all see the same load on a shared machine
            start = time.perf_counter()
            variant(clips, batch_size=batch_size, **exact)
            walls[name] = time.perf_counter() - start
            print(
                f"{name:>8} {batch_size:>5} {walls[name]:>8.2f} {audio_seconds / walls[name]:>7.1f}",
                flush=True,
            )
        if len(walls) > 1:  # against what eval.py, the demo and the server serve by default
            base = "merged" if "merged" in walls else next(iter(walls))
            ratios = ", ".join(f"{name} {walls[base] / walls[name]:.2f}x" for name in walls if name != base)
            print(f"{'':>8} {batch_size:>5} speed against {base}: {ratios}")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


def write_long_wav(path: Path, minutes: float) -> None:
    """44.1 kHz stereo PCM16, written in blocks so this process never holds the whole file."""
    rng = np.random.default_rng(99)
    with sf.SoundFile(path, "w", samplerate=44100, channels=2, subtype="PCM_16") as handle:
        for _ in range(int(minutes * 6)):  # 10-second blocks
            block = speech_with_pauses(10.0, 44100, rng)
            handle.write(np.stack([block, 0.8 * block], axis=1))


def memory_probe(model_dir: str, dtype: str, wav: str, batch_size: int) -> None:
    """Runs in a fresh process: prints RSS after loading and the peak RSS while transcribing ``wav``.

    The kernel's peak-RSS mark (VmHWM) is reset after loading, so loading's transient peak does not hide the
    transcription's."""
    pipe = load_pipeline(model_dir, dtype)
    loaded = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)
    start = time.perf_counter()
    result = pipe(wav, batch_size=batch_size, return_timestamps=True)
    wall = time.perf_counter() - start
    peak = _status_mib("VmHWM")
    print(
        json.dumps({"loaded_mib": loaded, "peak_mib": peak, "wall_s": wall, "chunks": len(result["chunks"])})
    )


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def bench_memory(
    model_dir: str, dtype: str, minutes_list: list[float], batch_size: int, scratch: Path, threads: int | None
) -> None:
    print(
        f"{'audio':>8} {'chunks':>6} {'RSS after load MiB':>19} {'peak RSS MiB':>13} {'wall s':>7} {'RTFx':>6}"
    )
    for minutes in minutes_list:
        wav = scratch / f"long_{minutes:g}min.wav"
        write_long_wav(wav, minutes)
        probe = [
            sys.executable,
            "-m",
            "benchmarks.bench_serving",
            "--probe",
            str(wav),
            "--model",
            model_dir,
            "--dtype",
            dtype,
            "--probe-batch-size",
            str(batch_size),
            *(["--threads", str(threads)] if threads else []),
        ]
        done = subprocess.run(probe, capture_output=True, text=True, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"{minutes:>6g} m {row['chunks']:>6} {row['loaded_mib']:>19.0f} {row['peak_mib']:>13.0f} "
            f"{row['wall_s']:>7.1f} {minutes * 60 / row['wall_s']:>6.1f}",
            flush=True,
        )
        wav.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", help="checkpoint folder (default: offline preset, else a tiny random model)"
    )
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 4, 16], help="none: skip RTFx")
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument(
        "--int8", action="store_true", help="also time the LLM quantized to dynamic int8 (float32)"
    )
    parser.add_argument("--long-minutes", type=float, nargs="*", default=[1, 5, 10], help="none: skip memory")
    parser.add_argument("--probe-batch-size", type=int, default=8)
    parser.add_argument(
        "--threads", type=int, help="torch threads (default: torch's); 1 is faster on a busy box"
    )
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # internal: fresh-process memory measurement
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.probe:
        memory_probe(args.model, args.dtype, args.probe, args.probe_batch_size)
        return
    with tempfile.TemporaryDirectory(prefix="bench_serving_") as scratch:
        model_dir, description = resolve_model(args.model, Path(scratch))
        print(f"model: {description}")
        if args.batch_sizes:
            bench_rtfx(model_dir, args.dtype, args.batch_sizes, args.clips, args.new_tokens, args.int8)
        if args.long_minutes:
            bench_memory(
                model_dir, args.dtype, args.long_minutes, args.probe_batch_size, Path(scratch), args.threads
            )


if __name__ == "__main__":
    main()
