#!/usr/bin/env bash
# Container entrypoint: turn the pod's environment into a torchrun job and train.
# All logic (environment shapes, validation, exit codes) lives in torchtitan_runai/launcher/launch.py;
# its module docstring lists every variable. Usage:
#   CONFIG_FILE=./train_configs/llama3_8b.toml ./run_llama_train.sh [--dry-run] [torchtitan args...]
# Never enable shell tracing here: HF_TOKEN is in the environment.
set -euo pipefail

# The launcher reads a relative CONFIG_FILE from where this script was called, not from the repository.
export TORCHTITAN_RUNAI_CALLER_DIR="$PWD"
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
if [ -x ".venv/bin/python" ] && [ -z "${VIRTUAL_ENV:-}" ]; then
    PYTHON=".venv/bin/python"
fi
exec "$PYTHON" -m torchtitan_runai.launch "$@"
