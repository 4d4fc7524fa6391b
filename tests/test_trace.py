"""docs/trace_data.py: the data-flow page is produced for every encoder kind, holds every section, and renders."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
from conftest import REPO_ROOT, speech_like
from test_demo import CHROMIUM, CHROMIUM_ARGS
from tiny_models import make_tiny_tiny_audio

from pipeline_asr import TinyAudioASRPipeline

sys.path.insert(0, str(REPO_ROOT / "docs"))

from trace_data import SECTIONS, main, render_html, trace_clip  # noqa: E402

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

    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} missing: apt-get install -y chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
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
