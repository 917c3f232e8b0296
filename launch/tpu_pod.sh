#!/usr/bin/env bash
# Create a Cloud TPU VM pod slice and run one cxrjax experiment on every worker.
#
#   launch/tpu_pod.sh NAME ZONE ACCELERATOR [ARGS...]
#   launch/tpu_pod.sh cxr-v4 us-central2-b v4-32 --config=configs/sweep.py:full --workdir=gs://BUCKET/sweep
#
# Every worker runs the same command; `--distributed` makes cxrjax call
# jax.distributed.initialize(), which finds the coordinator on TPU VMs by itself.
# Grain gives each process its rows of every global batch; orbax checkpoints are
# written by all processes to the shared workdir (use a gs:// bucket or a shared
# filesystem). JAX_PLATFORMS=tpu: the stock backend (plain Flax/optax/XLA) runs.
# Set RUNTIME (TPU software version) and REPO (git URL) as needed.
set -euo pipefail
NAME="${1:?NAME}"; ZONE="${2:?ZONE}"; ACCEL="${3:?ACCELERATOR e.g. v4-32}"; shift 3
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
REPO="${REPO:-https://github.com/your-org/cxrjax.git}"
MODULE="${MODULE:-cxrjax.main}"  # cxrjax.sweep for a sweep

if ! gcloud compute tpus tpu-vm describe "$NAME" --zone "$ZONE" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$NAME" --zone "$ZONE" --accelerator-type "$ACCEL" --version "$RUNTIME"
fi

SETUP="set -e; [ -d cxrjax ] || git clone $REPO cxrjax; cd cxrjax; python3 -m venv .venv;
.venv/bin/pip install -q -c constraints.txt -e '.[tpu]'"
gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "$SETUP"

ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all \
  --command "cd cxrjax && JAX_PLATFORMS=tpu CXRJAX_DISTRIBUTED=1 .venv/bin/python -m $MODULE --distributed $ARGS"
