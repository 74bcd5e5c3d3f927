#!/usr/bin/env bash
# Multi-host GPU training without a scheduler: start this on every host with its own PROCESS_ID.
#   COORDINATOR=host0:12345 NUM_PROCESSES=2 PROCESS_ID=0 bash experiments/launch/torchrun_style_gpu.sh
#   COORDINATOR=host0:12345 NUM_PROCESSES=2 PROCESS_ID=1 bash experiments/launch/torchrun_style_gpu.sh
# The output directory must be on a filesystem every host sees (checkpoints are written collectively).
set -euo pipefail
export NCCL_NVLS_ENABLE=0
export LORA_JAX_COORDINATOR=${COORDINATOR:?host:port of process 0}
export LORA_JAX_NUM_PROCESSES=${NUM_PROCESSES:?number of hosts}
export LORA_JAX_PROCESS_ID=${PROCESS_ID:?this host, 0..NUM_PROCESSES-1}
lora-jax train --config experiments/configs/llama-3-8b.yaml \
    --model "${MODEL:-/models/Meta-Llama-3-8B}" --data "${DATA:-/data/train.jsonl}" \
    --set mesh.fsdp=-1 --output-dir "${OUT:-/shared/runs/llama-3-8b-lora}"
