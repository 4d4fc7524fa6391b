#!/usr/bin/env bash
# The main job on the offline default, from nothing: install, build the offline model and data, train, evaluate.
#   bash scripts/offline.sh                 # TRAIN_STEPS=200 CLIPS=400 by default (a CPU-sized smoke run)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TRAIN_STEPS=${TRAIN_STEPS:-200}
CLIPS=${CLIPS:-400}
CACHE=${TINY_AUDIO_CACHE:-$HOME/.cache/tiny_audio/offline}
export HF_HUB_OFFLINE=1

bash scripts/install.sh
$PYTHON -m offline_kit.preset                                       # Whisper tiny.en + SmolLM2-135M, converted
$PYTHON -m offline_kit.real_speech                                  # data/real_speech: Asterisk prompts + jfk.wav
$PYTHON -m offline_kit.synthetic_corpus --num-clips "$CLIPS"        # data/synthetic: train/test, held-out voices
$PYTHON train.py configs/offline.yaml --max_steps "$TRAIN_STEPS" --output_dir outputs/offline
$PYTHON eval.py outputs/offline --dataset data/real_speech data/synthetic --max-samples 50 \
  --output-dir outputs/eval/tiny-audio --model-name tiny-audio-offline
$PYTHON eval.py "$CACHE/whisper-tiny.en" --dataset data/real_speech data/synthetic --max-samples 50 \
  --output-dir outputs/eval/whisper-tiny.en --model-name whisper-tiny.en
