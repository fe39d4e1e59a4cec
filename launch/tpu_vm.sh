#!/usr/bin/env bash
# Cloud TPU VM (single host or pod slice): set up every worker, then start the same command on
# all of them. Runs on your machine; talks to the workers through `gcloud`.
#
#   NAME=my-v4-32 ZONE=us-central2-b launch/tpu_vm.sh setup     # copy the repo, build the venv
#   NAME=my-v4-32 ZONE=us-central2-b CONFIG=configs/plmca.py WORKDIR=/mnt/shared/runs/plmca \
#       launch/tpu_vm.sh run --config.data.dir=/mnt/shared/data/mimiciv_icd10 \
#       --config.encoder.path=/mnt/shared/models/RoBERTa-base-PM-M3-Voc-distill-align-hf
#   NAME=my-v4-32 ZONE=us-central2-b launch/tpu_vm.sh stop      # kill a stuck run on all workers
#   DRY_RUN=1 NAME=x ZONE=y launch/tpu_vm.sh run                 # print the commands only
#
# Commands:
#   setup  put the repository in REMOTE_DIR on every worker: `git clone` of REPO_URL (at REF)
#          when REPO_URL is set, otherwise a tarball of this working tree (without .git,
#          .venv, data/, runs/) copied with `gcloud compute tpus tpu-vm scp --worker=all`;
#          then build REMOTE_DIR/.venv there: pip install -e ".[EXTRAS]" "JAX_SPEC". (`make
#          venv` is for CPU machines: it pins a CPU PyTorch wheel and the test extras.)
#   run    on every worker at once (gcloud compute tpus tpu-vm ssh NAME --worker=all
#          --command ...): cd REMOTE_DIR && .venv/bin/python -m medcode_jax.main
#          --config=CONFIG --workdir=WORKDIR --multihost=yes "$@". jax.distributed.initialize()
#          finds the workers of the slice from the TPU metadata server. The command stays
#          attached: run this script inside tmux/screen on your machine for long runs.
#   stop   pkill the medcode_jax.main processes on every worker (a dead run that still holds
#          the TPU makes the next one fail with "TPU in use").
#
# Variables:
#   NAME, ZONE   TPU VM name and zone (required)
#   PROJECT      GCP project (default: gcloud's configured project)
#   REMOTE_DIR   checkout on each worker, relative to its home (default: medcode_jax)
#   REPO_URL     git URL to clone on the workers (default: copy this working tree)
#   REF          branch, tag or commit to check out with REPO_URL (default: the default branch)
#   JAX_SPEC     JAX requirement (default: jax[tpu]; pin it, e.g. 'jax[tpu]==0.10.2', to match
#                the version you tested with)
#   EXTRAS       package extras, e.g. torch (--mode=export) or demo (data_prep.demo_corpus)
#   PIP_ARGS     extra pip options, e.g. "--extra-index-url https://download.pytorch.org/whl/cpu"
#                (a CPU PyTorch wheel is enough on a TPU VM)
#   REMOTE_PYTHON  interpreter that creates the venv on the workers (default: python3, 3.10+)
#   CONFIG       config file and variant (default: configs/plmca.py)
#   WORKDIR      run directory on the workers (default: runs/$(basename CONFIG .py)); every
#                worker writes its part of each Orbax checkpoint there, so on a pod slice it
#                must be a filesystem all workers share (Filestore/NFS or a gcsfuse mount)
#   SSH_ARGS     extra `gcloud ... ssh/scp` options, e.g. --internal-ip or --tunnel-through-iap
#   DRY_RUN=1    print every command (tar, gcloud) instead of running it
# Extra arguments of `run` are passed to medcode_jax.main (config overrides, --mode=eval, ...).
# Data: config.data.dir (and encoder.path) must exist on every worker: a shared mount, or copy
# it, e.g. gcloud compute tpus tpu-vm scp --recurse --worker=all --zone=ZONE data/mimiciv_icd10 \
#   NAME:medcode_jax/data/
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  echo "usage: NAME=<tpu> ZONE=<zone> [PROJECT=<project>] $0 setup|run|stop" \
       "[medcode_jax.main args]" >&2
  exit 2
}
action="${1:-}"
[[ "$action" == setup || "$action" == run || "$action" == stop ]] || usage
shift
: "${NAME:?set NAME to the TPU VM name}" "${ZONE:?set ZONE to the TPU VM zone}"
REMOTE_DIR="${REMOTE_DIR:-medcode_jax}"
JAX_SPEC="${JAX_SPEC:-jax[tpu]}"
REMOTE_PYTHON="${REMOTE_PYTHON:-python3}"
CONFIG="${CONFIG:-configs/plmca.py}"
name="$(basename "${CONFIG%%:*}" .py)"
WORKDIR="${WORKDIR:-runs/${name}}"
read -r -a ssh_args <<<"${SSH_ARGS:-}"
read -r -a pip_args <<<"${PIP_ARGS:-}"
gcloud_opts=(--zone="$ZONE" ${PROJECT:+--project="$PROJECT"} "${ssh_args[@]}")

