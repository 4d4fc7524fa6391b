"""Tiny Audio's checkpoints: what trains and so what a checkpoint holds, how the pretrained towers are fetched
for a projector-only checkpoint, and saving with the model's Hub code. A mixin of
`TinyAudioForConditionalGeneration`."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel
from transformers.utils import SAFE_WEIGHTS_NAME, cached_file
from transformers.utils.hub import resolve_revision

try:
    from .configuration_tiny_audio import TinyAudioConfig
    from .encoder_tiny_audio import HUB_OPTIONS, load_audio_encoder
    from .lora_tiny_audio import LORA_MARKER
    from .processing_tiny_audio import add_placeholder_token
except ImportError:
    from configuration_tiny_audio import TinyAudioConfig
    from encoder_tiny_audio import HUB_OPTIONS, load_audio_encoder
    from lora_tiny_audio import LORA_MARKER
    from processing_tiny_audio import add_placeholder_token

# The Hub code: copied next to the weights so a saved folder serves with trust_remote_code alone.
HUB_CODE_FILES = (
    "configuration_tiny_audio.py",
    "modeling_tiny_audio.py",
    "encoder_tiny_audio.py",
    "checkpoint_tiny_audio.py",
    "lora_tiny_audio.py",
    "decoding_tiny_audio.py",
    "processing_tiny_audio.py",
    "pipeline_asr.py",
    "handler.py",  # Inference Endpoints' custom handler
)
AUTO_MAP = {
    "AutoConfig": "configuration_tiny_audio.TinyAudioConfig",
    "AutoModel": "modeling_tiny_audio.TinyAudioForConditionalGeneration",
    "AutoModelForSpeechSeq2Seq": "modeling_tiny_audio.TinyAudioForConditionalGeneration",
    "AutoProcessor": "processing_tiny_audio.TinyAudioProcessor",
}
CUSTOM_PIPELINES = {
    "automatic-speech-recognition": {
        "impl": "pipeline_asr.TinyAudioASRPipeline",
        "pt": ["AutoModelForSpeechSeq2Seq"],
        "tf": [],
        "type": "multimodal",
    }
}
# Weight names of the pretrained towers, frozen but for LoRA adapters (named by LORA_MARKER) and the encoder layers
# that `encoder_trainable_layers` trains. Every other weight (the projector's) trains.
AUDIO_TOWER_PREFIX, LANGUAGE_MODEL_PREFIX = "audio_tower.", "language_model."
PROJECTOR_PREFIX = "multi_modal_projector."
PRETRAINED_PREFIXES = (AUDIO_TOWER_PREFIX, LANGUAGE_MODEL_PREFIX)
# How the frozen towers are built; `device_map` is split between them (`split_device_map`).
TOWER_OPTIONS = ("attn_implementation", "quantization_config", "offload_folder")
MODEL_PARTS = ("audio_tower", "multi_modal_projector", "language_model")
# Decoding settings that checkpoints saved before they moved into the generation config kept in config.json, with
# their generation-config names (the old min_new_tokens was the budget's fixed part, not the library's minimum).
LEGACY_DECODING_FIELDS = {
    "ctc_decoding_weight": "ctc_decoding_weight",
    "min_new_tokens": "max_new_tokens",
    "max_new_tokens_per_second": "max_new_tokens_per_second",
}


def default_generation_config(language_model: PreTrainedModel) -> GenerationConfig:
    """A new model's decoding: greedy, stopping where the LLM stops (its own EOS ids), without CTC scoring, and
    with a budget of `max_new_tokens` plus `max_new_tokens_per_second` for each second of audio
    (`decoding_tiny_audio.new_token_budget`)."""
    source = language_model.generation_config
    return GenerationConfig(
        bos_token_id=source.bos_token_id,
        eos_token_id=source.eos_token_id,
        pad_token_id=source.pad_token_id if source.pad_token_id is not None else source.eos_token_id,
        do_sample=False,
        num_beams=1,
        max_new_tokens=16,
        max_new_tokens_per_second=8.0,
        ctc_decoding_weight=0.0,
    )


def adopt_legacy_decoding_fields(model: PreTrainedModel) -> None:
    """Moves the decoding settings of a checkpoint saved before they lived in the generation config out of its
    config, so that it decodes as it did and saves them in one place."""
    for old_name, new_name in LEGACY_DECODING_FIELDS.items():
        if old_name in model.config.__dict__:
            setattr(model.generation_config, new_name, model.config.__dict__.pop(old_name))


def pinned_revision(model_id: str, revision: str | None, hub_options: dict) -> str | None:
    """The commit a Hub repository's ``revision`` (None: its default branch) points to now, so the config can
    record it; the revision as given when it cannot be resolved, and None for a local folder."""
    resolved = resolve_revision(model_id, revision, **hub_options)
    return getattr(resolved, "resolved", None) or revision


def split_device_map(
    device_map: str | dict | None,
) -> tuple[str | dict | None, str | dict | None, str | None]:
    """The encoder's and the LLM's device maps and the projector's device, from a device map of the whole model.

    A string ("auto", "cuda:0"...) applies to each tower (the projector then follows the LLM's embeddings). A dict
    names modules of this model ("audio_tower", "language_model.model.layers.3", "" for all of it).
    """
    if not isinstance(device_map, dict):
        return device_map, device_map, None
    parts: dict[str, dict] = {name: {} for name in MODEL_PARTS}
    for key, device in device_map.items():
        name, _, rest = key.partition(".")
        if key == "":
            for part in parts.values():
                part[""] = device
        elif name in parts:
            parts[name][rest] = device
        else:
            raise ValueError(
                f"device_map key {key!r} is not in this model: its modules are {', '.join(MODEL_PARTS)}"
            )
    missing = [name for name, part in parts.items() if not part]
    if missing:
        raise ValueError(f"device_map places no module of {', '.join(missing)}")
    if set(parts["multi_modal_projector"]) != {""}:
        raise ValueError("device_map must place the projector whole: {'multi_modal_projector': device}")
    return parts["audio_tower"], parts["language_model"], parts["multi_modal_projector"][""]


def is_pretrained_weight(name: str) -> bool:
    """A weight of the encoder or the LLM as published: frozen unless it is a trained encoder layer."""
    return name.startswith(PRETRAINED_PREFIXES) and LORA_MARKER not in name


def holds_pretrained_weights(weights_file: str) -> bool:
    """True for a standalone checkpoint (every weight), False for a projector-only one (which may still hold
    trained encoder layers, but never the LLM's own weights)."""
    with safe_open(weights_file, framework="pt") as handle:
        return any(
            is_pretrained_weight(key) and key.startswith(LANGUAGE_MODEL_PREFIX) for key in handle.keys()
        )


def copy_hub_code(save_directory: str | os.PathLike, fallback_source: str | None = None) -> None:
    """Copies the model's code next to its weights, so the folder works as a `trust_remote_code` Hub repo.

    The code comes from this module's folder; a model loaded as remote code finds only the files it imported
    there, so the rest (the pipeline) come from the folder or Hub repo it was loaded from.
    """
    source_dir = Path(__file__).resolve().parent
    for name in HUB_CODE_FILES:
        source = source_dir / name
        if not source.is_file() and fallback_source:
            try:
                source = Path(cached_file(fallback_source, name))
            except OSError:  # the folder or repo lacks it too: reported below
                pass
        target = Path(save_directory) / name
        if not source.is_file():
            raise FileNotFoundError(f"Cannot save {name} with the model: not found next to {__file__}")
        if source.resolve() != target.resolve():
            shutil.copyfile(source, target)


class CheckpointMixin:
    """Builds the model from pretrained towers, loads and saves its checkpoints, and says which weights train."""

    @classmethod
    def from_components(
        cls,
        audio_model_id: str,
        text_model_id: str,
        dtype: torch.dtype | None = None,
        device_map: str | dict | None = None,
        **kwargs,
    ) -> PreTrainedModel:
        """A new model from a pretrained encoder and LLM (Hub ids or local folders), with a fresh projector.

        ``kwargs`` are config fields, and the load options of `from_pretrained` (``HUB_OPTIONS``, ``TOWER_OPTIONS``)
        for both towers. The config records the commit of each Hub repository loaded (``audio_model_revision`` /
        ``text_model_revision``; give them to load another revision), so a saved checkpoint loads the same weights.
        """
        load_options = {key: kwargs.pop(key) for key in (*HUB_OPTIONS, *TOWER_OPTIONS) if key in kwargs}
        hub_options = {key: value for key, value in load_options.items() if key in HUB_OPTIONS}
        for key, model_id in (
            ("audio_model_revision", audio_model_id),
            ("text_model_revision", text_model_id),
        ):
            kwargs[key] = pinned_revision(str(model_id), kwargs.get(key), hub_options)
        audio_tower, language_model, projector_device = cls._load_towers(
            audio_model_id, text_model_id, kwargs, dtype, device_map, load_options
        )
        placeholders = {"audio": True, "voice": bool(kwargs.get("voice_attributes"))}
        if any(needed and kwargs.get(f"{name}_token_id") is None for name, needed in placeholders.items()):
            # Their ids are those the processor's tokenizer gives them: the audio placeholder first, then the voice.
            tokenizer = AutoTokenizer.from_pretrained(
                text_model_id, revision=kwargs["text_model_revision"], **hub_options
            )
            for name, needed in placeholders.items():
                if needed and kwargs.get(f"{name}_token_id") is None:
                    token = kwargs.get(f"{name}_token", getattr(TinyAudioConfig, f"{name}_token"))
                    kwargs[f"{name}_token_id"] = add_placeholder_token(tokenizer, token)
        config = TinyAudioConfig(
            # Copies: the towers keep their own configs (with their resolved attention implementation).
            audio_config=audio_tower.config.to_dict(),
            text_config=language_model.config.to_dict(),
            audio_model_id=str(audio_model_id),
            text_model_id=str(text_model_id),
            **kwargs,
        )
        model = cls(config, audio_tower=audio_tower, language_model=language_model)
        model.multi_modal_projector.match_embedding_scale(model.get_input_embeddings().weight)
        model.generation_config = default_generation_config(language_model)
        adopt_legacy_decoding_fields(model)  # e.g. the settings of weights shipped before they moved
        model.multi_modal_projector.to(projector_device or model.get_input_embeddings().weight.device, dtype)
        return model

    @staticmethod
    def _load_towers(
        audio_model_id: str,
        text_model_id: str,
        revisions: dict,
        dtype: torch.dtype | None,
        device_map: str | dict | None,
        load_options: dict,
    ) -> tuple[PreTrainedModel, PreTrainedModel, str | None]:
        """The pretrained encoder and LLM at their recorded revisions, placed by ``device_map``; and the
        projector's device if the map names one."""
        audio_map, text_map, projector_device = split_device_map(device_map)
        audio_tower = load_audio_encoder(
            audio_model_id,
            dtype=dtype,
            revision=revisions.get("audio_model_revision"),
            **({"device_map": audio_map} if audio_map is not None else {}),
            **load_options,
        )
        language_model = AutoModelForCausalLM.from_pretrained(
            text_model_id,
            dtype=dtype,
            revision=revisions.get("text_model_revision"),
            **({"device_map": text_map} if text_map is not None else {}),
            **load_options,
        )
        return audio_tower, language_model, projector_device

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args, **kwargs):
        """Loads a checkpoint; a projector-only one rebuilds the encoder and LLM from their ids first.

        ``cache_dir``, ``force_download``, ``local_files_only``, ``token``, ``attn_implementation``,
        ``quantization_config``, ``device_map`` (a dict names modules of this model) and ``offload_folder`` apply to
        the encoder and LLM loads too; ``revision`` is the checkpoint's own, and the towers load the revisions its
        config records.
        """
        hub_kwargs = {key: kwargs[key] for key in (*HUB_OPTIONS, "revision", "subfolder") if key in kwargs}
        weights_file = cached_file(pretrained_model_name_or_path, SAFE_WEIGHTS_NAME, **hub_kwargs)
        if holds_pretrained_weights(weights_file):
            model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
            adopt_legacy_decoding_fields(model)
            return model

        config = kwargs.get("config")
        if not isinstance(config, TinyAudioConfig):
            config = TinyAudioConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        config.name_or_path = str(pretrained_model_name_or_path)
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        dtype = None if dtype == "auto" else dtype
        load_options = {key: kwargs[key] for key in (*HUB_OPTIONS, *TOWER_OPTIONS) if key in kwargs}
        revisions = {
            "audio_model_revision": config.audio_model_revision,
            "text_model_revision": config.text_model_revision,
        }
        audio_tower, language_model, projector_device = cls._load_towers(
            config.audio_model_id,
            config.text_model_id,
            revisions,
            dtype,
            kwargs.get("device_map"),
            load_options,
        )
        model = cls(config, audio_tower=audio_tower, language_model=language_model)
        model.load_trainable_weights(weights_file)
        try:
            model.generation_config = GenerationConfig.from_pretrained(
                pretrained_model_name_or_path, **hub_kwargs
            )
        except OSError:
            model.generation_config = default_generation_config(language_model)
        adopt_legacy_decoding_fields(model)
        model.multi_modal_projector.to(projector_device or model.get_input_embeddings().weight.device, dtype)
        model.eval()
        return model

    def freeze_pretrained(self) -> None:
        """Freezes encoder and LLM; leaves the projector, LoRA adapters and any trained encoder layers trainable."""
        for name, param in self.named_parameters():
            param.requires_grad = self.is_trainable(name)
        self.audio_tower.eval()
        self.language_model.eval()

    def is_trainable(self, parameter_name: str) -> bool:
        return not is_pretrained_weight(parameter_name) or parameter_name.startswith(
            self._trained_encoder_prefixes()
        )

    def _trained_encoder_prefixes(self) -> tuple[str, ...]:
        """The encoder's top layers and final norm when they train."""
        if not self.config.encoder_trainable_layers:
            return ()
        layers = range(self.config.frozen_encoder_layers, self.config.audio_config.num_hidden_layers)
        return (*(f"{AUDIO_TOWER_PREFIX}layers.{i}." for i in layers), f"{AUDIO_TOWER_PREFIX}layer_norm.")

    def train(self, mode: bool = True) -> PreTrainedModel:
        """Only the projector switches to training mode: the frozen towers never use dropout."""
        if mode and (reason := self.serving_only_reason()):
            raise RuntimeError(f"{reason}: load the checkpoint again to train it")
        super().train(mode)
        self.audio_tower.eval()
        self.language_model.eval()
        return self

    # ---- saving -------------------------------------------------------------------------------------------

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: tensor for name, tensor in self.state_dict().items() if self.is_trainable(name)}

    def load_trainable_weights(self, weights_file: str) -> None:
        state = load_file(weights_file)
        expected = set(self.trainable_state_dict())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ValueError(
                f"{weights_file} does not match this model's trainable weights "
                f"(missing: {sorted(missing)[:5]}, unexpected: {sorted(unexpected)[:5]}); "
                "was it saved with a different projector size or LoRA setting?"
            )
        self.load_state_dict(state, strict=False)

    def save_pretrained(self, save_directory: str | os.PathLike, standalone: bool = False, **kwargs) -> None:
        """Saves config, code and weights: only the trainable ones unless `standalone=True`.

        A projector-only folder references the encoder and LLM by `audio_model_id` / `text_model_id`.
        """
        if standalone and (reason := self.serving_only_reason()):
            raise ValueError(
                f"{reason}, so its full weights are not the LLM's own: save without standalone=True, "
                "or load the checkpoint again"
            )
        if not standalone:
            kwargs["state_dict"] = {k: v.contiguous() for k, v in self.trainable_state_dict().items()}
        self.config.auto_map = dict(AUTO_MAP)
        # A copy: transformers resolves the pipeline entry in place when it builds a pipeline.
        self.config.custom_pipelines = copy.deepcopy(CUSTOM_PIPELINES)
        super().save_pretrained(save_directory, **kwargs)
        copy_hub_code(save_directory, fallback_source=self.name_or_path)
