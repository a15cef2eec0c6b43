#!/usr/bin/env bash
# Train under MPI: mpi4py gives rank and world size, rank 0 broadcasts the rendezvous address
# (pip install 'moesys[mpi]'). NP processes in all, one per GPU; HOSTFILE is optional.
#   NP=16 HOSTFILE=hosts.txt launch/mpirun.sh configs/mixtral-like.yaml /shared/runs/mixtral
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG RUN_DIR [--set KEY=VALUE ...]}
RUN_DIR=${2:?usage: $0 CONFIG RUN_DIR [--set KEY=VALUE ...]}
shift 2
NP=${NP:-$(nvidia-smi -L 2>/dev/null | wc -l)}
HOSTS=()
if [[ -n "${HOSTFILE:-}" ]]; then HOSTS=(--hostfile "$HOSTFILE"); fi
exec mpirun -n "$NP" "${HOSTS[@]}" python -m moesys.train \
    --config "$CONFIG" --run-dir "$RUN_DIR" --resume "$@"
