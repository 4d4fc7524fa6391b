"""eval.py: Whisper-normalised corpus WER, deterministic sample selection, local dataset formats, the printed
report and results files, resume and bad clips (the leaderboard: tests/test_leaderboard.py)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import datasets
import numpy as np
import pytest
import soundfile as sf
import torch
from datasets import Audio, Dataset, DatasetDict, Features, Value
from transformers import (
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

import eval as eval_command
from pipeline_asr import AudioInputError, read_audio
from serving.loading import load_asr_pipeline
from training import evaluation
from training.wer import score

ROOT = Path(__file__).resolve().parent.parent
TRANSCRIPTS = [
    "Mr. Smith has two dogs.",
    "The colour of the sky is blue.",
    "It's a beautiful day, isn't it?",
    "Hello world",
    "Speech recognition on a tiny model.",
]


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random 2-layer Whisper with a byte-level tokenizer, saved locally: a stock transformers ASR model.
    Its tokenizer has no pad token (like the offline kit's converted tiny.en), which batching must survive."""
    directory = tmp_path_factory.mktemp("tiny_whisper")
    vocab = {char: i for i, char in enumerate(bytes_to_unicode().values())}
    tokenizer = WhisperTokenizer(vocab=vocab, merges=[])
    specials = ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    eos, start = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|startoftranscript|>"])
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_target_positions=32,
        pad_token_id=eos,
        bos_token_id=eos,
        eos_token_id=eos,
        decoder_start_token_id=start,
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    model.generation_config.update(max_length=8, num_beams=1)
    model.save_pretrained(directory)
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(), tokenizer=tokenizer).save_pretrained(
        directory
    )
    return str(directory)


