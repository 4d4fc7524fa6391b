"""train.py on tiny random models: configuration, data checks, feature cache, checkpoints, resume, push, DDP.

Run as a script (`torchrun ... tests/test_train.py OUT -- ARGS`) it is the DDP worker of `test_ddp_*`.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile
import torch
import yaml
from datasets import Audio, Dataset, DatasetDict
from huggingface_hub import HfApi
from huggingface_hub.utils import filter_repo_objects
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, TrainerCallback, TrainingArguments

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import train  # noqa: E402
import training.run  # noqa: E402
from training.arguments import ModelArguments  # noqa: E402
from training.collator import SpeechCollator  # noqa: E402
from training.data import DatasetSpec, load_speech_data, parse_dataset_specs  # noqa: E402
from training.feature_cache import build_feature_cache  # noqa: E402
from training.prefix_cache import PromptPrefixCache  # noqa: E402
from training.trainer import SeededLengthGroupedSampler, TinyAudioTrainer  # noqa: E402

WORDS = "the quick brown fox jumps over the lazy dog one two three four five".split()
RATE = 16000
NO_EVAL = ("--eval_datasets", "", "--eval_on_start", "false")


def wav_bytes(samples: np.ndarray, rate: int = RATE) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples.astype(np.float32), rate, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def speech_rows(count: int, seed: int) -> dict[str, list]:
    """Noise clips of 1-3 s with short random transcripts (the tiny models cannot tell speech from noise)."""
    rng = np.random.default_rng(seed)
    clips = [0.1 * rng.standard_normal(int(RATE * rng.uniform(1, 3))) for _ in range(count)]
    return {
        "audio": [{"bytes": wav_bytes(clip), "path": None} for clip in clips],
        "text": [" ".join(rng.choice(WORDS, 3)) for _ in range(count)],
    }


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, str]:
    """Tiny encoder + LLM folders and a small save_to_disk dataset with train/test splits."""
    from testing.tiny_models import make_tiny_encoder, make_tiny_llm

    root = tmp_path_factory.mktemp("train")
    data = DatasetDict(
        {"train": Dataset.from_dict(speech_rows(24, 0)), "test": Dataset.from_dict(speech_rows(4, 1))}
    ).cast_column("audio", Audio(sampling_rate=RATE))
    data.save_to_disk(root / "data")
    return {
        "root": str(root),
        "encoder": make_tiny_encoder(root / "encoder"),
        "llm": make_tiny_llm(root / "llm"),
        "data": str(root / "data"),
    }


def base_args(workspace: dict, output_dir: str, *extra: str) -> list[str]:
    """A YAML config (as a user would write) plus command-line overrides."""
    config = {
        "audio_model_id": workspace["encoder"],
        "text_model_id": workspace["llm"],
        "train_datasets": [{"path": workspace["data"], "split": "train"}],
        "eval_datasets": [{"path": workspace["data"], "split": "train", "max_samples": 8}],
        "wer_eval_samples": 1,
        "output_dir": output_dir,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "learning_rate": 0.05,
        "lr_scheduler_type": "constant",
        "max_steps": 6,
        "save_steps": 3,
        "eval_on_start": True,  # + the evaluation at the end: loss before and after training
        "logging_steps": 1,
        "train_sampling_strategy": "group_by_length",
        "report_to": ["wandb", "tensorboard"],  # absent packages must only be skipped
        "seed": 7,
    }
    path = Path(output_dir + ".yaml")
    path.write_text(json.dumps(config))  # JSON is YAML
    return [str(path), *extra]


def projector_of(folder: str | Path) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "model.safetensors"))


@contextmanager
def llm_calls(model) -> Iterator[list]:
    """The LLM's forward calls while the block runs: a warm-up must make none."""
    calls = []
    handle = model.language_model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


class Snapshot(TrainerCallback):
    """Copies every weight at the start and the end of training."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.after = {k: v.detach().clone() for k, v in model.state_dict().items()}


class Crash(TrainerCallback):
    """Kills the run at the start of `step`, like a lost machine: nothing after the last checkpoint survives."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("simulated crash")


@pytest.fixture(scope="module")
def reference_run(workspace) -> dict:
    """One uninterrupted 6-step run with evaluation (loss + WER) at the start and the end."""
    output_dir = os.path.join(workspace["root"], "reference")
    snapshot = Snapshot()
    metrics = train.run(base_args(workspace, output_dir), callbacks=[snapshot])
    return {"output_dir": output_dir, "snapshot": snapshot, "metrics": metrics}


def test_yaml_config_with_command_line_overrides(workspace, tmp_path):
    argv = base_args(workspace, str(tmp_path / "out"), "--learning_rate", "0.001", "--push-to-hub", "me/tiny")
    model_args, data_args, run_args, training_args = train.parse_args(argv)
    assert model_args.text_model_id == workspace["llm"]
    assert training_args.learning_rate == 0.001 and training_args.max_steps == 6
    assert training_args.train_sampling_strategy == "group_by_length"
    assert run_args.push_to_hub_repo == "me/tiny" and not training_args.push_to_hub
    assert "wandb" not in training_args.report_to or train.OPTIONAL_REPORTERS["wandb"]()
    (spec,) = parse_dataset_specs(data_args.train_datasets)
    assert spec == DatasetSpec(path=workspace["data"], split="train")
    with pytest.raises(ValueError, match="not used by the HfArgumentParser"):
        train.parse_args(base_args(workspace, str(tmp_path / "out"), "--no_such_option", "1"))
    with pytest.raises(ValueError, match="Unknown dataset option"):
        parse_dataset_specs('[{"path": "x", "colums": 1}]')


