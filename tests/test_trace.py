"""docs/trace_data.py: the data-flow page is produced for every encoder kind, holds every section, and renders."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import trace_data  # docs/, by pytest's pythonpath
from conftest import REPO_ROOT, speech_like
from test_demo import CHROMIUM, CHROMIUM_ARGS
from trace_data import SECTIONS, first_chunk, main, read_ctc_path, render_html, trace_clip

from pipeline_asr import TinyAudioASRPipeline
from testing.tiny_models import make_tiny_tiny_audio

RATE = 16000


def check_page(page: str, trace) -> None:
    """Every section is there, every picture is inlined, and the shapes table agrees with the tensors."""
    for key in SECTIONS:
        assert f'<section id="{key}">' in page, key
    assert len(re.findall(r'<img alt="" src="data:image/png;base64,[A-Za-z0-9+/=]{500,}">', page)) == 4
    assert not re.search(r'(src|href)="(http|//)', page)  # self-contained: nothing fetched
    assert trace.audio_placeholders == trace.projected_valid > 0  # one prompt slot per projector step
    assert len(trace.neighbours) == trace.projected_valid
    assert f"({trace.audio_placeholders} audio placeholders)" in page
    assert f"{trace.encoder.shape[0]} x {trace.encoder.shape[1]} ({trace.encoder_valid} real)" in page


@pytest.mark.parametrize("encoder", ["whisper", "hubert", "wav2vec2", "wavlm"])
def test_every_encoder_kind_is_traced(encoder: str, tmp_path: Path) -> None:
    model, processor = make_tiny_tiny_audio(tmp_path, encoder=encoder)
    trace = trace_clip(
        TinyAudioASRPipeline(model=model, processor=processor), speech_like(1.5), max_new_tokens=4
    )
    page = render_html(trace, f"tiny-{encoder}", "clip.wav")
    check_page(page, trace)
    assert trace.mel == (encoder == "whisper")
    if trace.mel:  # Whisper pads to its fixed window; the page says how much is real
        assert trace.feature_valid == 150 < trace.features.shape[1]
        assert (
            "Log-mel spectrogram: 80 mel bins x 3000 frames" in page
            and "the rest is padding up to the encoder" in page
        )
    else:
        assert trace.features.shape == (int(1.5 * RATE),)
        assert "no mel spectrogram" in page


def test_long_file_traces_the_first_chunk_of_the_pipeline(tiny_model_dir: str, tmp_path: Path) -> None:
    seconds = 34.0  # over the tiny Whisper's 30 s window: the pipeline cuts it at a quiet point near 30 s
    sf.write(tmp_path / "long.wav", speech_like(seconds), RATE)
    out = tmp_path / "trace.html"
    main(
        ["--model", tiny_model_dir, "--audio", str(tmp_path / "long.wav"), "--out", str(out)]
        + ["--max-new-tokens", "4"]
    )
    page = out.read_text(encoding="utf-8")
    traced = float(re.search(r"<p>(\d+\.\d\d) s at 16000 Hz, mono\.</p>", page).group(1))
    left_out = float(re.search(r"transcribes the remaining (\d+\.\d) s in further chunks", page).group(1))
    assert 25 <= traced <= 30 and traced + left_out == pytest.approx(seconds, abs=0.06)


def test_command_writes_a_page_that_renders_in_chromium(tiny_model_dir: str, tmp_path: Path) -> None:
    sf.write(tmp_path / "clip.wav", speech_like(2.0), RATE)
    out = tmp_path / "data_trace.html"
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "docs" / "trace_data.py"), "--model", tiny_model_dir]
        + ["--audio", str(tmp_path / "clip.wav"), "--out", str(out), "--max-new-tokens", "8"],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    page = out.read_text(encoding="utf-8")
    for key, title in SECTIONS.items():
        assert f'<section id="{key}"><h2>{title}</h2>' in page

    sync_api = _playwright()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page_view = browser.new_page(viewport={"width": 1200, "height": 900})
        page_view.goto(out.as_uri())
        sizes = page_view.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth])")
        headings = page_view.locator("h2").all_inner_texts()
        page_view.screenshot(path=str(tmp_path / "data_trace.png"), full_page=True)
        browser.close()
    assert len(sizes) == 4 and all(complete and width > 400 for complete, width in sizes)  # every PNG decoded
    assert headings == list(SECTIONS.values())
    assert (tmp_path / "data_trace.png").stat().st_size > 50_000


def _playwright():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} missing: apt-get install -y chromium")
    return pytest.importorskip("playwright.sync_api")


# ---- the CTC head's reading ------------------------------------------------------------------------------------


def test_the_ctc_path_reads_out_as_its_tokens_with_repeats_merged_and_blanks_dropped(tmp_path: Path) -> None:
    _, processor = make_tiny_tiny_audio(tmp_path)
    tokenizer = processor.tokenizer
    [blank], [the], [tiny] = (
        tokenizer(word, add_special_tokens=False)["input_ids"] for word in (" ", " the", " tiny")
    )
    reading = read_ctc_path([blank, the, the, blank, the, tiny, tiny, blank], blank, tokenizer.decode)
    assert reading.text == " the the tiny"  # a blank between two "the"s keeps both; a run is one token
    assert reading.blank == " " and reading.blank_frames == 3
    assert reading.path == [None, " the", " the", None, " the", " tiny", " tiny", None]


def spoken_path_model(tmp_path: Path, path_words: list[str | None]):
    """A tiny model trained (as far as its config says) with the CTC loss, whose projector is replaced by one that
    lands each audio token exactly on the embedding of a chosen token (None = the blank, a space), cycling
    through `path_words`. Everything else, the CTC head's scoring included, is the real code."""
    model, processor = make_tiny_tiny_audio(tmp_path)
    ids = [processor.tokenizer(word or " ", add_special_tokens=False)["input_ids"] for word in path_words]
    assert all(len(token) == 1 for token in ids)
    ids = [token for [token] in ids]
    model.config.ctc_blank_token_id = ids[path_words.index(None)]
    project = model.project_audio

    def onto_chosen_tokens(encoder_hidden: torch.Tensor, encoder_mask: torch.Tensor):
        embeds, mask = project(encoder_hidden, encoder_mask)
        chosen = torch.tensor([ids[step % len(ids)] for step in range(embeds.shape[1])])
        return model.get_input_embeddings().weight[chosen][None].expand_as(embeds).clone(), mask

    model.project_audio = onto_chosen_tokens
    return model, processor, ids


