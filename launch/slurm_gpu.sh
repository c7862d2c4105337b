#!/usr/bin/env bash
# Multi-node GPU training of scott_jax under SLURM: one process per GPU, jax.distributed started from SLURM's
# variables (scott_jax.parallel.initialize_distributed, config.mesh.distributed=auto), one global mesh.
#
#   sbatch [--nodes=N] [--gpus-per-node=G --ntasks-per-node=G] launch/slurm_gpu.sh \
#       --config configs/sd15_scott.py --workdir runs/sd15_scott [--config.key=value ...]
#   bash launch/slurm_gpu.sh --dry-run --config configs/sd15_scott.py --workdir runs/sd15_scott
#
# Everything after the options below goes to `python -m scott_jax.main` (default --mode train). Environment:
# SCOTT_PYTHON (default: python), SCOTT_MODE (default: train), SCOTT_REPO (default: this script's repository).
# --dry-run prints the environment the processes would see and the command, and runs nothing.
#SBATCH --job-name=scott
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
  dry_run=1
  shift
fi
if [[ $# -eq 0 ]]; then
  echo "usage: sbatch launch/slurm_gpu.sh [--dry-run] --config CONFIG --workdir DIR [--config.key=value ...]" >&2
  exit 2
fi
if [[ -n "${SCOTT_REPO:-}" ]]; then
  repo="$SCOTT_REPO"
elif [[ -n "${SLURM_SUBMIT_DIR:-}" && -d "${SLURM_SUBMIT_DIR}/scott_jax" ]]; then
  repo="$SLURM_SUBMIT_DIR"  # sbatch runs a copy of this script from a spool directory
else
  repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fi
python="${SCOTT_PYTHON:-python}"
mode="${SCOTT_MODE:-train}"

# One process per GPU: JAX's SLURM detection gives each process the GPU of its SLURM_LOCALID. XLA may take
# most of the GPU memory up front (the plan mode's per-device numbers say how much the step needs).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export PYTHONUNBUFFERED=1

cmd=(srun --kill-on-bad-exit=1 --cpu-bind=none "$python" -m scott_jax.main --mode "$mode" "$@")

nodes="${SLURM_JOB_NUM_NODES:-<nodes>}"
tasks="${SLURM_NTASKS:-<ntasks>}"
echo "scott_jax on SLURM: job ${SLURM_JOB_ID:-<none>}, ${nodes} node(s), ${tasks} process(es), nodes ${SLURM_JOB_NODELIST:-<none>}"
echo "cd $repo"
echo "XLA_PYTHON_CLIENT_MEM_FRACTION=$XLA_PYTHON_CLIENT_MEM_FRACTION"
echo "${cmd[*]}"
if [[ $dry_run -eq 1 ]]; then
  exit 0
fi
cd "$repo"
exec "${cmd[@]}"
