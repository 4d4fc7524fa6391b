"""The Gradio demo, driven in a real headless Chromium: upload, live text and progress, word times, microphone
streaming, Text mode, limits, readable rejections, the API page."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from app import (  # demo/, by pytest's pythonpath
    JOB_THREAD,
    NO_SPEECH,
    AudioRejected,
    Backend,
    check_audio_file,
)
from conftest import REPO_ROOT, listening_addresses, speech_like
from transformers import AutoModelForCausalLM

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
# Limits the test demo runs with: a 40 s file passes, a 60 s one is refused; Text prompts up to 64 tokens.
MAX_AUDIO_SECONDS = 45
MAX_PROMPT_TOKENS = 64
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
    # A CTC head (the blank is the space token, as train.py sets it) gives the words their times.
    config["ctc_blank_token_id"] = llm_token_id(str(llm_dir), "Ġ")
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


def test_check_audio_file_refuses_audio_over_the_duration_limit(tmp_path: Path) -> None:
    with pytest.raises(
        AudioRejected, match=r"Too long: 'a\.wav' lasts 3 s; this demo transcribes at most 2 s"
    ):
        check_audio_file(write_clip(tmp_path / "a.wav", 3.0), max_seconds=2)


@pytest.fixture(scope="module")
def backend(talkative_model_dir: str) -> Backend:
    return Backend.load(talkative_model_dir, max_prompt_tokens=MAX_PROMPT_TOKENS)


def test_long_file_shows_partial_text_progress_and_timed_words(backend: Backend, tmp_path: Path) -> None:
    window = backend.pipe.model.config.max_audio_seconds
    updates = list(backend.transcribe(str(write_clip(tmp_path / "long.wav", window + 5))))
    transcript, words, duration, elapsed, progress, note = updates[-1]
    assert duration == f"{window + 5:.2f} s (2 chunks)"
    assert transcript and note == ""
    assert [word for word, _, _ in words] == transcript.split()
    assert all(0 <= start < end <= window + 5 for _, start, end in words)
    assert words[-1][1] > window - 5  # the second chunk's words are in the file's time
    # Before the end: text that grows while a chunk decodes, and progress chunk by chunk through the file.
    partial = [update[0] for update in updates[:-1]]
    assert len({text for text in partial if text}) > 2
    done = [float(update[4].split()[0]) for update in updates if update[4]]
    assert done == sorted(done) and done[-1] == window + 5
    assert sorted(set(done))[0] == 0 and 0 < sorted(set(done))[1] < window + 5 and len(set(done)) == 3


def test_describe_task_answers_without_word_times_and_an_unknown_task_names_the_tasks(
    backend: Backend, tmp_path: Path
) -> None:
    clip = str(write_clip(tmp_path / "a.wav", 2.0))
    assert backend.tasks[0] == "transcribe" and "describe" in backend.tasks
    text, words, *_, note = list(backend.transcribe(clip, "describe"))[-1]
    assert (
        text == backend.pipe(clip, task="describe", skip_non_speech=True)["text"] and words == [] and not note
    )
    assert list(backend.transcribe(clip, "transcribe"))[-1][1]  # transcripts keep their timed words
    *_, message = list(backend.transcribe(clip, "dance"))[-1]
    assert (
        message
        == "**Error:** Unknown task 'dance'; known tasks: ['describe', 'emotion', 'transcribe'] (or pass prompt=...)"
    )


def test_live_text_is_kept_across_segments_longer_than_the_window(backend: Backend) -> None:
    """Live mode past the encoder window: the segment is cut, its text kept, and the rest heard on (microphone
    pieces arrive as 48 kHz 16-bit integers, as the browser sends them)."""
    window = backend.pipe.model.config.max_audio_seconds
    piece = (speech_like(5.0, 48000) * 32767).astype(np.int16)
    state, shown = backend.live(None, (48000, piece))
    assert shown  # the first piece is heard at once
    for _ in range(int(window // 5) + 1):
        state, shown = backend.live(state, (48000, piece))
    assert state.finished and len(state.segment) < window * 16000
    state, final = backend.live_stopped(state)
    assert final.startswith(shown.split()[0]) and len(final.split()) >= len(state.finished.split())


def test_audio_without_speech_says_so(backend: Backend, tmp_path: Path) -> None:
    silence = tmp_path / "silence.wav"
    sf.write(silence, np.zeros(3 * 16000, dtype=np.float32), 16000)
    transcript, words, *_, note = list(backend.transcribe(str(silence)))[-1]
    assert (transcript, words, note) == ("", [], NO_SPEECH)


def test_closing_the_page_stops_the_job(backend: Backend, tmp_path: Path) -> None:
    """Gradio closes a handler whose page has gone: the decoding chunk stops and no further chunk starts."""
    window = backend.pipe.model.config.max_audio_seconds
    prefills = []  # one per chunk that reached the LLM

    def count_prefill(module, args, kwargs) -> None:
        if kwargs["inputs_embeds"].shape[1] > 1:
            prefills.append(1)

    hook = backend.pipe.model.language_model.register_forward_pre_hook(count_prefill, with_kwargs=True)
    try:
        updates = backend.transcribe(str(write_clip(tmp_path / "long.wav", 2 * window + 10)))
        next(update for update in updates if update[0])  # text of the first chunk is arriving
        updates.close()
        for thread in threading.enumerate():
            if thread.name == JOB_THREAD:
                thread.join(timeout=120)
                assert not thread.is_alive()
    finally:
        hook.remove()
    assert len(prefills) == 1  # of 3 chunks


def _bad_files(tmp_path: Path, max_seconds: int) -> dict[str, tuple[Path | None, str]]:
    """name -> (the file Transcribe mode is given, the message the page shows instead of a transcript)."""
    files: dict[str, bytes] = {
        "notes.wav": b"meeting notes, not a recording\n",
        "noise.wav": np.random.default_rng(0).bytes(4096),
        "empty.wav": b"",
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    cut = write_clip(tmp_path / "cut.wav", 1.0)
    cut.write_bytes(cut.read_bytes()[:30])  # the header stops mid-way
    sf.write(tmp_path / "silent.wav", np.zeros(0, dtype=np.float32), 16000)
    sf.write(tmp_path / "nan.wav", np.full(16000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    sf.write(tmp_path / "long.flac", np.zeros((max_seconds + 1) * 8000, dtype=np.float32), 8000)
    not_audio = "could not be read as audio"
    return {
        "no_file": (None, "Upload or record some audio first."),
        "text_named_wav": (tmp_path / "notes.wav", f"Not an audio file: 'notes.wav' {not_audio}"),
        "random_bytes": (tmp_path / "noise.wav", f"Not an audio file: 'noise.wav' {not_audio}"),
        "empty_file": (tmp_path / "empty.wav", f"Not an audio file: 'empty.wav' {not_audio}"),
        "cut_header": (tmp_path / "cut.wav", f"Not an audio file: 'cut.wav' {not_audio}"),
        "no_samples": (tmp_path / "silent.wav", "Empty audio: 'silent.wav' holds no samples."),
        "nan_samples": (tmp_path / "nan.wav", "nan.wav"),
        "too_long": (
            tmp_path / "long.flac",
            f"Too long: 'long.flac' lasts {max_seconds + 1} s; this demo transcribes at most {max_seconds} s "
            "(--max-audio-seconds).",
        ),
    }


BAD_FILES = [
    "no_file",
    "text_named_wav",
    "random_bytes",
    "empty_file",
    "cut_header",
    "no_samples",
    "nan_samples",
    "too_long",
]


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_file_gets_one_message_naming_it_and_no_transcript(
    backend: Backend, tmp_path: Path, name: str
) -> None:
    path, message = _bad_files(tmp_path, int(backend.max_audio_seconds))[name]
    updates = list(backend.transcribe(str(path) if path else None))
    transcript, words, *_, note = updates[-1]
    assert (transcript, words) == ("", [])
    assert message in note, note
    if name == "nan_samples":  # read, then refused by the pipeline's reader, which says why
        assert "NaN" in note
    assert "Traceback" not in note


def test_text_prompt_longer_than_the_limit_is_refused(backend: Backend) -> None:
    import gradio as gr

    assert backend.max_prompt_tokens == MAX_PROMPT_TOKENS
    with pytest.raises(
        gr.Error, match=rf"The prompt is \d+ tokens long; this demo takes at most {MAX_PROMPT_TOKENS}"
    ):
        list(backend.answer("word " * 200))


def test_prompt_limit_never_exceeds_the_language_models_context(talkative_model_dir: str) -> None:
    backend = Backend.load(talkative_model_dir, max_prompt_tokens=10**9)
    context = backend.pipe.model.config.text_config.max_position_embeddings
    assert backend.max_prompt_tokens == context - backend.text_max_new_tokens


# ---- the page in a real browser ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningDemo:
    process: subprocess.Popen
    url: str
    log: Path

    def fail_if_exited(self) -> None:
        """A crash mid-module would otherwise show up in later tests as "connection refused"."""
        if self.process.poll() is not None:
            pytest.fail(f"demo exited with {self.process.returncode}:\n{self.log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def demo(talkative_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDemo]:
    """`python demo/app.py` as a user starts it, on a free port, with a 0.5 MB upload limit.

    The limit must stay well above a microphone recording (48 kHz 16-bit mono, about 96 kB a second: a slow
    machine stretches the 2 s take) and below `long.wav` in the rejection test (20 s at 16 kHz, 640 kB).
    """
    port = free_port()
    log = tmp_path_factory.mktemp("demo") / "app.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, str(REPO_ROOT / "demo" / "app.py"), "--model", talkative_model_dir]
    command += ["--port", str(port), "--max-file-mb", "0.5", "--max-audio-seconds", str(MAX_AUDIO_SECONDS)]
    command += ["--max-prompt-tokens", str(MAX_PROMPT_TOKENS)]
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
        yield RunningDemo(process, url, log)
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def demo_url(demo: RunningDemo) -> str:
    return demo.url


def test_demo_listens_on_loopback_only(demo_url: str) -> None:
    """Started without --host, the server must not be reachable from the network."""
    port = int(demo_url.rstrip("/").rsplit(":", 1)[1])
    assert listening_addresses(port) == ["0100007F"]  # 127.0.0.1, little-endian hex


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """Chromium whose fake microphone plays a speech-like clip over and over (Chromium's own fake device only
    beeps, which the demo's voice-activity check rightly calls no speech)."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} missing: apt-get install -y chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    voice = tmp_path_factory.mktemp("microphone") / "voice.wav"
    sf.write(voice, speech_like(4.0, 48000), 48000, subtype="PCM_16")
    microphone = [*FAKE_MICROPHONE, f"--use-file-for-fake-audio-capture={voice}"]
    with sync_api.sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS + microphone)
        yield instance
        instance.close()


