#!/usr/bin/env bash
# Train a VL-SAE concept space on image-caption pairs in CC3M (img2dataset webdataset) format:
# extract the model's representations, then train the auxiliary aligner and the VL-SAE.
#
#   bash examples/train_space.sh                       # toy LLaVA on 400 exported toy pairs, tiny budget
#   bash examples/train_space.sh --model llava-hf/llava-1.5-7b-hf --data '/data/cc3m/{00000..00331}.tar' \
#        --out runs/llava7b --max-samples 1000000 --epochs 10
#   bash examples/train_space.sh --model Qwen/Qwen2.5-VL-7B-Instruct --prompt chat ...
#
# --prompt goes around each caption at extraction (default: LLaVA-1.5's "USER: <image>\n{caption}
# ASSISTANT:"); "chat" puts it in the processor's chat template, which Qwen2.5-VL needs.
# The space lands in OUT/run/space; use it with vlsae_hooks.attach(model, "OUT/run/space").
# On N GPUs (or nodes) run both steps under a launcher, unchanged: each process extracts every
# N-th shard, and training splits each batch, so N processes end where one would (tested with
# 2 CPU processes: weights equal to 1e-5):
#   LAUNCH="accelerate launch --multi_gpu --num_processes 8" bash examples/train_space.sh ...
# (2 CPU processes: LAUNCH="torchrun --nproc_per_node 2"; accelerate's --cpu starts only one.)
set -euo pipefail

MODEL=""; DATA=""; OUT="runs/example_space"; MAX_SAMPLES=400; EPOCHS=2; PROMPT=()
while [ $# -gt 0 ]; do
  case "$1" in  # each option takes a value: refuse one left without
    --model|--data|--out|--max-samples|--epochs|--prompt)
      if [ $# -lt 2 ] || [ -z "$2" ] || [ "${2#--}" != "$2" ]; then
        echo "error: $1 needs a value, e.g. $1 VALUE" >&2; exit 2
      fi ;;
  esac
  case "$1" in
    --model) MODEL="$2"; shift 2 ;;
    --data) DATA="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --max-samples) MAX_SAMPLES="$2"; shift 2 ;;
    --epochs) EPOCHS="$2"; shift 2 ;;
    --prompt) PROMPT=(--prompt "$2"); shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
PYTHON="${PYTHON:-python}"
LAUNCH="${LAUNCH:-$PYTHON}"

if [ -z "$MODEL" ]; then
  MODEL="$("$PYTHON" -c 'from eval_suites.toyworld.assets_paths import toy_paths; print(toy_paths().llava)')"
fi
if [ -z "$DATA" ]; then  # toy pairs written as webdataset shards, the way users keep CC3M
  DATA="$OUT/pairs/shards"
  # exported once: a rerun (after a kill, say) reads the same files, which its extraction checks
  if ! "$PYTHON" -c 'import json, sys; m = json.load(open(sys.argv[1]))
sys.exit((m.get("seed"), m.get("n_images")) != (0, int(sys.argv[2])))' \
      "$OUT/pairs/manifest.json" "$MAX_SAMPLES" 2> /dev/null; then
    "$PYTHON" -m eval_suites.toyworld export --seed 0 --n-images "$MAX_SAMPLES" --out "$OUT/pairs" > /dev/null
  fi
fi

$LAUNCH -m sae_training extract --model "$MODEL" --data "$DATA" --out "$OUT/acts" --max-samples "$MAX_SAMPLES" \
  ${PROMPT[@]+"${PROMPT[@]}"}
$LAUNCH -m sae_training train --data "$OUT/acts" --out "$OUT/run" \
  --sae-epochs "$EPOCHS" --aligner-epochs "$EPOCHS" --sae-warmup-epochs 0 --sae-resample-epochs 0
echo "concept space: $OUT/run/space"
