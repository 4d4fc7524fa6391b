"""An OpenAI-compatible transcription server for a Tiny Audio checkpoint.

    tiny-audio-serve MODEL [--host 127.0.0.1] [--port 8000] [--max-upload-mb 25] [--max-audio-seconds 600]

`POST /v1/audio/transcriptions` takes what OpenAI's endpoint takes (multipart: file, model, response_format,
language, prompt, temperature, timestamp_granularities[]), so an OpenAI client pointed at this server with
`base_url="http://127.0.0.1:8000/v1"` works unchanged. One field of our own, `task` (e.g. `describe`; the OpenAI
client sends it with `extra_body={"task": "describe"}`), picks one of the model's task prompts instead of
transcription. `GET /v1/models` lists the one model served.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import transformers
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from transformers import StoppingCriteriaList

from pipeline_asr import decode_audio, resample_blocks
from serving import formats
from serving.batching import AllCancelled, BatchQueue, DecodeOptions, Job, JobCancelled
from serving.loading import Int8Unsupported, load_asr_pipeline
from serving.options import add_int8_option, require_positive

# OpenAI's own upload limit; Whisper's prompt limit; ten minutes of audio is a few minutes of CPU work.
DEFAULT_MAX_UPLOAD_MB = 25.0
DEFAULT_MAX_AUDIO_SECONDS = 600.0
DEFAULT_MAX_PROMPT_TOKENS = 224
DEFAULT_MAX_BATCH = 8
# Short requests go first, but none waits longer than this for one that came later (a batch can run longer).
DEFAULT_PATIENCE_SECONDS = 60.0
DISCONNECT_POLL_SECONDS = 0.25


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * 2**20)
    max_audio_seconds: float = DEFAULT_MAX_AUDIO_SECONDS
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS


class APIError(Exception):
    """A request the server refuses, answered in OpenAI's error shape with the field (``param``) at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        error_type = "invalid_request_error" if self.status < 500 else "server_error"
        body = {
            "error": {"message": self.message, "type": error_type, "param": self.param, "code": self.code}
        }
        return JSONResponse(body, status_code=self.status)


def upload_too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"the upload is larger than this server's limit of {limit / 2**20:g} MB (--max-upload-mb)",
        "file",
        "file_too_large",
    )


class UploadLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413 before it is stored.

    A declared Content-Length over the limit is refused before any of the body is read; a chunked body is counted
    as it arrives and the response is replaced by the 413 once it passes the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await upload_too_large(self.max_bytes).response()(scope, receive, send)
            return
        received = 0
        over_limit = False

        async def counting_receive() -> Message:
            nonlocal received, over_limit
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    over_limit = True
                    return {"type": "http.disconnect"}  # the app stops reading here
            return message

        async def guarded_send(message: Message) -> None:
            if not over_limit:
                await send(message)

        await self.app(scope, counting_receive, guarded_send)
        if over_limit:
            await upload_too_large(self.max_bytes).response()(scope, receive, send)


def decode_upload(data: bytes, filename: str, sampling_rate: int, max_seconds: float) -> np.ndarray:
    """The upload as mono float32 at the model's rate; refused as soon as it runs past ``max_seconds``."""
    try:
        source_rate, blocks = decode_audio(data, sampling_rate)
        kept, seconds = [], 0.0
        for block in blocks:
            seconds += len(block) / source_rate
            if seconds > max_seconds:
                raise APIError(
                    400,
                    f"{filename!r} is longer than this server's limit of {max_seconds:g} s of audio "
                    "(--max-audio-seconds)",
                    "file",
                    "audio_too_long",
                )
            kept.append(block)
        resampled = list(resample_blocks(kept, source_rate, sampling_rate))
    except (OSError, ValueError, RuntimeError) as error:
        message = f"{filename!r} is not audio this server can read: {error}"
        raise APIError(400, message, "file", "invalid_audio") from error
    if not resampled:
        raise APIError(400, f"{filename!r} holds no audio samples", "file", "invalid_audio")
    return np.concatenate(resampled)


class Transcriber:
    """The model behind the endpoint: request checks that need it, and the batch worker's pipeline calls."""

    def __init__(self, pipe: transformers.Pipeline, limits: Limits, skip_non_speech: bool) -> None:
        self.pipe, self.limits, self.skip_non_speech = pipe, limits, skip_non_speech
        self.sampling_rate: int = pipe.processor.sampling_rate
        self.has_word_timestamps = getattr(pipe.model.config, "ctc_blank_token_id", None) is not None

    def tokens(self, text: str) -> list[int]:
        return self.pipe.tokenizer(text, add_special_tokens=False)["input_ids"]

    def run_batch(self, jobs: list[Job]) -> list[dict[str, Any]]:
        options = jobs[0].options
        kwargs: dict[str, Any] = {
            "batch_size": len(jobs),
            "return_timestamps": "word" if options.word_timestamps else True,
            "skip_non_speech": self.skip_non_speech,
            "skip_errors": True,  # one failing request does not fail the others in its batch
            "stopping_criteria": StoppingCriteriaList([AllCancelled(jobs)]),
        }
        if options.prompt:
            kwargs["prompt"] = options.prompt
        if options.task:
            kwargs["task"] = options.task
        inputs = [{"raw": job.audio, "sampling_rate": self.sampling_rate} for job in jobs]
        return self.pipe(inputs, **kwargs)


