"""What a clip sounds like, from what the corpus builder chose: facts per clip, sentences from them, and back.

The synthetic corpus knows every clip's voice (family, speaker, and so gender and accent), its speaking rate (the
TTS tempo drawn for it) and its channel (clean, telephone, narrowband, noise at an SNR, a simulated room);
``clip_facts`` reads these from a row's columns, so corpora built before the ``facts`` column existed are read the
same way. ``describe`` writes them as a sentence whose wording is drawn from the clip's id ("A man with a British
accent, speaking quickly over a telephone line, with heavy background noise."), and ``read_attributes`` reads the
attributes back from a sentence in that vocabulary: ``eval.py --task describe`` scores a model's descriptions with
it.

    python -m offline_kit.descriptions data/synthetic --out data/synthetic_described

adds ``facts`` (JSON) and ``description`` columns to a corpus built without them, into a new folder.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

import datasets

# Scored attributes and the values a description can state for each.
ATTRIBUTES = {
    "gender": ("female", "male"),
    "accent": ("american", "british", "scottish"),
    "channel": ("clean", "telephone", "narrowband"),
    "noise": ("quiet", "noisy"),
    "rate": ("slow", "normal", "fast"),
}
FACT_COLUMNS = ("facts", "description")

# Voices whose gender and accent their engine documents: Kokoro's ids (a/b = American/British, f/m = female/male),
# espeak-ng's variant files ("gender" lines; edward, john, paul, quincy and robert are male names without one),
# flite's voices (slt, rms, kal16: American; awb: Scottish) and Piper's joe (en_US, a man).
ESPEAK_FEMALE_VARIANTS = frozenset({"f2", "Annie", "steph"})
ESPEAK_ACCENT_OF = {
    "en-us": "american",
    "en-us-nyc": "american",
    "en-gb": "british",
    "en-gb-x-rp": "british",
    "en-gb-scotland": "scottish",
}
FLITE_TRAITS = {
    "slt": ("female", "american"),
    "rms": ("male", "american"),
    "awb": ("male", "scottish"),
    "kal16": ("male", "american"),
}
KOKORO_ACCENTS = {"a": "american", "b": "british"}
KOKORO_GENDERS = {"f": "female", "m": "male"}
# Real recordings: what their sources say. The Asterisk prompts (Debian: "asterisk PBX sound files - US English")
# are one professional voice artist, a woman, recorded at 8 kHz; jfk.wav is John F. Kennedy's 1961 inaugural
# address, an old and noisy recording.
REAL_SPEAKERS = {
    "asterisk/allison": {"gender": "female", "accent": "american", "channel": "narrowband", "noise": "quiet",
                         "notes": ["professional"]},
    "jfk": {"gender": "male", "accent": "american", "noise": "noisy", "notes": ["public_speech", "old_recording"]},
}  # fmt: skip
# Tempo of a clip against the middle of what the corpus draws for its engine (synthetic_corpus / voices): below
# SLOW_TEMPO is slow, above FAST_TEMPO fast.
SLOW_TEMPO, FAST_TEMPO = 0.92, 1.08
ESPEAK_NORMAL_WPM = 162.5
FLITE_NORMAL_STRETCH = 1.05
# Noise described as faint at this SNR and above, heavy at HEAVY_SNR_DB and below.
FAINT_SNR_DB, HEAVY_SNR_DB = 20.0, 5.0


def voice_traits(family: str, name: str) -> tuple[str | None, str | None]:
    """(gender, accent) of a TTS voice, None where its engine does not say."""
    if family == "kokoro":
        return KOKORO_GENDERS.get(name[1:2]), KOKORO_ACCENTS.get(name[:1])
    if family == "espeak":
        accent, _, variant = name.partition("+")
        return ("female" if variant in ESPEAK_FEMALE_VARIANTS else "male"), ESPEAK_ACCENT_OF.get(accent)
    if family == "flite":
        return FLITE_TRAITS.get(name, (None, None))
    if family == "piper":
        return "male", "american"
    return None, None


def speaking_rate(family: str, tts_params: dict) -> str | None:
    """slow / normal / fast from the tempo the corpus drew for the clip (None when it drew none)."""
    if "length_scale" in tts_params:  # Piper: longer phonemes, slower speech
        tempo = 1 / tts_params["length_scale"]
    elif "speed" in tts_params:  # Kokoro
        tempo = tts_params["speed"]
    elif "speed_wpm" in tts_params:  # espeak-ng
        tempo = tts_params["speed_wpm"] / ESPEAK_NORMAL_WPM
    elif "duration_stretch" in tts_params:  # flite
        tempo = FLITE_NORMAL_STRETCH / tts_params["duration_stretch"]
    else:
        return None
    return "slow" if tempo < SLOW_TEMPO else "fast" if tempo > FAST_TEMPO else "normal"


def clip_facts(row: dict) -> dict:
    """The facts of one corpus row (synthetic or real speech), from its ``facts`` column or its other columns."""
    if row.get("facts"):
        return json.loads(row["facts"])
    if row.get("family") == "real":
        return {"family": "real", "speaker": row["speaker"], **REAL_SPEAKERS.get(row["speaker"], {})}
    family, name = row["voice"].split("/", 1)
    gender, accent = voice_traits(family, name)
    facts = {"family": family, "speaker": name, "gender": gender, "accent": accent}
    facts["rate"] = speaking_rate(family, json.loads(row.get("tts_params") or "{}"))
    if "aug_noise" in row:
        facts["channel"] = (
            "telephone" if row["aug_telephone"] else "narrowband" if row.get("aug_narrowband") else "clean"
        )
        facts["noise"] = "quiet" if row["aug_noise"] == "none" else "noisy"
        facts["snr_db"] = row["aug_snr_db"]
        facts["room_rt60"] = row.get("aug_room_rt60")
    return facts


# ---- sentences ---------------------------------------------------------------------------------------------------

NOUNS = {"female": ("woman", "female speaker", "female voice"), "male": ("man", "male speaker", "male voice")}
NEUTRAL_NOUNS = ("speaker", "voice")
RATE_PHRASES = {
    "fast": ("speaking quickly", "talking fast", "speaking at a brisk pace", "speaking rapidly"),
    "slow": ("speaking slowly", "talking slowly", "speaking at a slow, unhurried pace"),
    "normal": ("speaking at an even pace", "speaking at a normal pace", "talking at an ordinary speed"),
}
CHANNEL_PHRASES = {
    "telephone": ("over a telephone line", "on a phone call", "through a telephone"),
    "narrowband": (
        "in a muffled, low-bandwidth recording",
        "in a narrowband recording",
        "in a dull recording with the high frequencies cut off",
    ),
    "clean": (
        "in a full-range recording",
        "recorded with crisp, full sound",
        "in a clear, full-range recording",
    ),
}
NOISE_PHRASES = {
    "faint": ("with faint background noise", "over a faint hiss of noise", "with a little background noise"),
    "some": ("with some background noise", "over a steady hiss of noise", "with noise in the background"),
    "heavy": ("with heavy background noise", "over a loud hiss of noise", "with a lot of background noise"),
    "quiet": ("with no background noise", "against a quiet background", "without any background noise"),
}
ROOM_PHRASES = ("in an echoing room", "with the echo of a room around the voice", "in a reverberant room")
NOTE_PHRASES = {
    "professional": ("reading like a professional announcer", "with a voice artist's polished delivery"),
    "public_speech": ("giving a public speech", "addressing a crowd"),
    "old_recording": ("in an old recording", "in a decades-old recording"),
}


def _subject(facts: dict, rng: random.Random) -> str:
    gender, accent = facts.get("gender"), facts.get("accent")
    noun = rng.choice(NOUNS[gender] if gender else NEUTRAL_NOUNS)
    if accent is None:
        return f"A {noun}"
    name = accent.capitalize()
    article = "An" if name[0] in "AEIOU" else "A"
    if noun in ("woman", "man") and rng.random() < 0.5:
        return f"{article} {name} {noun}"
    return f"A {noun} with {article.lower()} {name} accent"


def _noise_level(snr_db: float | None) -> str:
    if snr_db is None:
        return "some"
    return "faint" if snr_db >= FAINT_SNR_DB else "heavy" if snr_db <= HEAVY_SNR_DB else "some"


def describe(facts: dict, seed: str) -> str:
    """One sentence stating every known fact, its wording drawn from ``seed`` (a clip id: the same clip, the same
    sentence)."""
    rng = random.Random(f"describe:{seed}")
    clauses = [rng.choice(NOTE_PHRASES[note]) for note in facts.get("notes", []) if note != "old_recording"]
    if facts.get("rate"):
        clauses.append(rng.choice(RATE_PHRASES[facts["rate"]]))
    where = []
    if facts.get("room_rt60") is not None:
        where.append(rng.choice(ROOM_PHRASES))
    if facts.get("channel"):
        where.append(rng.choice(CHANNEL_PHRASES[facts["channel"]]))
    if "old_recording" in facts.get("notes", []):
        where.append(rng.choice(NOTE_PHRASES["old_recording"]))
    if facts.get("noise"):
        level = "quiet" if facts["noise"] == "quiet" else _noise_level(facts.get("snr_db"))
        where.append(rng.choice(NOISE_PHRASES[level]))
    clauses.append(", ".join(where))
    return ", ".join([_subject(facts, rng), *filter(None, clauses)]) + "."


# ---- reading a sentence back ---------------------------------------------------------------------------------------

# Words of the sentences above that state each value (matched as whole words, lower case).
VALUE_PATTERNS = {
    "gender": {"female": r"woman|female", "male": r"man|male"},
    "accent": {"american": r"american", "british": r"british", "scottish": r"scottish"},
    "channel": {
        "telephone": r"telephone|phone",
        "narrowband": r"low-bandwidth|narrowband|muffled|high frequencies cut off",
        "clean": r"full-range|full sound|full bandwidth",
    },
    "noise": {"noisy": r"noise|noisy|hiss", "quiet": r"no background noise|quiet background|without any"},
    "rate": {
        "fast": r"quickly|fast|brisk|rapidly",
        "slow": r"slowly|unhurried",
        "normal": r"even pace|normal pace|ordinary speed",
    },
}


def read_attributes(sentence: str) -> dict[str, str | None]:
    """The value of each attribute a sentence states (None where it states none or more than one).

    Quiet is checked before noisy: "no background noise" names noise only to deny it.
    """
    text = sentence.lower()
    found: dict[str, str | None] = {}
    for attribute, values in VALUE_PATTERNS.items():
        stated = [value for value, pattern in values.items() if re.search(rf"\b(?:{pattern})\b", text)]
        if attribute == "noise" and "quiet" in stated:
            stated = ["quiet"]
        found[attribute] = stated[0] if len(stated) == 1 else None
    return found


def reference_attributes(facts: dict) -> dict[str, str | None]:
    """The attributes a description of these facts states (None: the source does not say)."""
    return {attribute: facts.get(attribute) for attribute in ATTRIBUTES}


# ---- scoring -------------------------------------------------------------------------------------------------------

UNSTATED = "(none)"


def attribute_scores(pairs: list[tuple[dict, dict]]) -> dict[str, dict]:
    """Accuracy and confusion counts per attribute over (reference, predicted) attribute pairs; an attribute is
    scored on the clips whose reference states it, and a prediction that states no value counts as wrong."""
    scores = {}
    for attribute in ATTRIBUTES:
        confusion: dict[str, dict[str, int]] = {}
        for reference, predicted in pairs:
            if reference.get(attribute) is None:
                continue
            said = predicted.get(attribute) or UNSTATED
            row = confusion.setdefault(reference[attribute], {})
            row[said] = row.get(said, 0) + 1
        clips = sum(sum(row.values()) for row in confusion.values())
        if clips:
            correct = sum(row.get(value, 0) for value, row in confusion.items())
            scores[attribute] = {"clips": clips, "accuracy": correct / clips, "confusion": confusion}
    return scores


def format_confusion(attribute: str, score: dict) -> str:
    """One attribute's accuracy and its confusion table: a row per true value, a column per value said."""
    said = [
        v for v in (*ATTRIBUTES[attribute], UNSTATED) if any(v in row for row in score["confusion"].values())
    ]
    truths = [v for v in ATTRIBUTES[attribute] if v in score["confusion"]]
    width = max(len(v) for v in [*said, *truths, "true \\ said"])
    lines = [f"{attribute}: {100 * score['accuracy']:.1f}% of {score['clips']} clips"]
    lines.append("  " + "true \\ said".ljust(width) + "".join(v.rjust(width + 2) for v in said))
    for truth in truths:
        counts = score["confusion"][truth]
        lines.append(
            "  " + truth.ljust(width) + "".join(str(counts.get(v, 0)).rjust(width + 2) for v in said)
        )
    return "\n".join(lines)


