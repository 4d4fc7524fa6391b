"""ASR pipeline: decoding every input kind, chunking/stitching long audio, batching, bad inputs, Hub-style loading."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
from conftest import pipeline_in_fresh_process

from decoding_tiny_audio import SENTENCE_MAX_NEW_TOKENS, find_repetition_loop, trim_repetition_loop
from pipeline_asr import (
    AudioInputError,
    chunk_blocks,
    iter_chunks,
    read_audio,
    to_mono_float,
)

RATE = 16000
REPO = str(Path(__file__).resolve().parents[1])


def speech_with_pauses(
    seconds: float, rate: int = RATE, seed: int = 0
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Noise bursts ("words", 0.2-0.6 s) separated by silent gaps (0.15-0.5 s); returns audio and word spans."""
    rng = np.random.default_rng(seed)
    audio = np.zeros(int(seconds * rate), dtype=np.float32)
    words, position = [], int(0.3 * rate)
    while True:
        length = int(rng.uniform(0.2, 0.6) * rate)
        if position + length > len(audio):
            break
        audio[position : position + length] = rng.normal(0, 0.3, length) * np.hanning(length)
        words.append((position, position + length))
        position += length + int(rng.uniform(0.15, 0.5) * rate)
    return audio, words


def tone(seconds: float, rate: int = RATE, freq: float = 440.0) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def collect(chunks) -> np.ndarray:
    return np.concatenate([chunk.samples for chunk in chunks])


# ---- decoding ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG", "MP3"])
def test_file_and_bytes_of_each_format_decode_to_mono_at_model_rate(tmp_path, fmt):
    stereo = np.stack([tone(2.0, 22050), tone(2.0, 22050, 660.0)], axis=1)
    path = tmp_path / f"clip.{fmt.lower()}"
    sf.write(path, stereo, 22050, format=fmt)
    from_path = collect(iter_chunks(str(path), RATE, 30.0))
    from_bytes = collect(iter_chunks(path.read_bytes(), RATE, 30.0))
    assert abs(len(from_path) - 2 * RATE) < 0.01 * RATE  # MP3 adds a few ms of codec padding
    np.testing.assert_array_equal(from_path, from_bytes)
    expected = soxr.resample(stereo.mean(axis=1).astype(np.float32), 22050, RATE)
    if fmt in ("WAV", "FLAC"):  # lossless: the streamed decode+downmix+resample matches the one-shot one
        np.testing.assert_allclose(from_path, expected[: len(from_path)], atol=1e-3)


def test_pathlib_path_is_accepted(tmp_path):
    sf.write(tmp_path / "a.wav", tone(1.0), RATE)
    assert len(collect(iter_chunks(tmp_path / "a.wav", RATE, 30.0))) == RATE


