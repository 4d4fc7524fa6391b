#!/usr/bin/env bash
# Reproduces the shipped offline model (offline_kit/trained) from nothing, on CPU:
# offline kit -> synthetic corpora -> stages 1 to 7 (configs/recipes/offline_stage{1..7}.yaml) -> the mean of
# stages 6 and 7 -> stages 8 to 11 (the describe task, which leave transcription as it is) -> ship -> evaluate
# against Whisper tiny.en.
#   bash scripts/train_offline_model.sh              # resumable: run it again after an interruption
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
AVERAGED=outputs/offline-avg-stage6-7
RUN=outputs/offline-recipe-stage11
export HF_HUB_OFFLINE=1

$PYTHON -m offline_kit.preset
$PYTHON -m offline_kit.real_speech
# corpus NAME [synthetic_corpus flags]: builds data/NAME unless it is there already.
corpus() {
  [ -f "data/$1/dataset_dict.json" ] || $PYTHON -m offline_kit.synthetic_corpus --out "data/$1" "${@:2}"
}
corpus synthetic10k --num-clips 10000
corpus synthetic_ext6k --num-clips 6000 --test-fraction 0 --first-clip 9500 \
  --families espeak piper flite
corpus synthetic_short4k --num-clips 4000 --test-fraction 0 --first-clip 20000 --max-words 3 \
  --families espeak piper flite
corpus synthetic_long1k2 --num-clips 1200 --test-fraction 0 --first-clip 24000 --min-words 30 \
  --families espeak piper flite
corpus synthetic_modern6k --num-clips 6000 --test-fraction 0 --first-clip 30000 \
  --sources help fortunes --families espeak piper flite
corpus synthetic_modern_short2k --num-clips 2000 --test-fraction 0 --first-clip 40000 --max-words 3 \
  --sources help fortunes --families espeak piper flite
# Stage 6: natural voices, and replays of the earlier corpora (their first clips, byte for byte).
corpus synthetic_kokoro2k --num-clips 2100 --test-fraction 0.05 --families kokoro \
  --sources harvard wordnet web help fortunes
corpus synthetic_kokoro_short1k --num-clips 1000 --test-fraction 0 --first-clip 10000 --max-words 3 \
  --families kokoro --sources harvard wordnet web help fortunes
corpus replay_synthetic2k --num-clips 2000 --test-fraction 0
corpus replay_modern2k --num-clips 2000 --test-fraction 0 --first-clip 30000 \
  --sources help fortunes --families espeak piper flite
corpus replay_modern_short1k --num-clips 1000 --test-fraction 0 --first-clip 40000 --max-words 3 \
  --sources help fortunes --families espeak piper flite
corpus replay_long300 --num-clips 300 --test-fraction 0 --first-clip 24000 --min-words 30 \
  --families espeak piper flite
# Stage 7: sentences no earlier stage used.
corpus synthetic_fresh6k --num-clips 6000 --test-fraction 0 --first-clip 50000 --families espeak piper flite
corpus synthetic_fresh_short2k --num-clips 2000 --test-fraction 0 --first-clip 60000 --max-words 3 \
  --families espeak piper flite
# Stages 8 and 9: the describe task (clips with their facts and descriptions; 4 Kokoro voices held out for test).
corpus multitask3k --num-clips 3000 --test-fraction 0.05 --families kokoro espeak piper flite \
  --narrowband 0.1 --room 0.2 --seed 30

# train CONFIG OUTPUT_DIR: skipped once the stage saved its final model, resumed from its last checkpoint if any.
train() {
  [ -f "$2/model.safetensors" ] && return
  if ls -d "$2"/checkpoint-* >/dev/null 2>&1; then RESUME=--resume; else RESUME=; fi
  $PYTHON train.py "$1" $RESUME
}
train configs/recipes/offline_stage1.yaml outputs/offline-recipe
train configs/recipes/offline_stage2.yaml outputs/offline-recipe-stage2
train configs/recipes/offline_stage3.yaml outputs/offline-recipe-stage3
train configs/recipes/offline_stage4.yaml outputs/offline-recipe-stage4
train configs/recipes/offline_stage5.yaml outputs/offline-recipe-stage5
train configs/recipes/offline_stage6.yaml outputs/offline-recipe-stage6
train configs/recipes/offline_stage7.yaml outputs/offline-recipe-stage7
# What ships: the mean of stages 6 and 7 (stage 7 alone reads the synthetic voices better and real speech worse).
[ -f "$AVERAGED/model.safetensors" ] ||
  $PYTHON -m training.average "$AVERAGED" outputs/offline-recipe-stage6 outputs/offline-recipe-stage7
train configs/recipes/offline_stage8.yaml outputs/offline-recipe-stage8
train configs/recipes/offline_stage9.yaml outputs/offline-recipe-stage9
train configs/recipes/offline_stage10.yaml outputs/offline-recipe-stage10
train configs/recipes/offline_stage11.yaml "$RUN"
$PYTHON -m offline_kit.preset --ship "$RUN"                       # now the preset transcribes with these weights
MAX_SAMPLES= bash scripts/evaluate_offline_model.sh               # every clip: these results ship

# What ships next to the weights: the loss curve (all stages), every model's results.json and the model card.
TRAINED=offline_kit/trained
$PYTHON -m publish.loss_curve outputs/offline-recipe/trainer_state.json outputs/offline-recipe-stage2/trainer_state.json \
  outputs/offline-recipe-stage3/trainer_state.json outputs/offline-recipe-stage4/trainer_state.json \
  outputs/offline-recipe-stage5/trainer_state.json outputs/offline-recipe-stage6/trainer_state.json \
  outputs/offline-recipe-stage7/trainer_state.json "$TRAINED/loss_curve.png" \
  --title "Tiny Audio offline: Whisper tiny.en + SmolLM2-135M, projector + LoRA r=8"
mkdir -p "$TRAINED/results"
for model in tiny-audio-offline whisper-tiny.en whisper-tiny.en-greedy; do
  for set in real_speech synthetic_test; do
    cp outputs/eval/$model/*/$set/results.json "$TRAINED/results/$model-$set.json"
  done
done
$PYTHON leaderboard/build.py "$TRAINED"/results/*.json                # the shipped rows on the leaderboard
rm -rf "$RUN/hub"
$PYTHON -m publish.push "$RUN" --repo tiny-audio/tiny-audio-offline --dry-run --out "$RUN/hub" \
  --example-audio "$($PYTHON -c 'from offline_kit.real_speech import jfk_wav; print(jfk_wav())')" \
  --results "$TRAINED"/results/tiny-audio-offline-*.json \
  --baseline-results "$TRAINED"/results/whisper-tiny.en-*.json \
  --audio-model-id openai/whisper-tiny.en --text-model-id HuggingFaceTB/SmolLM2-135M-Instruct \
  --train-config configs/recipes/offline_stage{1..11}.yaml \
  --language en --training-data-note "synthetic English speech only, made offline by offline_kit.synthetic_corpus \
(Piper, flite, espeak-ng and Kokoro voices reading Harvard sentences, WordNet examples, the World English Bible, \
GNOME help pages and fortunes), no recorded human speech"
cp "$RUN/hub/README.md" "$TRAINED/README.md"