@pytest.fixture
def page(browser, demo: RunningDemo, tmp_path: Path) -> Iterator:
    """A fresh page on the demo that records every request leaving 127.0.0.1."""
    page = browser.new_page(permissions=["microphone"])
    page.outside_requests = []
    local = re.compile(r"^(http://127\.0\.0\.1:\d+/|data:|blob:|about:)")
    page.on(
        "request",
        lambda request: None if local.match(request.url) else page.outside_requests.append(request.url),
    )
    demo.fail_if_exited()
    page.goto(demo.url)
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
    """The final transcript: the text box fills while the model decodes, the time taken once it is done."""
    wait_for_filled(page, "#elapsed textarea, #elapsed input")
    return page.locator("#transcript textarea").input_value()


@pytest.mark.browser
@pytest.mark.parametrize("suffix", ["wav", "flac", "mp3", "ogg"])
def test_upload_shows_transcript_words_duration_and_time(page, tmp_path: Path, suffix: str) -> None:
    page.locator("#audio input[type=file]").set_input_files(
        str(write_clip(tmp_path / f"speech.{suffix}", 2.0))
    )
    page.click("#transcribe-btn")
    transcript = wait_for_transcript(page)
    assert set(transcript.split()) <= {"tiny", "audio"}, transcript
    # Each word with its start and end, in a table.
    rows = word_rows(page, len(transcript.split()))
    assert [word for word, _, _ in rows] == transcript.split()
    assert all(0 <= start < end <= 2.0 for _, start, end in rows)
    assert page.locator("#duration textarea, #duration input").input_value() == "2.00 s"
    assert re.fullmatch(
        r"\d+\.\d\d s \(\d+\.\dx real time\)", page.locator("#elapsed textarea, #elapsed input").input_value()
    )
    assert page.locator("#audio-error").inner_text().strip() == ""
    assert page.outside_requests == []


