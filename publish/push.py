"""Upload a trained Tiny Audio checkpoint to the Hub as a repo that serves with `pipeline(..., trust_remote_code=True)`.

    python -m publish.push MODEL_DIR --repo USER/NAME --example-audio clip.wav [--results results.json ...]

Builds the exact folder that is uploaded (code files, config, projector weights, processor files, an example clip
and a model card README.md with validated metadata), then creates the repo and uploads that folder. With
`--out DIR --dry-run` it only builds the folder, so you can inspect it first.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import soundfile as sf
import yaml
from safetensors import safe_open

from checkpoint_tiny_audio import LEGACY_DECODING_FIELDS, holds_pretrained_weights, is_pretrained_weight
from publish.card import LICENSE, build_card, is_hub_id, read_results, validate_card
from training.average import AVERAGE_RECORD
from training.data import parse_dataset_specs
from training.run_folder import checkpoint_files, upload

BASE_ID_KEYS = ("audio_model_id", "text_model_id")


def hub_files(model_dir: Path) -> list[Path]:
    """The files of `model_dir` that belong in the Hub repo, after checking none of the needed ones is missing."""
    files = checkpoint_files(model_dir)
    names = {path.name for path in files}
    config = read_config(model_dir)
    needed = {"config.json", "tokenizer_config.json"} | _code_files(config)
    missing = sorted(needed - names)
    if not any(name.endswith(".safetensors") for name in names):
        missing.append("*.safetensors (weights)")
    if not names & {"preprocessor_config.json", "processor_config.json"}:
        missing.append("preprocessor_config.json / processor_config.json")
    if missing:
        raise FileNotFoundError(
            f"{model_dir} is not a complete Tiny Audio checkpoint, missing: {', '.join(missing)} "
            "(save it with model.save_pretrained(dir) and processor.save_pretrained(dir))"
        )
    return files


def read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: not a saved Tiny Audio checkpoint")
    return json.loads(path.read_text(encoding="utf-8"))


def checkpoint_decoding(model_dir: Path, config: dict) -> dict:
    """How the checkpoint decodes by default, from its generation_config.json (greedy without one)."""
    from transformers import GenerationConfig

    try:
        generation = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        generation = GenerationConfig()
    # A checkpoint saved before the decoding settings moved into the generation config kept them in config.json;
    # they win, as they do when it loads (checkpoint_tiny_audio.adopt_legacy_decoding_fields).
    legacy = {new: config[old] for old, new in LEGACY_DECODING_FIELDS.items() if old in config}
    settings = {**generation.to_dict(), **legacy}
    return {
        "num_beams": settings["num_beams"] or 1,  # unset: greedy
        "ctc_decoding_weight": settings.get("ctc_decoding_weight", 0.0),
    }


def _code_files(config: dict) -> set[str]:
    """Python files that `trust_remote_code` will fetch, named by the config's auto_map and custom_pipelines."""
    references = list(config.get("auto_map", {}).values())
    references += [task["impl"] for task in config.get("custom_pipelines", {}).values()]
    return {reference.rsplit(".", 1)[0] + ".py" for reference in references}


def training_facts(model_dir: Path) -> list[tuple[str, str]]:
    """Steps, epochs and final loss from the Trainer's state, when the checkpoint folder has one; a checkpoint made
    by `training.average` says what it averages, and the last of those checkpoints gives the Trainer's state."""
    facts = []
    record = model_dir / AVERAGE_RECORD
    if record.is_file():
        averaged = json.loads(record.read_text(encoding="utf-8"))
        parts = [
            f"{path} x {weight:.2f}"
            for path, weight in zip(averaged["checkpoints"], averaged["weights"], strict=True)
        ]
        facts.append(("weights", "mean of " + ", ".join(parts) + " (`python -m training.average`)"))
        model_dir = Path(averaged["checkpoints"][-1])
    state_file = model_dir / "trainer_state.json"
    if not state_file.is_file():
        return facts
    state = json.loads(state_file.read_text(encoding="utf-8"))
    facts += [("optimizer steps", str(state.get("global_step"))), ("epochs", f"{state.get('epoch', 0):.2f}")]
    losses = [entry["loss"] for entry in state.get("log_history", []) if "loss" in entry]
    if losses:
        facts.append(("final training loss", f"{losses[-1]:.4f}"))
    return facts


