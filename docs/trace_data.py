"""Trace one clip through a Tiny Audio model and write a self-contained HTML page showing every stage.

    python docs/trace_data.py --model MODEL --audio FILE [--out data_trace.html]

Stages: waveform -> encoder input (log-mel spectrogram for Whisper, normalised samples for wav2vec-style
encoders) -> encoder frames -> projector output (one LLM input embedding per audio token) -> the LLM's
nearest vocabulary tokens to each audio embedding, and for a model trained with the CTC loss what its CTC head
reads there -> transcript. Images are inlined PNGs, so the page can be mailed, opened offline or printed.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import re
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch
from transformers import Pipeline, pipeline

from decoding_tiny_audio import embedding_ctc_logits

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HEATMAP_DIMS = 64
HEATMAP_TICKS = 16  # dimension ids labelled on a heatmap's side
TOP_TOKENS = 3
MAX_FRAME_TICKS = 200  # encoder frame boundaries drawn under the samples up to this many
SECTIONS = {
    "waveform": "1. Waveform",
    "features": "2. Encoder input",
    "encoder": "3. Encoder output",
    "projector": "4. Projector output",
    "nearest-tokens": "5. What the LLM sees: nearest vocabulary tokens",
    "shapes": "6. Shapes at each stage",
    "transcript": "7. Transcript",
}


@dataclass
class Trace:
    """Every intermediate tensor of one clip (batch dimension dropped), plus what the page says about them."""

    audio: np.ndarray
    sampling_rate: int
    left_out_seconds: float  # audio after the first chunk, which the trace does not follow
    mel: bool
    features: np.ndarray  # [n_mels, frames] or [samples]
    feature_valid: int
    encoder: np.ndarray  # [frames, D_enc]
    encoder_valid: int
    projected: np.ndarray  # [tokens, D_llm]
    projected_valid: int
    downsample: int  # encoder frames per audio token
    neighbours: list[list[tuple[str, float]]]  # per valid audio token: (token text, cosine) best first
    token_embedding_norm: float  # mean L2 norm of the LLM's input embeddings, for scale
    ctc: CTCReading | None  # what the CTC head reads, for a model trained with the CTC loss
    prompt: str  # the LLM prompt, audio placeholder run collapsed
    prompt_tokens: int
    audio_placeholders: int
    transcript_tokens: int
    transcript: str


@dataclass
class CTCReading:
    """The CTC head's best token for every audio token (greedy path), and that path read out as text."""

    blank: str  # the blank token's text (a space by default)
    path: list[str | None]  # per valid audio token: the token's text, None for the blank
    text: str  # the non-blank tokens with repeats merged, decoded

    @property
    def blank_frames(self) -> int:
        return sum(token is None for token in self.path)


def read_ctc_path(path: list[int], blank_id: int, decode) -> CTCReading:
    """Greedy CTC read-out of per-frame token ids: runs of one token merged, then the blanks dropped."""
    merged = [token for index, token in enumerate(path) if index == 0 or token != path[index - 1]]
    return CTCReading(
        blank=decode([blank_id]),
        path=[None if token == blank_id else decode([token]) for token in path],
        text=decode([token for token in merged if token != blank_id]),
    )


def first_chunk(asr, path: Path) -> tuple[np.ndarray, float]:
    """The first piece of the file the ASR pipeline would transcribe (decoded, mono, resampled, cut at a pause
    within the encoder window), and how many seconds of audio follow it."""
    chunks = asr.preprocess(str(path))
    first = next(chunks)
    end = first.end
    for chunk in chunks:
        end = chunk.end
    return first.samples, end - first.end


