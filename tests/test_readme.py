"""The README's commands, run as a new user runs them: parsed from README.md's code blocks (so this test breaks
when the README drifts), each in a fresh copy of the repository with only its placeholders (MODEL, USER/NAME, ...)
filled in, in a second process with the Hub offline. Each works, or stops with one clear message and no traceback.

The placeholders get tiny random models (CI-cheap); the commands whose config names the real offline preset run
when `python -m offline_kit.preset` has built it (scripts/test.sh does).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from conftest import REPO_ROOT, copy_checkout, speech_like
from transformers import AutoTokenizer

from offline_kit.preset import MODEL_FOLDER, resolve_cache_dir

SECTIONS = ("Use a model", "Train", "Evaluate", "See it and share it")
RATE = 16000
SHIPPED_RESULTS = (
    "offline_kit/trained/results/tiny-audio-offline-real_speech.json"  # a real eval.py results.json
)

# README commands this test does not run, and why; every other command of SECTIONS runs.
NOT_RUN = {
    "bash scripts/train_offline_model.sh": "retrains the shipped model: hours",
    "torchrun --nproc_per_node 8 train.py configs/default.yaml": "needs 8 accelerators",
    "python demo/app.py --model MODEL --port 7860": "a server: tests/test_demo.py drives it in Chromium",
    "tiny-audio-serve MODEL --port 8000": "a server: tests/test_server.py drives it with the openai client",
}
# Commands that read the real offline preset (their config names it), and the flags appended to keep them short
# (argparse keeps the last value of a repeated flag). One step reads 8 clips: the live encoder runs those, where
# the config's feature cache would first encode all 190 (6 of the test's 7 minutes; tests/test_train.py covers it).
SHORT_RUN = '--max_steps 1 --max_eval_samples 8 --wer_eval_samples 2 --feature_cache_dir ""'
NEEDS_PRESET = {
    "python train.py configs/offline.yaml --max_steps 5": SHORT_RUN,
    "python train.py configs/offline.yaml --resume": SHORT_RUN,
}
# What a new user runs first, for commands that use an earlier run or data the README builds just before them
# (README's own placeholders filled in).
SMALLEST_TRAINING = "python train.py configs/offline.yaml --max_steps 5"
BEFORE = {
    "python eval.py NEW --dataset data/real_speech --output-dir outputs/eval/new --compare-with outputs/eval/old": [
        "python eval.py MODEL --dataset data/real_speech --output-dir outputs/eval/old"
    ],
    SMALLEST_TRAINING: ["python -m offline_kit.synthetic_corpus"],  # the starter corpus, the line above it
}
# Commands that must work, not only fail clearly: on a fresh machine after scripts/offline.sh, the README's
# smallest training command trains.
MUST_WORK = {SMALLEST_TRAINING}
# Placeholder -> value, longest first; {model}, {run_a}, {run_b} are folders of the sandbox.
PLACEHOLDERS = {
    "outputs/eval/MODEL/DATASET/results.json": "outputs/eval/tiny-audio-offline/real_speech/results.json",
    "[--weights 1 1]": "--weights 1 1",
    "path/or/hub-id": "{model}",
    "MODEL_DIR": "{model}",
    "USER/NAME": "alice/tiny-audio",
    "MODEL": "{model}",
    "RUN_A": "{run_a}",
    "RUN_B": "{run_b}",
    "NEW": "{model}",
    "OUT": "outputs/averaged",
}
# The Python examples use names they leave to the reader.
PYTHON_PRELUDE = """
import numpy as np, soundfile as sf
path = "{model}"
waveform_16khz_mono = sf.read("speech.wav", dtype="float32")[0]
files = ["a.flac", "b.mp3"]
"""


def readme_blocks() -> list[tuple[str, str, str]]:
    """(section, language, code) of every fenced code block under the ## headings in SECTIONS."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    blocks = []
    for part in re.split(r"^## ", text, flags=re.M)[1:]:
        section = part.splitlines()[0].strip()
        if section in SECTIONS:
            blocks += [(section, lang, code) for lang, code in re.findall(r"```(\w+)\n(.*?)```", part, re.S)]
    return blocks


def readme_commands() -> list[str]:
    """The shell commands of those sections, one per line, without their trailing comments."""
    lines = [line for _, lang, code in readme_blocks() if lang == "bash" for line in code.splitlines()]
    return [re.sub(r"\s+#.*$", "", line).strip() for line in lines if line.strip()]


def fill(command: str, sandbox: dict[str, str]) -> str:
    """The command with its placeholders replaced (whole words only: `MODEL` but not `MODEL_DIR`)."""
    names = "|".join(re.escape(name) for name in PLACEHOLDERS)
    pattern = rf"(?<![\w/])(?:{names})(?![\w/])"
    return re.sub(pattern, lambda found: PLACEHOLDERS[found.group(0)].format(**sandbox), command)