@pytest.mark.browser
def test_the_task_choice_asks_for_a_description(page, tmp_path: Path) -> None:
    """Describe on the page: the model's answer fills the text box, and no word table (words of a description have
    no times in the audio)."""
    page.locator("#task").get_by_label("describe").check()
    page.locator("#audio input[type=file]").set_input_files(str(write_clip(tmp_path / "speech.wav", 2.0)))
    page.click("#transcribe-btn")
    described = wait_for_transcript(page)
    assert described and set(described.split()) <= {"tiny", "audio"}, described
    assert page.locator("#words tbody tr td").all_text_contents() in ([], [""] * 3, [""])
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
    wait_for_filled(page, "#answer-time textarea, #answer-time input")  # the answer streams in, then its time
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


def word_rows(page, count: int) -> list[tuple[str, float, float]]:
    """The words table once it holds ``count`` rows (the table renders after the text boxes): (word, start, end)."""
    page.wait_for_function(
        f"document.querySelectorAll('#words tbody tr').length === {count}", timeout=60_000, polling=250
    )
    rows = []
    for row in page.locator("#words tbody tr").all():
        word, start, end = (cell.strip() for cell in row.locator("td").all_text_contents()[:3])
        rows.append((word, float(start), float(end)))
    return rows


RECORD_VALUES = """selectors => {
    window.seen = [];
    setInterval(() => {
        const values = selectors.map(selector => document.querySelector(selector).value);
        if (JSON.stringify(window.seen[window.seen.length - 1]) !== JSON.stringify(values)) window.seen.push(values);
    }, 20);
}"""


