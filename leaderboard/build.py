"""Builds leaderboard/LEADERBOARD.md from the eval.py results files kept in leaderboard/results/.

python leaderboard/build.py outputs/eval/MODEL/DATASET/results.json   # add a result, rebuild the table
python leaderboard/build.py                                           # rebuild only
python leaderboard/build.py --check                                   # exit 1 when LEADERBOARD.md is stale
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
`eval.py` (Whisper English normalisation, corpus WER). Ranks are per dataset and split; results on different
sample counts are not directly comparable.

To add your row: run `tiny-audio-eval MODEL --dataset NAME --contributor YOU`, then
`python leaderboard/build.py outputs/eval/MODEL/NAME/results.json` and commit `leaderboard/`.
This file is generated: edit the results files, not this table.
"""


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
    return result


def load_results(results_dir: Path = RESULTS_DIR) -> list[dict[str, Any]]:
    """Every results file in `results_dir`."""
    return [read_result(path) for path in sorted(results_dir.glob("*.json"))]


def render(results: list[dict[str, Any]]) -> str:
    """The Markdown page: one table, grouped by dataset/split, ranked by WER (ties: faster first)."""
    ordered = sorted(results, key=lambda r: (r["dataset"], r["split"], r["wer"], -r["rtfx"]))
    lines = [
        HEADER,
        "| Rank | Contributor | Model | Dataset | Split | Samples | WER | RTFx | Git hash | Date |",
        "|---:|---|---|---|---|---:|---:|---:|---|---|",
    ]
    rank, group = 0, None
    for r in ordered:
        rank = rank + 1 if (r["dataset"], r["split"]) == group else 1
        group = (r["dataset"], r["split"])
        lines.append(
            f"| {rank} | {r['contributor']} | {r['model']} | {r['dataset']} | {r['split']} | {r['n']} "
            f"| {100 * r['wer']:.2f}% | {r['rtfx']:.1f} | {r['git_hash']} | {r['date']} |"
        )
    return "\n".join(lines) + "\n"


def add_result(source: Path, results_dir: Path = RESULTS_DIR) -> Path:
    """Copy a results.json in under a stable name (contributor, model, dataset, split) so reruns replace it."""
    result = read_result(source)
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
    except ValueError as error:  # a results file that cannot be ranked: the message names it
        parser.error(str(error))
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
