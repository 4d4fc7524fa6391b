"""Tiny Audio: frozen audio encoder -> trainable projector -> frozen causal LM."""

from __future__ import annotations

import copy
import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    GenerationMixin,
    LogitsProcessorList,
    PreTrainedModel,
    StoppingCriteriaList,
)
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.whisper.modeling_whisper import WhisperEncoder, _compute_mask_indices
from transformers.utils import SAFE_WEIGHTS_NAME, cached_file
from transformers.utils.hub import resolve_revision

try:
    from .configuration_tiny_audio import (
        TinyAudioConfig,
        audio_token_lengths,
        encoder_frame_lengths,
        projector_token_lengths,
    )
    from .decoding_tiny_audio import (
        CTCPrefixScorer,
        RepetitionLoopGuard,
        blank_repetition_loops,
        ctc_forced_align,
        embedding_ctc_logits,
    )
    from .processing_tiny_audio import IGNORE_INDEX, add_audio_token
except ImportError:
    from configuration_tiny_audio import (
        TinyAudioConfig,
        audio_token_lengths,
        encoder_frame_lengths,
        projector_token_lengths,
    )
    from decoding_tiny_audio import (
        CTCPrefixScorer,
        RepetitionLoopGuard,
        blank_repetition_loops,
        ctc_forced_align,
        embedding_ctc_logits,
    )
    from processing_tiny_audio import IGNORE_INDEX, add_audio_token

