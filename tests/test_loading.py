"""Loading options reach the encoder and LLM loads: a Hugging Face cache laid out on disk stands in for the Hub."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from transformers import BitsAndBytesConfig

from modeling_tiny_audio import TinyAudioForConditionalGeneration
from testing.tiny_models import make_tiny_encoder, make_tiny_llm

ENCODER_REPO, LLM_REPO = "tiny-org/encoder", "tiny-org/llm"
ENCODER_COMMIT, LLM_COMMIT, NEW_LLM_COMMIT = "a" * 40, "b" * 40, "c" * 40
CHECKPOINT_REPO, FIRST_COMMIT, SECOND_COMMIT = "tiny-org/asr", "d" * 40, "e" * 40


def add_snapshot(cache: Path, repo_id: str, folder: str, commit: str) -> None:
    """Puts ``folder`` into ``cache`` as huggingface_hub stores a download of ``repo_id`` at ``commit``, and points
    the repository's main branch at it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def llm_embeddings(model: TinyAudioForConditionalGeneration) -> torch.Tensor:
    return model.get_input_embeddings().weight.detach().clone()


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hub")
    add_snapshot(root / "cache", ENCODER_REPO, make_tiny_encoder(root / "encoder"), ENCODER_COMMIT)
    add_snapshot(root / "cache", LLM_REPO, make_tiny_llm(root / "llm"), LLM_COMMIT)
    return root / "cache"


def test_a_checkpoint_keeps_loading_the_base_revisions_it_was_built_on(hub_cache, tmp_path):
    cached = {"cache_dir": str(hub_cache), "local_files_only": True}
    model = TinyAudioForConditionalGeneration.from_components(ENCODER_REPO, LLM_REPO, **cached)
    assert (model.config.audio_model_revision, model.config.text_model_revision) == (
        ENCODER_COMMIT,
        LLM_COMMIT,
    )
    model.save_pretrained(tmp_path / "checkpoint")
    trained_on = llm_embeddings(model)

    # The LLM's repository moves on: its main branch now holds other weights.
    torch.manual_seed(1)
    add_snapshot(hub_cache, LLM_REPO, make_tiny_llm(tmp_path / "new-llm"), NEW_LLM_COMMIT)
    newer = TinyAudioForConditionalGeneration.from_components(ENCODER_REPO, LLM_REPO, **cached)
    assert newer.config.text_model_revision == NEW_LLM_COMMIT
    assert not torch.equal(llm_embeddings(newer), trained_on)

    loaded = TinyAudioForConditionalGeneration.from_pretrained(tmp_path / "checkpoint", **cached)
    assert torch.equal(llm_embeddings(loaded), trained_on)
    # The towers are only in that cache: without cache_dir they are not found.
    with pytest.raises(OSError, match="couldn.t find them in the cached files"):
        TinyAudioForConditionalGeneration.from_pretrained(tmp_path / "checkpoint", local_files_only=True)


def test_revision_picks_the_checkpoints_own_commit_and_the_towers_keep_theirs(hub_cache, tmp_path):
    """A pushed checkpoint at two commits: ``revision`` chooses among the checkpoint's, while the encoder and LLM
    still load the commits its config records (they are other repositories, where that commit does not exist)."""
    cached = {"cache_dir": str(hub_cache), "local_files_only": True}
    model = TinyAudioForConditionalGeneration.from_components(ENCODER_REPO, LLM_REPO, **cached)
    first = model.multi_modal_projector.linear_1.weight.detach().clone()
    model.save_pretrained(tmp_path / "first")
    with torch.no_grad():
        model.multi_modal_projector.linear_1.weight.add_(1.0)
    model.save_pretrained(tmp_path / "second")
    add_snapshot(hub_cache, CHECKPOINT_REPO, tmp_path / "first", FIRST_COMMIT)
    add_snapshot(hub_cache, CHECKPOINT_REPO, tmp_path / "second", SECOND_COMMIT)  # main is the second

    def projector(**revision: str) -> torch.Tensor:
        loaded = TinyAudioForConditionalGeneration.from_pretrained(CHECKPOINT_REPO, **revision, **cached)
        return loaded.multi_modal_projector.linear_1.weight.detach()

    assert torch.equal(projector(revision=FIRST_COMMIT), first)
    assert torch.equal(projector(), first + 1.0)


