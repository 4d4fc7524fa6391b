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
$PYTHON -m offline_kit.preset --ship "$RUN"                       # now the preset transcribes with these weights
MAX_SAMPLES= bash scripts/evaluate_offline_model.sh               # every clip: these results ship

# What ships next to the weights: the loss curve, both models' results.json files and the model card.
TRAINED=offline_kit/trained
$PYTHON -m publish.loss_curve "$RUN/trainer_state.json" "$TRAINED/loss_curve.png" \
  --title "Tiny Audio offline: Whisper tiny.en + SmolLM2-135M, projector + LoRA r=8"
mkdir -p "$TRAINED/results"
for model in tiny-audio-offline whisper-tiny.en; do
  for set in real_speech synthetic_test; do
    cp outputs/eval/$model/*/$set/results.json "$TRAINED/results/$model-$set.json"
  done
done
rm -rf "$RUN/hub"
$PYTHON -m publish.push "$RUN" --repo tiny-audio/tiny-audio-offline --dry-run --out "$RUN/hub" \
  --example-audio "$($PYTHON -c 'from offline_kit.real_speech import jfk_wav; print(jfk_wav())')" \
  --results "$TRAINED"/results/tiny-audio-offline-*.json \
  --baseline-results "$TRAINED"/results/whisper-tiny.en-*.json \
  --audio-model-id openai/whisper-tiny.en --text-model-id HuggingFaceTB/SmolLM2-135M-Instruct \
  --train-config configs/offline_recipe.yaml --language en
cp "$RUN/hub/README.md" "$TRAINED/README.md"
