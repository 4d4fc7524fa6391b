"""One training run, from checked arguments to the saved (and optionally pushed) model.

`train.py` parses the command line into the argument dataclasses; `train` then checks them, builds the model, loads
the data, runs the Trainer and saves. Everything that can fail without a model fails first (PreflightError).
"""

from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path

import torch
import yaml
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from checkpoint_tiny_audio import AUDIO_TOWER_PREFIX, PROJECTOR_PREFIX
from configuration_tiny_audio import DEFAULT_TASK_PROMPTS
from lora_tiny_audio import LORA_MARKER, is_voice_adapter_weight
from modeling_tiny_audio import TinyAudioForConditionalGeneration
from processing_tiny_audio import TinyAudioProcessor
from training.arguments import DataArguments, ModelArguments, RunArguments
from training.collator import SpeechCollator
from training.data import (
    check_dataset_spec,
    load_speech_data,
    parse_dataset_specs,
    parse_task_weights,
    unknown_task_message,
    write_skip_report,
)
from training.feature_cache import build_feature_cache
from training.preflight import PreflightError, check_components
from training.run_folder import (
    RunFinished,
    check_explicit_checkpoint,
    prepare_output_dir,
    run_record,
    upload,
)
from training.trainer import TinyAudioTrainer

logger = logging.getLogger("tiny_audio.train")

# Model arguments that, when given, override the starting checkpoint's config, and its generation config (the
# decoding the saved model ships with); None keeps the checkpoint's.
CONFIG_OVERRIDES = (
    "encoder_real_length",
    "voice_attribute_loss_weight",
    "mask_time_prob",
    "mask_time_length",
    "mask_feature_prob",
    "mask_feature_length",
)
GENERATION_OVERRIDES = ("num_beams", "ctc_decoding_weight")
# The weights of the voice path (heads and voice prompt), all in one module of the projector.
VOICE_PATH_PREFIX = PROJECTOR_PREFIX + "voice_attributes."


def is_voice_path_weight(name: str) -> bool:
    """The weights only voice tasks read: the heads and voice prompt, and the voice adapter on the LLM."""
    return name.startswith(VOICE_PATH_PREFIX) or is_voice_adapter_weight(name)


def parse_task_prompts(value: str | None) -> dict[str, str]:
    """`{task: instruction}` from YAML/JSON text; every instruction is a non-empty string."""
    parsed = yaml.safe_load(value) if value else {}
    if not isinstance(parsed, dict) or not all(isinstance(p, str) and p.strip() for p in parsed.values()):
        raise PreflightError(
            f"task_prompts must map tasks to instructions, e.g. {{describe: Describe the speaker.}}; got {value!r}"
        )
    return {str(task): prompt for task, prompt in parsed.items()}


def parse_voice_attributes(value: str | dict | None) -> dict[str, dict[str, str]]:
    """`{attribute: {value: word}}` from YAML/JSON text (as the command line gives it) or a parsed mapping: every
    attribute has two values or more, each named by a non-empty word."""
    parsed = yaml.safe_load(value) if isinstance(value, str) else value or {}
    if not isinstance(parsed, dict) or not all(
        isinstance(values, dict)
        and len(values) >= 2
        and all(isinstance(word, str) and word.strip() for word in values.values())
        for values in parsed.values()
    ):
        raise PreflightError(
            "voice_attributes must map each attribute to two values or more and the word naming each, e.g. "
            f"{{gender: {{female: woman, male: man}}}}; got {value!r}"
        )
    return {str(a): {str(v): word.strip() for v, word in values.items()} for a, values in parsed.items()}


def add_voice_attributes(
    model: TinyAudioForConditionalGeneration, processor: TinyAudioProcessor, words: dict[str, dict[str, str]]
) -> None:
    """Gives the model voice-attribute heads for these {attribute: {value: word}} and the processor their tokens;
    each word is read as the LLM reads it mid-sentence (after a space)."""
    tokenizer = processor.tokenizer
    entries = [
        {
            "attribute": attribute,
            "values": list(values),
            "token_ids": [
                tokenizer(f" {word}", add_special_tokens=False)["input_ids"] for word in values.values()
            ],
        }
        for attribute, values in words.items()
    ]
    model.add_voice_attributes(entries, processor.add_voice_tokens(len(entries)))


