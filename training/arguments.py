"""The arguments of `train.py` beyond transformers' TrainingArguments: the model to build, its data, the run.

`train.py` parses them (with TrainingArguments) from a YAML file and flags; `training.run` trains from them.
"""

from __future__ import annotations

import dataclasses

from configuration_tiny_audio import DEFAULT_AUDIO_MODEL_ID, DEFAULT_TEXT_MODEL_ID


@dataclasses.dataclass
class ModelArguments:
    """Which encoder and LLM to join, and the projector / LoRA to train between them."""

    model_name_or_path: str | None = dataclasses.field(
        default=None, metadata={"help": "Start from this Tiny Audio checkpoint instead of a fresh projector"}
    )
    audio_model_id: str = DEFAULT_AUDIO_MODEL_ID
    text_model_id: str = DEFAULT_TEXT_MODEL_ID
    projector_downsample: int = 4
    projector_hidden_size: int | None = None
    projector_num_layers: int | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Transformer layers in the projector, at the encoder's width (0 = none); with "
            "model_name_or_path, adds layers that start as the identity"
        },
    )
    projector_output_norm: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "An RMS norm on the projector's output, started at the LLM embeddings' scale (new models)"
        },
    )
    encoder_trainable_layers: int | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Top layers of the (Whisper) encoder that train with the projector; the feature cache then "
            "holds the output of the layers below them"
        },
    )
    encoder_real_length: bool | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Run a Whisper encoder on the clip's frames, not its 30-s window (about 10x cheaper on 3-s clips; "
            "other frames than Whisper was trained on); default: keep the starting checkpoint's, off for a new model"
        },
    )
    lora_rank: int = dataclasses.field(
        default=0, metadata={"help": "LoRA rank on the LLM; 0 = LLM untouched"}
    )
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = dataclasses.field(
        default=None,
        metadata={
            "help": "LLM modules LoRA adapts (default q_proj v_proj); with model_name_or_path, adds modules",
            "nargs": "+",
        },
    )
    attn_implementation: str = dataclasses.field(
        default="auto",
        metadata={
            "help": "LLM attention kernel; auto = eager on CPU (faster than SDPA there for short sequences)"
        },
    )
    prefix_cache: bool = dataclasses.field(
        default=True,
        metadata={"help": "Reuse the keys/values of the prompt text before the audio (frozen LLM)"},
    )
    frozen_dtype: str = dataclasses.field(
        default="auto",
        metadata={
            "help": "dtype of the frozen encoder/LLM weights: auto (bf16 with --bf16), float32, bfloat16"
        },
    )
    ctc_weight: float = dataclasses.field(
        default=0.0,
        metadata={
            "help": "Weight of the auxiliary CTC loss tying audio frames to the LLM's token embeddings "
            "(decoding_tiny_audio.embedding_ctc_loss); 0 = off"
        },
    )
    ctc_only_steps: int = dataclasses.field(
        default=0,
        metadata={
            "help": "First steps trained on the CTC loss alone, without running the LLM (fast warm-up)"
        },
    )
    ctc_blank_token: str = dataclasses.field(
        default=" ", metadata={"help": "Token whose embedding CTC blank frames are pulled onto"}
    )
    ctc_decoding_weight: float | None = dataclasses.field(
        default=None,
        metadata={
            "help": "CTC share of each decoding step's score in the saved model's generation_config.json (joint "
            "CTC/attention decoding; needs the CTC loss); default: keep the starting checkpoint's, 0 for a new model"
        },
    )
    mask_time_prob: float | None = dataclasses.field(
        default=None,
        metadata={
            "help": "SpecAugment in training: about this share of the encoder's real frames is zeroed, in spans "
            "of mask_time_length frames; default: keep the starting checkpoint's, 0 (off) for a new model"
        },
    )
    mask_time_length: int | None = None
    mask_feature_prob: float | None = dataclasses.field(
        default=None,
        metadata={"help": "SpecAugment: share of encoder channels zeroed, in spans of mask_feature_length"},
    )
    mask_feature_length: int | None = None
    voice_attributes: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Voice-attribute heads and tokens (the describe task), YAML/JSON {attribute: {value: word}}, e.g. "
            "{gender: {female: woman, male: man}}: each head learns the values from the rows' facts, and the LLM "
            "reads its answer as the embedding of the words; with model_name_or_path, adds them"
        },
    )
    voice_attribute_loss_weight: float | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Weight of the voice-attribute heads' loss; default: the checkpoint's, 1 for a new model"
        },
    )
    voice_attributes_only_steps: int = dataclasses.field(
        default=0,
        metadata={
            "help": "First steps trained on the voice-attribute heads' loss alone, without running the LLM (their "
            "warm-up: they learn from many more clips than the LLM has time for)"
        },
    )
    task_prompts: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Instructions per task, YAML/JSON {task: prompt}: added to (or replacing) the model's own, and "
            "saved with it; a dataset's `task` picks one"
        },
    )
    num_beams: int | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Beams the saved model decodes with (its generation_config.json); default: keep the starting "
            "checkpoint's, 1 (greedy) for a new model"
        },
    )


@dataclasses.dataclass
class DataArguments:
    """Where the audio comes from and how it is prepared."""

    train_datasets: str = dataclasses.field(
        default="speechbrain/LoquaciousSet",
        metadata={
            "help": "Hub id / folder / manifest, or a YAML/JSON list of dataset specs (see training/data.py)"
        },
    )
    eval_datasets: str | None = None
    task_weights: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Share of the training rows per task, YAML/JSON {task: share}, e.g. {transcribe: 0.8, describe: "
            "0.2}; default: the datasets' own weights decide"
        },
    )
    max_eval_samples: int = 64
    wer_eval_samples: int = dataclasses.field(
        default=32, metadata={"help": "Eval clips transcribed by generation for the WER (0 = loss only)"}
    )
    feature_cache_dir: str | None = dataclasses.field(
        default=None, metadata={"help": "Cache the frozen encoder's outputs here and train from them"}
    )
    feature_cache_batch_size: int = 16
    max_audio_seconds: float | None = dataclasses.field(
        default=None, metadata={"help": "Skip longer clips (default: the encoder window)"}
    )
    preprocessing_num_workers: int | None = None
    shuffle_buffer_size: int = 1000
    datasets_cache_dir: str | None = None


@dataclasses.dataclass
class RunArguments:
    """Run control beyond TrainingArguments."""

    resume: bool = dataclasses.field(
        default=False,
        metadata={"help": "Continue this run from its newest complete checkpoint in output_dir"},
    )
    overwrite_output_dir: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "Train in an output_dir that holds another run or a finished one: its checkpoints and weights "
            "are removed first"
        },
    )
    push_to_hub_repo: str | None = dataclasses.field(
        default=None, metadata={"help": "Push the final checkpoint and its code to this Hub repo"}
    )
    hub_private: bool = False