class RecordingHub(BaseHTTPRequestHandler):
    """A Hub that holds no file and notes who asked for what: (path, Authorization header)."""

    requests: list[tuple[str, str | None]] = []

    def answer(self) -> None:
        RecordingHub.requests.append((self.path, self.headers.get("Authorization")))
        self.send_response(404)
        self.send_header("X-Error-Code", "EntryNotFound")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("missing", [ENCODER_REPO, LLM_REPO])
def test_token_reaches_the_tower_that_must_be_downloaded(hub_cache, tmp_path, missing):
    """The tower missing from the cache is requested with the caller's token, as is every other file the towers'
    loads ask the Hub for (through the real HTTP client, in a fresh process)."""
    cached = {"cache_dir": str(hub_cache), "local_files_only": True}
    TinyAudioForConditionalGeneration.from_components(ENCODER_REPO, LLM_REPO, **cached).save_pretrained(
        tmp_path / "checkpoint"
    )
    cache = tmp_path / "cache"
    shutil.copytree(hub_cache, cache)
    shutil.rmtree(cache / f"models--{missing.replace('/', '--')}")
    RecordingHub.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), RecordingHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    load = (
        "from modeling_tiny_audio import TinyAudioForConditionalGeneration as M; "
        f"M.from_pretrained({str(tmp_path / 'checkpoint')!r}, cache_dir={str(cache)!r}, token='hf_secret')"
    )
    env = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    try:
        done = subprocess.run(
            [sys.executable, "-c", load],
            capture_output=True,
            text=True,
            env=env
            | {"HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}", "HF_HOME": str(tmp_path)},
            cwd=Path(__file__).resolve().parents[1],
            timeout=300,
        )
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode != 0  # this Hub has nothing to give
    files = [(path, auth) for path, auth in RecordingHub.requests if "/resolve/" in path]
    assert any(path.startswith(f"/{missing}/resolve/") for path, _ in files), (files, done.stderr[-2000:])
    assert {auth for _, auth in files} == {"Bearer hf_secret"}  # every tower file asked for, with the token


def test_a_local_folder_records_no_revision(tiny_model_and_processor):
    model, _ = tiny_model_and_processor
    assert model.config.audio_model_revision is None and model.config.text_model_revision is None


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_attn_implementation_reaches_both_towers(tiny_model_dir, attention):
    model = TinyAudioForConditionalGeneration.from_pretrained(tiny_model_dir, attn_implementation=attention)
    assert model.language_model.config._attn_implementation == attention
    assert model.audio_tower.config._attn_implementation == attention


def test_a_device_map_dict_is_split_between_the_towers(tiny_model_dir, tiny_model_and_processor, tmp_path):
    """A layer of each tower offloaded to disk: a second "device" on a machine without accelerators."""
    model, processor = tiny_model_and_processor
    encoder_map = {
        "conv1": "cpu",
        "conv2": "cpu",
        "embed_positions": "cpu",
        "layers.0": "disk",
        "layer_norm": "cpu",
    }
    llm_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    device_map = {
        **{f"audio_tower.{name}": device for name, device in encoder_map.items()},
        "multi_modal_projector": "cpu",
        **{f"language_model.{name}": device for name, device in llm_map.items()},
    }
    placed = TinyAudioForConditionalGeneration.from_pretrained(
        tiny_model_dir, device_map=device_map, offload_folder=str(tmp_path)
    )
    assert placed.audio_tower.hf_device_map == encoder_map
    assert placed.language_model.hf_device_map == llm_map
    inputs = processor(audio=torch.randn(16000).numpy())
    generate = {"max_new_tokens": 6, "no_repeat_ngram_size": 1}
    assert torch.equal(placed.generate(**inputs, **generate), model.generate(**inputs, **generate))


