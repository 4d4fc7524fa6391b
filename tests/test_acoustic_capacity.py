"""Acoustic capacity options: trained top encoder layers, projector transformer layers, the projector's output
norm."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import speech_like
from huggingface_hub.errors import StrictDataclassClassValidationError
from safetensors import safe_open
from test_core import run_fresh

from modeling_tiny_audio import TinyAudioForConditionalGeneration
from testing.tiny_models import make_tiny_tiny_audio

CLIPS = [speech_like(2.0, seed=1), speech_like(0.7, seed=2), speech_like(3.3, seed=3)]
TRANSCRIPTS = ["hello world", "one two three", "the quick brown fox"]


@pytest.fixture(scope="module")
def two_layer_encoder_model(tmp_path_factory):
    """A tiny model over a 2-layer Whisper encoder whose top layer trains, with one projector layer."""
    return make_tiny_tiny_audio(
        tmp_path_factory.mktemp("acoustic"),
        encoder_layers=2,
        encoder_trainable_layers=1,
        projector_num_layers=1,
    )


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere in `module` (zero-initialised branches would hide the paths under test)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))


def test_the_top_encoder_layer_and_the_projector_train_and_nothing_else(two_layer_encoder_model):
    model, processor = two_layer_encoder_model
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert {name.split(".")[0] for name in trainable} == {"multi_modal_projector", "audio_tower"}
    in_encoder = {name for name in trainable if name.startswith("audio_tower.")}
    assert in_encoder and all(
        name.startswith(("audio_tower.layers.1.", "audio_tower.layer_norm.")) for name in in_encoder
    )
    assert any(name.startswith("multi_modal_projector.layers.0.") for name in trainable)

    model.train()
    model(**processor(audio=CLIPS, text=TRANSCRIPTS)).loss.backward()
    model.eval()
    with_gradient = {name for name, parameter in model.named_parameters() if parameter.grad is not None}
    assert with_gradient == trainable
    model.zero_grad(set_to_none=True)


def test_trimmed_cached_frames_and_batching_give_the_live_single_clip_result(two_layer_encoder_model):
    """The top layers read real frames only: trimmed cached frames, padded batches and single clips agree."""
    model, processor = two_layer_encoder_model
    _randomise(model.multi_modal_projector, seed=0)
    inputs = processor(audio=CLIPS)
    hidden, mask = model.encode_audio(inputs["input_features"], inputs["input_features_mask"])
    assert hidden.shape[1] == 1500  # the frozen layers run over Whisper's whole window, as the cache expects
    with torch.no_grad():
        batched, token_mask = model.project_audio(hidden, mask)
        longest = int(mask.sum(-1).max())
        trimmed, _ = model.project_audio(hidden[:, :longest].half().float(), mask[:, :longest])
        for row, clip in enumerate(CLIPS):
            single = processor(audio=clip)
            alone, alone_mask = model.get_audio_features(
                single["input_features"], single["input_features_mask"]
            )
            count = int(alone_mask.sum())
            assert int(token_mask[row].sum()) == count
            torch.testing.assert_close(batched[row, :count], alone[0, :count], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(trimmed[row, :count], alone[0, :count], rtol=1e-2, atol=1e-2)


def test_a_checkpoint_holds_the_trained_encoder_layer_and_loads_in_a_fresh_process(
    two_layer_encoder_model, tmp_path
):
    model, processor = two_layer_encoder_model
    _randomise(model.audio_tower.layers[1], seed=1)
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert any(key.startswith("audio_tower.layers.1.") for key in keys)
    assert not any(
        key.startswith(("audio_tower.layers.0.", "audio_tower.conv", "language_model.")) for key in keys
    )
    saved = json.loads((folder / "config.json").read_text())
    assert (saved["encoder_trainable_layers"], saved["projector_num_layers"]) == (1, 1)

    clips = [speech_like(1.5, seed=7), speech_like(1.5, seed=8)]
    expected = model(**processor(audio=clips)).logits
    reloaded = TinyAudioForConditionalGeneration.from_pretrained(folder)
    torch.testing.assert_close(reloaded(**processor(audio=clips)).logits, expected)
    torch.testing.assert_close(run_fresh(str(folder), tmp_path, clips), expected)


def test_added_projector_layers_start_as_the_identity_and_counts_never_shrink(tmp_path):
    model, processor = make_tiny_tiny_audio(tmp_path, encoder_layers=2)
    _randomise(model.multi_modal_projector, seed=2)
    inputs = processor(audio=CLIPS)
    before = model(**inputs).logits
    model.extend_acoustic_capacity(projector_num_layers=2)
    assert len(model.multi_modal_projector.layers) == 2 and model.config.projector_num_layers == 2
    assert all(p.requires_grad for p in model.multi_modal_projector.layers.parameters())
    torch.testing.assert_close(model(**inputs).logits, before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="keeps the checkpoint's trained layers"):
        model.extend_acoustic_capacity(projector_num_layers=1)


def test_output_norm_starts_on_the_scale_of_the_llm_embeddings(tmp_path):
    plain, processor = make_tiny_tiny_audio(tmp_path / "plain")
    normed, _ = make_tiny_tiny_audio(tmp_path / "normed", projector_output_norm=True)
    embeddings = normed.get_input_embeddings().weight
    with torch.no_grad():
        embeddings.mul_(40.0)  # an LLM whose embeddings are far from the projector's natural scale
        normed.multi_modal_projector.match_embedding_scale(embeddings)
    inputs = processor(audio=CLIPS)
    embedding_norm = embeddings.norm(dim=-1).mean()
    for model, expect_match in ((plain, False), (normed, True)):
        audio, mask = model.get_audio_features(inputs["input_features"], inputs["input_features_mask"])
        ratio = float(audio[mask].norm(dim=-1).mean() / embedding_norm)
        assert (0.5 < ratio < 2.0) == expect_match, ratio


def test_acoustic_options_are_checked_by_the_config(tmp_path):
    with pytest.raises(
        StrictDataclassClassValidationError, match="between 0 and the encoder's 1 layers, got 2"
    ):
        make_tiny_tiny_audio(tmp_path / "too-many", encoder_trainable_layers=2)
    with pytest.raises(
        StrictDataclassClassValidationError, match="Whisper encoders only; this encoder is 'hubert'"
    ):
        make_tiny_tiny_audio(tmp_path / "hubert", encoder="hubert", encoder_trainable_layers=1)


def test_the_feature_cache_key_follows_the_frozen_layers_only(two_layer_encoder_model, tmp_path):
    from training.feature_cache import encoder_key

    model, processor = two_layer_encoder_model
    key = encoder_key(model, processor)
    _randomise(model.audio_tower.layers[1], seed=3)  # training the top layer does not invalidate the cache
    assert encoder_key(model, processor) == key
    whole_encoder, _ = make_tiny_tiny_audio(tmp_path, encoder_layers=2)
    whole_encoder.audio_tower.load_state_dict(model.audio_tower.state_dict())
    whole_encoder.config.audio_model_id = model.config.audio_model_id
    assert encoder_key(whole_encoder, processor) != key


def test_train_py_trains_and_widens_the_acoustic_side(tmp_path):
    """train.py: a new model with the options, then a continued run that adds a projector layer."""
    from datasets import Audio, Dataset, DatasetDict
    from test_train import NO_EVAL, RATE, Snapshot, base_args, speech_rows

    import train
    from testing.tiny_models import make_tiny_encoder, make_tiny_llm

    data = DatasetDict({"train": Dataset.from_dict(speech_rows(12, 0))}).cast_column(
        "audio", Audio(sampling_rate=RATE)
    )
    data.save_to_disk(tmp_path / "data")
    workspace = {
        "encoder": make_tiny_encoder(tmp_path / "encoder", num_layers=2),
        "llm": make_tiny_llm(tmp_path / "llm"),
        "data": str(tmp_path / "data"),
    }
    first, snapshot = str(tmp_path / "first"), Snapshot()
    flags = (
        "--encoder_trainable_layers",
        "1",
        "--projector_num_layers",
        "1",
        "--projector_output_norm",
        "true",
    )
    train.run(
        base_args(workspace, first, *NO_EVAL, *flags, "--feature_cache_dir", str(tmp_path / "cache")),
        callbacks=[snapshot],
    )
    changed = {k for k in snapshot.before if not torch.equal(snapshot.before[k], snapshot.after[k])}
    assert any(k.startswith("audio_tower.layers.1.") for k in changed)
    assert not any(k.startswith(("audio_tower.layers.0.", "language_model.")) for k in changed)
    saved = json.loads(Path(first, "config.json").read_text())
    assert (
        saved["encoder_trainable_layers"],
        saved["projector_num_layers"],
        saved["projector_output_norm"],
    ) == (1, 1, True)

    widened, wider = str(tmp_path / "widened"), Snapshot()
    widen = ("--projector_num_layers", "2")
    train.run(
        base_args(workspace, widened, *NO_EVAL, "--model_name_or_path", first, *widen), callbacks=[wider]
    )
    assert all(torch.equal(wider.before[k], snapshot.after[k]) for k in snapshot.after if k in wider.before)
    assert not wider.before["multi_modal_projector.layers.1.mlp.2.weight"].any()  # it starts as the identity
    assert wider.after["multi_modal_projector.layers.1.mlp.2.weight"].any()  # and trains
    saved = json.loads(Path(widened, "config.json").read_text())
    assert saved["projector_num_layers"] == 2
    reloaded = TinyAudioForConditionalGeneration.from_pretrained(widened)
    torch.testing.assert_close(
        reloaded.state_dict()["multi_modal_projector.layers.1.mlp.2.weight"],
        wider.after["multi_modal_projector.layers.1.mlp.2.weight"],
    )


CPUINFO = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 {extra}\n\nprocessor\t: 1\n"


@pytest.mark.parametrize(
    ("extra", "native"),
    [("", False), ("avx512f avx512_vnni", False), ("avx512_bf16", True), ("amx_bf16 amx_tile", True)],
)
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, extra, native):
    from training.precision import cpu_has_native_bf16

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO.format(extra=extra))
    assert cpu_has_native_bf16(cpuinfo) is native
    assert cpu_has_native_bf16(tmp_path / "absent") is True  # not Linux: the user's choice stands


@pytest.mark.parametrize("native", [False, True])
def test_bf16_training_on_a_cpu_without_native_bf16_runs_in_fp32(monkeypatch, tmp_path, native):
    import train

    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(train.torch.cuda, "is_available", lambda: False)
    *_, training_args = train.parse_args(["--bf16", "true", "--output_dir", str(tmp_path)])
    assert training_args.bf16 is native
    assert training_args.mixed_precision == ("bf16" if native else "no")  # the Trainer's autocast follows


def test_the_split_whisper_encoder_is_the_library_encoder(two_layer_encoder_model):
    """Our bottom/top split of Whisper's encoder must compute exactly what `WhisperEncoder.forward` does."""
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    model, processor = two_layer_encoder_model
    features = processor(audio=CLIPS[:2])["input_features"]
    tower = model.audio_tower
    with torch.no_grad():
        library = WhisperEncoder.forward(tower, features).last_hidden_state
        bottom = tower.forward_bottom(features, 1)
        everywhere = torch.ones(bottom.shape[:2], dtype=torch.bool)
        torch.testing.assert_close(tower.forward_top(bottom, everywhere, 1), library)
        torch.testing.assert_close(tower.layer_norm(tower.forward_bottom(features, 2)), library)


def test_a_real_length_encoder_reads_only_the_clips_frames(tmp_path):
    model, processor = make_tiny_tiny_audio(tmp_path, encoder_layers=2)
    _randomise(model.multi_modal_projector, seed=4)
    inputs = processor(audio=CLIPS)
    full_window, full_mask = model.get_audio_features(inputs["input_features"], inputs["input_features_mask"])
    model.config.encoder_real_length = True
    hidden, mask = model.encode_audio(inputs["input_features"], inputs["input_features_mask"])
    assert hidden.shape[1] == int(mask.sum(-1).max()) < 1500  # the longest clip's frames, not 30 s
    batched, token_mask = model.project_audio(hidden, mask)
    assert torch.equal(token_mask, full_mask[:, : token_mask.shape[1]])
    assert not torch.allclose(
        batched[token_mask], full_window[full_mask], atol=1e-3
    )  # other frames than Whisper's
    for row, clip in enumerate(CLIPS):
        single = processor(audio=clip)
        alone, alone_mask = model.get_audio_features(single["input_features"], single["input_features_mask"])
        count = int(alone_mask.sum())
        torch.testing.assert_close(batched[row, :count], alone[0, :count], rtol=1e-4, atol=1e-4)
