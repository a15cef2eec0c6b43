#!/usr/bin/env bash
# Offloaded generation on one GPU: an MoE checkpoint bigger than the GPU, experts streamed from host memory.
#   launch/generate.sh MODEL_DIR "prompt text" [extra `moesys generate` flags...]
# Environment: GPU_MEMORY (default 16GiB), MAX_NEW_TOKENS (default 128), QUANTIZE (none|int8|int4, default none).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 MODEL_DIR PROMPT [--cache-policy lru|lfu] [--prefetch next-gate|none] [--cpu-experts auto|on|off] ..." >&2
  exit 2
fi
MODEL_DIR=$1
PROMPT=$2
shift 2
cd "$(dirname "$0")/.."
exec python -m moesys.cli generate "$MODEL_DIR" --prompt "$PROMPT" \
  --gpu-memory "${GPU_MEMORY:-16GiB}" --max-new-tokens "${MAX_NEW_TOKENS:-128}" \
  --quantize-experts "${QUANTIZE:-none}" "$@"
