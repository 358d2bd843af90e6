#!/usr/bin/env bash
# Cloud TPU VM pod slice (e.g. v4-32, v5e-64): the same command on every worker, started from your machine.
#
#   TPU_NAME=my-tpu ZONE=us-central2-b WORKDIR=/mnt/shared/workdirs/xray launch/tpu_pod.sh setup
#   TPU_NAME=my-tpu ZONE=us-central2-b WORKDIR=/mnt/shared/workdirs/xray launch/tpu_pod.sh run [--config.key=value ...]
#
# `setup` copies this checkout to every worker and installs it with JAX for TPU; `run` starts
# launch/distributed_main.py --distributed=tpu on all workers at once (the workers find each other from the
# TPU metadata). WORKDIR must be storage all workers share (a Filestore/NFS mount, or a GCS bucket mounted
# with gcsfuse): every worker writes its part of each checkpoint there. Data: each worker reads its own share
# of config.data.path, which must exist on every worker (the same mount).
set -euo pipefail

TPU_NAME="${TPU_NAME:?set TPU_NAME}"
ZONE="${ZONE:?set ZONE}"
CONFIG="${CONFIG:-configs/xray.py}"
WORKDIR="${WORKDIR:?set WORKDIR to storage every worker shares}"
REMOTE_DIR="${REMOTE_DIR:-invcoss_jax}"
ACTION="${1:?usage: tpu_pod.sh setup|run [--config.key=value ...]}"
shift

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --worker=all --command="$1"
}

case "${ACTION}" in
  setup)
    repo="$(cd "$(dirname "$0")/.." && pwd)"
    gcloud compute tpus tpu-vm scp --recurse "${repo}" "${TPU_NAME}:~/${REMOTE_DIR}" --zone="${ZONE}" --worker=all
    on_all_workers "cd ~/${REMOTE_DIR} && python3 -m pip install -q -U 'jax[tpu]' && python3 -m pip install -q -e ."
    ;;
  run)
    args=$(printf " %q" "$@")
    on_all_workers "cd ~/${REMOTE_DIR} && python3 launch/distributed_main.py --distributed=tpu \
      --config=${CONFIG} --workdir=${WORKDIR}${args}"
    ;;
  *)
    echo "unknown action ${ACTION}: expected setup or run" >&2
    exit 2
    ;;
esac
