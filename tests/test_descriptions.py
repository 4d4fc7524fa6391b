"""Describe targets: facts read from corpus rows, sentences written from them, and the parser that reads them back."""

from __future__ import annotations

import itertools
import json

import datasets
import pytest

from offline_kit.descriptions import (
    ATTRIBUTES,
    clip_facts,
    describe,
    read_attributes,
    reference_attributes,
    voice_traits,
    with_descriptions,
)
from offline_kit.voices import all_voices


def synthetic_row(voice: str, **columns) -> dict:
    """A corpus row's metadata as synthetic_corpus writes it (no audio: facts never read it)."""
    row = {
        "voice": voice, "speaker": voice, "family": voice.split("/")[0], "tts_params": json.dumps({"speed": 1.0}),
        "aug_telephone": False, "aug_noise": "none", "aug_snr_db": None, "aug_gain_db": 0.0,
        "aug_narrowband": False, "aug_room_rt60": None, "aug_room_dims": None, "clip_id": "train-000001",
    }  # fmt: skip
    return {**row, **columns}


def test_every_corpus_voice_has_a_gender_and_an_accent_and_kokoro_ids_decide_them():
    assert all(None not in voice_traits(v.family, v.name) for v in all_voices())
    assert voice_traits("kokoro", "bf_emma") == ("female", "british")
    assert voice_traits("kokoro", "am_adam") == ("male", "american")
    assert voice_traits("espeak", "en-gb-scotland+steph") == ("female", "scottish")
    assert voice_traits("espeak", "en-us-nyc+travis") == ("male", "american")
    assert voice_traits("flite", "awb") == ("male", "scottish")


def test_facts_come_from_the_voice_tempo_and_augmentation_columns():
    row = synthetic_row(
        "kokoro/bm_george",
        tts_params=json.dumps({"speed": 1.12}),
        aug_telephone=True,
        aug_noise="pink",
        aug_snr_db=5.0,
    )
    facts = clip_facts(row)
    assert reference_attributes(facts) == {
        "gender": "male", "accent": "british", "channel": "telephone", "noise": "noisy", "rate": "fast",
    }  # fmt: skip
    assert (
        clip_facts(synthetic_row("piper/joe@slow", tts_params=json.dumps({"length_scale": 1.2})))["rate"]
        == "slow"
    )
    narrow = clip_facts(
        synthetic_row("flite/slt", aug_narrowband=True, tts_params='{"duration_stretch": 1.0}')
    )
    assert (narrow["channel"], narrow["noise"], narrow["rate"]) == ("narrowband", "quiet", "normal")
    jfk = clip_facts({"family": "real", "speaker": "jfk", "clip_id": "jfk"})
    assert (jfk["gender"], jfk["noise"], jfk.get("channel")) == ("male", "noisy", None)
    assert clip_facts({**row, "facts": json.dumps({"gender": "female"})}) == {"gender": "female"}


FACT_GRID = [
    {"gender": gender, "accent": accent, "channel": channel, "noise": noise, "snr_db": snr, "rate": rate,
     "room_rt60": room}
    for gender, accent, channel, (noise, snr), rate, room in itertools.product(
        ("female", "male", None), ("american", "british", "scottish", None), ATTRIBUTES["channel"],
        (("quiet", None), ("noisy", 20.0), ("noisy", 10.0), ("noisy", 5.0)), ("slow", "normal", "fast", None),
        (None, 0.4),
    )
]  # fmt: skip


def test_every_sentence_reads_back_as_the_facts_it_was_written_from():
    for number, facts in enumerate(FACT_GRID):
        sentence = describe(facts, f"clip-{number}")
        assert read_attributes(sentence) == reference_attributes(facts), sentence
    for speaker in ("jfk", "asterisk/allison"):
        facts = clip_facts({"family": "real", "speaker": speaker, "clip_id": speaker})
        for seed in range(20):
            sentence = describe(facts, f"{speaker}-{seed}")
            assert read_attributes(sentence) == reference_attributes(facts), sentence


def test_wording_varies_between_clips_and_is_the_same_for_the_same_clip():
    facts = clip_facts(
        synthetic_row("kokoro/bf_emma", aug_telephone=True, aug_noise="white", aug_snr_db=10.0)
    )
    sentences = {describe(facts, f"train-{i:06d}") for i in range(40)}
    assert len(sentences) >= 10
    assert describe(facts, "train-000007") == describe(facts, "train-000007")


def test_the_parser_reads_hand_written_sentences():
    assert read_attributes("A British woman speaking slowly over a noisy telephone line.") == {
        "gender": "female", "accent": "british", "channel": "telephone", "noise": "noisy", "rate": "slow",
    }  # fmt: skip
    said = read_attributes(
        "A man with an American accent in a full-range recording, with no background noise."
    )
    assert (said["gender"], said["channel"], said["noise"], said["rate"]) == ("male", "clean", "quiet", None)
    # Both genders named: no answer rather than a guess.
    assert read_attributes("A man and a woman talking.")["gender"] is None


@pytest.mark.parametrize("present", [False, True])
def test_a_corpus_without_description_columns_gets_them_and_one_with_them_keeps_them(present):
    rows = [
        synthetic_row("flite/awb", clip_id=f"train-{i}", aug_noise="pink", aug_snr_db=20.0) for i in range(3)
    ]
    dataset = datasets.Dataset.from_list(rows)
    if present:
        dataset = dataset.add_column("facts", ['{"gender": "female"}'] * 3).add_column(
            "description", ["x"] * 3
        )
    described = with_descriptions(dataset)
    if present:
        assert described["description"] == ["x"] * 3
        return
    assert described.column_names == [*dataset.column_names, "facts", "description"]
    for row in described:
        assert read_attributes(row["description"])["accent"] == "scottish"
        assert json.loads(row["facts"])["snr_db"] == 20.0


def test_the_command_writes_a_described_copy_and_never_overwrites(tmp_path, capsys):
    from offline_kit.descriptions import main

    rows = [synthetic_row("kokoro/af_heart", clip_id=f"test-{i}") for i in range(2)]
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "corpus"))
    main([str(tmp_path / "corpus"), "--out", str(tmp_path / "described")])
    described = datasets.load_from_disk(str(tmp_path / "described"))["test"]
    assert read_attributes(described[0]["description"])["gender"] == "female"
    assert "facts" not in datasets.load_from_disk(str(tmp_path / "corpus"))["test"].column_names
    assert "test: 2 clips, e.g. 'A" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="described exists; choose another --out"):
        main([str(tmp_path / "corpus"), "--out", str(tmp_path / "described")])


def test_the_voice_probe_reads_what_the_features_hold_and_nothing_more():
    """benchmarks/probe_voice_attributes: a linearly separable attribute scores near 100% on held-out points, one the
    features do not hold scores near the majority class."""
    import torch

    from benchmarks.probe_voice_attributes import probe_accuracy

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(400, 16, generator=generator)
    train, test = slice(0, 300), slice(300, 400)
    held = ["female" if value > 0 else "male" for value in features[:, 3].tolist()]
    assert probe_accuracy(features[train], held[train], features[test], held[test]) >= 0.95
    unrelated = [
        "female" if value > 0 else "male" for value in torch.randn(400, generator=generator).tolist()
    ]
    majority = max(unrelated[test].count(v) for v in ("female", "male")) / 100
    assert probe_accuracy(features[train], unrelated[train], features[test], unrelated[test]) < majority + 0.1