# Run a command, or print it (one line, shell-quoted where needed) when DRY_RUN is set.
run_cmd() {
  if [[ -z "${DRY_RUN:-}" ]]; then "$@"; return; fi
  local arg line=""
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then line+="$arg "; else line+="${arg@Q} "; fi
  done
  echo "${line% }"
}
# Quote words into one string for a remote shell.
quote() { local out; printf -v out '%q ' "$@"; echo "${out% }"; }
on_all_workers() {  # the arguments, joined by spaces, are the remote command
  run_cmd gcloud compute tpus tpu-vm ssh "$NAME" "${gcloud_opts[@]}" --worker=all --command="$*"
}

case "$action" in
  setup)
    dir="$(quote "$REMOTE_DIR")"
    if [[ -n "${REPO_URL:-}" ]]; then
      url="$(quote "$REPO_URL")"
      fetch="{ [ -d $dir/.git ] || git clone --quiet $url $dir; }"
      if [[ -n "${REF:-}" ]]; then
        fetch+=" && git -C $dir fetch --quiet origin $(quote "$REF")"
        fetch+=" && git -C $dir checkout --quiet --detach FETCH_HEAD"
      else
        fetch+=" && git -C $dir pull --quiet --ff-only"
      fi
      on_all_workers "set -e; $fetch"
    else
      archive="${TMPDIR:-/tmp}/medcode_jax-${NAME}.tgz"
      run_cmd tar -C "$REPO" -czf "$archive" --exclude=./.git --exclude=./.venv \
        --exclude=./data --exclude=./runs --exclude='*.egg-info' --exclude=__pycache__ .
      run_cmd gcloud compute tpus tpu-vm scp "$archive" "$NAME:medcode_jax-src.tgz" \
        "${gcloud_opts[@]}" --worker=all
      on_all_workers "set -e; mkdir -p $dir && tar -xzf medcode_jax-src.tgz -C $dir" \
                     "&& rm medcode_jax-src.tgz"
      run_cmd rm -f "$archive"
    fi
    spec=.
    if [[ -n "${EXTRAS:-}" ]]; then spec=".[${EXTRAS}]"; fi
    venv="cd $dir && $(quote "$REMOTE_PYTHON") -m venv .venv"
    venv+=" && .venv/bin/pip install -q --upgrade pip"
    venv+=" && .venv/bin/pip install -q $(quote "${pip_args[@]}" -e "$spec" "$JAX_SPEC")"
    # smoke test: every worker must see the whole slice
    venv+=" && .venv/bin/python -c 'import jax; print(jax.process_index(), jax.device_count())'"
    on_all_workers "set -e; $venv"
    ;;
  run)
    main_args="$(quote --config="$CONFIG" --workdir="$WORKDIR" --multihost=yes "$@")"
    on_all_workers "cd $(quote "$REMOTE_DIR") && exec .venv/bin/python -m medcode_jax.main $main_args"
    ;;
  stop)
    on_all_workers "pkill -f -- '-m medcode_jax[.]main' || true"
    ;;
esac
