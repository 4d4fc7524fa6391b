"""Processor of Tiny Audio: audio features plus a chat prompt whose audio placeholder is expanded per clip."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from transformers import AutoConfig, AutoFeatureExtractor, AutoTokenizer, BatchFeature, ProcessorMixin
from transformers.tokenization_utils_base import AddedToken

# The sibling Hub files: a relative import in a checkpoint's remote code, a top-level one in a checkout. One
# name per line (isort would join them), so that the two spellings stay plain import lines.
# isort: off
try:
    from .configuration_tiny_audio import DEFAULT_TASK_PROMPTS
    from .configuration_tiny_audio import DEFAULT_VOICE_TASKS
    from .configuration_tiny_audio import WHISPER_CONV_LAYERS
    from .configuration_tiny_audio import ConvLayers
    from .configuration_tiny_audio import TinyAudioConfig
    from .configuration_tiny_audio import audio_token_lengths
    from .configuration_tiny_audio import encoder_conv_layers
except ImportError:
    from configuration_tiny_audio import DEFAULT_TASK_PROMPTS
    from configuration_tiny_audio import DEFAULT_VOICE_TASKS
    from configuration_tiny_audio import WHISPER_CONV_LAYERS
    from configuration_tiny_audio import ConvLayers
    from configuration_tiny_audio import TinyAudioConfig
    from configuration_tiny_audio import audio_token_lengths
    from configuration_tiny_audio import encoder_conv_layers
# isort: on

# Label of the positions the loss skips (prompt, audio, padding): the value PyTorch's cross_entropy ignores.
IGNORE_INDEX = -100
# Float audio lies within ±1; a peak beyond this is integer PCM stored as floats without being scaled.
UNSCALED_PCM_PEAK = 2.0


def pcm_to_float(samples: np.ndarray) -> np.ndarray:
    """Integer PCM -> float32 in [-1, 1): centred on the format's midpoint (0 signed, 128 for uint8) and divided by
    its half range (32768 for int16). Every path from samples to the model uses this one rule."""
    info = np.iinfo(samples.dtype)
    center = (int(info.max) + int(info.min) + 1) / 2
    return ((samples.astype(np.float32) - center) / (int(info.max) + 1 - center)).astype(np.float32)


def scale_unscaled_pcm(samples: np.ndarray, name: str = "audio") -> np.ndarray:
    """Float samples far beyond ±1 are integer PCM that was never scaled (e.g. `int16_array.astype(float)`):
    divide them by the full scale of the narrowest integer width that holds them, and warn that this was done."""
    peak = float(np.abs(samples).max()) if samples.size else 0.0
    if peak <= UNSCALED_PCM_PEAK:
        return samples
    bits = next((bits for bits in (16, 24, 32) if peak <= 2 ** (bits - 1)), None)
    if bits is None:
        raise ValueError(f"{name}: float samples reach {peak:g}, beyond even 32-bit PCM; this is not audio")
    warnings.warn(
        f"{name}: float samples reach {peak:g}, far beyond ±1: read as unscaled {bits}-bit integer PCM and divided "
        f"by {2 ** (bits - 1)}. Pass float audio in [-1, 1] (or the integer array itself) to avoid this.",
        stacklevel=2,
    )
    return (samples / 2 ** (bits - 1)).astype(np.float32)


def add_placeholder_token(tokenizer, placeholder: str) -> int:
    """Registers a placeholder (of the audio, of the voice tokens) as one special token (the LLM's embedding table is
    left untouched)."""
    if placeholder not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(placeholder, special=True, normalized=False)], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(placeholder)


class TinyAudioProcessor(ProcessorMixin):
    """Turns audio + a task (or a free prompt) into model inputs, and optionally transcripts into `labels`.

    Audio must be mono, 1-D, at `sampling_rate`; the ASR pipeline decodes files, resamples and downmixes.
    Signed integer PCM arrays (int16/int32) are scaled to [-1, 1). Clips longer than `max_audio_seconds` are
    refused here: the pipeline splits long audio into chunks.
    """

    def __init__(
        self,
        feature_extractor,
        tokenizer,
        audio_token: str = "<audio>",
        task_prompts: dict | None = None,
        default_task: str = "transcribe",
        conv_layers: ConvLayers | None = None,
        projector_downsample: int = 4,
        max_audio_seconds: float = 30.0,
        chat_template: str | None = None,
        voice_token: str = "<voice>",
        voice_tokens: int = 0,
        voice_tasks: list[str] | None = None,
    ):
        self.audio_token = audio_token
        self.voice_token = voice_token
        self.voice_tokens = 0
        self.voice_tasks = list(voice_tasks or DEFAULT_VOICE_TASKS)
        self.task_prompts = dict(task_prompts or DEFAULT_TASK_PROMPTS)
        self.default_task = default_task
        self.conv_layers = [tuple(layer) for layer in (conv_layers or WHISPER_CONV_LAYERS)]
        self.projector_downsample = projector_downsample
        self.max_audio_seconds = max_audio_seconds
        self.audio_token_id = add_placeholder_token(tokenizer, audio_token)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        super().__init__(feature_extractor, tokenizer, chat_template=chat_template)
        if voice_tokens:
            self.add_voice_tokens(voice_tokens)

    def add_voice_tokens(self, count: int) -> int:
        """Puts `count` voice placeholders after the audio of the prompts of `voice_tasks` (the model's
        `TinyAudioConfig.voice_token_count`: its learned voice prompt, then one per voice attribute), and returns their
        token id."""
        self.voice_tokens = count
        return add_placeholder_token(self.tokenizer, self.voice_token)

    @classmethod
    def from_components(
        cls, audio_model_id: str, text_model_id: str, config: TinyAudioConfig | None = None
    ) -> TinyAudioProcessor:
        """A processor from the encoder's feature extractor and the LLM's tokenizer (Hub ids or folders)."""
        config = config or TinyAudioConfig(audio_config=AutoConfig.from_pretrained(audio_model_id).to_dict())
        return cls(
            AutoFeatureExtractor.from_pretrained(audio_model_id),
            AutoTokenizer.from_pretrained(text_model_id),
            audio_token=config.audio_token,
            task_prompts=config.task_prompts,
            default_task=config.default_task,
            conv_layers=encoder_conv_layers(config.audio_config),
            projector_downsample=config.projector_downsample,
            max_audio_seconds=config.max_audio_seconds,
            voice_token=config.voice_token,
            voice_tokens=config.voice_token_count,
            voice_tasks=config.voice_tasks,
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> TinyAudioProcessor:
        """Loads a saved processor; the tokenizer loader reads config.json, whose auto_map names this same code."""
        kwargs.setdefault("trust_remote_code", True)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @property
    def sampling_rate(self) -> int:
        return self.feature_extractor.sampling_rate

    @property
    def uses_mel_features(self) -> bool:
        """Whisper-style extractors produce log-mel frames; wav2vec-style ones pass raw samples."""
        return "input_features" in self.feature_extractor.model_input_names

    # ---- prompts ------------------------------------------------------------------------------------------

    def prompt_text(self, content: str) -> str:
        """One user turn rendered with the LLM's chat template (thinking disabled where a template has it)."""
        if self.tokenizer.chat_template is None:
            return f"{content}\n"
        messages = [{"role": "user", "content": content}]
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
        )

    def instruction(self, task: str | None, prompt: str | None) -> str:
        if prompt is not None:
            return prompt
        task = task or self.default_task
        if task not in self.task_prompts:
            raise ValueError(
                f"Unknown task {task!r}; known tasks: {sorted(self.task_prompts)} (or pass prompt=...)"
            )
        return self.task_prompts[task]

    # ---- audio --------------------------------------------------------------------------------------------

    def validate_audio(self, audio, index: int) -> np.ndarray:
        """Checks one clip and returns it as float32; every problem names the clip."""
        name = f"audio[{index}]"
        if isinstance(audio, torch.Tensor):
            audio = audio.detach().cpu().numpy()
        if not isinstance(audio, np.ndarray):
            raise TypeError(f"{name}: expected a 1-D numpy array or torch tensor, got {type(audio).__name__}")
        if audio.ndim == 2 and 1 in audio.shape:
            audio = audio.reshape(-1)
        if audio.ndim != 1:
            raise ValueError(
                f"{name}: expected mono audio (1-D), got shape {audio.shape}; downmix first, e.g. audio.mean(axis=0) "
                "for (channels, samples), or use the ASR pipeline which downmixes files."
            )
        if audio.size == 0:
            raise ValueError(f"{name}: the audio is empty (0 samples)")
        if audio.dtype.kind in "iu":
            audio = pcm_to_float(audio)
        audio = audio.astype(np.float32, copy=False)
        if not np.isfinite(audio).all():
            raise ValueError(f"{name}: the audio contains NaN or infinite samples")
        audio = scale_unscaled_pcm(audio, name)
        seconds = audio.size / self.sampling_rate
        if seconds > self.max_audio_seconds + 1e-6:
            raise ValueError(
                f"{name}: {seconds:.1f} s is longer than the encoder window ({self.max_audio_seconds:.0f} s); "
                "use the ASR pipeline, which splits long audio into chunks."
            )
        return audio

    def extract_features(self, clips: list[np.ndarray]) -> dict[str, torch.Tensor]:
        """`input_features` (mel frames or samples) and `input_features_mask` marking the real frames."""
        # Whisper's encoder needs its full 30 s window; wav2vec-style encoders take the batch's longest clip.
        padding = "max_length" if self.uses_mel_features else "longest"
        features = self.feature_extractor(
            clips,
            sampling_rate=self.sampling_rate,
            return_attention_mask=True,
            padding=padding,
            return_tensors="pt",
        )
        values = features["input_features" if self.uses_mel_features else "input_values"]
        return {"input_features": values, "input_features_mask": features["attention_mask"].long()}

    def audio_token_counts(self, input_features_mask: torch.Tensor) -> torch.Tensor:
        return audio_token_lengths(input_features_mask.sum(-1), self.conv_layers, self.projector_downsample)

    # ---- main entry point ---------------------------------------------------------------------------------

    def __call__(
        self,
        audio=None,
        text: str | list[str] | None = None,
        sampling_rate: int | None = None,
        task: str | None = None,
        prompt: str | None = None,
        return_tensors: str = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Builds model inputs.

        `audio`: one clip or a list (mono float arrays at `sampling_rate`); None for a text-only prompt.
        `text`: transcripts/answers for training; when given, `labels` hold them and mask everything else.
        `task` selects a stored prompt (transcribe, describe, emotion); `prompt` overrides it with free text.
        """
        if return_tensors != "pt":
            raise ValueError("TinyAudioProcessor only returns PyTorch tensors (return_tensors='pt')")
        if sampling_rate is not None and sampling_rate != self.sampling_rate:
            raise ValueError(
                f"The audio is at {sampling_rate} Hz but the encoder expects {self.sampling_rate} Hz; resample it "
                "first (the ASR pipeline does this for you)."
            )
        instruction = self.instruction(task, prompt)
        if audio is None:
            if text is not None:
                raise ValueError("Transcripts (text=...) were given without audio")
            return self._tokenize([self.prompt_text(instruction)], None, padding_side="left")

        clips = audio if isinstance(audio, (list, tuple)) else [audio]
        if not clips:
            raise ValueError("No audio was given (an empty list)")
        clips = [self.validate_audio(clip, index) for index, clip in enumerate(clips)]
        features = self.extract_features(clips)
        counts = self.audio_token_counts(features["input_features_mask"]).tolist()
        answers = None
        if text is not None:
            answers = [text] if isinstance(text, str) else list(text)
            if len(answers) != len(clips):
                raise ValueError(
                    f"Got {len(clips)} audio clips but {len(answers)} transcripts; they must match 1:1"
                )
        inputs = self.text_inputs(counts, [instruction] * len(clips), answers)
        inputs.update(features)
        return inputs

    def text_inputs(
        self, audio_token_counts: list[int], instructions: list[str], texts: list[str] | None = None
    ) -> BatchFeature:
        """Token inputs for clips whose audio-token counts are known (e.g. from cached encoder outputs).

        Each clip gets its own instruction; the instruction comes before the audio so that prompts of one task
        share their whole prefix; the voice tokens, if any, follow the audio in the prompts of `voice_tasks`. With
        `texts`, rows are right-padded and carry `labels`; without, left-padded for generation.
        """
        voice_instructions = {
            self.task_prompts[task] for task in self.voice_tasks if task in self.task_prompts
        }
        voice = self.voice_token * self.voice_tokens
        # One chat-template render per distinct instruction, not per clip (the collator calls this every batch).
        templates = {
            text: self.prompt_text(f"{text}\n{self.audio_token}{voice if text in voice_instructions else ''}")
            for text in set(instructions)
        }
        prompts = [
            templates[instruction].replace(self.audio_token, self.audio_token * count, 1)
            for count, instruction in zip(audio_token_counts, instructions, strict=True)
        ]
        return self._tokenize(prompts, texts, padding_side="left" if texts is None else "right")

    def _tokenize(self, prompts: list[str], answers: list[str] | None, padding_side: str) -> BatchFeature:
        """Tokenizes prompts (and answers followed by EOS), pads the batch, and masks labels to the answers."""
        add_special = self.tokenizer.chat_template is None
        sequences = self.tokenizer(prompts, add_special_tokens=add_special)["input_ids"]
        labels = None
        if answers is not None:
            labels = []
            for index, answer in enumerate(answers):
                if not isinstance(answer, str):
                    raise TypeError(
                        f"text[{index}]: expected a transcript string, got {type(answer).__name__}"
                    )
                answer_ids = self.tokenizer(answer.strip(), add_special_tokens=False)["input_ids"]
                answer_ids = answer_ids + [self.tokenizer.eos_token_id]
                labels.append([IGNORE_INDEX] * len(sequences[index]) + answer_ids)
                sequences[index] = sequences[index] + answer_ids

        longest = max(len(sequence) for sequence in sequences)
        pad_id = self.tokenizer.pad_token_id
        input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
        label_ids = torch.full((len(sequences), longest), IGNORE_INDEX, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            span = (
                slice(longest - len(sequence), longest) if padding_side == "left" else slice(0, len(sequence))
            )
            input_ids[row, span] = torch.tensor(sequence)
            attention_mask[row, span] = 1
            if labels is not None:
                label_ids[row, span] = torch.tensor(labels[row])
        data = {"input_ids": input_ids, "attention_mask": attention_mask}
        if labels is not None:
            data["labels"] = label_ids
        return BatchFeature(data=data)

    def text_prompt(self, prompt: str) -> BatchFeature:
        """Inputs for a text-only chat turn: the LLM alone answers (the demo's Text mode)."""
        return self(prompt=prompt)

    def batch_decode(self, token_ids, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        texts = self.tokenizer.batch_decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)
        return [text.strip() for text in texts]

    def decode(self, token_ids, skip_special_tokens: bool = True, **kwargs) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs).strip()

    def decode_generated(self, generated_ids: torch.Tensor, inputs: dict) -> list[str]:
        """Text of the newly generated tokens only (generate returns prompt + answer)."""
        return self.batch_decode(generated_ids[:, inputs["input_ids"].shape[1] :])

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "input_features", "input_features_mask"]


TinyAudioProcessor.register_for_auto_class()

__all__ = ["TinyAudioProcessor", "add_placeholder_token", "pcm_to_float", "scale_unscaled_pcm"]