def freeze_all_but_the_voice_path(model: TinyAudioForConditionalGeneration) -> None:
    """`--train_voice_only`: only the voice path trains (the heads, the voice prompt, the voice adapter).
    Transcription never reads it (only the prompts of voice tasks carry voice tokens and turn the adapter on), so it
    stays exactly the starting model's."""
    if model.multi_modal_projector.voice_attributes is None:
        raise PreflightError("train_voice_only trains the voice path: the model needs voice_attributes")
    for name, parameter in model.named_parameters():
        parameter.requires_grad = is_voice_path_weight(name)


def check_voice_adapter_batches(model: TinyAudioForConditionalGeneration, dataset) -> None:
    """A model with a voice adapter turns it on or off for a whole batch, so its training rows must all be of voice
    tasks or all of others; known before the first step for a dataset in memory (a streamed one fails at its first
    mixed batch)."""
    voice_tasks = set(model.config.voice_tasks or [])
    if not model.config.voice_lora_rank or not hasattr(dataset, "__len__"):
        return
    tasks = set(dataset.unique("task"))
    if tasks & voice_tasks and tasks - voice_tasks:
        raise PreflightError(
            f"the training rows mix voice tasks ({', '.join(sorted(tasks & voice_tasks))}) with others "
            f"({', '.join(sorted(tasks - voice_tasks))}), and this model's voice adapter (voice_lora_rank "
            f"{model.config.voice_lora_rank}) is on or off for a whole batch: train the voice tasks in a run of their "
            "own (train_voice_only)"
        )


def build_model(
    model_args: ModelArguments, training_args: TrainingArguments
) -> tuple[TinyAudioForConditionalGeneration, TinyAudioProcessor]:
    """Frozen towers in the compute dtype (bf16 halves their cost); trainable weights kept in fp32."""
    dtype_name = model_args.frozen_dtype
    if dtype_name == "auto":
        dtype_name = "bfloat16" if training_args.bf16 else "float32"
    dtype = getattr(torch, dtype_name)
    for field in ("model_name_or_path", "audio_model_id", "text_model_id"):
        value = getattr(model_args, field)
        if value and value.startswith("~"):
            setattr(model_args, field, os.path.expanduser(value))
    if model_args.model_name_or_path:
        model = TinyAudioForConditionalGeneration.from_pretrained(model_args.model_name_or_path, dtype=dtype)
        processor = TinyAudioProcessor.from_pretrained(model_args.model_name_or_path)
        if model_args.lora_target_modules:
            model.extend_lora(model_args.lora_target_modules)
        if model_args.projector_output_norm and not model.config.projector_output_norm:
            raise ValueError(
                "--projector_output_norm changes what a trained projector outputs: start a new model with it "
                f"instead of continuing {model_args.model_name_or_path}"
            )
        if model_args.encoder_trainable_layers is not None or model_args.projector_num_layers is not None:
            model.extend_acoustic_capacity(
                encoder_trainable_layers=model_args.encoder_trainable_layers
                or model.config.encoder_trainable_layers,
                projector_num_layers=model_args.projector_num_layers or model.config.projector_num_layers,
            )
    else:
        model = TinyAudioForConditionalGeneration.from_components(
            model_args.audio_model_id,
            model_args.text_model_id,
            dtype=dtype,
            projector_downsample=model_args.projector_downsample,
            projector_hidden_size=model_args.projector_hidden_size,
            projector_num_layers=model_args.projector_num_layers or 0,
            projector_output_norm=model_args.projector_output_norm,
            encoder_trainable_layers=model_args.encoder_trainable_layers or 0,
            lora_rank=model_args.lora_rank,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            lora_target_modules=model_args.lora_target_modules,
        )
        processor = TinyAudioProcessor.from_components(
            model_args.audio_model_id, model_args.text_model_id, config=model.config
        )
    voice_words = parse_voice_attributes(model_args.voice_attributes)
    if voice_words:
        add_voice_attributes(model, processor, voice_words)
    if model_args.voice_layer_mix:
        model.mix_voice_layers()
    if model_args.voice_prompt_length:
        model.add_voice_prompt(model_args.voice_prompt_length)
        processor.add_voice_tokens(model.config.voice_token_count)
    if model_args.voice_lora_rank:
        model.add_voice_adapter(model_args.voice_lora_rank)
    prompts = parse_task_prompts(model_args.task_prompts)
    if prompts:  # the saved config and processor both carry them
        model.config.task_prompts = {**model.config.task_prompts, **prompts}
        processor.task_prompts = dict(model.config.task_prompts)
    for field in CONFIG_OVERRIDES:
        if getattr(model_args, field) is not None:
            setattr(model.config, field, getattr(model_args, field))
    for field in GENERATION_OVERRIDES:
        if getattr(model_args, field) is not None:
            setattr(model.generation_config, field, getattr(model_args, field))
    if model_args.train_voice_only:
        freeze_all_but_the_voice_path(model)
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    attention = model_args.attn_implementation
    if attention == "auto":
        attention = None if torch.cuda.is_available() else "eager"
    if attention:
        model.language_model.set_attn_implementation(attention)
    return model, processor