def run(command: str, sandbox: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", fill(command, sandbox)],
        cwd=sandbox["root"],
        env=sandbox_env(sandbox),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def sandbox_env(sandbox: dict[str, str]) -> dict[str, str]:
    """The user's environment with the Hub offline, and `python` being this interpreter."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return env | {"HF_HUB_OFFLINE": "1", "PATH": f"{sandbox['bin']}{os.pathsep}{env['PATH']}"}


def works_or_says_why(command: str, done: subprocess.CompletedProcess) -> None:
    """Success, or an exit status with one readable error line at the end; never a traceback."""
    output = done.stdout + done.stderr
    tail = "\n".join(output.splitlines()[-30:])
    assert "Traceback (most recent call last)" not in output, f"{command!r} printed a traceback:\n{tail}"
    if done.returncode != 0:
        assert done.returncode in (1, 2), f"{command!r} was killed ({done.returncode}):\n{tail}"
        last = [line for line in done.stderr.splitlines() if line.strip()][-1:]
        assert last and "error" in last[0].lower(), f"{command!r} failed without saying why:\n{tail}"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, tiny_model_dir: str) -> dict[str, str]:
    """A fresh copy of the repository as `scripts/offline.sh` leaves it for a new user: no training data, a
    small real-speech set (the real one's format, three clips), example audio files and one earlier result."""
    from datasets import DatasetDict

    from offline_kit.synthetic_corpus import encode_flac, to_audio_dataset

    root = copy_checkout(tmp_path_factory.mktemp("clone"))
    texts = ["hello world", "the quick brown fox", "one two three"]
    rows = [
        {"audio": {"bytes": encode_flac(speech_like(1.5 + index, RATE, seed=index)), "path": f"{index}.flac"}}
        | {"text": text}
        for index, text in enumerate(texts)
    ]
    DatasetDict({"test": to_audio_dataset(rows)}).save_to_disk(str(root / "data" / "real_speech"))
    for name in ("clip.wav", "speech.wav", "talk.wav", "a.flac", "b.mp3"):
        sf.write(root / name, speech_like(2.0, RATE), RATE)
    sf.write(root / "room.wav", np.zeros(2 * RATE, dtype=np.float32), RATE)  # a clip without speech
    # The README's word timestamps need a CTC head: the tiny model gets one (random, like the rest of it).
    model = shutil.copytree(tiny_model_dir, root / "outputs" / "model")
    config = json.loads((model / "config.json").read_text())
    blank = AutoTokenizer.from_pretrained(model)(" ", add_special_tokens=False)["input_ids"]
    (model / "config.json").write_text(json.dumps(config | {"ctc_blank_token_id": blank[0]}))
    shipped = REPO_ROOT / SHIPPED_RESULTS
    shutil.copy(shipped, root / "results.json")
    earlier = root / "outputs" / "eval" / "tiny-audio-offline" / "real_speech"
    earlier.mkdir(parents=True)
    shutil.copy(shipped, earlier / "results.json")
    runs = {name: shutil.copytree(tiny_model_dir, root / "outputs" / name) for name in ("run_a", "run_b")}
    bin_dir = tmp_path_factory.mktemp("bin")
    (bin_dir / "python").symlink_to(sys.executable)
    return {"root": str(root), "bin": str(bin_dir), "model": str(model)} | {
        name: str(path) for name, path in runs.items()
    }


def test_every_readme_command_is_run_or_says_why_not() -> None:
    """A command added to the README runs here unless it is listed as not run; a listed one must still exist."""
    commands = readme_commands()
    assert len(commands) >= 10
    for listed in [*NOT_RUN, *NEEDS_PRESET, *BEFORE, *MUST_WORK]:
        assert listed in commands, f"{listed!r} is no longer in the README: update this test"


def _cheap_commands() -> list[str]:
    return [
        command for command in readme_commands() if command not in NOT_RUN and command not in NEEDS_PRESET
    ]


def run_earlier_commands(command: str, sandbox: dict[str, str]) -> None:
    for earlier in BEFORE.get(command, []):
        done = run(earlier, sandbox)
        assert done.returncode == 0, f"{earlier!r} (run first):\n{done.stderr[-3000:]}"


@pytest.mark.parametrize("command", _cheap_commands())
def test_readme_command(command: str, sandbox: dict[str, str]) -> None:
    run_earlier_commands(command, sandbox)
    works_or_says_why(command, run(command, sandbox))


@pytest.mark.real_weights
@pytest.mark.slow
@pytest.mark.parametrize("command", list(NEEDS_PRESET))
def test_readme_command_on_the_offline_preset(command: str, sandbox: dict[str, str]) -> None:
    if not (resolve_cache_dir() / MODEL_FOLDER / "config.json").is_file():
        pytest.skip("needs the offline preset: python -m offline_kit.preset")
    run_earlier_commands(command, sandbox)
    done = run(f"{command} {NEEDS_PRESET[command]}", sandbox, timeout=900)
    works_or_says_why(command, done)
    if command in MUST_WORK:
        assert done.returncode == 0, f"{command!r} did not work as written:\n{done.stderr[-3000:]}"
        assert "Trained model saved in outputs/offline" in done.stdout
        assert "more than max_steps" not in done.stderr  # the config's warmup scales with a short run


def test_readme_python_examples(sandbox: dict[str, str]) -> None:
    """The "Use a model" examples, in order in one interpreter as a reader would type them, with the names they
    leave to the reader defined and a tiny model as the path."""
    examples = [
        code for section, lang, code in readme_blocks() if section == "Use a model" and lang == "python"
    ]
    assert len(examples) >= 3, "the README's Use section lost its examples: update this test"
    script = PYTHON_PRELUDE.format(**sandbox) + "\n".join(fill(example, sandbox) for example in examples)
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=sandbox["root"],
        env=sandbox_env(sandbox),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_placeholders_are_filled_as_whole_words() -> None:
    sandbox = {"model": "/m", "run_a": "/a", "run_b": "/b"}
    assert fill("python -m publish.push MODEL_DIR --repo USER/NAME", sandbox) == (
        "python -m publish.push /m --repo alice/tiny-audio"
    )
    assert fill("python eval.py NEW --output-dir outputs/eval/new", sandbox) == (
        "python eval.py /m --output-dir outputs/eval/new"
    )
    assert fill("python -m training.average OUT RUN_A RUN_B [--weights 1 1]", sandbox) == (
        "python -m training.average outputs/averaged /a /b --weights 1 1"
    )
