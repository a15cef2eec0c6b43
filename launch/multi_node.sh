#!/usr/bin/env bash
# Train on several machines with torchrun's c10d rendezvous. Run this same command on every node:
#   MASTER_ADDR=node0 NNODES=4 launch/multi_node.sh configs/mixtral-like.yaml /shared/runs/mixtral
# MASTER_ADDR: a host every node reaches (the rendezvous runs there); MASTER_PORT (29500), NPROC
# (GPUs per node), RUN_ID (one id per job) are optional. RUN_DIR must be on a file system all nodes share
# (checkpoints are written to a temporary directory there and renamed).
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG RUN_DIR [--set KEY=VALUE ...]}
RUN_DIR=${2:?usage: $0 CONFIG RUN_DIR [--set KEY=VALUE ...]}
shift 2
: "${MASTER_ADDR:?set MASTER_ADDR to the rendezvous host}"
: "${NNODES:?set NNODES to the number of machines}"
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}
exec torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC" \
    --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv_id "${RUN_ID:-moesys}" \
    --max_restarts "${MAX_RESTARTS:-0}" \
    -m moesys.train --config "$CONFIG" --run-dir "$RUN_DIR" --resume "$@"
