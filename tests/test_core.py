"""Core model, config and processor: training signal, generation, saving/loading, and input checks."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import textwrap
from collections.abc import Container

import numpy as np
import pytest
import torch
from conftest import HIDE_REPO_PRELUDE, speech_like
from huggingface_hub.errors import StrictDataclassClassValidationError
from safetensors import safe_open
from transformers import AutoModelForCausalLM, GenerationMixin, set_seed

from configuration_tiny_audio import TinyAudioConfig, audio_token_lengths
from decoding_tiny_audio import CTCPrefixScorer, embedding_ctc_logits
from modeling_tiny_audio import TinyAudioForConditionalGeneration
from processing_tiny_audio import IGNORE_INDEX
from testing.tiny_models import make_tiny_llm, make_tiny_tiny_audio

CLIPS = [speech_like(2.0, seed=1), speech_like(0.7, seed=2), speech_like(3.3, seed=3)]
TRANSCRIPTS = ["hello world", "one two three", "the quick brown fox"]


def test_default_config_describes_course_model():
    config = TinyAudioConfig()
    assert config.audio_model_id == "openai/whisper-large-v3-turbo"
    assert config.text_model_id == "HuggingFaceTB/SmolLM3-3B"
    assert (config.audio_config.hidden_size, config.text_config.hidden_size) == (1280, 2048)
    assert config.projector_downsample == 4 and config.projector_activation == "gelu"
    assert set(config.task_prompts) >= {"transcribe", "describe", "emotion"}


def test_config_round_trips(tmp_path, tiny_model_and_processor):
    config = tiny_model_and_processor[0].config
    config.save_pretrained(tmp_path)
    reloaded = TinyAudioConfig.from_pretrained(tmp_path)
    assert reloaded.to_dict() == config.to_dict()
    assert reloaded.audio_config.model_type == "whisper" and reloaded.text_config.model_type == "llama"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"ctc_loss_weight": 0.5}, "ctc_loss_weight 0.5 needs a CTC head"),
        ({"ctc_blank_token_id": 5, "ctc_loss_weight": -1.0}, "ctc_loss_weight must not be negative"),
        ({"ctc_blank_token_id": 10**6}, "ctc_blank_token_id 1000000 is not a token of the LLM's 128256"),
    ],
)
def test_config_validates_its_ctc_fields(fields, message):
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        TinyAudioConfig(**fields)
    config = TinyAudioConfig(ctc_blank_token_id=5, ctc_loss_weight=0.5)
    config.ctc_blank_token_id = None  # set later, as train.py sets its fields: validate() checks them again
    with pytest.raises(StrictDataclassClassValidationError, match="needs a CTC head"):
        config.validate()


def test_audio_token_count_follows_real_length(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    short, full = processor(audio=[speech_like(3.0), speech_like(30.0)])["input_ids"], None
    counts = (short == processor.audio_token_id).sum(-1)
    # 3 s of Whisper audio: 300 mel frames -> 150 encoder frames -> 38 tokens; 30 s -> 375 tokens.
    assert counts.tolist() == [38, 375]
    full = processor(audio=speech_like(3.0))
    assert processor.audio_token_counts(full["input_features_mask"]).item() == 38
    embeds, mask = model.get_audio_features(full["input_features"], full["input_features_mask"])
    assert mask.sum().item() == 38 and embeds.shape[-1] == model.config.text_config.hidden_size


def test_only_projector_trains(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    assert trainable and all(name.startswith("multi_modal_projector.") for name in trainable)

    model.train()
    assert not model.audio_tower.training and not model.language_model.training
    assert model.multi_modal_projector.training
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(**processor(audio=CLIPS, text=TRANSCRIPTS)).loss
    loss.backward()
    optimizer.step()
    model.eval()

    changed = {name for name, param in model.named_parameters() if not torch.equal(param, before[name])}
    assert changed == set(trainable)
    for name, param in model.named_parameters():  # restore the shared fixture
        param.data.copy_(before[name])


def test_loss_covers_answer_tokens_only(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    inputs = processor(audio=CLIPS[:2], text=TRANSCRIPTS[:2])
    labels = inputs["labels"]
    answer_lengths = [
        len(processor.tokenizer(text, add_special_tokens=False)["input_ids"]) + 1 for text in TRANSCRIPTS[:2]
    ]
    assert (labels != IGNORE_INDEX).sum(-1).tolist() == answer_lengths
    assert not (labels == processor.audio_token_id).any()

    loss = model(**inputs).loss
    full_logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    reference = torch.nn.functional.cross_entropy(
        full_logits[:, :-1].reshape(-1, full_logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
    )
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)


def test_encoder_outputs_path_matches_live_encoder(tiny_model_and_processor):
    """The training feature cache stores trimmed encoder frames; feeding them back gives the same loss."""
    model, processor = tiny_model_and_processor
    inputs = processor(audio=CLIPS, text=TRANSCRIPTS)
    live = model(**inputs).loss
    hidden, mask = model.encode_audio(inputs["input_features"], inputs["input_features_mask"])
    longest = int(mask.sum(-1).max())
    trimmed = (hidden[:, :longest] * mask[:, :longest, None]).half()
    cached = model(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        labels=inputs["labels"],
        encoder_hidden_states=trimmed.float(),
        encoder_mask=mask[:, :longest],
    ).loss
    torch.testing.assert_close(live, cached, rtol=1e-2, atol=1e-2)


def test_spec_augment_zeroes_spans_of_real_frames_and_channels_in_training_only(tmp_path):
    set_seed(0)  # the random model and the spans (drawn with numpy by transformers' `_compute_mask_indices`)
    model, processor = make_tiny_tiny_audio(
        tmp_path, mask_time_prob=0.3, mask_time_length=3, mask_feature_prob=0.25, mask_feature_length=2
    )
    inputs = processor(audio=[speech_like(2.0, seed=4), speech_like(0.8, seed=5)], text=TRANSCRIPTS[:2])
    hidden, mask = model.encode_audio(inputs["input_features"], inputs["input_features_mask"])
    hidden = (hidden + 3.0) * mask[..., None]  # no real frame holds a zero
    real = mask.sum(-1)
    model.train()
    augmented = model.spec_augment(hidden, mask)
    for row in range(2):
        zero_frames = (augmented[row] == 0).all(-1)
        zero_channels = (augmented[row, : real[row]] == 0).all(0)
        # Spans of 3 real frames, about 30% of them (overlaps make it fewer); padding stays zero.
        assert 3 <= int(zero_frames[: real[row]].sum()) <= int(0.3 * real[row]) + 3
        assert zero_frames[real[row] :].all()
        assert int(zero_channels.sum()) >= 2  # whole channels, across every frame
        kept = ~zero_frames[: real[row], None] & ~zero_channels[None, :]
        torch.testing.assert_close(augmented[row, : real[row]][kept], hidden[row, : real[row]][kept])
    again = model.spec_augment(hidden, mask)
    assert not torch.equal(again, augmented)  # new spans every call
    # The LM loss in training sees the masked frames; evaluation and generation never do.
    loss_masked = model(**inputs).loss
    model.eval()
    with torch.no_grad():
        clean = model(**inputs).loss
        torch.testing.assert_close(model(**inputs).loss, clean)
    assert not torch.isclose(loss_masked.detach(), clean)
    embeds, _ = model.project_audio(hidden, mask)
    torch.testing.assert_close(embeds, model.multi_modal_projector(hidden))


def test_spec_augment_span_sampler_draws_the_same_spans():
    """SpecAugment draws its spans with transformers' private `_compute_mask_indices` (no public API does): its
    call signature and what it draws for a seed are pinned here, so a release that changes them is noticed."""
    import modeling_tiny_audio

    real = torch.tensor([[1] * 20, [1] * 10 + [0] * 10])
    np.random.seed(0)
    frames = modeling_tiny_audio._compute_mask_indices((2, 20), 0.3, 3, attention_mask=real, min_masks=1)
    assert frames.astype(int).tolist() == [
        [0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # real frames only
    ]
    np.random.seed(0)
    channels = modeling_tiny_audio._compute_mask_indices((2, 8), 0.25, 2)
    assert channels.astype(int).tolist() == [[0, 0, 0, 0, 0, 0, 1, 1], [0, 1, 1, 0, 0, 0, 0, 0]]


@pytest.mark.parametrize("encoder", ["whisper", "hubert", "wav2vec2-group"])
def test_batched_generation_matches_single(tmp_path, encoder):
    model, processor = make_tiny_tiny_audio(tmp_path, encoder=encoder)
    torch.manual_seed(0)
    for param in model.multi_modal_projector.parameters():  # a projector big enough to steer the LLM
        param.data.normal_(0, 0.5)
    settings = {
        "max_new_tokens": 6,
        "min_new_tokens": 6,
        "output_scores": True,
        "return_dict_in_generate": True,
    }
    batch = processor(audio=CLIPS)
    batched = model.generate(**batch, **settings)
    batched_scores = torch.stack(batched.scores, 1)
    for row, clip in enumerate(CLIPS):
        inputs = processor(audio=clip)
        single = model.generate(**inputs, **settings)
        new_tokens = single.sequences[0, inputs["input_ids"].shape[1] :]
        assert batched.sequences[row, batch["input_ids"].shape[1] :].tolist() == new_tokens.tolist()
        torch.testing.assert_close(
            batched_scores[row], torch.stack(single.scores, 1)[0], atol=1e-4, rtol=1e-4
        )
    # Different clips steer the LLM differently, so agreement above is not trivial.
    assert not torch.allclose(batched_scores[0], batched_scores[1], atol=1e-3)


@pytest.mark.filterwarnings("ignore:Unfeasible length constraints")
def test_generation_budget_follows_audio_length(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    inputs = processor(audio=speech_like(2.0))
    config = model.generation_config
    expected = config.max_new_tokens + int(config.max_new_tokens_per_second * 2.0)
    out = model.generate(**inputs, min_new_tokens=expected + 5, loop_guard=False)  # the tiny model loops
    assert out.shape[1] - inputs["input_ids"].shape[1] == expected
    # A caller's max_new_tokens is the whole budget, and a text prompt gets the fixed part alone.
    out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=8, loop_guard=False)
    assert out.shape[1] - inputs["input_ids"].shape[1] == 3
    text = processor.text_prompt("the quick brown fox")
    out = model.generate(**text, min_new_tokens=expected)
    assert out.shape[1] - text["input_ids"].shape[1] == config.max_new_tokens


@pytest.mark.parametrize("kind", ["llama", "qwen3", "smollm3"])
def test_language_model_is_exactly_the_pretrained_one(tmp_path, kind):
    model, processor = make_tiny_tiny_audio(tmp_path, llm=kind)
    standalone = AutoModelForCausalLM.from_pretrained(tmp_path / f"llm-{kind}")
    inputs = processor.text_prompt("hello world")
    expected = standalone(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    actual = model(**inputs).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    llm = model.language_model
    assert llm.get_output_embeddings().weight.data_ptr() == llm.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("kind", ["qwen3", "smollm3"])
def test_audio_conditioned_training_and_generation_on_qwen3_and_smollm3(tmp_path, kind):
    """A few optimizer steps on clips and transcripts lower the loss through the projector alone, and the
    trained model generates from audio, for tiny Qwen3 and SmolLM3 configs; SmolLM3 with its own chat format,
    whose reasoning the prompt turns off (metadata "/no_think" and an empty think block before the answer)."""
    set_seed(0)
    model, processor = make_tiny_tiny_audio(tmp_path, llm=kind)
    batch = processor(audio=CLIPS[:2], text=TRANSCRIPTS[:2])
    prompt = processor.tokenizer.decode(batch["input_ids"][0][batch["labels"][0] == IGNORE_INDEX])
    if kind == "smollm3":
        assert "Reasoning Mode: /no_think" in prompt and prompt.endswith(
            "<|im_start|>assistant\n<think>\n\n</think>\n"
        )
    else:
        assert prompt.endswith("<|im_start|>assistant\n")
    frozen = {name: weight.clone() for name, weight in model.language_model.named_parameters()}
    trained = [weight for weight in model.parameters() if weight.requires_grad]
    assert trained and all(
        name.startswith("multi_modal_projector.")
        for name, weight in model.named_parameters()
        if weight.requires_grad
    )
    optimizer = torch.optim.AdamW(trained, lr=1e-2)
    model.train()
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        assert all(weight.grad is not None and weight.grad.abs().sum() > 0 for weight in trained)
        optimizer.step()
        losses.append(loss.item())
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0], losses
    for name, weight in model.language_model.named_parameters():
        assert torch.equal(weight, frozen[name]), name

    model.eval()
    inputs = processor(audio=CLIPS[:2])
    generated = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, num_beams=1, loop_guard=False)
    assert generated.shape == (2, inputs["input_ids"].shape[1] + 3)
    texts = processor.decode_generated(generated, inputs)
    assert len(texts) == 2 and all(isinstance(text, str) and "<think>" not in text for text in texts)


def test_text_only_generation(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    inputs = processor.text_prompt("the quick brown fox")
    out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
    assert isinstance(processor.decode_generated(out, inputs)[0], str)


def test_projector_only_checkpoint(tiny_model_dir):
    names = set(os.listdir(tiny_model_dir))
    assert {"config.json", "model.safetensors", "modeling_tiny_audio.py", "pipeline_asr.py"} <= names
    with safe_open(os.path.join(tiny_model_dir, "model.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
    assert keys and all(key.startswith("multi_modal_projector.") for key in keys)
    config = json.loads(open(os.path.join(tiny_model_dir, "config.json")).read())
    assert {"AutoConfig", "AutoModel", "AutoModelForSpeechSeq2Seq", "AutoProcessor"} <= set(
        config["auto_map"]
    )
    assert "automatic-speech-recognition" in config["custom_pipelines"]


FRESH_PROCESS_SCRIPT = HIDE_REPO_PRELUDE + textwrap.dedent(
    """
    import numpy as np, torch
    from transformers import AutoModel, AutoProcessor
    folder, audio_file, out_file = sys.argv[1:4]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    inputs = processor(audio=list(np.load(audio_file)))
    torch.save(model(**inputs).logits, out_file)
    """
)


def run_fresh(folder: str, tmp_path, clips: list[np.ndarray]) -> torch.Tensor:
    """Loads `folder` with trust_remote_code in a new interpreter, outside the repository, and returns logits."""
    audio_file, out_file, script = tmp_path / "clips.npy", tmp_path / "logits.pt", tmp_path / "load.py"
    np.save(audio_file, np.stack(clips))
    script.write_text(FRESH_PROCESS_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(script), folder, str(audio_file), str(out_file)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out_file)


def test_save_load_in_fresh_process(tmp_path, tiny_model_dir, tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    clips = [speech_like(1.5, seed=7), speech_like(1.5, seed=8)]
    expected = model(**processor(audio=clips)).logits
    torch.testing.assert_close(run_fresh(tiny_model_dir, tmp_path, clips), expected, rtol=0, atol=0)


def test_standalone_checkpoint_round_trip(tmp_path, tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    folder = tmp_path / "standalone"
    model.save_pretrained(folder, standalone=True)
    processor.save_pretrained(folder)
    with safe_open(folder / "model.safetensors", framework="pt") as handle:
        assert any(key.startswith("language_model.") for key in handle.keys())
    reloaded = TinyAudioForConditionalGeneration.from_pretrained(folder)
    inputs = processor(audio=CLIPS[:1])
    torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
    llm = reloaded.language_model
    assert llm.get_output_embeddings().weight.data_ptr() == llm.get_input_embeddings().weight.data_ptr()


def randomise_lora_b(model, keep: Container[str] = ()) -> None:
    """LoRA's B starts at zero: random values (as if trained) make the adapters matter."""
    for name, param in model.named_parameters():
        if ".lora_B" in name and name not in keep:
            param.data.normal_(0, 0.1)


