"""The OpenAI-compatible server: a real server process on 127.0.0.1, called with the real `openai` client."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
from conftest import listening_addresses

from benchmarks.bench_server import free_port, start_server
from serving.batching import AllCancelled, BatchQueue, DecodeOptions, Job, JobCancelled
from testing.tiny_models import make_tiny_encoder, make_tiny_tiny_audio, make_tiny_tokenizer

RATE = 16000
MAX_UPLOAD_MB = 1
MAX_AUDIO_SECONDS = 20
MAX_PROMPT_TOKENS = 16


def wav_bytes(audio: np.ndarray, rate: int = RATE, subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, audio, rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny checkpoint with a CTC head (word timestamps); it never repeats a token, so its text follows the audio."""
    root = tmp_path_factory.mktemp("served")
    model, processor = make_tiny_tiny_audio(root)
    model.config.ctc_blank_token_id = processor.tokenizer(" ", add_special_tokens=False)["input_ids"][0]
    model.generation_config.no_repeat_ngram_size = 1
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    return root / "model"


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory) -> Iterator[str]:
    """A server process on a free port of 127.0.0.1, with small limits; yields its base URL."""
    port = free_port()
    limits = [
        f"--max-upload-mb={MAX_UPLOAD_MB}",
        f"--max-audio-seconds={MAX_AUDIO_SECONDS}",
        f"--max-prompt-tokens={MAX_PROMPT_TOKENS}",
    ]
    process = start_server(model_dir, port, limits, tmp_path_factory.mktemp("server-log") / "server.log")
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(timeout=60)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="not-needed", max_retries=0)


@pytest.fixture(scope="module")
def local_pipeline(model_dir):
    from transformers import pipeline

    return pipeline("automatic-speech-recognition", model=str(model_dir), trust_remote_code=True)


def transcribe(client: openai.OpenAI, audio: bytes, name: str = "clip.wav", **kwargs):
    return client.audio.transcriptions.create(file=(name, audio), model="tiny-audio", **kwargs)


def test_the_server_listens_on_loopback_only(server):
    """Started without --host (as the fixture starts it), the server must not be reachable from the network."""
    port = int(server.rsplit(":", 1)[1])
    assert listening_addresses(port) == ["0100007F"]  # 127.0.0.1, little-endian hex


def test_a_real_clip_gives_the_pipelines_text(client, local_pipeline, speech):
    audio = wav_bytes(speech[0])
    expected = local_pipeline(audio, skip_non_speech=True)["text"]
    assert expected
    assert transcribe(client, audio).text == expected
    assert transcribe(client, audio, response_format="text").strip() == expected


def test_the_task_field_asks_for_a_description(client, local_pipeline, speech):
    audio = wav_bytes(speech[0])
    expected = local_pipeline(audio, task="describe", skip_non_speech=True)["text"]
    assert transcribe(client, audio, extra_body={"task": "describe"}).text == expected


def test_verbose_json_has_segments_and_word_timestamps(client, speech):
    audio = speech[1]
    result = transcribe(
        client, wav_bytes(audio), response_format="verbose_json", timestamp_granularities=["word", "segment"]
    )
    assert result.duration == pytest.approx(len(audio) / RATE, abs=1e-3)
    words = " ".join(result.text.split())  # the random model writes control characters too
    assert " ".join(word.word for word in result.words) == words
    assert " ".join(segment.text for segment in result.segments) == words
    times = [(word.start, word.end) for word in result.words]
    assert all(0 <= start <= end <= result.duration for start, end in times), (times, result.duration)
    assert times == sorted(times)
    assert result.segments[0].start == times[0][0] and result.segments[-1].end == times[-1][1]
    plain = transcribe(client, wav_bytes(audio), response_format="verbose_json")
    assert plain.words is None and plain.text == result.text  # words only when asked for, as OpenAI does


@pytest.mark.parametrize("response_format", ["srt", "vtt"])
def test_subtitles(client, speech, response_format):
    verbose = transcribe(client, wav_bytes(speech[1]), response_format="verbose_json")
    subtitles = transcribe(client, wav_bytes(speech[1]), response_format=response_format)
    separator = "," if response_format == "srt" else "."
    blocks = subtitles.strip().split("\n\n")
    if response_format == "vtt":
        assert blocks.pop(0) == "WEBVTT"
    else:
        assert [block.split("\n")[0] for block in blocks] == [str(n) for n in range(1, len(blocks) + 1)]
    cues = [block.split("\n")[-2:] for block in blocks]
    assert [text for _, text in cues] == [segment.text for segment in verbose.segments]
    first = verbose.segments[0]
    start = f"00:00:{int(first.start):02d}{separator}{round(first.start % 1 * 1000):03d}"
    assert cues[0][0].startswith(start + " --> ")


@pytest.mark.parametrize("kind", ["zeros", "white noise"])
def test_audio_without_speech_gives_no_text(client, kind):
    rng = np.random.default_rng(0)
    audio = np.zeros(5 * RATE) if kind == "zeros" else rng.uniform(-0.5, 0.5, 5 * RATE)
    assert transcribe(client, wav_bytes(audio.astype(np.float32))).text == ""