@torch.inference_mode()
def trace_clip(
    asr: Pipeline,
    audio: np.ndarray,
    task: str = "transcribe",
    top_k: int = TOP_TOKENS,
    max_new_tokens: int | None = None,
    left_out_seconds: float = 0.0,
) -> Trace:
    """Runs one clip (mono, at the processor's rate, at most one encoder window: see `first_chunk`) stage by
    stage through the model's own public steps (encode_audio, project_audio); the transcript comes from the
    ASR pipeline itself, so it is the one the demo and eval.py would give."""
    model, processor = asr.model.eval(), asr.processor
    rate = processor.sampling_rate
    inputs = processor(audio=audio, sampling_rate=rate, task=task, return_tensors="pt").to(model.device)
    features, features_mask = inputs["input_features"], inputs["input_features_mask"]
    encoder, encoder_mask = model.encode_audio(features, features_mask)
    projected, projected_mask = model.project_audio(encoder, encoder_mask)
    projected_valid = int(projected_mask[0].sum())

    table = model.get_input_embeddings().weight.float()
    audio_vectors = projected[0, :projected_valid].float()
    similarity = (
        torch.nn.functional.normalize(audio_vectors, dim=-1) @ torch.nn.functional.normalize(table, dim=-1).T
    )
    scores, ids = similarity.topk(top_k, dim=-1)
    blank_id = model.config.ctc_blank_token_id
    ctc = None
    if (
        blank_id is not None
    ):  # trained with the CTC loss: its head scores tokens by distance to their embedding
        logits = embedding_ctc_logits(audio_vectors, table, table.pow(2).sum(-1))
        ctc = read_ctc_path(logits.argmax(-1).tolist(), blank_id, processor.tokenizer.decode)
    tokens = [processor.tokenizer.decode([token_id]) for token_id in ids.flatten().tolist()]
    neighbours = [
        list(zip(tokens[row * top_k : (row + 1) * top_k], scores[row].tolist(), strict=True))
        for row in range(projected_valid)
    ]

    budget = (
        {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
    )  # default: follows the audio
    transcript = asr(audio, prompt=processor.instruction(task, None), **budget)["text"]
    audio_token_id = processor.tokenizer.convert_tokens_to_ids(processor.audio_token)
    return Trace(
        audio=audio,
        sampling_rate=rate,
        left_out_seconds=left_out_seconds,
        mel=processor.uses_mel_features,
        features=features[0].float().cpu().numpy(),
        feature_valid=int(features_mask[0].sum()),
        encoder=encoder[0].float().cpu().numpy(),
        encoder_valid=int(encoder_mask[0].sum()),
        projected=projected[0].float().cpu().numpy(),
        projected_valid=projected_valid,
        downsample=model.config.projector_downsample,
        neighbours=neighbours,
        token_embedding_norm=float(table.norm(dim=-1).mean()),
        ctc=ctc,
        prompt=re.sub(
            f"({re.escape(processor.audio_token)})+",
            lambda run: f"{processor.audio_token} x {len(run.group(0)) // len(processor.audio_token)}",
            processor.tokenizer.decode(inputs["input_ids"][0]),
        ),
        prompt_tokens=inputs["input_ids"].shape[1],
        audio_placeholders=int((inputs["input_ids"][0] == audio_token_id).sum()),
        transcript_tokens=len(processor.tokenizer(transcript, add_special_tokens=False)["input_ids"]),
        transcript=transcript,
    )


# ---- pictures ------------------------------------------------------------------------------------------------


def _png(figure: plt.Figure) -> str:
    """The figure as an inline <img> (base64 PNG), so the page stays a single file."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="" src="data:image/png;base64,{encoded}">'


def _mark_padding(axis: plt.Axes, valid: int, total: int) -> None:
    if valid < total:
        axis.axvspan(valid, total, color="grey", alpha=0.35, hatch="//", label="padding")
        axis.legend(loc="upper right")


def waveform_image(trace: Trace) -> str:
    figure, axis = plt.subplots(figsize=(10, 2.2))
    seconds = np.arange(trace.audio.size) / trace.sampling_rate
    axis.plot(seconds, trace.audio, linewidth=0.5)
    axis.set(xlabel="seconds", ylabel="amplitude", xlim=(0, max(seconds[-1], 1e-3)))
    return _png(figure)


def features_image(trace: Trace) -> str:
    """Log-mel spectrogram (Whisper) or the normalised samples the wav2vec-style encoder reads, padding marked."""
    figure, axis = plt.subplots(figsize=(10, 3))
    if trace.mel:
        image = axis.imshow(
            trace.features, origin="lower", aspect="auto", cmap="magma", interpolation="nearest"
        )
        figure.colorbar(image, ax=axis, label="log-mel")
        axis.set(xlabel="mel frame (10 ms)", ylabel="mel bin")
        _mark_padding(axis, trace.feature_valid, trace.features.shape[-1])
    else:
        axis.plot(trace.features, linewidth=0.5)
        axis.set(xlabel="sample", ylabel="normalised amplitude", xlim=(0, trace.features.size))
        if trace.encoder_valid <= MAX_FRAME_TICKS:
            edges = np.linspace(0, trace.feature_valid, trace.encoder_valid + 1)
            axis.vlines(edges, 0, 0.05, color="red", linewidth=0.5, transform=axis.get_xaxis_transform())
        _mark_padding(axis, trace.feature_valid, trace.features.size)
    return _png(figure)


def heatmap(matrix: np.ndarray, valid: int, xlabel: str) -> tuple[str, dict[str, str]]:
    """Time x the HEATMAP_DIMS most active dimensions (largest mean |value| over real frames), most active on top
    and labelled with their dimension ids, with stats.

    Only a strip of the padding is drawn (a 1 s clip in Whisper's 30 s window would otherwise be a sliver).
    """
    real = matrix[:valid]
    dims = np.argsort(-np.abs(real).mean(axis=0), kind="stable")[:HEATMAP_DIMS]
    shown = min(matrix.shape[0], valid + max(valid // 4, 4))
    figure, axis = plt.subplots(figsize=(10, 3.2))
    limit = float(np.abs(real[:, dims]).max()) or 1.0
    image = axis.imshow(
        matrix[:shown, dims].T, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest"
    )
    figure.colorbar(image, ax=axis)
    rows = np.arange(0, len(dims), max(1, len(dims) // HEATMAP_TICKS))
    axis.set_yticks(rows, [str(dims[row]) for row in rows], fontsize=7)
    hidden = matrix.shape[0] - shown
    axis.set(
        xlabel=xlabel + (f"; {hidden} more padding frames not drawn" if hidden else ""),
        ylabel=f"dimension: the {len(dims)} most active\nof {matrix.shape[1]}, most active on top",
    )
    _mark_padding(axis, valid, shown)
    stats = {
        "shape": f"{matrix.shape[0]} x {matrix.shape[1]} ({valid} real, {matrix.shape[0] - valid} padding)",
        "mean": f"{real.mean():.4f}",
        "std": f"{real.std():.4f}",
        "min / max": f"{real.min():.4f} / {real.max():.4f}",
        "mean L2 norm per frame": f"{np.linalg.norm(real, axis=-1).mean():.3f}",
    }
    return _png(figure), stats


# ---- the page ------------------------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
section { margin-bottom: 2.5em; } img { max-width: 100%; }
table { border-collapse: collapse; font-size: 0.92em; } td, th { border: 1px solid #ccc; padding: 3px 8px; }
th { background: #f3f3f3; text-align: left; } .tok { font-family: ui-monospace, monospace; }
.nearest { max-height: 420px; overflow-y: auto; display: inline-block; }
.blank { color: #888; font-style: italic; }
@media print {
  .nearest { max-height: none; overflow: visible; }  /* every row on paper, not a scroll box's first screen */
  section { break-inside: auto; } tr { break-inside: avoid; }
}
.transcript { font-size: 1.2em; padding: 0.8em; background: #f6f8fa; border-left: 4px solid #4a7; }
.note { color: #a60; }
"""


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...] | None = None) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(cell)}</th>" for cell in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _section(key: str, *parts: str) -> str:
    return f'<section id="{key}"><h2>{SECTIONS[key]}</h2>{"".join(parts)}</section>'