def create_app(
    pipe: transformers.Pipeline,
    model_name: str,
    limits: Limits = Limits(),
    language: str = "en",
    max_batch: int = DEFAULT_MAX_BATCH,
    skip_non_speech: bool = True,
    patience: float = DEFAULT_PATIENCE_SECONDS,
) -> FastAPI:
    """The FastAPI app serving ``pipe``; its batch worker runs while the app does (lifespan)."""
    # `_sanitize_parameters` is the hook every Pipeline subclass defines to declare its call options (transformers'
    # custom-pipeline guide); its signature is how to tell a checkpoint's older pipeline code. Pinned by a test.
    if skip_non_speech and "skip_non_speech" not in inspect.signature(pipe._sanitize_parameters).parameters:
        raise ValueError(
            "this checkpoint's pipeline code predates the voice-activity check (skip_non_speech): save the model "
            "again with the current code, or serve it with --keep-non-speech"
        )
    transcriber = Transcriber(pipe, limits, skip_non_speech)
    queue = BatchQueue(transcriber.run_batch, max_batch, patience)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        queue.start()
        yield
        await run_in_threadpool(queue.close)

    app = FastAPI(title="Tiny Audio", lifespan=lifespan)
    app.add_middleware(UploadLimit, max_bytes=limits.max_upload_bytes)
    app.state.queue = queue

    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        return validation_error(error).response()

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        return APIError(error.status_code, str(error.detail)).response()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "tiny-audio"}]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "queued": queue.queued,
            "completed": queue.completed,
            "cancelled": queue.cancelled,
        }

    @app.post("/v1/audio/transcriptions", response_model=None)
    async def transcriptions(
        request: Request,
        file: Annotated[UploadFile, File()],
        model: Annotated[str, Form()],  # required, as by OpenAI; the server has one model whatever it names
        response_format: Annotated[str, Form()] = "json",
        language_code: Annotated[str | None, Form(alias="language")] = None,
        prompt: Annotated[str | None, Form()] = None,
        temperature: Annotated[float, Form()] = 0.0,
        stream: Annotated[bool, Form()] = False,
        granularities: Annotated[list[str] | None, Form(alias="timestamp_granularities[]")] = None,
        task: Annotated[str | None, Form()] = None,
    ) -> Response:
        granularities = granularities or ["segment"]
        check_options(response_format, temperature, stream, granularities)
        if language_code is not None and language_code.lower() != language:
            raise APIError(
                400, f"language {language_code!r}: this server transcribes {language!r} only", "language"
            )
        prompt_tokens = len(transcriber.tokens(prompt)) if prompt else 0
        if prompt_tokens > limits.max_prompt_tokens:
            raise APIError(
                400,
                f"the prompt has {prompt_tokens} tokens, more than this server's limit of "
                f"{limits.max_prompt_tokens} (--max-prompt-tokens)",
                "prompt",
                "prompt_too_long",
            )
        if task is not None:
            tasks = transcriber.pipe.processor.task_prompts
            if task not in tasks:
                raise APIError(
                    400, f"task {task!r} is not one of this model's tasks: {', '.join(sorted(tasks))}", "task"
                )
        timed = response_format in ("verbose_json", "srt", "vtt")
        if "word" in granularities and not transcriber.has_word_timestamps:
            raise APIError(
                400,
                "word timestamps come from the model's CTC head, and this checkpoint has none",
                "timestamp_granularities[]",
            )
        data = await file.read()
        audio = await run_in_threadpool(
            decode_upload, data, file.filename or "file", transcriber.sampling_rate, limits.max_audio_seconds
        )
        options = DecodeOptions(
            prompt=prompt or None, task=task, word_timestamps=timed and transcriber.has_word_timestamps
        )
        job = queue.submit(audio, options)
        try:
            result = await wait_for_result(job, request, queue)
        except JobCancelled:
            return Response(status_code=499)  # nobody is listening; the status is for the access log
        except Exception as error:  # noqa: BLE001 - the client gets the reason, the server goes on
            raise APIError(500, f"transcription failed: {type(error).__name__}: {error}") from error
        if "error" in result:
            raise APIError(500, f"transcription failed: {result['error']}")
        return render(
            result,
            response_format,
            duration=len(audio) / transcriber.sampling_rate,
            language=language,
            word_chunks=options.word_timestamps,
            include_words="word" in granularities,
            tokenize=transcriber.tokens,
        )

    return app


