#!/usr/bin/env bash
# Reproduces the shipped offline model (offline_kit/trained) from nothing, on CPU:
# offline kit -> 10k-clip synthetic corpus -> configs/offline_recipe.yaml -> ship -> evaluate against Whisper tiny.en.
#   bash scripts/train_offline_model.sh              # resumable: run it again after an interruption
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
RUN=outputs/offline-recipe
export HF_HUB_OFFLINE=1

$PYTHON -m offline_kit.preset
$PYTHON -m offline_kit.real_speech
[ -f data/synthetic10k/dataset_dict.json ] ||
  $PYTHON -m offline_kit.synthetic_corpus --num-clips 10000 --out data/synthetic10k
if ls -d "$RUN"/checkpoint-* >/dev/null 2>&1; then RESUME=--resume; else RESUME=; fi
$PYTHON train.py configs/offline_recipe.yaml $RESUME
$PYTHON -m publish.loss_curve "$RUN/trainer_state.json" "$RUN/loss_curve.png" --title "Tiny Audio offline recipe"
$PYTHON -m offline_kit.preset --ship "$RUN"                       # now the preset transcribes with these weights
bash scripts/evaluate_offline_model.sh
