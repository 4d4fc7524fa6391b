"""`python -m publish.push`: the exact folder that is uploaded serves through the pipeline, its card is valid,
and the Hub client receives that folder (HfApi's network calls are the only stand-in: the Hub is unreachable)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import soundfile as sf
from conftest import HIDE_REPO_PRELUDE, pipeline_in_fresh_process, speech_like
from huggingface_hub import HfApi, ModelCard, metadata_load

from publish.card import build_card, read_results, validate_card
from publish.push import build_upload_folder, main

RATE = 16000
# Greedy decoding of a random tiny LLM mostly repeats whitespace; forbidding repeats yields visible words.
VARIED = {"no_repeat_ngram_size": 1, "max_new_tokens": 8}
ESB = "hf-audio/esb-datasets-test-only-sorted"
EVAL_RESULTS = {
    "model": "outputs/run",
    "dataset": "librispeech-clean",
    "dataset_location": f"{ESB} (librispeech)",  # eval.py's form for a Hub set with a config
    "split": "test.clean",
    "n": 200,
    "wer": 0.0875,
    "rtfx": 41.3,
    "device": "cuda",
    "batch_size": 16,
}


@pytest.fixture
def inputs(tiny_model_dir: str, tmp_path: Path) -> SimpleNamespace:
    """A training output folder (checkpoint plus Trainer leftovers), an example clip and an eval.py results file."""
    model_dir = Path(shutil.copytree(tiny_model_dir, tmp_path / "run"))
    (model_dir / "training_args.bin").write_bytes(b"pickled args")
    (model_dir / "optimizer.pt").write_bytes(b"optimizer state")
    (model_dir / "checkpoint-5").mkdir()
    (model_dir / "trainer_state.json").write_text(
        json.dumps({"global_step": 5, "epoch": 1.0, "log_history": [{"loss": 3.5}, {"loss": 2.25}]})
    )
    clip = tmp_path / "clip.flac"
    sf.write(clip, speech_like(3.0), RATE)
    results = tmp_path / "results.json"
    results.write_text(json.dumps(EVAL_RESULTS))
    return SimpleNamespace(model_dir=model_dir, clip=clip, results=results)


def upload_folder(inputs: SimpleNamespace, out: Path, **options: Any) -> Path:
    """build_upload_folder over the fixture's run and example clip, for the repo alice/x."""
    return build_upload_folder(inputs.model_dir, out, "alice/x", inputs.clip, **options)


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> SimpleNamespace:
    """Records what HfApi.create_repo / upload_folder receive; the uploaded folder is copied as the Hub would store it."""
    record = SimpleNamespace(created=[], uploads=[], stored=tmp_path / "hub" / "alice" / "tiny-audio-demo")

    def create_repo(self, repo_id, **kwargs):
        record.created.append((repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        record.uploads.append((repo_id, sorted(p.name for p in Path(folder_path).iterdir()), kwargs))
        shutil.copytree(folder_path, record.stored)
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return record


EXPECTED_FILES = [
    "README.md",
    "chat_template.jinja",
    "checkpoint_tiny_audio.py",
    "config.json",
    "configuration_tiny_audio.py",
    "decoding_tiny_audio.py",
    "encoder_tiny_audio.py",
    "example.flac",
    "generation_config.json",
    "handler.py",
    "lora_tiny_audio.py",
    "model.safetensors",
    "modeling_tiny_audio.py",
    "pipeline_asr.py",
    "processing_tiny_audio.py",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
]


def test_push_uploads_a_folder_that_serves_from_a_fresh_process(
    inputs, hub, tiny_model_and_processor, tmp_path: Path, capsys
) -> None:
    generation_file = inputs.model_dir / "generation_config.json"
    generation = json.loads(generation_file.read_text())
    generation_file.write_text(json.dumps({**generation, "num_beams": 2}))  # how it decodes shows on the card
    main(
        [str(inputs.model_dir), "--repo", "alice/tiny-audio-demo", "--example-audio", str(inputs.clip)]
        + ["--results", str(inputs.results), "--dataset", "openslr/librispeech_asr", "--allow-local-base"]
    )
    assert [repo for repo, _ in hub.created] == ["alice/tiny-audio-demo"]
    [(repo, names, kwargs)] = hub.uploads
    assert repo == "alice/tiny-audio-demo" and kwargs["repo_type"] == "model"
    present = {name for name in EXPECTED_FILES if (inputs.model_dir / name).exists()} | {
        "README.md",
        "example.flac",
    }
    assert names == sorted(present)  # no optimizer state, Trainer args or intermediate checkpoints
    assert "https://huggingface.co/alice/tiny-audio-demo/commit/0" in capsys.readouterr().out

    card = validate_card(hub.stored / "README.md")
    assert card.data.eval_results[0].metric_value == 8.75
    assert "| optimizer steps | 5 |" in card.text and "| final training loss | 2.2500 |" in card.text
    projector = tiny_model_and_processor[0].multi_modal_projector
    assert f"{sum(p.numel() for p in projector.parameters()):,} trainable parameters" in card.text
    assert "holds just those weights" in card.text
    assert "| decoding | beam search (2 beams) |" in card.text
    assert (
        "holds `handler.py`" in card.text
        and "widget on this page answers only through such an Endpoint" in card.text
    )

    assert pipeline_in_fresh_process(hub.stored, hub.stored / "example.flac", tmp_path, **VARIED).strip()


CARD_ARGUMENTS = {
    "repo_id": "alice/x",
    "config": {
        "audio_model_id": "openai/whisper-tiny.en",
        "text_model_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
    },
    "results": [],
    "example_file": "example.flac",
    "license": "mit",
    "datasets": [],
    "language": [],
    "trainable_params": 1,
    "standalone": False,
    "weights_size": "1 MB",
    "training_facts": [],
    "train_config": None,
}
WHISPER_EN = {"model_type": "whisper", "vocab_size": 51864}  # an English-only (.en) Whisper encoder's config


@pytest.mark.parametrize(
    ("audio_config", "language", "expected"),
    [
        (WHISPER_EN, [], ["en"]),  # from the encoder: Whisper .en is English only
        ({"model_type": "whisper", "vocab_size": 51865}, [], None),  # multilingual: not guessed
        ({"model_type": "hubert", "vocab_size": 32}, [], None),
        ({"model_type": "whisper", "vocab_size": 51865}, ["fr"], ["fr"]),  # --language wins
    ],
)
def test_card_language_comes_from_the_encoder(audio_config, language, expected) -> None:
    config = {**CARD_ARGUMENTS["config"], "audio_config": audio_config}
    card = build_card(**{**CARD_ARGUMENTS, "config": config, "language": language})
    assert card.data.language == expected
    if expected:
        assert f"It is built for {expected[0]} speech only" in card.text
    else:
        assert "languages it transcribes were not stated" in card.text


def test_card_says_what_it_is_for_what_it_cannot_do_and_what_it_learned_from(inputs, tmp_path: Path) -> None:
    stage1, stage2 = tmp_path / "stage1.yaml", tmp_path / "stage2.yaml"
    stage1.write_text("train_datasets:\n  - {path: data/synthetic10k, split: train}\n")
    stage2.write_text(
        "train_datasets:\n  - {path: speechbrain/LoquaciousSet, name: small, split: train}\n"
        "  - {path: data/synthetic10k, split: train}\n"
    )
    out = upload_folder(
        inputs,
        tmp_path / "out",
        results_files=[inputs.results],
        train_configs=[stage1, stage2],
        training_data_note="synthetic speech only",
        allow_local_base=True,
    )
    card = validate_card(out / "README.md")
    for heading in ("## Intended use", "## Limitations", "## Results", "## How it was trained"):
        assert heading in card.text
    assert (
        "| training data | synthetic speech only: data/synthetic10k train, speechbrain/LoquaciousSet (small) train |"
        in card.text
    )
    assert card.data.datasets is None  # names from a config are not claimed as Hub datasets
    assert "RTFx measured on |" in card.text and "| cuda, batch 16 |" in card.text


def test_license_agrees_everywhere(inputs, tmp_path: Path) -> None:
    """The card's default license is the project's own: LICENSE and setup.cfg say MIT."""
    import configparser

    from conftest import REPO_ROOT

    setup = configparser.ConfigParser()
    setup.read(REPO_ROOT / "setup.cfg")
    assert setup["metadata"]["license"] == "MIT" and setup["metadata"]["license_files"] == "LICENSE"
    assert (REPO_ROOT / "LICENSE").read_text().startswith("MIT License\n")
    main(
        [str(inputs.model_dir), "--repo", "alice/x", "--example-audio", str(inputs.clip)]
        + ["--out", str(tmp_path / "out"), "--dry-run", "--allow-local-base"]
    )
    assert metadata_load(tmp_path / "out" / "README.md")["license"] == "mit"
    assert metadata_load(REPO_ROOT / "offline_kit" / "trained" / "README.md")["license"] == "mit"


def test_card_metadata_parses_and_validates(tmp_path: Path, inputs) -> None:
    config = {
        "audio_model_id": "openai/whisper-large-v3-turbo",
        "text_model_id": "HuggingFaceTB/SmolLM3-3B",
        "projector_downsample": 4,
        "projector_activation": "gelu",
        "lora_rank": 8,
    }
    card = build_card(
        repo_id="alice/tiny-audio-demo",
        config=config,
        results=read_results([inputs.results]),
        decoding={"num_beams": 3, "ctc_decoding_weight": 0.3},
        example_file="example.flac",
        license="mit",
        datasets=["openslr/librispeech_asr"],
        language=["en"],
        trainable_params=12_345_678,
        standalone=False,
        weights_size="49.4 MB",
        training_facts=[],
        train_config="learning_rate: 0.001\n",
    )
    card.save(tmp_path / "README.md")
    metadata = metadata_load(tmp_path / "README.md")
    assert metadata["pipeline_tag"] == "automatic-speech-recognition"
    assert metadata["library_name"] == "transformers"
    assert metadata["base_model"] == ["openai/whisper-large-v3-turbo", "HuggingFaceTB/SmolLM3-3B"]
    assert metadata["datasets"] == ["openslr/librispeech_asr"] and metadata["license"] == "mit"
    assert metadata["widget"] == [
        {
            "src": "https://huggingface.co/alice/tiny-audio-demo/resolve/main/example.flac",
            "example_title": "Example",
        }
    ]
    [entry] = metadata["model-index"]
    assert entry["name"] == "tiny-audio-demo"
    [result] = entry["results"]
    assert result["task"]["type"] == "automatic-speech-recognition"
    assert result["dataset"] == {
        "name": "librispeech-clean",
        "type": ESB,
        "config": "librispeech",
        "split": "test.clean",
    }
    assert result["metrics"] == [{"type": "wer", "value": 8.75, "name": "WER"}]

    parsed = validate_card(tmp_path / "README.md")
    assert isinstance(parsed, ModelCard)
    assert (
        'pipeline("automatic-speech-recognition", model="alice/tiny-audio-demo", trust_remote_code=True)'
        in card.text
    )
    assert f"| {ESB} (librispeech) | test.clean | 200 | 8.75 | 41.3 | cuda, batch 16 |" in card.text
    assert "rank-8 LoRA" in card.text and "learning_rate: 0.001" in card.text
    assert "voice-attribute heads" not in card.text
    assert "| decoding | beam search (3 beams), joint CTC/attention (CTC weight 0.3) |" in card.text
    assert (
        "holds just those weights (49.4 MB)" in card.text and "12,345,678 trainable parameters" in card.text
    )


def test_card_shows_a_baseline_next_to_each_result_but_claims_only_its_own(tmp_path: Path, inputs) -> None:
    whisper, greedy = tmp_path / "whisper.json", tmp_path / "greedy.json"
    whisper.write_text(
        json.dumps({**EVAL_RESULTS, "model": "whisper-tiny.en", "wer": 0.0516, "rtfx": 1.5, "batch_size": 1})
    )
    greedy.write_text(
        json.dumps(
            {
                **EVAL_RESULTS,
                "model": "whisper-greedy",
                "wer": 0.0561,
                "rtfx": 7.5,
                "generate_kwargs": {"num_beams": 1},
            }
        )
    )
    out = upload_folder(
        inputs,
        tmp_path / "out",
        results_files=[inputs.results],
        baseline_files=[whisper, greedy],
        allow_local_base=True,
    )
    text = (out / "README.md").read_text()
    header = (
        "| WER (%) | whisper-tiny.en WER (%) | whisper-greedy WER (%) | RTFx | whisper-tiny.en RTFx "
        "| whisper-greedy RTFx | RTFx measured on |"
    )
    assert header in text
    # a baseline measured at another batch size says so beside its RTFx
    assert (
        f"| {ESB} (librispeech) | test.clean | 200 | 8.75 | 5.16 | 5.61 | 41.3 | 1.5 (cuda, batch 1) | 7.5 "
        "| cuda, batch 16 |" in text
    )
    assert (
        "- `whisper-tiny.en`: the pipeline's own defaults" in text
        and '- `whisper-greedy`: `{"num_beams": 1}`' in text
    )
    [entry] = metadata_load(out / "README.md")["model-index"]
    assert [result["metrics"][0]["value"] for result in entry["results"]] == [8.75]


def test_validate_card_names_each_problem(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text(
        "---\nlibrary_name: transformers\nbase_model: /home/me/encoder\n---\n# card\n", encoding="utf-8"
    )
    with pytest.raises(ValueError) as error:
        validate_card(tmp_path / "README.md")
    message = str(error.value)
    for problem in (
        "pipeline_tag is None",
        "license is missing",
        "'/home/me/encoder' is not a Hub model id",
        "widget",
    ):
        assert problem in message


def test_local_base_models_are_refused_with_a_one_line_error(inputs, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                str(inputs.model_dir),
                "--repo",
                "alice/x",
                "--example-audio",
                str(inputs.clip),
                "--out",
                str(tmp_path / "out"),
            ]
        )
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "points at local folder" in error and "--audio-model-id" in error
    assert "Traceback" not in error and not (tmp_path / "out").exists()


def test_hub_ids_replace_local_base_folders(inputs, tmp_path: Path) -> None:
    """An offline-built checkpoint published under the Hub ids of the encoder and LLM it was converted from."""
    hub_ids = {
        "audio_model_id": "openai/whisper-tiny.en",
        "text_model_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
    }
    out = upload_folder(inputs, tmp_path / "out", base_ids=hub_ids)
    uploaded = json.loads((out / "config.json").read_text())
    original = json.loads((inputs.model_dir / "config.json").read_text())
    assert {key: uploaded[key] for key in hub_ids} == hub_ids
    assert {k: v for k, v in uploaded.items() if k not in hub_ids} == {
        k: v for k, v in original.items() if k not in hub_ids
    }
    assert validate_card(out / "README.md").data.base_model == list(hub_ids.values())


def test_incomplete_checkpoint_names_the_missing_file(inputs, tmp_path: Path) -> None:
    (inputs.model_dir / "pipeline_asr.py").unlink()
    with pytest.raises(FileNotFoundError, match="missing: pipeline_asr.py"):
        upload_folder(inputs, tmp_path / "out", allow_local_base=True)


@pytest.mark.parametrize("location", ["data/real_speech", "real_speech", "/abs/data/real_speech"])
@pytest.mark.parametrize("folder_exists_here", [False, True])
def test_local_eval_set_is_never_named_as_a_hub_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, location: str, folder_exists_here: bool
) -> None:
    """A relative path such as data/real_speech is a valid repo id: where the card is built must not matter."""
    monkeypatch.chdir(tmp_path)
    if folder_exists_here and not location.startswith("/"):
        (tmp_path / location).mkdir(parents=True)
    local = tmp_path / "results.json"
    local.write_text(json.dumps({**EVAL_RESULTS, "dataset": "real_speech", "dataset_location": location}))
    [result] = read_results([local])
    assert (result.dataset, result.dataset_id, result.config) == ("real_speech", None, None)
    card = build_card(**{**CARD_ARGUMENTS, "results": [result]})
    [entry] = card.data.eval_results
    assert (entry.dataset_type, entry.dataset_name) == ("real_speech", "real_speech")
    assert entry.dataset_config is None and "| real_speech | test.clean |" in card.text
    assert "/" not in card.data.to_yaml().split("model-index:")[1]  # no path and no repo id among the sets


def test_bad_results_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "results.json"
    bad.write_text(json.dumps({"dataset": "librispeech", "split": "test"}))
    with pytest.raises(ValueError, match=r"results\.json, entry 0: missing key\(s\) \['wer'\]"):
        read_results([bad])


def test_an_unreachable_hub_is_one_line_not_a_traceback(inputs, tmp_path: Path, capsys) -> None:
    """HF_HUB_OFFLINE is set for the tests: the real client refuses to connect, as it does on a machine offline."""
    with pytest.raises(SystemExit) as exit_info:
        main(
            [str(inputs.model_dir), "--repo", "alice/x", "--example-audio", str(inputs.clip)]
            + ["--allow-local-base"]
        )
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert (
        error.startswith("error: upload to alice/x failed (OfflineModeIsEnabled: ")
        and "hf auth login" in error
    )


def test_dry_run_builds_the_folder_without_uploading(inputs, hub, tmp_path: Path) -> None:
    out = tmp_path / "upload"
    main(
        [str(inputs.model_dir), "--repo", "alice/x", "--example-audio", str(inputs.clip)]
        + ["--out", str(out), "--dry-run", "--allow-local-base"]
    )
    assert hub.created == [] and hub.uploads == []
    assert (out / "README.md").is_file() and (out / "model.safetensors").is_file()
    assert metadata_load(out / "README.md").get("model-index") is None  # no results given, none claimed


def test_standalone_checkpoint_card_counts_only_trained_weights(
    tiny_model_and_processor, inputs, tmp_path: Path
) -> None:
    model, processor = tiny_model_and_processor
    model.save_pretrained(tmp_path / "standalone", standalone=True)
    processor.save_pretrained(tmp_path / "standalone")
    out = build_upload_folder(
        tmp_path / "standalone", tmp_path / "out", "alice/x", inputs.clip, allow_local_base=True
    )
    projector = sum(parameter.numel() for parameter in model.multi_modal_projector.parameters())
    text = (out / "README.md").read_text()
    assert f"{projector:,} trainable parameters" in text and "holds every weight" in text


def test_loss_curve_reads_every_logged_curve_and_draws_a_png(tmp_path):
    from PIL import Image

    from publish import loss_curve

    history = [
        {"step": 10, "loss": 9.0, "ctc_loss": 9.0},
        {"step": 20, "loss": 5.0, "ctc_loss": 4.0},
        {"step": 20, "eval_loss": 3.5},
        {"step": 20, "train_runtime": 12.0},
    ]
    state = tmp_path / "trainer_state.json"
    state.write_text(json.dumps({"log_history": history}))
    curves = loss_curve.read_curves(state)
    assert curves == {
        "loss": ([10, 20], [9.0, 5.0]),
        "ctc_loss": ([10, 20], [9.0, 4.0]),
        "eval_loss": ([20], [3.5]),
    }
    png = loss_curve.plot(state, tmp_path / "plots" / "loss.png")
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (840, 528)

    # A second stage continues on the same axis, after the first stage's last step.
    second = tmp_path / "stage2.json"
    second.write_text(
        json.dumps({"log_history": [{"step": 10, "loss": 2.0}, {"step": 10, "eval_loss": 1.5}]})
    )
    joined, starts = loss_curve.join_stages([loss_curve.read_curves(state), loss_curve.read_curves(second)])
    assert starts == [20]
    assert joined["loss"] == ([10, 20, 30], [9.0, 5.0, 2.0])
    assert joined["eval_loss"] == ([20, 30], [3.5, 1.5])
    assert joined["ctc_loss"] == ([10, 20], [9.0, 4.0])
    loss_curve.main([str(state), str(second), str(tmp_path / "both.png")])
    assert (tmp_path / "both.png").stat().st_size > 0
    # A picture of the last stages of a recipe numbers them from where it starts.
    assert loss_curve.stage_markers(starts) == [(20, "stage 2")]
    assert loss_curve.stage_markers([20, 50], first_stage=6) == [(20, "stage 7"), (50, "stage 8")]
    loss_curve.main([str(state), str(second), str(tmp_path / "late.png"), "--first-stage", "6"])
    assert (tmp_path / "late.png").read_bytes() != (tmp_path / "both.png").read_bytes()

    state.write_text(json.dumps({"log_history": [{"step": 1, "train_runtime": 1.0}]}))
    with pytest.raises(ValueError, match="no losses logged"):
        loss_curve.read_curves(state)


def test_a_staged_recipe_is_quoted_as_one_yaml_document_per_stage(tmp_path):
    import yaml

    from publish.push import quote_train_configs

    first, second = tmp_path / "stage1.yaml", tmp_path / "stage2.yaml"
    first.write_text("# stage 1\nlearning_rate: 0.001\nmax_steps: 10\n")
    second.write_text("model_name_or_path: outputs/stage1\nmax_steps: 5\n")
    assert quote_train_configs([]) is None
    assert quote_train_configs([first]) == first.read_text().strip()
    quoted = quote_train_configs([first, second])
    assert list(yaml.safe_load_all(quoted)) == [
        {"learning_rate": 0.001, "max_steps": 10},
        {"model_name_or_path": "outputs/stage1", "max_steps": 5},
    ]
    assert quoted.startswith("# 2 stages, in order")


def test_an_averaged_checkpoint_card_names_what_it_averages(inputs, tmp_path):
    """training.average's record: the card lists the averaged checkpoints and the last one's Trainer facts."""
    from publish.push import training_facts

    averaged = tmp_path / "averaged"
    averaged.mkdir()
    record = {"checkpoints": [str(tmp_path / "earlier"), str(inputs.model_dir)], "weights": [0.25, 0.75]}
    (averaged / "averaged_from.json").write_text(json.dumps(record))
    facts = dict(training_facts(averaged))
    assert facts["weights"] == (
        f"mean of {tmp_path / 'earlier'} x 0.25, {inputs.model_dir} x 0.75 (`python -m training.average`)"
    )
    assert (facts["optimizer steps"], facts["final training loss"]) == ("5", "2.2500")
    assert training_facts(tmp_path / "earlier") == []  # no record and no Trainer state: nothing to say


HANDLER_SCRIPT = (
    HIDE_REPO_PRELUDE
    + """
import base64, importlib.util, json
folder, clip = sys.argv[1], sys.argv[2]
# What Inference Endpoints do: load handler.py from the repository's root, build it with the folder, call it.
spec = importlib.util.spec_from_file_location("handler", f"{folder}/handler.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
handler = module.EndpointHandler(folder)
audio = open(clip, "rb").read()
options = {"generate_kwargs": {"no_repeat_ngram_size": 1, "max_new_tokens": 8}}
raw = handler({"inputs": audio, "parameters": options})
encoded = handler({"inputs": base64.b64encode(audio).decode(), "parameters": {**options, "return_timestamps": True}})
try:
    handler({"inputs": "not base64!"})
    refused = None
except ValueError as error:
    refused = str(error)
print(json.dumps({"raw": raw, "encoded": encoded, "refused": refused}))
"""
)


def test_endpoint_handler_serves_audio_bytes_from_a_fresh_process(tiny_model_dir, tmp_path):
    """The saved folder's handler.py, as Inference Endpoints run it: another process, no repository, Hub offline."""
    from transformers import pipeline

    sf.write(tmp_path / "clip.wav", speech_like(2.0), RATE)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", HANDLER_SCRIPT, tiny_model_dir, str(tmp_path / "clip.wav")]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    local = pipeline("automatic-speech-recognition", model=tiny_model_dir, trust_remote_code=True)
    expected = local(str(tmp_path / "clip.wav"), **VARIED)["text"]
    assert expected and result["raw"] == {"text": expected}
    assert result["encoded"]["text"] == expected and result["encoded"]["chunks"][0]["timestamp"] == [0.0, 2.0]
    assert "'inputs' is a string but not base64-encoded audio" in result["refused"]


def test_the_card_reads_the_decoding_of_a_checkpoint_without_a_generation_config_or_from_before_the_move(
    tmp_path: Path,
) -> None:
    from publish.push import checkpoint_decoding

    assert checkpoint_decoding(tmp_path, {}) == {"num_beams": 1, "ctc_decoding_weight": 0.0}
    (tmp_path / "generation_config.json").write_text(json.dumps({"num_beams": 5}))
    legacy_config = {"ctc_decoding_weight": 0.3}  # config.json held it before the generation config did
    assert checkpoint_decoding(tmp_path, legacy_config) == {"num_beams": 5, "ctc_decoding_weight": 0.3}


def test_the_card_names_the_voice_path_of_a_model_that_describes() -> None:
    config = {
        **CARD_ARGUMENTS["config"],
        "lora_rank": 8,
        "voice_attributes": [
            {"attribute": "gender", "values": ["female", "male"], "token_ids": [[1], [2]]},
            {"attribute": "noise", "values": ["quiet", "noisy"], "token_ids": [[3], [4]]},
        ],
        "voice_prompt_length": 16,
    }
    card = build_card(**{**CARD_ARGUMENTS, "config": config})
    text = " ".join(card.text.split())
    assert (
        "rank-8 LoRA adapters on the LLM learned anything, with voice-attribute heads (gender, noise) and a "
        '16-embedding voice prompt for `task="describe"`, which transcription never reads.'
    ) in text
    card = build_card(
        **{**CARD_ARGUMENTS, "config": {**config, "voice_lora_rank": 4, "voice_layer_mix": True}}
    )
    assert (
        "voice-attribute heads (gender, noise) that read every encoder layer and a 16-embedding voice prompt and a "
        'rank-4 LoRA adapter that only voice prompts turn on for `task="describe"`, which transcription never reads.'
    ) in " ".join(card.text.split())