def test_a_yaml_path_under_home_is_expanded_as_the_shell_would(workspace, tmp_path, monkeypatch):
    """`output_dir: ~/runs/x` in a config means the home folder, not a folder named "~" in the working directory
    (the long run keeps its corpus, cache and checkpoints under the home folder, which outlives a fresh checkout)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = json.loads(Path(base_args(workspace, str(tmp_path / "out"))[0]).read_text())
    config_path = tmp_path / "home_paths.yaml"
    config_path.write_text(
        yaml.safe_dump({**config, "output_dir": "~/runs/long", "feature_cache_dir": "~/cache/features"})
    )
    argv = [str(config_path)]
    _, data_args, _, training_args = train.parse_args(argv)
    assert training_args.output_dir == str(tmp_path / "home" / "runs" / "long")
    assert data_args.feature_cache_dir == str(tmp_path / "home" / "cache" / "features")


def test_wandb_without_its_package_is_dropped_saying_how_to_install_it(workspace, tmp_path, caplog):
    """The run goes on without W&B and says how to get it; the README says that and how to run W&B offline."""
    if train.OPTIONAL_REPORTERS["wandb"]():
        pytest.skip("wandb is installed here")
    training_args = train.parse_args(base_args(workspace, str(tmp_path / "out"), "--report_to", "wandb"))[3]
    assert training_args.report_to == []
    assert "Not reporting to wandb: its package is not installed (pip install wandb)" in caplog.text
    readme = re.sub(r"\s+", " ", (ROOT / "README.md").read_text())
    assert "`--report_to wandb` logs to Weights & Biases instead; it needs `pip install wandb`" in readme
    assert "`WANDB_MODE=offline python train.py configs/offline.yaml --report_to wandb`" in readme
    assert "`wandb sync wandb/offline-run-*`" in readme


@pytest.mark.parametrize(
    "config",
    sorted((ROOT / "configs").rglob("*.yaml")),
    ids=lambda path: str(path.relative_to(ROOT / "configs")),
)
def test_checked_in_configs_parse(config):
    written = yaml.safe_load(config.read_text())
    _, data_args, _, training_args = train.parse_args([str(config)])
    specs = parse_dataset_specs(data_args.train_datasets)
    home = os.path.expanduser  # "~" names the home folder, as in a shell
    assert [spec.path for spec in specs] == [home(entry["path"]) for entry in written["train_datasets"]]
    assert training_args.output_dir == home(written["output_dir"])
    for key in ("learning_rate", "max_steps"):
        assert getattr(training_args, key) == written[key], key


def test_config_comments_say_what_the_file_is_for_and_leave_results_to_training_md():
    """Recipes and trials live apart, and no config comment narrates a result: a WER, a change or a timing has
    one home, offline_kit/trained/TRAINING.md."""
    configs = ROOT / "configs"
    assert {path.parent.name for path in configs.rglob("*.yaml")} == {"configs", "recipes", "trials"}
    result = re.compile(r"\d%|->|\bminutes\b|\bRTFx\b|\bWER\b")
    for config in configs.rglob("*.yaml"):
        comments = [line.split("#", 1)[1] for line in config.read_text().splitlines() if "#" in line]
        narrated = [comment for comment in comments if result.search(comment) and "--" not in comment]
        assert not narrated, (config.name, narrated)


def test_offline_recipe_stages_chain_and_the_script_runs_each_one():
    """Each stage starts from the previous stage's output, or from the mean of stages (training.average) once they
    are trained, and train_offline_model.sh trains them all and ships the last."""
    script = (ROOT / "scripts" / "train_offline_model.sh").read_text()
    stages = sorted(
        (ROOT / "configs" / "recipes").glob("offline_stage*.yaml"), key=lambda p: int(p.stem[13:])
    )
    assert [config.name for config in stages] == [f"offline_stage{number}.yaml" for number in range(1, 12)]
    averaged = re.search(r"^AVERAGED=(\S+)$", script, re.MULTILINE).group(1)
    mean_of = re.search(r'-m training\.average "\$AVERAGED" (.+)$', script, re.MULTILINE).group(1).split()
    previous_output, outputs = None, []
    for config in stages:
        model_args, _, _, training_args = train.parse_args([str(config)])
        start = model_args.model_name_or_path
        assert start == previous_output or (start == averaged and previous_output == mean_of[-1]), config.name
        assert f"train configs/recipes/{config.name} " in script, config.name
        previous_output = training_args.output_dir
        outputs.append(previous_output)
    assert set(mean_of) <= set(outputs)
    assert re.search(r"^RUN=(\S+)$", script, re.MULTILINE).group(1) == previous_output
    assert 'preset --ship "$RUN"' in script


def test_mixing_weights_set_each_sources_share(tmp_path):
    """Two equal sources weighted 3:1 give about three clips of the first for one of the second, in memory and
    streamed (a share of 0.5 would mean the weights were ignored)."""
    clip = {"bytes": wav_bytes(0.1 * np.sin(np.arange(RATE // 10) / 3.0)), "path": None}
    for name in ("first", "second"):
        rows = {"audio": [clip] * 400, "text": [f"{name} {i}" for i in range(400)]}
        Dataset.from_dict(rows).cast_column("audio", Audio(sampling_rate=RATE)).save_to_disk(tmp_path / name)
    options = dict(
        default_task="transcribe", sampling_rate=RATE, max_audio_seconds=30.0, tasks=["transcribe"]
    )
    for streaming in (False, True):
        sources = [("first", 3), ("second", 1)]
        specs = [{"path": str(tmp_path / name), "weight": w, "streaming": streaming} for name, w in sources]
        mixed, _ = load_speech_data(parse_dataset_specs(specs), **options)
        texts = [row["text"] for _, row in zip(range(400), mixed, strict=False)]
        share = sum(text.startswith("first") for text in texts) / len(texts)
        assert len(texts) == 400 and 0.68 <= share <= 0.82, share


def described_clips(path: Path, count: int) -> None:
    """A saved corpus whose rows have a transcript and a description, as the offline kit's corpora do."""
    clip = {"bytes": wav_bytes(0.1 * np.sin(np.arange(RATE // 10) / 3.0)), "path": None}
    rows = {
        "audio": [clip] * count,
        "text": [f"words {i}" for i in range(count)],
        "description": [f"A woman speaking, clip {i}." for i in range(count)],
    }
    Dataset.from_dict(rows).cast_column("audio", Audio(sampling_rate=RATE)).save_to_disk(path)


def test_task_weights_set_each_tasks_share_whatever_the_sources_weights(tmp_path):
    """One corpus read twice (transcripts and descriptions) at source weights 5:1, plus a source that mixes both
    tasks in its task column: task_weights 1:3 gives about a quarter transcripts (5:1 alone would give 5/6)."""
    described_clips(tmp_path / "corpus", 400)
    Dataset.from_dict({**speech_rows(40, 3), "task": ["transcribe", "describe"] * 20}).cast_column(
        "audio", Audio(sampling_rate=RATE)
    ).save_to_disk(tmp_path / "mixed")
    specs = parse_dataset_specs(
        [
            {"path": str(tmp_path / "corpus"), "task": "transcribe", "weight": 5},
            {"path": str(tmp_path / "corpus"), "text_column": "description", "task": "describe"},
            {"path": str(tmp_path / "mixed")},
        ]
    )
    options = dict(default_task="transcribe", sampling_rate=RATE, max_audio_seconds=30.0)
    tasks = ["transcribe", "describe"]
    mixed, _ = load_speech_data(specs, tasks=tasks, task_weights={"transcribe": 1, "describe": 3}, **options)
    rows = [row for _, row in zip(range(800), mixed, strict=False)]
    share = sum(row["task"] == "transcribe" for row in rows) / len(rows)
    assert len(rows) == 800 and 0.19 <= share <= 0.31, share
    descriptions = [row["text"] for row in rows if row["task"] == "describe"]
    assert all(text.startswith("A woman") for text in descriptions if "clip" in text)
    unweighted, _ = load_speech_data(specs, tasks=tasks, **options)
    rows = [row for _, row in zip(range(800), unweighted, strict=False)]
    assert sum(row["task"] == "transcribe" for row in rows) / len(rows) > 0.6

    with pytest.raises(ValueError, match="task 'describe', which task_weights .* gives no share"):
        load_speech_data(specs, tasks=tasks, task_weights={"transcribe": 1}, **options)
    with pytest.raises(ValueError, match="unknown task 'dance'; the model's tasks are describe, transcribe"):
        load_speech_data([DatasetSpec(path=str(tmp_path / "corpus"), task="dance")], tasks=tasks, **options)


class TaskCounter(SpeechCollator):
    """The real collator, counting the tasks of the rows the Trainer hands it."""

    seen: list[str] = []

    def __call__(self, rows):
        TaskCounter.seen += [row["task"] for row in rows]
        return super().__call__(rows)


def test_one_run_trains_transcription_and_description_with_prompts_from_the_config(
    workspace, tmp_path, monkeypatch
):
    described_clips(tmp_path / "corpus", 48)
    corpus = str(tmp_path / "corpus")
    prompt = "Describe the speaker and the recording."
    monkeypatch.setattr(training.run, "SpeechCollator", TaskCounter)
    TaskCounter.seen = []
    argv = base_args(
        workspace,
        str(tmp_path / "multitask"),
        *NO_EVAL,
        "--train_datasets",
        json.dumps([{"path": corpus}, {"path": corpus, "text_column": "description", "task": "describe"}]),
        "--task_weights",
        '{"transcribe": 0.5, "describe": 0.5}',
        "--task_prompts",
        json.dumps({"describe": prompt}),
        "--max_steps",
        "8",
    )
    train.run(argv)
    share = TaskCounter.seen.count("describe") / len(TaskCounter.seen)
    assert len(TaskCounter.seen) >= 32 and 0.25 <= share <= 0.75, TaskCounter.seen
    saved = json.loads((tmp_path / "multitask" / "config.json").read_text())
    assert saved["task_prompts"]["describe"] == prompt and saved["task_prompts"]["transcribe"]
    from processing_tiny_audio import TinyAudioProcessor

    assert (
        TinyAudioProcessor.from_pretrained(str(tmp_path / "multitask")).instruction("describe", None)
        == prompt
    )


def test_bad_rows_are_skipped_and_counted(tmp_path):
    """Every source kind; bad rows of each sort are dropped and counted, good ones all kept, sources mixed."""
    rng = np.random.default_rng(0)
    good = [0.1 * rng.standard_normal(RATE) for _ in range(4)]
    disk = Dataset.from_dict(
        {
            "audio": [{"bytes": wav_bytes(clip), "path": None} for clip in good]
            + [
                {"bytes": wav_bytes(np.zeros(RATE * 31)), "path": None},  # longer than the 30 s window
                {"bytes": b"not audio at all", "path": None},
                {"bytes": wav_bytes(np.full(RATE, np.nan)), "path": None},
                {"bytes": wav_bytes(np.zeros(10)), "path": None},
                {"bytes": wav_bytes(np.zeros(0)), "path": None},  # decodes to no samples at all
                {"bytes": wav_bytes(good[0]), "path": None},
                {"bytes": wav_bytes(good[0]), "path": None},
            ],
            "sentence": [
                "a b",
                "c d",
                "e f",
                "g h",
                "long",
                "garbage",
                "nan",
                "tiny",
                "none",
                "   ",
                "an emotion",
            ],
            "task": ["transcribe"] * 10 + ["dance"],
        }
    ).cast_column("audio", Audio(sampling_rate=RATE))
    disk.save_to_disk(tmp_path / "disk")
    # A CSV manifest with audio paths relative to it, at another sampling rate and in stereo.
    (tmp_path / "clips").mkdir()
    soundfile.write(tmp_path / "clips" / "a.wav", np.stack([good[1], good[1]], axis=1), 8000)
    (tmp_path / "manifest.csv").write_text("file,words\nclips/a.wav,hello there\nclips/missing.wav,lost\n")
    (tmp_path / "manifest.jsonl").write_text(
        json.dumps({"audio": "clips/a.wav", "text": "hi", "task": "emotion"})
    )
    specs = parse_dataset_specs(
        [
            {"path": str(tmp_path / "disk"), "text_column": "sentence", "weight": 2},
            {"path": str(tmp_path / "manifest.csv"), "audio_column": "file", "text_column": "words"},
            {"path": str(tmp_path / "manifest.jsonl")},
        ]
    )
    options = dict(sampling_rate=RATE, max_audio_seconds=30.0, tasks=["transcribe", "emotion"])
    dataset, skipped = load_speech_data(specs, default_task="transcribe", **options)
    assert dict(skipped) == {
        "too_long": 1,
        "undecodable_audio": 2,
        "nonfinite_audio": 1,
        "empty_audio": 2,
        "empty_transcript": 1,
        "unknown_task": 1,
    }
    assert {"a b", "c d", "e f", "g h", "hello there", "hi"} == set(dataset["text"])
    assert set(dataset.column_names) >= {"audio", "text", "task", "duration", "audio_hash", "length"}
    assert dict(zip(dataset["text"], dataset["task"], strict=True))["hi"] == "emotion"
    assert dict(zip(dataset["text"], dataset["duration"], strict=True))["hello there"] == pytest.approx(
        2.0
    )  # 16000 samples at 8 kHz

    # The same source streamed: bad rows are dropped on the fly and counted by the stream's counter.
    streamed, _ = load_speech_data(
        [DatasetSpec(path=str(tmp_path / "disk"), text_column="sentence", streaming=True)],
        default_task="transcribe",
        **options,
    )
    assert sorted(row["text"] for row in streamed) == ["a b", "c d", "e f", "g h"]

    with pytest.raises(ValueError, match="no text column 'words'"):
        load_speech_data(
            [DatasetSpec(path=str(tmp_path / "disk"), text_column="words")], default_task="x", **options
        )


def test_tsv_manifests_and_audio_folders_load_without_naming_their_columns(tmp_path):
    """train.py loads sources as eval.py does: columns found by their usual names, .tsv manifests, and audio folders
    (files plus metadata.csv) read without torchcodec."""
    from pipeline_asr import read_audio
    from training.data import audio_hash

    (tmp_path / "clips").mkdir()
    soundfile.write(tmp_path / "clips" / "a.wav", 0.1 * np.random.default_rng(1).standard_normal(RATE), 8000)
    (tmp_path / "manifest.tsv").write_text("audio_filepath\tsentence\nclips/a.wav\thello, there\n")
    (tmp_path / "clips" / "metadata.csv").write_text("file_name,transcription\na.wav,hi\n")
    specs = parse_dataset_specs([str(tmp_path / "manifest.tsv"), str(tmp_path / "clips")])
    options = dict(
        sampling_rate=RATE, max_audio_seconds=30.0, tasks=["transcribe"], default_task="transcribe"
    )
    dataset, skipped = load_speech_data(specs, **options)
    assert sorted(dataset["text"]) == ["hello, there", "hi"] and not skipped
    assert set(dataset["audio_hash"]) == {audio_hash(read_audio(str(tmp_path / "clips" / "a.wav"), RATE))}
    (tmp_path / "other.tsv").write_text("audio_filepath\twords\nclips/a.wav\thi\n")
    with pytest.raises(ValueError, match=r"no text column found \(columns: audio_filepath, words\)"):
        load_speech_data(parse_dataset_specs([str(tmp_path / "other.tsv")]), **options)


def test_training_lowers_loss_and_only_changes_the_projector(reference_run):
    history = json.loads(Path(reference_run["output_dir"], "trainer_state.json").read_text())["log_history"]
    eval_losses = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    assert eval_losses[-1] < eval_losses[0]
    assert "eval_wer" in reference_run["metrics"]

    before, after = reference_run["snapshot"].before, reference_run["snapshot"].after
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith("multi_modal_projector.") for name in changed)
    assert changed == {name for name in before if name.startswith("multi_modal_projector.")}

    skipped = json.loads(Path(reference_run["output_dir"], "skipped_rows.json").read_text())
    assert sum(skipped.values()) == 0


def test_checkpoints_are_projector_only_and_load_back(reference_run):
    from modeling_tiny_audio import TinyAudioForConditionalGeneration
    from processing_tiny_audio import TinyAudioProcessor

    output_dir = Path(reference_run["output_dir"])
    for folder in (output_dir, output_dir / "checkpoint-3", output_dir / "checkpoint-6"):
        assert all(key.startswith("multi_modal_projector.") for key in projector_of(folder))
        # the Hub code, Inference Endpoints' handler included, so any checkpoint can be pushed and served
        assert all((folder / name).is_file() for name in ("modeling_tiny_audio.py", "handler.py"))
    assert (output_dir / "checkpoint-3" / "optimizer.pt").is_file()
    model = TinyAudioForConditionalGeneration.from_pretrained(output_dir)
    trained = reference_run["snapshot"].after
    for name, tensor in model.trainable_state_dict().items():
        torch.testing.assert_close(tensor, trained[name].cpu())  # trained on a GPU where there is one
    processor = TinyAudioProcessor.from_pretrained(output_dir)
    inputs = processor(audio=np.zeros(RATE, dtype=np.float32), task="transcribe")
    assert model.generate(**inputs, max_new_tokens=3).shape[1] <= inputs["input_ids"].shape[1] + 3


@pytest.fixture(scope="module")
def model_and_test_rows(workspace, tmp_path_factory):
    """A fresh model + processor from the tiny towers, and the checked rows of the test split."""
    model, processor = training.run.build_model(
        ModelArguments(audio_model_id=workspace["encoder"], text_model_id=workspace["llm"]),
        TrainingArguments(output_dir=str(tmp_path_factory.mktemp("unused")), use_cpu=True),
    )
    options = dict(
        sampling_rate=RATE, max_audio_seconds=30.0, tasks=["transcribe"], default_task="transcribe"
    )
    dataset, _ = load_speech_data([DatasetSpec(path=workspace["data"], split="test")], **options)
    return model, processor, dataset


def test_cached_encoder_features_give_the_live_loss(model_and_test_rows, tmp_path):
    model, processor, dataset = model_and_test_rows
    store = build_feature_cache(model, processor, dataset, str(tmp_path / "cache"), batch_size=3)
    assert len(store) == len(dataset)
    shards = sorted(os.listdir(store.directory))
    again = build_feature_cache(model, processor, dataset, str(tmp_path / "cache"))
    assert (
        again.directory == store.directory and sorted(os.listdir(store.directory)) == shards
    )  # no re-encoding

    rows = list(dataset)
    live = SpeechCollator(processor)(rows)
    cached = SpeechCollator(processor, store)(rows)
    assert "input_features" not in cached and cached["encoder_hidden_states"].dtype == torch.float16
    assert cached["encoder_hidden_states"].shape[1] < live["input_features"].shape[-1] // 2  # trimmed
    torch.testing.assert_close(cached["input_ids"], live["input_ids"])
    with torch.no_grad():
        live_loss = model(**live).loss
        cached_loss = model(**cached).loss
    torch.testing.assert_close(cached_loss, live_loss, rtol=1e-3, atol=1e-3)


def test_feature_cache_key_names_a_local_encoder_folder_however_it_is_spelled(
    model_and_test_rows, monkeypatch
):
    from training.feature_cache import encoder_key

    model, processor, _ = model_and_test_rows
    folder = Path(model.config.audio_model_id).resolve()
    monkeypatch.setenv("HOME", str(folder.parent))
    keys = set()
    for spelling in (str(folder), f"~/{folder.name}", os.path.relpath(folder)):
        monkeypatch.setattr(model.config, "audio_model_id", spelling)
        keys.add(encoder_key(model, processor))
    assert len(keys) == 1
    monkeypatch.setattr(model.config, "audio_model_id", "someone/other-encoder")
    assert encoder_key(model, processor) not in keys


def test_feature_cache_key_reads_the_encoder_weights_not_their_sum(model_and_test_rows):
    """The same encoder names the same cache whatever torch's thread count (a float sum's rounding depends on it),
    and weights holding the same values in another order (other features) name another."""
    from training.feature_cache import encoder_key

    model, processor, _ = model_and_test_rows
    threads = torch.get_num_threads()
    try:
        keys_by_threads = set()
        for count in (1, 2):
            torch.set_num_threads(count)
            keys_by_threads.add(encoder_key(model, processor))
    finally:
        torch.set_num_threads(threads)
    assert len(keys_by_threads) == 1
    weight = next(p for p in model.audio_tower.parameters() if p.dim() == 2)
    with torch.no_grad():
        original = weight.clone()
        try:
            # Small integers sum exactly in any order, so only the order of the values tells these two apart.
            weight.copy_((torch.arange(weight.numel()) % 7).reshape(weight.shape))
            in_order = encoder_key(model, processor)
            weight.copy_(weight.flip(0))
            assert encoder_key(model, processor) != in_order
        finally:
            weight.copy_(original)


def test_prompt_prefix_cache_gives_the_same_loss_and_gradient(model_and_test_rows):
    model, processor, dataset = model_and_test_rows
    batch = SpeechCollator(processor)(list(dataset))
    trimmed = PromptPrefixCache(model, model.config.audio_token_id).apply(batch)
    assert 0 < trimmed["input_ids"].shape[1] < batch["input_ids"].shape[1]
    results = []
    for inputs in (batch, trimmed):
        model.zero_grad()
        loss = model(**inputs).loss
        loss.backward()
        results.append((loss.detach(), model.multi_modal_projector.linear_1.weight.grad.clone()))
    model.zero_grad()
    torch.testing.assert_close(results[1], results[0], rtol=1e-4, atol=1e-5)


def test_checkpoints_hold_only_the_trained_weights_and_what_resumes_them(reference_run):
    """The Trainer's own saving writes through the model's save_pretrained: a checkpoint holds the projector (no
    encoder or LLM weight), the processor and the training arguments."""
    from checkpoint_tiny_audio import is_pretrained_weight

    output_dir = Path(reference_run["output_dir"])
    for folder in (output_dir / "checkpoint-3", output_dir / "checkpoint-6", output_dir):
        names = set(projector_of(folder))
        assert names and not any(is_pretrained_weight(name) for name in names), folder.name
        assert {"config.json", "tokenizer.json", "processor_config.json"} <= set(os.listdir(folder)), (
            folder.name
        )
    assert (output_dir / "checkpoint-3" / "training_args.bin").is_file()


def test_the_private_trainer_hooks_train_py_overrides_are_called(model_and_test_rows, tmp_path):
    """`TinyAudioTrainer` overrides two private Trainer hooks where no public one does the job: `_get_train_sampler` (the
    length-grouped order drawn from the seed alone) and `_load_from_checkpoint` (strict loading of the trained
    weights). If transformers renames them or stops calling them, this fails instead of training on silently."""
    model, processor, dataset = model_and_test_rows
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        use_cpu=True,
        per_device_train_batch_size=1,
        train_sampling_strategy="group_by_length",
        seed=3,
        report_to=[],
        remove_unused_columns=False,  # as train.py: the collator reads the audio column
    )
    trainer = TinyAudioTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=SpeechCollator(processor),
        processing_class=processor,
    )
    orders = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)  # whatever ran before must not move the order
        sampler = trainer.get_train_dataloader().batch_sampler.sampler
        assert isinstance(sampler, SeededLengthGroupedSampler)
        orders.append(list(sampler))
    assert orders[0] == orders[1] and sorted(orders[0]) == list(range(len(dataset)))

    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    weights = {name: tensor.clone() for name, tensor in model.trainable_state_dict().items()}
    save_file(
        {**weights, "multi_modal_projector.extra.weight": torch.zeros(1)}, checkpoint / "model.safetensors"
    )
    with pytest.raises(ValueError, match="does not match this model's trainable weights"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def test_resume_after_a_crash_reproduces_the_uninterrupted_run(workspace, reference_run, monkeypatch):
    output_dir = os.path.join(workspace["root"], "crashed")
    with pytest.raises(KeyboardInterrupt):
        train.run(base_args(workspace, output_dir, *NO_EVAL), callbacks=[Crash(step=4)])
    logs = {"runs"}  # TensorBoard event files, present when tensorboard is installed
    assert sorted(set(os.listdir(output_dir)) - logs) == ["checkpoint-3", "run.json", "skipped_rows.json"]

    pushed = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: pushed.update(repo=repo_id, **kw))
    monkeypatch.setattr(
        HfApi,
        "upload_folder",
        lambda self, **kw: pushed.update(kw) or SimpleNamespace(commit_url="https://hub/c"),
    )
    argv = base_args(workspace, output_dir, *NO_EVAL, "--resume", "--push-to-hub", "me/tiny-audio")
    train.run(argv)
    expected = projector_of(reference_run["output_dir"])
    resumed = projector_of(output_dir)
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor)

    assert pushed["repo"] == "me/tiny-audio" and pushed["repo_id"] == "me/tiny-audio"
    assert pushed["folder_path"] == output_dir
    # What upload_folder sends of the run folder: the model's files, not the run's (checkpoints, logs, records).
    in_folder = [str(path.relative_to(output_dir)) for path in Path(output_dir).rglob("*") if path.is_file()]
    sent = set(filter_repo_objects(in_folder, allow_patterns=pushed["allow_patterns"]))
    assert {"model.safetensors", "config.json", "modeling_tiny_audio.py", "tokenizer.json"} <= sent
    assert sent == {name for name in in_folder if "/" not in name} - {
        "run.json",
        "skipped_rows.json",
        "trainer_state.json",
        "training_args.bin",
    }


