"""The Gradio demo, driven in a real headless Chromium: upload, transcribe, Text mode, readable rejections."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import soundfile as sf
import torch
from conftest import REPO_ROOT, speech_like
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(REPO_ROOT / "demo"))

from app import AudioRejected, Backend, check_audio_file  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
FAKE_MICROPHONE = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
# Words of the tiny test tokenizer the biased LLM emits, so a transcript is visible text, not whitespace.
SPOKEN_TOKENS = ("Ġtiny", "Ġaudio")


def write_clip(path: Path, seconds: float, rate: int = 16000) -> Path:
    sf.write(path, speech_like(seconds, rate), rate)
    return path


@pytest.fixture(scope="session")
def talkative_model_dir(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny checkpoint over an LLM whose output row for two word tokens dominates every other.

    A random LLM mostly emits whitespace, which leaves the transcript box blank; this one always says
    "tiny"/"audio", so the test can see that text travels from the model into the page.
    """
    root = tmp_path_factory.mktemp("talkative")
    checkpoint = Path(shutil.copytree(tiny_model_dir, root / "checkpoint"))
    config = json.loads((checkpoint / "config.json").read_text())
    llm = AutoModelForCausalLM.from_pretrained(config["text_model_id"])
    head = llm.get_output_embeddings().weight
    ids = [llm_token_id(config["text_model_id"], token) for token in SPOKEN_TOKENS]
    direction = torch.nn.functional.normalize(
        torch.randn(head.shape[1], generator=torch.Generator().manual_seed(0)), dim=0
    )
    with torch.no_grad():  # +d and -d: whatever the hidden state, one of the two logits is large and positive
        head[ids[0]] = 100 * direction
        head[ids[1]] = -100 * direction
    llm_dir = root / "llm"
    llm.save_pretrained(llm_dir)
    for name in os.listdir(config["text_model_id"]):
        if "token" in name or name.endswith(".jinja"):
            shutil.copy2(Path(config["text_model_id"]) / name, llm_dir / name)
    config["text_model_id"] = str(llm_dir)
    (checkpoint / "config.json").write_text(json.dumps(config, indent=2))
    return str(checkpoint)


def llm_token_id(llm_dir: str, token: str) -> int:
    vocab = json.loads((Path(llm_dir) / "tokenizer.json").read_text())["model"]["vocab"]
    return vocab[token]


# ---- the checks behind the page's messages ---------------------------------------------------------------------


def test_check_audio_file_returns_duration(tmp_path: Path) -> None:
    assert check_audio_file(write_clip(tmp_path / "a.wav", 1.5)) == pytest.approx(1.5)


def test_check_audio_file_rejects_non_audio_files(tmp_path: Path) -> None:
    fake = tmp_path / "notes.wav"
    fake.write_text("meeting notes, not a recording\n")
    with pytest.raises(AudioRejected, match=r"Not an audio file: 'notes\.wav'"):
        check_audio_file(fake)


def test_long_file_is_transcribed_in_chunks(talkative_model_dir: str, tmp_path: Path) -> None:
    backend = Backend.load(talkative_model_dir)
    window = backend.pipe.model.config.max_audio_seconds
    transcript, duration, elapsed, note = backend.transcribe(
        str(write_clip(tmp_path / "long.wav", window + 5))
    )
    assert duration == f"{window + 5:.2f} s (2 chunks)"
    assert transcript and note == ""


# ---- the page in a real browser ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def demo_url(talkative_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python demo/app.py` as a user starts it, on a free port, with a 0.5 MB upload limit.

    The limit must stay well above a microphone recording (48 kHz 16-bit mono, about 96 kB a second: a slow
    machine stretches the 2 s take) and below `long.wav` in the rejection test (20 s at 16 kHz, 640 kB).
    """
    port = free_port()
    log = tmp_path_factory.mktemp("demo") / "app.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, str(REPO_ROOT / "demo" / "app.py"), "--model", talkative_model_dir]
    command += ["--port", str(port), "--max-file-mb", "0.5"]
    with open(log, "w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"demo exited with {process.returncode}:\n{log.read_text()}")
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"demo did not answer on {url} within 120 s:\n{log.read_text()}")
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_demo_listens_on_loopback_only(demo_url: str) -> None:
    """Started without --host, the server must not be reachable from the network."""
    port = int(demo_url.rstrip("/").rsplit(":", 1)[1])
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, local_port = local.split(":")
            if state == "0A" and int(local_port, 16) == port:  # 0A = LISTEN
                listening.append(address)
    assert listening == ["0100007F"]  # 127.0.0.1, little-endian hex


@pytest.fixture(scope="module")
def browser() -> Iterator:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} missing: apt-get install -y chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS + FAKE_MICROPHONE)
        yield instance
        instance.close()


@pytest.fixture
def page(browser, demo_url: str, tmp_path: Path) -> Iterator:
    """A fresh page on the demo that records every request leaving 127.0.0.1."""
    page = browser.new_page(permissions=["microphone"])
    page.outside_requests = []
    local = re.compile(r"^(http://127\.0\.0\.1:\d+/|data:|blob:|about:)")
    page.on(
        "request",
        lambda request: None if local.match(request.url) else page.outside_requests.append(request.url),
    )
    page.goto(demo_url)
    page.wait_for_selector("#audio")
    yield page
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    page.close()


def wait_for_filled(page, selector: str) -> None:
    """Polls on a timer: requestAnimationFrame polling (the default) can stall in a headless page.

    On a timeout the failure quotes what the page told the user instead (the demo's error line, Gradio's toasts).
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(
            f"document.querySelector('{selector}').value.trim().length > 0", timeout=60_000, polling=250
        )
    except PlaywrightTimeout:
        shown = [page.locator("#audio-error").inner_text(), *page.locator(".toast-body").all_inner_texts()]
        pytest.fail(f"{selector} stayed empty for 60 s; the page showed: {[text for text in shown if text]}")


