"""Gradio web demo for a Tiny Audio checkpoint: transcribe audio (files or live from the microphone), or talk to the
LLM alone.

    python demo/app.py --model MODEL [--port 7860] [--host 127.0.0.1] [--max-file-mb 50]
        [--max-audio-seconds 600] [--max-prompt-tokens 1024] [--workers 2] [--keep-non-speech]

MODEL is a checkpoint folder or a Hub id. Transcribe mode runs the model's ASR pipeline (which chunks long files),
shows the text as it is decoded, the progress through a long file, and each word with its time (or, with the task
set to describe, what the speaker and the recording sound like); Live mode
transcribes the microphone while you speak; Text mode runs the language model without audio so you can see what
the decoder knows on its own.
"""

from __future__ import annotations

import argparse
import os

# Set before gradio is imported: the demo must not phone home (usage analytics) from a local machine.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import queue  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import StoppingCriteria, TextStreamer  # noqa: E402

from serving.loading import Int8Unsupported, load_asr_pipeline  # noqa: E402
from serving.options import add_int8_option, require_positive  # noqa: E402

DEFAULT_MAX_FILE_MB = 50.0
# Ten minutes of audio is a few minutes of CPU work for the offline model: longer files would hold a worker.
DEFAULT_MAX_AUDIO_SECONDS = 600.0
# A prompt's prefill grows with its length; the LLM's context (8,192 tokens for SmolLM2) is the hard ceiling.
DEFAULT_MAX_PROMPT_TOKENS = 1024
DEFAULT_TEXT_MAX_NEW_TOKENS = 128
# Transcriptions run side by side on this many workers, so a long file never holds up everyone's short clips.
DEFAULT_WORKERS = 2
# How often the page is refreshed while a job runs without new text (the queue notices a closed page then).
HEARTBEAT_SECONDS = 0.5
# The microphone's audio reaches the server in pieces this long.
LIVE_STREAM_SECONDS = 1.0
EXAMPLES = Path(__file__).resolve().parent / "examples"
AUDIO_FORMATS = "WAV, MP3, FLAC, OGG"
JOB_THREAD = "tiny-audio-job"
NO_SPEECH = "No speech found in this audio (voice-activity check), so there is nothing to transcribe."


class AudioRejected(ValueError):
    """An uploaded file the demo refuses, with a message meant for the page."""


class ClientGone(Exception):
    """The page that asked for a job was closed: the job stops."""


def check_audio_file(path: str | os.PathLike, max_seconds: float = DEFAULT_MAX_AUDIO_SECONDS) -> float:
    """Return the duration in seconds of a readable audio file, else raise AudioRejected.

    Reads only the header, so a non-audio file or an over-long recording is refused before anything decodes it.
    (Oversized uploads never get here: Gradio refuses them before storing them, see `max_file_size` in `main`.)
    """
    path = Path(path)
    try:
        info = sf.info(str(path))
    except sf.LibsndfileError as err:
        raise AudioRejected(
            f"Not an audio file: '{path.name}' could not be read as audio ({err.error_string}); "
            f"{AUDIO_FORMATS} expected."
        ) from err
    if info.frames == 0:
        raise AudioRejected(f"Empty audio: '{path.name}' holds no samples.")
    duration = info.frames / info.samplerate
    if duration > max_seconds:
        raise AudioRejected(
            f"Too long: '{path.name}' lasts {duration:.0f} s; this demo transcribes at most {max_seconds:g} s "
            "(--max-audio-seconds)."
        )
    return duration


class QueueStreamer(TextStreamer):
    """`generate`'s text, piece by piece, into a queue that the page's handler reads (the TextIteratorStreamer
    pattern, sharing the queue with the pipeline's chunk reports)."""

    def __init__(self, tokenizer: Any, events: queue.Queue) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.events = events

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.events.put(("text", text))


