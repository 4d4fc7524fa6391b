"""Draws a run's loss curves (training, CTC, evaluation) from the Trainer's trainer_state.json as a PNG.

python -m publish.loss_curve outputs/offline-recipe/trainer_state.json docs/offline_loss.png
Several state files are consecutive stages of one model (each continues the last): one step axis, stages marked.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

CURVES = (("loss", "training loss"), ("ctc_loss", "CTC loss (training)"), ("eval_loss", "eval LM loss"))


def read_curves(state_file: Path) -> dict[str, tuple[list[int], list[float]]]:
    """{log key: (steps, values)} for every curve logged in the Trainer state file."""
    try:
        history = json.loads(Path(state_file).read_text())["log_history"]
    except (OSError, json.JSONDecodeError, KeyError) as err:
        raise ValueError(f"{state_file}: not a Trainer trainer_state.json ({err})") from err
    curves = {}
    for key, _ in CURVES:
        points = [(entry["step"], float(entry[key])) for entry in history if key in entry]
        if points:
            curves[key] = ([step for step, _ in points], [value for _, value in points])
    if not curves:
        raise ValueError(f"{state_file}: no losses logged")
    return curves


def join_stages(stages: list[dict[str, tuple[list[int], list[float]]]]) -> tuple[dict, list[int]]:
    """Curves of consecutive stages on one step axis, and the steps where the later stages start."""
    joined: dict[str, tuple[list[int], list[float]]] = {}
    starts, offset = [], 0
    for curves in stages:
        if joined:
            starts.append(offset)
        for key, (steps, values) in curves.items():
            joined_steps, joined_values = joined.setdefault(key, ([], []))
            joined_steps.extend(step + offset for step in steps)
            joined_values.extend(values)
        offset += max(max(steps) for steps, _ in curves.values())
    return joined, starts


def stage_markers(stage_starts: list[int], first_stage: int = 1) -> list[tuple[int, str]]:
    """Where each later stage starts, and its label: the first file is stage `first_stage`."""
    return [(start, f"stage {first_stage + n}") for n, start in enumerate(stage_starts, start=1)]


def plot(
    state_files: Path | list[Path], out_file: Path, title: str | None = None, first_stage: int = 1
) -> Path:
    """Draws the curves; `first_stage` numbers the first file's stage when the files start part-way into a recipe."""
    state_files = [state_files] if isinstance(state_files, (str, Path)) else list(state_files)
    curves, stage_starts = join_stages([read_curves(path) for path in state_files])
    figure, axes = plt.subplots(figsize=(7, 4.4), dpi=120)
    for start, label in stage_markers(stage_starts, first_stage):
        axes.axvline(start, color="grey", linestyle="--", linewidth=0.8)
        axes.annotate(label, (start, 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                      textcoords="offset points", fontsize=8, color="grey")  # fmt: skip
    for key, label in CURVES:
        if key in curves:
            steps, values = curves[key]
            axes.plot(steps, values, label=label, marker="o" if key == "eval_loss" else None, linewidth=1.2)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (nats per token)")
    axes.set_yscale("log")  # the first steps start an order of magnitude above where training settles
    axes.set_title(title or Path(state_files[-1]).parent.name, fontsize=10)
    axes.grid(alpha=0.3)
    # Below the axes, clear of the curves and the stage markers.
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=len(CURVES), fontsize=8)
    figure.tight_layout()
    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_file)
    plt.close(figure)
    return Path(out_file)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "state_files", type=Path, nargs="+", help="trainer_state.json of a run, or of its stages in order"
    )
    parser.add_argument("out_file", type=Path, help="PNG to write")
    parser.add_argument("--title")
    parser.add_argument(
        "--first-stage", type=int, default=1, help="stage number of the first state file (default: 1)"
    )
    args = parser.parse_args(argv)
    try:
        print(plot(args.state_files, args.out_file, args.title, args.first_stage))
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")


if __name__ == "__main__":
    main()