def test_a_ctc_trained_model_shows_what_its_ctc_head_reads(tmp_path: Path) -> None:
    words = [None, " the", " the", None, " tiny", None]  # single tokens of the tiny tokenizer
    model, processor, ids = spoken_path_model(tmp_path, words)
    asr = TinyAudioASRPipeline(model=model, processor=processor)
    trace = trace_clip(asr, speech_like(1.5), max_new_tokens=2)
    steps = trace.projected_valid
    assert steps > len(words)
    assert trace.ctc.path == [words[step % len(words)] for step in range(steps)]
    merged = [ids[step % len(ids)] for step in range(steps)]
    merged = [token for i, token in enumerate(merged) if i == 0 or token != merged[i - 1]]
    expected = processor.tokenizer.decode(
        [token for token in merged if token != model.config.ctc_blank_token_id]
    )
    assert trace.ctc.text == expected and expected.startswith(" the tiny the tiny")
    assert trace.ctc.blank_frames == sum(words[step % len(words)] is None for step in range(steps))

    page = render_html(trace, "tiny-ctc", "clip.wav")
    check_page(page, trace)
    assert "the CTC <em>blank</em>" in page and "not trained to hit real tokens" not in page
    assert f"reads blank at {trace.ctc.blank_frames} of the {steps} audio tokens" in page
    assert f'<p class="transcript">{expected}</p>' in page
    assert "<th>CTC head reads</th>" in page
    assert (
        '<span class="tok">&#x27; the&#x27;</span> x2 <span class="blank">blank</span> <span' in page
    )  # runs