class StopWhen(StoppingCriteria):
    """Stops generation once ``event`` is set (the page that asked for it is gone)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs: Any) -> torch.BoolTensor:
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


def run_in_background(work: Callable[[queue.Queue, threading.Event], Any]) -> Iterator[tuple[str, Any]]:
    """Runs ``work(events, cancelled)`` in a thread and yields what it puts in ``events``, then ``("done", result)``
    or ``("error", exception)``; ``("idle", None)`` every HEARTBEAT_SECONDS without news.

    When the consumer stops early (Gradio closes a handler whose page has gone), ``cancelled`` is set so the work
    can stop too.
    """
    events: queue.Queue = queue.Queue()
    cancelled = threading.Event()

    def target() -> None:
        try:
            events.put(("done", work(events, cancelled)))
        except Exception as error:  # handed to the consumer, which shows it on the page
            events.put(("error", error))

    worker = threading.Thread(target=target, name=JOB_THREAD, daemon=True)
    worker.start()
    try:
        while True:
            try:
                kind, value = events.get(timeout=HEARTBEAT_SECONDS)
            except queue.Empty:
                yield "idle", None
                continue
            yield kind, value
            if kind in ("done", "error"):
                return
    finally:
        if worker.is_alive():
            cancelled.set()
            print("Job cancelled: its page was closed.", flush=True)


@dataclass
class LiveState:
    """A microphone session: the text of finished segments and the audio of the current one (16 kHz)."""

    finished: str = ""
    segment: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    text: str = ""
    unheard_seconds: float = 0.0  # audio added since the segment was last transcribed
    last_cost: float = 0.0  # wall seconds that transcription took

    @property
    def shown(self) -> str:
        return " ".join(part for part in (self.finished, self.text) if part)


@dataclass
class Backend:
    """Everything the modes need, loaded once at start-up."""

    pipe: transformers.Pipeline
    processor: transformers.ProcessorMixin
    text_max_new_tokens: int = DEFAULT_TEXT_MAX_NEW_TOKENS
    max_audio_seconds: float = DEFAULT_MAX_AUDIO_SECONDS
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS
    skip_non_speech: bool = True

    @classmethod
    def load(cls, model: str, int8: bool = False, **limits: Any) -> Backend:
        pipe = load_asr_pipeline(model, int8=int8)
        backend = cls(pipe=pipe, processor=pipe.processor, **limits)
        context = pipe.model.config.text_config.max_position_embeddings
        backend.max_prompt_tokens = min(backend.max_prompt_tokens, context - backend.text_max_new_tokens)
        return backend

    @property
    def word_timestamps(self) -> bool:
        """Words are timed by the model's CTC head; a model trained without it gives chunk times only."""
        return getattr(self.pipe.model.config, "ctc_blank_token_id", None) is not None

    @property
    def tasks(self) -> list[str]:
        """What the Transcribe tab can ask of the model: its task prompts, transcription first."""
        prompts = self.processor.task_prompts
        return sorted(prompts, key=lambda task: (task != self.processor.default_task, task))

    def _options(self, task: str | None = None) -> dict[str, Any]:
        # Words are timed against a transcript: a description's words say nothing about when they were spoken.
        timed_words = self.word_timestamps and task in (None, self.processor.default_task)
        options: dict[str, Any] = {"return_timestamps": "word" if timed_words else True}
        if task is not None:
            options["task"] = task
        if self.skip_non_speech:
            options["skip_non_speech"] = True
        return options

    # ---- Transcribe mode -----------------------------------------------------------------------------------

    def transcribe(
        self, path: str | None, task: str | None = None
    ) -> Iterator[tuple[str, list[list], str, str, str, str]]:
        """Handler for Transcribe mode, a generator: (transcript, words, duration, time taken, progress, message)
        after every decoded piece of text, every finished chunk, and once more at the end. ``task`` is one of the
        model's tasks (default: transcribe); "describe" answers with what the speaker and recording sound like."""
        if not path:
            yield "", [], "", "", "", "Upload or record some audio first."
            return
        try:
            duration = check_audio_file(path, self.max_audio_seconds)
        except AudioRejected as err:
            yield "", [], "", "", "", f"**Error:** {err}"
            return
        shown_duration = f"{duration:.2f} s"
        start = time.perf_counter()

        def work(events: queue.Queue, cancelled: threading.Event) -> dict:
            def chunk_done(entry: dict) -> None:
                if cancelled.is_set():
                    raise ClientGone
                events.put(("chunk", entry))

            return self.pipe(
                path,
                streamer=QueueStreamer(self.pipe.tokenizer, events),
                stopping_criteria=[StopWhen(cancelled)],
                on_chunk=chunk_done,
                **self._options(task),
            )

        finished: list[str] = []  # text of the chunks done so far
        partial, words, done_seconds = "", [], 0.0
        for kind, value in run_in_background(work):
            if kind == "text":
                partial += value
            elif kind == "chunk":
                finished.append(value["text"])
                partial, done_seconds = "", value["timestamp"][1]
                # a new list: Gradio sends a generator's updates as differences from the list it last saw
                words = words + [_word_row(word) for word in value.get("words", [])]
            elif kind == "error":
                message = str(value) if isinstance(value, ValueError) else repr(value)
                yield "", [], shown_duration, "", "", f"**Error:** {message}"
                return
            elif kind == "done":
                result = value
                break
            text = " ".join(part for part in [*finished, partial.strip()] if part)
            progress = f"{done_seconds:.1f} s of {duration:.1f} s transcribed"
            yield text, words, shown_duration, "", progress, ""
        elapsed = time.perf_counter() - start
        count = len(finished)
        if count > 1:
            shown_duration += f" ({count} chunks)"
        note = (
            "" if result["text"] else (NO_SPEECH if self.skip_non_speech else "The model produced no text.")
        )
        progress = f"{duration:.1f} s of {duration:.1f} s transcribed"
        yield result["text"], words, shown_duration, _timing(elapsed, duration), progress, note

    # ---- Live mode (microphone streaming) --------------------------------------------------------------------

    def live(self, state: LiveState | None, audio: tuple[int, np.ndarray] | None) -> tuple[LiveState, str]:
        """Handler for Live mode, called with each piece of microphone audio: the text so far.

        The current segment is transcribed again whenever the audio added since is at least as long as the last
        transcription took, so a slow machine skips updates instead of falling behind. A segment that reaches the
        encoder window is closed at its quietest point and its text kept.
        """
        state = state or LiveState()
        if audio is None or audio[1].size == 0:
            return state, state.shown
        from pipeline_asr import (
            read_audio,  # microphone PCM read as any other input: scaled, downmixed, resampled
        )

        rate, samples = audio
        samples = read_audio(samples, self.processor.sampling_rate, sampling_rate=rate)
        state.segment = np.concatenate([state.segment, samples])
        state.unheard_seconds += len(samples) / self.processor.sampling_rate
        window = self.pipe.model.config.max_audio_seconds
        if len(state.segment) > window * self.processor.sampling_rate:
            self._close_live_segment(state, window)
        elif state.unheard_seconds >= state.last_cost:
            self._hear_live_segment(state)
        return state, state.shown

    def live_stopped(self, state: LiveState | None) -> tuple[LiveState, str]:
        """The microphone stopped: transcribe what is left of the segment and keep the whole text."""
        state = state or LiveState()
        if len(state.segment):
            self._hear_live_segment(state)
        final = LiveState(finished=state.shown)
        return final, final.shown

    def _hear_live_segment(self, state: LiveState) -> None:
        start = time.perf_counter()
        options = {"skip_non_speech": True} if self.skip_non_speech else {}
        state.text = self.pipe(
            state.segment, sampling_rate=self.processor.sampling_rate, num_beams=1, **options
        )["text"]
        state.last_cost, state.unheard_seconds = time.perf_counter() - start, 0.0

    def _close_live_segment(self, state: LiveState, window: float) -> None:
        from pipeline_asr import (
            find_cut,
        )  # the pipeline's own cut: the quietest point before the window's end

        rate = self.processor.sampling_rate
        cut = find_cut(state.segment, rate, int(window * rate))
        rest = state.segment[cut:]
        state.segment = state.segment[:cut]
        self._hear_live_segment(state)
        state.finished, state.text, state.segment = state.shown, "", rest

    # ---- Text mode -------------------------------------------------------------------------------------------

    def prompt_tokens(self, prompt: str) -> int:
        return int(self.processor.text_prompt(prompt)["input_ids"].shape[1])

    def answer(self, prompt: str) -> Iterator[tuple[str, str]]:
        """Handler for Text mode, a generator: the LLM's reply to a text-only prompt as it is written, and the time
        taken."""
        if not prompt.strip():
            gr.Warning("Type a prompt first.")
            yield "", ""
            return
        inputs = self.processor.text_prompt(prompt)
        length = int(inputs["input_ids"].shape[1])
        if length > self.max_prompt_tokens:
            raise gr.Error(
                f"The prompt is {length} tokens long; this demo takes at most {self.max_prompt_tokens} "
                "(--max-prompt-tokens, within the language model's context)."
            )
        model = self.pipe.model
        start = time.perf_counter()

        def work(events: queue.Queue, cancelled: threading.Event) -> None:
            with torch.inference_mode():
                model.generate(
                    **inputs.to(model.device),
                    max_new_tokens=self.text_max_new_tokens,
                    streamer=QueueStreamer(self.processor.tokenizer, events),
                    stopping_criteria=[StopWhen(cancelled)],
                )

        reply = ""
        for kind, value in run_in_background(work):
            if kind == "text":
                reply += value
            elif kind == "error":
                raise gr.Error(str(value))
            yield reply.strip(), ""
        yield reply.strip(), f"{time.perf_counter() - start:.2f} s"


