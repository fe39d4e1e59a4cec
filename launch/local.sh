#!/usr/bin/env bash
# One machine, all local devices (GPUs, TPU cores or CPU).
#
# Variables:
#   CONFIG   config file and variant   (default: configs/plmca.py)
#   WORKDIR  run directory             (default: runs/$(basename CONFIG .py))
#   PYTHON   interpreter               (default: .venv/bin/python if present, else python3)
# Extra arguments are passed to medcode_jax.main, e.g. config overrides:
#   CONFIG=configs/plmca.py:demo launch/local.sh --config.train.num_epochs=2
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${CONFIG:-configs/plmca.py}"
name="$(basename "${CONFIG%%:*}" .py)"
WORKDIR="${WORKDIR:-runs/${name}}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" -m medcode_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
