#!/usr/bin/env bash
# Train on the GPUs of one machine (all of them unless NPROC is set); resumes the run if it has checkpoints.
#   launch/single_node.sh configs/small.yaml runs/small [--set train.steps=1000 ...]
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG RUN_DIR [--set KEY=VALUE ...]}
RUN_DIR=${2:?usage: $0 CONFIG RUN_DIR [--set KEY=VALUE ...]}
shift 2
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}
NPROC=$(( NPROC > 0 ? NPROC : 1 ))
exec torchrun --standalone --nproc_per_node "$NPROC" -m moesys.train \
    --config "$CONFIG" --run-dir "$RUN_DIR" --resume "$@"