def ctc_blank_token_id(tokenizer, blank_token: str) -> int:
    """The id of the token CTC blank frames are pulled onto (`--ctc_blank_token`), which must be one token."""
    blank = tokenizer(blank_token, add_special_tokens=False)["input_ids"]
    if len(blank) != 1:
        raise ValueError(f"ctc_blank_token {blank_token!r} must be a single token, got ids {blank}")
    return blank[0]


def check_arguments(
    model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments
) -> None:
    """Everything that can be checked without loading a model: a mistake fails in a second with one message."""
    if not training_args.learning_rate > 0:
        raise PreflightError(f"learning_rate must be positive, got {training_args.learning_rate}")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(training_args, name) < 1:
            raise PreflightError(f"{name} must be at least 1, got {getattr(training_args, name)}")
    if training_args.max_steps == 0:
        raise PreflightError("max_steps must be positive (or -1 to train for num_train_epochs)")
    parse_voice_attributes(model_args.voice_attributes)
    for name in (
        "ctc_weight",
        "ctc_only_steps",
        "voice_attributes_only_steps",
        "voice_prompt_length",
        "voice_lora_rank",
        "lora_rank",
        "lora_dropout",
    ):
        if getattr(model_args, name) < 0:
            raise PreflightError(f"{name} must not be negative, got {getattr(model_args, name)}")
    if model_args.ctc_decoding_weight is not None and not 0 <= model_args.ctc_decoding_weight <= 1:
        raise PreflightError(
            f"ctc_decoding_weight must be between 0 and 1, got {model_args.ctc_decoding_weight}"
        )
    warmup = training_args.warmup_steps
    if training_args.max_steps > 0 and warmup >= 1 and warmup > training_args.max_steps:
        logger.warning(
            "warmup_steps %g is more than max_steps %d: the learning rate never reaches %g",
            warmup,
            training_args.max_steps,
            training_args.learning_rate,
        )
    prompts = parse_task_prompts(model_args.task_prompts)
    try:
        weights = parse_task_weights(data_args.task_weights)
    except ValueError as error:
        raise PreflightError(str(error)) from None
    if not model_args.model_name_or_path:  # a new model's tasks are known now; a checkpoint's once it loads
        tasks = {**DEFAULT_TASK_PROMPTS, **prompts}
        for task in weights:
            if task not in tasks:
                raise PreflightError(f"task_weights: {unknown_task_message(task, tasks)}")
    check_components(model_args)  # first: a config whose models cannot load needs another config, not data
    specs = parse_dataset_specs(data_args.train_datasets)
    if data_args.eval_datasets:
        specs += parse_dataset_specs(data_args.eval_datasets)
    for spec in specs:
        check_dataset_spec(spec, data_args.datasets_cache_dir)


