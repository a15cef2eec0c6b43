#!/usr/bin/env bash
# The whole loop: dense checkpoint -> moesys upcycle -> train as an MoE (model.init_from, expert parallel)
# -> moesys export -> offloaded generation.
#   launch/upcycle_train_export.sh DENSE_DIR WORK_DIR [--set KEY=VALUE ...]   (extra flags go to the trainer)
# Writes WORK_DIR/moe (upcycled), WORK_DIR/run (training run), WORK_DIR/hf (exported model).
# Environment: NUM_EXPERTS (8), TOP_K (2), NPROC (GPUs, else 2 CPU processes), EP (= NPROC),
# CONFIG (configs/finetune.yaml: sets no model keys, the shape comes from the checkpoint),
# PROMPT ("def main("), GPU_MEMORY (16GiB), MAX_NEW_TOKENS (32), PYTHON (python).
set -euo pipefail
DENSE_DIR=${1:?usage: $0 DENSE_DIR WORK_DIR [--set KEY=VALUE ...]}
WORK_DIR=${2:?usage: $0 DENSE_DIR WORK_DIR [--set KEY=VALUE ...]}
shift 2
PY=${PYTHON:-python}
cd "$(dirname "$0")/.."
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l || true)}
NPROC=$(( NPROC > 0 ? NPROC : 2 ))
EP=${EP:-$NPROC}

# a second call continues the same run: the upcycled checkpoint is kept, training resumes
[ -f "$WORK_DIR/moe/config.json" ] || \
    "$PY" -m moesys.cli upcycle "$DENSE_DIR" "$WORK_DIR/moe" --num-experts "${NUM_EXPERTS:-8}" --top-k "${TOP_K:-2}"
"$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m moesys.train \
    --config "${CONFIG:-configs/finetune.yaml}" --run-dir "$WORK_DIR/run" --resume \
    --set "model.init_from=$WORK_DIR/moe" --set "parallel.ep=$EP" "$@"
"$PY" -m moesys.cli export "$WORK_DIR/run" "$WORK_DIR/hf" --force
"$PY" -m moesys.cli generate "$WORK_DIR/hf" --prompt "${PROMPT:-def main(}" \
    --gpu-memory "${GPU_MEMORY:-16GiB}" --max-new-tokens "${MAX_NEW_TOKENS:-32}"
