#!/usr/bin/env bash
# One host, all of its GPUs, one process (JAX drives every local GPU from it).
#
#   CONFIG=configs/xray.py WORKDIR=workdirs/xray launch/single_host_gpu.sh [--config.key=value ...]
#
# The mesh comes from config.mesh: the default [('data', -1)] is data parallel over every GPU. To shard the
# parameters and AdamW moments as well (fsdp), add for example
#   --config.mesh.axes="[('data', -1), ('fsdp', 8)]" --config.mesh.shard_params=True
# Plan first: --config.mode=compile prints the per-GPU memory of the run before it is paid for.
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG="${CONFIG:-configs/xray.py}"
WORKDIR="${WORKDIR:-workdirs/$(basename "${CONFIG%%:*}" .py)}"

# Let XLA take most of each GPU up front (no fragmentation from growing allocations), and overlap the
# gradient all-reduces with the backward pass.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
# TensorFlow is imported only for TensorBoard event files; keep its start-up messages quiet.
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"

exec python -m invcoss_jax.main --config="${CONFIG}" --workdir="${WORKDIR}" "$@"
