"""A non-editable install (`pip install .`) carries every file the installed commands read at run time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import copy_checkout

# Files read next to the code at run time, by the module that reads them.
PACKAGE_DATA = [
    "publish/modelcard_template.md",  # publish.card.TEMPLATE_PATH
    "offline_kit/install_data_deps.sh",  # offline_kit.data_deps.INSTALL_SCRIPT
    "offline_kit/trained/model.safetensors",  # offline_kit.preset.TRAINED_DIR
    "offline_kit/trained/settings.json",
]
CHECK_INSTALLED = """
import sys
from pathlib import Path
import leaderboard.build, offline_kit.preset, publish.card, testing.tiny_models, training.wer
target = Path(sys.argv[1])
for module in (leaderboard.build, offline_kit.preset, publish.card, testing.tiny_models, training.wer):
    assert Path(module.__file__).is_relative_to(target), module.__file__
assert publish.card.TEMPLATE_PATH.is_file() and offline_kit.preset.shipped_weights() is not None
import offline_kit.real_speech, offline_kit.synthetic_corpus
for built in (offline_kit.real_speech.DEFAULT_OUT, offline_kit.synthetic_corpus.DEFAULT_OUT):
    assert not built.resolve().is_relative_to(target), built  # data is never written into the install
print("ok")
"""


def test_a_regular_install_carries_its_data_files(tmp_path: Path) -> None:
    source = copy_checkout(tmp_path / "source")  # the build leaves nothing in the checkout
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
        + ["--target", str(target), str(source)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    for name in PACKAGE_DATA + ["leaderboard/__init__.py", "leaderboard/build.py"]:
        assert (target / name).is_file(), f"{name} is not installed"
    assert list(target.glob("tiny_audio-*.dist-info/licenses/LICENSE"))

    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"} | {
        "PYTHONPATH": str(target)
    }
    done = subprocess.run(
        [sys.executable, "-c", CHECK_INSTALLED, str(target)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
