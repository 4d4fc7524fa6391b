"""Voice-attribute heads and voice tokens (issue 30): the heads classify each clip's voice from its encoder frames,
and the LLM reads their answer as its own embeddings of the words naming the values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import speech_like
from datasets import Audio, Dataset, DatasetDict
from huggingface_hub.errors import StrictDataclassClassValidationError
from test_core import run_fresh
from test_train import NO_EVAL, RATE, Snapshot, base_args, llm_calls, speech_rows

import train
from modeling_tiny_audio import TinyAudioForConditionalGeneration, frame_statistics
from processing_tiny_audio import IGNORE_INDEX, TinyAudioProcessor
from testing.tiny_models import make_tiny_encoder, make_tiny_llm, make_tiny_tiny_audio
from training.collator import SpeechCollator
from training.feature_cache import LAYER_STATISTICS, FeatureStore, build_feature_cache, encoder_key
from training.prefix_cache import PromptPrefixCache
from training.preflight import PreflightError
from training.run import add_voice_attributes, parse_voice_attributes

# Values out of alphabetical order: a saved config sorts mappings' keys, and the heads' order must survive it.
WORDS = {"noise": {"quiet": "quiet", "noisy": "noisy"}, "gender": {"male": "man", "female": "woman"}}
CLIPS = [speech_like(1.2, seed=1), speech_like(2.1, seed=2)]


@pytest.fixture
def voice_model(tmp_path):
    model, processor = make_tiny_tiny_audio(tmp_path)
    add_voice_attributes(model, processor, WORDS)
    return model, processor


def word_embedding(model, processor, word: str) -> torch.Tensor:
    ids = processor.tokenizer(f" {word}", add_special_tokens=False)["input_ids"]
    return model.get_input_embeddings().weight[ids].mean(0)


def llm_inputs(model, inputs) -> torch.Tensor:
    """The embeddings the LLM reads for `inputs`."""
    seen = {}

    def keep(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].detach()

    handle = model.language_model.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen["embeds"]


def force_heads(model, answers: dict[str, str]) -> None:
    """Makes every head answer `answers[attribute]`, whatever the audio."""
    classifier = model.multi_modal_projector.voice_attributes.classifier
    bias = []
    for entry in model.config.voice_attributes:
        bias += [20.0 if value == answers[entry["attribute"]] else 0.0 for value in entry["values"]]
    with torch.no_grad():
        classifier.weight.zero_()
        classifier.bias.copy_(torch.tensor(bias))


def test_describe_prompts_carry_one_voice_token_per_attribute_after_the_audio_and_transcripts_none(
    voice_model,
):
    model, processor = voice_model
    inputs = processor(audio=CLIPS, task="describe")
    voice_id, audio_id = model.config.voice_token_id, model.config.audio_token_id
    assert processor.voice_tokens == 2 and voice_id != audio_id
    for row in inputs["input_ids"]:
        voice = (row == voice_id).nonzero().flatten()
        last_audio = int((row == audio_id).nonzero().max())
        assert voice.tolist() == [last_audio + 1, last_audio + 2]
    assert not (processor(audio=CLIPS, task="transcribe")["input_ids"] == voice_id).any()
    # A transcript's inputs are those of the same model without heads: its words cannot leak into transcripts.
    plain = make_tiny_tiny_audio(Path(model.config.text_model_id).parent / "plain")[1]
    torch.testing.assert_close(
        processor(audio=CLIPS, task="transcribe")["input_ids"],
        plain(audio=CLIPS, task="transcribe")["input_ids"],
    )


def test_a_batch_mixing_tasks_gives_voice_tokens_to_its_describe_rows_only(voice_model):
    model, processor = voice_model
    force_heads(model, {"noise": "noisy", "gender": "female"})
    rows = [
        {"audio": clip, "text": "words", "task": task, "facts": ""}
        for clip, task in zip(CLIPS, ("transcribe", "describe"), strict=True)
    ]
    batch = SpeechCollator(processor, voice_attributes=model.config.voice_attributes)(rows)
    read = llm_inputs(model, batch)
    positions = batch["input_ids"] == model.config.voice_token_id
    assert positions.sum(-1).tolist() == [0, 2]
    torch.testing.assert_close(read[1][positions[1]][1], word_embedding(model, processor, "woman"))


def test_the_llm_reads_each_heads_answer_as_its_embedding_of_the_words(voice_model):
    model, processor = voice_model
    inputs = processor(audio=CLIPS, task="describe")
    positions = inputs["input_ids"] == model.config.voice_token_id
    for answers in ({"noise": "noisy", "gender": "male"}, {"noise": "quiet", "gender": "female"}):
        force_heads(model, answers)
        read = llm_inputs(model, inputs)[positions].view(len(CLIPS), 2, -1)
        for clip in read:  # noise first, then gender: the order the heads were given
            torch.testing.assert_close(
                clip[0], word_embedding(model, processor, WORDS["noise"][answers["noise"]])
            )
            torch.testing.assert_close(
                clip[1], word_embedding(model, processor, WORDS["gender"][answers["gender"]])
            )


def test_an_unsure_head_gives_the_probability_weighted_mixture(voice_model):
    model, processor = voice_model
    inputs = processor(audio=CLIPS[:1], task="describe")
    logits = model(**inputs).voice_attribute_logits
    noise = logits[0, :2].softmax(-1)
    expected = noise[0] * word_embedding(model, processor, "quiet") + noise[1] * word_embedding(
        model, processor, "noisy"
    )
    read = llm_inputs(model, inputs)[inputs["input_ids"] == model.config.voice_token_id]
    torch.testing.assert_close(read[0], expected)


def test_heads_read_the_whole_clip_whatever_the_padding(voice_model):
    model, _ = voice_model
    frames = torch.randn(1, 30, model.config.audio_config.hidden_size)
    mask = torch.ones(1, 30, dtype=torch.bool)
    padded = torch.cat([frames, 5 * torch.randn(1, 20, frames.shape[-1])], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(1, 20, dtype=torch.bool)], dim=1)
    alone = model.voice_attribute_logits(frames, mask)
    torch.testing.assert_close(model.voice_attribute_logits(padded, padded_mask), alone)
    assert not torch.allclose(model.voice_attribute_logits(frames.flip(-1), mask), alone)


def collated(processor, model, facts: list[dict | None]) -> dict:
    rows = [
        {"audio": clip, "text": "a man speaking", "task": "describe", "facts": json.dumps(f) if f else ""}
        for clip, f in zip(CLIPS, facts, strict=True)
    ]
    return SpeechCollator(processor, voice_attributes=model.config.voice_attributes)(rows)


def test_labels_come_from_each_rows_facts_and_unknown_values_are_ignored(voice_model):
    model, processor = voice_model
    batch = collated(processor, model, [{"gender": "female", "noise": "noisy", "accent": "british"}, None])
    assert batch["voice_attribute_targets"].tolist() == [[1, 1], [IGNORE_INDEX, IGNORE_INDEX]]
    batch = collated(processor, model, [{"gender": "unknown"}, {"noise": "quiet"}])
    assert batch["voice_attribute_targets"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX], [0, IGNORE_INDEX]]


def test_the_heads_loss_joins_the_training_loss_and_its_warm_up_never_runs_the_llm(voice_model):
    model, processor = voice_model
    model.config.voice_attribute_loss_weight = 0.5
    batch = collated(processor, model, [{"gender": "female", "noise": "noisy"}, {"gender": "male"}])
    model.train()
    outputs = model(**batch)
    logits = outputs.voice_attribute_logits
    expected = (
        torch.nn.functional.cross_entropy(logits[:1, :2], torch.tensor([1]))
        + torch.nn.functional.cross_entropy(logits[:, 2:], torch.tensor([1, 0]))
    ) / 2
    torch.testing.assert_close(outputs.voice_attribute_loss, expected)
    plain = model(**{k: v for k, v in batch.items() if k != "voice_attribute_targets"}).loss
    torch.testing.assert_close(outputs.loss, plain + 0.5 * expected)
    outputs.loss.backward()
    heads = model.multi_modal_projector.voice_attributes
    assert all(p.grad is not None and p.grad.any() for p in heads.parameters())

    with llm_calls(model) as calls:
        warm_up = model(**batch, voice_attributes_only=True)
    assert not calls and warm_up.logits is None
    torch.testing.assert_close(warm_up.loss, expected)
    unlabelled = collated(processor, model, [None, None])
    assert model(**unlabelled, voice_attributes_only=True).loss == 0


def test_a_saved_model_keeps_its_heads_order_and_loads_in_a_fresh_process(voice_model, tmp_path):
    model, processor = voice_model
    force_heads(model, {"noise": "noisy", "gender": "female"})
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())["voice_attributes"]
    assert [(e["attribute"], e["values"]) for e in saved] == [
        ("noise", ["quiet", "noisy"]),
        ("gender", ["male", "female"]),
    ]
    reloaded = TinyAudioForConditionalGeneration.from_pretrained(folder).eval()
    reloaded_processor = TinyAudioProcessor.from_pretrained(folder)
    inputs = reloaded_processor(audio=CLIPS, task="describe")
    torch.testing.assert_close(inputs["input_ids"], processor(audio=CLIPS, task="describe")["input_ids"])
    torch.testing.assert_close(llm_inputs(reloaded, inputs), llm_inputs(model, inputs))
    # The remote code reads the voice tokens too (made the default task, its prompt carries them).
    model.config.default_task = processor.default_task = "describe"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    equal_length = [speech_like(1.5, seed=7), speech_like(1.5, seed=8)]
    expected = model(**processor(audio=equal_length)).logits
    torch.testing.assert_close(run_fresh(str(folder), tmp_path, equal_length), expected, rtol=0, atol=0)


def test_describe_generation_with_voice_tokens_runs_with_beams(voice_model):
    model, processor = voice_model
    inputs = processor(audio=CLIPS, task="describe")
    generated = model.generate(**inputs, max_new_tokens=4, num_beams=3, do_sample=False)
    assert generated.shape[0] == len(CLIPS) and generated.shape[1] > inputs["input_ids"].shape[1]


def test_bad_voice_attributes_are_named(voice_model, tmp_path):
    model, processor = voice_model
    with pytest.raises(PreflightError, match="two values or more"):
        parse_voice_attributes("{gender: {female: woman}}")
    with pytest.raises(PreflightError, match="voice_attributes must map"):
        parse_voice_attributes("[gender, accent]")
    assert parse_voice_attributes("{a: {x: ' one ', y: two}}") == {"a": {"x": "one", "y": "two"}}
    with pytest.raises(ValueError, match="voice_attributes is .*cannot change it"):
        model.add_voice_attributes([{"attribute": "rate", "values": ["a", "b"], "token_ids": [[1], [2]]}], 5)
    config = model.config
    with pytest.raises(StrictDataclassClassValidationError, match="token ids of the LLM"):
        type(config)(**{**config.to_dict(), "voice_attributes": [
            {"attribute": "gender", "values": ["female", "male"], "token_ids": [[1], [10**9]]}
        ]})  # fmt: skip
    with pytest.raises(StrictDataclassClassValidationError, match="two or more"):
        type(config)(**{**config.to_dict(), "voice_attributes": [
            {"attribute": "gender", "values": ["female"], "token_ids": [[1]]}
        ]})  # fmt: skip

    inputs = processor(audio=CLIPS, task="describe")
    extra = inputs["input_ids"].clone()
    extra[0, 0] = config.voice_token_id
    with pytest.raises(ValueError, match=r"\[3, 2\] voice placeholder tokens per row"):
        model(**{**inputs, "input_ids": extra})
    plain, plain_processor = make_tiny_tiny_audio(tmp_path / "plain")
    plain_inputs = plain_processor(audio=CLIPS)
    plain_inputs["input_ids"][0, 0] = config.voice_token_id
    plain.config.voice_token_id = config.voice_token_id
    with pytest.raises(ValueError, match="no voice-attribute heads"):
        plain(**plain_inputs)


def train_workspace(tmp_path: Path, rows: dict[str, list], name: str = "data") -> dict[str, str]:
    """A tiny encoder and LLM, and `rows` saved as the train split of corpus `name`: what `base_args` reads."""
    save_train_split(rows, tmp_path / name)
    return {
        "encoder": make_tiny_encoder(tmp_path / "encoder"),
        "llm": make_tiny_llm(tmp_path / "llm"),
        "data": str(tmp_path / name),
    }


def save_train_split(rows: dict[str, list], folder: Path) -> None:
    DatasetDict({"train": Dataset.from_dict(rows)}).cast_column(
        "audio", Audio(sampling_rate=RATE)
    ).save_to_disk(folder)


def test_train_py_adds_heads_warms_them_up_then_trains_all_on_mixed_sources(tmp_path):
    """One source has facts and one has none: they mix; the heads train alone for the warm-up steps, then with the
    projector; the saved model and processor carry the heads and the voice tokens."""
    described = speech_rows(12, 3)
    described["facts"] = [json.dumps({"gender": ("female", "male")[i % 2]}) for i in range(12)]
    workspace = train_workspace(tmp_path, described, "described")
    save_train_split(speech_rows(12, 4), tmp_path / "plain")
    sources = json.dumps(
        [{"path": str(tmp_path / name), "split": "train"} for name in ("described", "plain")]
    )
    out, snapshot = str(tmp_path / "out"), Snapshot()
    words = json.dumps({"gender": {"female": "woman", "male": "man"}})
    flags = ("--train_datasets", sources, "--voice_attributes", words, "--max_steps", "4")
    warm_up = Snapshot()
    train.run(
        base_args(workspace, str(tmp_path / "warm"), *NO_EVAL, *flags, "--voice_attributes_only_steps", "4"),
        callbacks=[warm_up],
    )
    changed = {k for k in warm_up.before if not torch.equal(warm_up.before[k], warm_up.after[k])}
    assert changed and all(k.startswith("multi_modal_projector.voice_attributes.") for k in changed)

    train.run(
        base_args(workspace, out, *NO_EVAL, *flags, "--voice_attributes_only_steps", "2"),
        callbacks=[snapshot],
    )
    changed = {k for k in snapshot.before if not torch.equal(snapshot.before[k], snapshot.after[k])}
    assert any(k.startswith("multi_modal_projector.voice_attributes.") for k in changed)
    assert any(k.startswith("multi_modal_projector.linear_") for k in changed)
    state = json.loads(Path(out, "trainer_state.json").read_text())
    assert any("voice_attribute_loss" in entry for entry in state["log_history"])
    saved = json.loads(Path(out, "config.json").read_text())
    assert [(e["attribute"], e["values"]) for e in saved["voice_attributes"]] == [
        ("gender", ["female", "male"])
    ]
    assert TinyAudioProcessor.from_pretrained(out).voice_tokens == 1
    reloaded = TinyAudioForConditionalGeneration.from_pretrained(out)
    torch.testing.assert_close(
        reloaded.state_dict()["multi_modal_projector.voice_attributes.classifier.weight"],
        snapshot.after["multi_modal_projector.voice_attributes.classifier.weight"],
    )


def test_the_probe_reads_each_heads_answer_per_clip(voice_model, tmp_path):
    from benchmarks.probe_voice_attributes import head_answers

    model, processor = voice_model
    features = processor.extract_features(CLIPS)
    batches = [
        model.encode_audio(
            features["input_features"], features["input_features_mask"], output_layer_statistics=True
        )
    ]
    force_heads(model, {"noise": "noisy", "gender": "female"})
    assert head_answers(model, batches) == {"noise": ["noisy", "noisy"], "gender": ["female", "female"]}
    plain, _ = make_tiny_tiny_audio(tmp_path / "plain")
    assert head_answers(plain, batches) == {}


def test_layer_statistics_summarise_each_of_whispers_layers_as_the_library_runs_them(tmp_path):
    """What mixing heads read (and the probe's per-layer columns): one row per encoder layer and its input, each the
    mean and spread of the clip's real frames in the library's own hidden states; the last is the encoder's output,
    which heads without the mix read."""
    model, processor = make_tiny_tiny_audio(tmp_path, encoder_layers=2)
    features = processor.extract_features(CLIPS)
    hidden, mask, statistics = model.encode_audio(
        features["input_features"], features["input_features_mask"], output_layer_statistics=True
    )
    width = model.config.audio_config.hidden_size
    assert (
        statistics.shape
        == (len(CLIPS), model.config.encoder_statistics_layers, 2 * width)
        == (2, 3, 2 * width)
    )
    library = model.audio_tower(features["input_features"], output_hidden_states=True).hidden_states
    for layer, states in enumerate(library):
        torch.testing.assert_close(statistics[:, layer], frame_statistics(states, mask), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(statistics[:, -1], frame_statistics(hidden, mask))
    assert not torch.allclose(statistics[:, 0], statistics[:, -1])


def test_a_voice_prompt_opens_the_voice_tokens_and_survives_saving(voice_model, tmp_path):
    model, processor = voice_model
    model.add_voice_prompt(3)
    processor.add_voice_tokens(model.config.voice_token_count)
    prompt = model.multi_modal_projector.voice_attributes.prompt
    assert prompt.shape == (3, model.config.text_config.hidden_size) and prompt.requires_grad
    inputs = processor(audio=CLIPS, task="describe")
    assert ((inputs["input_ids"] == model.config.voice_token_id).sum(-1) == 5).all()
    force_heads(model, {"noise": "noisy", "gender": "female"})
    embeds = llm_inputs(model, inputs)
    voice = embeds[inputs["input_ids"] == model.config.voice_token_id].view(2, 5, -1)
    for row in voice:  # the learned prompt first, then the attributes' words in the config's order
        torch.testing.assert_close(row[:3], prompt.detach())
        torch.testing.assert_close(row[3], word_embedding(model, processor, "noisy"), atol=1e-4, rtol=0)
        torch.testing.assert_close(row[4], word_embedding(model, processor, "woman"), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="cannot change it to 4"):
        model.add_voice_prompt(4)

    model.save_pretrained(tmp_path / "saved")
    processor.save_pretrained(tmp_path / "saved")
    reloaded = TinyAudioForConditionalGeneration.from_pretrained(tmp_path / "saved")
    assert reloaded.config.voice_prompt_length == 3
    torch.testing.assert_close(reloaded.multi_modal_projector.voice_attributes.prompt, prompt)
    assert TinyAudioProcessor.from_pretrained(tmp_path / "saved").voice_tokens == 5


def test_a_voice_prompt_needs_voice_heads(tmp_path):
    plain, _ = make_tiny_tiny_audio(tmp_path)
    with pytest.raises(ValueError, match="add voice_attributes first"):
        plain.add_voice_prompt(2)


def voice_adapter_calls(model) -> list[int]:
    """Counts, while installed, the forwards of the voice adapter's first LoRA matrix."""
    calls = []
    layer = model._lora_layers()[0]
    layer.lora_A["voice"].register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_a_voice_adapter_changes_voice_tasks_only_and_survives_saving(tmp_path):
    model, processor = make_tiny_tiny_audio(tmp_path / "tiny", lora_rank=2)
    add_voice_attributes(model, processor, WORDS)
    describe, transcribe = processor(audio=CLIPS, task="describe"), processor(audio=CLIPS, task="transcribe")
    with torch.no_grad():
        plain = {"describe": model(**describe).logits, "transcribe": model(**transcribe).logits}
    model.add_voice_adapter(3)
    adapter = {name: p for name, p in model.named_parameters() if ".voice." in name}
    assert adapter and all(p.requires_grad for p in adapter.values())
    assert {p.shape[0] for name, p in adapter.items() if ".lora_A." in name} == {3}
    with torch.no_grad():
        # LoRA's B starts at zero: the new adapter changes nothing until it trains.
        torch.testing.assert_close(model(**describe).logits, plain["describe"], atol=0, rtol=0)
        for parameter in adapter.values():
            parameter.normal_(std=0.5)
        assert not torch.allclose(model(**describe).logits, plain["describe"])
        torch.testing.assert_close(model(**transcribe).logits, plain["transcribe"], atol=0, rtol=0)

    calls = voice_adapter_calls(model)
    model.generate(**transcribe, max_new_tokens=3, num_beams=2, do_sample=False)
    assert not calls
    described = model.generate(**describe, max_new_tokens=3, num_beams=2, do_sample=False)
    assert len(calls) > 1  # the prompt and the decoding steps
    assert all(layer.active_adapters == ["default"] for layer in model._lora_layers())  # off again afterwards

    model.merge_lora()  # the adapters stay apart: peft would skip an unmerged adapter on a merged layer
    assert not model.lora_merged
    mixed = [
        {"audio": clip, "text": "words", "task": task, "facts": ""}
        for clip, task in zip(CLIPS, ("transcribe", "describe"), strict=True)
    ]
    mixed_batch = SpeechCollator(processor, voice_attributes=model.config.voice_attributes)(mixed)
    with pytest.raises(ValueError, match=r"rows \[1\] of this batch ask a voice task"):
        model(**mixed_batch)
    with pytest.raises(ValueError, match="cannot change it to 4"):
        model.add_voice_adapter(4)
    with pytest.raises(ValueError, match="LoRA cannot widen"):
        model.extend_lora(["q_proj", "v_proj", "o_proj"])

    model.save_pretrained(tmp_path / "saved")
    processor.save_pretrained(tmp_path / "saved")
    reloaded = TinyAudioForConditionalGeneration.from_pretrained(tmp_path / "saved").eval()
    assert reloaded.config.voice_lora_rank == 3
    torch.testing.assert_close(reloaded.generate(**describe, max_new_tokens=3, num_beams=2), described)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**transcribe).logits, plain["transcribe"], atol=0, rtol=0)