@pytest.mark.browser
def test_long_file_shows_text_and_progress_as_chunks_finish(page, tmp_path: Path) -> None:
    """A 40 s file is two chunks: the page shows text while the first chunk decodes, then that chunk's text and
    progress before the second is done."""
    page.locator("#audio input[type=file]").set_input_files(str(write_clip(tmp_path / "long.ogg", 40.0)))
    page.evaluate(RECORD_VALUES, ["#progress textarea, #progress input", "#transcript textarea"])
    page.click("#transcribe-btn")
    wait_for_filled(page, "#elapsed textarea, #elapsed input")
    seen = [(progress, text) for progress, text in page.evaluate("window.seen") if progress]
    done = [float(progress.split()[0]) for progress, _ in seen]
    assert done[-1] == 40.0 and any(0 < seconds < 40 for seconds in done), seen
    # live partial text: words on the page while the first chunk is still decoding
    assert any(text for seconds, (_, text) in zip(done, seen, strict=True) if seconds == 0), seen
    assert page.locator("#duration textarea, #duration input").input_value() == "40.00 s (2 chunks)"


@pytest.mark.browser
def test_live_microphone_text_appears_while_speaking(page) -> None:
    """Live mode: the transcript fills while the (fake) microphone is still recording."""
    page.get_by_role("tab", name="Live").click()
    live = page.locator("#live-audio")
    live.get_by_role("button", name="Record").first.click()
    wait_for_filled(page, "#live-transcript textarea")
    assert live.get_by_role("button", name="Stop").first.is_visible()  # still recording
    assert set(page.locator("#live-transcript textarea").input_value().split()) <= {"tiny", "audio"}
    live.get_by_role("button", name="Stop").first.click()
    assert page.outside_requests == []


def choose_example(page, name: str) -> None:
    """Click an example clip, as a user does, and wait until the audio box holds it (Gradio fetches it first)."""
    page.get_by_text(name).first.click()
    page.locator(f'#audio a[data-testid="download-link"][href$="/{name}"]').wait_for(timeout=60_000)


@pytest.mark.browser
def test_example_clip_is_transcribed_and_upload_label_names_ogg(page) -> None:
    assert page.get_by_text(re.compile(r"Audio \(WAV, MP3, FLAC, OGG; up to 0\.5 MB and 0\.75 min\)")).count()
    choose_example(page, "kokoro_heart.ogg")
    page.click("#transcribe-btn")
    assert wait_for_transcript(page)
    assert page.locator("#duration textarea, #duration input").input_value() == "2.85 s"


@pytest.mark.browser
def test_audio_without_speech_is_reported(page) -> None:
    choose_example(page, "beeps.ogg")
    page.click("#transcribe-btn")
    page.get_by_text(NO_SPEECH).first.wait_for(timeout=60_000)
    assert page.locator("#transcript textarea").input_value() == ""