def test_training_does_not_import_publishing():
    """publish/ builds on training/ (its run folders, averaged checkpoints); never the other way round."""
    listing = "import sys, train, training.average; print(sorted(m for m in sys.modules if m.startswith('publish')))"
    done = subprocess.run(
        [sys.executable, "-c", listing], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr[-2000:]


@pytest.mark.parametrize(
    "extra",
    [(), ("--ctc_weight", "0.5"), ("--ctc_weight", "0.5", "--ctc_only_steps", "2")],
    ids=["lm-loss", "lm-and-ctc-loss", "ctc-warm-up-then-both"],
)
def test_ddp_two_processes_end_with_identical_projectors(workspace, extra):
    output_dir = os.path.join(workspace["root"], "ddp-" + "-".join(extra))
    result = _run_ddp(workspace, output_dir, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (load_file(os.path.join(output_dir, f"rank{rank}.safetensors")) for rank in (0, 1))
    start = load_file(os.path.join(output_dir, "start.safetensors"))
    for name in rank0:
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0)
    assert any(not torch.equal(rank0[name], start[name]) for name in rank0)
    state = json.loads(Path(output_dir, "trainer_state.json").read_text())
    assert state["global_step"] == 3


def _run_ddp(workspace, output_dir: str, *extra: str) -> subprocess.CompletedProcess:
    """train.py in two real processes under torchrun (this file is the worker)."""
    argv = base_args(workspace, output_dir, *NO_EVAL, "--max_steps", "3", "--save_strategy", "no", *extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        __file__,
        output_dir,
        *argv,
    ]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)