def test_a_model_trained_without_ctc_says_its_neighbours_are_only_a_region(tmp_path: Path) -> None:
    model, processor = make_tiny_tiny_audio(tmp_path)
    trace = trace_clip(
        TinyAudioASRPipeline(model=model, processor=processor), speech_like(1.0), max_new_tokens=2
    )
    page = render_html(trace, "tiny", "clip.wav")
    assert trace.ctc is None and "trained without the CTC loss" in page and "CTC head reads" not in page


# ---- pictures and print ----------------------------------------------------------------------------------------


def test_heatmap_rows_are_the_most_active_dimensions_in_order_labelled_by_id(monkeypatch) -> None:
    figures = []
    monkeypatch.setattr(trace_data, "_png", lambda figure: figures.append(figure) or "")
    rng = np.random.default_rng(0)
    activity = rng.permutation(200).astype(np.float32) + 1  # dimension d has mean |value| activity[d]
    frames = rng.choice([-1.0, 1.0], size=(30, 200)).astype(np.float32) * activity
    trace_data.heatmap(np.concatenate([frames, np.zeros((10, 200), np.float32)]), 30, "frame")
    [axis, _colorbar] = figures[0].axes
    drawn = np.asarray(axis.images[0].get_array())  # [dims shown, frames shown], top row first
    expected = np.argsort(-activity)[: trace_data.HEATMAP_DIMS]
    assert np.array_equal(np.abs(drawn[:, :30]), activity[expected][:, None].repeat(30, axis=1))
    ticks = {
        int(tick): label.get_text()
        for tick, label in zip(axis.get_yticks(), axis.get_yticklabels(), strict=True)
    }
    assert ticks[0] == str(expected[0]) and all(label == str(expected[row]) for row, label in ticks.items())
    assert len(ticks) >= 8 and "most active on top" in axis.get_ylabel()


def test_the_long_table_prints_whole(tmp_path: Path) -> None:
    """On screen the nearest-token table scrolls in a box; on paper every row is there."""
    model, processor = make_tiny_tiny_audio(tmp_path)
    trace = trace_clip(
        TinyAudioASRPipeline(model=model, processor=processor), speech_like(12.0), max_new_tokens=2
    )
    assert trace.projected_valid > 100
    out = tmp_path / "trace.html"
    out.write_text(render_html(trace, "tiny", "clip.wav"), encoding="utf-8")
    sync_api = _playwright()
    script = "box => [box.scrollHeight, box.clientHeight, box.querySelectorAll('tr').length]"
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        view = browser.new_page(viewport={"width": 1200, "height": 900})
        view.goto(out.as_uri())
        screen = view.eval_on_selector(".nearest", script)
        view.emulate_media(media="print")
        paper = view.eval_on_selector(".nearest", script)
        browser.close()
    assert screen[0] > screen[1]  # a scroll box on screen
    assert paper[0] <= paper[1] and paper[2] == trace.projected_valid + 1  # in print: nothing hidden


@pytest.mark.real_weights
@pytest.mark.slow
def test_the_shipped_model_reads_jfk_through_its_ctc_head() -> None:
    """The offline preset on jfk.wav: most audio tokens are blanks and the CTC path reads the speech."""
    from transformers import pipeline

    from offline_kit.preset import MODEL_FOLDER, resolve_cache_dir
    from offline_kit.real_speech import DOWNLOAD_DIR

    model_dir, clip = resolve_cache_dir() / MODEL_FOLDER, DOWNLOAD_DIR / "jfk.wav"
    if not (model_dir / "config.json").is_file() or not clip.is_file():
        pytest.skip("needs python -m offline_kit.preset and python -m offline_kit.real_speech")
    asr = pipeline("automatic-speech-recognition", model=str(model_dir), trust_remote_code=True)
    audio, _ = first_chunk(asr, clip)
    trace = trace_clip(asr, audio, max_new_tokens=2)
    assert trace.ctc.blank == " " and trace.ctc.blank_frames > len(trace.ctc.path) / 2
    for word in ("fellow", "country", "ask"):
        assert word in trace.ctc.text.lower()
