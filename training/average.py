"""Averages the trained weights of checkpoints of one model into a new checkpoint.

    python -m training.average outputs/averaged outputs/run-stage6 outputs/run-stage7

Checkpoints along one run, or a stage and the stage it continued, lie close together in weight space, and their
mean is often better than either on data that neither was tuned to (weight averaging, as in checkpoint averaging
and model soups). Only `model.safetensors` is averaged; config, processor and Hub code come from the last
checkpoint given, so the result loads like any checkpoint.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from safetensors.torch import load_file, save_file
from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_NAME

from training.run_folder import checkpoint_files

# Config fields that must agree for checkpoints to be one model.
SAME_MODEL_FIELDS = ("audio_model_id", "text_model_id", "lora_target_modules", "lora_rank", "lora_alpha")
AVERAGE_RECORD = "averaged_from.json"


def _read_config(checkpoint: Path) -> dict:
    config_file = checkpoint / CONFIG_NAME
    if not (checkpoint / SAFE_WEIGHTS_NAME).is_file() or not config_file.is_file():
        raise ValueError(
            f"{checkpoint} is not a saved checkpoint: it needs {CONFIG_NAME} and {SAFE_WEIGHTS_NAME}"
        )
    return json.loads(config_file.read_text())


def average_checkpoints(
    checkpoints: Sequence[Path], out: Path, weights: Sequence[float] | None = None
) -> Path:
    """Writes to `out` the checkpoint whose weights are the (weighted) mean of the checkpoints'."""
    checkpoints = [Path(c) for c in checkpoints]
    weights = list(weights) if weights is not None else [1.0] * len(checkpoints)
    if len(checkpoints) < 2:
        raise ValueError("averaging needs at least two checkpoints")
    if len(weights) != len(checkpoints) or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"need one non-negative weight per checkpoint, not all zero; got {weights}")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: write the averaged checkpoint to a new folder")

    configs = [_read_config(c) for c in checkpoints]
    states = [load_file(c / SAFE_WEIGHTS_NAME) for c in checkpoints]
    first_shapes = {name: tensor.shape for name, tensor in states[0].items()}
    for checkpoint, config, state in zip(checkpoints[1:], configs[1:], states[1:], strict=True):
        differing = [field for field in SAME_MODEL_FIELDS if config.get(field) != configs[0].get(field)]
        if differing or {name: tensor.shape for name, tensor in state.items()} != first_shapes:
            what = f"config fields {differing}" if differing else "weight names or shapes"
            raise ValueError(f"{checkpoint} and {checkpoints[0]} are not the same model: their {what} differ")

    total = sum(weights)
    averaged = {
        name: sum(w / total * state[name].float() for w, state in zip(weights, states, strict=True))
        .to(tensor.dtype)
        .contiguous()
        for name, tensor in states[0].items()
    }
    # Written next to `out` and renamed once complete: an interrupted run leaves no half checkpoint behind.
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for path in checkpoint_files(checkpoints[-1]):
        if path.name != SAFE_WEIGHTS_NAME:
            shutil.copy2(path, partial / path.name)
    save_file(averaged, partial / SAFE_WEIGHTS_NAME, metadata={"format": "pt"})
    record = {"checkpoints": [str(c) for c in checkpoints], "weights": [w / total for w in weights]}
    (partial / AVERAGE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    if out.exists():
        out.rmdir()  # empty, checked above
    partial.rename(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, help="new folder for the averaged checkpoint")
    parser.add_argument("checkpoints", type=Path, nargs="+", help="checkpoint folders of one model")
    parser.add_argument("--weights", type=float, nargs="+", help="one per checkpoint (default: equal)")
    args = parser.parse_args(argv)
    try:
        print(f"averaged: {average_checkpoints(args.checkpoints, args.out, args.weights)}")
    except (ValueError, FileExistsError) as error:
        parser.exit(2, f"error: {error}\n")


if __name__ == "__main__":
    main()
