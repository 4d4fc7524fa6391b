"""Configuration of Tiny Audio: a frozen audio encoder, a small trainable projector and a frozen causal LM."""

from __future__ import annotations

import math

import torch
from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

# Defaults describe the course model: Whisper large-v3-turbo's encoder and SmolLM3-3B.
DEFAULT_AUDIO_MODEL_ID = "openai/whisper-large-v3-turbo"
DEFAULT_TEXT_MODEL_ID = "HuggingFaceTB/SmolLM3-3B"

DEFAULT_TASK_PROMPTS = {
    "transcribe": "Transcribe the speech.",
    "describe": "Describe the audio.",
    "emotion": "What emotion does the speaker express?",
}

# The tasks whose prompts carry the voice tokens (TinyAudioConfig.voice_attributes).
DEFAULT_VOICE_TASKS = ("describe",)

# Kernel, stride and padding of an encoder's convolutional front end, as (k, s, p) triples.
ConvLayers = list[tuple[int, int, int]]
# Whisper's encoder: two convolutions over log-mel frames, the second halving them.
WHISPER_CONV_LAYERS: ConvLayers = [(3, 1, 1), (3, 2, 1)]
# Samples between Whisper's log-mel frames (10 ms at 16 kHz).
WHISPER_HOP_LENGTH = 160


def encoder_conv_layers(audio_config: PreTrainedConfig) -> ConvLayers:
    """The convolutions that turn feature frames (Whisper mel frames, or wav2vec-style samples) into encoder frames."""
    if audio_config.model_type == "whisper":
        return list(WHISPER_CONV_LAYERS)
    if hasattr(audio_config, "conv_kernel") and hasattr(audio_config, "conv_stride"):
        return [(k, s, 0) for k, s in zip(audio_config.conv_kernel, audio_config.conv_stride, strict=True)]
    raise ValueError(
        f"Unsupported audio encoder type {audio_config.model_type!r}: Tiny Audio supports Whisper and "
        "wav2vec 2.0-style encoders (wav2vec2, hubert, wavlm, data2vec-audio)."
    )


def audio_token_lengths(
    feature_lengths: torch.Tensor, conv_layers: ConvLayers, downsample: int
) -> torch.Tensor:
    """Number of audio tokens the LLM sees for clips with `feature_lengths` real feature frames.

    This is the single place that maps audio length to token count: the processor uses it to expand the
    placeholder and the model uses it to select the projector outputs that belong to real audio.
    """
    return projector_token_lengths(encoder_frame_lengths(feature_lengths, conv_layers), downsample)


def encoder_frame_lengths(feature_lengths: torch.Tensor, conv_layers: ConvLayers) -> torch.Tensor:
    """Encoder frames that hold real audio, from the real feature frames (conv output-length arithmetic)."""
    lengths = feature_lengths.long()
    for kernel, stride, padding in conv_layers:
        lengths = torch.div(lengths + 2 * padding - kernel, stride, rounding_mode="floor") + 1
    return lengths.clamp(min=0)


def projector_token_lengths(encoder_lengths: torch.Tensor, downsample: int) -> torch.Tensor:
    """Audio tokens the projector makes from real encoder frames (its strided conv rounds up)."""
    return torch.div(encoder_lengths + downsample - 1, downsample, rounding_mode="floor")


def feature_frames_per_token(conv_layers: ConvLayers, downsample: int) -> int:
    """Feature frames one audio token advances by: the stride of `audio_token_lengths` (its convolutions' strides
    times the projector's downsampling), so token i covers feature frames [i * this, (i + 1) * this)."""
    return math.prod(stride for _, stride, _ in conv_layers) * downsample


