"""Builds leaderboard/LEADERBOARD.md from the eval.py results files kept in leaderboard/results/.

python leaderboard/build.py outputs/eval/MODEL/DATASET/results.json   # add a result, rebuild the table
python leaderboard/build.py                                           # rebuild only
python leaderboard/build.py --check                                   # exit 1 when LEADERBOARD.md is stale

Rows are ranked only against rows on the same dataset, split and clip count, and each RTFx says the device and
batch size it was measured with.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
LEADERBOARD = HERE / "LEADERBOARD.md"
REQUIRED_FIELDS = ("contributor", "model", "dataset", "split", "n", "wer", "rtfx", "git_hash", "date")
HEADER = """# Tiny Audio leaderboard

Word error rate (lower is better) and RTFx (audio seconds per wall second, higher is faster) measured with
`eval.py` (Whisper English normalisation, corpus WER). Each table holds the runs on one dataset, split and clip
count, ranked by WER; runs on other clips are not comparable, so they rank in a table of their own. RTFx depends
on the device and the batch size, given beside it.

To add your row: run `tiny-audio-eval MODEL --dataset NAME --contributor YOU`, then
`python leaderboard/build.py outputs/eval/MODEL/NAME/results.json` and commit `leaderboard/`.
This file is generated: edit the results files, not these tables.
"""
COLUMNS = ("Rank", "Contributor", "Model", "Clips", "WER", "RTFx", "Device, batch", "Git hash", "Date")


def read_result(path: Path) -> dict[str, Any]:
    """One results file; bad JSON or a missing field is an error naming the file and field."""
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    missing = [field for field in REQUIRED_FIELDS if field not in result]
    if missing:
        raise ValueError(f"{path}: missing field(s) {', '.join(missing)}")
    if not isinstance(result["n"], int) or result["n"] < 1:
        raise ValueError(
            f"{path}: no scored clips (n = {result['n']}), so its WER means nothing and is not ranked"
        )
    if looks_like_a_path(str(result["model"])):
        raise ValueError(_path_as_name(path, result["model"]))
    return result


def looks_like_a_path(name: str) -> bool:
    """True for a folder or file path (absolute, ~, ./, ../ or several folders deep), which names a checkpoint
    on one machine only; a Hub id ("owner/name") or a plain name is fine."""
    return name.startswith(("/", "~", ".")) or "\\" in name or name.count("/") > 1


def _path_as_name(path: Path, model: str) -> str:
    return (
        f"{path}: the model name {model!r} is a local path, which means nothing on anyone else's machine. "
        'Give the run a name: eval.py MODEL --model-name NAME (or edit "model" in the results file).'
    )


def load_results(results_dir: Path = RESULTS_DIR) -> list[dict[str, Any]]:
    """Every results file in `results_dir`."""
    return [read_result(path) for path in sorted(results_dir.glob("*.json"))]


def render(results: list[dict[str, Any]]) -> str:
    """The Markdown page: one table per dataset, split and clip count, ranked by WER (ties: faster first)."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in sorted(results, key=lambda r: (r["dataset"], r["split"], -r["n"], r["wer"], -r["rtfx"])):
        groups.setdefault((r["dataset"], r["split"], r["n"]), []).append(r)
    lines = [HEADER]
    for (dataset, split, clips), rows in groups.items():
        lines += [
            f"## {dataset} ({split}), {clips} clips",
            "",
            "| " + " | ".join(COLUMNS) + " |",
            "|---:|---|---|---:|---:|---:|---|---|---|",
        ]
        lines += [
            f"| {rank} | {r['contributor']} | {r['model']} | {r['n']} | {100 * r['wer']:.2f}% | {r['rtfx']:.1f} "
            f"| {rtfx_setup(r)} | {r['git_hash']} | {r['date']} |"
            for rank, r in enumerate(rows, 1)
        ]
        lines.append("")
    return "\n".join(lines)


def rtfx_setup(result: dict[str, Any]) -> str:
    """The device and batch size an RTFx was measured with (results files from before eval.py recorded them
    say so)."""
    device = result.get("hardware") or result.get("device") or "device not recorded"
    batch = result.get("batch_size")
    return f"{device}, " + (f"batch {batch}" if batch is not None else "batch not recorded")


def add_result(source: Path, results_dir: Path = RESULTS_DIR) -> Path:
    """Copy a results.json in under a stable name (contributor, model, dataset, split) so reruns replace it."""
    result = read_result(source)
    if (
        Path(result["model"]).expanduser().exists()
    ):  # a relative folder, e.g. outputs/run, from where eval ran
        raise ValueError(_path_as_name(source, result["model"]))
    parts = (result["contributor"], result["model"], result["dataset"], result["split"])
    name = "__".join(re.sub(r"[^A-Za-z0-9.-]+", "-", str(p)).strip("-") for p in parts)
    results_dir.mkdir(parents=True, exist_ok=True)
    target = results_dir / f"{name}.json"
    shutil.copyfile(source, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="*", type=Path, help="eval.py results.json files to add first")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--output", type=Path, default=LEADERBOARD)
    parser.add_argument("--check", action="store_true", help="only verify the Markdown matches the results")
    args = parser.parse_args(argv)
    try:
        for source in args.results:
            print(f"added {add_result(source, args.results_dir)}")
        page = render(load_results(args.results_dir))
    except (OSError, ValueError) as error:  # a bad or missing results file: one line naming it
        parser.exit(1, f"error: {error}\n")
    if args.check:
        if not args.output.exists() or args.output.read_text() != page:
            print(f"{args.output} is out of date: run python leaderboard/build.py", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(page)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