def test_lora_option(tmp_path):
    model, processor = make_tiny_tiny_audio(tmp_path, lora_rank=4)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert any(".lora_" in name for name in trainable)
    assert all(name.startswith("multi_modal_projector.") or ".lora_" in name for name in trainable)
    randomise_lora_b(model)
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    reloaded = TinyAudioForConditionalGeneration.from_pretrained(tmp_path / "ckpt")
    inputs = processor(audio=CLIPS[:1])
    torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_merged_lora_gives_the_same_outputs_and_saves_the_same_checkpoint(tmp_path):
    model, processor = make_tiny_tiny_audio(tmp_path, lora_rank=4, lora_target_modules=["q_proj", "up_proj"])
    randomise_lora_b(model)
    inputs = processor(audio=CLIPS[:2])
    before = model(**inputs).logits
    adapters = {name: tensor.clone() for name, tensor in model.trainable_state_dict().items()}
    assert not model.lora_merged

    model.merge_lora()
    assert model.lora_merged
    merged = model(**inputs).logits
    assert not torch.equal(merged, before)  # the base weights changed...
    torch.testing.assert_close(merged, before, rtol=1e-4, atol=1e-4)  # ...to give the same outputs
    saved = model.trainable_state_dict()
    assert saved.keys() == adapters.keys() and all(torch.equal(saved[k], v) for k, v in adapters.items())

    model.save_pretrained(tmp_path / "from-merged")  # projector + adapters only: reloads unmerged
    processor.save_pretrained(tmp_path / "from-merged")
    reloaded = TinyAudioForConditionalGeneration.from_pretrained(tmp_path / "from-merged")
    assert not reloaded.lora_merged
    torch.testing.assert_close(reloaded(**inputs).logits, before, rtol=0, atol=0)
    reloaded.train()  # an unmerged model trains

    with pytest.raises(RuntimeError, match=r"merged into the LLM for serving \(merge_lora\)"):
        model.train()
    with pytest.raises(ValueError, match=r"merge_lora\), so its full weights are not the LLM's own"):
        model.save_pretrained(tmp_path / "standalone", standalone=True)
    assert not (tmp_path / "standalone").exists()