BAD_UPLOADS = {  # name -> (bytes, what the message says of them)
    "notes.txt": (b"this is not audio at all" * 20, "'notes.txt' is not audio this server can read"),
    "noise.bin": (np.random.default_rng(0).bytes(4096), "'noise.bin' is not audio this server can read"),
    "empty.wav": (b"", "'empty.wav' is not audio this server can read: empty bytes"),
    "cut.wav": (
        wav_bytes(np.zeros(RATE, dtype=np.float32))[:30],
        "'cut.wav' is not audio this server can read",
    ),
    "silent.wav": (wav_bytes(np.zeros(0, dtype=np.float32)), "'silent.wav' holds no audio samples"),
    "nan.wav": (
        wav_bytes(np.full(RATE, np.nan, dtype=np.float32), subtype="FLOAT"),
        "'nan.wav' is not audio this server can read: audio contains NaN",
    ),
}


@pytest.mark.parametrize("name", BAD_UPLOADS)
def test_bad_upload_gets_a_400_naming_the_file(client, name):
    data, named = BAD_UPLOADS[name]
    with pytest.raises(openai.BadRequestError) as caught:
        transcribe(client, data, name=name)
    error = caught.value.body
    assert caught.value.status_code == 400 and error["param"] == "file" and error["code"] == "invalid_audio"
    assert named in error["message"], error["message"]


def test_oversized_upload_gets_a_413(client, server):
    too_big = wav_bytes(np.zeros(int(MAX_UPLOAD_MB * 2**20 / 2) + RATE, dtype=np.float32))
    with pytest.raises(openai.APIStatusError) as caught:
        transcribe(client, too_big)
    assert caught.value.status_code == 413
    assert f"limit of {MAX_UPLOAD_MB} MB" in caught.value.body["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b"--x\r\nContent-Disposition: form-data; name=model\r\n\r\ntiny\r\n"
        yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
        for _ in range(2 * MAX_UPLOAD_MB * 16):
            yield b"\0" * 2**16

    response = httpx.post(
        f"{server}/v1/audio/transcriptions",
        content=chunks(),
        headers={"content-type": "multipart/form-data; boundary=x"},
    )
    assert response.status_code == 413 and response.json()["error"]["code"] == "file_too_large"


@pytest.mark.parametrize(
    ("kwargs", "param", "named"),
    [
        ({"response_format": "mp3"}, "response_format", "'mp3' is not one of json, text, verbose_json"),
        ({"temperature": 1.5}, "temperature", "between 0 and 1"),
        ({"language": "fr"}, "language", "transcribes 'en' only"),
        ({"prompt": "word " * 40}, "prompt", f"limit of {MAX_PROMPT_TOKENS}"),
        ({"timestamp_granularities": ["word"]}, "timestamp_granularities[]", "needs response_format"),
        ({"extra_body": {"task": "dance"}}, "task", "tasks: describe, emotion, transcribe"),
    ],
)
def test_bad_options_get_a_400_naming_the_field(client, speech, kwargs, param, named):
    with pytest.raises(openai.BadRequestError) as caught:
        transcribe(client, wav_bytes(speech[0]), **kwargs)
    assert caught.value.body["param"] == param and named in caught.value.body["message"]


def test_audio_over_the_duration_limit_is_refused(client):
    long = wav_bytes(np.zeros((MAX_AUDIO_SECONDS + 1) * 8000, dtype=np.float32), rate=8000)
    with pytest.raises(openai.BadRequestError, match=f"limit of {MAX_AUDIO_SECONDS} s of audio"):
        transcribe(client, long)


def test_missing_file_field(server):
    response = httpx.post(f"{server}/v1/audio/transcriptions", data={"model": "tiny-audio"})
    assert response.status_code == 400
    assert response.json()["error"] == {
        "message": "missing required field 'file'",
        "type": "invalid_request_error",
        "param": "file",
        "code": None,
    }


def test_concurrent_clients_all_get_their_own_text(client, speech, server):
    # Equal lengths: a batch sizes its token budget by its longest clip, and this random model never stops early.
    clips = [wav_bytes(speech[i % len(speech)][i * 800 : i * 800 + 2 * RATE]) for i in range(8)]
    sequential = [transcribe(client, clip).text for clip in clips]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(lambda clip: transcribe(client, clip).text, clips))
    assert concurrent == sequential
    health = httpx.get(f"{server}/health").json()
    assert health["queued"] == 0 and health["completed"] >= 16


def test_queue_batches_equal_options_in_order_and_drops_cancelled_jobs():
    batches: list[list[str]] = []

    def run_batch(jobs):
        batches.append([str(job.audio[0]) for job in jobs])
        return [{"text": str(job.audio[0])} for job in jobs]

    queue = BatchQueue(run_batch, max_batch=2, patience=3600)
    plain, words = DecodeOptions(), DecodeOptions(word_timestamps=True)
    jobs = [queue.submit(np.array([float(i)]), words if i == 2 else plain) for i in range(5)]
    queue.cancel(jobs[1])
    queue.start()
    results = [job.result.result(timeout=60) for job in jobs if job is not jobs[1]]
    queue.close()
    assert batches == [["0.0", "3.0"], ["2.0"], ["4.0"]]
    assert [r["text"] for r in results] == ["0.0", "2.0", "3.0", "4.0"]
    with pytest.raises(JobCancelled):
        jobs[1].result.result()
    assert queue.cancelled == 1