def check_options(response_format: str, temperature: float, stream: bool, granularities: list[str]) -> None:
    if response_format not in formats.RESPONSE_FORMATS:
        raise APIError(
            400,
            f"response_format {response_format!r} is not one of {', '.join(formats.RESPONSE_FORMATS)}",
            "response_format",
        )
    if not 0.0 <= temperature <= 1.0:
        raise APIError(400, f"temperature must be between 0 and 1, got {temperature:g}", "temperature")
    if stream:
        raise APIError(400, "streaming responses are not supported: leave stream unset", "stream")
    unknown = sorted(set(granularities) - {"word", "segment"})
    if unknown:
        raise APIError(
            400, f"timestamp_granularities {unknown}: only 'word' and 'segment'", "timestamp_granularities[]"
        )
    if set(granularities) != {"segment"} and response_format != "verbose_json":
        raise APIError(
            400, "timestamp_granularities needs response_format 'verbose_json'", "timestamp_granularities[]"
        )


def validation_error(error: RequestValidationError) -> APIError:
    """FastAPI's first complaint about the form, as an OpenAI error naming the field."""
    first = error.errors()[0]
    field = str(first["loc"][-1]) if first.get("loc") else None
    if first.get("type") == "missing":
        return APIError(400, f"missing required field {field!r}", field)
    if field == "file":
        return APIError(400, "'file' must be an uploaded audio file (multipart/form-data)", field)
    return APIError(400, f"invalid value for {field!r}: {first.get('msg')}", field)


async def wait_for_result(job: Job, request: Request, queue: BatchQueue) -> dict[str, Any]:
    """The job's result; if the client disconnects first, the job is cancelled and JobCancelled raised."""
    pending = asyncio.wrap_future(job.result)
    while True:
        done, _ = await asyncio.wait({pending}, timeout=DISCONNECT_POLL_SECONDS)
        if done:
            return pending.result()
        if await request.is_disconnected():
            queue.cancel(job)
            raise JobCancelled("the client disconnected")


def render(
    result: dict[str, Any],
    response_format: str,
    duration: float,
    language: str,
    word_chunks: bool,
    include_words: bool,
    tokenize: Callable[[str], list[int]],
) -> Response:
    text = result["text"]
    if response_format == "json":
        return JSONResponse({"text": text})
    if response_format == "text":
        return PlainTextResponse(text)
    chunks = result.get("chunks", [])
    words = formats.words_from_chunks(chunks) if word_chunks else None
    segments = (
        formats.segments_from_words(words) if words is not None else formats.segments_from_chunks(chunks)
    )
    if response_format == "srt":
        return PlainTextResponse(formats.srt(segments))
    if response_format == "vtt":
        return PlainTextResponse(formats.vtt(segments), media_type="text/vtt")
    body = formats.verbose_json(
        text, duration, language, segments, words if include_words else None, tokenize=tokenize
    )
    return JSONResponse(body)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="Tiny Audio checkpoint folder or Hub id")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to your LAN)"
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default=None, help="torch device (default: the pipeline's choice)")
    add_int8_option(parser)
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB)
    parser.add_argument("--max-audio-seconds", type=float, default=DEFAULT_MAX_AUDIO_SECONDS)
    parser.add_argument("--max-prompt-tokens", type=int, default=DEFAULT_MAX_PROMPT_TOKENS)
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="requests decoded together")
    parser.add_argument(
        "--patience",
        type=float,
        default=DEFAULT_PATIENCE_SECONDS,
        help="seconds after which the oldest request goes before shorter ones (0: first come, first served)",
    )
    parser.add_argument("--language", default="en", help="the language the model transcribes")
    parser.add_argument(
        "--keep-non-speech",
        action="store_true",
        help="transcribe audio in which the voice-activity detector finds no speech (default: empty text)",
    )
    args = parser.parse_args(argv)
    require_positive(parser, args, ("max_upload_mb", "max_audio_seconds", "max_prompt_tokens", "max_batch"))

    limits = Limits(int(args.max_upload_mb * 2**20), args.max_audio_seconds, args.max_prompt_tokens)
    try:
        pipe = load_asr_pipeline(args.model, args.device, int8=args.int8)
    except Int8Unsupported as error:
        parser.error(str(error))
    name = Path(args.model).name if os.path.isdir(args.model) else args.model
    app = create_app(
        pipe, name, limits, args.language.lower(), args.max_batch, not args.keep_non_speech, args.patience
    )
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