def test_int8_llm_serves_close_outputs_and_keeps_the_trained_weights(tmp_path):
    """`quantize_llm_int8`: every linear layer of the LLM (head included) becomes dynamic int8, the adapters are
    merged first, the outputs stay close, and the model is serving-only from then on."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    set_seed(0)  # random weights whose argmax agreement does not hang on the tests that ran before
    model, processor = make_tiny_tiny_audio(tmp_path, lora_rank=4, lora_target_modules=["q_proj", "up_proj"])
    randomise_lora_b(model)
    inputs = processor(audio=CLIPS[:2])
    before = model(**inputs).logits
    trained = {name: tensor.clone() for name, tensor in model.trainable_state_dict().items()}

    model.quantize_llm_int8()
    assert model.llm_quantized and model.lora_merged
    base_linears = [
        module
        for name, module in model.language_model.named_modules()
        if name.endswith(("_proj", "_proj.base_layer", "lm_head")) and not hasattr(module, "base_layer")
    ]
    assert base_linears and all(isinstance(module, DynamicQuantizedLinear) for module in base_linears)
    after = model(**inputs).logits
    assert not torch.equal(after, before)
    mask = inputs["attention_mask"].bool()
    agreement = (after.argmax(-1) == before.argmax(-1))[mask].float().mean()
    assert (
        agreement > 0.9
        and torch.nn.functional.cosine_similarity(after[mask], before[mask], dim=-1).min() > 0.98
    )

    saved = model.trainable_state_dict()
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], v) for k, v in trained.items())
    with pytest.raises(RuntimeError, match=r"quantized to int8 for serving \(quantize_llm_int8\)"):
        model.train()
    with pytest.raises(ValueError, match=r"quantize_llm_int8\), so its full weights are not the LLM's own"):
        model.save_pretrained(tmp_path / "standalone", standalone=True)


def test_extending_lora_keeps_the_trained_adapters_and_the_outputs(tmp_path):
    model, processor = make_tiny_tiny_audio(tmp_path, lora_rank=4)
    randomise_lora_b(model)
    inputs = processor(audio=CLIPS[:1])
    before = model(**inputs).logits
    trained = {name: param.detach().clone() for name, param in model.named_parameters() if ".lora_" in name}

    model.extend_lora(["q_proj", "v_proj", "k_proj", "up_proj"])
    torch.testing.assert_close(model(**inputs).logits, before, rtol=0, atol=0)  # new adapters start at zero
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    assert all(name.startswith("multi_modal_projector.") or ".lora_" in name for name in trainable)
    adapted = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trainable if ".lora_" in name}
    assert adapted == {"q_proj", "v_proj", "k_proj", "up_proj"}
    parameters = dict(model.named_parameters())
    assert all(torch.equal(parameters[name], value) for name, value in trained.items())
    randomise_lora_b(model, keep=trained)  # the reload must bring the new adapters back too
    model.save_pretrained(tmp_path / "wider")
    processor.save_pretrained(tmp_path / "wider")
    reloaded = TinyAudioForConditionalGeneration.from_pretrained(tmp_path / "wider")
    assert reloaded.config.lora_target_modules == ["q_proj", "v_proj", "k_proj", "up_proj"]
    torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"keep the checkpoint's trained adapters; missing \['v_proj'\]"):
        reloaded.extend_lora(["q_proj", "k_proj", "up_proj"])


@pytest.mark.parametrize("encoder", ["hubert", "wav2vec2", "wavlm"])
def test_wav2vec_style_encoders(tmp_path, encoder):
    model, processor = make_tiny_tiny_audio(tmp_path, encoder=encoder)
    inputs = processor(audio=CLIPS, text=TRANSCRIPTS)
    counts = (inputs["input_ids"] == processor.audio_token_id).sum(-1)
    lengths = torch.tensor([clip.size for clip in CLIPS])
    assert counts.tolist() == audio_token_lengths(lengths, model.config.encoder_conv_layers, 4).tolist()
    loss = model(**inputs).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None for p in model.language_model.parameters())
    assert model.multi_modal_projector.linear_2.weight.grad is not None


def test_int16_audio_is_scaled(tiny_model_and_processor):
    _, processor = tiny_model_and_processor
    clip = speech_like(1.0)
    as_int16 = (clip * 32767).astype(np.int16)
    torch.testing.assert_close(
        processor(audio=as_int16)["input_features"],
        processor(audio=clip)["input_features"],
        atol=2e-2,
        rtol=0,
    )


def test_silent_audio_is_accepted(tiny_model_and_processor):
    """Silence is valid input (documented): it is transcribed like any clip, usually to little or nothing."""
    model, processor = tiny_model_and_processor
    inputs = processor(audio=np.zeros(16000, dtype=np.float32))
    assert model.generate(**inputs, max_new_tokens=2).shape[0] == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"audio": speech_like(1.0), "sampling_rate": 8000}, "8000 Hz but the encoder expects 16000 Hz"),
        ({"audio": np.stack([speech_like(1.0)] * 2)}, "expected mono audio"),
        ({"audio": np.zeros(0, dtype=np.float32)}, "audio\\[0\\]: the audio is empty"),
        ({"audio": np.array([0.1, np.nan] * 800, dtype=np.float32)}, "NaN or infinite"),
        (
            {"audio": [speech_like(1.0), speech_like(31.0)]},
            "audio\\[1\\]: 31.0 s is longer than the encoder window",
        ),
        ({"audio": "clip.wav"}, "expected a 1-D numpy array"),
        ({"audio": [speech_like(1.0)], "text": ["a", "b"]}, "1 audio clips but 2 transcripts"),
        ({"audio": speech_like(1.0), "task": "translate"}, "Unknown task 'translate'"),
        ({"text": "hello"}, "without audio"),
    ],
)
def test_bad_input_gets_clear_error(tiny_model_and_processor, kwargs, message):
    _, processor = tiny_model_and_processor
    with pytest.raises((ValueError, TypeError), match=message):
        processor(**kwargs)


def test_placeholder_mismatch_is_reported(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    inputs = processor(audio=speech_like(2.0))
    with pytest.raises(ValueError, match="audio placeholder tokens but no audio"):
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    other = processor(audio=speech_like(1.0))
    with pytest.raises(ValueError, match="holds 25 audio placeholder tokens but the audio gives 13"):
        model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            input_features=other["input_features"],
            input_features_mask=other["input_features_mask"],
        )


def test_tied_llm_stays_tied_after_assembly(tmp_path):
    folder = make_tiny_llm(tmp_path / "llm", "llama")
    standalone = AutoModelForCausalLM.from_pretrained(folder)
    assert standalone.config.tie_word_embeddings
    model, _ = make_tiny_tiny_audio(tmp_path / "assembled")
    llm = model.language_model
    assert llm.get_output_embeddings().weight.data_ptr() == llm.get_input_embeddings().weight.data_ptr()


def test_resaving_a_remote_code_model_keeps_every_code_file(tmp_path, tiny_model_dir):
    """A model loaded as remote code only imported some files; saving it again must still write the pipeline."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_model_dir, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules.")
    model.save_pretrained(tmp_path / "again")
    assert {"pipeline_asr.py", "modeling_tiny_audio.py", "processing_tiny_audio.py", "handler.py"} <= set(
        os.listdir(tmp_path / "again")
    )


