"""leaderboard/build.py: rows ranked only against runs on the same set and clip count, RTFx with its device and
batch size, local paths refused as model names, and the committed board holding the shipped model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from leaderboard import build as leaderboard

SHIPPED_RESULTS = REPO_ROOT / "offline_kit" / "trained" / "results"


def _result(**fields: object) -> dict[str, object]:
    base = {
        "contributor": "ada",
        "model": "tiny-audio-a",
        "dataset": "loquacious",
        "split": "test",
        "n": 100,
        "wer": 0.2,
        "rtfx": 50.0,
        "git_hash": "abc1234",
        "date": "2026-11-24",
        "device": "cuda",
        "batch_size": 16,
    }
    return {**base, **fields}


def _write(folder: Path, name: str, **fields: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(_result(**fields)))
    return path


def _tables(page: str) -> dict[str, list[str]]:
    """Each `## heading` of the page with the table rows under it (header and rule dropped)."""
    tables: dict[str, list[str]] = {}
    for block in page.split("\n## ")[1:]:
        heading, *lines = block.splitlines()
        tables[heading] = [line for line in lines if line.startswith("| ")][1:]
    return tables


def test_rows_rank_only_against_the_same_set_and_clip_count(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    sources = [
        _write(runs, "a.json", wer=0.1234, rtfx=10.0),
        _write(runs, "b.json", contributor="bob", model="openai/whisper-tiny", wer=0.0567, rtfx=80.0),
        # a lucky 20-clip run: the lowest WER, but not comparable with the 100-clip runs
        _write(
            runs, "c.json", contributor="cy", model="tiny-audio-c", n=20, wer=0.01, device="cpu", batch_size=1
        ),
        _write(runs, "d.json", dataset="ami", wer=0.3),
    ]
    results_dir, page = tmp_path / "results", tmp_path / "LEADERBOARD.md"
    assert (
        leaderboard.main([*map(str, sources), "--results-dir", str(results_dir), "--output", str(page)]) == 0
    )
    assert len(list(results_dir.glob("*.json"))) == 4
    text = page.read_text()
    assert "| Rank | Contributor | Model | Clips | WER | RTFx | Device, batch | Git hash | Date |" in text
    assert _tables(text) == {
        "ami (test), 100 clips": [
            "| 1 | ada | tiny-audio-a | 100 | 30.00% | 50.0 | cuda, batch 16 | abc1234 | 2026-11-24 |"
        ],
        "loquacious (test), 100 clips": [
            "| 1 | bob | openai/whisper-tiny | 100 | 5.67% | 80.0 | cuda, batch 16 | abc1234 | 2026-11-24 |",
            "| 2 | ada | tiny-audio-a | 100 | 12.34% | 10.0 | cuda, batch 16 | abc1234 | 2026-11-24 |",
        ],
        "loquacious (test), 20 clips": [
            "| 1 | cy | tiny-audio-c | 20 | 1.00% | 50.0 | cpu, batch 1 | abc1234 | 2026-11-24 |"
        ],
    }

    check = ["--results-dir", str(results_dir), "--output", str(page), "--check"]
    assert leaderboard.main(check) == 0
    _write(results_dir, "extra.json", dataset="librispeech-clean")
    assert leaderboard.main(check) == 1


def test_a_results_file_without_device_or_batch_size_says_so(tmp_path: Path) -> None:
    """Results files from before eval.py recorded them still build; the figure is marked, not guessed."""
    old = _result()
    del old["device"], old["batch_size"]
    assert "| device not recorded, batch not recorded |" in leaderboard.render([old])
    assert "| NVIDIA H100, batch 16 |" in leaderboard.render([_result(hardware="NVIDIA H100")])


@pytest.mark.parametrize(
    "model",
    [
        "/root/.cache/tiny_audio/offline/tiny-audio-offline",
        "~/models/run",
        "./run",
        "../run",
        "outputs/eval/run",
    ]
    + ["C:\\models\\run"],
)
def test_a_local_path_is_refused_as_a_model_name(tmp_path: Path, model: str, capsys) -> None:
    source = _write(tmp_path / "runs", "results.json", model=model)
    results_dir = tmp_path / "results"
    with pytest.raises(SystemExit) as exit_info:
        leaderboard.main(
            [str(source), "--results-dir", str(results_dir), "--output", str(tmp_path / "LB.md")]
        )
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and f"model name {model!r} is a local path" in error
    assert "--model-name" in error and "Traceback" not in error
    assert not results_dir.exists() and not (tmp_path / "LB.md").exists()  # nothing added, nothing written


def test_a_relative_folder_that_exists_is_refused_and_a_hub_id_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ "outputs/run" could be a Hub id; where eval.py ran (and the leaderboard is built), it is a folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "run").mkdir(parents=True)
    folder = _write(tmp_path / "runs", "a.json", model="outputs/run")
    with pytest.raises(ValueError, match="'outputs/run' is a local path"):
        leaderboard.add_result(folder, tmp_path / "results")
    hub = _write(tmp_path / "runs", "b.json", model="openai/whisper-tiny")
    assert leaderboard.add_result(hub, tmp_path / "results").is_file()


def test_a_broken_results_file_is_one_line_naming_it(tmp_path: Path) -> None:
    results_dir = tmp_path / "results"
    results_dir.mkdir()
    (results_dir / "broken.json").write_text(json.dumps({"model": "x"}))
    with pytest.raises(ValueError, match=r"broken.json: missing field\(s\) contributor"):
        leaderboard.load_results(results_dir)
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "leaderboard" / "build.py"), "--results-dir", str(results_dir)]
        + ["--output", str(tmp_path / "LB.md")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ") and "broken.json: missing field(s)" in done.stderr


def test_a_run_that_scored_no_clip_is_not_ranked(tmp_path: Path, capsys) -> None:
    empty = _write(tmp_path / "runs", "empty.json", n=0, wer=0.0)
    with pytest.raises(SystemExit):
        leaderboard.main(
            [str(empty), "--results-dir", str(tmp_path / "results"), "--output", str(tmp_path / "LB.md")]
        )
    assert "no scored clips (n = 0)" in capsys.readouterr().err
    assert not (tmp_path / "LB.md").exists()


def test_committed_leaderboard_is_up_to_date_and_holds_the_shipped_model() -> None:
    assert leaderboard.main(["--check"]) == 0
    committed = {(r["model"], r["dataset"], r["n"], r["wer"], r["rtfx"]) for r in leaderboard.load_results()}
    shipped = [json.loads(path.read_text()) for path in sorted(SHIPPED_RESULTS.glob("*.json"))]
    assert {r["model"] for r in shipped} >= {"tiny-audio-offline"}
    for r in shipped:
        assert (r["model"], r["dataset"], r["n"], r["wer"], r["rtfx"]) in committed
