#!/bin/bash
# One command on every worker of a Cloud TPU VM slice, over gcloud ssh.
#
#   launch/tpu_vm.sh --tpu my-v5e-32 --zone us-west4-a [--project P] [--dir ~/pretrain] [--copy] \
#       -- python -m pretrain.main --config configs/clip.py:b16 --workdir /mnt/shared/run
#   launch/tpu_vm.sh --dry-run --tpu my-v5e-32 --zone us-west4-a -- python -m pretrain.main ...
#
# Every worker runs the same command in --dir; JAX finds the slice's workers and this
# worker's id itself (pretrain/distributed.py calls jax.distributed.initialize() on a TPU VM).
# --copy first copies this checkout to --dir on every worker. --dry-run prints the gcloud
# commands instead of running them. The workdir must be a filesystem every worker mounts
# (NFS / Filestore, or a gcsfuse mount of a bucket): metrics and config are written with
# plain file I/O, so a gs:// URL is not supported as a workdir.
set -euo pipefail

usage() {
  echo "usage: launch/tpu_vm.sh [--dry-run] [--copy] --tpu NAME --zone ZONE [--project P] [--dir DIR] -- COMMAND ..." >&2
  exit 2
}

tpu="" zone="" project="" dir="~/pretrain" dry_run=0 copy=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) tpu="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --dir) dir="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --copy) copy=1; shift ;;
    --) shift; break ;;
    *) echo "unknown option '$1'" >&2; usage ;;
  esac
done
[[ -n "$tpu" && -n "$zone" && $# -gt 0 ]] || usage

gcloud_args=(--zone "$zone")
[[ -n "$project" ]] && gcloud_args+=(--project "$project")

# The remote shell sees one string: quote every word of the command so spaces and
# metacharacters in arguments arrive unchanged.
remote="cd $dir && $(printf '%q ' "$@")"

run() {
  if [[ $dry_run == 1 ]]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

if [[ $copy == 1 ]]; then
  repo="$(cd "$(dirname "$0")/.." && pwd)"
  run gcloud compute tpus tpu-vm scp --recurse "$repo/." "$tpu:$dir" --worker=all "${gcloud_args[@]}"
fi
run gcloud compute tpus tpu-vm ssh "$tpu" --worker=all "${gcloud_args[@]}" --command "$remote"
