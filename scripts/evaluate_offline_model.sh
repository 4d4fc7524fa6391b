#!/usr/bin/env bash
# The shipped offline model and Whisper tiny.en (its own decoder, through the stock pipeline, with beam search and
# greedy), on the same clips:
# the real-speech set (551 Asterisk prompts + jfk) and the synthetic test split (500 clips of unseen text, by an
# unseen flite voice and Piper joe in an unseen style; byte-identical to the test split of the 10k training
# corpus, so it can be built on its own).
#   bash scripts/evaluate_offline_model.sh           # needs the preset: python -m offline_kit.preset
#   MAX_SAMPLES=100 bash scripts/evaluate_offline_model.sh   # a quick look: 100 clips per set (seeded)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
CACHE=${TINY_AUDIO_CACHE:-$HOME/.cache/tiny_audio/offline}
BATCH=${BATCH:-16}
MAX_SAMPLES=${MAX_SAMPLES:-}  # empty: every clip
export HF_HUB_OFFLINE=1

[ -f data/real_speech/dataset_dict.json ] || $PYTHON -m offline_kit.real_speech
[ -f data/synthetic_test/dataset_dict.json ] ||
  $PYTHON -m offline_kit.synthetic_corpus --num-clips 500 --test-fraction 1 --out data/synthetic_test
evaluate() {  # NAME FOLDER [eval.py flags]
  $PYTHON eval.py "$CACHE/$2" --dataset data/real_speech data/synthetic_test --batch-size "$BATCH" \
    --output-dir "outputs/eval/$1" --model-name "$1" ${MAX_SAMPLES:+--max-samples "$MAX_SAMPLES"} "${@:3}"
}
evaluate tiny-audio-offline tiny-audio-offline  # greedy decoding
# Whisper's stock pipeline decodes with beam search (5 beams, as openai's whisper); greedy is the like-for-like
# speed comparison. Three Asterisk prompts run past Whisper's 30 s window, hence the chunking.
evaluate whisper-tiny.en whisper-tiny.en --chunk-length-s 30
evaluate whisper-tiny.en-greedy whisper-tiny.en --chunk-length-s 30 --generate-kwargs '{"num_beams": 1}'