class SaveRankWeights(TrainerCallback):
    """Each rank writes the projector it ends with (and rank 0 the one it started from)."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if args.process_index == 0:
            os.makedirs(self.output_dir, exist_ok=True)
            save_file(model.trainable_state_dict(), os.path.join(self.output_dir, "start.safetensors"))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        path = os.path.join(self.output_dir, f"rank{args.process_index}.safetensors")
        save_file(model.trainable_state_dict(), path)


if __name__ == "__main__":  # DDP worker: tests/test_train.py OUTPUT_DIR TRAIN_ARGS...
    torch.set_num_threads(1)
    train.run(sys.argv[2:], callbacks=[SaveRankWeights(sys.argv[1])])


# ---- auxiliary CTC alignment ---------------------------------------------------------------------------------


def test_ctc_loss_is_low_exactly_when_frames_sit_on_the_spoken_token_embeddings():
    from decoding_tiny_audio import embedding_ctc_logits, embedding_ctc_loss
    from processing_tiny_audio import IGNORE_INDEX

    torch.manual_seed(0)
    embeddings = torch.nn.Embedding(50, 16).weight.detach()
    spoken = [7, 7, 12, 30]  # a repeated token needs a blank between its two frames
    path = [3, 7, 3, 7, 12, 12, 3, 30, 3]
    frames = embeddings[path][None]
    mask = torch.ones(1, len(path), dtype=torch.bool)
    ctc_targets = torch.tensor([spoken])

    logits = embedding_ctc_logits(frames, embeddings, embeddings.pow(2).sum(-1))
    assert logits.argmax(-1)[0].tolist() == path  # each frame scores its own token best
    aligned = embedding_ctc_loss(frames, mask, embeddings, ctc_targets, blank_id=3)
    wrong = embedding_ctc_loss(
        embeddings[[3, 20, 3, 21, 22, 22, 3, 40, 3]][None], mask, embeddings, ctc_targets, 3
    )
    assert aligned < 0.5 < wrong
    no_transcript = torch.full((1, 4), IGNORE_INDEX)
    assert embedding_ctc_loss(frames, mask, embeddings, no_transcript, blank_id=3) == 0  # the row is left out


def test_ctc_loss_is_part_of_the_model_forward(model_and_test_rows):
    """The collator gives each transcript row's spoken tokens as `ctc_targets`; the model's forward adds
    `ctc_loss_weight` times their CTC loss to the LM loss, and `ctc_only` computes the CTC loss alone without the
    LLM. With `num_items_in_batch` (gradient accumulation) the CTC mean takes this batch's share, as the LM loss."""
    from decoding_tiny_audio import embedding_ctc_loss
    from processing_tiny_audio import IGNORE_INDEX

    model, processor, dataset = model_and_test_rows
    rows = list(dataset)[:3]
    rows[2] = {**rows[2], "task": "describe"}
    blank = training.run.ctc_blank_token_id(processor.tokenizer, " ")
    batch = SpeechCollator(processor, ctc_blank_token_id=blank)(rows)
    eos = processor.tokenizer.eos_token_id
    for row, ctc_row in zip(batch["labels"][:2], batch["ctc_targets"][:2], strict=True):
        answer = row[row != IGNORE_INDEX].tolist()
        assert ctc_row[ctc_row != IGNORE_INDEX].tolist() == [t for t in answer if t not in (eos, blank)]
    assert (batch["ctc_targets"][2] == IGNORE_INDEX).all()  # not a transcript

    model.config.ctc_blank_token_id, model.config.ctc_loss_weight = blank, 0.5
    try:
        with torch.no_grad():
            plain = model(**{k: v for k, v in batch.items() if k != "ctc_targets"})
            joint = model(**batch)
            audio, audio_mask = model.get_audio_features(
                batch["input_features"], batch["input_features_mask"]
            )
            expected = embedding_ctc_loss(
                audio, audio_mask, model.get_input_embeddings().weight, batch["ctc_targets"], blank
            )
            torch.testing.assert_close(joint.ctc_loss, expected)
            torch.testing.assert_close(joint.loss, plain.loss + 0.5 * expected)

            with llm_calls(model) as calls:
                warm_up = model(**batch, ctc_only=True)
            assert calls == [] and warm_up.logits is None
            torch.testing.assert_close(warm_up.loss, expected)

            answer_tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
            half = model(**batch, ctc_only=True, num_items_in_batch=2 * answer_tokens)
            torch.testing.assert_close(half.loss, expected / 2)
    finally:
        model.config.ctc_blank_token_id, model.config.ctc_loss_weight = None, 0.0