@pytest.mark.parametrize(
    ("patience", "order"), [(3600, ["short", "short", "long"]), (0, ["long", "short", "short"])]
)
def test_short_jobs_go_before_a_long_one_until_it_has_waited_too_long(patience, order):
    served: list[str] = []

    def run_batch(jobs):
        served.extend("long" if job.audio.size > 1 else "short" for job in jobs)
        return [{"text": ""} for _ in jobs]

    queue = BatchQueue(run_batch, max_batch=1, patience=patience)
    jobs = [queue.submit(np.zeros(size), DecodeOptions()) for size in (600, 1, 1)]
    queue.start()
    for job in jobs:
        job.result.result(timeout=60)
    queue.close()
    assert served == order


def test_a_batch_whose_clients_all_left_stops_generating(local_pipeline, speech):
    from transformers import StoppingCriteriaList

    gone, waiting = Job(speech[0], DecodeOptions()), Job(speech[0], DecodeOptions())
    gone.cancelled.set()
    full = local_pipeline(speech[0])["text"]

    def text_with(jobs):
        return local_pipeline(speech[0], stopping_criteria=StoppingCriteriaList([AllCancelled(jobs)]))["text"]

    assert text_with([gone, waiting]) == full
    assert len(text_with([gone])) < len(full)


def wait_until(condition, what: str, limit_s: float = 60.0) -> None:
    """Polls ``condition``; fails naming ``what`` if it never holds (a wait for an event, not a speed check)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {limit_s:g} s")
        time.sleep(0.05)


def test_a_client_that_hangs_up_takes_its_request_out_of_the_queue(local_pipeline, speech):
    """A real HTTP client sends a request while the model worker is busy, then closes its connection: the server
    drops the request from the queue, and the model never transcribes it."""
    import uvicorn

    from serving.server import create_app

    app = create_app(local_pipeline, "tiny-audio")
    queue = app.state.queue
    release, batches = threading.Event(), []
    run_batch = queue.run_batch

    def held_until_released(jobs):  # the worker is busy until the test says so
        batches.append(jobs)
        release.wait()
        return run_batch(jobs)

    queue.run_batch = held_until_released
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, "the server's start")
        busy = queue.submit(speech[0], DecodeOptions())
        wait_until(lambda: batches, "the worker taking the first job")
        url = f"http://127.0.0.1:{port}"
        request = httpx.Request(
            "POST",
            f"{url}/v1/audio/transcriptions",
            files={"file": ("clip.wav", wav_bytes(speech[1]))},
            data={"model": "tiny-audio"},
        )
        head = "".join(f"{name}: {value}\r\n" for name, value in request.headers.items())
        with socket.create_connection(("127.0.0.1", port)) as connection:
            connection.sendall(
                f"POST /v1/audio/transcriptions HTTP/1.1\r\n{head}\r\n".encode() + request.read()
            )
            wait_until(lambda: httpx.get(f"{url}/health").json()["queued"] == 1, "the request being queued")
        wait_until(lambda: httpx.get(f"{url}/health").json()["cancelled"] == 1, "the request's cancellation")
        assert httpx.get(f"{url}/health").json()["queued"] == 0
        release.set()
        busy.result.result(timeout=120)
        assert batches == [[busy]]  # the hung-up request never reached the model
    finally:
        release.set()
        server.should_exit = True
        thread.join(timeout=60)


def test_a_pipeline_without_the_voice_activity_option_is_refused_before_serving(tmp_path, local_pipeline):
    """The server reads a pipeline's options from its `_sanitize_parameters` signature: a pipeline that cannot skip
    non-speech (a stock transformers one here, as a checkpoint's older code would be) is refused with what to do;
    Tiny Audio's own pipeline declares the option."""
    from transformers import pipeline

    from serving.server import create_app

    whisper = make_tiny_encoder(tmp_path / "whisper")
    stock = pipeline(
        "automatic-speech-recognition",
        model=whisper,
        tokenizer=make_tiny_tokenizer(),
        feature_extractor=whisper,
    )
    with pytest.raises(
        ValueError, match=r"predates the voice-activity check \(skip_non_speech\).*--keep-non-speech"
    ):
        create_app(stock, "stock")
    assert create_app(local_pipeline, "tiny-audio") is not None


def test_a_limit_that_is_not_positive_stops_the_server_before_a_model_loads(capsys):
    """A usage error that names the flag and its value (serving/options.py, as the demo's)."""
    from serving.server import main

    with pytest.raises(SystemExit) as stopped:
        main(["model", "--max-batch", "0"])
    assert stopped.value.code == 2 and "--max-batch must be positive, got 0" in capsys.readouterr().err