def _print_start(trainer: Trainer, train_dataset, skipped, resume_from: Path | None) -> None:
    """What is about to happen: where it goes, what trains, on how much data, for how long."""
    args = trainer.args
    model = trainer.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    in_projector = [name for name in trained if name.startswith(PROJECTOR_PREFIX)]
    parts = ["projector"] * any(not is_voice_path_weight(name) for name in in_projector)
    parts += ["voice path"] * any(is_voice_path_weight(name) for name in trained)
    parts += ["LoRA"] * any(LORA_MARKER in name and not is_voice_path_weight(name) for name in trained)
    parts += ["top encoder layers"] * any(name.startswith(AUDIO_TOWER_PREFIX) for name in trained)
    effective = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    clips = f"{len(train_dataset):,}" if hasattr(train_dataset, "__len__") else "streamed"
    steps = args.max_steps if args.max_steps > 0 else f"{args.num_train_epochs:g} epochs"
    print(f"Training Tiny Audio into {os.path.abspath(args.output_dir)}")
    held = [name for name, p in model.named_parameters() if not p.requires_grad]
    held_parts = ["encoder", "LLM"]
    held_parts += ["projector"] * any(name.startswith(PROJECTOR_PREFIX) for name in held)
    held_parts += ["LoRA"] * any(LORA_MARKER in name for name in held)
    print(
        f"  parameters: {trainable:,} trainable ({', '.join(parts)}), {frozen:,} frozen ({', '.join(held_parts)})"
    )
    print(
        f"  clips: {clips} (skipped: {sum(skipped.values())}), steps: {steps}, effective batch: {effective} "
        f"({args.per_device_train_batch_size} per device x {args.gradient_accumulation_steps} accumulation x "
        f"{args.world_size} process{'es' if args.world_size > 1 else ''})"
    )
    if resume_from is not None:
        step = resume_from.name.rpartition("-")[2]
        print(f"  resuming from {resume_from.name}" + (f" (step {step})" if step.isdigit() else ""))


def _print_end(output_dir: str) -> None:
    """How to use what was trained."""
    print(f"Trained model saved in {output_dir}")
    print(f"  evaluate it: python eval.py {output_dir} --dataset data/real_speech")
    print(f"  try it:      python demo/app.py --model {output_dir}")