def test_the_trainer_takes_labels_as_the_only_label_input():
    """The Trainer treats every forward argument named like "label" as a label, and computes an evaluation loss
    only when all of them are in the batch: the CTC targets must not be one, or runs without CTC lose eval_loss."""
    from transformers.utils.generic import find_labels

    from modeling_tiny_audio import TinyAudioForConditionalGeneration

    assert find_labels(TinyAudioForConditionalGeneration) == ["labels"]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_ctc_warm_up_skips_the_llm_then_trains_on_both_losses(workspace, tmp_path, accumulation):
    """During `ctc_only_steps` the LLM never runs; afterwards the logged loss adds the LM loss to the CTC loss.

    With gradient accumulation the CTC loss, a mean per micro-batch, is scaled like the LM loss: a step's loss is
    the mean over its micro-batches, not their sum.
    """

    class CountLLMCalls(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.calls_per_step, self.calls = [], 0

            def hook(*_):
                self.calls += 1

            model.language_model.register_forward_hook(hook)

        def on_step_end(self, args, state, control, **kwargs):
            self.calls_per_step.append(self.calls)
            self.calls = 0

    counter, snapshot = CountLLMCalls(), Snapshot()
    output_dir = str(tmp_path / "ctc")
    argv = base_args(
        workspace,
        output_dir,
        *NO_EVAL,
        "--ctc_only_steps",
        "3",
        "--ctc_weight",
        "0.5",
        "--ctc_decoding_weight",
        "0.3",
        "--num_beams",
        "2",
    )
    train.run([*argv, "--gradient_accumulation_steps", str(accumulation)], callbacks=[counter, snapshot])
    # (step 4 also runs the LLM once over the shared prompt prefix, for the prefix cache)
    assert counter.calls_per_step[:3] == [0, 0, 0] and min(counter.calls_per_step[3:]) >= 1
    history = json.loads(Path(output_dir, "trainer_state.json").read_text())["log_history"]
    steps = [entry for entry in history if "loss" in entry]
    assert all(entry["loss"] == pytest.approx(entry["ctc_loss"], rel=1e-3) for entry in steps[:3])
    assert all(entry["loss"] > 0.5 * entry["ctc_loss"] + 0.1 for entry in steps[3:])
    changed = {k for k in snapshot.before if not torch.equal(snapshot.before[k], snapshot.after[k])}
    assert changed and all(k.startswith("multi_modal_projector.") for k in changed)
    # the saved model knows its CTC blank and decodes jointly with its CTC head at the weight asked for
    saved = json.loads(Path(output_dir, "config.json").read_text())
    decoding = json.loads(Path(output_dir, "generation_config.json").read_text())
    assert (saved["ctc_loss_weight"], decoding["ctc_decoding_weight"], decoding["num_beams"]) == (0.5, 0.3, 2)
    space = AutoTokenizer.from_pretrained(workspace["llm"])(" ", add_special_tokens=False)["input_ids"]
    assert [saved["ctc_blank_token_id"]] == space


def test_spec_augment_flags_reach_the_saved_config_and_a_continued_run_keeps_them(workspace, tmp_path):
    first = str(tmp_path / "masked")
    train.run(base_args(workspace, first, *NO_EVAL, "--mask_time_prob", "0.2", "--mask_feature_length", "4"))
    saved = json.loads(Path(first, "config.json").read_text())
    assert (saved["mask_time_prob"], saved["mask_time_length"], saved["mask_feature_length"]) == (0.2, 10, 4)
    unused = TrainingArguments(output_dir=str(tmp_path / "unused"), use_cpu=True)
    kept, _ = training.run.build_model(ModelArguments(model_name_or_path=first), unused)
    assert (kept.config.mask_time_prob, kept.config.mask_feature_length) == (0.2, 4)
    off, _ = training.run.build_model(ModelArguments(model_name_or_path=first, mask_time_prob=0.0), unused)
    assert (off.config.mask_time_prob, off.config.mask_feature_length) == (0.0, 4)


def test_ctc_decoding_weight_without_a_ctc_head_is_refused(workspace, tmp_path):
    argv = base_args(workspace, str(tmp_path / "no-ctc"), *NO_EVAL, "--ctc_decoding_weight", "0.3")
    with pytest.raises(ValueError, match="ctc_decoding_weight 0.3 needs a CTC head"):
        train.run(argv)
    assert not (tmp_path / "no-ctc" / "model.safetensors").exists()


def test_lora_trains_the_chosen_llm_modules_and_nothing_else_of_the_llm(workspace, tmp_path):
    snapshot, output_dir = Snapshot(), str(tmp_path / "lora")
    argv = base_args(
        workspace, output_dir, *NO_EVAL, "--lora_rank", "4", "--lora_target_modules", "k_proj", "up_proj"
    )
    train.run(argv, callbacks=[snapshot])
    changed = {k for k in snapshot.before if not torch.equal(snapshot.before[k], snapshot.after[k])}
    in_llm = {k for k in changed if not k.startswith("multi_modal_projector.")}
    assert in_llm and all("lora_" in k for k in in_llm)
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in in_llm} == {"k_proj", "up_proj"}
    assert json.loads(Path(output_dir, "config.json").read_text())["lora_target_modules"] == [
        "k_proj",
        "up_proj",
    ]

    # A continued run may widen LoRA: the trained adapters carry on and the new ones train from zero.
    wider, widened = Snapshot(), str(tmp_path / "lora-wider")
    argv = base_args(
        workspace,
        widened,
        *NO_EVAL,
        "--model_name_or_path",
        output_dir,
        "--lora_target_modules",
        "k_proj",
        "up_proj",
        "v_proj",
    )
    train.run(argv, callbacks=[wider])
    trained = [k for k in snapshot.after if ".lora_" in k or k.startswith("multi_modal_projector.")]
    assert all(torch.equal(wider.before[k], snapshot.after[k]) for k in trained)
    new = {k for k in wider.before if ".lora_" in k and k not in snapshot.after}
    assert new and all(".v_proj.lora_" in k for k in new)
    assert all(not wider.before[k].any() for k in new if ".lora_B" in k)
    assert all(not torch.equal(wider.before[k], wider.after[k]) for k in new if ".lora_B" in k)
    assert json.loads(Path(widened, "config.json").read_text())["lora_target_modules"] == [
        "k_proj",
        "up_proj",
        "v_proj",
    ]