# ---- joint CTC/attention decoding ------------------------------------------------------------------------------

BLANK, EOS = 0, 4  # a five-token vocabulary: blank, three word tokens, EOS


def ctc_labelling_probabilities(log_probs: torch.Tensor, blank: int) -> dict[tuple[int, ...], float]:
    """Probability of every CTC output over `log_probs` [frames, vocab], by enumerating all frame paths."""
    frames, vocab = log_probs.shape
    totals: dict[tuple[int, ...], float] = {}
    for path in itertools.product(range(vocab), repeat=frames):
        labels = tuple(k for t, k in enumerate(path) if k != blank and (t == 0 or path[t - 1] != k))
        totals[labels] = totals.get(labels, 0.0) + math.exp(sum(log_probs[t, k] for t, k in enumerate(path)))
    return totals


def expected_ctc_gains(totals: dict[tuple[int, ...], float], prefix: tuple[int, ...]) -> dict[int, float]:
    """log p(prefix + token...) - log p(prefix...) for each word token, and log p(exactly prefix) for EOS."""

    def starting_with(head: tuple[int, ...]) -> float:
        return sum(p for labels, p in totals.items() if labels[: len(head)] == head)

    def log(p: float) -> float:
        return math.log(p) if p > 0 else -math.inf  # more tokens than a short clip has frames

    base = log(starting_with(prefix))
    gains = {token: log(starting_with((*prefix, token))) - base for token in (1, 2, 3)}
    gains[EOS] = log(totals.get(prefix, 0.0)) - base
    return gains


