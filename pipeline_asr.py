"""Speech recognition pipeline for Tiny Audio.

`transformers.pipeline("automatic-speech-recognition", model=CHECKPOINT, trust_remote_code=True)` resolves to
`TinyAudioASRPipeline` through the checkpoint's `config.custom_pipelines`. On top of the stock pipeline it:

* decodes files/bytes with soundfile (WAV, FLAC, OGG, MP3) block by block, downmixes and resamples on the fly, so a
  long recording never sits in memory at its native rate;
* cuts audio longer than the encoder window at the quietest point near the window's end: chunks do not overlap, so
  the stitched text has nothing to reconcile and no word is transcribed twice;
* batches chunks of one or many inputs into a single `generate` call, with left-padded prompts, grouping chunks of
  similar length from a window of a few batches so that short clips do not pay for a long one's padding;
* scales `max_new_tokens` with chunk duration and stops degenerate repetition loops;
* times each word (``return_timestamps="word"``) by CTC forced alignment of the text to the audio frames over the
  model's CTC head;
* reports unreadable inputs with one clear error naming the input, or (``skip_errors=True``) as an error entry;
* optionally (``skip_non_speech=True``) gives chunks without speech empty text instead of sending them to the model,
  which otherwise reads words into silence and noise.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import soundfile as sf
import soxr
import torch
from transformers import AutomaticSpeechRecognitionPipeline
from transformers.generation.streamers import BaseStreamer

try:
    from .decoding_tiny_audio import NO_CTC_HEAD, SENTENCE_MAX_NEW_TOKENS
    from .processing_tiny_audio import TinyAudioProcessor, pcm_to_float, scale_unscaled_pcm
except ImportError:
    from decoding_tiny_audio import NO_CTC_HEAD, SENTENCE_MAX_NEW_TOKENS
    from processing_tiny_audio import TinyAudioProcessor, pcm_to_float, scale_unscaled_pcm

# Blocks read from a file per step; bounds memory while streaming a long recording.
READ_BLOCK_SECONDS = 10.0
# A cut is placed at the lowest-energy point within this many seconds before the window's end.
CUT_SEARCH_SECONDS = 5.0
# Energy is measured over frames of this length, smoothed over CUT_SMOOTH_FRAMES frames.
CUT_FRAME_SECONDS = 0.02
CUT_SMOOTH_FRAMES = 5
# Chunks held and sorted by length before batching, in batches: a prompt carries ~12 audio tokens per second, so a
# batch of short clips with one 30 s chunk would otherwise run every row at the long one's length.
SORT_WINDOW_BATCHES = 4
# A chunk counts as speech when the voice-activity detector finds at least this much of it. Silero's default of
# 250 ms misses a word said alone: 3 of the 552 real-speech clips ("third", "eighth", "l").
MIN_SPEECH_MS = 100
# CTC puts a token on one or two frames (a spike), a little after its onset, so the spikes say which sound is which
# word but not where it starts and ends: a word starts where the sound heard at its spike began (after a pause of
# WORD_PAUSE_SECONDS, or else where the previous word ended) and ends where the sound goes quiet for at least
# WORD_PAUSE_SECONDS after its last token, at the latest where the next word starts. Quiet is QUIET_DB under the chunk's loudest 10 ms, or, in a noisy recording
# whose background is louder than that, within NOISE_MARGIN_DB of the background (the chunk's NOISE_PERCENTILE
# quietest frame).
QUIET_DB = 35.0
NOISE_MARGIN_DB = 6.0
NOISE_PERCENTILE = 5
WORD_PAUSE_SECONDS = 0.05
LEVEL_FRAME_SECONDS = 0.01
PAUSE_FRAMES = max(1, round(WORD_PAUSE_SECONDS / LEVEL_FRAME_SECONDS))


class AudioInputError(ValueError):
    """An input that cannot be turned into audio; the message names the input and the reason."""


class NonFiniteAudioError(ValueError):
    """Samples that are NaN or infinite (training counts such clips apart from unreadable ones)."""


class NoSamplesError(ValueError):
    """Audio that decodes to zero samples (training counts such clips as empty, not unreadable)."""


def describe_input(source: Any) -> str:
    """Short human-readable name of an input for error messages."""
    if isinstance(source, (str, os.PathLike)):
        return repr(os.fspath(source))
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return f"<{type(source).__name__} shape={tuple(source.shape)} dtype={source.dtype}>"
    if isinstance(source, dict):
        path = source.get("path")
        return f"<dict path={path!r}>" if path else f"<dict keys={sorted(map(str, source))}>"
    return f"<{type(source).__name__}>"


# ---------------------------------------------------------------------------------------------------------------
# Decoding: any supported input -> (sampling rate, iterator of mono float32 blocks)
# ---------------------------------------------------------------------------------------------------------------


def to_mono_float(samples: np.ndarray) -> np.ndarray:
    """Integer PCM -> float in [-1, 1); (channels, n) or (n, channels) -> mean over the (shorter) channel axis."""
    samples = np.asarray(samples)
    if samples.dtype.kind in "iu":
        samples = pcm_to_float(samples)
    elif samples.dtype.kind != "f":
        raise ValueError(f"audio samples must be integer or float, got dtype {samples.dtype}")
    if samples.ndim == 2:
        samples = samples.mean(axis=0 if samples.shape[0] <= samples.shape[1] else 1)
    elif samples.ndim != 1:
        raise ValueError(f"audio must be 1-D (mono) or 2-D (stereo), got shape {samples.shape}")
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    if not np.isfinite(samples).all():
        raise NonFiniteAudioError("audio contains NaN or infinite values")
    return samples


def _array_blocks(samples: np.ndarray, block: int) -> Iterator[np.ndarray]:
    for start in range(0, len(samples), block):
        yield samples[start : start + block]


def _soundfile_blocks(opened: sf.SoundFile) -> Iterator[np.ndarray]:
    with opened:
        block = int(opened.samplerate * READ_BLOCK_SECONDS)
        for frames in opened.blocks(blocksize=block, dtype="float32", always_2d=True):
            yield to_mono_float(frames.T)


def _open_encoded(data: str | bytes, target_rate: int) -> tuple[int, Iterator[np.ndarray]]:
    """Open a file path or encoded bytes with soundfile; ffmpeg (when installed) covers other formats."""
    # libsndfile's own reason misleads here ("File does not exist ... (possibly a pipe?)" for a text file).
    what = "the file holds" if isinstance(data, str) else "the bytes hold"
    readers = f"libsndfile {sf.__libsndfile_version__} reads WAV, FLAC, OGG and MP3"
    try:
        opened = sf.SoundFile(data if isinstance(data, str) else io.BytesIO(data))
    except sf.LibsndfileError:
        if shutil.which("ffmpeg") is None:
            raise ValueError(
                f"{what} no audio that soundfile can read ({readers}); install ffmpeg for other formats"
            ) from None
        from transformers.pipelines.audio_utils import ffmpeg_read

        if isinstance(data, str):
            with open(data, "rb") as handle:
                data = handle.read()
        try:
            samples = ffmpeg_read(data, target_rate)
        except ValueError:
            raise ValueError(f"{what} no audio that soundfile or ffmpeg can read ({readers})") from None
        return target_rate, _array_blocks(samples, int(target_rate * READ_BLOCK_SECONDS))
    return opened.samplerate, _soundfile_blocks(opened)


def checked_sampling_rate(value: Any) -> int:
    """A sampling rate as a positive whole number of Hz; anything else (0, "8000", True) is refused, not guessed."""
    whole = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not whole or not float(value).is_integer() or value <= 0:
        raise ValueError(
            f"sampling_rate must be a positive whole number of Hz, e.g. 16000; got {value!r} ({type(value).__name__})"
        )
    return int(value)


def decode_audio(
    source: Any, target_rate: int, sampling_rate: int | None = None
) -> tuple[int, Iterator[np.ndarray]]:
    """Return the source's sampling rate and its mono float32 blocks (lazily decoded for files and bytes).

    ``sampling_rate`` is the rate of a bare array/tensor input (default: ``target_rate``).
    Raises ValueError/TypeError without the input's name; `iter_chunks` adds it.
    """
    if sampling_rate is not None:
        sampling_rate = checked_sampling_rate(sampling_rate)
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, str):
        if source.startswith(("http://", "https://")):
            raise ValueError("URLs are not fetched: download the file first and pass its path or its bytes")
        if os.path.isdir(source):
            raise IsADirectoryError("this is a folder, not an audio file")
        if not os.path.isfile(source):
            raise FileNotFoundError("file not found")
        if os.path.getsize(source) == 0:
            raise ValueError("file is empty (0 bytes)")
        return _open_encoded(source, target_rate)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ValueError("empty bytes")
        return _open_encoded(bytes(source), target_rate)
    if isinstance(source, dict):
        return _decode_dict(source, target_rate)
    # A torchcodec AudioDecoder: what `datasets` >= 4 yields for a decoded Audio column.
    if hasattr(source, "get_all_samples"):
        decoded = source.get_all_samples()
        return int(decoded.sample_rate), _tensor_blocks(decoded.data, target_rate)
    if isinstance(source, (np.ndarray, torch.Tensor)):
        rate = target_rate if sampling_rate is None else sampling_rate
        return rate, _tensor_blocks(source, rate)
    raise TypeError(
        f"unsupported input type {type(source).__name__}; expected a file path, bytes, a numpy array or torch "
        "tensor, a {'raw'|'array': ..., 'sampling_rate': ...} dict, or a datasets Audio value"
    )


def _tensor_blocks(samples: np.ndarray | torch.Tensor, rate: int) -> Iterator[np.ndarray]:
    if isinstance(samples, torch.Tensor):
        samples = samples.detach().cpu()
        samples = (samples.float() if samples.is_floating_point() else samples).numpy()
    return _array_blocks(scale_unscaled_pcm(to_mono_float(samples)), int(rate * READ_BLOCK_SECONDS))


def _decode_dict(source: dict, target_rate: int) -> tuple[int, Iterator[np.ndarray]]:
    """`{"raw"|"array", "sampling_rate"}` (also a decoded datasets row) or an undecoded datasets `{"bytes", "path"}`."""
    samples = source.get("raw", source.get("array"))
    if samples is not None:
        if "sampling_rate" not in source:
            raise ValueError("dict with 'raw'/'array' needs a 'sampling_rate' key")
        rate = checked_sampling_rate(source["sampling_rate"])
        return rate, _tensor_blocks(samples, rate)
    if source.get("bytes"):
        return decode_audio(source["bytes"], target_rate)
    if source.get("path"):
        return decode_audio(source["path"], target_rate)
    raise ValueError(
        "dict input needs 'raw' or 'array' plus 'sampling_rate', or a datasets Audio value with 'bytes'/'path'"
    )


def resample_blocks(blocks: Iterable[np.ndarray], in_rate: int, out_rate: int) -> Iterator[np.ndarray]:
    """Stream-resample with soxr so only one block at a time is held at the input rate."""
    if in_rate == out_rate:
        yield from blocks
        return
    stream = soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32")
    for block in blocks:
        out = stream.resample_chunk(block, last=False)
        if len(out):
            yield out
    tail = stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
    if len(tail):
        yield tail


# ---------------------------------------------------------------------------------------------------------------
# Chunking: cut at the quietest point before the window's end, no overlap
# ---------------------------------------------------------------------------------------------------------------


def find_cut(samples: np.ndarray, rate: int, max_len: int) -> int:
    """Index in (max_len - search, max_len] where the smoothed frame energy is lowest (a pause, if there is one)."""
    frame = max(1, int(rate * CUT_FRAME_SECONDS))
    search = min(int(rate * CUT_SEARCH_SECONDS), max_len // 2) // frame * frame
    if search < frame * CUT_SMOOTH_FRAMES:
        return max_len
    region = samples[max_len - search : max_len]
    energy = np.square(region.reshape(-1, frame), dtype=np.float64).mean(axis=1)
    smooth = np.convolve(energy, np.ones(CUT_SMOOTH_FRAMES) / CUT_SMOOTH_FRAMES, mode="same")
    # Among (near-)equal minima take the middle one, i.e. the centre of a silent stretch.
    quiet = np.flatnonzero(smooth <= smooth.min() + 1e-12)
    best = int(quiet[len(quiet) // 2])
    return max_len - search + best * frame + frame // 2


@dataclass
class AudioChunk:
    """One piece of an input, at the model's sampling rate."""

    samples: np.ndarray
    start: float  # seconds from the input's start
    end: float