def quote_train_configs(paths: list[Path]) -> str | None:
    """The training YAML for the card; a staged recipe as one YAML document per stage, in order."""
    if not paths:
        return None
    documents = [Path(path).read_text(encoding="utf-8").strip() for path in paths]
    if len(documents) == 1:
        return documents[0]
    header = f"# {len(documents)} stages, in order; the steps, epochs and loss above are the last stage's."
    return header + "\n" + "\n---\n".join(documents)


def training_sets(paths: list[Path]) -> list[str]:
    """The training sets the YAML configs name, in order and each once: "path (config) split"."""
    names: list[str] = []
    for path in paths:
        config = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        for spec in parse_dataset_specs(config.get("train_datasets")):
            name = spec.path + (f" ({spec.name})" if spec.name else "") + f" {spec.split}"
            names += [name] if name not in names else []
    return names


def count_trainable(weight_files: list[Path]) -> tuple[int, bool]:
    """Parameters of the trained weights (projector, LoRA adapters, trained encoder layers) in the weight files,
    and whether the files also hold the frozen encoder and LLM (a standalone checkpoint, whose count is then of
    the projector and adapters alone)."""
    standalone = any(holds_pretrained_weights(str(path)) for path in weight_files)
    trainable = 0
    for path in weight_files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                frozen = standalone and is_pretrained_weight(key)
                trainable += 0 if frozen else math.prod(handle.get_slice(key).get_shape())
    return trainable, standalone