def test_feature_cache_key_is_the_same_for_a_saved_and_reloaded_processor(model_and_test_rows, tmp_path):
    """A run continued from a saved checkpoint must find the cache its first stage built."""
    from processing_tiny_audio import TinyAudioProcessor
    from training.feature_cache import encoder_key

    model, processor, _ = model_and_test_rows
    fresh_key = encoder_key(model, processor)
    processor.save_pretrained(tmp_path)
    reloaded = TinyAudioProcessor.from_pretrained(tmp_path)
    assert getattr(reloaded.feature_extractor, "auto_map", None)  # saved: it records where its code lives
    assert encoder_key(model, reloaded) == fresh_key
    reloaded.feature_extractor.n_fft *= 2
    assert encoder_key(model, reloaded) != fresh_key


def test_averaging_checkpoints_gives_a_checkpoint_with_the_mean_weights(tmp_path):
    """training.average: the (weighted) mean of the trained weights, loadable like any checkpoint; it refuses
    checkpoints of different models and a folder that already holds something."""
    from modeling_tiny_audio import TinyAudioForConditionalGeneration
    from testing.tiny_models import make_tiny_tiny_audio
    from training import average
    from training.run_folder import checkpoint_files

    model, processor = make_tiny_tiny_audio(tmp_path, lora_rank=4)
    saved = []
    for name, shift in (("first", 0.0), ("second", 0.3)):
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(shift)
        model.save_pretrained(tmp_path / name)
        processor.save_pretrained(tmp_path / name)
        saved.append(load_file(tmp_path / name / "model.safetensors"))

    for leftover in ("optimizer.pt", "trainer_state.json", "run.json"):  # the run's, not the model's
        (tmp_path / "second" / leftover).write_text("{}")
    (tmp_path / "mean").mkdir()  # an empty folder is fine
    average.main([str(tmp_path / "mean"), str(tmp_path / "first"), str(tmp_path / "second")])
    assert not list(tmp_path.glob(".*partial"))
    averaged = TinyAudioForConditionalGeneration.from_pretrained(tmp_path / "mean")
    state = averaged.trainable_state_dict()
    assert state.keys() == saved[0].keys() and any(".lora_B" in name for name in state)
    for name, tensor in state.items():
        torch.testing.assert_close(tensor, (saved[0][name] + saved[1][name]) / 2)
    copied = {path.name for path in (tmp_path / "mean").iterdir()}
    assert copied == {path.name for path in checkpoint_files(tmp_path / "second")} | {"averaged_from.json"}
    record = json.loads((tmp_path / "mean" / "averaged_from.json").read_text())
    assert record["weights"] == [0.5, 0.5]

    average.main(
        [str(tmp_path / "weighted"), str(tmp_path / "first"), str(tmp_path / "second"), "--weights", "3", "1"]
    )
    weighted = load_file(tmp_path / "weighted" / "model.safetensors")
    for name, tensor in weighted.items():
        torch.testing.assert_close(tensor, 0.75 * saved[0][name] + 0.25 * saved[1][name])

    with pytest.raises(FileExistsError, match="is not empty"):
        average.average_checkpoints([tmp_path / "first", tmp_path / "second"], tmp_path / "mean")
    other, _ = make_tiny_tiny_audio(tmp_path / "other", lora_rank=2)
    other.save_pretrained(tmp_path / "rank2")
    with pytest.raises(ValueError, match="rank2 and .*first are not the same model: their config fields"):
        average.average_checkpoints([tmp_path / "first", tmp_path / "rank2"], tmp_path / "bad")
    with pytest.raises(SystemExit, match="2"):
        average.main([str(tmp_path / "bad"), str(tmp_path / "first"), str(tmp_path / "nothing-here")])
    assert not (tmp_path / "bad").exists()


# ---- output folders, resume and bad input ------------------------------------------------------------------


def _train_command(argv: list[str]) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *argv]


TRAIN_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "warning"}


def _wait_for_complete_checkpoint(process: subprocess.Popen, folder: Path, step: int) -> None:
    from training.run_folder import is_complete

    checkpoint = folder / f"checkpoint-{step}"
    for _ in range(6000):
        if is_complete(checkpoint):
            return
        assert process.poll() is None, "the run ended before it was killed"
        time.sleep(0.02)
    raise AssertionError(f"{checkpoint} never completed")


