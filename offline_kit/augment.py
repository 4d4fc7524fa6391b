"""Seeded augmentations that move clean TTS audio towards real recordings: room, telephone, narrowband, noise, gain.

``sample_augmentation`` draws the settings for one clip from a seeded ``random.Random``; ``apply`` renders
them with a numpy generator seeded from the same clip seed.  The settings go into the corpus columns
(``aug_telephone``, ``aug_noise``, ``aug_snr_db``, ``aug_gain_db``, ``aug_narrowband``, ``aug_room_rt60``,
``aug_room_dims``) so a training run can filter or stratify. TTS voices speak as if into a close microphone in a
dead room; real recordings carry a room's reverberation, so a simulated room (an image-source impulse response
from ``pyroomacoustics``) is the first thing applied.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import asdict, dataclass

import numpy as np
import soundfile as sf
import soxr
from scipy.signal import butter, fftconvolve, sosfilt

SAMPLE_RATE = 16000
TELEPHONE_RATE = 8000
SNRS_DB = (5.0, 10.0, 20.0)
NOISE_KINDS = ("white", "pink")
# Simulated rooms: reverberation time and size ranges of offices, living rooms and small halls. Image sources are
# capped at ROOM_MAX_ORDER reflections: long tails in small rooms otherwise take seconds per clip.
ROOM_RT60_S = (0.15, 0.7)
ROOM_DIMS_M = ((3.0, 10.0), (3.0, 8.0), (2.4, 4.0))
ROOM_MAX_ORDER = 40
ROOM_WALL_GAP_M = 0.5


@dataclass(frozen=True)
class Augmentation:
    """Settings for one clip; the field names (with an ``aug_`` prefix) are the corpus column names."""

    telephone: bool = False
    noise: str = "none"
    snr_db: float | None = None
    gain_db: float = 0.0
    narrowband: bool = False
    room_rt60: float | None = None
    room_dims: tuple[float, float, float] | None = None

    def columns(self) -> dict:
        return {f"aug_{key}": value for key, value in asdict(self).items()}


NONE = Augmentation()


def sample_augmentation(
    rng: random.Random,
    p_telephone: float = 0.2,
    p_noise: float = 0.35,
    gain_db: tuple[float, float] = (-18.0, 4.0),
    p_narrowband: float = 0.0,
    p_room: float = 0.0,
) -> Augmentation:
    """Draw one clip's augmentation; about half the clips stay clean apart from gain.

    The narrowband and room draws come last and only when asked for, so corpora built without them keep their
    clips.
    """
    telephone = rng.random() < p_telephone
    noisy = rng.random() < p_noise
    noise = rng.choice(NOISE_KINDS) if noisy else "none"
    snr_db = rng.choice(SNRS_DB) if noisy else None
    gain = round(rng.uniform(*gain_db), 2)
    narrowband = p_narrowband > 0 and rng.random() < p_narrowband
    rt60, dims = None, None
    if p_room > 0 and rng.random() < p_room:
        rt60 = round(rng.uniform(*ROOM_RT60_S), 3)
        dims = tuple(round(rng.uniform(*extent), 2) for extent in ROOM_DIMS_M)
    return Augmentation(telephone, noise, snr_db, gain, narrowband, rt60, dims)


def room_impulse_response(rt60: float, dims: tuple[float, float, float], seed: int) -> np.ndarray:
    """Impulse response from a speaker to a microphone at seeded places in a shoebox room (image-source method)."""
    import pyroomacoustics

    gen = np.random.default_rng(seed)
    absorption, max_order = pyroomacoustics.inverse_sabine(rt60, dims)
    room = pyroomacoustics.ShoeBox(
        list(dims),
        fs=SAMPLE_RATE,
        materials=pyroomacoustics.Material(absorption),
        max_order=min(max_order, ROOM_MAX_ORDER),
    )
    for place in ("source", "microphone"):
        position = [gen.uniform(ROOM_WALL_GAP_M, extent - ROOM_WALL_GAP_M) for extent in dims]
        room.add_source(position) if place == "source" else room.add_microphone(position)
    room.compute_rir()
    return np.asarray(room.rir[0][0], dtype=np.float64)


def reverberate(audio: np.ndarray, rt60: float, dims: tuple[float, float, float], seed: int) -> np.ndarray:
    """The clip as heard in the room, aligned to the direct sound and at the clean clip's power."""
    response = room_impulse_response(rt60, dims, seed)
    direct = int(np.argmax(np.abs(response)))
    wet = fftconvolve(audio, response[direct:])[: len(audio)]
    return wet * np.sqrt(np.mean(audio**2) / max(np.mean(wet**2), 1e-12))