def _token_html(token: str | None, ctc: CTCReading | None) -> str:
    """A token as its repr; the CTC blank (None on a CTC path, or the blank's text) named as such."""
    if ctc is not None and token in (None, ctc.blank):
        return f'<span class="blank">blank</span> <span class="tok">{html.escape(repr(ctc.blank))}</span>'
    return f'<span class="tok">{html.escape(repr(token))}</span>'


def ctc_runs(ctc: CTCReading) -> str:
    """The CTC path with each run of one token shown once, with its length: blank x3, ' the' x2, ..."""
    runs: list[list] = []
    for token in ctc.path:
        if runs and runs[-1][0] == token:
            runs[-1][1] += 1
        else:
            runs.append([token, 1])
    return " ".join(
        (
            '<span class="blank">blank</span>'
            if token is None
            else f'<span class="tok">{html.escape(repr(token))}</span>'
        )
        + (f" x{count}" if count > 1 else "")
        for token, count in runs
    )


def ctc_explanation(trace: Trace) -> str:
    """What the nearest tokens mean: for a CTC-trained model, what its CTC head reads; otherwise only a region."""
    ctc = trace.ctc
    if ctc is None:
        return (
            "<p>This model was trained without the CTC loss: nothing pulls its audio tokens onto the embeddings of "
            "real tokens, so these show only which region of the vocabulary each piece of audio lands nearest "
            "to.</p>"
        )
    blank = html.escape(repr(ctc.blank))
    return (
        "<p>This model was trained with the CTC loss, which pulls each audio token onto the LLM input embedding "
        f'of the token it speaks, or onto the embedding of <span class="tok">{blank}</span>, the CTC '
        "<em>blank</em>, where it speaks nothing new. Here that token stands for no space: it means "
        f"&ldquo;nothing new here&rdquo;, and the CTC head reads blank at {ctc.blank_frames} of the "
        f"{len(ctc.path)} audio tokens. The head scores a token by its distance to the audio token (the last "
        "column), the table's ranks by cosine, so the two can differ.</p>"
        "<p>The CTC path read out as text (the non-blank tokens, repeats merged):</p>"
        f'<p class="transcript">{html.escape(ctc.text) or "<em>(nothing but blanks)</em>"}</p>'
        f'<p>The path itself, each run of one token shown once: <span class="path">{ctc_runs(ctc)}</span></p>'
    )