def has_facts(columns: list[str]) -> bool:
    """Whether a dataset's rows say what their clips sound like (a ``facts`` column, or the voice columns of the
    offline kit's corpora)."""
    return "facts" in columns or {"voice", "family", "speaker"} <= set(columns)


# ---- corpora -------------------------------------------------------------------------------------------------------


def described_row(row: dict) -> dict:
    """A corpus row with its ``facts`` (JSON) and ``description``."""
    facts = clip_facts(row)
    return {**row, "facts": json.dumps(facts, sort_keys=True), "description": describe(facts, row["clip_id"])}


def with_descriptions(dataset: datasets.Dataset) -> datasets.Dataset:
    """The dataset with ``facts`` and ``description`` columns (unchanged when it has them); the audio is not read."""
    if all(column in dataset.column_names for column in FACT_COLUMNS):
        return dataset
    columns = [column for column in dataset.column_names if column not in ("audio", *FACT_COLUMNS)]

    def add(*values: object) -> dict:
        described = described_row(dict(zip(columns, values, strict=True)))
        return {column: described[column] for column in FACT_COLUMNS}

    return dataset.map(add, input_columns=columns, desc="describing")


def main(argv: list[str] | None = None) -> None:
    """Write a copy of a corpus with description columns (the corpus itself is left as it is)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "corpus", type=Path, help="a synthetic corpus or the real-speech set (save_to_disk folder)"
    )
    parser.add_argument("--out", type=Path, required=True, help="new folder for the described copy")
    args = parser.parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; choose another --out (nothing is overwritten)")
    corpus = datasets.load_from_disk(str(args.corpus))
    described = datasets.DatasetDict({split: with_descriptions(rows) for split, rows in corpus.items()})
    partial = args.out.with_name(args.out.name + ".partial")
    described.save_to_disk(str(partial))
    partial.rename(args.out)
    for split, rows in described.items():
        example = rows.select_columns(["description"])[0]["description"] if len(rows) else ""
        print(f"{split}: {len(rows)} clips, e.g. {example!r}")


if __name__ == "__main__":
    main()