def build_upload_folder(
    model_dir: Path,
    out_dir: Path,
    repo_id: str,
    example_audio: Path,
    results_files: list[Path] = (),
    license: str = LICENSE,
    datasets: list[str] = (),
    language: list[str] = (),
    train_configs: list[Path] = (),
    training_data_note: str | None = None,
    base_ids: dict[str, str] | None = None,
    allow_local_base: bool = False,
    baseline_files: list[Path] = (),
) -> Path:
    """Writes into `out_dir` exactly what will be uploaded, and checks the card; returns `out_dir`.

    `base_ids` replaces `audio_model_id` / `text_model_id` in the uploaded config, e.g. the Hub ids of the
    encoder and LLM a locally converted (offline) checkpoint was built from.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    files = hub_files(model_dir)
    config = {**read_config(model_dir), **(base_ids or {})}
    local = [config[key] for key in BASE_ID_KEYS if not is_hub_id(config[key])]
    if local and not allow_local_base:
        raise ValueError(
            f"{model_dir}/config.json points at local folder(s) {local}: the published model would not load on "
            "anyone else's machine. Give their Hub ids with --audio-model-id / --text-model-id, or pass "
            "--allow-local-base to publish it anyway."
        )
    try:
        sf.info(str(example_audio))
    except sf.LibsndfileError as err:
        raise ValueError(f"--example-audio {example_audio}: not a readable audio file: {err}") from err
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"output folder {out_dir} is not empty; choose a new --out")
    out_dir.mkdir(parents=True, exist_ok=True)

    for path in files:
        shutil.copy2(path, out_dir / path.name)
    (out_dir / "config.json").write_text(
        json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    example_name = "example" + Path(example_audio).suffix.lower()
    shutil.copy2(example_audio, out_dir / example_name)

    weights = [path for path in files if path.suffix == ".safetensors"]
    trainable, standalone = count_trainable(weights)
    card = build_card(
        repo_id=repo_id,
        config=config,
        decoding=checkpoint_decoding(model_dir, config),
        results=read_results(list(results_files)),
        example_file=example_name,
        license=license,
        datasets=list(datasets),
        language=list(language),
        trainable_params=trainable,
        standalone=standalone,
        weights_size=_human_size(sum(path.stat().st_size for path in weights)),
        training_facts=training_facts(model_dir),
        train_config=quote_train_configs(list(train_configs)),
        training_data=training_sets(list(train_configs)),
        training_data_note=training_data_note,
        baseline=read_results(list(baseline_files)),
    )
    card.save(out_dir / "README.md")
    validate_card(out_dir / "README.md")
    return out_dir


def _human_size(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.1f} kB"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "model_dir", type=Path, help="saved checkpoint folder (model + processor save_pretrained)"
    )
    parser.add_argument("--repo", required=True, help="Hub repo id to create/update, USER/NAME")
    parser.add_argument("--example-audio", type=Path, required=True, help="clip offered by the Hub's widget")
    parser.add_argument(
        "--results", type=Path, nargs="*", default=[], help="eval.py results.json files (WER)"
    )
    parser.add_argument(
        "--baseline-results",
        type=Path,
        nargs="*",
        default=[],
        help="a reference model's results.json files on the same sets, shown next to ours",
    )
    parser.add_argument(
        "--dataset",
        action="append",
        default=[],
        help="Hub id of a training dataset, for the metadata (repeatable)",
    )
    parser.add_argument(
        "--language",
        action="append",
        default=[],
        help="language code, e.g. en (repeatable; default: from the encoder, English for Whisper .en models)",
    )
    parser.add_argument("--license", default=LICENSE, help=f"SPDX id for the card (default: {LICENSE})")
    parser.add_argument(
        "--train-config",
        type=Path,
        nargs="+",
        default=[],
        help="training YAML to quote in the card; several for a model trained in stages, in order",
    )
    parser.add_argument(
        "--training-data-note",
        help="what the training data is, in words, for the card (the sets of --train-config are listed after it)",
    )
    parser.add_argument(
        "--out", type=Path, help="build the upload folder here (kept); default: a temporary one"
    )
    parser.add_argument("--dry-run", action="store_true", help="build and check the folder, do not upload")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--token", help="Hub token (default: the one saved by `hf auth login`)")
    parser.add_argument("--audio-model-id", help="Hub id of the encoder, recorded instead of a local folder")
    parser.add_argument("--text-model-id", help="Hub id of the LLM, recorded instead of a local folder")
    parser.add_argument(
        "--allow-local-base", action="store_true", help="publish even if the encoder/LLM are local folders"
    )
    args = parser.parse_args(argv)
    if args.dry_run and args.out is None:
        parser.error("--dry-run needs --out, the folder to build")

    with tempfile.TemporaryDirectory(prefix="tiny-audio-upload-") as scratch:
        try:
            folder = build_upload_folder(
                args.model_dir,
                args.out or Path(scratch) / "upload",
                args.repo,
                args.example_audio,
                results_files=args.results,
                license=args.license,
                datasets=args.dataset,
                language=args.language,
                train_configs=args.train_config,
                training_data_note=args.training_data_note,
                base_ids={key: getattr(args, key) for key in BASE_ID_KEYS if getattr(args, key)},
                allow_local_base=args.allow_local_base,
                baseline_files=args.baseline_results,
            )
        except (ValueError, OSError) as err:  # a bad input: one readable line, no traceback
            parser.exit(1, f"error: {err}\n")
        print(f"upload folder: {folder}")
        for path in sorted(folder.iterdir()):
            print(f"  {path.name}  ({path.stat().st_size:,} bytes)")
        if args.dry_run:
            return
        try:
            url = upload(folder, args.repo, private=args.private, token=args.token)
        except Exception as err:  # the Hub unreachable, no token, no write access: the folder itself is fine
            parser.exit(
                1,
                f"error: upload to {args.repo} failed ({type(err).__name__}: {err}). The folder was built and "
                "checked; log in with `hf auth login` and check the network, or keep it with --out DIR --dry-run.\n",
            )
        print(f"uploaded: {url}")


if __name__ == "__main__":
    sys.exit(main())