def test_int16_becomes_float_in_unit_range():
    pcm = (tone(0.5) * 32767).astype(np.int16)
    out = to_mono_float(pcm)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, tone(0.5), atol=1e-4)


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.uint8])
def test_integer_pcm_is_scaled_one_way_by_the_pipeline_processor_training_and_eval(asr, dtype):
    """Centred on the format's midpoint (128 for uint8) and divided by its half range, wherever audio comes in."""
    from training import evaluation
    from training.data import audio_hash, check_row

    info = np.iinfo(dtype)
    center = (int(info.max) + int(info.min) + 1) // 2
    half = int(info.max) + 1 - center
    full_scale_sine = np.sin(2 * np.pi * 440.0 * np.arange(RATE // 2) / RATE)
    pcm = (np.round(full_scale_sine * (half - 1)) + center).astype(dtype)
    expected = (pcm.astype(np.float32) - center) / half
    row = {"audio": {"array": pcm, "sampling_rate": RATE}, "text": "a b", "task": "transcribe"}

    np.testing.assert_array_equal(collect(iter_chunks(pcm, RATE, 30.0)), expected)
    np.testing.assert_array_equal(asr.processor.validate_audio(pcm, 0), expected)
    checked = check_row(row, sampling_rate=RATE, max_audio_seconds=30.0, tasks=["transcribe"])
    assert checked["audio_hash"] == audio_hash(expected)  # training decodes the row to exactly these samples
    source = evaluation.DatasetSource("rows", "rows", "all", [row], "audio", "text")
    _, [(_, _, evaluated, _)] = evaluation._prepare_batch([(0, row)], source, RATE)
    np.testing.assert_array_equal(evaluated, expected)


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_stereo_array_is_downmixed(layout):
    left, right = tone(1.0), tone(1.0, freq=880.0)
    stereo = np.stack([left, right]) if layout == "channels_first" else np.stack([left, right], axis=1)
    np.testing.assert_allclose(to_mono_float(stereo), (left + right) / 2, atol=1e-6)


def test_array_with_sampling_rate_is_resampled():
    chunks = list(iter_chunks(tone(3.0, 44100), RATE, 30.0, sampling_rate=44100))
    assert len(collect(chunks)) == 3 * RATE
    assert chunks[-1].end == pytest.approx(3.0)


@pytest.mark.parametrize("key", ["raw", "array"])
def test_dict_input(key):
    tensor = torch.from_numpy(tone(1.0, 8000))
    out = collect(iter_chunks({key: tensor, "sampling_rate": 8000}, RATE, 30.0))
    assert len(out) == RATE


def test_datasets_audio_rows(tmp_path):
    """datasets 5 without torchcodec yields undecoded {"bytes", "path"} rows; both fields are honoured."""
    import datasets

    sf.write(tmp_path / "a.flac", tone(1.5, 24000), 24000)
    by_path = datasets.Dataset.from_dict({"audio": [str(tmp_path / "a.flac")]})
    by_path = by_path.cast_column("audio", datasets.Audio(decode=False))
    by_bytes = datasets.Dataset.from_dict(
        {"audio": [{"bytes": (tmp_path / "a.flac").read_bytes(), "path": None}]}
    )
    by_bytes = by_bytes.cast_column("audio", datasets.Audio(decode=False))
    for dataset in (by_path, by_bytes):
        assert len(collect(iter_chunks(dataset[0]["audio"], RATE, 30.0))) == int(1.5 * RATE)


def test_torchcodec_decoder_row(tmp_path):
    torchcodec = pytest.importorskip("torchcodec")
    sf.write(tmp_path / "a.wav", np.stack([tone(1.0), tone(1.0)], axis=1), RATE)
    decoder = torchcodec.decoders.AudioDecoder(str(tmp_path / "a.wav"))
    assert len(collect(iter_chunks(decoder, RATE, 30.0))) == RATE


# ---- bad inputs --------------------------------------------------------------------------------------------


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[object, object, str, str]]:
    """name -> (input, sampling_rate given with it, text naming the input, text naming the problem)."""
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("this is not audio at all\n" * 20)
    (tmp_path / "noise.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "clips").mkdir(exist_ok=True)
    buffer = io.BytesIO()
    sf.write(buffer, tone(1.0), RATE, format="WAV")
    (tmp_path / "truncated.wav").write_bytes(buffer.getvalue()[:30])  # header cut mid-way
    no_audio = "no audio that soundfile"
    rate_error = "sampling_rate must be a positive whole number of Hz"
    return {
        "missing": (str(tmp_path / "nope.wav"), None, "nope.wav", "file not found"),
        "empty": (str(tmp_path / "empty.wav"), None, "empty.wav", "file is empty"),
        "corrupt": (str(tmp_path / "truncated.wav"), None, "truncated.wav", no_audio),
        "not_audio": (str(tmp_path / "notes.txt"), None, "notes.txt", f"the file holds {no_audio}"),
        "random_bytes_file": (str(tmp_path / "noise.bin"), None, "noise.bin", f"the file holds {no_audio}"),
        "garbage_bytes": (b"\x00\x01garbage" * 10, None, "<90 bytes>", f"the bytes hold {no_audio}"),
        "folder": (str(tmp_path / "clips"), None, "clips", "this is a folder, not an audio file"),
        "url": ("https://example.com/a.wav", None, "https://example.com/a.wav", "URLs are not fetched"),
        "unsupported_type": (12345, None, "<int>", "unsupported input type int"),
        "nan_array": (np.full(RATE, np.nan, dtype=np.float32), None, "ndarray", "NaN"),
        "empty_array": (np.zeros(0, dtype=np.float32), None, "ndarray", "no samples"),
        "dict_without_rate": ({"raw": tone(1.0)}, None, "dict", "needs a 'sampling_rate' key"),
        "rate_zero": (tone(1.0), 0, "ndarray", f"{rate_error}, e.g. 16000; got 0 (int)"),
        "rate_negative": (tone(1.0), -8000, "ndarray", f"{rate_error}, e.g. 16000; got -8000 (int)"),
        "rate_string": (tone(1.0), "8000", "ndarray", f"{rate_error}, e.g. 16000; got '8000' (str)"),
        "rate_bool": (tone(1.0), True, "ndarray", "got True (bool)"),
        "rate_fraction": (tone(1.0), 8000.5, "ndarray", "got 8000.5 (float)"),
        "dict_rate_zero": ({"raw": tone(1.0), "sampling_rate": 0}, None, "dict", "got 0 (int)"),
        "dict_rate_string": ({"array": tone(1.0), "sampling_rate": "8000"}, None, "dict", "got '8000' (str)"),
        "beyond_any_pcm": (np.full(RATE, 1e12, dtype=np.float32), None, "ndarray", "beyond even 32-bit PCM"),
    }


BAD_INPUTS = [
    "missing",
    "empty",
    "corrupt",
    "not_audio",
    "random_bytes_file",
    "garbage_bytes",
    "folder",
    "url",
    "unsupported_type",
    "nan_array",
    "empty_array",
    "dict_without_rate",
    "rate_zero",
    "rate_negative",
    "rate_string",
    "rate_bool",
    "rate_fraction",
    "dict_rate_zero",
    "dict_rate_string",
    "beyond_any_pcm",
]


# The pipeline's chunked reading, and the whole-clip reading of training, eval.py, the demo and the offline kit.
READERS = {
    "iter_chunks": lambda source, rate: list(iter_chunks(source, RATE, 30.0, sampling_rate=rate)),
    "read_audio": lambda source, rate: read_audio(source, RATE, sampling_rate=rate),
}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_raises_one_error_naming_it_and_its_problem(tmp_path, name, reader):
    source, sampling_rate, named, reason = _bad_inputs(tmp_path)[name]
    with pytest.raises(AudioInputError, match="Cannot read audio input") as caught:
        READERS[reader](source, sampling_rate)
    message = str(caught.value)
    assert named in message and reason in message, message
    assert "possibly a pipe" not in message


def test_sampling_rate_zero_or_text_is_refused_by_the_pipeline_not_guessed(asr):
    """`sampling_rate=0` used to mean 16 kHz, and "8000" failed deep in the resampler."""
    for rate, shown in ((0, "got 0 (int)"), ("8000", "got '8000' (str)")):
        with pytest.raises(ValueError, match=re.escape(shown)) as caught:
            asr(tone(1.0), sampling_rate=rate)
        assert type(caught.value).__name__ == "AudioInputError"


def test_unscaled_integer_pcm_in_a_float_array_is_scaled_and_said(asr):
    audio, _ = speech_with_pauses(2.0)
    pcm = np.round(audio * 32767).astype(np.int16)
    unscaled = pcm.astype(np.float32)  # int16 values in a float array: |x| up to 32767
    with pytest.warns(UserWarning, match=r"read as unscaled 16-bit integer PCM and divided by 32768"):
        chunks = collect(iter_chunks(unscaled, RATE, 30.0))
    np.testing.assert_array_equal(chunks, unscaled / 32768)
    with pytest.warns(UserWarning, match="16-bit"):
        assert text(asr, unscaled) == text(asr, pcm)
    with pytest.warns(UserWarning, match=r"read as unscaled 24-bit integer PCM and divided by 8388608"):
        collect(iter_chunks(unscaled * 256, RATE, 30.0))
    processor = asr.processor
    with pytest.warns(UserWarning, match=r"audio\[0\]: float samples reach 3\d+"):
        scaled = processor(audio=unscaled)["input_features"]
    torch.testing.assert_close(scaled, processor(audio=unscaled / 32768)["input_features"])


# ---- chunking ----------------------------------------------------------------------------------------------


def test_long_audio_is_cut_in_pauses_into_an_exact_partition():
    audio, words = speech_with_pauses(95.0)
    # Block edges unrelated to where cuts fall.
    blocks = (audio[i : i + 7 * RATE] for i in range(0, len(audio), 7 * RATE))
    chunks = list(chunk_blocks(blocks, RATE, 30.0))
    assert len(chunks) == 4
    np.testing.assert_array_equal(collect(chunks), audio)  # nothing dropped, nothing doubled
    assert all(len(chunk.samples) <= 30 * RATE for chunk in chunks)
    for chunk in chunks[1:]:
        cut = round(chunk.start * RATE)
        assert not any(start < cut < end for start, end in words), f"cut at {chunk.start:.2f}s splits a word"
    assert [c.end for c in chunks[:-1]] == [c.start for c in chunks[1:]]
    assert chunks[-1].end == pytest.approx(95.0)


def test_continuous_sound_is_still_cut_within_the_window():
    chunks = list(chunk_blocks([tone(70.0)], RATE, 30.0))
    assert len(chunks) == 3 and all(len(c.samples) <= 30 * RATE for c in chunks)
    np.testing.assert_array_equal(collect(chunks), tone(70.0))


def test_ten_minute_file_streams_in_bounded_chunks(tmp_path):
    path = tmp_path / "long.wav"
    audio, _ = speech_with_pauses(600.0, rate=8000, seed=3)
    sf.write(path, audio, 8000, subtype="PCM_16")
    total = 0
    for chunk in iter_chunks(str(path), RATE, 30.0):
        assert len(chunk.samples) <= 30 * RATE
        total += len(chunk.samples)
    assert total == 600 * RATE


# ---- repetition guard --------------------------------------------------------------------------------------


def test_repetition_loop_is_found_and_trimmed():
    prefix = [5, 6, 7, 8]
    assert find_repetition_loop(prefix + [9] * 16) == (4, 1)
    assert trim_repetition_loop(prefix + [9] * 20) == prefix + [9]
    assert trim_repetition_loop(prefix + [1, 2, 3, 4, 5] * 4) == prefix + [1, 2, 3, 4, 5]


def test_counting_loop_is_found_and_trimmed():
    """A unit whose copies differ in one token (the number of "or 13 to increase the volume, or 14 ...")."""
    prefix = [5, 6, 7, 8]
    copies = [[30, number, 31, 32, 33, 34, 35] for number in range(40, 46)]
    tokens = prefix + [token for copy in copies for token in copy]
    assert find_repetition_loop(tokens) == (4, 7)
    assert trim_repetition_loop(tokens) == prefix + copies[0]
    assert find_repetition_loop(tokens[: 4 + 7 * 3]) is None  # three copies could be a real list
    # An exact loop whose unit ends like the text before it: the first copy is kept whole.
    said, unit = [5, 6, 7, 20, 21], [22, 23, 24, 25, 26, 21]  # "... to me, | or un m ute yourself ,"
    looped = said + unit * 4 + unit[:4]
    assert trim_repetition_loop(looped) == said + unit[:5]


def test_normal_repetition_is_left_alone():
    assert find_repetition_loop([3, 3, 3, 4, 5, 4, 5, 1, 2, 9, 9, 9, 9]) is None
    sentence = list(range(20))
    assert trim_repetition_loop(sentence * 2) == sentence * 2  # a sentence said twice is kept
    menu = [
        [30, digit, 31, 32, other, 33, 34] for digit, other in zip(range(40, 46), range(50, 56), strict=True)
    ]
    assert (
        find_repetition_loop([token for item in menu for token in item]) is None
    )  # two words change each time


# ---- the pipeline end to end (tiny random model) -----------------------------------------------------------

# The random tiny LLM echoes its last prompt token ("\n") forever; forbidding repeated tokens makes its output
# depend on the audio, so equal texts below mean equal model inputs.
VARIED = {"no_repeat_ngram_size": 1, "max_new_tokens": 8}


@pytest.fixture(scope="module")
def asr(tiny_model_dir):
    from transformers import pipeline

    return pipeline("automatic-speech-recognition", model=tiny_model_dir, trust_remote_code=True)


def text(asr, source, **kwargs) -> str:
    return asr(source, **VARIED, **kwargs)["text"]


def test_pipeline_factory_resolves_the_custom_class(asr):
    assert type(asr).__name__ == "TinyAudioASRPipeline"
    assert type(asr).__module__.startswith(
        "transformers_modules."
    )  # the checkpoint's copy of pipeline_asr.py


def test_every_input_kind_gives_the_same_text(asr, tmp_path):
    audio, _ = speech_with_pauses(4.0)
    expected = text(asr, audio)
    assert expected
    path = tmp_path / "clip.wav"
    sf.write(path, audio, RATE, subtype="FLOAT")
    import datasets

    row = datasets.Dataset.from_dict({"audio": [str(path)]}).cast_column(
        "audio", datasets.Audio(decode=False)
    )[0]
    for source in (
        str(path),
        path.read_bytes(),
        {"raw": audio, "sampling_rate": RATE},
        {"array": torch.from_numpy(audio), "sampling_rate": RATE, "path": "ignored.wav"},
        row["audio"],
    ):
        assert text(asr, source) == expected, describe(source)
    pcm = np.round(audio * 32767).astype(np.int16)
    assert text(asr, pcm) == text(asr, pcm.astype(np.float32) / 32768)


def describe(source) -> str:
    from pipeline_asr import describe_input

    return describe_input(source)


def test_resampling_and_stereo(asr):
    audio, _ = speech_with_pauses(3.0, rate=44100)
    assert text(asr, audio, sampling_rate=44100) == text(asr, soxr.resample(audio, 44100, RATE))
    other = np.roll(audio, 1000)
    assert text(asr, np.stack([audio, other])) == text(asr, (audio + other) / 2)


def test_long_input_is_chunked_and_stitched(asr):
    audio, _ = speech_with_pauses(75.0, seed=7)
    result = asr(audio, return_timestamps=True, **VARIED)
    chunks = result["chunks"]
    assert len(chunks) == 3
    assert chunks[0]["timestamp"][0] == 0.0 and chunks[-1]["timestamp"][1] == 75.0
    assert all(a["timestamp"][1] == b["timestamp"][0] for a, b in zip(chunks, chunks[1:], strict=False))
    # Each piece is transcribed exactly once, in order: the text is the chunk transcripts joined.
    for chunk in chunks:
        start, end = (round(t * RATE) for t in chunk["timestamp"])
        assert chunk["text"] == text(asr, audio[start:end])
    assert result["text"] == " ".join(c["text"] for c in chunks if c["text"])


def test_batch_gives_the_same_text_as_one_at_a_time(asr):
    rng = np.random.default_rng(1)
    inputs = [
        speech_with_pauses(seconds, seed=seed)[0] for seed, seconds in enumerate((2.0, 5.5, 3.2, 41.0, 1.1))
    ]
    inputs.append({"raw": rng.normal(0, 0.1, 3 * 8000).astype(np.float32), "sampling_rate": 8000})
    single = [asr(source, batch_size=1, **VARIED) for source in inputs]
    assert asr(inputs, batch_size=4, **VARIED) == single
    assert asr(inputs, batch_size=16, **VARIED) == single


def test_batches_group_chunks_of_similar_length_and_results_keep_input_order(asr, monkeypatch):
    """Long and short clips alternate; each batch holds like lengths (shortest first), the output is in input order."""
    seconds = (9.0, 1.0, 8.0, 1.5, 7.0, 2.0, 6.0, 2.5, 5.0, 3.0)
    inputs = [speech_with_pauses(length, seed=seed)[0] for seed, length in enumerate(seconds)]
    single = [asr(clip, batch_size=1, **VARIED)["text"] for clip in inputs]
    batches: list[list[float]] = []
    collate = asr._collate

    def recording_collate(chunks, prompt):
        batches.append([round(chunk.samples.size / RATE, 1) for chunk in chunks])
        return collate(chunks, prompt)

    monkeypatch.setattr(asr, "_collate", recording_collate)
    assert [r["text"] for r in asr(inputs, batch_size=2, **VARIED)] == single
    window = 2 * asr_module(asr).SORT_WINDOW_BATCHES  # chunks per window
    assert len(batches) == 5 and all(len(batch) == 2 for batch in batches)
    for start in range(0, len(seconds), window):
        assert sum(batches[start // 2 : (start + window) // 2], []) == sorted(seconds[start : start + window])


def test_one_at_a_time_a_result_comes_before_the_next_input_is_read(asr):
    """At batch size 1 there is nothing to sort, so a stream of clips is not held back by the sorting window."""
    read = []

    def clips():
        for seconds in (1.5, 2.5, 3.5):
            read.append(seconds)
            yield speech_with_pauses(seconds, seed=4)[0]

    results = asr(clips(), batch_size=1, **VARIED)
    next(iter(results))
    assert read == [1.5]


def asr_module(asr):
    """The module of the checkpoint's copy of pipeline_asr.py that this pipeline runs."""
    return sys.modules[type(asr).__module__]


def test_generator_input_streams_results(asr):
    clips = [speech_with_pauses(seconds, seed=3)[0] for seconds in (1.5, 2.5, 3.5)]
    results = asr((clip for clip in clips), batch_size=2, **VARIED)
    assert not isinstance(results, list)  # an iterator, consumed lazily
    assert [r["text"] for r in results] == [text(asr, clip) for clip in clips]


def test_prompt_replaces_the_transcribe_instruction(asr):
    chunk = next(asr.preprocess(speech_with_pauses(3.0)[0]))
    default = asr.tokenizer.decode(asr._collate([chunk], None)["input_ids"][0])
    custom = asr.tokenizer.decode(asr._collate([chunk], "Describe the sounds.")["input_ids"][0])
    assert asr.processor.task_prompts["transcribe"] in default
    assert "Describe the sounds." in custom and asr.processor.task_prompts["transcribe"] not in custom
    asr(speech_with_pauses(1.0)[0], prompt="Describe the sounds.", max_new_tokens=2)  # accepted by __call__


def test_task_chooses_the_instruction_and_an_unknown_task_names_the_known_ones(asr, monkeypatch):
    prompts = []
    collate = asr._collate
    monkeypatch.setattr(
        asr, "_collate", lambda chunks, prompt: prompts.append(prompt) or collate(chunks, prompt)
    )
    clip = speech_with_pauses(1.0)[0]
    described = asr(clip, task="describe", max_new_tokens=4)["text"]
    assert prompts == [asr.processor.task_prompts["describe"]]
    assert described == asr(clip, prompt=asr.processor.task_prompts["describe"], max_new_tokens=4)["text"]
    # Joint CTC decoding scores transcripts only: a description is decoded by the LLM alone, unless asked otherwise.
    assert asr._sanitize_parameters(task="describe")[1]["ctc_weight"] == 0.0
    assert (
        asr._sanitize_parameters(task="describe", generate_kwargs={"ctc_weight": 0.2})[1]["ctc_weight"] == 0.2
    )
    assert "ctc_weight" not in asr._sanitize_parameters(task="transcribe")[1]
    # A sentence about a 1-s clip is as long as one about a long clip: its budget does not follow the audio.
    assert asr._sanitize_parameters(task="describe")[1]["max_new_tokens"] == SENTENCE_MAX_NEW_TOKENS == 64
    assert asr._sanitize_parameters(task="describe", max_new_tokens=4)[1]["max_new_tokens"] == 4
    assert "max_new_tokens" not in asr._sanitize_parameters(task="transcribe")[1]
    with pytest.raises(
        ValueError, match=r"Unknown task 'dance'; known tasks: \['describe', 'emotion', 'transcribe'\]"
    ):
        asr(clip, task="dance")


def test_processor_is_rebuilt_when_the_checkpoint_has_none(tiny_model_dir, tmp_path):
    from transformers import pipeline

    model = asr_model(tiny_model_dir)
    model.save_pretrained(tmp_path)  # weights, config and code, but no processor/tokenizer files
    assert not (tmp_path / "processor_config.json").exists()
    bare = pipeline("automatic-speech-recognition", model=str(tmp_path), trust_remote_code=True)
    full = pipeline("automatic-speech-recognition", model=tiny_model_dir, trust_remote_code=True)
    audio = speech_with_pauses(2.0)[0]
    assert text(bare, audio) == text(full, audio)


def asr_model(folder: str):
    from modeling_tiny_audio import TinyAudioForConditionalGeneration

    return TinyAudioForConditionalGeneration.from_pretrained(folder)


def test_timestamps_of_a_short_clip(asr):
    result = asr(speech_with_pauses(2.5)[0], return_timestamps=True, **VARIED)
    assert result["chunks"] == [{"text": result["text"], "timestamp": (0.0, 2.5)}]


def test_generate_kwargs_pass_through(asr):
    audio = speech_with_pauses(3.0)[0]
    short = asr(audio, max_new_tokens=2, no_repeat_ngram_size=1)["text"]
    assert short == asr(audio, generate_kwargs={"max_new_tokens": 2, "no_repeat_ngram_size": 1})["text"]
    assert len(short) < len(text(asr, audio))


class StepCounter:
    """A user stopping criterion: counts generation steps (and checks user criteria are honoured)."""

    def __init__(self) -> None:
        self.steps = 0

    def __call__(self, input_ids, scores, **kwargs):
        self.steps += 1
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def test_repetition_loop_is_stopped_early_and_trimmed(asr):
    counter = StepCounter()
    result = asr(speech_with_pauses(3.0)[0], max_new_tokens=200, stopping_criteria=[counter])
    assert counter.steps <= 16  # the tiny model loops on one token; the guard stops it at 16
    assert result["text"] == ""  # one "\n" kept, stripped
    counter = StepCounter()
    asr(speech_with_pauses(3.0)[0], max_new_tokens=40, stopping_criteria=[counter], loop_guard=False)
    assert counter.steps == 40


def test_model_generate_gives_the_pipelines_text(asr):
    """README's `model.generate` path shares the pipeline's decoding policy: the loop guard runs inside `generate`
    (the tiny model loops on one token), and the loop it stopped decodes away."""
    processor = asr.processor
    for seed, seconds in enumerate((1.0, 3.0)):
        clip = speech_with_pauses(seconds, seed=seed)[0]
        inputs = processor(audio=[clip], sampling_rate=RATE, return_tensors="pt")
        counter = StepCounter()
        generated = asr.model.generate(**inputs, max_new_tokens=200, stopping_criteria=[counter])
        assert counter.steps <= 16
        special = set(processor.tokenizer.all_special_ids)
        text_tokens = [t for t in generated[0, inputs["input_ids"].shape[1] :].tolist() if t not in special]
        assert (
            0 < len(text_tokens) < counter.steps
        )  # one copy of the loop's unit is kept, the rest is padding
        assert processor.decode_generated(generated, inputs) == [asr(clip, max_new_tokens=200)["text"]]


def test_default_budget_follows_audio_length(asr):
    """Without max_new_tokens, generation stops at the generation config's length-scaled budget."""
    config = asr.model.generation_config
    for seconds in (1.0, 20.0):
        counter = StepCounter()
        asr(speech_with_pauses(seconds)[0], no_repeat_ngram_size=1, stopping_criteria=[counter])
        assert counter.steps == config.max_new_tokens + int(config.max_new_tokens_per_second * seconds)


def test_joint_ctc_decoding_through_the_pipeline(asr):
    """`generate_kwargs={"ctc_weight": ...}` reaches the model's joint CTC decoding, batched and on the pipeline's
    device, and a batch transcribes each clip as it would alone."""
    asr.model.config.ctc_blank_token_id = asr.tokenizer(" ", add_special_tokens=False)["input_ids"][0]
    try:
        clips = [speech_with_pauses(seconds)[0] for seconds in (1.0, 2.5)]
        options = {"generate_kwargs": {"ctc_weight": 0.5}, "max_new_tokens": 8}
        batched = asr(clips, batch_size=2, **options)
        assert [out["text"] for out in batched] == [asr(clip, **options)["text"] for clip in clips]
        with pytest.raises(ValueError, match="ctc_weight must be in"):  # the option does reach the scorer
            asr(clips[0], generate_kwargs={"ctc_weight": 1.5})
    finally:
        asr.model.config.ctc_blank_token_id = None


def test_bad_input_in_a_batch(asr, tmp_path):
    good = speech_with_pauses(2.0)[0]
    bad, _, named, _ = _bad_inputs(tmp_path)["corrupt"]
    # The pipeline's AudioInputError lives in the checkpoint's module copy; it is a ValueError.
    with pytest.raises(ValueError, match=named) as caught:
        asr([good, bad, good], batch_size=2, **VARIED)
    assert type(caught.value).__name__ == "AudioInputError"
    results = asr([good, bad, str(tmp_path / "missing.flac"), good], batch_size=2, skip_errors=True, **VARIED)
    expected = text(asr, good)
    assert [r["text"] for r in results] == [expected, "", "", expected]
    assert named in results[1]["error"] and "missing.flac" in results[2]["error"]
    assert "error" not in results[0] and "error" not in results[3]


def test_chunk_length_beyond_the_encoder_window_is_refused(asr):
    with pytest.raises(ValueError, match="encoder window"):
        asr(speech_with_pauses(2.0)[0], chunk_length_s=31)


def test_loads_in_a_fresh_process_outside_the_repo(tiny_model_dir, tmp_path, asr):
    """Only the saved folder: no repo on sys.path, another cwd, hub offline."""
    audio = speech_with_pauses(3.0)[0]
    sf.write(tmp_path / "clip.flac", audio, RATE)
    result_text = pipeline_in_fresh_process(tiny_model_dir, "clip.flac", tmp_path, **VARIED)
    assert result_text == text(asr, sf.read(tmp_path / "clip.flac", dtype="float32")[0])


def test_merge_lora_serves_the_same_text_from_merged_weights(tmp_path):
    """`pipeline(..., merge_lora=True)` folds the adapters into the LLM and transcribes as the adapters did."""
    from test_core import randomise_lora_b
    from transformers import pipeline

    from testing.tiny_models import make_tiny_tiny_audio

    model, processor = make_tiny_tiny_audio(tmp_path, lora_rank=4, lora_target_modules=["q_proj", "v_proj"])
    randomise_lora_b(model)
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    load = {"model": str(tmp_path / "ckpt"), "trust_remote_code": True}
    adapters = pipeline("automatic-speech-recognition", **load)
    merged = pipeline("automatic-speech-recognition", merge_lora=True, **load)
    assert merged.model.lora_merged and not adapters.model.lora_merged
    clips = [speech_with_pauses(seconds, seed=seed)[0] for seed, seconds in enumerate((1.0, 2.5, 4.0))]
    assert [text(merged, clip) for clip in clips] == [text(adapters, clip) for clip in clips]


# ---- voice activity: no text for audio without speech ----------------------------------------------------------


def non_speech(seconds: float = 5.0) -> dict[str, np.ndarray]:
    """What the model used to read words into: digital silence and loud white noise."""
    noise = np.random.default_rng(0).standard_normal(int(seconds * RATE)).astype(np.float32) * 0.3
    return {"zeros": np.zeros(int(seconds * RATE), dtype=np.float32), "white noise": noise}


def test_speech_detector_tells_speech_from_silence_and_noise(speech):
    from pipeline_asr import SpeechDetector

    detector = SpeechDetector()
    assert all(detector.has_speech(clip, RATE) for clip in speech)
    assert not any(detector.has_speech(clip, RATE) for clip in non_speech().values())


def test_skip_non_speech_empties_only_the_chunks_without_speech(asr, speech):
    silence, noise = non_speech().values()
    assert text(asr, silence) and text(asr, noise)  # off by default: the model reads words into them
    assert text(asr, silence, skip_non_speech=True) == text(asr, noise, skip_non_speech=True) == ""
    assert text(asr, speech[0], skip_non_speech=True) == text(asr, speech[0])
    # A long file: the chunk of speech is transcribed, the 30 s of silence after it is not.
    long = np.concatenate([speech[0], np.zeros(35 * RATE, dtype=np.float32)])
    result = asr(long, skip_non_speech=True, return_timestamps=True, **VARIED)
    assert [chunk["text"] for chunk in result["chunks"]][1:] == [""] * (len(result["chunks"]) - 1)
    assert result["text"] == result["chunks"][0]["text"] != ""


# ---- word timestamps from the CTC head -------------------------------------------------------------------------


def brute_force_ctc_path(log_probs: torch.Tensor, targets: list[int], blank: int) -> list[int] | None:
    """The best frame labelling that collapses to `targets`, by trying every labelling (tiny inputs only)."""
    import itertools

    best, best_score = None, -float("inf")
    for labels in itertools.product(range(log_probs.shape[1]), repeat=log_probs.shape[0]):
        collapsed = [
            token for i, token in enumerate(labels) if token != blank and (i == 0 or labels[i - 1] != token)
        ]
        score = float(sum(log_probs[t, token] for t, token in enumerate(labels)))
        if collapsed == targets and score > best_score:
            best, best_score = list(labels), score
    return best


@pytest.mark.parametrize("targets", [[1, 2], [1, 1], [2, 1, 2], [1, 2, 1, 1]])
def test_forced_alignment_finds_the_best_ctc_path(targets):
    from decoding_tiny_audio import ctc_forced_align

    generator = torch.Generator().manual_seed(len(targets))
    log_probs = torch.randn(7, 3, generator=generator).log_softmax(-1)
    labels = brute_force_ctc_path(log_probs, targets, blank=0)
    spans = ctc_forced_align(log_probs, targets, blank=0)
    # Each target's frames in the best labelling: consecutive runs of its token, in target order.
    runs, previous = [], 0
    for frame, token in enumerate(labels):
        if token and token != previous:
            runs.append([frame, frame])
        elif token:
            runs[-1][1] = frame
        previous = token
    assert spans == [tuple(run) for run in runs]


def test_forced_alignment_of_a_text_longer_than_the_audio_is_none():
    from decoding_tiny_audio import ctc_forced_align

    log_probs = torch.zeros(3, 4).log_softmax(-1)
    assert ctc_forced_align(log_probs, [1, 1, 2], blank=0) is None  # 1 _ 1 2 needs four frames
    assert ctc_forced_align(log_probs, [1, 2, 3], blank=0) == [(0, 0), (1, 1), (2, 2)]


def test_a_word_ends_where_its_sound_stops_or_where_the_next_word_starts():
    """CTC spikes mark starts; the end is the first pause after the word's last token, else the next word."""
    from pipeline_asr import pause_starts, quiet_after, sound_levels

    audio = np.zeros(RATE * 2, dtype=np.float32)
    audio[int(0.2 * RATE) : int(0.65 * RATE)] = tone(0.45)  # a word from 0.2 s to 0.65 s, silence after it
    audio[int(0.7 * RATE) : int(1.5 * RATE)] = tone(0.8)  # the next one runs on without a pause
    pauses = pause_starts(sound_levels(audio, RATE))
    assert quiet_after(pauses, 0.24, latest=1.2) == pytest.approx(0.65)
    assert type(quiet_after(pauses, 0.24, latest=1.2)) is float  # plain floats, for JSON and the page
    assert quiet_after(pauses, 0.8, latest=1.2) == 1.2


def test_a_word_starts_where_the_sound_heard_at_its_spike_began():
    """The spike comes a little after the onset: the start is the end of the last pause before it."""
    from pipeline_asr import pause_starts, sound_levels, sound_onset_before

    audio = np.zeros(RATE * 2, dtype=np.float32)
    audio[int(0.2 * RATE) : int(0.65 * RATE)] = tone(0.45)
    audio[int(0.75 * RATE) : int(1.5 * RATE)] = tone(0.75)
    pauses = pause_starts(sound_levels(audio, RATE))
    assert sound_onset_before(pauses, 0.32, earliest=0.0) == pytest.approx(0.2)
    assert type(sound_onset_before(pauses, 0.32, earliest=0.0)) is float
    assert sound_onset_before(pauses, 0.88, earliest=0.65) == pytest.approx(0.75)
    assert sound_onset_before(pauses, 1.2, earliest=0.9) == 0.9  # no pause since the previous word's end
    assert sound_onset_before(pauses, 0.5, earliest=0.6) == 0.5  # a spike before that end keeps its own time


def test_word_edges_are_found_over_background_noise():
    """A recording's noise floor may be louder than QUIET_DB under its peak: quiet is then near the floor."""
    from pipeline_asr import QUIET_DB, pause_starts, quiet_after, sound_levels, sound_onset_before

    audio = np.zeros(RATE * 2, dtype=np.float32)
    audio[int(0.2 * RATE) : int(0.65 * RATE)] = tone(0.45)
    audio[int(0.9 * RATE) : int(1.5 * RATE)] = tone(0.6)
    noise_db = 20.0  # the tone's power over the noise's
    audio += (
        np.random.default_rng(0)
        .normal(0, 0.3 / np.sqrt(2) / 10 ** (noise_db / 20), len(audio))
        .astype(np.float32)
    )
    assert noise_db < QUIET_DB  # so the fixed threshold alone would call the noise sound
    pauses = pause_starts(sound_levels(audio, RATE))
    assert quiet_after(pauses, 0.24, latest=1.0) == pytest.approx(0.65, abs=0.011)
    assert sound_onset_before(pauses, 1.0, earliest=0.65) == pytest.approx(0.9, abs=0.011)


def test_punctuation_does_not_stretch_a_word_to_where_ctc_placed_it(tiny_model_and_processor):
    """CTC emits a full stop in the pause after the word; the word still ends where its sound does."""
    from pipeline_asr import sound_levels, timed_words

    _, processor = tiny_model_and_processor
    tokenizer = processor.tokenizer
    audio = np.zeros(RATE * 2, dtype=np.float32)
    audio[int(0.1 * RATE) : int(0.4 * RATE)] = tone(0.3)
    audio[int(0.5 * RATE) : int(0.9 * RATE)] = tone(0.4)
    tokens = tokenizer("hello world.", add_special_tokens=False)["input_ids"]
    ends = [len(tokenizer.decode(tokens[: index + 1])) for index in range(len(tokens))]
    assert tokenizer.decode(tokens[-1:]) == "."
    # spikes at 0.16 s ("hello") and 0.56 s ("world"), 80-ms frames; the full stop at 1.6 s, in the silence
    frames = [(2, 2) if end <= len("hello") else (7, 7) for end in ends[:-1]] + [(20, 20)]
    words = timed_words(tokenizer, tokens, frames, 0.08, 2.0, sound_levels(audio, RATE))
    assert [word.text for word in words] == ["hello", "world."]
    assert [(word.start, word.end) for word in words] == pytest.approx([(0.1, 0.4), (0.5, 0.9)], abs=0.011)


@pytest.fixture
def asr_with_ctc_head(asr):
    asr.model.config.ctc_blank_token_id = asr.tokenizer(" ", add_special_tokens=False)["input_ids"][0]
    yield asr
    asr.model.config.ctc_blank_token_id = None


def test_word_timestamps_are_absolute_across_chunks_at_any_batch_size(asr_with_ctc_head):
    asr = asr_with_ctc_head
    clips = [speech_with_pauses(seconds, seed=3)[0] for seconds in (41.0, 2.5)]
    results = [asr(clip, return_timestamps="word", **VARIED) for clip in clips]
    assert asr(clips, batch_size=3, return_timestamps="word", **VARIED) == results
    long, short = results
    for result, seconds in zip(results, (41.0, 2.5), strict=True):
        words = result["chunks"]
        assert [word["text"] for word in words] == result["text"].split()
        times = [t for word in words for t in word["timestamp"]]
        assert times == sorted(times) and 0 <= times[0] and times[-1] <= seconds
        assert all(start < end for start, end in (word["timestamp"] for word in words))
    # The second chunk's words are placed after the cut, in the input's time.
    cut = asr(clips[0], return_timestamps=True, **VARIED)["chunks"][1]["timestamp"][0]
    second_chunk_words = asr(clips[0][int(cut * RATE) :], return_timestamps="word", **VARIED)["chunks"]
    assert second_chunk_words
    for in_long, alone in zip(long["chunks"][-len(second_chunk_words) :], second_chunk_words, strict=True):
        assert in_long["text"] == alone["text"]
        assert in_long["timestamp"] == pytest.approx([t + cut for t in alone["timestamp"]], abs=1e-3)


def test_word_timestamps_need_a_ctc_head(asr):
    with pytest.raises(
        ValueError, match="word timestamps come from the model's CTC head, and this checkpoint has none"
    ):
        asr(speech_with_pauses(2.0)[0], return_timestamps="word")
    with pytest.raises(ValueError, match="return_timestamps must be True .* or 'word'"):
        asr(speech_with_pauses(2.0)[0], return_timestamps="char")


# ---- streaming: partial text while decoding, each chunk as soon as it is done ---------------------------------


class RecordingStreamer:
    """A generate streamer that logs what it receives next to the pipeline's chunk callbacks."""

    def __init__(self, events: list) -> None:
        self.events = events

    def put(self, value) -> None:
        self.events.append(("tokens", value.reshape(-1).tolist()))

    def end(self) -> None:
        self.events.append(("end",))


def test_streamer_sees_tokens_while_each_chunk_decodes_and_one_end_per_input(asr):
    """Tokens reach the streamer before their chunk is reported done, and a two-chunk input is one stream."""
    from transformers.generation.streamers import BaseStreamer

    events: list = []
    streamer = type("Recorder", (RecordingStreamer, BaseStreamer), {})(events)
    audio, _ = speech_with_pauses(41.0, seed=3)
    result = asr(audio, streamer=streamer, on_chunk=lambda entry: events.append(("chunk", entry)), **VARIED)
    kinds = [event[0] for event in events]
    assert kinds.count("end") == 1 and kinds[-1] == "end"
    assert kinds.count("chunk") == 2
    first_done = kinds.index("chunk")
    assert "tokens" in kinds[1:first_done]  # generated tokens (after the prompt) came before chunk 0 was done
    assert "tokens" in kinds[first_done + 1 : kinds.index("chunk", first_done + 1)]
    chunks = [event[1] for event in events if event[0] == "chunk"]
    assert [(c["input"], c["chunk"]) for c in chunks] == [(0, 0), (0, 1)]
    assert " ".join(c["text"] for c in chunks if c["text"]) == result["text"]


def test_text_iterator_streamer_gives_the_transcript_of_a_long_input(asr):
    """The transformers pattern: generation in a thread, the text read from a TextIteratorStreamer as it comes."""
    import threading

    from transformers import TextIteratorStreamer

    audio, _ = speech_with_pauses(41.0, seed=3)
    streamer = TextIteratorStreamer(asr.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=120)
    results = []
    worker = threading.Thread(target=lambda: results.append(asr(audio, streamer=streamer, **VARIED)))
    worker.start()
    pieces = list(streamer)  # ends once, after the second chunk
    worker.join()
    assert len(pieces) > 1
    assert "".join(pieces).split() == results[0]["text"].split()


def test_streamer_ends_when_the_input_fails_and_needs_batch_size_one(asr, tmp_path):
    from transformers import TextIteratorStreamer

    bad, _, named, _ = _bad_inputs(tmp_path)["corrupt"]
    streamer = TextIteratorStreamer(asr.tokenizer, skip_prompt=True, timeout=60)
    with pytest.raises(ValueError, match=named):
        asr(bad, streamer=streamer)
    assert "".join(streamer) == ""  # ended: a reader does not wait forever
    with pytest.raises(ValueError, match="batch_size=1"):
        asr([speech_with_pauses(2.0)[0]] * 2, batch_size=2, streamer=streamer)


def test_on_chunk_reports_every_chunk_of_every_input_in_a_batch(asr_with_ctc_head):
    asr = asr_with_ctc_head
    clips = [speech_with_pauses(seconds, seed=3)[0] for seconds in (41.0, 2.5)]
    reported: list[dict] = []
    results = asr(clips, batch_size=2, return_timestamps="word", on_chunk=reported.append, **VARIED)
    assert sorted((entry["input"], entry["chunk"]) for entry in reported) == [(0, 0), (0, 1), (1, 0)]
    for position, result in enumerate(results):
        mine = sorted((e for e in reported if e["input"] == position), key=lambda e: e["chunk"])
        assert [word for entry in mine for word in entry["words"]] == result["chunks"]
        assert " ".join(entry["text"] for entry in mine if entry["text"]) == result["text"]


def test_an_empty_transcript_has_no_timed_words(tiny_model_and_processor):
    from pipeline_asr import timed_words

    _, processor = tiny_model_and_processor
    assert timed_words(processor.tokenizer, [], [], 0.08, 2.0, np.full(100, -20.0)) == []