def train(
    model_args: ModelArguments,
    data_args: DataArguments,
    run_args: RunArguments,
    training_args: TrainingArguments,
    callbacks: list[TrainerCallback] | None = None,
) -> dict:
    """Trains as the arguments say (extra Trainer callbacks allowed); returns the final metrics.

    Arguments, datasets, models and the output folder are checked before any model loads (PreflightError).
    """
    check_arguments(model_args, data_args, training_args)
    explicit_checkpoint = training_args.resume_from_checkpoint
    record = run_record(model_args, data_args, training_args)
    if explicit_checkpoint:
        check_explicit_checkpoint(Path(explicit_checkpoint), record)
    with training_args.main_process_first(desc="checking the output folder"):
        try:
            resume_from = prepare_output_dir(
                Path(training_args.output_dir),
                record,
                resume=run_args.resume or bool(explicit_checkpoint),
                overwrite=run_args.overwrite_output_dir,
                max_steps=training_args.max_steps,
                is_main_process=training_args.process_index == 0,
            )
        except RunFinished as finished:
            if training_args.process_index == 0:
                print(finished)
            return {}
    if explicit_checkpoint:
        resume_from = Path(explicit_checkpoint)
    set_seed(training_args.seed)
    model, processor = build_model(model_args, training_args)
    tasks = list(model.config.task_prompts)
    max_seconds = min(
        data_args.max_audio_seconds or model.config.max_audio_seconds, processor.max_audio_seconds
    )
    load = dict(
        sampling_rate=processor.sampling_rate,
        max_audio_seconds=max_seconds,
        tasks=tasks,
        default_task=model.config.default_task,
        seed=training_args.seed,
        num_proc=data_args.preprocessing_num_workers,
        shuffle_buffer_size=data_args.shuffle_buffer_size,
        cache_dir=data_args.datasets_cache_dir,
    )
    with training_args.main_process_first(desc="preparing data"):
        train_dataset, skipped = load_speech_data(
            parse_dataset_specs(data_args.train_datasets),
            task_weights=parse_task_weights(data_args.task_weights),
            **load,
        )
        check_voice_adapter_batches(model, train_dataset)
        eval_dataset = None
        if data_args.eval_datasets:
            specs = parse_dataset_specs(data_args.eval_datasets)
            for spec in specs:
                spec.max_samples = spec.max_samples or data_args.max_eval_samples
            eval_dataset, _ = load_speech_data(specs, **load)
        store = None
        if data_args.feature_cache_dir:
            for dataset in filter(None, (train_dataset, eval_dataset)):
                if not hasattr(dataset, "__len__"):
                    raise ValueError("--feature_cache_dir needs local (non-streamed) datasets")
                store = build_feature_cache(
                    model,
                    processor,
                    dataset,
                    data_args.feature_cache_dir,
                    batch_size=data_args.feature_cache_batch_size,
                    num_workers=training_args.dataloader_num_workers,
                    layer_statistics=model.config.voice_layer_mix,
                )
    if training_args.should_save:
        os.makedirs(training_args.output_dir, exist_ok=True)
        write_skip_report(os.path.join(training_args.output_dir, "skipped_rows.json"), skipped)
    wer_rows = []
    if eval_dataset is not None and data_args.wer_eval_samples:
        transcribe = (row for row in eval_dataset if row["task"] == "transcribe")
        wer_rows = list(itertools.islice(transcribe, data_args.wer_eval_samples))
    use_ctc = model_args.ctc_weight > 0 or model_args.ctc_only_steps > 0
    if use_ctc:  # then the saved model can also decode jointly with its CTC head
        model.config.ctc_blank_token_id = ctc_blank_token_id(processor.tokenizer, model_args.ctc_blank_token)
    model.config.ctc_loss_weight = model_args.ctc_weight
    try:
        model.config.validate()
    except StrictDataclassClassValidationError as error:  # a config field the flags set: say which, plainly
        raise PreflightError(str(error.__cause__)) from error
    decoding_weight = getattr(model.generation_config, "ctc_decoding_weight", 0.0)
    if decoding_weight > 0 and model.config.ctc_blank_token_id is None:
        raise PreflightError(
            f"ctc_decoding_weight {decoding_weight} needs a CTC head: train with the CTC loss (--ctc_weight > 0), "
            "or start from a checkpoint that was"
        )
    trainer = TinyAudioTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=SpeechCollator(
            processor,
            store,
            ctc_blank_token_id=model.config.ctc_blank_token_id if use_ctc else None,
            voice_attributes=model.config.voice_attributes,
            layer_statistics=model.config.voice_layer_mix,
        ),
        processing_class=processor,
        callbacks=callbacks,
        wer_rows=wer_rows,
        prefix_cache=model_args.prefix_cache,
        ctc_only_steps=model_args.ctc_only_steps,
        voice_attributes_only_steps=model_args.voice_attributes_only_steps,
    )
    if trainer.is_world_process_zero():
        _print_start(trainer, train_dataset, skipped, resume_from)
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    trainer.save_model()
    metrics = dict(result.metrics)
    history = trainer.state.log_history
    final_eval = [e for e in history if "eval_loss" in e and e.get("step") == trainer.state.global_step]
    if eval_dataset is not None:
        metrics.update(final_eval[-1] if final_eval else trainer.evaluate())
    trainer.save_state()
    if run_args.push_to_hub_repo and trainer.is_world_process_zero():
        logger.info(
            "Pushed to %s",
            upload(
                training_args.output_dir,
                run_args.push_to_hub_repo,
                private=run_args.hub_private,
                checkpoint_only=True,
            ),
        )
    if trainer.is_world_process_zero():
        _print_end(training_args.output_dir)
    return metrics