def test_a_killed_run_resumes_from_its_newest_complete_checkpoint_and_skips_finished_steps(
    workspace, reference_run, tmp_path
):
    """A real SIGKILL of a real training process; its newest checkpoint then torn as a kill mid-write tears it.
    The resumed run takes the newest complete checkpoint, says so, trains only the steps left, and ends with the
    uninterrupted run's weights."""
    from training.run_folder import is_complete

    output_dir = tmp_path / "killed"
    # Far more steps than will run: the kill always lands mid-run. Steps and schedule are those of the reference.
    argv = base_args(workspace, str(output_dir), *NO_EVAL, "--save_steps", "1", "--disable_tqdm", "true")
    # The reference trained in this process: as many threads here, so that every step sums in the same order and
    # an exact resume gives the reference's weights exactly (with one thread they differ even uninterrupted).
    env = {**TRAIN_ENV, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    with open(tmp_path / "first.log", "w") as log:
        process = subprocess.Popen(
            _train_command([*argv, "--max_steps", "1000"]), cwd=ROOT, env=env, stdout=log, stderr=log
        )
        try:
            _wait_for_complete_checkpoint(process, output_dir, 2)
        finally:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == -signal.SIGKILL

    complete = sorted(
        (int(path.name.split("-")[1]) for path in output_dir.glob("checkpoint-*") if is_complete(path)),
    )
    torn, expected = complete[-1], complete[-2]
    state = output_dir / f"checkpoint-{torn}" / "trainer_state.json"
    state.write_text(state.read_text()[:40])  # killed while the Trainer wrote its last file
    assert expected < 6

    resumed = subprocess.run(
        _train_command([*argv, "--max_steps", "6", "--resume"]),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from checkpoint-{expected} (step {expected})" in resumed.stdout
    assert f"checkpoint-{torn} is incomplete" in resumed.stderr
    assert (output_dir / f"incomplete-checkpoint-{torn}").is_dir()
    trained_steps = [line for line in resumed.stdout.splitlines() if line.startswith("{'loss'")]
    assert len(trained_steps) == 6 - expected  # the finished steps are not trained again
    assert f"Trained model saved in {output_dir}" in resumed.stdout
    assert f"python eval.py {output_dir}" in resumed.stdout
    for name, tensor in projector_of(reference_run["output_dir"]).items():
        torch.testing.assert_close(projector_of(output_dir)[name], tensor)

    # Resuming the finished run does nothing and says so (it used to train a step past max_steps).
    finished_weights = projector_of(output_dir)
    assert train.run([*argv, "--max_steps", "6", "--resume"]) == {}
    assert not (output_dir / "checkpoint-7").exists()
    for name, tensor in finished_weights.items():
        assert torch.equal(projector_of(output_dir)[name], tensor)


def test_a_finished_run_is_never_trained_over(workspace, reference_run, tmp_path, monkeypatch, capsys):
    output_dir = reference_run["output_dir"]
    weights = projector_of(output_dir)
    argv = base_args(workspace, output_dir)
    from training.preflight import PreflightError

    monkeypatch.setattr(training.run, "build_model", _no_model_may_load)
    with pytest.raises(PreflightError, match="holds this run, finished: --resume does nothing"):
        train.run(argv)
    capsys.readouterr()
    assert train.run([*argv, "--resume"]) == {}  # nothing to do, and it says so, with no model loaded
    assert "already finished this run at step 6 (max_steps 6): nothing to do" in capsys.readouterr().out
    # Another learning rate is another run: refused, and --resume will not continue the old run's checkpoints.
    with pytest.raises(
        PreflightError, match=r"holds another run \(not training over it\).*learning_rate: 0.05 -> 0.01"
    ):
        train.run([*argv, "--learning_rate", "0.01"])
    with pytest.raises(
        PreflightError, match=r"not resuming from its checkpoints.*learning_rate: 0.05 -> 0.01"
    ):
        train.run([*argv, "--learning_rate", "0.01", "--resume"])
    for name, tensor in weights.items():
        assert torch.equal(projector_of(output_dir)[name], tensor)

    # A folder of something else is refused; --overwrite_output_dir clears a run's files, not the user's.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    (tmp_path / "mine" / "checkpoint-9").mkdir()
    mine = base_args(workspace, str(tmp_path / "mine"), *NO_EVAL, "--max_steps", "1")
    with pytest.raises(PreflightError, match="not empty and holds no record of a run"):
        train.run(mine)
    monkeypatch.undo()
    train.run([*mine, "--overwrite_output_dir"])
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in (tmp_path / "mine").glob("checkpoint-*")) == ["checkpoint-1"]

    # The same config on changed data (same folder, other clips) is another run too.
    data = tmp_path / "data"
    shutil.copytree(workspace["data"], data)
    config = json.loads(Path(mine[0]).read_text())
    config["train_datasets"] = [{"path": str(data), "split": "train"}]
    Path(mine[0]).write_text(json.dumps(config))
    train.run([*mine, "--overwrite_output_dir"])
    changed = DatasetDict(
        {"train": Dataset.from_dict(speech_rows(24, 5)), "test": Dataset.from_dict(speech_rows(4, 1))}
    ).cast_column("audio", Audio(sampling_rate=RATE))
    shutil.rmtree(data)
    changed.save_to_disk(data)
    with pytest.raises(PreflightError, match=r"not resuming from its checkpoints.*fingerprint"):
        train.run([*mine, "--resume", "--max_steps", "2"])


def test_a_run_killed_while_saving_its_final_model_gets_it_back_on_resume(
    workspace, reference_run, tmp_path, monkeypatch, capsys
):
    """All steps trained, then killed mid-way through the final save: `--resume` puts the last checkpoint's model
    (the Trainer saves one at the last step) in place of the torn one instead of calling the run finished."""
    output_dir = tmp_path / "killed-at-the-end"
    shutil.copytree(reference_run["output_dir"], output_dir)
    weights = output_dir / "model.safetensors"
    weights.write_bytes(
        weights.read_bytes()[:100]
    )  # torn; the trainer state comes after it, so it is missing
    (output_dir / "trainer_state.json").unlink()
    monkeypatch.setattr(training.run, "build_model", _no_model_may_load)
    capsys.readouterr()

    assert train.run(base_args(workspace, str(output_dir), "--resume")) == {}
    assert "stopped while saving its final model, now restored from checkpoint-6" in capsys.readouterr().out
    for name, tensor in projector_of(reference_run["output_dir"]).items():
        assert torch.equal(projector_of(output_dir)[name], tensor)
    assert train.run(base_args(workspace, str(output_dir), "--resume")) == {}  # and now it is simply finished
    assert "restored" not in capsys.readouterr().out


def _no_model_may_load(*args, **kwargs):
    raise AssertionError("a model was loaded before the arguments were checked")


def _bad_train_arguments(workspace: dict, tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (train.py arguments, a regular expression the one error message must match)."""
    out = str(tmp_path / "out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "model.safetensors").write_bytes(b"someone's weights")

    other_run = tmp_path / "other-run"  # a checkpoint of a run with another learning rate
    (other_run / "checkpoint-2").mkdir(parents=True)
    (other_run / "run.json").write_text(json.dumps({"training": {"learning_rate": 0.01}}))
    (other_run / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    (other_run / "checkpoint-2" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "torn" / "checkpoint-4").mkdir(parents=True)
    (tmp_path / "torn" / "checkpoint-4" / "model.safetensors").write_bytes(b"weights")

    def data(**spec: object) -> list[str]:
        return ["--train_datasets", json.dumps([{"path": workspace["data"], "split": "train", **spec}])]

    return {
        "negative_learning_rate": (
            base_args(workspace, out, "--learning_rate", "-1"),
            "learning_rate must be positive",
        ),
        "zero_batch": (base_args(workspace, out, "--per_device_train_batch_size", "0"), "must be at least 1"),
        "zero_steps": (base_args(workspace, out, "--max_steps", "0"), "max_steps must be positive"),
        "negative_ctc_weight": (
            base_args(workspace, out, "--ctc_weight", "-1"),
            "ctc_weight must not be negative",
        ),
        "ctc_decoding_weight_above_one": (
            base_args(workspace, out, "--ctc_decoding_weight", "1.5"),
            "ctc_decoding_weight must be between 0 and 1, got 1.5",
        ),
        "starter_corpus_not_built": (
            base_args(workspace, out, "--train_datasets", "data/synthetic"),
            r"data/synthetic has not been built yet: build it with `python -m offline_kit.synthetic_corpus",
        ),
        "missing_manifest": (
            base_args(workspace, out, "--train_datasets", "./clips/train.jsonl"),
            r"\./clips/train.jsonl does not exist",
        ),
        "hub_dataset_offline": (
            base_args(workspace, out, "--train_datasets", "speechbrain/LoquaciousSet"),
            r"speechbrain/LoquaciousSet is not a local folder or file.*HF_HUB_OFFLINE.*data/real_speech",
        ),
        "missing_column": (
            base_args(workspace, out, *data(text_column="sentence")),
            "no text column 'sentence'",
        ),
        "missing_split": (base_args(workspace, out, *data(split="validation")), "has no split 'validation'"),
        "missing_eval_column": (
            base_args(
                workspace,
                out,
                "--eval_datasets",
                json.dumps([{"path": workspace["data"], "audio_column": "wav"}]),
            ),
            "no audio column 'wav'",
        ),
        "unknown_task_weight": (
            base_args(workspace, out, "--task_weights", '{"transcribe": 0.5, "dance": 0.5}'),
            r"task_weights: unknown task 'dance'; the model's tasks are describe, emotion, transcribe",
        ),
        "negative_task_weight": (
            base_args(workspace, out, "--task_weights", '{"transcribe": -1}'),
            "the share of task 'transcribe' must be a positive number",
        ),
        "task_prompts_not_a_mapping": (
            base_args(workspace, out, "--task_prompts", '["Describe it."]'),
            "task_prompts must map tasks to instructions",
        ),
        "missing_encoder_folder": (
            base_args(workspace, out, "--audio_model_id", str(tmp_path / "no-encoder")),
            "encoder .*no-encoder: no such folder",
        ),
        "hub_models_offline": (
            base_args(
                workspace,
                out,
                "--audio_model_id",
                "openai/whisper-large-v3-turbo",
                "--text_model_id",
                "HuggingFaceTB/SmolLM3-3B",
            ),
            r"the encoder openai/whisper-large-v3-turbo and the LLM HuggingFaceTB/SmolLM3-3B of this config come "
            r"from the Hugging Face Hub.*configs/offline.yaml",
        ),
        "folder_of_something_else": (
            base_args(workspace, str(tmp_path / "full")),
            "not empty and holds no record of a run",
        ),
        "resume_nothing": (base_args(workspace, out, "--resume"), "holds no run to continue"),
        "resume_from_another_runs_checkpoint": (
            base_args(workspace, out, "--resume_from_checkpoint", str(other_run / "checkpoint-2")),
            r"checkpoint-2 belongs to another run \(not resuming from it\).*learning_rate: 0.01 -> 0.05",
        ),
        "resume_from_incomplete_checkpoint": (
            base_args(workspace, out, "--resume_from_checkpoint", str(tmp_path / "torn" / "checkpoint-4")),
            "checkpoint-4 is not a complete checkpoint",
        ),
    }


BAD_TRAIN_ARGUMENTS = [
    "negative_learning_rate",
    "zero_batch",
    "zero_steps",
    "negative_ctc_weight",
    "ctc_decoding_weight_above_one",
    "starter_corpus_not_built",
    "missing_manifest",
    "hub_dataset_offline",
    "missing_column",
    "missing_split",
    "missing_eval_column",
    "unknown_task_weight",
    "negative_task_weight",
    "task_prompts_not_a_mapping",
    "missing_encoder_folder",
    "hub_models_offline",
    "folder_of_something_else",
    "resume_nothing",
    "resume_from_another_runs_checkpoint",
    "resume_from_incomplete_checkpoint",
]


@pytest.mark.parametrize("name", BAD_TRAIN_ARGUMENTS)
def test_bad_arguments_fail_with_one_message_before_a_model_loads(name, workspace, tmp_path, monkeypatch):
    from training.preflight import PreflightError

    monkeypatch.chdir(tmp_path)  # relative dataset paths resolve here, where nothing has been built
    monkeypatch.setattr(training.run, "build_model", _no_model_may_load)
    argv, expected = _bad_train_arguments(workspace, tmp_path)[name]
    with pytest.raises(PreflightError, match=expected):
        train.run(argv)


def test_the_default_config_offline_is_one_message_naming_the_offline_config(tmp_path):
    """As a user types it: no traceback, one line pointing at configs/offline.yaml."""
    done = subprocess.run(
        _train_command([str(ROOT / "configs" / "default.yaml"), "--output_dir", str(tmp_path / "out")]),
        cwd=tmp_path,
        env=TRAIN_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith(
        "error: the encoder openai/whisper-large-v3-turbo and the LLM HuggingFaceTB/SmolLM3-3B"
    )
    assert "configs/offline.yaml" in error


def test_warmup_longer_than_the_run_is_warned_about(workspace, tmp_path, caplog):
    model_args, data_args, _, training_args = train.parse_args(
        base_args(workspace, str(tmp_path / "out"), "--warmup_steps", "50")
    )
    training.run.check_arguments(model_args, data_args, training_args)
    assert "warmup_steps 50 is more than max_steps 6" in caplog.text


class KeepModel(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model


def test_console_names_the_folder_what_trains_on_how_much_and_what_to_do_next(workspace, tmp_path, capsys):
    """The start summary (output folder, trainable and frozen parameters, clips, steps, effective batch) and
    the closing hint (how to evaluate and demo the result), with the run's own numbers."""
    kept, output_dir = KeepModel(), tmp_path / "out"
    argv = base_args(
        workspace, str(output_dir), *NO_EVAL, "--max_steps", "1", "--gradient_accumulation_steps", "2"
    )
    train.run([*argv, "--lora_rank", "2"], callbacks=[kept])
    printed = capsys.readouterr().out
    trainable = sum(tensor.numel() for tensor in kept.model.trainable_state_dict().values())  # what is saved
    frozen = sum(parameter.numel() for parameter in kept.model.parameters()) - trainable
    assert (
        f"Training Tiny Audio into {output_dir}\n"
        f"  parameters: {trainable:,} trainable (projector, LoRA), {frozen:,} frozen (encoder, LLM)\n"
        "  clips: 24 (skipped: 0), steps: 1, effective batch: 8 (4 per device x 2 accumulation x 1 process)\n"
    ) in printed, printed
    assert printed.rstrip().endswith(
        f"Trained model saved in {output_dir}\n"
        f"  evaluate it: python eval.py {output_dir} --dataset data/real_speech\n"
        f"  try it:      python demo/app.py --model {output_dir}"
    ), printed
    # A run without LoRA does not claim it; one that trains encoder layers names them.
    train.run([*argv, "--encoder_trainable_layers", "1", "--overwrite_output_dir"])
    assert " trainable (projector, top encoder layers), " in capsys.readouterr().out


def test_trainer_wer_is_eval_py_wer_in_percent(workspace, reference_run, tmp_path):
    """The Trainer's eval_wer is eval.py's metric (Whisper normaliser, corpus WER, percent). The reference below is
    the model's own words plus five more only once normalised as Whisper's normaliser does ("(laughs)" dropped,
    "Mr." -> "mister", "two" -> "2"); a lowercase-and-strip-punctuation pipeline counts six, one of them "mr"."""
    from modeling_tiny_audio import TinyAudioForConditionalGeneration
    from pipeline_asr import read_audio
    from processing_tiny_audio import TinyAudioProcessor
    from training.wer import normalize, score

    folder = reference_run["output_dir"]
    model = TinyAudioForConditionalGeneration.from_pretrained(folder).eval()
    processor = TinyAudioProcessor.from_pretrained(folder)
    row = Dataset.load_from_disk(os.path.join(workspace["data"], "train")).cast_column(
        "audio", Audio(decode=False)
    )[0]
    inputs = processor(audio=[read_audio(row["audio"], RATE)], task="transcribe")
    hypothesis = processor.decode_generated(model.generate(**inputs), inputs)[0]
    assert reference_run["metrics"]["eval_wer"] == pytest.approx(100 * score([row["text"]], [hypothesis]).wer)

    # The tiny model then says something, not just whitespace.
    model.generation_config.no_repeat_ngram_size = 1
    hypothesis = processor.decode_generated(model.generate(**inputs), inputs)[0]
    spoken = len(normalize(hypothesis).split())
    assert spoken > 0
    reference = f"{hypothesis.upper()} (laughs) Mr. Smith has two dogs."
    trainer = TinyAudioTrainer(
        model=model,
        args=TrainingArguments(str(tmp_path), per_device_eval_batch_size=1, report_to=[]),
        processing_class=processor,
        wer_rows=[{"audio": row["audio"], "text": reference}],
    )
    assert trainer.generation_wer() == pytest.approx(100 * 5 / (spoken + 5))
    assert 100 * score([reference], [hypothesis]).wer == pytest.approx(100 * 5 / (spoken + 5))
