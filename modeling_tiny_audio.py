"""Tiny Audio: frozen audio encoder -> trainable projector -> frozen causal LM.

`TinyAudioModel` owns the towers and merges the projected audio into the prompt; `TinyAudioForConditionalGeneration`
adds the losses (next-token, and the auxiliary CTC loss of the projected audio) and generation. The encoder
(`encoder_tiny_audio`), checkpoints (`checkpoint_tiny_audio`), LoRA (`lora_tiny_audio`) and decoding
(`decoding_tiny_audio`) have files of their own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    GenerationMixin,
    LogitsProcessorList,
    PreTrainedModel,
    StoppingCriteriaList,
)
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutputWithPast

# Private: transformers has no public SpecAugment span sampler (tests/test_core.py pins what it draws).
from transformers.models.whisper.modeling_whisper import _compute_mask_indices

# The sibling Hub files: a relative import in a checkpoint's remote code, a top-level one in a checkout. One
# name per line (isort would join them), so that the two spellings stay plain import lines.
# isort: off
try:
    from .checkpoint_tiny_audio import CheckpointMixin
    from .configuration_tiny_audio import TinyAudioConfig
    from .configuration_tiny_audio import encoder_frame_lengths
    from .configuration_tiny_audio import projector_token_lengths
    from .decoding_tiny_audio import NO_CTC_HEAD
    from .decoding_tiny_audio import CTCPrefixScorer
    from .decoding_tiny_audio import RepetitionLoopGuard
    from .decoding_tiny_audio import blank_repetition_loops
    from .decoding_tiny_audio import ctc_forced_align
    from .decoding_tiny_audio import embedding_ctc_logits
    from .decoding_tiny_audio import embedding_ctc_loss
    from .decoding_tiny_audio import new_token_budget
    from .encoder_tiny_audio import build_audio_encoder
    from .lora_tiny_audio import LoraMixin
    from .processing_tiny_audio import IGNORE_INDEX
except ImportError:
    from checkpoint_tiny_audio import CheckpointMixin
    from configuration_tiny_audio import TinyAudioConfig
    from configuration_tiny_audio import encoder_frame_lengths
    from configuration_tiny_audio import projector_token_lengths
    from decoding_tiny_audio import NO_CTC_HEAD
    from decoding_tiny_audio import CTCPrefixScorer
    from decoding_tiny_audio import RepetitionLoopGuard
    from decoding_tiny_audio import blank_repetition_loops
    from decoding_tiny_audio import ctc_forced_align
    from decoding_tiny_audio import embedding_ctc_logits
    from decoding_tiny_audio import embedding_ctc_loss
    from decoding_tiny_audio import new_token_budget
    from encoder_tiny_audio import build_audio_encoder
    from lora_tiny_audio import LoraMixin
    from processing_tiny_audio import IGNORE_INDEX
# isort: on


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


def frame_statistics(encoder_hidden: torch.Tensor, encoder_mask: torch.Tensor) -> torch.Tensor:
    """[batch, 2 * dim]: the mean and the standard deviation of each clip's real encoder frames ([batch, frames,
    dim], and their [batch, frames] mask): what a clip sounds like as a whole, whatever was said."""
    weights = encoder_mask[..., None].to(encoder_hidden.dtype)
    frames = weights.sum(1).clamp(min=1)
    mean = (encoder_hidden * weights).sum(1) / frames
    variance = ((encoder_hidden - mean[:, None]).pow(2) * weights).sum(1) / frames
    return torch.cat([mean, (variance + 1e-6).sqrt()], dim=-1)


class VoiceAttributeHeads(nn.Module):
    """Classifies a clip's voice attributes (gender, accent, channel, ...) from its frames' mean and spread:
    Linear -> activation, then one linear classifier per attribute, their logits side by side.

    They read the encoder's output frames, or (`layers` > 1, `TinyAudioConfig.voice_layer_mix`) the frames after
    each of its layers: each layer's statistics are normalised, and each attribute reads its own learned softmax mix
    of the layers (as SUPERB's probes do), since Whisper's last layer, trained to transcribe, lets go of the
    speaker's gender and accent that its lower layers hold.

    Trained on each clip's facts, they tell the LLM in words it knows who speaks and over what line
    (`TinyAudioModel.voice_embeddings`): a frozen LLM reads the words at once, where a summary vector would first
    have to be learnt to read (issue 30). The optional learned prompt (`prompt`, [length, LLM width]) opens those
    words in the prompt: the whole voice path lives in this module, so that it can train alone.
    """

    def __init__(
        self,
        encoder_size: int,
        hidden_size: int,
        value_counts: list[int],
        activation: str,
        prompt_shape: tuple[int, int] = (0, 0),
        layers: int = 1,
    ):
        super().__init__()
        self.value_counts = value_counts
        if layers > 1:
            self.layer_norms = nn.ModuleList(nn.LayerNorm(2 * encoder_size) for _ in range(layers))
            self.layer_weights = nn.Parameter(torch.zeros(len(value_counts), layers))
        else:
            self.layer_norms = self.layer_weights = None
        self.linear = nn.Linear(2 * encoder_size, hidden_size)
        self.act = ACT2FN[activation]
        self.classifier = nn.Linear(hidden_size, sum(value_counts))
        self.prompt = nn.Parameter(torch.zeros(prompt_shape)) if prompt_shape[0] else None

    @classmethod
    def from_config(cls, config: TinyAudioConfig) -> VoiceAttributeHeads:
        """The heads `config.voice_attributes` asks for, on the encoder's frames, as wide as the projector."""
        return cls(
            config.audio_config.hidden_size,
            config.projector_hidden_size,
            config.voice_attribute_value_counts,
            config.projector_activation,
            (config.voice_prompt_length, config.text_config.hidden_size),
            config.encoder_statistics_layers if config.voice_layer_mix else 1,
        )

    def forward(self, statistics: torch.Tensor) -> torch.Tensor:
        """[batch, values of all attributes] logits from [batch, layers, 2 * dim] frame statistics
        (`frame_statistics` of each layer read)."""
        if self.layer_weights is None:
            return self.classifier(self.act(self.linear(statistics[:, -1])))
        normalised = torch.stack([norm(statistics[:, i]) for i, norm in enumerate(self.layer_norms)], dim=1)
        mixed = torch.einsum("al,bld->bad", self.layer_weights.softmax(-1), normalised)
        # [batch, attributes, values of all]: each attribute keeps its own values' logits, from its own mix.
        logits = self.classifier(self.act(self.linear(mixed)))
        parts = logits.split(self.value_counts, dim=-1)
        return torch.cat([part[:, index] for index, part in enumerate(parts)], dim=-1)


class TinyAudioProjector(nn.Module):
    """Maps encoder frames to LLM embeddings: strided conv (time / k), optional transformer layers, then
    Linear -> activation -> Linear, and an optional RMS norm onto the scale of the LLM's input embeddings. The
    voice-attribute heads live here too, beside the path of the frames: they read the same encoder frames for the
    voice tokens."""

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
        self.voice_attributes = VoiceAttributeHeads.from_config(config) if config.voice_attributes else None

    def forward(
        self,
        encoder_hidden: torch.Tensor,
        token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[batch, tokens, hidden] from [batch, frames, dim] encoder outputs; `token_mask` says which tokens are real
        (default: all)."""
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


@dataclass
class TinyAudioCausalLMOutputWithPast(CausalLMOutputWithPast):
    """The LLM's output, with the projected audio it read and, when `ctc_targets` were given, the CTC term of the
    loss (before `config.ctc_loss_weight`).

    audio_embeds (`torch.FloatTensor` of shape `(batch_size, audio_tokens, hidden_size)`): the projected audio.
    audio_mask (`torch.BoolTensor` of shape `(batch_size, audio_tokens)`): which of those stand for real audio.
    ctc_loss (`torch.FloatTensor` of shape `()`): the CTC term.
    voice_attribute_logits (`torch.FloatTensor` of shape `(batch_size, values)`): the voice-attribute heads' logits,
        every attribute's values side by side (`config.voice_attributes`).
    voice_attribute_loss (`torch.FloatTensor` of shape `()`): their loss, when `voice_attribute_targets` were given.
    """

    audio_embeds: torch.FloatTensor | None = None
    audio_mask: torch.BoolTensor | None = None
    ctc_loss: torch.FloatTensor | None = None
    voice_attribute_logits: torch.FloatTensor | None = None
    voice_attribute_loss: torch.FloatTensor | None = None


class TinyAudioModel(TinyAudioPreTrainedModel):
    """The towers and the merge: the audio runs through the encoder and the projector (`get_audio_features`), and
    the LLM reads the prompt with each audio placeholder replaced by one projected audio frame.

    The LLM stays whole, head included (its `...ForCausalLM`), where AudioFlamingo3 splits body and head: some
    architectures scale or cap their logits there, and every checkpoint names its weights `language_model.*`.
    """

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

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    # ---- audio path: features -> encoder (encode_audio) -> projector (project_audio) ------------------------

    def encode_audio(
        self,
        input_features: torch.Tensor,
        input_features_mask: torch.Tensor,
        output_layer_statistics: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Runs the frozen encoder (its frozen layers, when the top ones train); returns its frames and a mask of
        the frames that hold real audio. With `output_layer_statistics`, also [batch, `config.encoder_statistics_layers`,
        2 * dim]: the mean and spread of each clip's real frames after the encoder's input layer and after each
        frozen layer (`frame_statistics`; what heads with `config.voice_layer_mix` read)."""
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
                bottom = self.audio_tower.forward_bottom(
                    features, config.frozen_encoder_layers, feature_mask, frame_mask, output_layer_statistics
                )
                states = bottom if output_layer_statistics else (bottom,)
                if not config.encoder_trainable_layers:
                    states = (*states[:-1], self.audio_tower.layer_norm(states[-1]))
            elif getattr(config.audio_config, "feat_extract_norm", "layer") == "group":
                states = self._encode_clip_by_clip(
                    features, input_features_mask, lengths, output_layer_statistics
                )
            else:
                output = self.audio_tower(
                    features, attention_mask=input_features_mask, output_hidden_states=output_layer_statistics
                )
                states = output.hidden_states if output_layer_statistics else (output.last_hidden_state,)
        hidden = states[-1]
        frame_ids = torch.arange(hidden.shape[1], device=hidden.device)
        mask = frame_ids[None, :] < lengths[:, None].to(hidden.device)
        if not output_layer_statistics:
            return hidden, mask
        return hidden, mask, torch.stack([frame_statistics(state.float(), mask) for state in states], dim=1)

    def _encode_clip_by_clip(
        self, samples: torch.Tensor, samples_mask: torch.Tensor, lengths: torch.Tensor, every_layer: bool
    ) -> tuple[torch.Tensor, ...]:
        """Group-norm encoders (wav2vec2-base, hubert-base) normalise each channel over the whole input, padding
        included, and take no attention mask: in a padded batch every clip's frames would depend on the others'
        lengths. Each clip runs alone on its own samples; the frames (of `every_layer`, or the output's) are padded
        back into a batch."""
        clips = []
        for clip, count in zip(samples, samples_mask.sum(-1), strict=True):
            output = self.audio_tower(clip[None, : int(count)], output_hidden_states=every_layer)
            clips.append(output.hidden_states if every_layer else (output.last_hidden_state,))
        frames = int(lengths.max())
        batches = []
        for layer in zip(*clips, strict=True):
            hidden = layer[0].new_zeros(len(layer), frames, layer[0].shape[-1])
            for index, clip_frames in enumerate(layer):
                hidden[index, : clip_frames.shape[1]] = clip_frames[0, :frames]
            batches.append(hidden)
        return tuple(batches)

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

    def _encoder_frames(
        self,
        input_features: torch.Tensor | None,
        input_features_mask: torch.Tensor | None,
        encoder_hidden_states: torch.Tensor | None,
        encoder_mask: torch.Tensor | None,
        encoder_layer_statistics: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """The encoder's frames, their mask and, for heads with `config.voice_layer_mix`, every layer's frame
        statistics (else None): computed from features, or given ahead of time in their stead (the training feature
        cache); None without audio."""
        if input_features is not None:
            if not self.config.voice_layer_mix:
                return (*self.encode_audio(input_features, input_features_mask), None)
            return self.encode_audio(input_features, input_features_mask, output_layer_statistics=True)
        if encoder_hidden_states is None:
            return None
        return encoder_hidden_states, encoder_mask, encoder_layer_statistics

    def voice_attribute_logits(
        self,
        encoder_hidden: torch.Tensor,
        encoder_mask: torch.Tensor,
        encoder_layer_statistics: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """[batch, values] logits of the voice-attribute heads (None without heads): on the statistics of frozen
        encoder outputs, or of every frozen layer's frames for heads with `config.voice_layer_mix`."""
        heads = self.multi_modal_projector.voice_attributes
        if heads is None:
            return None
        weight = heads.linear.weight
        if not self.config.voice_layer_mix:
            encoder_layer_statistics = frame_statistics(
                encoder_hidden.to(weight.device, weight.dtype), encoder_mask.to(weight.device)
            )[:, None]
        elif encoder_layer_statistics is None:
            raise ValueError(
                "this model's voice heads read every encoder layer (config.voice_layer_mix): with "
                "encoder_hidden_states, pass encoder_layer_statistics too (encode_audio(..., "
                "output_layer_statistics=True)), or pass input_features"
            )
        return heads(encoder_layer_statistics.to(weight.device, weight.dtype))

    def voice_embeddings(self, logits: torch.Tensor) -> torch.Tensor:
        """[batch, voice tokens, hidden]: the learned prompt, if any, then for each attribute the LLM's input
        embeddings of the words naming its values (a word of several tokens: their mean), weighted by the head's
        probabilities of those values."""
        table = self.get_input_embeddings().weight
        counts = self.config.voice_attribute_value_counts
        tokens = []
        for attribute_logits, entry in zip(
            logits.split(counts, dim=-1), self.config.voice_attributes, strict=True
        ):
            words = torch.stack(
                [table[torch.tensor(ids, device=table.device)].mean(0) for ids in entry["token_ids"]]
            )
            tokens.append(attribute_logits.softmax(-1).to(words.device, words.dtype) @ words)
        voice = torch.stack(tokens, dim=1)
        prompt = self.multi_modal_projector.voice_attributes.prompt
        if prompt is None:
            return voice
        prompt = prompt.to(voice.device, voice.dtype).expand(voice.shape[0], -1, -1)
        return torch.cat([prompt, voice], dim=1)

    # ---- merge ----------------------------------------------------------------------------------------------

    def get_placeholder_mask(
        self, input_ids: torch.LongTensor, audio_embeds: torch.Tensor | None
    ) -> torch.Tensor:
        """Where the audio placeholders are in `input_ids`, checked against the real audio embeddings that replace
        them in order (`audio_embeds`: [tokens, hidden], or None without audio)."""
        placeholder = input_ids == self.config.audio_token_id
        if audio_embeds is None:
            if placeholder.any():
                raise ValueError(
                    "input_ids contain audio placeholder tokens but no audio was given "
                    "(pass input_features and input_features_mask from the processor)."
                )
        elif audio_embeds.shape[0] != int(placeholder.sum()):
            raise ValueError(
                f"The prompt holds {int(placeholder.sum())} audio placeholder tokens but the audio gives "
                f"{audio_embeds.shape[0]} embeddings; build inputs with TinyAudioProcessor so the counts agree."
            )
        return placeholder

    def get_voice_placeholder_mask(
        self, input_ids: torch.LongTensor, voice_logits: torch.Tensor | None
    ) -> torch.Tensor:
        """Where the voice placeholders are in `input_ids`: in each row, none (a task that does not ask about the voice)
        or `config.voice_token_count` (the heads' logits, `voice_logits`, must then exist)."""
        placeholder = (
            torch.zeros_like(input_ids, dtype=torch.bool)
            if self.config.voice_token_id is None
            else input_ids == self.config.voice_token_id
        )
        if not placeholder.any():
            return placeholder
        if voice_logits is None:
            raise ValueError(
                "input_ids contain voice placeholder tokens but the model has no voice-attribute heads or no audio "
                "was given (build inputs with this checkpoint's TinyAudioProcessor)."
            )
        per_row = placeholder.sum(-1)
        expected = self.config.voice_token_count
        if not ((per_row == 0) | (per_row == expected)).all():
            raise ValueError(
                f"The prompts hold {per_row.tolist()} voice placeholder tokens per row, where the model gives "
                f"{expected} voice tokens (or none) per clip; build inputs with this checkpoint's TinyAudioProcessor."
            )
        return placeholder

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        input_features: torch.Tensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_mask: torch.Tensor | None = None,
        encoder_layer_statistics: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> TinyAudioCausalLMOutputWithPast:
        """The LLM over the prompt with the audio merged in. `encoder_hidden_states`/`encoder_mask` (and
        `encoder_layer_statistics`, for heads with `config.voice_layer_mix`) replace `input_features` when encoder
        outputs were computed ahead of time (the training feature cache)."""
        audio_embeds = audio_mask = voice_logits = None
        if inputs_embeds is None:
            frames = self._encoder_frames(
                input_features,
                input_features_mask,
                encoder_hidden_states,
                encoder_mask,
                encoder_layer_statistics,
            )
            real_audio = None
            if frames is not None:
                audio_embeds, audio_mask = self.project_audio(*frames[:2])
                real_audio = audio_embeds[audio_mask]
                voice_logits = self.voice_attribute_logits(*frames)
            placeholder = self.get_placeholder_mask(input_ids, real_audio)
            voice_placeholder = self.get_voice_placeholder_mask(input_ids, voice_logits)
            # The placeholder ids may lie outside the LLM's vocabulary: look up a harmless id instead.
            inputs_embeds = self.get_input_embeddings()(
                input_ids.masked_fill(placeholder | voice_placeholder, 0)
            )
            voice = None
            if voice_placeholder.any():  # the voice tokens of the rows whose prompts carry them
                voice = self.voice_embeddings(voice_logits[voice_placeholder.any(-1).to(voice_logits.device)])
            for mask, embeds in ((placeholder, real_audio), (voice_placeholder, voice)):
                if embeds is not None and mask.any():
                    inputs_embeds = inputs_embeds.masked_scatter(
                        mask[..., None].expand_as(inputs_embeds),
                        embeds.to(inputs_embeds.device, inputs_embeds.dtype),
                    )
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        return TinyAudioCausalLMOutputWithPast(
            **outputs, audio_embeds=audio_embeds, audio_mask=audio_mask, voice_attribute_logits=voice_logits
        )


class TinyAudioForConditionalGeneration(CheckpointMixin, LoraMixin, TinyAudioModel, GenerationMixin):
    """Speech recognition with a frozen encoder and a frozen LLM; only the projector (and optional LoRA) trains.

    It adds to `TinyAudioModel` the losses and generation; checkpoints (`CheckpointMixin`) and LoRA (`LoraMixin`)
    come from their own files. It extends the base model rather than holding it as `self.model`, so that weight
    names stay those of every published checkpoint.
    """

    def __init__(
        self,
        config: TinyAudioConfig,
        audio_tower: PreTrainedModel | None = None,
        language_model: PreTrainedModel | None = None,
    ):
        super().__init__(config, audio_tower=audio_tower, language_model=language_model)
        self._voice_adapter_set = False
        if config.lora_rank > 0:
            self._add_lora()
        if config.voice_lora_rank > 0:
            self._add_voice_adapter()
        self.freeze_pretrained()

    def extend_acoustic_capacity(
        self, encoder_trainable_layers: int = 0, projector_num_layers: int = 0
    ) -> None:
        """Trains more of the acoustic side in a continued run: more top encoder layers, more projector layers.

        New projector layers start as the identity; newly trained encoder layers keep their
        pretrained weights but from now on attend to real frames only. Nothing may be taken away: trained weights
        are never dropped.
        """
        config = self.config
        if (
            encoder_trainable_layers < config.encoder_trainable_layers
            or projector_num_layers < config.projector_num_layers
        ):
            raise ValueError(
                f"a continued run keeps the checkpoint's trained layers (encoder_trainable_layers "
                f"{config.encoder_trainable_layers}, projector_num_layers {config.projector_num_layers}); got "
                f"{encoder_trainable_layers} and {projector_num_layers}"
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

    def _keeps_setting(self, field: str, wanted: object) -> bool:
        """Whether the checkpoint already has `config.<field>` set (to `wanted`: a continued run cannot change it)."""
        current = getattr(self.config, field)
        if current and current != wanted:
            raise ValueError(
                f"this checkpoint's {field} is {current!r}; a continued run cannot change it to {wanted!r}"
            )
        return bool(current)

    def add_voice_attributes(self, voice_attributes: list[dict], voice_token_id: int) -> None:
        """Adds voice-attribute heads (`config.voice_attributes`) to a model without them, for a continued run; the
        processor must then add the voice tokens (`TinyAudioProcessor.from_config`)."""
        if self._keeps_setting("voice_attributes", voice_attributes):
            return
        self.config.voice_attributes, self.config.voice_token_id = voice_attributes, voice_token_id
        self.config.validate()
        self._new_voice_heads()

    def _new_voice_heads(self) -> VoiceAttributeHeads:
        """Freshly initialised heads as the config asks for them, beside the projector (its device and dtype)."""
        reference = self.multi_modal_projector.linear_1.weight
        heads = VoiceAttributeHeads.from_config(self.config)
        heads.apply(self._init_weights)
        self.multi_modal_projector.voice_attributes = heads.to(reference.device, reference.dtype)
        self.freeze_pretrained()
        return self.multi_modal_projector.voice_attributes

    def add_voice_prompt(self, length: int) -> None:
        """Adds a learned voice prompt of `length` embeddings (`config.voice_prompt_length`) to a model with voice
        heads, for a continued run; the processor must then count the voice tokens again
        (`TinyAudioProcessor.add_voice_tokens(config.voice_token_count)`). It starts as the LLM's embeddings of
        random vocabulary tokens, which a prompt learns from faster than from noise."""
        heads = self.multi_modal_projector.voice_attributes
        if heads is None:
            raise ValueError("a voice prompt opens the voice tokens: add voice_attributes first")
        if self._keeps_setting("voice_prompt_length", length):
            return
        table = self.get_input_embeddings().weight
        tokens = torch.randint(table.shape[0], (length,), device=table.device)
        heads.prompt = nn.Parameter(table[tokens].detach().to(heads.linear.weight.dtype).clone())
        self.config.voice_prompt_length = length
        self.config.validate()
        self.freeze_pretrained()

    def mix_voice_layers(self) -> None:
        """Gives a model with voice heads on the encoder's output new heads that read every frozen encoder layer
        (`config.voice_layer_mix`), for a continued run that trains them (`voice_attributes_only_steps`). The learned
        voice prompt stays; the heads start afresh, since their input is another."""
        old = self.multi_modal_projector.voice_attributes
        if old is None:
            raise ValueError(
                "voice_layer_mix is how the voice heads read the encoder: add voice_attributes first"
            )
        if self.config.voice_layer_mix:
            return
        self.config.voice_layer_mix = True
        self.config.validate()
        self._new_voice_heads().prompt = old.prompt

    # ---- losses -----------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        *,
        labels: torch.LongTensor | None = None,
        ctc_targets: torch.LongTensor | None = None,
        ctc_only: bool = False,
        voice_attribute_targets: torch.LongTensor | None = None,
        voice_attributes_only: bool = False,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        input_features: torch.Tensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs,
    ) -> TinyAudioCausalLMOutputWithPast:
        """`TinyAudioModel.forward` (its other inputs, such as cached encoder outputs, come through `kwargs`) and the
        training losses.

        With `labels`, logits are computed only where an answer token is predicted and the loss covers those
        positions only. With `ctc_targets` (each row's spoken tokens, padded with IGNORE_INDEX, as
        `training.collator.SpeechCollator` gives them) the loss adds `config.ctc_loss_weight` times the CTC loss of
        the projected audio (`ctc_loss`); `ctc_only` computes that alone and never runs the LLM (a warm-up). With
        `voice_attribute_targets` ([batch, attributes] value indices, IGNORE_INDEX where a clip's facts do not say)
        it adds `config.voice_attribute_loss_weight` times the heads' loss; `voice_attributes_only` computes that
        alone (their warm-up). The inputs named here are those `generate` looks for; all but `input_ids` are keywords,
        as their order differs from the base model's.
        """
        audio_inputs = {
            "input_features": input_features,
            "input_features_mask": input_features_mask,
            "encoder_hidden_states": kwargs.pop("encoder_hidden_states", None),
            "encoder_mask": kwargs.pop("encoder_mask", None),
            "encoder_layer_statistics": kwargs.pop("encoder_layer_statistics", None),
        }
        if voice_attributes_only:
            frames = self._encoder_frames(**audio_inputs)
            logits = self.voice_attribute_logits(*frames) if frames is not None else None
            loss = self._batch_share(
                self._voice_attribute_term(logits, voice_attribute_targets), labels, num_items_in_batch
            )
            return TinyAudioCausalLMOutputWithPast(
                loss=loss, voice_attribute_logits=logits, voice_attribute_loss=loss
            )
        if ctc_only:
            frames = self._encoder_frames(**audio_inputs)
            audio_embeds, audio_mask = self.project_audio(*frames[:2]) if frames is not None else (None, None)
            ctc = self._batch_share(
                self._ctc_term(audio_embeds, audio_mask, ctc_targets), labels, num_items_in_batch
            )
            return TinyAudioCausalLMOutputWithPast(
                loss=ctc, audio_embeds=audio_embeds, audio_mask=audio_mask, ctc_loss=ctc
            )
        if labels is not None:
            # Position t predicts token t + 1: keep only positions whose next token is part of the answer.
            targets = labels[:, 1:]
            keep = nn.functional.pad(targets != IGNORE_INDEX, (0, 1), value=False)
            logits_to_keep = keep
        with self.voice_adapter_for(input_ids):
            outputs = super().forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                logits_to_keep=logits_to_keep,
                **audio_inputs,
                **kwargs,
            )
        if ctc_targets is not None:
            ctc = self._ctc_term(outputs.audio_embeds, outputs.audio_mask, ctc_targets)
            outputs.ctc_loss = self._batch_share(ctc, labels, num_items_in_batch)
        if voice_attribute_targets is not None:
            voice = self._voice_attribute_term(outputs.voice_attribute_logits, voice_attribute_targets)
            outputs.voice_attribute_loss = self._batch_share(voice, labels, num_items_in_batch)
        if labels is None:
            return outputs

        answer_targets = targets[targets != IGNORE_INDEX].to(outputs.logits.device)
        loss = nn.functional.cross_entropy(outputs.logits.float(), answer_targets, reduction="sum")
        denominator = num_items_in_batch if num_items_in_batch is not None else max(answer_targets.numel(), 1)
        outputs.loss = loss / denominator
        if outputs.ctc_loss is not None:
            outputs.loss = outputs.loss + self.config.ctc_loss_weight * outputs.ctc_loss.to(
                outputs.loss.device
            )
        if outputs.voice_attribute_loss is not None:
            outputs.loss = outputs.loss + self.config.voice_attribute_loss_weight * (
                outputs.voice_attribute_loss.to(outputs.loss.device)
            )
        return outputs

    @staticmethod
    def _batch_share(
        loss: torch.Tensor, labels: torch.LongTensor | None, num_items_in_batch: int | torch.Tensor | None
    ) -> torch.Tensor:
        """A per-batch mean scaled by the share of the accumulated batch (`num_items_in_batch`) that this batch's
        answer tokens hold, as the next-token loss is: summed over accumulation, it stays a mean."""
        if labels is not None and num_items_in_batch is not None:
            loss = loss * (labels[:, 1:] != IGNORE_INDEX).sum().to(loss.device) / num_items_in_batch
        return loss

    def _voice_attribute_term(
        self, logits: torch.Tensor | None, voice_attribute_targets: torch.LongTensor | None
    ) -> torch.Tensor:
        """The heads' loss: the mean over attributes of their cross-entropy on the clips whose facts state them."""
        if logits is None or voice_attribute_targets is None:
            raise ValueError(
                "the voice-attribute loss needs voice-attribute heads (config.voice_attributes), the audio and "
                "voice_attribute_targets"
            )
        counts = self.config.voice_attribute_value_counts
        targets = voice_attribute_targets.to(logits.device)
        terms = [
            nn.functional.cross_entropy(attribute_logits.float(), target, ignore_index=IGNORE_INDEX)
            for attribute_logits, target in zip(logits.split(counts, dim=-1), targets.unbind(-1), strict=True)
            if (target != IGNORE_INDEX).any()
        ]
        return torch.stack(terms).mean() if terms else logits.sum() * 0

    def _ctc_term(
        self,
        audio_embeds: torch.Tensor | None,
        audio_mask: torch.Tensor | None,
        ctc_targets: torch.LongTensor | None,
    ) -> torch.Tensor:
        """The CTC loss of the projected audio: a mean per spoken token (the batch's share is `_batch_share`)."""
        if ctc_targets is None or audio_embeds is None:
            raise ValueError(
                "the CTC loss needs ctc_targets and the audio (input_features or encoder outputs)"
            )
        if self.config.ctc_blank_token_id is None:
            raise ValueError(
                "the CTC loss needs config.ctc_blank_token_id, the token CTC blank frames stand for"
            )
        embeddings = self.get_input_embeddings().weight
        return embedding_ctc_loss(
            audio_embeds, audio_mask, embeddings, ctc_targets, self.config.ctc_blank_token_id
        )

    # ---- generation -----------------------------------------------------------------------------------------

    def generate(
        self,
        *args,
        ctc_weight: float | None = None,
        ctc_top_k: int = 8,
        loop_guard: bool | None = None,
        **kwargs,
    ) -> torch.LongTensor:
        """`GenerationMixin.generate` with Tiny Audio's decoding policy, so that `generate` and the pipeline give the
        same text. Its defaults live in the generation config (`generation_config.json`) beside the library's own:

        - with audio and no `max_new_tokens` argument, a budget of `max_new_tokens` plus
          `max_new_tokens_per_second` for each second of the longest clip (`new_token_budget`);
        - joint CTC/attention decoding when `ctc_weight` (default: the generation config's `ctc_decoding_weight`
          when there is audio, so text-only prompts still work) is above 0;
        - the repetition-loop guard (default: on when there is audio): a row that falls into a loop stops, and the
          loop past one copy of its unit is replaced by padding (decode with ``skip_special_tokens=True``).
        """
        config = kwargs.get("generation_config") or self.generation_config
        features_mask = kwargs.get("input_features_mask")
        if "max_new_tokens" not in kwargs and features_mask is not None:
            seconds = self.feature_seconds(features_mask).max().item()
            budget = new_token_budget(config, seconds)
            if budget is not None:
                kwargs["max_new_tokens"] = budget
        has_audio = any(kwargs.get(key) is not None for key in ("input_features", "encoder_hidden_states"))
        if ctc_weight is None:
            # A caller's own generation config without the field keeps the model's weight.
            default = getattr(self.generation_config, "ctc_decoding_weight", 0.0)
            ctc_weight = getattr(config, "ctc_decoding_weight", default) if has_audio else 0.0
        if ctc_weight:
            kwargs = self._with_ctc_scorer(kwargs, ctc_weight, ctc_top_k)
        if loop_guard is None:
            loop_guard = has_audio
        prompt = kwargs.get("input_ids", args[0] if args else None)
        if not loop_guard:
            with self.voice_adapter_for(prompt):
                return super().generate(*args, **kwargs)
        kwargs["stopping_criteria"] = StoppingCriteriaList(
            [RepetitionLoopGuard(), *kwargs.get("stopping_criteria", [])]
        )
        with self.voice_adapter_for(prompt):
            output = super().generate(*args, **kwargs)
        prompt_length = prompt.shape[1]
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
            frames = self._encoder_frames(
                kwargs.pop("input_features"), kwargs.pop("input_features_mask"), None, None
            )
            kwargs["encoder_hidden_states"], kwargs["encoder_mask"], kwargs["encoder_layer_statistics"] = (
                frames
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

    def prepare_inputs_for_generation(
        self,
        *args,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_mask: torch.Tensor | None = None,
        encoder_layer_statistics: torch.Tensor | None = None,
        is_first_iteration: bool = False,
        **kwargs,
    ) -> dict:
        """The library's inputs. Encoder outputs computed ahead of time stand in for `input_features`, so like them
        (which the library drops after the prompt) they go to the prompt's forward only."""
        inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if is_first_iteration or not kwargs.get("use_cache", True):
            inputs.update(
                encoder_hidden_states=encoder_hidden_states,
                encoder_mask=encoder_mask,
                encoder_layer_statistics=encoder_layer_statistics,
            )
        return inputs

    # Private: GenerationMixin has no public hook around the prompt's forward; tests/test_core.py
    # (test_beam_search_prefills_each_clip_once) pins that the override gives the library's beams and scores.
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


__all__ = [
    "TinyAudioForConditionalGeneration",
    "TinyAudioModel",
    "TinyAudioPreTrainedModel",
    "TinyAudioProjector",
]
