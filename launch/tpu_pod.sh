#!/usr/bin/env bash
# Training of scott_jax on a Cloud TPU VM slice (single host or pod): the same command on every worker through
# `gcloud compute tpus tpu-vm ssh --worker=all`; jax.distributed finds the other hosts through the TPU metadata
# (config.mesh.distributed=on), and the mesh spans every chip of the slice.
#
#   launch/tpu_pod.sh --tpu NAME --zone ZONE [--project P] [--repo DIR] [--setup] [--dry-run] -- \
#       --config configs/sd15_scott.py --workdir gs://bucket/runs/sd15_scott [--config.key=value ...]
#
# --repo: the checkout on every worker (default: ~/scott_jax; copy it there first, e.g. with
#   `gcloud compute tpus tpu-vm scp --recurse --worker=all`). --setup: first install the package with its
#   TPU extra on every worker (pip install -e ".[tpu]"). --dry-run: print the gcloud commands, run nothing.
# Arguments after `--` go to `python -m scott_jax.main` (default --mode train; SCOTT_MODE overrides).
set -euo pipefail

tpu="" zone="" project="" repo="~/scott_jax" setup=0 dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) tpu="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --repo) repo="$2"; shift 2 ;;
    --setup) setup=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) echo "unknown option $1 (main's arguments go after --)" >&2; exit 2 ;;
  esac
done
if [[ -z "$tpu" || -z "$zone" || $# -eq 0 ]]; then
  echo "usage: launch/tpu_pod.sh --tpu NAME --zone ZONE [--project P] [--repo DIR] [--setup] [--dry-run] -- MAIN_ARGS" >&2
  exit 2
fi
mode="${SCOTT_MODE:-train}"

ssh=(gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all)
if [[ -n "$project" ]]; then
  ssh+=(--project "$project")
fi
quoted=$(printf ' %q' "$@")
remote_train="cd $repo && PYTHONUNBUFFERED=1 python3 -m scott_jax.main --mode $mode --config.mesh.distributed=on${quoted}"
remote_setup="cd $repo && python3 -m pip install -q -e '.[tpu]'"

run() {
  echo "$(printf '%q ' "${@:1:$(($# - 1))}")--command $(printf '%q' "${@: -1}")"
  if [[ $dry_run -eq 0 ]]; then
    "${@:1:$(($# - 1))}" --command "${@: -1}"
  fi
}
if [[ $setup -eq 1 ]]; then
  run "${ssh[@]}" "$remote_setup"
fi
run "${ssh[@]}" "$remote_train"