def _word_row(word: dict) -> list:
    start, end = word["timestamp"]
    return [word["text"], round(start, 2), round(end, 2)]


def _timing(elapsed: float, duration: float) -> str:
    """Time taken plus the real-time factor people compare ASR systems by."""
    return f"{elapsed:.2f} s ({duration / max(elapsed, 1e-9):.1f}x real time)"


def build_demo(
    backend: Backend, title: str, max_file_mb: float = DEFAULT_MAX_FILE_MB, workers: int = DEFAULT_WORKERS
) -> gr.Blocks:
    """The page: Transcribe, Live and Text tabs, wired to the backend's handlers."""
    limit = f"up to {max_file_mb:g} MB and {backend.max_audio_seconds / 60:g} min"
    with gr.Blocks(title="Tiny Audio demo", analytics_enabled=False) as demo:
        gr.Markdown(f"# Tiny Audio\nModel: `{title}`")
        with gr.Tab("Transcribe", elem_id="tab-transcribe"):
            audio = gr.Audio(
                sources=["upload", "microphone"],
                type="filepath",
                label=f"Audio ({AUDIO_FORMATS}; {limit})",
                elem_id="audio",
            )
            examples = sorted(str(path) for path in EXAMPLES.glob("*.ogg"))
            if examples:
                gr.Examples(examples, inputs=audio, label="Example clips (click one, then Transcribe)")
            task = gr.Radio(
                backend.tasks,
                value=backend.tasks[0],
                label="Task (describe: who is speaking and how the recording sounds)",
                elem_id="task",
            )
            transcribe_btn = gr.Button("Transcribe", variant="primary", elem_id="transcribe-btn")
            audio_error = gr.Markdown(label="Message", elem_id="audio-error")
            transcript = gr.Textbox(label="Transcript", lines=4, elem_id="transcript")
            progress = gr.Textbox(label="Progress", elem_id="progress")
            with gr.Row():
                duration = gr.Textbox(label="Audio duration", elem_id="duration")
                elapsed = gr.Textbox(label="Time taken", elem_id="elapsed")
            words = gr.Dataframe(
                headers=["Word", "Start (s)", "End (s)"],
                datatype=["str", "number", "number"],
                label="Words and their times" if backend.word_timestamps else "Words (no times: no CTC head)",
                elem_id="words",
                interactive=False,
            )
            transcribe_btn.click(
                backend.transcribe,
                inputs=[audio, task],
                outputs=[transcript, words, duration, elapsed, progress, audio_error],
                api_name="transcribe",
                concurrency_limit=workers,
                concurrency_id="transcribe",
            )
            # A recording reaches the server by its own upload after Stop, and Gradio fires stop_recording once
            # it has landed: until then Transcribe would send no audio, so it stays disabled. Page-only handlers:
            # not part of the API.
            audio.start_recording(
                _disable_button, outputs=transcribe_btn, queue=False, api_visibility="private"
            )
            audio.stop_recording(
                _enable_button, outputs=transcribe_btn, queue=False, api_visibility="private"
            )
        with gr.Tab("Live", elem_id="tab-live"):
            gr.Markdown("Speak: the text appears while you talk.")
            live_state = gr.State(None)
            microphone = gr.Audio(
                sources=["microphone"], type="numpy", streaming=True, label="Microphone", elem_id="live-audio"
            )
            live_text = gr.Textbox(label="Live transcript", lines=4, elem_id="live-transcript")
            microphone.stream(
                backend.live,
                inputs=[live_state, microphone],
                outputs=[live_state, live_text],
                stream_every=LIVE_STREAM_SECONDS,
                time_limit=int(backend.max_audio_seconds),
                api_name="live",
                concurrency_limit=workers,
                concurrency_id="live",
            )
            microphone.stop_recording(
                backend.live_stopped,
                inputs=live_state,
                outputs=[live_state, live_text],
                api_visibility="private",
                concurrency_limit=workers,  # a group runs at its members' lowest limit
                concurrency_id="live",
            )
        with gr.Tab("Text", elem_id="tab-text"):
            gr.Markdown(
                "The language model alone, no audio: what does the decoder know by itself? "
                f"(Prompts up to {backend.max_prompt_tokens} tokens.)"
            )
            prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
            ask_btn = gr.Button("Ask", variant="primary", elem_id="ask-btn")
            reply = gr.Textbox(label="Answer", lines=4, elem_id="answer")
            reply_time = gr.Textbox(label="Time taken", elem_id="answer-time")
            ask_btn.click(
                backend.answer,
                inputs=prompt,
                outputs=[reply, reply_time],
                api_name="answer",
                concurrency_limit=1,
                concurrency_id="text",
            )
    return demo


