"""A training run's output folder: whose run it holds, which of its checkpoints are complete, whether it finished.

`training.run` decides from these, before any model loads, whether a run may start, resume or must stop, so that a
finished run is never overwritten and a resumed run only ever continues its own checkpoints.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi
from transformers import TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import SAFE_WEIGHTS_NAME

from training.arguments import DataArguments, ModelArguments
from training.data import data_fingerprint, parse_dataset_specs
from training.preflight import PreflightError, differences

logger = logging.getLogger(__name__)

# What the run is (its config and data), written when it starts; a resumed run must match it.
RUN_RECORD = "run.json"
# TrainingArguments that change what a run learns. The others (max_steps, logging, saving, evaluation, workers)
# may change between a run and its resumption: training for longer is a resumption.
LEARNING_ARGUMENTS = (
    "learning_rate",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "seed",
    "data_seed",
    "optim",
    "optim_args",
    "bf16",
    "fp16",
    "train_sampling_strategy",
)
# Model arguments that change speed, not results.
SPEED_ONLY_MODEL_ARGUMENTS = ("attn_implementation", "prefix_cache")
# What --overwrite_output_dir removes: the files a run writes that a new run would not replace itself.
RUN_ARTIFACTS = (
    RUN_RECORD,
    TRAINER_STATE_NAME,
    TRAINING_ARGS_NAME,
    SAFE_WEIGHTS_NAME,
    "skipped_rows.json",
    "runs",
)
# Where an incomplete checkpoint is moved when a resumed run falls back to an earlier one.
INCOMPLETE_PREFIX = "incomplete-"
# The files of a saved model (weights, config, processor, Hub code). The rest of a run's folder (intermediate
# checkpoints, optimizer state, logs, run records) is the run's: it is not pushed, published or averaged.
CHECKPOINT_FILE_PATTERNS = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "*.py",
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer*.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "*.model",
    "chat_template.jinja",
    "chat_template.json",
)


class RunFinished(Exception):
    """`--resume` of a run that has already trained its steps: there is nothing to do."""


def run_record(
    model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments
) -> dict[str, Any]:
    """The run's identity as JSON: model and LoRA settings, the training data (with a content fingerprint of local
    sets) and the settings that change what it learns."""
    datasets = [
        {**dataclasses.asdict(spec), "fingerprint": data_fingerprint(spec.path)}
        for spec in parse_dataset_specs(data_args.train_datasets)
    ]
    record = {
        "model": {
            key: value
            for key, value in dataclasses.asdict(model_args).items()
            if key not in SPEED_ONLY_MODEL_ARGUMENTS
        },
        "data": {
            "train_datasets": datasets,
            "max_audio_seconds": data_args.max_audio_seconds,
            "shuffle_buffer_size": data_args.shuffle_buffer_size,
        },
        "training": {name: getattr(training_args, name) for name in LEARNING_ARGUMENTS},
    }
    return json.loads(json.dumps(record, default=str))  # enums and paths as the JSON file will hold them


def _checkpoint_step(path: Path) -> int | None:
    name = path.name
    prefix = f"{PREFIX_CHECKPOINT_DIR}-"
    if path.is_dir() and name.startswith(prefix) and name[len(prefix) :].isdigit():
        return int(name[len(prefix) :])
    return None


def checkpoints(folder: Path) -> list[Path]:
    """The folder's checkpoint-N folders, oldest step first."""
    found = [path for path in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if _checkpoint_step(path) is not None]
    return sorted(found, key=_checkpoint_step)


