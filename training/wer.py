"""Word error rate as the README reports it, for every caller (eval.py, the Trainer's eval_wer, the offline kit).

References and predictions are normalised with Whisper's English normaliser (numbers, spellings, contractions,
punctuation, casing) and scored with jiwer as corpus WER: total errors over total reference words.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import jiwer


@dataclass(frozen=True)
class WordErrors:
    """jiwer's alignment counts over one or many utterances."""

    wer: float
    substitutions: int
    deletions: int
    insertions: int
    reference_words: int

    @classmethod
    def of(cls, references: list[str], predictions: list[str]) -> WordErrors:
        """Corpus WER = (S + D + I) / reference words, on already-normalised text."""
        if not references:
            return cls(0.0, 0, 0, 0, 0)
        out = jiwer.process_words(references, predictions)
        words = out.hits + out.substitutions + out.deletions
        return cls(out.wer, out.substitutions, out.deletions, out.insertions, words)


@functools.cache
def _normalizer() -> Any:
    """transformers' Whisper English normaliser with the British->American spelling map shipped by
    the whisper-normalizer package (the Whisper tokenizer would otherwise download it from the Hub)."""
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    mapping = json.loads(files("whisper_normalizer").joinpath("normalizers/english.json").read_text())
    return EnglishTextNormalizer(mapping)


def normalize(text: str) -> str:
    """Whisper English normalisation: numbers, spellings, contractions, punctuation, casing."""
    return _normalizer()(text)


def score(references: list[str], predictions: list[str]) -> WordErrors:
    """Corpus WER of raw texts after Whisper normalisation."""
    return WordErrors.of([normalize(r) for r in references], [normalize(p) for p in predictions])
