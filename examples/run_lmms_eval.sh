#!/usr/bin/env bash
# Score a decoding method with lmms-eval through the vlsae_llava plugin (needs `pip install -e .[lmms]`).
#
#   bash examples/run_lmms_eval.sh                          # toy LLaVA on exported toy-world POPE + CHAIR
#   bash examples/run_lmms_eval.sh --method vcd --limit 20
#   bash examples/run_lmms_eval.sh --model llava-hf/llava-1.5-7b-hf --method vlsae \
#        --method-args space=PATH,alpha=0.8 --tasks pope_random,pope_pop,pope_adv,coco_cap_chair
#
# Default tasks: the toyworld_* tasks of eval_suites/toyworld/tasks for the toy model, the stock
# POPE + CHAIR tasks with --model (they download POPE / COCO; coco_cap_chair also needs NLTK data,
# see docs/lmms_eval.md).
set -euo pipefail

MODEL=""; METHOD="greedy"; METHOD_ARGS=""; TASKS=""; LIMIT=""; BATCH=8; OUT="runs/lmms_eval"
while [ $# -gt 0 ]; do
  case "$1" in
    --model) MODEL="$2"; shift 2 ;;
    --method) METHOD="$2"; shift 2 ;;
    --method-args) METHOD_ARGS=",$2"; shift 2 ;;
    --tasks) TASKS="$2"; shift 2 ;;
    --limit) LIMIT="$2"; shift 2 ;;
    --batch-size) BATCH="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
PYTHON="${PYTHON:-python}"
HERE="$(cd "$(dirname "$0")/.." && pwd)"

if [ -z "$MODEL" ]; then
  MODEL="$("$PYTHON" -c 'from eval_suites.toyworld.assets_paths import toy_paths; print(toy_paths().llava)')"
  TASKS="${TASKS:-toyworld_pope,toyworld_chair}"
fi
TASKS="${TASKS:-pope_random,pope_pop,pope_adv,coco_cap_chair}"
if [[ "$TASKS" == *toyworld* ]]; then  # the toy world's data, exported once
  export VLSAE_TOYWORLD_DIR="${VLSAE_TOYWORLD_DIR:-$OUT/toyworld}"
  [ -f "$VLSAE_TOYWORLD_DIR/manifest.json" ] || \
    "$PYTHON" -m eval_suites.toyworld export --seed 1 --n-images 200 --out "$VLSAE_TOYWORLD_DIR" > /dev/null
fi
EXTRA=(--include_path "$HERE/eval_suites/toyworld/tasks")
[ -n "$LIMIT" ] && EXTRA+=(--limit "$LIMIT")

# --verbosity DEBUG: otherwise lmms-eval exits 0 even when the evaluation failed
"$PYTHON" -m lmms_eval --model vlsae_llava --model_args "pretrained=$MODEL,method=$METHOD$METHOD_ARGS" \
  --tasks "$TASKS" --batch_size "$BATCH" --output_path "$OUT" --verbosity DEBUG "${EXTRA[@]}"