def chunk_blocks(blocks: Iterable[np.ndarray], rate: int, max_seconds: float) -> Iterator[AudioChunk]:
    """Split a block stream into consecutive chunks of at most ``max_seconds``; they partition the audio exactly."""
    max_len = int(rate * max_seconds)
    buffer = np.zeros(0, dtype=np.float32)
    offset = 0
    for block in blocks:
        buffer = np.concatenate([buffer, block])
        while len(buffer) > max_len:
            cut = find_cut(buffer, rate, max_len)
            yield AudioChunk(buffer[:cut], offset / rate, (offset + cut) / rate)
            offset += cut
            buffer = buffer[cut:]
    if len(buffer) or offset == 0:
        if len(buffer) == 0:
            raise NoSamplesError("audio contains no samples")
        yield AudioChunk(buffer, offset / rate, (offset + len(buffer)) / rate)


def iter_chunks(
    source: Any, target_rate: int, max_seconds: float, sampling_rate: int | None = None
) -> Iterator[AudioChunk]:
    """Decode, downmix, resample and chunk one input lazily; any failure becomes an AudioInputError naming it."""
    with _naming_input(source):
        rate, blocks = decode_audio(source, target_rate, sampling_rate)
        yield from chunk_blocks(resample_blocks(blocks, rate, target_rate), target_rate, max_seconds)