def test_int8_serving_keeps_the_voice_adapter_for_voice_tasks(voice_model):
    model, processor = voice_model
    model.add_voice_adapter(2)
    model.quantize_llm_int8()
    calls = voice_adapter_calls(model)
    model.generate(**processor(audio=CLIPS, task="transcribe"), max_new_tokens=2, num_beams=2)
    assert not calls
    model.generate(**processor(audio=CLIPS, task="describe"), max_new_tokens=2, num_beams=2)
    assert calls


def test_the_prompt_prefix_cache_serves_a_voice_adapter_models_other_tasks_only(tmp_path):
    """The cached prefix is computed with the voice adapter off: right for transcripts, which keep the speed-up, and
    wrong for voice prompts, which skip it."""
    model, processor = make_tiny_tiny_audio(tmp_path, lora_rank=2)
    add_voice_attributes(model, processor, WORDS)
    model.add_voice_adapter(2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_B.voice." in name:
                parameter.normal_(std=0.5)
    cache = PromptPrefixCache(model, model.config.audio_token_id)
    for task in ("transcribe", "describe"):
        rows = [{"audio": clip, "text": "words", "task": task, "facts": ""} for clip in CLIPS]
        batch = SpeechCollator(processor, voice_attributes=model.config.voice_attributes)(rows)
        applied = cache.apply(batch)
        trimmed = applied["input_ids"].shape[1] < batch["input_ids"].shape[1]
        assert trimmed == (task == "transcribe"), task
        with torch.no_grad():
            torch.testing.assert_close(model(**applied).loss, model(**batch).loss, rtol=1e-4, atol=1e-5)


def test_a_voice_adapter_needs_voice_heads(tmp_path):
    plain, _ = make_tiny_tiny_audio(tmp_path)
    with pytest.raises(ValueError, match="turn a voice adapter on: add voice_attributes first"):
        plain.add_voice_adapter(2)


def test_train_voice_only_trains_the_voice_path_and_transcribes_exactly_as_before(tmp_path):
    """A model with LoRA and heads gains a voice prompt and trains only its voice path on describe rows: every
    other weight, and so every transcript, stays the starting model's, token for token."""
    described = speech_rows(8, 3)
    described["facts"] = [json.dumps({"gender": ("female", "male")[i % 2]}) for i in range(8)]
    workspace = train_workspace(tmp_path, described, "described")
    words = json.dumps({"gender": {"female": "woman", "male": "man"}})
    start = str(tmp_path / "start")
    train.run(
        base_args(
            workspace, start, *NO_EVAL, "--voice_attributes", words, "--lora_rank", "2", "--max_steps", "2"
        )
    )
    describe = json.dumps([{"path": workspace["data"], "split": "train", "task": "describe"}])
    out, snapshot = str(tmp_path / "voice"), Snapshot()
    flags = ("--model_name_or_path", start, "--train_datasets", describe, "--max_steps", "3")
    train.run(
        base_args(
            workspace,
            out,
            *NO_EVAL,
            *flags,
            *("--voice_prompt_length", "2", "--voice_lora_rank", "2", "--train_voice_only"),
        ),
        callbacks=[snapshot],
    )
    changed = {k for k in snapshot.before if not torch.equal(snapshot.before[k], snapshot.after[k])}
    assert "multi_modal_projector.voice_attributes.prompt" in changed
    assert any(".lora_B.voice." in k for k in changed)  # the voice adapter trained (B leaves zero)
    assert all(k.startswith("multi_modal_projector.voice_attributes.") or ".voice." in k for k in changed)

    before = TinyAudioForConditionalGeneration.from_pretrained(start)
    after = TinyAudioForConditionalGeneration.from_pretrained(out)
    assert after.config.voice_prompt_length == 2 and after.config.lora_rank == 2
    assert after.config.voice_lora_rank == 2
    for name, tensor in before.state_dict().items():
        if not name.startswith("multi_modal_projector.voice_attributes."):
            torch.testing.assert_close(after.state_dict()[name], tensor, atol=0, rtol=0, msg=name)
    transcripts = []
    for folder, model in ((start, before), (out, after)):
        inputs = TinyAudioProcessor.from_pretrained(folder)(audio=CLIPS, task="transcribe")
        transcripts.append(model.generate(**inputs, max_new_tokens=6, num_beams=1, do_sample=False))
    torch.testing.assert_close(transcripts[1], transcripts[0], atol=0, rtol=0)
    assert TinyAudioProcessor.from_pretrained(out).voice_tokens == 3


def test_train_py_refuses_mixed_tasks_for_a_voice_adapter_before_training(tmp_path):
    rows = speech_rows(4, 3)
    rows["facts"] = [json.dumps({"gender": "female"})] * 4
    workspace = train_workspace(tmp_path, rows)
    both = json.dumps(
        [{"path": workspace["data"], "split": "train", "task": task} for task in ("transcribe", "describe")]
    )
    words = json.dumps({"gender": {"female": "woman", "male": "man"}})
    flags = ("--train_datasets", both, "--voice_attributes", words, "--voice_lora_rank", "2")
    with pytest.raises(PreflightError, match=r"mix voice tasks \(describe\) with others \(transcribe\)"):
        train.run(base_args(workspace, str(tmp_path / "out"), *NO_EVAL, *flags))


def test_train_voice_only_needs_voice_heads(tmp_path):
    workspace = train_workspace(tmp_path, speech_rows(4, 3))
    with pytest.raises(PreflightError, match="train_voice_only trains the voice path"):
        train.run(base_args(workspace, str(tmp_path / "out"), *NO_EVAL, "--train_voice_only"))


def mixing_model(tmp_path):
    """A tiny model whose heads read every encoder layer (`voice_layer_mix`), with a voice prompt that the switch
    must keep."""
    model, processor = make_tiny_tiny_audio(tmp_path, encoder_layers=2)
    add_voice_attributes(model, processor, WORDS)
    model.add_voice_prompt(2)
    processor.add_voice_tokens(model.config.voice_token_count)
    prompt = model.multi_modal_projector.voice_attributes.prompt
    model.mix_voice_layers()
    assert model.multi_modal_projector.voice_attributes.prompt is prompt
    return model.eval(), processor


def test_mixing_heads_read_each_attribute_from_its_own_mix_of_layers(tmp_path):
    model, processor = mixing_model(tmp_path)
    heads = model.multi_modal_projector.voice_attributes
    assert heads.layer_weights.shape == (2, 3) and heads.layer_weights.requires_grad
    with torch.no_grad():  # noise reads the input layer, gender the output
        heads.layer_weights.copy_(torch.tensor([[30.0, 0.0, 0.0], [0.0, 0.0, 30.0]]))
    features = processor.extract_features(CLIPS)
    _, _, statistics = model.encode_audio(
        features["input_features"], features["input_features_mask"], output_layer_statistics=True
    )
    inputs = processor(audio=CLIPS, task="describe")
    logits = model(**inputs).voice_attribute_logits
    torch.testing.assert_close(logits, heads(statistics))
    for layer, unchanged, changed in ((0, slice(2, 4), slice(0, 2)), (2, slice(0, 2), slice(2, 4))):
        moved = statistics.clone()
        moved[:, layer] = torch.randn_like(moved[:, layer])
        torch.testing.assert_close(heads(moved)[:, unchanged], logits[:, unchanged])
        assert not torch.allclose(heads(moved)[:, changed], logits[:, changed])


def test_mixing_heads_decode_alike_from_features_or_from_encoder_outputs_given_ahead(tmp_path):
    """Beam search and joint CTC decoding hand the prompt's forward encoder outputs computed ahead of time: the
    per-layer statistics travel with them, and without them the model says what is missing."""
    model, processor = mixing_model(tmp_path)
    torch.manual_seed(0)
    for parameter in model.multi_modal_projector.voice_attributes.parameters():
        parameter.data.normal_(0, 0.5)
    inputs = processor(audio=CLIPS, task="describe")
    settings = {"max_new_tokens": 4, "num_beams": 3, "do_sample": False}
    live = model.generate(**inputs, **settings)
    features = {key: inputs.pop(key) for key in ("input_features", "input_features_mask")}
    hidden, mask, statistics = model.encode_audio(**features, output_layer_statistics=True)
    ahead = model.generate(
        **inputs,
        encoder_hidden_states=hidden,
        encoder_mask=mask,
        encoder_layer_statistics=statistics,
        **settings,
    )
    torch.testing.assert_close(ahead, live, atol=0, rtol=0)
    with pytest.raises(ValueError, match="pass encoder_layer_statistics too"):
        model(**inputs, encoder_hidden_states=hidden, encoder_mask=mask)
    model.config.ctc_blank_token_id = processor.tokenizer(" ", add_special_tokens=False)["input_ids"][0]
    joint = model.generate(**inputs, **features, **settings, ctc_weight=0.5)
    assert joint.shape[0] == len(CLIPS)


def test_mixing_heads_train_from_the_feature_cache_as_from_live_audio(tmp_path):
    """The cache keeps each clip's per-layer statistics beside its frames; a cache made before them (frames only)
    is completed for heads that read them, and the heads read the same from it as from live audio."""
    model, processor = mixing_model(tmp_path)
    rows = Dataset.from_dict(
        {"audio": [{"array": clip, "sampling_rate": RATE} for clip in CLIPS], "audio_hash": ["a", "b"]}
    )
    old = FeatureStore(str(tmp_path / "cache"), encoder_key(model, processor))
    features = processor.extract_features(CLIPS)
    hidden, mask = model.encode_audio(features["input_features"], features["input_features_mask"])
    old.write_shard({"a": hidden[0, : int(mask[0].sum())].half().contiguous()})  # a cache from before
    store = build_feature_cache(model, processor, rows.select([0]), str(tmp_path / "cache"))
    assert LAYER_STATISTICS not in "".join(
        store._index
    )  # heads without the mix: an old cache is used as it is
    store = build_feature_cache(model, processor, rows, str(tmp_path / "cache"), layer_statistics=True)
    assert len(store) == 2 and all(h + LAYER_STATISTICS in store for h in ("a", "b"))
    batch = [
        {"audio": clip, "audio_hash": h, "text": "x", "task": "describe"}
        for clip, h in zip(CLIPS, "ab", strict=True)
    ]
    cached = SpeechCollator(processor, store, layer_statistics=True)(batch)
    assert cached["encoder_layer_statistics"].shape == (2, 3, 2 * model.config.audio_config.hidden_size)
    live = SpeechCollator(processor)(batch)
    with torch.no_grad():
        torch.testing.assert_close(
            model(**cached).voice_attribute_logits, model(**live).voice_attribute_logits, atol=2e-3, rtol=2e-3
        )


def test_a_mixing_model_saves_loads_and_runs_in_a_fresh_process(tmp_path):
    model, processor = mixing_model(tmp_path)
    torch.manual_seed(0)
    for parameter in model.multi_modal_projector.voice_attributes.parameters():
        parameter.data.normal_(0, 0.5)
    model.config.default_task = processor.default_task = "describe"
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["voice_layer_mix"] is True
    reloaded = TinyAudioForConditionalGeneration.from_pretrained(folder).eval()
    inputs = processor(audio=CLIPS)
    torch.testing.assert_close(
        reloaded(**inputs).voice_attribute_logits, model(**inputs).voice_attribute_logits, atol=0, rtol=0
    )
    equal_length = [speech_like(1.5, seed=7), speech_like(1.5, seed=8)]
    expected = model(**processor(audio=equal_length)).logits
    torch.testing.assert_close(run_fresh(str(folder), tmp_path, equal_length), expected, rtol=0, atol=0)
    plain, _ = make_tiny_tiny_audio(tmp_path / "plain")
    with pytest.raises(ValueError, match="add voice_attributes first"):
        plain.mix_voice_layers()


def test_train_py_gives_a_model_mixing_heads_and_trains_them_alone_from_the_cache(tmp_path):
    """`--voice_layer_mix` on a trained model: new heads that read every layer train on their own loss (from the
    feature cache's statistics); every other weight, the voice prompt included, stays the starting model's."""
    described = speech_rows(8, 3)
    described["facts"] = [json.dumps({"gender": ("female", "male")[i % 2]}) for i in range(8)]
    workspace = train_workspace(tmp_path, described, "described")
    words = json.dumps({"gender": {"female": "woman", "male": "man"}})
    start = str(tmp_path / "start")
    flags = ("--voice_attributes", words, "--voice_prompt_length", "2", "--max_steps", "2")
    train.run(base_args(workspace, start, *NO_EVAL, *flags))
    describe = json.dumps([{"path": workspace["data"], "split": "train", "task": "describe"}])
    out = str(tmp_path / "mixed")
    train.run(
        base_args(
            workspace,
            out,
            *NO_EVAL,
            *("--model_name_or_path", start, "--train_datasets", describe, "--max_steps", "3"),
            *("--voice_layer_mix", "--train_voice_only", "--voice_attributes_only_steps", "3"),
            *("--feature_cache_dir", str(tmp_path / "cache")),
        )
    )
    before = TinyAudioForConditionalGeneration.from_pretrained(start)
    after = TinyAudioForConditionalGeneration.from_pretrained(out)
    assert after.config.voice_layer_mix and not before.config.voice_layer_mix
    mixing = after.multi_modal_projector.voice_attributes
    assert not torch.equal(mixing.layer_weights, torch.zeros_like(mixing.layer_weights))  # they trained
    new_heads = ("linear.", "classifier.", "layer_norms.", "layer_weights")
    for name, tensor in before.state_dict().items():
        if not name.removeprefix("multi_modal_projector.voice_attributes.").startswith(new_heads):
            torch.testing.assert_close(after.state_dict()[name], tensor, atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("encoder", ["hubert", "wav2vec2-group", "wavlm"])
def test_layer_statistics_of_other_encoders_are_each_clips_alone(tmp_path, encoder):
    """wav2vec 2.0-style encoders give their layers' frames too: a clip's statistics are the same in a padded batch
    as alone (group-norm encoders run clip by clip), and the last are those of the frames the projector reads."""
    model, processor = make_tiny_tiny_audio(tmp_path, encoder=encoder, encoder_layers=2)
    features = processor.extract_features(CLIPS)
    hidden, mask, statistics = model.encode_audio(
        features["input_features"], features["input_features_mask"], output_layer_statistics=True
    )
    assert statistics.shape[1] == model.config.encoder_statistics_layers == 3
    torch.testing.assert_close(statistics[:, -1], frame_statistics(hidden, mask))
    for row, clip in enumerate(CLIPS):
        alone = processor.extract_features([clip])
        _, _, own = model.encode_audio(
            alone["input_features"], alone["input_features_mask"], output_layer_statistics=True
        )
        torch.testing.assert_close(statistics[row], own[0], atol=1e-4, rtol=1e-4)