@pytest.fixture(scope="module")
def ctc_toy():
    """Two clips of 5 and 3 audio frames (the second padded to 5) over a random five-token embedding table."""
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(5, 3, generator=generator)
    audio = torch.randn(2, 5, 3, generator=generator)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    frame_log_probs = embedding_ctc_logits(audio, embeddings, embeddings.pow(2).sum(-1)).log_softmax(-1)
    totals = [ctc_labelling_probabilities(frame_log_probs[i, : int(mask[i].sum())], BLANK) for i in range(2)]
    return audio, mask, embeddings, totals


def score_prefixes(scorer: CTCPrefixScorer, prefixes: list[tuple[int, ...]]) -> torch.Tensor:
    """One decoding step with a flat LLM: rows hold a two-token prompt and then their prefix."""
    input_ids = torch.tensor([[7, 7, *prefix] for prefix in prefixes])
    return scorer(input_ids, torch.zeros(len(prefixes), 5))


@pytest.mark.parametrize("prefix", [(), (2,), (2, 2), (1, 3)])
def test_ctc_prefix_scores_match_enumerated_paths(ctc_toy, prefix):
    """With weight 1 a token's score is its CTC prefix gain: checked against all 5^5 paths of each clip, for two
    beams per clip, including a repeated token (which needs a blank between) and a padded clip."""
    audio, mask, embeddings, totals = ctc_toy
    scorer = CTCPrefixScorer(audio, mask, embeddings, BLANK, [EOS], weight=1.0, prompt_length=2, top_k=5)
    scores = score_prefixes(scorer, [prefix] * 4)  # rows 0-1: clip 0; rows 2-3: clip 1
    for row in range(4):
        expected = expected_ctc_gains(totals[row // 2], prefix)
        for token, gain in expected.items():
            assert scores[row, token].item() == pytest.approx(gain, abs=1e-4)
        assert scores[row, BLANK] == -torch.inf  # the blank is never emitted as a token


def test_ctc_prefix_states_carry_over_between_steps(ctc_toy):
    """Scoring step by step (states cached from the step before) gives what scoring each prefix afresh gives."""
    audio, mask, embeddings, totals = ctc_toy
    scorer = CTCPrefixScorer(
        audio[:1], mask[:1], embeddings, BLANK, [EOS], weight=1.0, prompt_length=2, top_k=5
    )
    for prefix in [(), (1,), (1, 3), (1, 3, 3)]:
        scores = score_prefixes(scorer, [prefix])
        expected = expected_ctc_gains(totals[0], prefix)
        assert [scores[0, t].item() for t in expected] == pytest.approx(list(expected.values()), abs=1e-4)


def test_ctc_weight_mixes_llm_and_ctc_and_rules_out_the_rest(ctc_toy):
    audio, mask, embeddings, totals = ctc_toy
    scorer = CTCPrefixScorer(
        audio[:1], mask[:1], embeddings, BLANK, [EOS], weight=0.25, prompt_length=2, top_k=2
    )
    llm_logits = torch.tensor([[0.0, 3.0, 2.0, 1.0, 0.5]])
    scores = scorer(torch.tensor([[7, 7]]), llm_logits)
    llm = llm_logits.log_softmax(-1)[0]
    expected = expected_ctc_gains(totals[0], ())
    for token in (1, 2, EOS):  # the LLM's two best word tokens, and EOS
        assert scores[0, token].item() == pytest.approx(0.75 * llm[token] + 0.25 * expected[token], abs=1e-4)
    assert scores[0, 3] == -torch.inf and scores[0, BLANK] == -torch.inf


def test_joint_ctc_decoding_batches_like_single_clips(tmp_path):
    """generate(ctc_weight=...) runs the encoder once, scores every clip against its own audio (padding ignored),
    and works with beam search; a checkpoint without a CTC blank says why it cannot."""
    model, processor = make_tiny_tiny_audio(tmp_path)
    torch.manual_seed(0)
    for param in model.multi_modal_projector.parameters():
        param.data.normal_(0, 0.5)
    settings = {"max_new_tokens": 5, "ctc_weight": 0.5}
    with pytest.raises(ValueError, match="ctc_blank_token_id"):
        model.generate(**processor(audio=CLIPS[0]), **settings)
    model.config.ctc_blank_token_id = processor.tokenizer(" ", add_special_tokens=False)["input_ids"][0]
    batch = processor(audio=CLIPS)
    batched = model.generate(**batch, **settings)[:, batch["input_ids"].shape[1] :]
    llm_only = model.generate(**batch, max_new_tokens=5)[:, batch["input_ids"].shape[1] :]
    assert not torch.equal(batched, llm_only)  # the CTC side changes what is said
    for row, clip in enumerate(CLIPS):
        inputs = processor(audio=clip)
        single = model.generate(**inputs, **settings)[0, inputs["input_ids"].shape[1] :]
        width = min(len(single), batched.shape[1])
        assert batched[row, :width].tolist() == single[:width].tolist()
    beams = model.generate(**batch, **settings, num_beams=3)
    assert beams.shape[0] == len(CLIPS)
    # The config's weight applies to audio only: a text prompt decodes with the LLM alone, unless asked otherwise.
    model.generation_config.ctc_decoding_weight = 0.5
    text = processor.text_prompt("the quick brown fox")
    assert (
        model.generate(**text, max_new_tokens=3).tolist()
        == model.generate(**text, max_new_tokens=3, ctc_weight=0.0).tolist()
    )
    with pytest.raises(ValueError, match="needs audio"):
        model.generate(**text, max_new_tokens=3, ctc_weight=0.5)


@pytest.mark.parametrize("settings", [{"num_beams": 3}, {"num_beams": 3, "num_return_sequences": 2}])
def test_beam_search_prefills_each_clip_once(tmp_path, monkeypatch, settings):
    """Beam search repeats every clip's rows; the prompt (audio included) is run once per clip and its cache
    repeated, which gives the same beams and scores as prefilling every copy."""
    model, processor = make_tiny_tiny_audio(tmp_path)
    torch.manual_seed(0)
    for param in model.multi_modal_projector.parameters():
        param.data.normal_(0, 0.5)
    batch = processor(audio=CLIPS)
    settings = {**settings, "max_new_tokens": 6, "output_scores": True, "return_dict_in_generate": True}
    encoder_rows = []
    model.audio_tower.conv1.register_forward_hook(  # the encoder's first layer
        lambda module, args, output: encoder_rows.append(args[0].shape[0])
    )
    once = model.generate(**batch, **settings)
    assert encoder_rows == [len(CLIPS)]  # the encoder (and the whole prompt) ran on one copy of each clip

    monkeypatch.setattr(TinyAudioForConditionalGeneration, "_prefill", GenerationMixin._prefill)
    every_copy = model.generate(**batch, **settings)
    assert encoder_rows[1] == len(CLIPS) * settings["num_beams"]
    assert once.sequences.tolist() == every_copy.sequences.tolist()
    torch.testing.assert_close(once.sequences_scores, every_copy.sequences_scores, atol=1e-4, rtol=1e-4)
