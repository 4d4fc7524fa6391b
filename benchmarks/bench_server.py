"""Server throughput: 8 concurrent clients against the same requests made one after another.

Starts `tiny-audio-serve` (as `python -m serving.server`) on 127.0.0.1, sends ``--requests`` espeak-ng sentences
through the `openai` client, first sequentially and then from ``--clients`` threads at once, and prints requests
per second for both and their ratio. Concurrent requests share batches in the server, so the ratio is what
batching buys; it also prints how many transcripts differ between the two runs (a batch sizes its token budget by
its longest clip, so a model that does not stop on its own can write more in a batch).

Model: ``--model`` if given, else the offline preset when built, else a tiny random model (see bench_serving.py).

Run: ``python -m benchmarks.bench_server [--model DIR] [--requests 16] [--clients 8]``
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import soundfile as sf

from benchmarks.bench_serving import REPO, resolve_model
from benchmarks.check_offline_weights import SENTENCES, espeak_speech

RATE = 16000


STARTUP_LIMIT_SECONDS = 600  # a bound on waiting for the server to load its model, not a speed claim


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model_dir: str | Path, port: int, options: list[str], log: Path) -> subprocess.Popen:
    """`python -m serving.server MODEL` (what `tiny-audio-serve` runs), returned once it answers /health."""
    command = [sys.executable, "-m", "serving.server", str(model_dir), f"--port={port}", *options]
    with open(log, "w") as output:
        process = subprocess.Popen(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + STARTUP_LIMIT_SECONDS
    while True:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the server did not start:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.5)


def timed(call, clips: list[bytes], clients: int) -> tuple[float, list[str]]:
    start = time.perf_counter()
    if clients == 1:
        texts = [call(clip) for clip in clips]
    else:
        with ThreadPoolExecutor(clients) as pool:
            texts = list(pool.map(call, clips))
    return time.perf_counter() - start, texts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", help="checkpoint folder (default: offline preset, else a tiny random model)"
    )
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    speech = espeak_speech(SENTENCES)
    clips = []
    for index in range(args.requests):
        buffer = io.BytesIO()
        sf.write(buffer, speech[index % len(speech)], RATE, format="WAV")
        clips.append(buffer.getvalue())
    audio_seconds = sum(len(speech[i % len(speech)]) for i in range(args.requests)) / RATE

    with tempfile.TemporaryDirectory(prefix="bench_server_") as scratch:
        model_dir, description = resolve_model(args.model, Path(scratch))
        print(f"model: {description}")
        port = free_port()
        server = start_server(model_dir, port, [f"--max-batch={args.clients}"], Path(scratch) / "server.log")
        try:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=3600)

            def call(clip: bytes) -> str:
                return client.audio.transcriptions.create(file=("clip.wav", clip), model="tiny-audio").text

            call(clips[0])  # warm-up
            sequential, one_by_one = timed(call, clips, 1)
            concurrent, together = timed(call, clips, args.clients)
        finally:
            server.terminate()
            server.wait()
    print(f"{args.requests} requests, {audio_seconds:.1f} s of audio")
    print(f"sequential:            {sequential:7.2f} s  {args.requests / sequential:6.2f} requests/s")
    print(
        f"{args.clients} concurrent clients: {concurrent:7.2f} s  {args.requests / concurrent:6.2f} requests/s"
    )
    print(f"throughput ratio (concurrent / sequential): {sequential / concurrent:.2f}x")
    differing = sum(a != b for a, b in zip(one_by_one, together, strict=True))
    print(f"transcripts that differ between the two runs: {differing} of {args.requests}")


if __name__ == "__main__":
    main()