def wait_for_transcript(page) -> str:
    wait_for_filled(page, "#transcript textarea")
    return page.locator("#transcript textarea").input_value()


@pytest.mark.browser
@pytest.mark.parametrize("suffix", ["wav", "flac", "mp3"])
def test_upload_shows_transcript_duration_and_time(page, tmp_path: Path, suffix: str) -> None:
    page.locator("#audio input[type=file]").set_input_files(
        str(write_clip(tmp_path / f"speech.{suffix}", 2.0))
    )
    page.click("#transcribe-btn")
    transcript = wait_for_transcript(page)
    assert set(transcript.split()) <= {"tiny", "audio"}, transcript
    assert page.locator("#duration textarea, #duration input").input_value() == "2.00 s"
    assert re.fullmatch(
        r"\d+\.\d\d s \(\d+\.\dx real time\)", page.locator("#elapsed textarea, #elapsed input").input_value()
    )
    assert page.locator("#audio-error").inner_text().strip() == ""
    assert page.outside_requests == []


@pytest.mark.browser
def test_microphone_recording_is_transcribed(page) -> None:
    """Chromium's fake capture device (a beep every second) stands in for a microphone.

    The recording reaches the server by its own upload after Stop. On a slow network (every request delayed by
    1.5 s here) a click on Transcribe straight after Stop must wait for that upload, not send no audio.
    """
    from playwright.sync_api import expect

    transcribe = page.locator("#transcribe-btn")
    page.get_by_label("Record audio").click()
    page.get_by_role("button", name="Record").first.click()
    expect(transcribe).to_be_disabled()
    page.wait_for_timeout(2000)
    network = page.context.new_cdp_session(page)
    network.send("Network.enable")
    conditions = {"offline": False, "latency": 1500, "downloadThroughput": -1, "uploadThroughput": -1}
    network.send("Network.emulateNetworkConditions", conditions)
    page.get_by_role("button", name="Stop").first.click()
    transcribe.click(timeout=30_000)  # waits while the button is disabled
    assert wait_for_transcript(page)
    assert re.fullmatch(r"\d\.\d\d s", page.locator("#duration textarea, #duration input").input_value())


@pytest.mark.browser
def test_text_mode_answers(page) -> None:
    page.get_by_role("tab", name="Text").click()
    page.locator("#prompt textarea").fill("What is the capital of France?")
    page.click("#ask-btn")
    wait_for_filled(page, "#answer textarea")
    assert set(page.locator("#answer textarea").input_value().split()) <= {"tiny", "audio"}
    assert re.fullmatch(
        r"\d+\.\d\d s", page.locator("#answer-time textarea, #answer-time input").input_value()
    )
    assert page.outside_requests == []


@pytest.mark.browser
@pytest.mark.parametrize(
    ("name", "content", "message"),
    [  # refused by Gradio on upload (type, then --max-file-mb), and by the demo's check (text named .wav)
        ("notes.txt", b"meeting notes\n", r"Invalid file type: notes\.txt"),
        ("long.wav", None, r'File\(s\) exceed the maximum allowed size of 512\.0 Kb: "long\.wav"'),
        ("notes.wav", b"meeting notes\n", r"Not an audio file: 'notes\.wav'"),
    ],
)
def test_rejected_files_show_a_readable_message(
    page, tmp_path: Path, name: str, content: bytes | None, message: str
) -> None:
    path = tmp_path / name
    if content is None:
        write_clip(path, 20.0)
    else:
        path.write_bytes(content)
    page.locator("#audio input[type=file]").set_input_files(str(path))
    if name == "notes.wav":
        page.click("#transcribe-btn")
    page.get_by_text(re.compile(message)).first.wait_for(timeout=60_000)
    assert page.locator("#transcript textarea").input_value() == ""