def _trainer_state(path: Path) -> dict[str, Any] | None:
    """A trainer_state.json that was written to the end (the Trainer writes it last), else None."""
    try:
        state = json.loads((path / TRAINER_STATE_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("global_step"), int) else None


def is_complete(checkpoint: Path) -> bool:
    """A checkpoint is complete once its trainer state is written (the Trainer's last file) and its weights exist."""
    state = _trainer_state(checkpoint)
    return (
        state is not None
        and state["global_step"] == _checkpoint_step(checkpoint)
        and (checkpoint / SAFE_WEIGHTS_NAME).is_file()
    )


def resume_checkpoint(folder: Path, is_main_process: bool = True) -> Path:
    """The newest complete checkpoint; newer incomplete ones (a kill mid-write) are moved aside and named."""
    found = checkpoints(folder)
    complete = [path for path in found if is_complete(path)]
    if not complete:
        raise PreflightError(
            f"--resume: {folder} has no complete checkpoint to continue from"
            + (f" ({', '.join(p.name for p in found)} are incomplete)" if found else "")
            + "; start the run without --resume"
        )
    chosen = complete[-1]
    for path in found:
        if _checkpoint_step(path) > _checkpoint_step(chosen):
            aside = path.with_name(INCOMPLETE_PREFIX + path.name)
            logger.warning(
                "%s is incomplete (no readable %s or %s: the run was stopped while writing it); kept as %s",
                path.name,
                TRAINER_STATE_NAME,
                SAFE_WEIGHTS_NAME,
                aside.name,
            )
            if is_main_process:
                shutil.rmtree(aside, ignore_errors=True)
                path.rename(aside)
    return chosen


def _restore_final_model(folder: Path, checkpoint: Path) -> None:
    """A run killed while saving its final model: the checkpoint of its last step holds the same model (the
    Trainer saves one at the end), so its model files and trainer state take the place of the torn ones."""
    for path in [*checkpoint_files(checkpoint), checkpoint / TRAINER_STATE_NAME]:
        shutil.copy2(path, folder / path.name)


def _remove_run(folder: Path) -> None:
    """What --overwrite_output_dir clears: the old run's checkpoints, record, state and weights."""
    for path in [*checkpoints(folder), *(folder / name for name in RUN_ARTIFACTS)]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _recorded_run(folder: Path) -> dict[str, Any] | None:
    """The run.json of the run in `folder`, if it has a readable one."""
    try:
        return json.loads((folder / RUN_RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def check_explicit_checkpoint(checkpoint: Path, record: dict[str, Any]) -> None:
    """`--resume_from_checkpoint PATH`: a complete checkpoint, of this run when its folder records one."""
    if _trainer_state(checkpoint) is None or not (checkpoint / SAFE_WEIGHTS_NAME).is_file():
        raise PreflightError(
            f"--resume_from_checkpoint {checkpoint} is not a complete checkpoint (no readable {TRAINER_STATE_NAME} "
            f"or {SAFE_WEIGHTS_NAME})"
        )
    recorded = _recorded_run(checkpoint.parent)
    if recorded is not None and recorded != record:
        raise PreflightError(
            f"--resume_from_checkpoint {checkpoint} belongs to another run (not resuming from it); what differs: "
            f"{'; '.join(differences(recorded, record))}"
        )


def prepare_output_dir(
    folder: Path,
    record: dict[str, Any],
    *,
    resume: bool,
    overwrite: bool,
    max_steps: int,
    is_main_process: bool = True,
) -> Path | None:
    """Check the output folder against this run and return the checkpoint to resume from (None: start afresh).

    Refuses a folder holding another run or anything else (unless `overwrite`), a finished run without
    `--resume`, and `--resume` of another run's checkpoints; raises RunFinished when a resumed run has nothing left.
    """
    contents = [path for path in folder.iterdir()] if folder.is_dir() else []
    recorded_path = folder / RUN_RECORD
    recorded = _recorded_run(folder)
    resume_from = None
    if overwrite and contents and recorded != record:
        if is_main_process:
            logger.warning(
                "--overwrite_output_dir: removing the earlier run's checkpoints and weights in %s", folder
            )
            _remove_run(folder)
    elif recorded is None and contents:
        if not (resume and checkpoints(folder)):
            raise PreflightError(
                f"output folder {folder} is not empty and holds no record of a run ({RUN_RECORD}): choose another "
                "--output_dir, or pass --overwrite_output_dir to train there (the checkpoints and weights of an "
                "earlier run in it are removed first)"
            )
        logger.warning(
            "%s predates %s: resuming without checking that its checkpoints belong to this run",
            folder,
            RUN_RECORD,
        )
        resume_from = resume_checkpoint(folder, is_main_process)
    elif recorded is not None and recorded != record:
        changes = "; ".join(differences(recorded, record))
        action = "not resuming from its checkpoints" if resume else "not training over it"
        raise PreflightError(
            f"output folder {folder} holds another run ({action}); what differs: {changes}. Choose another "
            "--output_dir, or pass --overwrite_output_dir to replace that run"
        )
    elif recorded is not None:
        finished = _trainer_state(folder)
        latest = [path for path in checkpoints(folder) if is_complete(path)]
        saved_step = finished["global_step"] if finished else 0
        checkpoint_step = _checkpoint_step(latest[-1]) if latest else 0
        step = max(saved_step, checkpoint_step)
        done = (finished is not None and max_steps <= 0) or (max_steps > 0 and step >= max_steps)
        if done and resume:
            restored = ""
            if checkpoint_step > saved_step:
                if is_main_process:
                    _restore_final_model(folder, latest[-1])
                restored = (
                    f" (it was stopped while saving its final model, now restored from {latest[-1].name})"
                )
            raise RunFinished(
                f"{folder} already finished this run at step {step}"
                + (f" (max_steps {max_steps})" if max_steps > 0 else "")
                + restored
                + ": nothing to do. Raise --max_steps to train it further"
            )
        if (done or checkpoints(folder)) and not overwrite and not resume:
            state = "finished" if done else f"stopped at step {step}"
            raise PreflightError(
                f"output folder {folder} holds this run, {state}: --resume "
                + ("does nothing" if done else "continues it")
                + ", --overwrite_output_dir trains it again from the start"
            )
        if overwrite and not resume:
            if is_main_process:
                _remove_run(folder)
        elif resume:
            resume_from = resume_checkpoint(folder, is_main_process)
    elif resume:
        raise PreflightError(f"--resume: {folder} holds no run to continue; start the run without --resume")
    if is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        recorded_path.write_text(json.dumps(record, indent=2) + "\n")
    return resume_from


def checkpoint_files(folder: Path) -> list[Path]:
    """The files directly in `folder` that belong to the model saved there, by name."""
    return sorted(
        path
        for path in Path(folder).iterdir()
        if path.is_file() and any(fnmatch.fnmatch(path.name, pattern) for pattern in CHECKPOINT_FILE_PATTERNS)
    )


def upload(
    folder: Path, repo_id: str, private: bool = False, token: str | None = None, checkpoint_only: bool = False
) -> str:
    """Creates the Hub repo if needed and uploads the folder in one commit (with `checkpoint_only`, only its
    `checkpoint_files`); returns the commit URL."""
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        repo_type="model",
        folder_path=str(folder),
        commit_message="Upload Tiny Audio checkpoint",
        # Exact names match only the folder's own files, never those of the checkpoint-N folders inside it.
        allow_patterns=[path.name for path in checkpoint_files(folder)] if checkpoint_only else None,
    )
    return commit.commit_url
