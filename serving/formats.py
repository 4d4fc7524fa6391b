"""The response formats of OpenAI's transcription API, built from the ASR pipeline's output.

`json` and `text` need only the transcript. `verbose_json`, `srt` and `vtt` need timed segments: with word
timestamps (`pipeline(..., return_timestamps="word")`) the words are grouped into subtitle-sized segments,
without them each pipeline chunk (at most one encoder window, cut at a pause) is one segment.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

RESPONSE_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
# A segment built from words ends after a sentence, at a pause, or before it grows past a subtitle's length.
SEGMENT_MAX_SECONDS = 10.0
SEGMENT_MAX_CHARACTERS = 84  # two subtitle lines of 42 characters
SEGMENT_PAUSE_SECONDS = 1.0
SENTENCE_ENDS = (".", "?", "!")


@dataclass
class Segment:
    start: float
    end: float
    text: str


@dataclass
class Word:
    word: str
    start: float
    end: float


def words_from_chunks(chunks: Sequence[dict[str, Any]]) -> list[Word]:
    """The pipeline's word chunks, ``{"text": word, "timestamp": (start, end)}``, as words."""
    return [Word(chunk["text"].strip(), *chunk["timestamp"]) for chunk in chunks if chunk["text"].strip()]


def segments_from_chunks(chunks: Sequence[dict[str, Any]]) -> list[Segment]:
    """One segment per pipeline chunk that holds text (a chunk without speech holds none)."""
    return [Segment(*chunk["timestamp"], chunk["text"].strip()) for chunk in chunks if chunk["text"].strip()]


def segments_from_words(words: Sequence[Word]) -> list[Segment]:
    """Groups words into segments that end at a sentence's end, a pause, or a subtitle's length."""
    segments: list[Segment] = []
    current: list[Word] = []
    for word in words:
        if current:
            text = " ".join(w.word for w in [*current, word])
            too_long = word.end - current[0].start > SEGMENT_MAX_SECONDS or len(text) > SEGMENT_MAX_CHARACTERS
            if too_long or word.start - current[-1].end >= SEGMENT_PAUSE_SECONDS:
                segments.append(_segment(current))
                current = []
        current.append(word)
        if word.word.endswith(SENTENCE_ENDS):
            segments.append(_segment(current))
            current = []
    if current:
        segments.append(_segment(current))
    return segments


def _segment(words: Sequence[Word]) -> Segment:
    return Segment(words[0].start, words[-1].end, " ".join(word.word for word in words))


def clock(seconds: float, decimal_mark: str) -> str:
    """HH:MM:SS,mmm (SRT) or HH:MM:SS.mmm (WebVTT)."""
    milliseconds = round(seconds * 1000)
    hours, milliseconds = divmod(milliseconds, 3_600_000)
    minutes, milliseconds = divmod(milliseconds, 60_000)
    whole, milliseconds = divmod(milliseconds, 1000)
    return f"{hours:02d}:{minutes:02d}:{whole:02d}{decimal_mark}{milliseconds:03d}"


def srt(segments: Sequence[Segment]) -> str:
    cues = [
        f"{number}\n{clock(s.start, ',')} --> {clock(s.end, ',')}\n{s.text}\n"
        for number, s in enumerate(segments, start=1)
    ]
    return "\n".join(cues)


def vtt(segments: Sequence[Segment]) -> str:
    cues = [f"{clock(s.start, '.')} --> {clock(s.end, '.')}\n{s.text}\n" for s in segments]
    return "\n".join(["WEBVTT\n", *cues])


def verbose_json(
    text: str,
    duration: float,
    language: str,
    segments: Sequence[Segment],
    words: Sequence[Word] | None,
    tokenize: Callable[[str], list[int]],
) -> dict[str, Any]:
    """OpenAI's verbose transcription: text, duration, language, segments and (when asked for) words.

    Segments carry what the pipeline knows: times, text, its token ids and temperature 0 (decoding is
    deterministic). Whisper's seek offset and per-segment scores (avg_logprob, compression_ratio, no_speech_prob)
    are left out rather than made up.
    """
    response: dict[str, Any] = {
        "task": "transcribe",
        "language": language,
        "duration": round(duration, 3),
        "text": text,
        "segments": [
            {
                "id": index,
                "start": round(segment.start, 3),
                "end": round(segment.end, 3),
                "text": segment.text,
                "tokens": tokenize(segment.text),
                "temperature": 0.0,
            }
            for index, segment in enumerate(segments)
        ],
    }
    if words is not None:
        response["words"] = [
            {"word": word.word, "start": round(word.start, 3), "end": round(word.end, 3)} for word in words
        ]
    return response