def telephone(audio: np.ndarray) -> np.ndarray:
    """G.711-style channel: 300 Hz high-pass, down to 8 kHz, 8-bit mu-law, back up to 16 kHz."""
    sos = butter(4, 300, btype="highpass", fs=SAMPLE_RATE, output="sos")
    narrow = soxr.resample(sosfilt(sos, audio), SAMPLE_RATE, TELEPHONE_RATE)
    mu = 255.0
    companded = np.sign(narrow) * np.log1p(mu * np.minimum(np.abs(narrow), 1.0)) / np.log1p(mu)
    quantised = np.round(companded * 127.0) / 127.0
    expanded = np.sign(quantised) * np.expm1(np.abs(quantised) * np.log1p(mu)) / mu
    return soxr.resample(expanded, TELEPHONE_RATE, SAMPLE_RATE)[: len(audio)]


def narrowband(audio: np.ndarray) -> np.ndarray:
    """An 8 kHz recording played at 16 kHz (Asterisk's prompts): nothing above 4 kHz, nothing else changed."""
    return soxr.resample(soxr.resample(audio, SAMPLE_RATE, TELEPHONE_RATE), TELEPHONE_RATE, SAMPLE_RATE)[
        : len(audio)
    ]


def _noise(kind: str, n: int, gen: np.random.Generator) -> np.ndarray:
    white = gen.standard_normal(n)
    if kind == "white":
        return white
    spectrum = np.fft.rfft(white)
    spectrum[1:] /= np.sqrt(np.arange(1, len(spectrum)))  # 1/f power
    spectrum[0] = 0.0
    return np.fft.irfft(spectrum, n)


def apply(audio: np.ndarray, aug: Augmentation, seed: int) -> np.ndarray:
    """Render ``aug`` on 16 kHz float audio; noise is scaled to ``snr_db`` against the speech power.

    The room comes first (the voice reverberates before any channel carries it); narrowband comes after the
    noise, as for a noisy room recorded at 8 kHz: the whole clip ends at 4 kHz.
    """
    out = np.asarray(audio, dtype=np.float64)
    if aug.room_rt60 is not None:
        out = reverberate(out, aug.room_rt60, aug.room_dims, seed)
    if aug.telephone:
        out = telephone(out)
    if aug.noise != "none":
        noise = _noise(aug.noise, len(out), np.random.default_rng(seed))
        speech_power = np.mean(out**2)
        out = out + noise * np.sqrt(speech_power / (np.mean(noise**2) * 10 ** (aug.snr_db / 10)))
    if aug.narrowband:
        out = narrowband(out)
    out = out * 10 ** (aug.gain_db / 20)
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def main(argv: list[str] | None = None) -> None:
    """Augment one 16 kHz WAV file, to hear what the corpus columns mean."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", type=str)
    parser.add_argument("output", type=str)
    parser.add_argument("--telephone", action="store_true")
    parser.add_argument("--noise", choices=("none", *NOISE_KINDS), default="none")
    parser.add_argument("--snr-db", type=float, default=10.0)
    parser.add_argument("--gain-db", type=float, default=0.0)
    parser.add_argument("--narrowband", action="store_true", help="8 kHz recording: nothing above 4 kHz")
    parser.add_argument(
        "--room-rt60", type=float, default=None, help="reverberation time of a simulated room, s"
    )
    parser.add_argument("--room-dims", type=float, nargs=3, default=(6.0, 5.0, 3.0), help="room size, m")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    audio, rate = sf.read(args.input, dtype="float32")
    if rate != SAMPLE_RATE or audio.ndim != 1:
        raise SystemExit(f"{args.input}: need 16 kHz mono, got {rate} Hz with shape {audio.shape}")
    aug = Augmentation(
        args.telephone,
        args.noise,
        args.snr_db if args.noise != "none" else None,
        args.gain_db,
        args.narrowband,
        args.room_rt60,
        tuple(args.room_dims) if args.room_rt60 is not None else None,
    )
    sf.write(args.output, apply(audio, aug, args.seed), SAMPLE_RATE)
    print(f"wrote {args.output}: {aug}")


if __name__ == "__main__":
    main()