@pytest.mark.browser
def test_limits_on_audio_duration_and_prompt_length(page, tmp_path: Path) -> None:
    silence = tmp_path / "minute.wav"  # 8 kHz 8-bit: a minute in 480 kB, under the 0.5 MB upload limit
    sf.write(silence, np.zeros(60 * 8000, dtype=np.float32), 8000, subtype="PCM_U8")
    page.locator("#audio input[type=file]").set_input_files(str(silence))
    page.click("#transcribe-btn")
    page.get_by_text(
        re.compile(r"Too long: 'minute\.wav' lasts 60 s; this demo transcribes at most 45 s")
    ).wait_for(timeout=60_000)
    page.get_by_role("tab", name="Text").click()
    page.locator("#prompt textarea").fill("word " * 200)
    page.click("#ask-btn")
    page.get_by_text(
        re.compile(rf"The prompt is \d+ tokens long; this demo takes at most {MAX_PROMPT_TOKENS}")
    ).first.wait_for(timeout=60_000)
    assert page.locator("#answer textarea").input_value() == ""


def test_api_page_lists_only_named_endpoints_with_labelled_outputs(demo: RunningDemo) -> None:
    """What "Use via API" shows: the three modes by name, no internal handlers, no unnamed values."""
    demo.fail_if_exited()
    info = json.loads(urllib.request.urlopen(f"{demo.url}gradio_api/info", timeout=30).read())
    assert sorted(info["named_endpoints"]) == ["/answer", "/live", "/transcribe"]
    assert info["unnamed_endpoints"] == {}
    labels = [item["label"] for endpoint in info["named_endpoints"].values() for item in endpoint["returns"]]
    assert all(label and not label.startswith("value_") for label in labels), labels


def test_transcriptions_run_side_by_side_and_text_mode_has_its_own_worker(backend: Backend) -> None:
    """A long file takes one transcription worker and short clips go through on the others; Text mode and Live
    mode never wait behind files."""
    from app import build_demo

    demo = build_demo(backend, "model", workers=3)
    handlers = {fn.api_name: fn for fn in demo.fns.values() if fn.api_visibility == "public"}
    assert {name: (fn.concurrency_id, fn.concurrency_limit) for name, fn in handlers.items()} == {
        "transcribe": ("transcribe", 3),
        "live": ("live", 3),
        "answer": ("text", 1),
    }
    # Gradio runs a group at the lowest limit of its members: the page-only handlers must not lower it.
    assert {fn.concurrency_limit for fn in demo.fns.values() if fn.concurrency_id == "live"} == {3}


class HeldPipe:
    """The backend's pipeline, except that a file named ``long.wav`` waits until the test releases it: a long file
    that holds a worker for as long as the test needs."""

    def __init__(self, pipe: Any) -> None:
        self.pipe, self.holding, self.release = pipe, threading.Event(), threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)

    def __call__(self, source: Any, **kwargs: Any) -> Any:
        if str(source).endswith("long.wav"):
            self.holding.set()
            self.release.wait()
        return self.pipe(source, **kwargs)


def test_a_short_clip_is_transcribed_while_a_long_file_holds_a_worker(
    backend: Backend, tmp_path: Path
) -> None:
    """Through Gradio's own queue, as a client sees it: a short clip sent while a long file is being transcribed
    gets its text without waiting for the long file."""
    from app import build_demo
    from gradio_client import Client, handle_file

    held = HeldPipe(backend.pipe)
    app = build_demo(dataclasses.replace(backend, pipe=held), "model")  # the default number of workers
    app.queue()
    app.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        client = Client(app.local_url, verbose=False)
        long = client.submit(handle_file(str(write_clip(tmp_path / "long.wav", 3.0))), api_name="/transcribe")
        assert held.holding.wait(timeout=120), "the long file never started"
        short = client.submit(
            handle_file(str(write_clip(tmp_path / "short.wav", 1.0))), api_name="/transcribe"
        )
        transcript, *_ = short.result(timeout=120)  # a queue that held it behind the long file times out here
        assert transcript and not long.done()
        held.release.set()
        assert long.result(timeout=120)[0]
    finally:
        held.release.set()
        app.close()
