#!/usr/bin/env bash
# A TPU pod slice (e.g. v5p-32): the same command on every worker; jax.distributed.initialize()
# discovers the slice itself. Data and model paths must be readable from every worker (GCS FUSE or
# a copy per worker); the output directory must be shared.
#   gcloud compute tpus tpu-vm ssh $TPU --zone $ZONE --worker=all --command \
#     "cd lora-jax && bash experiments/launch/tpu_pod.sh"
set -euo pipefail
pip install -q -e . "jax[tpu]"
lora-jax train --distributed \
    --config experiments/configs/llama-3-8b.yaml --model "${MODEL:-/mnt/models/Meta-Llama-3-8B}" \
    --data "${DATA:-/mnt/data/train.jsonl}" \
    --set mesh.fsdp=-1 --set mesh.tensor=1 --set train.batch_size=64 \
    --output-dir "${OUT:-/mnt/shared/runs/llama-3-8b-lora}"
