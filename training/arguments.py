"""The arguments of `train.py` beyond transformers' TrainingArguments: the model to build, its data, the run.

`train.py` parses them (with TrainingArguments) from a YAML file and flags; `training.run` trains from them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from configuration_tiny_audio import DEFAULT_AUDIO_MODEL_ID, DEFAULT_TEXT_MODEL_ID


def option(default: Any, help: str, **argparse_options: Any) -> Any:
    """A field with its `--help` text (and any other argparse option, such as nargs), as HfArgumentParser reads it."""
    return dataclasses.field(default=default, metadata={"help": help, **argparse_options})


@dataclasses.dataclass
class ModelArguments:
    """Which encoder and LLM to join, and the projector / LoRA to train between them."""

    model_name_or_path: str | None = option(
        None, "Start from this Tiny Audio checkpoint instead of a fresh projector"
    )
    audio_model_id: str = DEFAULT_AUDIO_MODEL_ID
    text_model_id: str = DEFAULT_TEXT_MODEL_ID
    projector_downsample: int = 4
    projector_hidden_size: int | None = None
    projector_num_layers: int | None = option(
        None,
        "Transformer layers in the projector, at the encoder's width (0 = none); with "
        "model_name_or_path, adds layers that start as the identity",
    )
    projector_output_norm: bool = option(
        False, "An RMS norm on the projector's output, started at the LLM embeddings' scale (new models)"
    )
    encoder_trainable_layers: int | None = option(
        None,
        "Top layers of the (Whisper) encoder that train with the projector; the feature cache then "
        "holds the output of the layers below them",
    )
    encoder_real_length: bool | None = option(
        None,
        "Run a Whisper encoder on the clip's frames, not its 30-s window (about 10x cheaper on 3-s clips; "
        "other frames than Whisper was trained on); default: keep the starting checkpoint's, off for a new model",
    )
    lora_rank: int = option(0, "LoRA rank on the LLM; 0 = LLM untouched")
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = option(
        None,
        "LLM modules LoRA adapts (default q_proj v_proj); with model_name_or_path, adds modules",
        nargs="+",
    )
    attn_implementation: str = option(
        "auto", "LLM attention kernel; auto = eager on CPU (faster than SDPA there for short sequences)"
    )
    prefix_cache: bool = option(
        True, "Reuse the keys/values of the prompt text before the audio (frozen LLM)"
    )
    frozen_dtype: str = option(
        "auto", "dtype of the frozen encoder/LLM weights: auto (bf16 with --bf16), float32, bfloat16"
    )
    ctc_weight: float = option(
        0.0,
        "Weight of the auxiliary CTC loss tying audio frames to the LLM's token embeddings "
        "(decoding_tiny_audio.embedding_ctc_loss); 0 = off",
    )
    ctc_only_steps: int = option(
        0, "First steps trained on the CTC loss alone, without running the LLM (fast warm-up)"
    )
    ctc_blank_token: str = option(" ", "Token whose embedding CTC blank frames are pulled onto")
    ctc_decoding_weight: float | None = option(
        None,
        "CTC share of each decoding step's score in the saved model's generation_config.json (joint "
        "CTC/attention decoding; needs the CTC loss); default: keep the starting checkpoint's, 0 for a new model",
    )
    mask_time_prob: float | None = option(
        None,
        "SpecAugment in training: about this share of the encoder's real frames is zeroed, in spans "
        "of mask_time_length frames; default: keep the starting checkpoint's, 0 (off) for a new model",
    )
    mask_time_length: int | None = None
    mask_feature_prob: float | None = option(
        None, "SpecAugment: share of encoder channels zeroed, in spans of mask_feature_length"
    )
    mask_feature_length: int | None = None
    voice_attributes: str | None = option(
        None,
        "Voice-attribute heads and tokens (the describe task), YAML/JSON {attribute: {value: word}}, e.g. "
        "{gender: {female: woman, male: man}}: each head learns the values from the rows' facts, and the LLM "
        "reads its answer as the embedding of the words; with model_name_or_path, adds them",
    )
    voice_attribute_loss_weight: float | None = option(
        None, "Weight of the voice-attribute heads' loss; default: the checkpoint's, 1 for a new model"
    )
    voice_attributes_only_steps: int = option(
        0,
        "First steps trained on the voice-attribute heads' loss alone, without running the LLM (their "
        "warm-up: they learn from many more clips than the LLM has time for)",
    )
    voice_layer_mix: bool = option(
        False,
        "The voice-attribute heads read the frames after every frozen encoder layer, each attribute through "
        "its own learned mix of the layers, instead of the encoder's output alone; with model_name_or_path, "
        "gives its heads that input (they start afresh: train them, e.g. with voice_attributes_only_steps)",
    )
    voice_prompt_length: int = option(
        0,
        "Learned embeddings (prompt tuning) before the voice tokens in the prompts of the voice tasks; with "
        "model_name_or_path, adds them",
    )
    voice_lora_rank: int = option(
        0,
        "Rank of a LoRA adapter on the LLM that only the prompts of the voice tasks turn on (on "
        "lora_target_modules); with model_name_or_path, adds it",
    )
    train_voice_only: bool = option(
        False,
        "Train the voice path alone (the heads, the voice prompt and the voice adapter): everything "
        "transcription uses stays frozen, so the model transcribes exactly as before",
    )
    task_prompts: str | None = option(
        None,
        "Instructions per task, YAML/JSON {task: prompt}: added to (or replacing) the model's own, and "
        "saved with it; a dataset's `task` picks one",
    )
    num_beams: int | None = option(
        None,
        "Beams the saved model decodes with (its generation_config.json); default: keep the starting "
        "checkpoint's, 1 (greedy) for a new model",
    )


@dataclasses.dataclass
class DataArguments:
    """Where the audio comes from and how it is prepared."""

    train_datasets: str = option(
        "speechbrain/LoquaciousSet",
        "Hub id / folder / manifest, or a YAML/JSON list of dataset specs (see training/data.py)",
    )
    eval_datasets: str | None = None
    task_weights: str | None = option(
        None,
        "Share of the training rows per task, YAML/JSON {task: share}, e.g. {transcribe: 0.8, describe: "
        "0.2}; default: the datasets' own weights decide",
    )
    max_eval_samples: int = 64
    wer_eval_samples: int = option(32, "Eval clips transcribed by generation for the WER (0 = loss only)")
    feature_cache_dir: str | None = option(
        None, "Cache the frozen encoder's outputs here and train from them"
    )
    feature_cache_batch_size: int = 16
    max_audio_seconds: float | None = option(None, "Skip longer clips (default: the encoder window)")
    preprocessing_num_workers: int | None = None
    shuffle_buffer_size: int = 1000
    datasets_cache_dir: str | None = None


@dataclasses.dataclass
class RunArguments:
    """Run control beyond TrainingArguments."""

    resume: bool = option(False, "Continue this run from its newest complete checkpoint in output_dir")
    overwrite_output_dir: bool = option(
        False,
        "Train in an output_dir that holds another run or a finished one: its checkpoints and weights "
        "are removed first",
    )
    push_to_hub_repo: str | None = option(None, "Push the final checkpoint and its code to this Hub repo")
    hub_private: bool = False