@pytest.mark.parametrize(
    ("device_map", "named"),
    [
        ({"encoder": "cpu"}, "device_map key 'encoder' is not in this model"),
        ({"audio_tower": "cpu", "language_model": "cpu"}, "places no module of multi_modal_projector"),
        (
            {"audio_tower": "cpu", "multi_modal_projector.conv": "cpu", "language_model": "cpu"},
            "place the projector whole",
        ),
    ],
)
def test_a_device_map_that_does_not_fit_the_model_is_refused(tiny_model_dir, device_map, named):
    with pytest.raises(ValueError, match=named):
        TinyAudioForConditionalGeneration.from_pretrained(tiny_model_dir, device_map=device_map)


def test_quantization_config_reaches_the_tower_loads(tiny_model_dir):
    quantization = BitsAndBytesConfig(load_in_8bit=True)
    if importlib.util.find_spec("bitsandbytes") is None:
        # transformers refuses it inside the tower load, so the option got there
        with pytest.raises(ImportError, match="8-bit quantization requires bitsandbytes"):
            TinyAudioForConditionalGeneration.from_pretrained(
                tiny_model_dir, quantization_config=quantization
            )
        return
    model = TinyAudioForConditionalGeneration.from_pretrained(
        tiny_model_dir, quantization_config=quantization
    )
    assert model.language_model.is_quantized and model.audio_tower.is_quantized


@pytest.mark.parametrize("standalone", [False, True])
def test_a_checkpoint_saved_with_its_decoding_in_config_json_decodes_as_it_did(
    tiny_model_and_processor, tmp_path, standalone
):
    """Before the decoding settings moved into generation_config.json, config.json held the CTC weight and the
    budget (its fixed part named min_new_tokens); such a checkpoint keeps them, and saves them in one place."""
    model, _ = tiny_model_and_processor
    model.save_pretrained(tmp_path / "old", standalone=standalone)
    config_file = tmp_path / "old" / "config.json"
    legacy = {"ctc_decoding_weight": 0.3, "min_new_tokens": 12, "max_new_tokens_per_second": 4.0}
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **legacy}))
    generation_file = tmp_path / "old" / "generation_config.json"
    generation = json.loads(generation_file.read_text())
    for field in ("ctc_decoding_weight", "max_new_tokens_per_second"):
        generation.pop(field)
    generation_file.write_text(json.dumps({**generation, "max_new_tokens": 128, "num_beams": 2}))

    loaded = TinyAudioForConditionalGeneration.from_pretrained(tmp_path / "old")
    decoding = loaded.generation_config
    assert (decoding.ctc_decoding_weight, decoding.max_new_tokens, decoding.max_new_tokens_per_second) == (
        0.3,
        12,
        4.0,
    )
    assert decoding.num_beams == 2
    loaded.save_pretrained(tmp_path / "new")
    assert not set(legacy) & set(json.loads((tmp_path / "new" / "config.json").read_text()))
    saved = json.loads((tmp_path / "new" / "generation_config.json").read_text())
    assert (saved["ctc_decoding_weight"], saved["max_new_tokens"], saved["num_beams"]) == (0.3, 12, 2)


def test_decoding_settings_given_as_config_fields_go_to_the_generation_config(tiny_model_and_processor):
    """As settings written before the move pass them (offline_kit/trained/settings.json of an older run)."""
    config = tiny_model_and_processor[0].config
    model = TinyAudioForConditionalGeneration.from_components(
        config.audio_model_id, config.text_model_id, ctc_decoding_weight=0.3
    )
    assert model.generation_config.ctc_decoding_weight == 0.3
    assert "ctc_decoding_weight" not in model.config.to_dict()