# The Hub code: copied next to the weights so a saved folder serves with trust_remote_code alone.
HUB_CODE_FILES = (
    "configuration_tiny_audio.py",
    "modeling_tiny_audio.py",
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
NO_CTC_HEAD = (
    "word timestamps come from the model's CTC head, and this checkpoint has none: config.ctc_blank_token_id is "
    "unset because it was not trained with the CTC loss (train.py --ctc_weight). Use return_timestamps=True for "
    "chunk-level times."
)
# Weight names of the pretrained towers, frozen but for LoRA adapters (named by LORA_MARKER) and the encoder layers
# that `encoder_trainable_layers` trains. Every other weight (the projector's) trains.
AUDIO_TOWER_PREFIX, LANGUAGE_MODEL_PREFIX = "audio_tower.", "language_model."
PRETRAINED_PREFIXES = (AUDIO_TOWER_PREFIX, LANGUAGE_MODEL_PREFIX)
LORA_MARKER = ".lora_"
# Precomputed encoder outputs stand in for input_features, so like them they are read at prefill only.
PREFILL_ONLY_INPUTS = ("encoder_hidden_states", "encoder_mask")


# Where and how files are fetched: these apply to the encoder's and the LLM's repositories as to the checkpoint's.
HUB_OPTIONS = ("cache_dir", "force_download", "local_files_only", "token")
# How the frozen towers are built; `device_map` is split between them (`split_device_map`).
TOWER_OPTIONS = ("attn_implementation", "quantization_config", "offload_folder")
MODEL_PARTS = ("audio_tower", "multi_modal_projector", "language_model")


def load_audio_encoder(model_id: str, dtype: torch.dtype | None = None, **load_options) -> PreTrainedModel:
    """Loads only the encoder of a pretrained speech model (Whisper's decoder is dropped)."""
    hub_options = {key: value for key, value in load_options.items() if key in (*HUB_OPTIONS, "revision")}
    config = AutoConfig.from_pretrained(model_id, **hub_options)
    if config.model_type == "whisper":
        return WhisperSpeechEncoder.from_pretrained(
            model_id, dtype=dtype, key_mapping={r"^model\.encoder\.": ""}, **load_options
        )
    return AutoModel.from_pretrained(model_id, dtype=dtype, **load_options)


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


class WhisperSpeechEncoder(WhisperEncoder):
    """Whisper's encoder, loadable from a full Whisper checkpoint whose decoder weights it leaves behind.

    It runs in two parts, split after layer `split`: the frozen bottom (what the feature cache stores) and, for a
    model whose top layers train, the top. The bottom reads Whisper's whole 30-s window as Whisper does, or only as
    many frames as the longest clip holds (`encoder_real_length`); the top, and a real-length bottom, attend to real
    frames only, so trimmed cached frames, padded batches and single clips all give the same result.
    """

    _keys_to_ignore_on_load_unexpected = [r"^model\.decoder\.", r"^proj_out\."]

    def forward_bottom(
        self,
        input_features: torch.Tensor,
        split: int,
        feature_mask: torch.Tensor | None = None,
        frame_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Frames after the embedding and the first `split` layers of `WhisperEncoder.forward`.

        With the masks of real mel frames and encoder frames, nothing past a clip's end reaches its frames: the
        convolutions see zeros there, as at the end of a clip alone, and attention sees real frames only."""
        if feature_mask is not None:
            input_features = input_features * feature_mask[:, None, :].to(input_features.dtype)
        hidden = nn.functional.gelu(self.conv1(input_features))
        if feature_mask is not None:
            hidden = hidden * feature_mask[:, None, :].to(hidden.dtype)
        hidden = nn.functional.gelu(self.conv2(hidden))
        hidden = hidden.transpose(1, 2) + self.embed_positions.weight[: hidden.shape[2]]
        attention_mask = None if frame_mask is None else _key_mask(frame_mask, hidden.dtype)
        for layer in self.layers[:split]:
            hidden = layer(hidden, attention_mask)
        return hidden

    def forward_top(self, hidden: torch.Tensor, frame_mask: torch.Tensor, split: int) -> torch.Tensor:
        """The layers after `split` and the final norm, attending to real frames only (`frame_mask`).

        They compute in their own dtype: trained layers stay in fp32 when the frozen ones run in bf16."""
        hidden = hidden.to(self.layer_norm.weight.dtype)
        attention_mask = _key_mask(frame_mask, hidden.dtype)
        for layer in self.layers[split:]:
            hidden = layer(hidden, attention_mask)
        return self.layer_norm(hidden)


def _key_mask(frame_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An additive [batch, 1, 1, frames] attention mask that hides the frames `frame_mask` leaves out."""
    blocked = torch.zeros(frame_mask.shape, dtype=dtype, device=frame_mask.device)
    return blocked.masked_fill(~frame_mask, torch.finfo(dtype).min)[:, None, None, :]


def build_audio_encoder(audio_config) -> PreTrainedModel:
    """A randomly initialised encoder from a config (tests, and standalone checkpoints before loading)."""
    if audio_config.model_type == "whisper":
        return WhisperSpeechEncoder(audio_config)
    return AutoModel.from_config(audio_config)


class ProjectorLayer(nn.Module):
    """A pre-norm transformer layer over the projector's frames: reading room for a small encoder.

    Its two residual branches start at zero (`zero_residual_branches`), so adding it to a trained projector
    leaves the model's output unchanged until it trains, as new LoRA adapters do.
    """

    def __init__(self, width: int, num_heads: int, activation: str):
        super().__init__()
        self.attention_norm = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), ACT2FN[activation], nn.Linear(4 * width, width))

    def forward(self, hidden: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        normed = self.attention_norm(hidden)
        attended, _ = self.attention(normed, normed, normed, key_padding_mask=~token_mask, need_weights=False)
        hidden = hidden + attended
        return hidden + self.mlp(self.mlp_norm(hidden))

    @torch.no_grad()
    def zero_residual_branches(self) -> None:
        for linear in (self.attention.out_proj, self.mlp[-1]):
            linear.weight.zero_()
            linear.bias.zero_()


class TinyAudioProjector(nn.Module):
    """Maps encoder frames to LLM embeddings: strided conv (time / k), optional transformer layers, then
    Linear -> activation -> Linear, and an optional RMS norm onto the scale of the LLM's input embeddings."""

    def __init__(self, config: TinyAudioConfig):
        super().__init__()
        encoder_size = config.audio_config.hidden_size
        self.downsample = config.projector_downsample
        self.conv = nn.Conv1d(encoder_size, encoder_size, kernel_size=self.downsample, stride=self.downsample)
        self.layers = nn.ModuleList(
            ProjectorLayer(encoder_size, config.audio_config.num_attention_heads, config.projector_activation)
            for _ in range(config.projector_num_layers)
        )
        self.linear_1 = nn.Linear(encoder_size, config.projector_hidden_size)
        self.act = ACT2FN[config.projector_activation]
        self.linear_2 = nn.Linear(config.projector_hidden_size, config.text_config.hidden_size)
        self.output_norm = (
            nn.RMSNorm(config.text_config.hidden_size) if config.projector_output_norm else None
        )

    def forward(self, encoder_hidden: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        remainder = encoder_hidden.shape[1] % self.downsample
        if remainder:
            encoder_hidden = nn.functional.pad(encoder_hidden, (0, 0, 0, self.downsample - remainder))
        hidden = self.conv(encoder_hidden.transpose(1, 2)).transpose(1, 2)
        if self.layers and token_mask is None:
            token_mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        for layer in self.layers:
            hidden = layer(hidden, token_mask)
        hidden = self.linear_2(self.act(self.linear_1(hidden)))
        return self.output_norm(hidden) if self.output_norm is not None else hidden

    @torch.no_grad()
    def match_embedding_scale(self, embeddings: torch.Tensor) -> None:
        """Starts the output norm at the root-mean-square of each dimension of the LLM's input embeddings."""
        if self.output_norm is not None:
            self.output_norm.weight.copy_(embeddings.float().pow(2).mean(0).sqrt())


class TinyAudioPreTrainedModel(PreTrainedModel):
    config_class = TinyAudioConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("audio", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _skip_keys_device_placement = "past_key_values"

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        else:
            super()._init_weights(module)


class TinyAudioForConditionalGeneration(TinyAudioPreTrainedModel, GenerationMixin):
    """Speech recognition with a frozen encoder and a frozen LLM; only the projector (and optional LoRA) trains."""

    def __init__(
        self,
        config: TinyAudioConfig,
        audio_tower: PreTrainedModel | None = None,
        language_model: PreTrainedModel | None = None,
    ):
        super().__init__(config)
        self.audio_tower = (
            audio_tower if audio_tower is not None else build_audio_encoder(config.audio_config)
        )
        self.multi_modal_projector = TinyAudioProjector(config)
        self.language_model = (
            language_model
            if language_model is not None
            else AutoModelForCausalLM.from_config(config.text_config)
        )
        self.post_init()
        for layer in self.multi_modal_projector.layers:
            layer.zero_residual_branches()
        if config.lora_rank > 0:
            self._add_lora()
        self.freeze_pretrained()

    # ---- construction -------------------------------------------------------------------------------------

    @classmethod
    def from_components(
        cls,
        audio_model_id: str,
        text_model_id: str,
        dtype: torch.dtype | None = None,
        device_map: str | dict | None = None,
        **kwargs,
    ) -> TinyAudioForConditionalGeneration:
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
        if kwargs.get("audio_token_id") is None:
            audio_token = kwargs.get("audio_token", TinyAudioConfig.audio_token)
            tokenizer = AutoTokenizer.from_pretrained(
                text_model_id, revision=kwargs["text_model_revision"], **hub_options
            )
            kwargs["audio_token_id"] = add_audio_token(tokenizer, audio_token)
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
        model.generation_config = cls._generation_config_from(language_model)
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
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

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
            model.generation_config = cls._generation_config_from(language_model)
        model.multi_modal_projector.to(projector_device or model.get_input_embeddings().weight.device, dtype)
        model.eval()
        return model

    @staticmethod
    def _generation_config_from(language_model: PreTrainedModel) -> GenerationConfig:
        """Greedy decoding that stops where the LLM stops (its own EOS ids)."""
        source = language_model.generation_config
        return GenerationConfig(
            bos_token_id=source.bos_token_id,
            eos_token_id=source.eos_token_id,
            pad_token_id=source.pad_token_id if source.pad_token_id is not None else source.eos_token_id,
            do_sample=False,
            num_beams=1,
            max_new_tokens=128,
        )

    def _add_lora(self, target_modules: Sequence[str] | None = None) -> None:
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError as error:
            raise ImportError("LoRA (lora_rank > 0) needs the `peft` package: pip install peft") from error

        lora = LoraConfig(
            r=self.config.lora_rank,
            lora_alpha=self.config.lora_alpha,
            lora_dropout=self.config.lora_dropout,
            target_modules=list(target_modules or self.config.lora_target_modules),
        )
        inject_adapter_in_model(lora, self.language_model)

    def extend_lora(self, target_modules: Sequence[str]) -> None:
        """Adapts more LLM modules with LoRA, keeping the trained adapters: a continued run can widen LoRA.

        The new adapters start at zero (LoRA's B), so the model's output is unchanged until they train.
        """
        if self.config.lora_rank == 0:
            raise ValueError("this checkpoint has no LoRA (lora_rank 0): train a new model to add it")
        current = list(self.config.lora_target_modules)
        dropped = sorted(set(current) - set(target_modules))
        if dropped:
            raise ValueError(
                f"lora_target_modules must keep the checkpoint's trained adapters; missing {dropped}"
            )
        added = [module for module in target_modules if module not in current]
        if added:
            self._add_lora(added)
            self.config.lora_target_modules = current + added
            self.freeze_pretrained()

    def extend_acoustic_capacity(
        self, encoder_trainable_layers: int = 0, projector_num_layers: int = 0
    ) -> None:
        """Trains more of the acoustic side in a continued run: more top encoder layers, more projector layers.

        New projector layers start as the identity; newly trained encoder layers keep their pretrained weights but
        from now on attend to real frames only. Neither count may shrink: trained weights are never dropped.
        """
        config = self.config
        if (
            encoder_trainable_layers < config.encoder_trainable_layers
            or projector_num_layers < config.projector_num_layers
        ):
            raise ValueError(
                f"a continued run keeps the checkpoint's trained layers (encoder_trainable_layers "
                f"{config.encoder_trainable_layers}, projector_num_layers {config.projector_num_layers}); "
                f"got {encoder_trainable_layers} and {projector_num_layers}"
            )
        projector = self.multi_modal_projector
        reference = projector.linear_1.weight
        for _ in range(projector_num_layers - config.projector_num_layers):
            layer = ProjectorLayer(
                reference.shape[1], config.audio_config.num_attention_heads, config.projector_activation
            )
            layer.zero_residual_branches()
            projector.layers.append(layer.to(reference.device, reference.dtype))
        config.projector_num_layers = projector_num_layers
        config.encoder_trainable_layers = encoder_trainable_layers
        config.validate()
        self.freeze_pretrained()

    def _lora_layers(self) -> list[torch.nn.Module]:
        if self.config.lora_rank == 0:
            return []
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [module for module in self.language_model.modules() if isinstance(module, BaseTunerLayer)]

    @property
    def lora_merged(self) -> bool:
        return any(layer.merged for layer in self._lora_layers())

    def merge_lora(self) -> None:
        """Folds each LoRA adapter into its LLM weight for serving: the same outputs without the adapters' matmuls.

        One way only (unmerging is not exact in low precision): a merged model refuses to train and to save its
        full weights. Its trainable weights are untouched, so a projector-only save stays correct.
        """
        for layer in self._lora_layers():
            if not layer.merged:
                layer.merge()

    def quantize_llm_int8(self) -> None:
        """Swaps the LLM's linear layers, head included, for dynamic int8 ones (int8 weights, activations quantized
        per call) for faster CPU serving at some cost in accuracy: README "Benchmarks" gives both.

        Serving only and one way, as `merge_lora` (which it applies first): the model then refuses to train and
        to save its full weights. torch's int8 kernels (fbgemm/onednn) are CPU kernels.
        """
        if self.language_model.device.type != "cpu":
            raise ValueError(f"int8 serving runs on the CPU; this LLM is on {self.language_model.device}")
        self.merge_lora()
        with warnings.catch_warnings():
            # torch marks its eager quantization API deprecated in favour of the torchao package; it is kept here
            # because it needs no extra package and runs fbgemm's int8 kernels without compilation.
            warnings.filterwarnings("ignore", message=r".*(torch\.ao\.quantization|quantize_per_tensor).*")
            from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

            # The LLM's own layers only: merged adapters stay as they are, so the trained weights save unchanged.
            layers = {
                name: default_dynamic_qconfig
                for name, module in self.language_model.named_modules()
                if isinstance(module, nn.Linear) and LORA_MARKER not in name
            }
            quantize_dynamic(self.language_model, layers, dtype=torch.qint8, inplace=True)

    @property
    def llm_quantized(self) -> bool:
        from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

        return any(isinstance(module, DynamicQuantizedLinear) for module in self.language_model.modules())

    def _serving_only_reason(self) -> str | None:
        """Why this model can no longer train or save its full weights, if it can't."""
        if self.llm_quantized:
            return "this model's LLM was quantized to int8 for serving (quantize_llm_int8)"
        if self.lora_merged:
            return "this model's LoRA adapters were merged into the LLM for serving (merge_lora)"
        return None

    def freeze_pretrained(self) -> None:
        """Freezes encoder and LLM; leaves the projector, LoRA adapters and any trained encoder layers trainable."""
        for name, param in self.named_parameters():
            param.requires_grad = self._is_trainable(name)
        self.audio_tower.eval()
        self.language_model.eval()

    def _is_trainable(self, parameter_name: str) -> bool:
        return not is_pretrained_weight(parameter_name) or parameter_name.startswith(
            self._trained_encoder_prefixes()
        )

    def _trained_encoder_prefixes(self) -> tuple[str, ...]:
        """The encoder's top layers and final norm when they train."""
        if not self.config.encoder_trainable_layers:
            return ()
        layers = range(self.config.frozen_encoder_layers, self.config.audio_config.num_hidden_layers)
        return (*(f"{AUDIO_TOWER_PREFIX}layers.{i}." for i in layers), f"{AUDIO_TOWER_PREFIX}layer_norm.")

    def train(self, mode: bool = True) -> TinyAudioForConditionalGeneration:
        """Only the projector switches to training mode: the frozen towers never use dropout."""
        if mode and (reason := self._serving_only_reason()):
            raise RuntimeError(f"{reason}: load the checkpoint again to train it")
        super().train(mode)
        self.audio_tower.eval()
        self.language_model.eval()
        return self

    # ---- saving -------------------------------------------------------------------------------------------

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: tensor for name, tensor in self.state_dict().items() if self._is_trainable(name)}

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
        if standalone and (reason := self._serving_only_reason()):
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

    # ---- audio path: features -> encoder -> projector ---------------------------------------------------

    def encode_audio(
        self, input_features: torch.Tensor, input_features_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs the frozen encoder (its frozen layers, when the top ones train); returns its frames and a mask of
        the frames that hold real audio."""
        config = self.config
        features = input_features.to(self.audio_tower.dtype)
        lengths = encoder_frame_lengths(input_features_mask.sum(-1), config.encoder_conv_layers).to(
            features.device
        )
        with torch.no_grad():
            if config.audio_config.model_type == "whisper":
                feature_mask = frame_mask = None
                if config.encoder_real_length:
                    # Whisper's convolutions halve the mel frames: keep those the longest clip needs.
                    features = features[..., : 2 * int(lengths.max())]
                    feature_mask = input_features_mask[:, : features.shape[-1]].to(features.device)
                    frame_ids = torch.arange(features.shape[-1] // 2, device=features.device)
                    frame_mask = frame_ids < lengths[:, None]
                hidden = self.audio_tower.forward_bottom(
                    features, config.frozen_encoder_layers, feature_mask, frame_mask
                )
                if not config.encoder_trainable_layers:
                    hidden = self.audio_tower.layer_norm(hidden)
            elif getattr(config.audio_config, "feat_extract_norm", "layer") == "group":
                hidden = self._encode_clip_by_clip(features, input_features_mask, lengths)
            else:
                hidden = self.audio_tower(features, attention_mask=input_features_mask).last_hidden_state
        frame_ids = torch.arange(hidden.shape[1], device=hidden.device)
        return hidden, frame_ids[None, :] < lengths[:, None].to(hidden.device)

    def _encode_clip_by_clip(
        self, samples: torch.Tensor, samples_mask: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """Group-norm encoders (wav2vec2-base, hubert-base) normalise each channel over the whole input, padding
        included, and take no attention mask: in a padded batch every clip's frames would depend on the others'
        lengths. Each clip runs alone on its own samples; the frames are padded back into a batch."""
        rows = [
            self.audio_tower(clip[None, : int(count)]).last_hidden_state[0]
            for clip, count in zip(samples, samples_mask.sum(-1), strict=True)
        ]
        hidden = rows[0].new_zeros(len(rows), int(lengths.max()), rows[0].shape[-1])
        for index, frames in enumerate(rows):
            hidden[index, : len(frames)] = frames[: hidden.shape[1]]
        return hidden

    def project_audio(
        self, encoder_hidden: torch.Tensor, encoder_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs the trained encoder layers (if any) and the projector on real encoder frames (padding zeroed, so
        trimmed cached frames give the same result)."""
        projector = self.multi_modal_projector.linear_1.weight  # the towers may sit elsewhere (device_map)
        projector_dtype = projector.dtype
        encoder_mask = encoder_mask.to(projector.device)
        encoder_hidden = encoder_hidden.to(projector.device, projector_dtype)
        encoder_hidden = encoder_hidden * encoder_mask[..., None].to(projector_dtype)
        if self.training:
            encoder_hidden = self.spec_augment(encoder_hidden, encoder_mask)
        if self.config.encoder_trainable_layers:
            tower = self.audio_tower.layer_norm.weight.device
            top = self.audio_tower.forward_top(
                encoder_hidden.to(tower), encoder_mask.to(tower), self.config.frozen_encoder_layers
            )
            encoder_hidden = top.to(projector.device, projector_dtype) * encoder_mask[..., None].to(
                projector_dtype
            )
        token_counts = projector_token_lengths(encoder_mask.sum(-1), self.config.projector_downsample)
        frames = -(-encoder_hidden.shape[1] // self.config.projector_downsample)
        token_ids = torch.arange(frames, device=encoder_hidden.device)
        token_mask = token_ids[None, :] < token_counts[:, None].to(encoder_hidden.device)
        return self.multi_modal_projector(encoder_hidden, token_mask), token_mask

    def spec_augment(self, encoder_hidden: torch.Tensor, encoder_mask: torch.Tensor) -> torch.Tensor:
        """Zeroes random spans of real frames and of channels (SpecAugment; the config's mask_* fields)."""
        config = self.config
        if config.mask_time_prob > 0:
            spans = _compute_mask_indices(
                tuple(encoder_mask.shape),
                config.mask_time_prob,
                config.mask_time_length,
                attention_mask=encoder_mask.long().cpu(),
                min_masks=1,
            )
            encoder_hidden = encoder_hidden.masked_fill(
                torch.from_numpy(spans).to(encoder_hidden.device)[..., None], 0
            )
        if config.mask_feature_prob > 0:
            batch, _, channels = encoder_hidden.shape
            spans = _compute_mask_indices(
                (batch, channels), config.mask_feature_prob, config.mask_feature_length
            )
            encoder_hidden = encoder_hidden.masked_fill(
                torch.from_numpy(spans).to(encoder_hidden.device)[:, None], 0
            )
        return encoder_hidden

    def get_audio_features(
        self, input_features: torch.Tensor, input_features_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Audio embeddings in the LLM's space and the mask of those that stand for real audio."""
        return self.project_audio(*self.encode_audio(input_features, input_features_mask))

    def audio_embeddings(
        self,
        input_features: torch.Tensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Projected audio from features (live encoder) or from precomputed encoder outputs; None without audio."""
        if input_features is not None:
            return self.get_audio_features(input_features, input_features_mask)
        if encoder_hidden_states is not None:
            return self.project_audio(encoder_hidden_states, encoder_mask)
        return None

    def audio_token_counts(self, input_features_mask: torch.Tensor) -> torch.Tensor:
        return audio_token_lengths(
            input_features_mask.sum(-1), self.config.encoder_conv_layers, self.config.projector_downsample
        )

    # ---- text path and merge ------------------------------------------------------------------------------

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def embed_with_audio(
        self, input_ids: torch.LongTensor, audio_embeds: torch.Tensor | None, audio_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Text embeddings with every audio placeholder replaced, in order, by the real audio embeddings."""
        placeholder = input_ids == self.config.audio_token_id
        # The placeholder id may lie outside the LLM's vocabulary: look up a harmless id instead.
        inputs_embeds = self.get_input_embeddings()(input_ids.masked_fill(placeholder, 0))
        if audio_embeds is None:
            if placeholder.any():
                raise ValueError(
                    "input_ids contain audio placeholder tokens but no audio was given "
                    "(pass input_features and input_features_mask from the processor)."
                )
            return inputs_embeds
        real_audio = audio_embeds[audio_mask]
        if real_audio.shape[0] != int(placeholder.sum()):
            raise ValueError(
                f"The prompt holds {int(placeholder.sum())} audio placeholder tokens but the audio gives "
                f"{real_audio.shape[0]} embeddings; build inputs with TinyAudioProcessor so the counts agree."
            )
        mask = placeholder[..., None].expand_as(inputs_embeds)
        return inputs_embeds.masked_scatter(mask, real_audio.to(inputs_embeds.device, inputs_embeds.dtype))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        input_features: torch.Tensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """LLM forward over the prompt with audio merged in.

        With `labels`, logits are computed only where an answer token is predicted and the loss covers those
        positions only. `encoder_hidden_states`/`encoder_mask` replace `input_features` when encoder outputs
        were computed ahead of time (the training feature cache).
        """
        if inputs_embeds is None:
            audio = self.audio_embeddings(
                input_features, input_features_mask, encoder_hidden_states, encoder_mask
            )
            inputs_embeds = self.embed_with_audio(input_ids, *(audio or (None, None)))

        if labels is not None:
            # Position t predicts token t + 1: keep only positions whose next token is part of the answer.
            targets = labels[:, 1:]
            keep = nn.functional.pad(targets != IGNORE_INDEX, (0, 1), value=False)
            logits_to_keep = keep
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        if labels is None:
            return outputs

        answer_targets = targets[targets != IGNORE_INDEX].to(outputs.logits.device)
        loss = nn.functional.cross_entropy(outputs.logits.float(), answer_targets, reduction="sum")
        denominator = num_items_in_batch if num_items_in_batch is not None else max(answer_targets.numel(), 1)
        outputs.loss = loss / denominator
        return outputs

    def generate(
        self,
        *args,
        ctc_weight: float | None = None,
        ctc_top_k: int = 8,
        loop_guard: bool | None = None,
        **kwargs,
    ) -> torch.LongTensor:
        """`GenerationMixin.generate` with Tiny Audio's decoding policy, so that `generate` and the pipeline give the
        same text:

        - a budget that follows the audio length when none is given;
        - joint CTC/attention decoding when `ctc_weight` (default: `config.ctc_decoding_weight` when there is
          audio, so text-only prompts still work) is above 0;
        - the repetition-loop guard (default: on when there is audio): a row that falls into a loop stops, and the
          loop past one copy of its unit is replaced by padding (decode with ``skip_special_tokens=True``).
        """
        features_mask = kwargs.get("input_features_mask")
        if "max_new_tokens" not in kwargs and "generation_config" not in kwargs and features_mask is not None:
            seconds = self.feature_seconds(features_mask).max().item()
            kwargs["max_new_tokens"] = self.config.max_new_tokens_for(seconds)
        has_audio = any(kwargs.get(key) is not None for key in ("input_features", "encoder_hidden_states"))
        if ctc_weight is None:
            ctc_weight = self.config.ctc_decoding_weight if has_audio else 0.0
        if ctc_weight > 0:
            kwargs = self._with_ctc_scorer(kwargs, ctc_weight, ctc_top_k)
        if loop_guard is None:
            loop_guard = has_audio
        if not loop_guard:
            return super().generate(*args, **kwargs)
        kwargs["stopping_criteria"] = StoppingCriteriaList(
            [RepetitionLoopGuard(), *kwargs.get("stopping_criteria", [])]
        )
        output = super().generate(*args, **kwargs)
        prompt_length = kwargs["input_ids"].shape[1] if "input_ids" in kwargs else args[0].shape[1]
        config = kwargs.get("generation_config") or self.generation_config
        ends = {config.pad_token_id, config.bos_token_id, *self._eos_token_ids(config)} - {None}
        pad = (
            config.pad_token_id
            if config.pad_token_id is not None
            else next(iter(self._eos_token_ids(config)))
        )
        if isinstance(output, torch.Tensor):
            return blank_repetition_loops(output, prompt_length, pad, ends)
        output.sequences = blank_repetition_loops(output.sequences, prompt_length, pad, ends)
        return output

    @staticmethod
    def _eos_token_ids(config: GenerationConfig) -> list[int]:
        eos = config.eos_token_id
        return [eos] if isinstance(eos, int) else list(eos or [])

    def _with_ctc_scorer(self, kwargs: dict, weight: float, top_k: int) -> dict:
        """Runs the encoder once, hands its outputs to generation and adds a CTCPrefixScorer on the same audio."""
        if self.config.ctc_blank_token_id is None:
            raise ValueError(
                "ctc_weight > 0 needs config.ctc_blank_token_id: this checkpoint was not trained with the CTC loss."
            )
        if "input_features" in kwargs:
            kwargs["encoder_hidden_states"], kwargs["encoder_mask"] = self.encode_audio(
                kwargs.pop("input_features"), kwargs.pop("input_features_mask")
            )
        if kwargs.get("encoder_hidden_states") is None:
            raise ValueError("ctc_weight > 0 needs audio: pass input_features and input_features_mask.")
        with torch.no_grad():
            audio_embeds, audio_mask = self.project_audio(
                kwargs["encoder_hidden_states"], kwargs["encoder_mask"]
            )
        generation_config = kwargs.get("generation_config") or self.generation_config
        scorer = CTCPrefixScorer(
            audio_embeds,
            audio_mask,
            self.get_input_embeddings().weight,
            blank_id=self.config.ctc_blank_token_id,
            eos_token_ids=self._eos_token_ids(generation_config),
            weight=weight,
            prompt_length=kwargs["input_ids"].shape[1],
            top_k=max(top_k, 2 * (kwargs.get("num_beams") or generation_config.num_beams or 1)),
            pad_token_id=generation_config.pad_token_id,
        )
        kwargs["logits_processor"] = LogitsProcessorList([*kwargs.get("logits_processor", []), scorer])
        return kwargs

    def prepare_inputs_for_generation(self, *args, is_first_iteration: bool = False, **kwargs) -> dict:
        inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration and kwargs.get("use_cache", True):
            for key in PREFILL_ONLY_INPUTS:
                inputs.pop(key, None)
        return inputs

    def _prefill(
        self,
        input_ids: torch.LongTensor,
        generation_config: GenerationConfig,
        model_kwargs: dict,
        is_first_iteration: bool = True,
    ) -> CausalLMOutputWithPast:
        """Prefills each clip once when generation has repeated its rows (beams, several returned sequences), then
        repeats the cache: the prompt, audio included, is most of the compute, and its copies would cost as much."""
        copies = max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
        rows = input_ids.shape[0]
        cache = model_kwargs.get("cache")
        if (
            copies == 1
            or rows % copies
            or not is_first_iteration
            or (cache is not None and cache.get_seq_length())
        ):
            return super()._prefill(input_ids, generation_config, model_kwargs, is_first_iteration)
        # Rows come as repeat_interleave copies: keep the first of each clip (1-D tensors such as positions stay).
        once = {
            key: value[::copies]
            if torch.is_tensor(value) and value.dim() > 1 and value.shape[0] == rows
            else value
            for key, value in model_kwargs.items()
        }
        outputs = super()._prefill(input_ids[::copies], generation_config, once, is_first_iteration)
        outputs.logits = outputs.logits.repeat_interleave(copies, dim=0)
        outputs.cache.batch_repeat_interleave(copies)
        return outputs

    @torch.no_grad()
    def ctc_token_frames(
        self, input_features: torch.Tensor, input_features_mask: torch.Tensor, token_ids: list[list[int]]
    ) -> list[list[tuple[int, int] | None] | None]:
        """Where the CTC head hears each token of each clip's text: the (first, last) projected frame of its CTC
        forced alignment, None for the blank (which stands for no token), and a None row when the clip has too few
        frames to hold its text. Frames are `config.audio_token_seconds` long."""
        blank = self.config.ctc_blank_token_id
        if blank is None:
            raise ValueError(NO_CTC_HEAD)
        audio, audio_mask = self.get_audio_features(input_features, input_features_mask)
        embeddings = self.get_input_embeddings().weight
        squared_norms = embeddings.float().pow(2).sum(-1)
        rows = []
        for row, tokens in enumerate(token_ids):
            targets = [token for token in tokens if token != blank]
            frames = audio[row][audio_mask[row]]
            log_probs = embedding_ctc_logits(frames, embeddings, squared_norms).log_softmax(-1)
            spans = ctc_forced_align(log_probs, targets, blank)
            if spans is None:
                rows.append(None)
                continue
            spans = iter(spans)
            rows.append([None if token == blank else next(spans) for token in tokens])
        return rows

    def feature_seconds(self, input_features_mask: torch.Tensor) -> torch.Tensor:
        """Audio duration of each clip, from its count of real feature frames."""
        return input_features_mask.sum(-1).float() * self.config.feature_frame_seconds


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
            source = Path(
                cached_file(fallback_source, name, _raise_exceptions_for_missing_entries=False) or source
            )
        target = Path(save_directory) / name
        if not source.is_file():
            raise FileNotFoundError(f"Cannot save {name} with the model: not found next to {__file__}")
        if source.resolve() != target.resolve():
            shutil.copyfile(source, target)


__all__ = ["TinyAudioForConditionalGeneration", "TinyAudioPreTrainedModel", "TinyAudioProjector"]
