#!/bin/bash
# Stand-in for NGC's /opt/nvidia/nvidia_entrypoint.sh: print a banner, then run the command.
# (NGC's also sets up CUDA forward compatibility and checks the driver; there is no GPU here.)
set -euo pipefail
echo "== PyTorch (CI stand-in for NGC ${NVIDIA_PYTORCH_VERSION:-?}, CPU only) =="
exec "$@"