def read_audio(source: Any, target_rate: int, sampling_rate: int | None = None) -> np.ndarray:
    """The whole of one input as mono float32 at ``target_rate``: the clip-at-a-time form of `decode_audio`, which
    training, evaluation, the demo and the offline kit use so that every input is read one way.

    Any failure is an AudioInputError naming the input; its ``__cause__`` says why (e.g. NonFiniteAudioError).
    """
    with _naming_input(source):
        rate, blocks = decode_audio(source, target_rate, sampling_rate)
        samples = np.concatenate([np.zeros(0, dtype=np.float32), *resample_blocks(blocks, rate, target_rate)])
        if len(samples) == 0:
            raise NoSamplesError("audio contains no samples")
    return samples


@contextlib.contextmanager
def _naming_input(source: Any) -> Iterator[None]:
    """Turn any decoding failure into one AudioInputError that names the input."""
    try:
        yield
    except (OSError, ValueError, TypeError, RuntimeError) as error:
        if isinstance(error, AudioInputError):
            raise
        raise AudioInputError(f"Cannot read audio input {describe_input(source)}: {error}") from error


# ---------------------------------------------------------------------------------------------------------------
# Voice activity: chunks without speech are not transcribed
# ---------------------------------------------------------------------------------------------------------------


class SpeechDetector:
    """Silero VAD (the `silero-vad` package, whose small model ships inside the wheel: nothing is downloaded).

    An energy or spectral-flatness rule would pass loud noise or reject quiet speech; a trained detector does
    neither, at about 15 ms of one CPU core per second of audio.
    """

    def __init__(self) -> None:
        threads = torch.get_num_threads()
        try:
            import silero_vad
        except ImportError as error:
            raise ImportError(
                "skip_non_speech=True needs the `silero-vad` package: pip install silero-vad"
            ) from error
        finally:
            torch.set_num_threads(
                threads
            )  # importing silero_vad sets torch to one thread for the whole process
        with warnings.catch_warnings():  # its loader uses APIs that torch and importlib mark deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            self._model = silero_vad.load_silero_vad()
        self._speech_timestamps = silero_vad.get_speech_timestamps

    def has_speech(self, samples: np.ndarray, rate: int) -> bool:
        """True when the clip holds at least ``MIN_SPEECH_MS`` of speech; ``rate`` is 16 kHz or 8 kHz."""
        with torch.inference_mode():
            spans = self._speech_timestamps(
                torch.from_numpy(samples),
                self._model,
                sampling_rate=rate,
                min_speech_duration_ms=MIN_SPEECH_MS,
            )
        return bool(spans)