def write_clips(directory: Path, count: int = len(TRANSCRIPTS)) -> list[str]:
    """Short noise clips at 8 kHz (so eval.py must resample), the second one stereo."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(count):
        audio = rng.normal(0, 0.1, (4000 + 800 * i, 2 if i == 1 else 1)).astype(np.float32)
        sf.write(directory / f"clip{i}.wav", audio, 8000)
        names.append(f"clip{i}.wav")
    return names


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    """JSONL manifest with relative audio paths, one corrupt clip and one empty reference."""
    names = write_clips(tmp_path / "wavs")
    (tmp_path / "wavs" / "broken.wav").write_bytes(b"RIFF not really a wav file")
    rows = [{"audio": f"wavs/{n}", "text": t} for n, t in zip(names, TRANSCRIPTS, strict=True)]
    rows.insert(2, {"audio": "wavs/broken.wav", "text": "never decoded"})
    rows.insert(4, {"audio": f"wavs/{names[0]}", "text": "  "})
    path = tmp_path / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- scoring


@pytest.mark.parametrize(
    ("reference", "prediction", "expected"),
    [
        ("Mr. Smith has two dogs.", "mister smith has 2 dogs", 0.0),  # abbreviation + number words
        ("HELLO, World!", "hello world", 0.0),  # casing + punctuation
        ("The colour isn't grey", "the color is not gray", 0.0),  # spelling + contraction
        ("the cat sat on the mat", "the cat sat on mat", 1 / 6),  # one deletion
        ("the cat sat", "a cat sat down", 2 / 3),  # one substitution + one insertion
        ("twenty five people", "25 people", 0.0),
    ],
)
def test_wer_of_single_pairs(reference: str, prediction: str, expected: float) -> None:
    assert score([reference], [prediction]).wer == pytest.approx(expected)


def test_corpus_wer_is_total_errors_over_total_words_not_mean_of_utterances() -> None:
    references = ["the quick brown fox jumps over the lazy dog", "hi"]
    predictions = ["The quick brown fox jumps over the lazy dog.", "bye there"]
    errors = score(references, predictions)
    # 10 reference words; the second utterance has one substitution and one insertion.
    assert (errors.substitutions, errors.deletions, errors.insertions) == (1, 0, 1)
    assert errors.reference_words == 10
    assert errors.wer == pytest.approx(2 / 10)


def test_deletions_counted_for_empty_prediction() -> None:
    errors = score(["one more time"], [""])
    assert (errors.deletions, errors.wer) == (3, 1.0)


# ----------------------------------------------------------------------------- datasets


def test_selection_is_deterministic_and_seeded() -> None:
    rows = Dataset.from_dict({"id": [str(i) for i in range(50)]})
    first = [r["id"] for r in evaluation.select(rows, 10)]
    assert first == [r["id"] for r in evaluation.select(rows, 10)]
    assert first != [str(i) for i in range(10)]  # shuffled, not the head of the set
    assert first != [r["id"] for r in evaluation.select(rows, 10, seed=7)]
    assert len(list(evaluation.select(rows, 500))) == 50

    stream = rows.to_iterable_dataset(num_shards=5)  # how Hub sets arrive: streamed
    streamed = [r["id"] for r in evaluation.select(stream, 10)]
    assert streamed == [r["id"] for r in evaluation.select(rows.to_iterable_dataset(num_shards=5), 10)]
    assert len(set(streamed)) == 10


def test_unknown_dataset_lists_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        eval_command.main(["some/model", "--dataset", "no-such-set"])
    err = capsys.readouterr().err
    assert "unknown dataset 'no-such-set'" in err
    for name in ("loquacious", "librispeech-clean", "ami", "tedlium", "commonvoice"):
        assert name in err


def test_registry_names_real_hub_sets() -> None:
    assert evaluation.DATASETS["loquacious"].path == "speechbrain/LoquaciousSet"
    assert evaluation.DATASETS["librispeech-other"].split == "test.other"
    assert {spec.split for spec in evaluation.DATASETS.values()} <= {"test", "test.clean", "test.other"}


def test_registry_sets_are_streamed_with_their_columns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local folder in the Hub's parquet layout stands in for a Hub id: same load_dataset(streaming) path."""
    names = write_clips(tmp_path / "wavs", 4)
    audio = [{"bytes": (tmp_path / "wavs" / n).read_bytes(), "path": n} for n in names]
    table = Dataset.from_dict({"ID": names, "wav": audio, "text": TRANSCRIPTS[:4]})
    table = table.cast(Features({"ID": Value("string"), "wav": Audio(), "text": Value("string")}))
    (tmp_path / "hub" / "data").mkdir(parents=True)
    table.to_parquet(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet")
    # datasets waits 5 s after closing a parquet stream early (an Arrow thread-shutdown guard); not needed here.
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
    monkeypatch.setitem(
        evaluation.DATASETS, "fake", evaluation.HubDataset(str(tmp_path / "hub"), None, "test", "wav")
    )

    source = evaluation.load_source("fake")
    picked = list(evaluation.select(source.rows, 2))
    assert [r["ID"] for r in picked] == [
        r["ID"] for r in evaluation.select(evaluation.load_source("fake").rows, 2)
    ]
    assert len(read_audio(picked[0]["wav"], 16000)) == 2 * (4000 + 800 * names.index(picked[0]["ID"]))


def _decoded(source: evaluation.DatasetSource) -> list[tuple[str, int]]:
    return [
        (
            row[source.text_column],
            len(read_audio(row[source.audio_column], 16000)),
        )
        for row in source.rows
    ]


def test_local_formats_load_the_same_clips(tmp_path: Path) -> None:
    names = write_clips(tmp_path / "audio", 3)
    texts = TRANSCRIPTS[:3]
    (tmp_path / "audio" / "metadata.csv").write_text(
        "file_name,transcription\n" + "".join(f'{n},"{t}"\n' for n, t in zip(names, texts, strict=True))
    )
    csv_manifest = tmp_path / "manifest.csv"
    csv_manifest.write_text(
        "audio_filepath,sentence\n" + "".join(f'audio/{n},"{t}"\n' for n, t in zip(names, texts, strict=True))
    )
    (tmp_path / "manifest.tsv").write_text(
        "audio_path\ttranscript\n" + "".join(f"audio/{n}\t{t}\n" for n, t in zip(names, texts, strict=True))
    )
    audio = [{"bytes": (tmp_path / "audio" / n).read_bytes(), "path": n} for n in names]
    table = Dataset.from_dict({"audio": audio, "text": texts})
    table = table.cast(Features({"audio": Audio(), "text": Value("string")}))
    DatasetDict({"test": table}).save_to_disk(tmp_path / "saved")

    expected = [
        (t, int(round(len(sf.read(tmp_path / "audio" / n)[0]) * 2)))
        for n, t in zip(names, texts, strict=True)
    ]
    ids = {"audio": names, "manifest.csv": [f"audio/{n}" for n in names], "saved": names}
    ids["manifest.tsv"] = ids["manifest.csv"]
    for location in ("audio", "manifest.csv", "manifest.tsv", "saved"):
        source = evaluation.load_source(str(tmp_path / location))
        assert _decoded(source) == expected, location
        # A clip is named by its path as the dataset gives it, not as resolved on this machine.
        assert [evaluation._sample_id(row, i, source) for i, row in enumerate(source.rows)] == ids[location]
    with pytest.raises(ValueError, match="no split 'validation'"):
        evaluation.load_source(str(tmp_path / "saved"), split="validation")


def test_read_audio_rejects_garbage_and_silence_of_zero_length(tmp_path: Path) -> None:
    (tmp_path / "bad.wav").write_bytes(b"garbage")
    with pytest.raises(AudioInputError, match="bad.wav"):  # counted as a bad clip by the caller
        read_audio(str(tmp_path / "bad.wav"), 16000)
    with pytest.raises(AudioInputError, match="no samples"):
        read_audio({"array": np.zeros(0), "sampling_rate": 16000}, 16000)


# ----------------------------------------------------------------------------- end to end


def eval_args(model: str, dataset: Path, out: Path) -> list[str]:
    """eval.py's arguments for one model on one dataset into `out`, on the CPU (the tests' machine)."""
    return [model, "--dataset", str(dataset), "--output-dir", str(out), "--device", "cpu"]


def run_eval(model: str, dataset: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "eval.py"), *eval_args(model, dataset, out)]
    result = subprocess.run(
        [*command, "--contributor", "tester", *extra],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    return result


# A clip's time is its share of a pipeline call, and says so when the call held several clips.
SAMPLE_BLOCK = re.compile(
    r"Sample (\d+): WER = \d+\.\d\d%, Time = \d+\.\d\ds(?: \(1/(\d+) of a \2-clip call\))?\n  Ref:  .*\n  Pred: .*\n"
)


def test_end_to_end_report_and_results_files(tiny_whisper: str, manifest: Path, tmp_path: Path) -> None:
    result = run_eval(
        tiny_whisper, manifest, tmp_path / "out", "--batch-size", "2", "--checkpoint-every", "2"
    )
    stdout = result.stdout

    blocks = SAMPLE_BLOCK.findall(stdout)
    assert [int(n) for n, _ in blocks] == [1, 2, 3, 4, 5]
    assert {clips for _, clips in blocks} - {""}, "a batch of several clips must be labelled as a shared call"
    assert "  Ref:  mister smith has 2 dogs\n" in stdout  # references are printed normalised
    assert re.search(
        r"CHECKPOINT @ 2 samples:\n  Corpus WER: \d+\.\d\d%\n  Avg Time/Sample: \d+\.\d\ds\n", stdout
    )
    assert "CHECKPOINT @ 4 samples:" in stdout
    assert "audio failed to decode" in stdout and "empty reference" in stdout
    assert re.search(r"Substitutions: \d+, Deletions: \d+, Insertions: \d+", stdout)
    assert re.search(r"RTFx: \d+\.\d \(batch size 2, cpu\)", stdout)
    assert re.search(
        r"\| manifest.jsonl \| all \| 5 \| \d+\.\d\d% \| \d+\.\d \(2\) \|", stdout
    )  # final table
    # The progress bar counts every selected clip, scored or skipped, against the total, with an ETA.
    progress_bar = r"manifest.jsonl: 100%\|.*\| 7/7 \[\d\d:\d\d<\d\d:\d\d"  # elapsed<remaining
    assert re.search(progress_bar, result.stderr), result.stderr[-500:]

    out_dir = tmp_path / "out" / Path(tiny_whisper).name / "manifest.jsonl"
    results = json.loads((out_dir / "results.json").read_text())
    rows = [json.loads(line) for line in (out_dir / "samples.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["ok", "ok", "bad_audio", "ok", "empty_reference", "ok", "ok"]
    assert rows[2]["id"] == "wavs/broken.wav" and rows[2]["error"]
    scored = [r for r in rows if r["status"] == "ok"]
    assert results["wer"] == pytest.approx(
        score([r["reference"] for r in scored], [r["prediction"] for r in scored]).wer
    )
    assert results["audio_seconds"] == pytest.approx(sum(4000 + 800 * i for i in range(5)) / 8000, rel=1e-3)
    assert results["rtfx"] == pytest.approx(results["audio_seconds"] / results["wall_seconds"])
    assert (results["n"], results["skipped_bad_audio"], results["skipped_empty_reference"]) == (5, 1, 1)
    for key in (
        "model",
        "dataset",
        "split",
        "seed",
        "device",
        "git_hash",
        "date",
        "batch_size",
        "contributor",
    ):
        assert results[key] not in (None, ""), key
    # A local model is named by its folder, not by the whole path (kept as model_path).
    assert (results["seed"], results["device"]) == (42, "cpu")
    assert (results["model"], results["model_path"]) == (Path(tiny_whisper).name, tiny_whisper)


def test_default_batch_size_is_the_one_of_the_published_figures() -> None:
    """One default, the batch size the README's RTFx figures (the shipped results files) were measured at."""
    default = eval_command.build_parser().parse_args(["some/model"]).batch_size
    published = {
        json.loads(path.read_text())["batch_size"]
        for path in (ROOT / "offline_kit" / "trained" / "results").glob("*.json")
    }
    assert published == {default}
    assert f"at `--batch-size` (default {default})" in (ROOT / "README.md").read_text()


def test_resume_continues_after_last_finished_sample(
    tiny_whisper: str, manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = eval_args(tiny_whisper, manifest, out)
    assert eval_command.main([*args, "--max-samples", "6"]) == 0
    out_dir = out / Path(tiny_whisper).name / "manifest.jsonl"
    complete = [json.loads(line) for line in (out_dir / "samples.jsonl").read_text().splitlines()]
    assert len(complete) == 6

    # An interrupted run (it lives beside the finished one until it completes): three rows finished, the fourth
    # half written. Marking a kept row shows it is reused.
    partial = evaluation.partial_dir(out_dir)
    shutil.copytree(out_dir, partial)
    shutil.rmtree(out_dir)
    kept = complete[:3]
    first_ok = next(r for r in kept if r["status"] == "ok")
    first_ok["prediction"] = "kept from the first run"
    lines = [json.dumps(r) for r in kept] + [json.dumps(complete[3])[:20]]
    (partial / "samples.jsonl").write_text("\n".join(lines))
    (partial / "results.json").unlink()  # written only when a run finishes
    capsys.readouterr()

    assert eval_command.main([*args, "--max-samples", "6", "--resume"]) == 0
    stdout = capsys.readouterr().out
    assert "[resume] 3 samples already done" in stdout
    assert not partial.exists()
    resumed = [json.loads(line) for line in (out_dir / "samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in resumed] == [r["id"] for r in complete]
    assert [r.get("prediction") for r in resumed[3:]] == [r.get("prediction") for r in complete[3:]]
    assert first_ok in resumed
    results = json.loads((out_dir / "results.json").read_text())
    assert results["n"] + results["skipped_bad_audio"] + results["skipped_empty_reference"] == 6

    assert eval_command.main([*args, "--max-samples", "6", "--resume"]) == 0  # finished: nothing redone
    assert "[resume] manifest.jsonl already finished" in capsys.readouterr().out
    assert json.loads((out_dir / "results.json").read_text()) == results

    with pytest.raises(SystemExit):  # a run of other settings is not resumed: refused before the model loads
        eval_command.main([*args, "--max-samples", "4", "--resume"])
    refused = capsys.readouterr()
    assert "holds a finished run of other settings" in refused.err and "Loading model" not in refused.out


def _row(clip: str, errors: int, words: int = 4, reference: str = "a b c d") -> dict:
    return {
        "id": clip,
        "status": "ok",
        "reference_normalized": reference,
        "substitutions": errors,
        "deletions": 0,
        "insertions": 0,
        "reference_words": words,
    }


def test_paired_comparison_counts_clips_and_bounds_the_change() -> None:
    """Clips pair by id (a repeated id by its order), unscored ones drop out, and the interval brackets the change."""
    skipped = {"id": "x", "status": "bad_audio"}
    baseline = [_row("a", 2), _row("b", 1), _row("b", 3), _row("c", 0), skipped, _row("d", 1)]
    candidate = [_row("a", 0), _row("b", 1), _row("b", 1), _row("c", 1), _row("x", 0)]  # "d" not run
    comparison = evaluation.compare_runs(baseline, candidate)
    assert comparison["clips"] == 4
    assert (comparison["clips_better"], comparison["clips_worse"], comparison["clips_same"]) == (2, 1, 1)
    assert comparison["baseline_wer"] == pytest.approx(6 / 16)
    assert comparison["candidate_wer"] == pytest.approx(3 / 16)
    assert comparison["wer_change"] == pytest.approx(-3 / 16)
    low, high = comparison["wer_change_95"]
    assert low <= -3 / 16 <= high and low < high

    # Better on every one of 40 clips: the whole interval lies below zero.
    many_before = [_row(str(i), 1 + i % 3) for i in range(40)]
    many_after = [_row(str(i), i % 3) for i in range(40)]
    assert evaluation.compare_runs(many_before, many_after)["wer_change_95"][1] < 0

    with pytest.raises(ValueError, match="clip a has a different reference"):
        evaluation.compare_runs(baseline, [_row("a", 0, reference="other words")])
    with pytest.raises(ValueError, match="share no scored clip"):
        evaluation.compare_runs(baseline, [_row("zz", 0)])


def test_compare_with_an_earlier_run(
    tiny_whisper: str, manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--compare-with finds the earlier run of the same dataset and writes comparison.json next to results.json."""
    args = [tiny_whisper, "--dataset", str(manifest), "--device", "cpu"]
    assert eval_command.main([*args, "--output-dir", str(tmp_path / "new")]) == 0
    new_dir = tmp_path / "new" / Path(tiny_whisper).name / "manifest.jsonl"
    rows = evaluation.read_finished(new_dir / "samples.jsonl")
    # The earlier run: the same clips, with two more substitutions on the first scored one.
    old_dir = tmp_path / "old" / "some-model" / "manifest.jsonl"
    old_dir.mkdir(parents=True)
    first = next(i for i, row in enumerate(rows) if row["status"] == "ok")
    old_rows = [dict(row) for row in rows]
    old_rows[first]["substitutions"] += 2
    (old_dir / "samples.jsonl").write_text("".join(json.dumps(row) + "\n" for row in old_rows))
    capsys.readouterr()

    compare = ["--output-dir", str(tmp_path / "new"), "--resume", "--compare-with"]
    assert eval_command.main([*args, *compare, str(tmp_path / "old")]) == 0
    assert f"Against {old_dir} (5 clips)" in capsys.readouterr().out
    comparison = json.loads((new_dir / "comparison.json").read_text())
    assert comparison["baseline"] == str(old_dir / "samples.jsonl")
    assert (comparison["clips_better"], comparison["clips_worse"], comparison["clips_same"]) == (1, 0, 4)
    words = sum(row["reference_words"] for row in rows if row["status"] == "ok")
    assert comparison["wer_change"] == pytest.approx(-2 / words)

    with pytest.raises(SystemExit):
        eval_command.main([*args, *compare, str(tmp_path / "nowhere")])
    assert "no run of dataset manifest.jsonl" in capsys.readouterr().err


def test_end_to_end_on_tiny_audio_checkpoint_over_two_datasets(
    tiny_model_dir: str, manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same code path loads a Tiny Audio checkpoint (its pipeline class comes through remote code); several
    datasets in one call end with a table and their average WER; the dtype choice reaches the model."""
    names = write_clips(tmp_path / "folder", 2)
    (tmp_path / "folder" / "metadata.jsonl").write_text(
        "".join(
            json.dumps({"file_name": n, "text": t}) + "\n"
            for n, t in zip(names, TRANSCRIPTS[:2], strict=True)
        )
    )
    out = tmp_path / "out"
    args = [tiny_model_dir, "--dataset", str(manifest), str(tmp_path / "folder"), "--output-dir", str(out)]
    options = ["--device", "cpu", "--dtype", "bfloat16", "--batch-size", "3", "--model-name", "tiny-random"]
    assert eval_command.main([*args, *options, "--max-samples", "5"]) == 0
    stdout = capsys.readouterr().out

    model_dir = out / "tiny-random"  # --model-name names the folder
    first = json.loads((model_dir / "manifest.jsonl" / "results.json").read_text())
    second = json.loads((model_dir / "folder" / "results.json").read_text())
    assert first["n"] + first["skipped_bad_audio"] + first["skipped_empty_reference"] == 5
    assert second["n"] == 2 and second["skipped_bad_audio"] == 0
    assert (first["model"], first["model_path"], first["dtype"]) == (
        "tiny-random",
        tiny_model_dir,
        "bfloat16",
    )
    assert first["rtfx"] > 0 and first["batch_size"] == 3
    table = stdout[stdout.index("| Dataset |") :].splitlines()
    assert [row.split("|")[1].strip() for row in table[2:]] == ["manifest.jsonl", "folder", "**average**"]
    assert f"{100 * (first['wer'] + second['wer']) / 2:.2f}%" in table[-1]


# ----------------------------------------------------------------------------- descriptions

# Clips of the offline kit's corpora, their metadata as the corpus builder writes it (one length per clip).
DESCRIBED_CLIPS = [
    {"voice": "kokoro/bf_emma", "tts_params": {"speed": 1.0}},
    {"voice": "kokoro/am_adam", "tts_params": {"speed": 1.12}, "aug_telephone": True, "aug_noise": "pink",
     "aug_snr_db": 10.0},
    {"voice": "flite/awb", "tts_params": {"duration_stretch": 1.05}},
    {"voice": "piper/joe@fast", "tts_params": {"length_scale": 0.85}, "aug_narrowband": True},
]  # fmt: skip


def flac_clip(samples: np.ndarray) -> dict:
    """An undecoded datasets audio value, as the offline kit's corpora store clips."""
    buffer = io.BytesIO()
    sf.write(buffer, samples, 16000, format="FLAC")
    return {"bytes": buffer.getvalue(), "path": None}


def described_corpus(path: Path) -> None:
    rng = np.random.default_rng(1)
    rows = []
    for index, clip in enumerate(DESCRIBED_CLIPS):
        audio = flac_clip(rng.normal(0, 0.1, 16000 + 1600 * index))
        rows.append(
            {
                "audio": audio, "text": "words", "voice": clip["voice"], "speaker": clip["voice"],
                "family": clip["voice"].split("/")[0], "tts_params": json.dumps(clip["tts_params"]),
                "aug_telephone": clip.get("aug_telephone", False), "aug_noise": clip.get("aug_noise", "none"),
                "aug_snr_db": clip.get("aug_snr_db"), "aug_narrowband": clip.get("aug_narrowband", False),
                "clip_id": f"test-{index:06d}",
            }
        )  # fmt: skip
    Dataset.from_list(rows).cast_column("audio", Audio(sampling_rate=16000)).save_to_disk(str(path))


def describe_run(model_dir: str, dataset: Path, out: Path) -> dict:
    """`eval.py MODEL --dataset DATASET --task describe` as a user runs it; its results.json."""
    args = [model_dir, "--dataset", str(dataset), "--task", "describe", "--device", "cpu"]
    assert eval_command.main([*args, "--output-dir", str(out), "--model-name", "tiny"]) == 0
    return json.loads((out / "tiny" / f"{dataset.name}-describe" / "results.json").read_text())


def test_descriptions_are_scored_per_attribute_with_a_confusion_table(
    tiny_model_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Hand-made predictions through the whole run: every clip is said to be an American man speaking quickly
    over a noisy telephone line, which is right for 3 of 4 genders, 2 accents, 1 channel, 1 noise, 2 rates."""
    described_corpus(tmp_path / "synthetic")
    said = "A man with an American accent, speaking quickly over a noisy telephone line."
    asked = []

    def hand_made(pipe, audios, rate, settings):
        asked.append(settings.task)
        return [said] * len(audios)

    monkeypatch.setattr(evaluation, "_transcribe", hand_made)
    out = tmp_path / "out"
    results = describe_run(tiny_model_dir, tmp_path / "synthetic", out)
    accuracy = {name: score["accuracy"] for name, score in results["attributes"].items()}
    assert accuracy == {"gender": 0.75, "accent": 0.5, "channel": 0.25, "noise": 0.25, "rate": 0.5}
    assert results["attributes"]["gender"]["confusion"] == {"female": {"male": 1}, "male": {"male": 3}}
    assert set(asked) == {"describe"} and results["n"] == 4
    stdout = capsys.readouterr().out
    assert "gender: 75.0% of 4 clips" in stdout and "| synthetic | 4 | 75.00% | 50.00% |" in stdout
    table = stdout[stdout.index("accent: 50.0%") :].splitlines()[1:5]
    assert table[0].split() == ["true", "\\", "said", "american"]  # the one accent said
    assert [row.split() for row in table[1:4]] == [["american", "2"], ["british", "1"], ["scottish", "1"]]


def test_a_tiny_model_describes_real_speech_and_each_attribute_counts_the_clips_its_source_states(
    tiny_model_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end with the model's own generation, on a real-speech set as offline_kit.real_speech saves it (no
    facts column): jfk states no channel and neither recording a rate, so those are scored on fewer clips."""
    rng = np.random.default_rng(2)
    rows = [
        {"audio": flac_clip(rng.normal(0, 0.1, 16000 * seconds)), "text": "words",
         "voice": speaker, "speaker": speaker, "family": "real", "clip_id": speaker}
        for speaker, seconds in (("asterisk/allison", 1), ("jfk", 2))
    ]  # fmt: skip
    Dataset.from_list(rows).cast_column("audio", Audio(sampling_rate=16000)).save_to_disk(
        str(tmp_path / "real")
    )
    prompts = []

    def load_watched(*args, **kwargs):
        """The real pipeline, noting the instruction of every batch it builds."""
        pipe = load_asr_pipeline(*args, **kwargs)
        collate = pipe._collate
        monkeypatch.setattr(
            pipe, "_collate", lambda chunks, prompt: prompts.append(prompt) or collate(chunks, prompt)
        )
        return pipe

    monkeypatch.setattr(eval_command, "load_asr_pipeline", load_watched)
    out = tmp_path / "out"
    results = describe_run(tiny_model_dir, tmp_path / "real", out)
    clips = {name: score["clips"] for name, score in results["attributes"].items()}
    assert clips == {"gender": 2, "accent": 2, "channel": 1, "noise": 2}
    samples = [
        json.loads(line)
        for line in (out / "tiny" / "real-describe" / "samples.jsonl").read_text().splitlines()
    ]
    assert [s["reference_attributes"]["gender"] for s in samples] == ["female", "male"]
    assert prompts and set(prompts) == {"Describe the audio."}  # the model was asked to describe every clip


def test_a_clip_the_model_cannot_take_is_counted_not_fatal(
    tiny_whisper: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Stock Whisper cannot batch a 31 s clip with short ones, nor (without timestamp tokens) transcribe it alone:
    the batch is retried clip by clip and only the long clip is lost, counted as failed."""
    rng = np.random.default_rng(1)
    rows = []
    for i, seconds in enumerate((1, 31, 2)):
        sf.write(tmp_path / f"{i}.wav", rng.normal(0, 0.1, 16000 * seconds).astype(np.float32), 16000)
        rows.append({"audio": f"{i}.wav", "text": TRANSCRIPTS[i]})
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    args = eval_args(tiny_whisper, tmp_path / "long.jsonl", out)
    assert eval_command.main([*args, "--batch-size", "3"]) == 0

    stdout = capsys.readouterr().out
    assert stdout.count("Batch of 3 failed") == 1 and "Skipped 1.wav: transcription failed" in stdout
    out_dir = out / Path(tiny_whisper).name / "long.jsonl"
    statuses = [json.loads(line)["status"] for line in (out_dir / "samples.jsonl").read_text().splitlines()]
    assert statuses == ["ok", "failed", "ok"]
    results = json.loads((out_dir / "results.json").read_text())
    assert (results["n"], results["skipped_failed"]) == (2, 1)

    # The pipeline's own chunking takes the long clip (a new run: it replaces the finished one when asked to).
    assert eval_command.main([*args, "--batch-size", "3", "--chunk-length-s", "30", "--overwrite"]) == 0
    results = json.loads((out_dir / "results.json").read_text())
    assert (results["n"], results["skipped_failed"], results["chunk_length_s"]) == (3, 0, 30.0)


def test_tiny_audio_is_evaluated_with_its_lora_merged_and_int8_on_request(tmp_path, manifest: Path):
    """Merged adapters transcribe as unmerged ones (tests/test_pipeline.py) and spare their matmuls; `--int8`
    quantizes the LLM for the run and says so in its results."""
    from test_core import randomise_lora_b

    from testing.tiny_models import make_tiny_tiny_audio

    model, processor = make_tiny_tiny_audio(tmp_path, lora_rank=4)
    randomise_lora_b(model)
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    pipe = load_asr_pipeline(str(tmp_path / "ckpt"), "cpu", "float32")
    assert pipe.model.lora_merged and not pipe.model.llm_quantized
    assert load_asr_pipeline(str(tmp_path / "ckpt"), "cpu", "float32", int8=True).model.llm_quantized

    run_eval(str(tmp_path / "ckpt"), manifest, tmp_path / "out", "--int8", "--max-samples", "2")
    results = json.loads((tmp_path / "out" / "ckpt" / "manifest.jsonl" / "results.json").read_text())
    assert results["int8"] is True and results["max_samples"] == 2


def test_int8_needs_a_tiny_audio_checkpoint(tiny_whisper: str, manifest: Path, tmp_path: Path):
    """A stock model asked for --int8: one line that says why, no traceback, no output folder."""
    result = subprocess.run(
        [
            sys.executable,
            "eval.py",
            tiny_whisper,
            "--dataset",
            str(manifest),
            "--output-dir",
            str(tmp_path / "out"),
        ]
        + ["--int8"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert re.search(r"int8 serving needs a Tiny Audio checkpoint .*tiny_whisper", result.stderr)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- bad input and output folders


def _bad_eval_arguments(
    tmp_path: Path, tiny_whisper: str, manifest: Path
) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (eval.py arguments, texts the one error message must contain)."""
    (tmp_path / "not-a-model").mkdir()
    runs = {}  # --output-dir -> the run of 3 clips there, finished or interrupted
    for state, folder_name in (("finished", "manifest.jsonl"), ("interrupted", "manifest.jsonl.partial")):
        runs[state] = tmp_path / state / Path(tiny_whisper).name / folder_name
        runs[state].mkdir(parents=True)
        (runs[state] / "run.json").write_text(
            json.dumps({"model": tiny_whisper, "max_samples": 3, "int8": False})
        )
    (runs["finished"] / "results.json").write_text("{}")
    resume = [tiny_whisper, "--dataset", str(manifest), "--resume", "--output-dir"]
    return {
        "hub_dataset_offline": (
            [tiny_whisper, "--dataset", "loquacious"],
            [
                "'loquacious'",
                "speechbrain/LoquaciousSet",
                "HF_HUB_OFFLINE",
                "data/real_speech",
                "python -m offline_kit.real_speech",
                "terms accepted",
            ],
        ),
        "benchmark_offline": (
            [tiny_whisper, "--dataset", "ami"],
            ["'ami'", "HF_HUB_OFFLINE", "data/real_speech"],
        ),
        "local_set_not_built": (
            [tiny_whisper, "--dataset", "data/real_speech"],
            ["data/real_speech has not been built", "python -m offline_kit.real_speech"],
        ),
        "missing_path": (
            [tiny_whisper, "--dataset", str(tmp_path / "nowhere.jsonl")],
            ["nowhere.jsonl does not exist"],
        ),
        "unknown_name": (
            [tiny_whisper, "--dataset", "no-such-set"],
            ["unknown dataset 'no-such-set'", "loquacious"],
        ),
        "missing_column": (
            [tiny_whisper, "--dataset", str(manifest), "--text-column", "words"],
            ["no text column 'words'", "columns: audio, text"],
        ),
        "missing_model_folder": (
            [str(tmp_path / "no-model"), "--dataset", str(manifest)],
            ["no-model: no such folder"],
        ),
        "folder_without_model": (
            [str(tmp_path / "not-a-model"), "--dataset", str(manifest)],
            ["not-a-model: this folder has no config.json"],
        ),
        "hub_model_offline": (
            ["someone/some-model", "--dataset", str(manifest)],
            ["someone/some-model is not a local folder", "HF_HUB_OFFLINE"],
        ),
        "zero_batch": ([tiny_whisper, "--dataset", str(manifest), "--batch-size", "0"], ["must be positive"]),
        "negative_chunk": (
            [tiny_whisper, "--dataset", str(manifest), "--chunk-length-s", "-1"],
            ["must be positive"],
        ),
        "describe_without_facts": (
            [tiny_whisper, "--dataset", str(manifest), "--task", "describe"],
            ["manifest.jsonl does not say what its clips sound like", "voice, family and speaker"],
        ),
        "unknown_task": (
            [tiny_whisper, "--dataset", str(manifest), "--task", "dance"],
            ["--task 'dance': eval.py scores the tasks transcribe, describe"],
        ),
        "generate_kwargs_not_object": (
            [tiny_whisper, "--dataset", str(manifest), "--generate-kwargs", "[1]"],
            ["--generate-kwargs must be a JSON object"],
        ),
        "resume_another_finished_run": (
            [*resume, str(tmp_path / "finished"), "--max-samples", "2"],
            [
                f"{runs['finished']} holds a finished run of other settings, so --resume does not continue it",
                "max_samples: 3 -> 2",
            ],
        ),
        "resume_another_interrupted_run": (
            [*resume, str(tmp_path / "interrupted")],
            [f"{runs['interrupted']} holds an interrupted run of other settings", "max_samples: 3 -> null"],
        ),
        "resume_in_int8": (  # int8 transcripts must not be mixed into a float run's results
            [*resume, str(tmp_path / "interrupted"), "--max-samples", "3", "--int8"],
            [f"{runs['interrupted']} holds an interrupted run of other settings", "int8: false -> true"],
        ),
    }


BAD_EVAL_ARGUMENTS = [
    "hub_dataset_offline",
    "benchmark_offline",
    "local_set_not_built",
    "missing_path",
    "unknown_name",
    "missing_column",
    "missing_model_folder",
    "folder_without_model",
    "hub_model_offline",
    "zero_batch",
    "negative_chunk",
    "describe_without_facts",
    "unknown_task",
    "generate_kwargs_not_object",
    "resume_another_finished_run",
    "resume_another_interrupted_run",
    "resume_in_int8",
]


@pytest.mark.parametrize("name", BAD_EVAL_ARGUMENTS)
def test_bad_arguments_fail_with_one_message_before_the_model_loads(
    name: str,
    tiny_whisper: str,
    manifest: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)  # relative dataset paths resolve here, where nothing has been built
    argv, expected = _bad_eval_arguments(tmp_path, tiny_whisper, manifest)[name]
    with pytest.raises(SystemExit) as exited:
        eval_command.main(
            [*argv, "--device", "cpu"]
            + ([] if "--output-dir" in argv else ["--output-dir", str(tmp_path / "out")])
        )
    captured = capsys.readouterr()
    assert exited.value.code == 2
    for text in expected:
        assert text in captured.err, captured.err
    assert "Traceback" not in captured.err and "Loading model" not in captured.out


@pytest.mark.parametrize("name", [None, *evaluation.DATASETS])
def test_every_registry_set_offline_is_one_message_before_the_model_loads(
    name: str | None, tiny_whisper: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The default set (no --dataset) and each benchmark name, with the Hub offline: what, why and what to do."""
    chosen = ["--dataset", name] if name else []
    with pytest.raises(SystemExit) as exited:
        eval_command.main([tiny_whisper, *chosen, "--output-dir", str(tmp_path / "out"), "--device", "cpu"])
    captured = capsys.readouterr()
    assert exited.value.code == 2
    error = captured.err.strip().splitlines()[-1]
    spec = evaluation.DATASETS[name or "loquacious"]
    for text in (
        f"dataset '{name or 'loquacious'}'",
        spec.path,
        "HF_HUB_OFFLINE is set",
        "terms accepted on the Hub and a token",
        "data/real_speech (python -m offline_kit.real_speech)",
    ):
        assert text in error, error
    assert "Traceback" not in captured.err and "Loading model" not in captured.out


class FakeHub(BaseHTTPRequestHandler):
    """The Hub's auth-check answer for a gated dataset whose terms this user has not accepted."""

    def do_GET(self) -> None:
        self.send_response(403)
        self.send_header("X-Error-Code", "GatedRepo")
        self.send_header("X-Error-Message", "Access to this dataset is restricted.")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("hub", ["gated", "unreachable"])
def test_a_hub_set_that_cannot_be_read_online_is_one_message_before_the_model_loads(
    hub: str, tiny_whisper: str, tmp_path: Path
) -> None:
    """Online, through the real HTTP client: a gated set says to accept its terms and log in; a Hub that does
    not answer says so. Either way one line, before the model loads."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    port = server.server_address[1]
    if hub == "gated":
        threading.Thread(target=server.serve_forever, daemon=True).start()
    else:
        server.server_close()  # nothing listens on the port any more
    env = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    try:
        done = subprocess.run(
            [sys.executable, str(ROOT / "eval.py"), tiny_whisper, "--output-dir", str(tmp_path / "out")],
            capture_output=True,
            text=True,
            env=env | {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(tmp_path / "hf")},
            cwd=tmp_path,
            timeout=300,
        )
    finally:
        if hub == "gated":
            server.shutdown()
            server.server_close()
    assert done.returncode == 2 and "Traceback" not in done.stderr and "Loading model" not in done.stdout
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("eval.py: error: dataset 'loquacious'") and "data/real_speech" in error, error
    if hub == "gated":
        assert (
            "it is gated: accept its terms at https://huggingface.co/datasets/speechbrain/LoquaciousSet"
            in error
        )
        assert "hf auth login" in error
    else:
        assert "the Hub cannot be reached (ConnectError" in error


def test_a_finished_run_is_kept_until_a_new_one_completes(
    tiny_whisper: str,
    manifest: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    args = eval_args(tiny_whisper, manifest, out)
    assert eval_command.main(args) == 0
    out_dir = out / Path(tiny_whisper).name / "manifest.jsonl"
    finished = {name: (out_dir / name).read_text() for name in ("results.json", "samples.jsonl", "run.json")}

    with pytest.raises(SystemExit):  # a second run into the same folder is refused, before the model loads
        eval_command.main([*args, "--max-samples", "2"])
    assert "holds a finished run" in capsys.readouterr().err

    # --overwrite: the new run writes beside the finished one; interrupted, it has replaced nothing.
    transcribe = evaluation._transcribe
    calls = []

    def interrupted_after_one_call(*call_args, **kwargs):
        calls.append(1)
        if len(calls) > 2:  # the warm-up and one timed call, then Ctrl-C
            raise KeyboardInterrupt
        return transcribe(*call_args, **kwargs)

    monkeypatch.setattr(evaluation, "_transcribe", interrupted_after_one_call)
    with pytest.raises(KeyboardInterrupt):
        eval_command.main([*args, "--max-samples", "6", "--batch-size", "1", "--overwrite"])
    assert {name: (out_dir / name).read_text() for name in finished} == finished
    partial = evaluation.partial_dir(out_dir)
    assert len(evaluation.read_finished(partial / "samples.jsonl")) == 4  # one call of 4 clips was written

    with pytest.raises(SystemExit):  # the interrupted run is not silently thrown away either
        eval_command.main([*args, "--max-samples", "6"])
    assert "holds an interrupted run" in capsys.readouterr().err

    monkeypatch.setattr(evaluation, "_transcribe", transcribe)
    assert eval_command.main([*args, "--max-samples", "6", "--resume", "--overwrite"]) == 0
    assert "[resume] 4 samples already done" in capsys.readouterr().out
    assert not partial.exists() and not out_dir.with_name("manifest.jsonl.replaced").exists()
    assert json.loads((out_dir / "run.json").read_text())["max_samples"] == 6
    assert len(evaluation.read_finished(out_dir / "samples.jsonl")) == 6


def test_a_run_with_no_scored_clip_is_an_error(
    tiny_whisper: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "broken.wav").write_bytes(b"RIFF not really a wav file")
    rows = [{"audio": "broken.wav", "text": "never decoded"}, {"audio": "broken.wav", "text": " "}]
    (tmp_path / "broken.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    argv = eval_args(tiny_whisper, tmp_path / "broken.jsonl", out)
    assert eval_command.main(argv) == 1
    err = capsys.readouterr().err
    assert "no clip of broken.jsonl could be scored" in err and "1 bad audio, 1 empty references" in err
    assert not (out / Path(tiny_whisper).name / "broken.jsonl" / "results.json").exists()
    # tests/test_leaderboard.py: such a results file is never ranked.
