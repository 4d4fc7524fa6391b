"""Checks that `train.py` and `eval.py` run before any model loads.

A missing folder, a Hub repo that cannot be reached or a bad value then fails in a second with one message that
says what to do, instead of after a minute of loading as a library traceback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub.errors import GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError

from training.arguments import ModelArguments

# Local datasets the offline kit builds, and the command that builds each (run from the repository root).
LOCAL_DATA_BUILDERS = {
    "data/real_speech": "python -m offline_kit.real_speech",
    "data/synthetic": "python -m offline_kit.synthetic_corpus --num-clips 200",
    "data/synthetic_test": "python -m offline_kit.synthetic_corpus --num-clips 500 --test-fraction 1 "
    "--out data/synthetic_test",
}
LOCAL_DATA_HINT = (
    "Local sets work without the Hub: data/real_speech (python -m offline_kit.real_speech) and "
    "data/synthetic (python -m offline_kit.synthetic_corpus), or any save_to_disk folder, audiofolder or "
    "CSV/JSONL manifest given by its path"
)
# File suffixes that mark a dataset or model name as a local path rather than a Hub id.
PATH_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".yaml", ".yml", ".wav", ".flac")


class PreflightError(ValueError):
    """A command's input that cannot work; the message names it and says what to do."""


def looks_like_path(name: str) -> bool:
    """True for names only a local path can have: a Hub id is `name` or `owner/name`, never `./x`, `/x`, `a/b/c`."""
    return (
        name.startswith((".", "/", "~"))
        or "\\" in name
        or name.count("/") > 1
        or name.lower().endswith(PATH_SUFFIXES)
    )


def hub_problem(repo_id: str, repo_type: str) -> str | None:
    """Why the Hub repo cannot be read here (None when it can): offline and not cached, gated, missing, no network."""
    if huggingface_hub.is_offline_mode():
        if repo_type != "model":  # Hub datasets are streamed here, which needs the network
            return "HF_HUB_OFFLINE is set"
        if isinstance(huggingface_hub.try_to_load_from_cache(repo_id, "config.json"), str):
            return None
        return "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache"
    try:
        huggingface_hub.auth_check(repo_id, repo_type=repo_type)
    except GatedRepoError:
        where = f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
        return f"it is gated: accept its terms at {where} and log in (`hf auth login` or HF_TOKEN)"
    except RepositoryNotFoundError:
        return "the Hub has no such repo (or it is private: log in with `hf auth login` or set HF_TOKEN)"
    except OfflineModeIsEnabled:
        return "HF_HUB_OFFLINE is set"
    except Exception as error:  # no network, proxy, DNS: whatever the HTTP client raises
        return f"the Hub cannot be reached ({type(error).__name__}: {error})"
    return None


def missing_local_data_message(path: str) -> str:
    """The message for a dataset path that does not exist, naming the command that builds it when one does."""
    key = os.path.normpath(path)
    builder = LOCAL_DATA_BUILDERS.get(key)
    if builder:
        return f"the dataset folder {path} has not been built yet: build it with `{builder}`"
    return f"the dataset {path} does not exist (no such file or folder). {LOCAL_DATA_HINT}"


def check_hub_dataset(repo_id: str, shown: str | None = None) -> None:
    """Refuse, before any model loads, a Hub dataset that cannot be read here; ``shown`` is the name the user gave
    (e.g. an eval.py registry name) when it is not the repo id."""
    problem = hub_problem(repo_id, "dataset")
    if problem:
        raise PreflightError(
            f"dataset {shown or repo_id} is not a local folder or file, and {repo_id} on the Hugging Face Hub "
            f"cannot be read: {problem}. Gated sets need their terms accepted on the Hub and a token "
            f"(`hf auth login`). {LOCAL_DATA_HINT}"
        )


def check_model_source(name: str, role: str = "model") -> None:
    """A local model folder must hold a config.json; a Hub id must be readable (or cached when offline)."""
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise PreflightError(f"{role} {name}: this folder has no config.json, so it is not a saved model")
        return
    if looks_like_path(name):
        raise PreflightError(f"{role} {name}: no such folder")
    problem = hub_problem(name, "model")
    if problem:
        raise PreflightError(
            f"{role} {name} is not a local folder and cannot be loaded from the Hub: {problem}"
        )


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """`key: old -> new` for every leaf that differs: what a refusal to continue another run names."""
    out = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            out += differences(before, after, f"{prefix}{key}.")
        elif before != after:
            out.append(f"{prefix}{key}: {json.dumps(before)} -> {json.dumps(after)}")
    return out


OFFLINE_CONFIG_HINT = (
    "configs/offline.yaml trains the offline kit's Whisper tiny.en + SmolLM2-135M instead "
    "(`python -m offline_kit.preset` builds them)"
)


def check_components(model_args: ModelArguments) -> None:
    """The encoder and LLM (or the starting checkpoint) can be loaded: local folders exist, Hub ids are reachable."""
    if model_args.model_name_or_path:
        check_model_source(model_args.model_name_or_path, "starting checkpoint (model_name_or_path)")
        return
    components = {"encoder": model_args.audio_model_id, "LLM": model_args.text_model_id}
    from_hub = {}
    for role, name in components.items():
        if os.path.exists(os.path.expanduser(name)) or looks_like_path(name):
            check_model_source(name, role)
        elif problem := hub_problem(name, "model"):
            from_hub[role] = (name, problem)
    if from_hub:
        named = " and the ".join(f"{role} {name}" for role, (name, _) in from_hub.items())
        problems = sorted({problem for _, problem in from_hub.values()})
        raise PreflightError(
            f"the {named} of this config come from the Hugging Face Hub, which cannot serve them here "
            f"({'; '.join(problems)}). {OFFLINE_CONFIG_HINT}"
        )