# ---------------------------------------------------------------------------------------------------------------
# Word timestamps: the CTC head's token frames, merged into words
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimedWord:
    """A word and its time in seconds from its chunk's start (a dataclass: the pipeline's device move rebuilds
    tuples, NamedTuples included, as plain ones)."""

    text: str
    start: float
    end: float


def timed_words(
    tokenizer: Any,
    tokens: list[int],
    frames: list[tuple[int, int] | None] | None,
    frame_seconds: float,
    duration: float,
    levels: np.ndarray,
) -> list[TimedWord]:
    """The whitespace-separated words of the decoded ``tokens``, each timed from the frames of the tokens it is made
    of (``frames`` from the model's ``ctc_token_frames``). The chunk's sound (``levels``: dB per
    LEVEL_FRAME_SECONDS, from `sound_levels`) places the edges: a word starts where the sound heard at its first
    spoken token (punctuation is not spoken) began, after the previous word's end, and ends where the sound falls
    quiet after its last spoken token, at the latest where the next word starts.

    Without frames (the text holds more tokens than the audio has frames), the words share ``duration`` by length.
    """
    # Character offsets of each token in the decoded text: byte-level tokens may split a character, so decode
    # prefixes rather than single tokens.
    ends = [len(tokenizer.decode(tokens[: i + 1], skip_special_tokens=True)) for i in range(len(tokens))]
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    words = [(match.group(), match.start(), match.end()) for match in re.finditer(r"\S+", text)]
    if frames is None:
        total = sum(len(word) for word, _, _ in words) or 1
        timed, elapsed = [], 0.0
        for word, _, _ in words:
            share = duration * len(word) / total
            timed.append(TimedWord(word, elapsed, elapsed + share))
            elapsed += share
        return timed
    spans: list[tuple[int, int]] = []
    for _, first_char, last_char in words:
        inside = [
            (
                span,
                any(character.isalnum() for character in text[max(start, first_char) : min(end, last_char)]),
            )
            for span, end, start in zip(frames, ends, [0, *ends[:-1]], strict=True)
            if span is not None and start < last_char and end > first_char
        ]
        # Punctuation is not spoken: CTC places it in the pause after the word, so it times nothing when the word
        # has a spoken token.
        inside = [span for span, spoken in inside if spoken] or [span for span, _ in inside]
        # Every word holds a non-blank token; the fallback only guards odd decodings of split characters.
        spans.append(
            (min(s[0] for s in inside), max(s[1] for s in inside)) if inside else (spans or [(0, 0)])[-1]
        )
    timed: list[TimedWord] = []
    pauses = pause_starts(levels)
    following_spans = [*spans[1:], None] if spans else []  # an empty transcript has no words to time
    for (word, _, _), (first, last), following in zip(words, spans, following_spans, strict=True):
        spike = first * frame_seconds
        start = sound_onset_before(pauses, spike, earliest=timed[-1].end if timed else 0.0)
        latest = duration if following is None else max(following[0], first + 1) * frame_seconds
        end = quiet_after(pauses, last * frame_seconds, latest)
        timed.append(TimedWord(word, start, max(end, spike + frame_seconds)))
    return timed


