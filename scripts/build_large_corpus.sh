#!/usr/bin/env bash
# The large corpus for one long single-pass run (issue 24; plan and costs in offline_kit/trained/TRAINING.md):
# about 110,000 clips in chunks under $LARGE_CORPUS_DIR (default data/large), every chunk a resumable corpus of its
# own (finished 50-clip shards are kept), so the build carries on where it stopped:
#   LARGE_CORPUS_DIR=/big/disk/large bash scripts/build_large_corpus.sh   # elsewhere than data/large
#   bash scripts/build_large_corpus.sh              # every chunk, in order; run it again after an interruption
#   bash scripts/build_large_corpus.sh read-00 long # only these chunks
#   WORKERS=1 bash scripts/build_large_corpus.sh    # one process, leaving a core to other work
# Each read chunk speaks a different tenth of the 70,438 training sentences of the default text sources, so no
# sentence is read twice by the read chunks; a third of all clips are spoken in a simulated room.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export HF_HUB_OFFLINE=1
LARGE_CORPUS_DIR=${LARGE_CORPUS_DIR:-data/large}
ROBOTIC_AND_PIPER="--families espeak piper flite"
EVERY_SOURCE="--sources harvard wordnet web help fortunes"

declare -A CHUNKS=(
  [read-00]="--num-clips 10000 --first-clip 0 $ROBOTIC_AND_PIPER"
  [read-01]="--num-clips 10000 --first-clip 10000 $ROBOTIC_AND_PIPER"
  [read-02]="--num-clips 10000 --first-clip 20000 $ROBOTIC_AND_PIPER"
  [read-03]="--num-clips 10000 --first-clip 30000 $ROBOTIC_AND_PIPER"
  [read-04]="--num-clips 10000 --first-clip 40000 $ROBOTIC_AND_PIPER"
  [read-05]="--num-clips 10000 --first-clip 50000 $ROBOTIC_AND_PIPER"
  [read-06]="--num-clips 10000 --first-clip 60000 $ROBOTIC_AND_PIPER"
  [modern]="--num-clips 10000 --sources help fortunes $ROBOTIC_AND_PIPER"
  [short]="--num-clips 10000 --max-words 3 $ROBOTIC_AND_PIPER $EVERY_SOURCE"
  [long]="--num-clips 3000 --min-words 30 $ROBOTIC_AND_PIPER"
  [natural]="--num-clips 6000 --families kokoro $EVERY_SOURCE"
  [natural-short]="--num-clips 2000 --max-words 3 --families kokoro $EVERY_SOURCE"
)
ORDER=(read-00 short read-01 natural read-02 modern read-03 long read-04 natural-short read-05 read-06)

for name in "${@:-${ORDER[@]}}"; do
  [ -n "${CHUNKS[$name]:-}" ] || { echo "unknown chunk $name; chunks: ${ORDER[*]}" >&2; exit 2; }
  out="$LARGE_CORPUS_DIR/$name"
  [ -f "$out/dataset_dict.json" ] && continue
  # shellcheck disable=SC2086  # the chunk's flags are words
  $PYTHON -m offline_kit.synthetic_corpus --out "$out" --test-fraction 0 --room 0.3 ${WORKERS:+--workers "$WORKERS"} ${CHUNKS[$name]}
done