def render_html(trace: Trace, model_name: str, audio_name: str) -> str:
    seconds = trace.audio.size / trace.sampling_rate
    frame_seconds = seconds / max(trace.encoder_valid, 1)
    per_token = frame_seconds * trace.downsample
    encoder_png, encoder_stats = heatmap(
        trace.encoder, trace.encoder_valid, f"encoder frame ({frame_seconds * 1000:.0f} ms)"
    )
    projector_png, projector_stats = heatmap(
        trace.projected, trace.projected_valid, f"audio token ({per_token * 1000:.0f} ms)"
    )
    projector_stats["LLM token embedding mean L2 norm"] = f"{trace.token_embedding_norm:.3f}"
    stats_table = lambda stats: _table([(html.escape(k), html.escape(v)) for k, v in stats.items()])  # noqa: E731

    neighbour_rows = [
        (
            str(step),
            f"{step * per_token:.2f}-{(step + 1) * per_token:.2f} s",
            *(f"{_token_html(token, trace.ctc)} {score:.3f}" for token, score in tokens),
            *([_token_html(trace.ctc.path[step], trace.ctc)] if trace.ctc else []),
        )
        for step, tokens in enumerate(trace.neighbours)
    ]
    neighbour_header = (
        "step",
        "audio",
        *(f"#{rank + 1} (cosine)" for rank in range(len(trace.neighbours[0]))),
        *(["CTC head reads"] if trace.ctc else []),
    )
    if trace.mel:
        features_text = (
            f"Log-mel spectrogram: {trace.features.shape[0]} mel bins x {trace.features.shape[1]} frames of 10 ms; "
            f"{trace.feature_valid} hold the clip, the rest is padding up to the encoder's fixed window."
        )
        feature_shape = (
            f"{trace.features.shape[0]} x {trace.features.shape[1]} ({trace.feature_valid} real frames)"
        )
    else:
        features_text = (
            "This encoder reads raw samples, so there is no mel spectrogram: shown is the normalised waveform it "
            f"receives ({trace.features.size} samples), which its convolutions cut into {trace.encoder_valid} "
            "encoder frames" + (" (red ticks)." if trace.encoder_valid <= MAX_FRAME_TICKS else ".")
        )
        feature_shape = f"{trace.features.size} samples ({trace.feature_valid} real)"
    shapes = [
        ("audio samples", f"{trace.audio.size} @ {trace.sampling_rate} Hz = {seconds:.2f} s"),
        ("encoder input" + (" (mel frames)" if trace.mel else " (samples)"), feature_shape),
        (
            "encoder frames",
            f"{trace.encoder.shape[0]} x {trace.encoder.shape[1]} ({trace.encoder_valid} real)",
        ),
        (
            "audio tokens (projector)",
            f"{trace.projected.shape[0]} x {trace.projected.shape[1]} ({trace.projected_valid} real)",
        ),
        ("prompt tokens", f"{trace.prompt_tokens} ({trace.audio_placeholders} audio placeholders)"),
        ("transcript text tokens", str(trace.transcript_tokens)),
    ]
    notes = []
    if trace.left_out_seconds:
        notes.append(
            f"Traced: the first chunk of the file. The ASR pipeline transcribes the remaining "
            f"{trace.left_out_seconds:.1f} s in further chunks of at most one encoder window each."
        )
    body = [
        f"<h1>Tiny Audio data trace</h1><p>Model <code>{html.escape(model_name)}</code>, "
        f"audio <code>{html.escape(audio_name)}</code>.</p>",
        *(f'<p class="note">{html.escape(note)}</p>' for note in notes),
        _section(
            "waveform", f"<p>{seconds:.2f} s at {trace.sampling_rate} Hz, mono.</p>", waveform_image(trace)
        ),
        _section("features", f"<p>{html.escape(features_text)}</p>", features_image(trace)),
        _section(
            "encoder",
            "<p>The frozen encoder's last hidden state: one vector per frame.</p>",
            encoder_png,
            stats_table(encoder_stats),
        ),
        _section(
            "projector",
            "<p>The trainable projector stacks neighbouring frames and maps them into the LLM's embedding space: "
            "each row below replaces one audio placeholder token of the prompt.</p>",
            projector_png,
            stats_table(projector_stats),
        ),
        _section(
            "nearest-tokens",
            "<p>For each audio token, the LLM input-embedding rows with the highest cosine similarity.</p>",
            ctc_explanation(trace),
            "<p>The prompt the LLM reads, audio placeholders collapsed:</p>",
            f"<pre>{html.escape(trace.prompt)}</pre>",
            f'<div class="nearest">{_table(neighbour_rows, neighbour_header)}</div>',
        ),
        _section("shapes", _table(shapes, ("stage", "shape"))),
        _section(
            "transcript", f'<p class="transcript">{html.escape(trace.transcript) or "<em>(empty)</em>"}</p>'
        ),
    ]
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Tiny Audio data trace</title>'
        f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="Tiny Audio checkpoint folder or Hub id")
    parser.add_argument("--audio", required=True, type=Path, help="audio file (WAV, FLAC, MP3, OGG)")
    parser.add_argument("--out", type=Path, default=Path("data_trace.html"))
    parser.add_argument("--task", default="transcribe", help="stored task prompt to use")
    parser.add_argument(
        "--max-new-tokens", type=int, help="transcript length cap (default: scales with audio)"
    )
    args = parser.parse_args(argv)

    asr = pipeline("automatic-speech-recognition", model=args.model, trust_remote_code=True)
    audio, left_out = first_chunk(asr, args.audio)
    trace = trace_clip(
        asr,
        audio,
        task=args.task,
        max_new_tokens=args.max_new_tokens,
        left_out_seconds=left_out,
    )
    args.out.write_text(render_html(trace, args.model, args.audio.name), encoding="utf-8")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