def sound_levels(samples: np.ndarray, rate: int) -> np.ndarray:
    """Loudness in dB of each LEVEL_FRAME_SECONDS frame of a chunk."""
    frame = max(1, int(rate * LEVEL_FRAME_SECONDS))
    frames = samples[: len(samples) // frame * frame].reshape(-1, frame)
    return 10 * np.log10(np.square(frames, dtype=np.float64).mean(axis=1) + 1e-12)


def pause_starts(levels: np.ndarray) -> np.ndarray:
    """Where the chunk pauses: ``pauses[i]`` is True when the PAUSE_FRAMES level frames from i on are all quiet,
    QUIET_DB under the loudest or near the background noise. Computed once per chunk for all its words."""
    if len(levels) < PAUSE_FRAMES:
        return np.zeros(0, dtype=bool)
    background = np.percentile(levels, NOISE_PERCENTILE)
    quiet = levels < max(levels.max() - QUIET_DB, background + NOISE_MARGIN_DB)
    return np.convolve(quiet, np.ones(PAUSE_FRAMES), mode="valid") == PAUSE_FRAMES


def sound_onset_before(pauses: np.ndarray, spike: float, earliest: float) -> float:
    """Seconds where the sound heard at ``spike`` began: the end of the last pause wholly before it, no earlier
    than ``earliest`` (the previous word's end). A CTC spike comes a little after a word's onset."""
    if spike <= earliest:
        return spike
    first, last = int(earliest / LEVEL_FRAME_SECONDS), int(spike / LEVEL_FRAME_SECONDS)
    starts = np.flatnonzero(pauses[first : max(first, last - PAUSE_FRAMES + 1)]) + first
    return float(starts[-1] + PAUSE_FRAMES) * LEVEL_FRAME_SECONDS if len(starts) else earliest


def quiet_after(pauses: np.ndarray, start: float, latest: float) -> float:
    """Seconds where the sound going on at ``start`` first pauses; ``latest`` if it does not before then."""
    first, last = int(start / LEVEL_FRAME_SECONDS), int(latest / LEVEL_FRAME_SECONDS)
    found = np.flatnonzero(pauses[first:last])
    return min(latest, float(first + found[0]) * LEVEL_FRAME_SECONDS) if len(found) else latest


# ---------------------------------------------------------------------------------------------------------------
# Pipeline
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Pending:
    """Bookkeeping for one input while its chunks go through the model."""

    position: int  # the input's index in the call
    chunks: list[tuple[float, float]] = field(default_factory=list)
    texts: dict[int, str] = field(default_factory=dict)
    words: dict[int, list[TimedWord]] = field(default_factory=dict)
    done_reading: bool = False
    error: str | None = None

    def word_entries(self, index: int) -> list[dict[str, Any]]:
        """Chunk ``index``'s words as ``{"text", "timestamp"}`` in the input's time (none for a chunk not timed)."""
        start, end = self.chunks[index]
        # the model's durations count whole feature frames: a word ends no later than its chunk
        return [
            {
                "text": word.text,
                "timestamp": (round(start + word.start, 3), round(min(start + word.end, end), 3)),
            }
            for word in self.words.get(index, [])
        ]

    def chunk_entry(self, index: int, with_words: bool) -> dict[str, Any]:
        """What ``on_chunk`` receives for chunk ``index`` of this input."""
        start, end = self.chunks[index]
        entry = {
            "input": self.position,
            "chunk": index,
            "text": self.texts[index].strip(),
            "timestamp": (round(start, 3), round(end, 3)),
        }
        return entry | ({"words": self.word_entries(index)} if with_words else {})

    @property
    def complete(self) -> bool:
        return self.error is not None or (self.done_reading and len(self.texts) == len(self.chunks))


class InputStreamer(BaseStreamer):
    """Hands a user's streamer (``TextIteratorStreamer`` and the like) each input as one stream, however many chunks
    it is cut into: the first chunk's prompt only (so ``skip_prompt`` works), a space between chunks, and ``end()``
    once the input's last chunk is done, where ``generate`` would end it after every chunk."""

    def __init__(self, streamer: BaseStreamer, separator_ids: list[int]) -> None:
        self.streamer = streamer
        self.separator = torch.tensor(separator_ids, dtype=torch.long)
        self.chunks_started = 0
        self.at_prompt = True  # generate's first put of a chunk is its prompt
        self.open = True

    def start_input(self) -> None:
        self.open, self.chunks_started, self.at_prompt = True, 0, True

    def put(self, value: torch.Tensor) -> None:
        if not self.at_prompt:
            self.streamer.put(value)
            return
        self.at_prompt = False
        if self.chunks_started == 0:
            self.streamer.put(value)
        elif len(self.separator):
            self.streamer.put(self.separator)
        self.chunks_started += 1

    def end(self) -> None:
        """One chunk's generate is done; the input's stream goes on."""
        self.at_prompt = True

    def finish(self) -> None:
        """The input is done (or the call failed): end the user's stream, once."""
        if self.open:
            self.streamer.end()
        self.open = False


class TinyAudioASRPipeline(AutomaticSpeechRecognitionPipeline):
    """ASR for Tiny Audio checkpoints: long audio, batching across inputs and chunks, real audio files.

    Call options (besides the stock ones): ``sampling_rate`` (of bare array inputs), ``chunk_length_s`` (at most
    the encoder window, ``config.max_audio_seconds``), ``task`` (one of the model's ``task_prompts``, e.g.
    ``"describe"``: what the speaker and the recording sound like; default: transcribe), ``prompt`` (free instruction
    instead of the task's), ``return_timestamps=True`` (chunk-level ``chunks``) or ``"word"`` (a ``chunks`` entry per word, timed
    by the model's CTC head), ``skip_errors=True`` (a bad input yields ``{"text": "", "error": ...}`` instead of
    raising), ``skip_non_speech=True`` (chunks in which a voice-activity detector finds no speech give empty text
    without reaching the model; needs ``silero-vad``; off by default, so transcripts stay the model's own),
    ``on_chunk`` (called with each chunk's ``{"input", "chunk", "text", "timestamp"[, "words"]}`` as soon
    as it is transcribed), ``streamer`` (a ``generate`` streamer such as ``TextIteratorStreamer``, at batch size 1:
    the text as it is decoded, one stream per input however many chunks it has; decoding is then greedy unless
    ``num_beams`` is given), ``loop_guard=False`` (keep degenerate repetition loops), ``max_new_tokens`` /
    ``generate_kwargs`` (defaults: the model's generation config; the budget is its ``max_new_tokens`` plus
    ``max_new_tokens_per_second`` for each second of the longest chunk).
    Construction options: ``merge_lora=True`` folds the LoRA adapters into the LLM for faster serving;
    ``int8=True`` also quantizes the LLM's linear layers to dynamic int8 (CPU only; faster, a little less accurate).
    Either way the model cannot train again (load it anew for that), so they are for a model the pipeline loaded
    itself.
    """

    _load_processor = None  # optional: a checkpoint saved without processor files rebuilds it from its config
    _load_tokenizer = False
    _load_feature_extractor = False
    _default_generation_config = None  # the model's own generation config decides

    def __init__(
        self,
        model: Any,
        processor: TinyAudioProcessor | None = None,
        merge_lora: bool = False,
        int8: bool = False,
        **kwargs: Any,
    ) -> None:
        if merge_lora:
            model.merge_lora()
        if int8:
            model.quantize_llm_int8()
        if processor is None:
            config = model.config
            processor = TinyAudioProcessor.from_components(
                config.audio_model_id, config.text_model_id, config
            )
        kwargs.pop("tokenizer", None)
        kwargs.pop("feature_extractor", None)
        super().__init__(
            model,
            feature_extractor=processor.feature_extractor,
            tokenizer=processor.tokenizer,
            processor=processor,
            **kwargs,
        )

    def _sanitize_parameters(
        self,
        sampling_rate: int | None = None,
        chunk_length_s: float | None = None,
        prompt: str | None = None,
        task: str | None = None,
        on_chunk: Callable[[dict[str, Any]], None] | None = None,
        return_timestamps: bool | None = None,
        skip_errors: bool | None = None,
        skip_non_speech: bool | None = None,
        loop_guard: bool | None = None,
        generate_kwargs: dict | None = None,
        **kwargs: Any,
    ) -> tuple[dict, dict, dict]:
        preprocess: dict[str, Any] = {}
        if sampling_rate is not None:
            preprocess["sampling_rate"] = sampling_rate
        if chunk_length_s is not None:
            window = self.model.config.max_audio_seconds
            if not 0 < chunk_length_s <= window:
                raise ValueError(
                    f"chunk_length_s must be in (0, {window}] (the encoder window), got {chunk_length_s}"
                )
            preprocess["chunk_length_s"] = chunk_length_s
        if task is not None:  # an unknown task is refused here, naming the model's tasks
            instruction = self.processor.instruction(task, None)
            preprocess["prompt"] = instruction if prompt is None else prompt
        elif prompt is not None:
            preprocess["prompt"] = prompt
        if skip_errors is not None:
            preprocess["skip_errors"] = skip_errors
        if on_chunk is not None:
            preprocess["on_chunk"] = on_chunk
        if skip_non_speech:
            preprocess["speech_detector"] = self._speech_detector()
        if return_timestamps not in (None, True, False, "word"):
            raise ValueError(
                f"return_timestamps must be True (chunk times) or 'word' (word times), got {return_timestamps!r}"
            )
        forward = {**(generate_kwargs or {}), **kwargs}
        if task not in (
            None,
            "transcribe",
        ):  # the CTC head scores transcripts: a description is no spelling of the audio, nor as long as one
            forward.setdefault("ctc_weight", 0.0)
            forward.setdefault("max_new_tokens", SENTENCE_MAX_NEW_TOKENS)
        if loop_guard is not None:
            forward["loop_guard"] = loop_guard
        if return_timestamps == "word":
            if self.model.config.ctc_blank_token_id is None:
                raise ValueError(f"return_timestamps='word': {NO_CTC_HEAD}")
            forward["word_timestamps"] = True
        postprocess = {} if return_timestamps is None else {"return_timestamps": return_timestamps}
        return preprocess, forward, postprocess

    def _speech_detector(self) -> SpeechDetector:
        """Loaded on first use and kept: most callers never ask for it."""
        if getattr(self, "_detector", None) is None:
            self._detector = SpeechDetector()
        return self._detector

    # -- pieces of the stream ------------------------------------------------------------------------------------

    def preprocess(
        self, inputs: Any, sampling_rate: int | None = None, chunk_length_s: float | None = None, **_: Any
    ) -> Iterator[AudioChunk]:
        window = chunk_length_s or self.model.config.max_audio_seconds
        return iter_chunks(inputs, self.processor.sampling_rate, window, sampling_rate)

    def _collate(self, chunks: list[AudioChunk], prompt: str | None) -> dict[str, Any]:
        prompt_kwargs = {"prompt": prompt} if prompt is not None else {}
        batch = self.processor(
            audio=[chunk.samples for chunk in chunks],
            sampling_rate=self.processor.sampling_rate,
            return_tensors="pt",
            **prompt_kwargs,
        )
        batch = dict(batch)
        if self.dtype is not None and batch["input_features"].is_floating_point():
            batch["input_features"] = batch["input_features"].to(self.dtype)
        # for word ends (see `timed_words`); `_forward` takes it out before the model sees the batch
        batch["sound_levels"] = [
            sound_levels(chunk.samples, self.processor.sampling_rate) for chunk in chunks
        ]
        return batch

    def _forward(
        self,
        model_inputs: dict[str, Any],
        loop_guard: bool = True,
        word_timestamps: bool = False,
        **generate_kwargs: Any,
    ) -> dict[str, list]:
        levels = model_inputs.pop("sound_levels", None)
        # Without max_new_tokens, the model's generate sizes the budget from the longest chunk in the batch.
        generate_kwargs = self._prepare_generate_kwargs(generate_kwargs)
        # The model's generate guards against repetition loops and pads out the loop it stopped.
        sequences = self.model.generate(**model_inputs, loop_guard=loop_guard, **generate_kwargs)
        new_tokens = sequences[:, model_inputs["input_ids"].shape[1] :]
        special = set(self.tokenizer.all_special_ids)
        cleaned = [[t for t in row if t not in special] for row in new_tokens.tolist()]
        outputs: dict[str, list] = {"text": self.processor.batch_decode(cleaned, skip_special_tokens=True)}
        if word_timestamps:
            features_mask = model_inputs["input_features_mask"]
            frames = self.model.ctc_token_frames(model_inputs["input_features"], features_mask, cleaned)
            durations = self.model.feature_seconds(features_mask).tolist()
            frame_seconds = self.model.config.audio_token_seconds
            outputs["words"] = [
                timed_words(self.tokenizer, tokens, spans, frame_seconds, duration, chunk_levels)
                for tokens, spans, duration, chunk_levels in zip(
                    cleaned, frames, durations, levels, strict=True
                )
            ]
        return outputs

    def postprocess(self, pending: _Pending, return_timestamps: bool = False) -> dict[str, Any]:  # type: ignore[override]
        if pending.error is not None:
            return {"text": "", "error": pending.error}
        texts = [pending.texts[i].strip() for i in range(len(pending.chunks))]
        result: dict[str, Any] = {"text": " ".join(text for text in texts if text)}
        if return_timestamps == "word":
            result["chunks"] = [
                word for index in range(len(pending.chunks)) for word in pending.word_entries(index)
            ]
        elif return_timestamps:
            result["chunks"] = [
                {"text": text, "timestamp": (round(start, 3), round(end, 3))}
                for text, (start, end) in zip(texts, pending.chunks, strict=True)
            ]
        return result

    # -- the stream ------------------------------------------------------------------------------------------------

    def get_iterator(
        self,
        inputs: Iterable[Any],
        num_workers: int,
        batch_size: int,
        preprocess_params: dict,
        forward_params: dict,
        postprocess_params: dict,
    ) -> Iterator[dict[str, Any]]:
        """Chunks of consecutive inputs fill a window of ``SORT_WINDOW_BATCHES`` batches, transcribed shortest first
        in batches of ``batch_size``; results come out in input order as soon as every chunk of an input is
        transcribed. Only one window of chunks is held at a time; at batch size 1 a window is one chunk, since
        sorting only saves padding inside a batch."""
        preprocess_params, forward_params = dict(preprocess_params), dict(forward_params)
        skip_errors = preprocess_params.pop("skip_errors", False)
        prompt = preprocess_params.pop("prompt", None)
        on_chunk = preprocess_params.pop("on_chunk", None)
        streamer = None
        if forward_params.get("streamer") is not None:
            if batch_size > 1:
                raise ValueError(
                    "a streamer follows one sequence at a time: call the pipeline with batch_size=1"
                )
            separator = self.tokenizer(" ", add_special_tokens=False)["input_ids"]
            streamer = forward_params["streamer"] = InputStreamer(forward_params["streamer"], separator)
            forward_params.setdefault("num_beams", 1)  # generate streams greedy and sampled decoding only
        detector: SpeechDetector | None = preprocess_params.pop("speech_detector", None)
        order: deque[_Pending] = deque()
        window: list[tuple[_Pending, int, AudioChunk]] = []
        window_size = batch_size * SORT_WINDOW_BATCHES if batch_size > 1 else 1

        def run_window() -> None:
            window.sort(key=lambda item: item[2].samples.size)
            for start in range(0, len(window), batch_size):
                batch = window[start : start + batch_size]
                model_inputs = self._collate([chunk for _, _, chunk in batch], prompt)
                outputs = self.forward(model_inputs, **forward_params)
                for row, (pending, index, _) in enumerate(batch):
                    pending.texts[index] = outputs["text"][row]
                    if "words" in outputs:
                        pending.words[index] = outputs["words"][row]
                    report(pending, index)
            window.clear()

        def report(pending: _Pending, index: int) -> None:
            if on_chunk is not None:
                on_chunk(pending.chunk_entry(index, with_words=bool(forward_params.get("word_timestamps"))))

        def drain() -> Iterator[dict[str, Any]]:
            while order and order[0].complete:
                yield self.postprocess(order.popleft(), **postprocess_params)

        try:
            for position, source in enumerate(inputs):
                pending = _Pending(position)
                order.append(pending)
                if streamer is not None:
                    streamer.start_input()
                try:
                    for chunk in self.preprocess(source, **preprocess_params):
                        pending.chunks.append((chunk.start, chunk.end))
                        index = len(pending.chunks) - 1
                        if detector is not None and not detector.has_speech(
                            chunk.samples, self.processor.sampling_rate
                        ):
                            pending.texts[index] = ""
                            report(pending, index)
                            continue
                        window.append((pending, index, chunk))
                        if len(window) >= window_size:
                            run_window()
                            yield from drain()
                except AudioInputError as error:
                    if not skip_errors:
                        raise
                    pending.error = str(error)
                    window[:] = [item for item in window if item[0] is not pending]
                pending.done_reading = True
                if streamer is not None:  # at batch size 1 every chunk of the input has been transcribed
                    streamer.finish()
                yield from drain()
            if window:
                run_window()
            yield from drain()
        finally:  # a consumer waiting on the streamer must not wait forever when a call fails
            if streamer is not None:
                streamer.finish()
