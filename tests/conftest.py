"""Shared fixtures: tiny random Tiny Audio models saved like real checkpoints (no downloads)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from testing.tiny_models import make_tiny_tiny_audio  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_and_processor(tmp_path_factory):
    """A tiny Whisper-encoder + Llama Tiny Audio model and its processor, in eval mode."""
    return make_tiny_tiny_audio(tmp_path_factory.mktemp("tiny-components"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_model_and_processor) -> str:
    """A saved projector-only checkpoint folder whose encoder and LLM ids point at local tiny folders."""
    model, processor = tiny_model_and_processor
    directory = tmp_path_factory.mktemp("tiny-checkpoint")
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return str(directory)


def copy_checkout(destination: Path) -> Path:
    """The repository as a fresh clone has it (tracked and new files; nothing git ignores, so no data/ or
    outputs/), copied to `destination`, so that commands run there cannot touch this checkout."""
    import shutil
    import subprocess

    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for name in listed:
        if (REPO_ROOT / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, destination / name)
    return destination


def listening_addresses(port: int) -> list[str]:
    """The addresses a TCP socket listens on at ``port`` (from /proc/net/tcp*), as the kernel writes them:
    "0100007F" is 127.0.0.1 and "00000000" is every IPv4 interface."""
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, local_port = local.split(":")
            if state == "0A" and int(local_port, 16) == port:  # 0A = LISTEN
                listening.append(address)
    return listening


def speech_like(seconds: float, sampling_rate: int = 16000, seed: int = 0) -> np.ndarray:
    """A deterministic non-silent test signal: a few harmonics with a syllable-rate envelope plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sampling_rate)) / sampling_rate
    tone = sum(np.sin(2 * np.pi * f * t) / (i + 1) for i, f in enumerate((180.0, 360.0, 720.0)))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 4.0 * t))
    return (0.3 * tone * envelope + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="session")
def speech() -> list[np.ndarray]:
    """A few espeak-ng sentences at 16 kHz (real synthesized speech, no downloads)."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("apt-get install -y espeak-ng")
    from benchmarks import check_offline_weights as check

    return check.espeak_speech(check.SENTENCES[:3])


# A fresh interpreter must not see this repository, even when it is pip-installed in editable mode: drop
# setuptools' editable finder, then prove the model code is not importable.
HIDE_REPO_PRELUDE = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
try:
    import modeling_tiny_audio
    raise SystemExit("the repository must not be importable here")
except ImportError:
    pass
"""

FRESH_PIPELINE_SCRIPT = (
    HIDE_REPO_PRELUDE
    + """
import json
from transformers import pipeline
model_dir, audio, repo, kwargs = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
pipe = pipeline("automatic-speech-recognition", model=model_dir, trust_remote_code=True)
out = pipe(audio, **kwargs)
leaked = [p for p in sys.path if p and repo in p]
print(json.dumps({"text": out["text"], "module": type(pipe).__module__, "leaked": leaked}))
"""
)


def pipeline_in_fresh_process(model_dir: str | Path, audio: str | Path, cwd: Path, **pipeline_kwargs) -> str:
    """Transcribes `audio` through `pipeline(..., trust_remote_code=True)` in a new interpreter.

    The interpreter runs in `cwd` with no PYTHONPATH and the Hub offline, so only the saved folder's own code can
    serve; asserts the pipeline class came from that folder and the repository never got onto sys.path.
    """
    import json
    import subprocess

    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", FRESH_PIPELINE_SCRIPT, str(model_dir), str(audio), str(REPO_ROOT)]
    done = subprocess.run(
        [*command, json.dumps(pipeline_kwargs)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["leaked"] == [] and result["module"].startswith("transformers_modules.")
    return result["text"]