def _disable_button() -> gr.Button:
    return gr.Button(interactive=False)


def _enable_button() -> gr.Button:
    return gr.Button(interactive=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="Tiny Audio checkpoint folder or Hub id")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the demo to your LAN)"
    )
    parser.add_argument(
        "--max-file-mb", type=float, default=DEFAULT_MAX_FILE_MB, help="largest upload accepted"
    )
    parser.add_argument(
        "--max-audio-seconds",
        type=float,
        default=DEFAULT_MAX_AUDIO_SECONDS,
        help="longest audio transcribed (a file, or a live session)",
    )
    parser.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=DEFAULT_MAX_PROMPT_TOKENS,
        help="longest Text-mode prompt (never more than the LLM's context leaves for the answer)",
    )
    parser.add_argument(
        "--workers", type=int, default=DEFAULT_WORKERS, help="transcriptions that run at the same time"
    )
    parser.add_argument(
        "--keep-non-speech",
        dest="vad",
        action="store_false",
        help="transcribe audio without speech too (by default a voice-activity check says there is none)",
    )
    add_int8_option(parser)
    args = parser.parse_args(argv)
    require_positive(parser, args, ("max_file_mb", "max_audio_seconds", "max_prompt_tokens", "workers"))

    try:
        backend = Backend.load(
            args.model,
            int8=args.int8,
            max_audio_seconds=args.max_audio_seconds,
            max_prompt_tokens=args.max_prompt_tokens,
            skip_non_speech=args.vad,
        )
    except Int8Unsupported as error:
        parser.error(str(error))
    demo = build_demo(backend, args.model, args.max_file_mb, args.workers)
    demo.queue(max_size=16 * args.workers)  # beyond that, users are told the queue is full rather than wait
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=False,
        show_error=True,
        max_file_size=int(args.max_file_mb * 2**20),  # refused in the page, before the upload is stored
        allowed_paths=[str(EXAMPLES)],
    )


if __name__ == "__main__":
    main()