@strict
class TinyAudioConfig(PreTrainedConfig):
    """Configuration of `TinyAudioForConditionalGeneration`.

    `audio_config` / `text_config` describe the encoder and the LLM (any encoder/causal-LM config, rebuilt
    through `AutoConfig`); `audio_model_id` / `text_model_id` say where their pretrained weights live (a Hub id
    or a local folder), so a checkpoint only needs to store the projector; `audio_model_revision` /
    `text_model_revision` pin the commits it was trained on.
    """

    model_type = "tiny_audio"
    sub_configs_defaults = {
        "audio_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="whisper",
            init_kwargs={
                "d_model": 1280,
                "encoder_layers": 32,
                "encoder_attention_heads": 20,
                "encoder_ffn_dim": 5120,
                "decoder_layers": 4,
                "decoder_attention_heads": 20,
                "decoder_ffn_dim": 5120,
                "num_mel_bins": 128,
                "vocab_size": 51866,
            },
        ),
        "text_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="smollm3",
            init_kwargs={
                "hidden_size": 2048,
                "intermediate_size": 11008,
                "num_hidden_layers": 36,
                "num_attention_heads": 16,
                "num_key_value_heads": 4,
                "vocab_size": 128256,
                "tie_word_embeddings": True,
            },
        ),
    }

    audio_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    audio_model_id: str = DEFAULT_AUDIO_MODEL_ID
    text_model_id: str = DEFAULT_TEXT_MODEL_ID
    # The commits of those Hub repositories the model was built on (None: a local folder, or the default branch).
    audio_model_revision: str | None = None
    text_model_revision: str | None = None
    # Projector: strided 1-D convolution (time / projector_downsample), then Linear -> act -> Linear.
    projector_downsample: int = 4
    projector_hidden_size: int | None = None
    projector_activation: str = "gelu"
    # Acoustic capacity for small encoders (0/False = the plain projector above, the encoder wholly frozen):
    # transformer layers after the projector's conv, at the encoder's width and the projector's frame rate; an
    # RMS norm that puts the projector's output on the scale of the LLM's input embeddings; and the encoder's top
    # layers trained with the projector (Whisper encoders; they then attend to real audio frames only).
    projector_num_layers: int = 0
    projector_output_norm: bool = False
    # Voice attributes (the describe task): heads that classify the clip from its encoder frames' mean and spread,
    # one per attribute, and one voice token per attribute after the audio, the mixture of the LLM's own embeddings
    # of the words naming its values, weighted by the head's probabilities. A list, in the order of the heads and
    # tokens, of {"attribute": name, "values": [value, ...], "token_ids": [token ids of the word naming each value]},
    # e.g. {"attribute": "gender", "values": ["female", "male"], "token_ids": [[" woman" ids], [" man" ids]]}
    # (lists: a saved config sorts the keys of a mapping); None = off. The heads train on the `facts` of each clip
    # (training.collator) with weight `voice_attribute_loss_weight`. Only the prompts of `voice_tasks` carry the
    # voice tokens: a transcript must not pick up words that were never said. `voice_prompt_length` learned embeddings
    # (prompt tuning) open the voice tokens: trained alone with the heads (train.py --train_voice_only), they teach
    # the voice tasks to a model whose transcription then stays exactly as it was. `voice_lora_rank` adds a second
    # LoRA adapter on the LLM (on `lora_target_modules`), active only for prompts of `voice_tasks`: the LLM learns to
    # read the voice tokens while transcription still never runs it. `voice_layer_mix` has the heads read the frames
    # after every frozen encoder layer (and its input layer) instead of its output alone, each attribute through its
    # own learned mix of the layers: the feature cache keeps each clip's per-layer mean and spread for them.
    voice_attributes: list | None = None
    voice_layer_mix: bool = False
    voice_attribute_loss_weight: float = 1.0
    voice_tasks: list | None = None
    voice_prompt_length: int = 0
    voice_lora_rank: int = 0
    encoder_trainable_layers: int = 0
    # Whisper reads a 30-s window whatever the clip's length; True runs it on the longest clip's frames only (its
    # frames attending to real audio only): far cheaper on short clips, but not the frames Whisper was trained on.
    encoder_real_length: bool = False
    # Prompting: the placeholder the processor expands to one token per audio embedding.
    audio_token: str = "<audio>"
    audio_token_id: int | None = None
    voice_token: str = "<voice>"
    voice_token_id: int | None = None
    task_prompts: dict | None = None
    default_task: str = "transcribe"
    # Optional LoRA on the LLM (rank 0 = off: the LLM stays exactly the pretrained one).
    lora_rank: int = 0
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list | None = None
    # SpecAugment in training only, on the encoder's output frames (the encoder is frozen and its outputs may be
    # cached, so its input cannot be masked): spans of frames and of channels are zeroed; 0 = off.
    mask_time_prob: float = 0.0
    mask_time_length: int = 10
    mask_feature_prob: float = 0.0
    mask_feature_length: int = 10
    # Audio limits. How the model decodes (beams, the CTC share, the budget of new tokens) lives in its generation
    # config: checkpoint_tiny_audio.default_generation_config.
    sampling_rate: int = 16000
    max_audio_seconds: float = 30.0
    # The CTC head (decoding_tiny_audio): the token its blank frames stand for (None: the model has no CTC head) and
    # the weight of the auxiliary CTC loss in training (0 = off).
    ctc_blank_token_id: int | None = None
    ctc_loss_weight: float = 0.0
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.task_prompts is None:
            self.task_prompts = dict(DEFAULT_TASK_PROMPTS)
        if self.lora_target_modules is None:
            self.lora_target_modules = ["q_proj", "v_proj"]
        if self.voice_tasks is None:
            self.voice_tasks = list(DEFAULT_VOICE_TASKS)
        super().__post_init__(**kwargs)
        if self.projector_hidden_size is None:
            self.projector_hidden_size = self.text_config.hidden_size
        if self.default_task not in self.task_prompts:
            raise ValueError(
                f"default_task {self.default_task!r} is not one of the task prompts {list(self.task_prompts)}"
            )

    def validate_acoustic_capacity(self) -> None:
        """Part of the config's strict validation: the trainable encoder layers exist and can be split off."""
        encoder_layers = self.audio_config.num_hidden_layers
        if not 0 <= self.encoder_trainable_layers <= encoder_layers:
            raise ValueError(
                f"encoder_trainable_layers must be between 0 and the encoder's {encoder_layers} layers, "
                f"got {self.encoder_trainable_layers}"
            )
        if self.encoder_trainable_layers and self.audio_config.model_type != "whisper":
            raise ValueError(
                "encoder_trainable_layers trains the top layers of Whisper encoders only; this encoder is "
                f"{self.audio_config.model_type!r} (set it to 0)"
            )
        if self.encoder_real_length and self.audio_config.model_type != "whisper":
            raise ValueError(
                "encoder_real_length shortens Whisper's 30-s window; this encoder is "
                f"{self.audio_config.model_type!r}, which reads the real length already"
            )
        if self.projector_num_layers < 0:
            raise ValueError(f"projector_num_layers must be 0 or more, got {self.projector_num_layers}")

    def validate_voice_attributes(self) -> None:
        """Part of the config's strict validation: every attribute has two values or more, each named by tokens of
        the LLM."""
        vocab_size = self.text_config.vocab_size
        for index, entry in enumerate(self.voice_attributes or []):
            if (
                not isinstance(entry, dict)
                or set(entry) != {"attribute", "values", "token_ids"}
                or len(entry["values"]) < 2
                or len(entry["token_ids"]) != len(entry["values"])
            ):
                raise ValueError(
                    f"voice_attributes[{index}] must be {{'attribute': name, 'values': [two or more], 'token_ids': "
                    f"[token ids of each value's word]}}, got {entry!r}"
                )
            for value, token_ids in zip(entry["values"], entry["token_ids"], strict=True):
                if not token_ids or not all(isinstance(i, int) and 0 <= i < vocab_size for i in token_ids):
                    raise ValueError(
                        f"voice_attributes[{index}] ({entry['attribute']}): the word of {value!r} must be token ids "
                        f"of the LLM's {vocab_size}, got {token_ids!r}"
                    )
        if self.voice_attributes and self.voice_token_id is None:
            raise ValueError("voice_attributes need voice_token_id, the placeholder of the voice tokens")
        if not isinstance(self.voice_prompt_length, int) or self.voice_prompt_length < 0:
            raise ValueError(
                f"voice_prompt_length must be a whole number >= 0, got {self.voice_prompt_length!r}"
            )
        if self.voice_prompt_length and not self.voice_attributes:
            raise ValueError("voice_prompt_length opens the voice tokens: it needs voice_attributes")
        if not isinstance(self.voice_lora_rank, int) or self.voice_lora_rank < 0:
            raise ValueError(f"voice_lora_rank must be a whole number >= 0, got {self.voice_lora_rank!r}")
        if self.voice_layer_mix and not self.voice_attributes:
            raise ValueError(
                "voice_layer_mix is how the voice heads read the encoder: it needs voice_attributes"
            )
        if self.voice_lora_rank and not self.voice_attributes:
            raise ValueError("voice_lora_rank adapts the LLM to the voice tokens: it needs voice_attributes")

    @property
    def voice_attribute_values(self) -> list[list[str]]:
        """The values of each voice attribute, in the order of the heads' logits."""
        return [list(entry["values"]) for entry in self.voice_attributes or []]

    @property
    def voice_token_count(self) -> int:
        """Voice placeholders in a prompt of `voice_tasks`: the learned prompt, then one per attribute (0 without)."""
        return self.voice_prompt_length + len(self.voice_attributes) if self.voice_attributes else 0

    @property
    def voice_attribute_value_counts(self) -> list[int]:
        """How many values each voice attribute has: the widths of the heads' logits, attribute by attribute."""
        return [len(values) for values in self.voice_attribute_values]

    def validate_ctc(self) -> None:
        """Part of the config's strict validation: the CTC loss needs the CTC head's blank token."""
        vocab_size = self.text_config.vocab_size
        if self.ctc_blank_token_id is not None and not 0 <= self.ctc_blank_token_id < vocab_size:
            raise ValueError(
                f"ctc_blank_token_id {self.ctc_blank_token_id} is not a token of the LLM's {vocab_size}"
            )
        if self.ctc_loss_weight < 0:
            raise ValueError(f"ctc_loss_weight must not be negative, got {self.ctc_loss_weight}")
        if self.ctc_loss_weight > 0 and self.ctc_blank_token_id is None:
            raise ValueError(
                f"ctc_loss_weight {self.ctc_loss_weight} needs a CTC head (ctc_blank_token_id): train with the CTC "
                "loss (train.py --ctc_weight > 0), or start from a checkpoint that was"
            )

    @property
    def encoder_conv_layers(self) -> ConvLayers:
        return encoder_conv_layers(self.audio_config)

    @property
    def frozen_encoder_layers(self) -> int:
        """Encoder layers that stay frozen: their output is what the training feature cache stores."""
        return self.audio_config.num_hidden_layers - self.encoder_trainable_layers

    @property
    def encoder_statistics_layers(self) -> int:
        """The stages whose frames `TinyAudioModel.encode_audio` summarises for the voice heads: the encoder's input
        layer and each frozen layer."""
        return self.frozen_encoder_layers + 1

    @property
    def feature_frame_seconds(self) -> float:
        """Audio time one feature frame stands for: a Whisper mel frame (one hop) or one raw sample."""
        hop = WHISPER_HOP_LENGTH if self.audio_config.model_type == "whisper" else 1
        return hop / self.sampling_rate

    @property
    def audio_token_seconds(self) -> float:
        """Audio time one audio token (one projected frame, one CTC frame) covers: 80 ms for Whisper with the
        default downsampling."""
        return self.feature_frame_seconds * feature_frames_per_token(
            self.encoder_conv_layers, self.projector_downsample
        )


__all__ = [
    "TinyAudioConfig",
    "audio_token_lengths",
    "encoder_conv_layers",
    "encoder_frame_lengths",
    "feature_frames_per_token",
    "projector_token_lengths",
]
