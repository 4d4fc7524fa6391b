"""Gradio web demo for a Tiny Audio checkpoint: transcribe audio, or talk to the LLM alone.

    python demo/app.py --model MODEL [--port 7860] [--host 127.0.0.1] [--max-file-mb 50]

MODEL is a checkpoint folder or a Hub id. Transcribe mode runs the model's ASR pipeline (which chunks long
files), Text mode runs the language model without audio so you can see what the decoder knows on its own.
"""

from __future__ import annotations

import argparse
import os

# Set before gradio is imported: the demo must not phone home (usage analytics) from a local machine.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

DEFAULT_MAX_FILE_MB = 50.0
DEFAULT_TEXT_MAX_NEW_TOKENS = 128


class AudioRejected(ValueError):
    """An uploaded file the demo refuses, with a message meant for the page."""


def check_audio_file(path: str | os.PathLike) -> float:
    """Return the duration in seconds of a readable audio file, else raise AudioRejected.

    Reads only the header, so a non-audio file is refused before anything tries to decode it. (Oversized
    uploads never get here: Gradio refuses them before storing them, see `max_file_size` in `main`.)
    """
    path = Path(path)
    try:
        info = sf.info(str(path))
    except sf.LibsndfileError as err:
        raise AudioRejected(
            f"Not an audio file: '{path.name}' could not be read as audio ({err.error_string}); "
            "WAV, FLAC, MP3 or OGG expected."
        ) from err
    if info.frames == 0:
        raise AudioRejected(f"Empty audio: '{path.name}' holds no samples.")
    return info.frames / info.samplerate


@dataclass
class Backend:
    """Everything the two modes need, loaded once at start-up."""

    pipe: transformers.Pipeline
    processor: transformers.ProcessorMixin
    text_max_new_tokens: int = DEFAULT_TEXT_MAX_NEW_TOKENS

    @classmethod
    def load(cls, model: str) -> Backend:
        pipe = transformers.pipeline("automatic-speech-recognition", model=model, trust_remote_code=True)
        if hasattr(pipe.model, "merge_lora"):  # absent from the code of checkpoints saved before it existed
            pipe.model.merge_lora()
        return cls(pipe=pipe, processor=pipe.processor)

    def transcribe(self, path: str | None) -> tuple[str, str, str, str]:
        """Handler for Transcribe mode: (transcript, duration, time taken, error message)."""
        if not path:
            return "", "", "", "Upload or record some audio first."
        try:
            duration = check_audio_file(path)
        except AudioRejected as err:
            return "", "", "", f"**Error:** {err}"
        start = time.perf_counter()
        try:  # the pipeline streams the file and cuts it into encoder-sized chunks
            result = self.pipe(path, return_timestamps=True)
        except ValueError as err:  # an input the pipeline cannot decode: its message names the reason
            return "", "", "", f"**Error:** {err}"
        elapsed = time.perf_counter() - start
        chunks = len(result["chunks"])
        shown_duration = f"{duration:.2f} s" + (f" ({chunks} chunks)" if chunks > 1 else "")
        note = "" if result["text"] else "The model produced no text for this audio."
        return result["text"], shown_duration, _timing(elapsed, duration), note

    def answer(self, prompt: str) -> tuple[str, str]:
        """Handler for Text mode: the LLM's reply to a text-only prompt, and the time taken."""
        if not prompt.strip():
            gr.Warning("Type a prompt first.")
            return "", ""
        model = self.pipe.model
        inputs = self.processor.text_prompt(prompt).to(model.device)
        start = time.perf_counter()
        with torch.inference_mode():
            ids = model.generate(**inputs, max_new_tokens=self.text_max_new_tokens)
        elapsed = time.perf_counter() - start
        new_ids = ids[:, inputs["input_ids"].shape[1] :]
        return self.processor.batch_decode(new_ids, skip_special_tokens=True)[0], f"{elapsed:.2f} s"


def _timing(elapsed: float, duration: float) -> str:
    """Time taken plus the real-time factor people compare ASR systems by."""
    return f"{elapsed:.2f} s ({duration / max(elapsed, 1e-9):.1f}x real time)"


def build_demo(backend: Backend, title: str, max_file_mb: float = DEFAULT_MAX_FILE_MB) -> gr.Blocks:
    """The page: a Transcribe tab and a Text tab, wired to the backend's handlers."""
    with gr.Blocks(title="Tiny Audio demo", analytics_enabled=False) as demo:
        gr.Markdown(f"# Tiny Audio\nModel: `{title}`")
        with gr.Tab("Transcribe", elem_id="tab-transcribe"):
            audio = gr.Audio(
                sources=["upload", "microphone"],
                type="filepath",
                label=f"Audio (WAV, MP3, FLAC; up to {max_file_mb:g} MB)",
                elem_id="audio",
            )
            transcribe_btn = gr.Button("Transcribe", variant="primary", elem_id="transcribe-btn")
            audio_error = gr.Markdown(elem_id="audio-error")
            transcript = gr.Textbox(label="Transcript", lines=4, elem_id="transcript")
            with gr.Row():
                duration = gr.Textbox(label="Audio duration", elem_id="duration")
                elapsed = gr.Textbox(label="Time taken", elem_id="elapsed")
            transcribe_btn.click(
                backend.transcribe, inputs=audio, outputs=[transcript, duration, elapsed, audio_error]
            )
            # A recording reaches the server by its own upload after Stop, and Gradio fires stop_recording once
            # it has landed: until then Transcribe would send no audio, so it stays disabled.
            audio.start_recording(lambda: gr.Button(interactive=False), outputs=transcribe_btn, queue=False)
            audio.stop_recording(lambda: gr.Button(interactive=True), outputs=transcribe_btn, queue=False)
        with gr.Tab("Text", elem_id="tab-text"):
            gr.Markdown("The language model alone, no audio: what does the decoder know by itself?")
            prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
            ask_btn = gr.Button("Ask", variant="primary", elem_id="ask-btn")
            reply = gr.Textbox(label="Answer", lines=4, elem_id="answer")
            reply_time = gr.Textbox(label="Time taken", elem_id="answer-time")
            ask_btn.click(backend.answer, inputs=prompt, outputs=[reply, reply_time])
    return demo


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
    args = parser.parse_args(argv)

    backend = Backend.load(args.model)
    build_demo(backend, args.model, args.max_file_mb).launch(
        server_name=args.host,
        server_port=args.port,
        share=False,
        show_error=True,
        max_file_size=int(args.max_file_mb * 2**20),  # refused in the page, before the upload is stored
    )


if __name__ == "__main__":
    main()
