"""Train Tiny Audio's projector (and optional LoRA) with the Hugging Face Trainer; encoder and LLM stay frozen.

    python train.py configs/offline.yaml --max_steps 200 --learning_rate 1e-3
    torchrun --nproc_per_node 8 train.py configs/default.yaml          # data-parallel, unchanged
    python train.py configs/offline.yaml --resume                       # continue from the last checkpoint

A YAML file gives the defaults; every key is a command-line flag, and flags after the file override it.
The command: argument parsing over ``training.run``, which does the work.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence

import torch
import yaml
from transformers import HfArgumentParser, TrainerCallback, TrainingArguments
from transformers.integrations import is_tensorboard_available, is_wandb_available

from training.arguments import DataArguments, ModelArguments, RunArguments
from training.precision import cpu_has_native_bf16
from training.preflight import PreflightError
from training.run import train

logger = logging.getLogger("tiny_audio.train")

# Reporting integrations that need a package of their own; a missing one is dropped with a warning.
OPTIONAL_REPORTERS = {"wandb": is_wandb_available, "tensorboard": is_tensorboard_available}
BOOLEANS = {"true", "false", "yes", "no", "1", "0"}

ARGUMENT_TYPES = (ModelArguments, DataArguments, RunArguments, TrainingArguments)


def _yaml_to_argv(config: dict, parser: HfArgumentParser) -> list[str]:
    """Command-line tokens for a YAML mapping: nested values (dataset lists) travel as JSON, and lists given to a
    single-value flag (report_to) as comma-separated text. A value that starts with "~" names a path in the home
    folder, as the shell would expand it on the command line (`feature_cache_dir: ~/x`, not a folder named "~")."""
    tokens = []
    for key, value in config.items():
        action = parser._option_string_actions.get(f"--{key}")
        if value is None:
            continue
        if isinstance(value, str) and value.startswith("~"):
            value = os.path.expanduser(value)
        if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, dict) for v in value)):
            tokens += [f"--{key}", json.dumps(value)]
        elif isinstance(value, list) and action is not None and action.nargs in ("+", "*"):
            tokens += [f"--{key}", *map(str, value)]
        elif isinstance(value, list):
            tokens += [f"--{key}", ",".join(map(str, value))]
        else:
            tokens += [f"--{key}", str(value)]
    return tokens


def _hub_flag(argv: list[str]) -> list[str]:
    """`--push-to-hub REPO` names a repo; TrainingArguments' own --push_to_hub is a bare flag."""
    out = []
    for index, token in enumerate(argv):
        following = argv[index + 1] if index + 1 < len(argv) else None
        names_repo = (
            following is not None and not following.startswith("-") and following.lower() not in BOOLEANS
        )
        if token in ("--push-to-hub", "--push_to_hub") and names_repo:
            out.append("--push_to_hub_repo")
        else:
            out.append(token)
    return out


def parse_args(
    argv: Sequence[str] | None = None,
) -> tuple[ModelArguments, DataArguments, RunArguments, TrainingArguments]:
    """YAML file (first argument, optional) + flags -> the four argument dataclasses; later flags win."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(ARGUMENT_TYPES)
    tokens = []
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        tokens += ["--use_cpu", "true"]  # lets --bf16 run on CPUs with bf16 support
    if argv and argv[0].endswith((".yaml", ".yml")):
        with open(argv.pop(0)) as handle:
            tokens += _yaml_to_argv(yaml.safe_load(handle) or {}, parser)
    tokens += _hub_flag(argv)
    model_args, data_args, run_args, training_args = HfArgumentParser(
        ARGUMENT_TYPES
    ).parse_args_into_dataclasses(args=tokens)
    if training_args.bf16 and training_args.use_cpu and not cpu_has_native_bf16():
        logger.warning(
            "Training in fp32, not bf16: this CPU has no native bf16 (no avx512_bf16 or amx_bf16 in "
            "/proc/cpuinfo), and emulated bf16 is slower than fp32"
        )
        training_args.bf16 = False
        # TrainingArguments chose the Trainer's autocast from bf16 when it was built: without this, every matmul
        # still ran in emulated bf16 (one step of configs/offline.yaml took 236 s instead of a few).
        training_args.mixed_precision = "no"
    if training_args.push_to_hub:  # one push path: ours, at the end, through huggingface_hub
        run_args.push_to_hub_repo = run_args.push_to_hub_repo or training_args.hub_model_id
        training_args.push_to_hub = False
    # Rows keep their raw columns (the collator needs them); eval predictions are answer-only logits.
    training_args.remove_unused_columns = False
    training_args.prediction_loss_only = True
    if training_args.ddp_find_unused_parameters is None:
        training_args.ddp_find_unused_parameters = False  # every trainable weight is used in every step
    wanted = [name for entry in training_args.report_to for name in entry.split(",") if name]
    training_args.report_to = [r for r in wanted if r not in OPTIONAL_REPORTERS or OPTIONAL_REPORTERS[r]()]
    for missing in set(wanted) - set(training_args.report_to):
        logger.warning("Not reporting to %s: its package is not installed (pip install %s)", missing, missing)
    return model_args, data_args, run_args, training_args


def run(argv: Sequence[str] | None = None, callbacks: list[TrainerCallback] | None = None) -> dict:
    """Trains as the command line says (extra Trainer callbacks allowed); returns the final metrics."""
    model_args, data_args, run_args, training_args = parse_args(argv)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if training_args.should_log else logging.WARNING,
    )
    return train(model_args, data_args, run_args, training_args, callbacks)


def main() -> None:
    """Console script `tiny-audio-train`."""
    try:
        run()
    except PreflightError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
