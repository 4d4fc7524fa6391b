#!/usr/bin/env bash
# Reproduces the shipped offline model (offline_kit/trained) from nothing, on CPU:
# offline kit -> synthetic corpora -> stages 1 to 5 (configs/offline_recipe{,_stage2,_stage3,_stage4,_stage5}.yaml)
# -> ship -> evaluate against Whisper tiny.en.
#   bash scripts/train_offline_model.sh              # resumable: run it again after an interruption
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
RUN=outputs/offline-recipe-stage5
export HF_HUB_OFFLINE=1

$PYTHON -m offline_kit.preset
$PYTHON -m offline_kit.real_speech
[ -f data/synthetic10k/dataset_dict.json ] ||
  $PYTHON -m offline_kit.synthetic_corpus --num-clips 10000 --out data/synthetic10k
[ -f data/synthetic_ext6k/dataset_dict.json ] ||
  $PYTHON -m offline_kit.synthetic_corpus --num-clips 6000 --test-fraction 0 --first-clip 9500 \
    --families espeak piper flite --out data/synthetic_ext6k
[ -f data/synthetic_short4k/dataset_dict.json ] ||
  $PYTHON -m offline_kit.synthetic_corpus --num-clips 4000 --test-fraction 0 --first-clip 20000 --max-words 3 \
    --families espeak piper flite --out data/synthetic_short4k
[ -f data/synthetic_long1k2/dataset_dict.json ] ||
  $PYTHON -m offline_kit.synthetic_corpus --num-clips 1200 --test-fraction 0 --first-clip 24000 --min-words 30 \
    --families espeak piper flite --out data/synthetic_long1k2
[ -f data/synthetic_modern6k/dataset_dict.json ] ||
  $PYTHON -m offline_kit.synthetic_corpus --num-clips 6000 --test-fraction 0 --first-clip 30000 \
    --sources help fortunes --families espeak piper flite --out data/synthetic_modern6k
[ -f data/synthetic_modern_short2k/dataset_dict.json ] ||
  $PYTHON -m offline_kit.synthetic_corpus --num-clips 2000 --test-fraction 0 --first-clip 40000 --max-words 3 \
    --sources help fortunes --families espeak piper flite --out data/synthetic_modern_short2k

# train CONFIG OUTPUT_DIR: skipped once the stage saved its final model, resumed from its last checkpoint if any.
train() {
  [ -f "$2/model.safetensors" ] && return
  if ls -d "$2"/checkpoint-* >/dev/null 2>&1; then RESUME=--resume; else RESUME=; fi
  $PYTHON train.py "$1" $RESUME
}
train configs/offline_recipe.yaml outputs/offline-recipe
train configs/offline_recipe_stage2.yaml outputs/offline-recipe-stage2
train configs/offline_recipe_stage3.yaml outputs/offline-recipe-stage3
train configs/offline_recipe_stage4.yaml outputs/offline-recipe-stage4
train configs/offline_recipe_stage5.yaml "$RUN"
$PYTHON -m offline_kit.preset --ship "$RUN"                       # now the preset transcribes with these weights
MAX_SAMPLES= bash scripts/evaluate_offline_model.sh               # every clip: these results ship

# What ships next to the weights: the loss curve (all stages), every model's results.json and the model card.
TRAINED=offline_kit/trained
$PYTHON -m publish.loss_curve outputs/offline-recipe/trainer_state.json outputs/offline-recipe-stage2/trainer_state.json \
  outputs/offline-recipe-stage3/trainer_state.json outputs/offline-recipe-stage4/trainer_state.json \
  "$RUN/trainer_state.json" "$TRAINED/loss_curve.png" \
  --title "Tiny Audio offline: Whisper tiny.en + SmolLM2-135M, projector + LoRA r=8"
mkdir -p "$TRAINED/results"
for model in tiny-audio-offline whisper-tiny.en whisper-tiny.en-greedy; do
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
  --train-config configs/offline_recipe.yaml configs/offline_recipe_stage2.yaml configs/offline_recipe_stage3.yaml \
    configs/offline_recipe_stage4.yaml configs/offline_recipe_stage5.yaml \
  --language en
cp "$RUN/hub/README.md" "$TRAINED/README.md"
