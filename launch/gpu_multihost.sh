#!/usr/bin/env bash
#SBATCH --job-name=qaff
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=48:00:00
# Multi-host GPU training, one process per node, all GPUs of a node per process.
#
# Under SLURM:   sbatch launch/gpu_multihost.sh configs/gldv2.py /shared/runs/r101 [flags]
# By hand:       on every node run, with the same COORDINATOR (host:port of node 0),
#                NUM_PROCESSES and a distinct PROCESS_ID per node:
#   COORDINATOR=10.0.0.1:12345 NUM_PROCESSES=2 PROCESS_ID=0 \
#     bash launch/gpu_multihost.sh configs/gldv2.py /shared/runs/r101
# The workdir must be on storage every node sees (NFS, GCS, ...).
set -euo pipefail
CONFIG=${1:?config, e.g. configs/gldv2.py}
WORKDIR=${2:?workdir visible to all nodes}
shift 2

if [ -n "${SLURM_JOB_ID:-}" ] && [ -z "${IN_SRUN:-}" ]; then
  # jax.distributed.initialize() reads SLURM's variables by itself.
  exec srun --export=ALL,IN_SRUN=1 bash "$0" "$CONFIG" "$WORKDIR" "$@"
fi
if [ -z "${SLURM_JOB_ID:-}" ]; then
  export JAX_COORDINATOR_ADDRESS=${COORDINATOR:?set COORDINATOR=host:port}
  export JAX_NUM_PROCESSES=${NUM_PROCESSES:?set NUM_PROCESSES}
  export JAX_PROCESS_ID=${PROCESS_ID:?set PROCESS_ID}
fi
exec python -m qaff_jax.train --config "$CONFIG" --workdir "$WORKDIR" "$@"
