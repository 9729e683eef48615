# torchtitan-runai training image: NGC PyTorch + torchtitan 0.2.2 + this package.
#
# Base image (a build argument). The default, NGC PyTorch 26.07, ships torch 2.13.0a0 (CUDA
# 13.3.1, Python 3.12, Ubuntu 24.04): the newest supported release, on the torch line this project
# is tested on. Supported: 25.12 (torch 2.10, the first that runs torchtitan 0.2.2) to 26.07; CI
# builds on stand-ins of both ends. Another can be passed with --build-arg BASE_IMAGE=...; the
# build stops if the base's torch is older than 2.10 or its pins conflict with pyproject.toml's
# ranges. docs/cluster.md ("The image") lists the supported releases and how to move to another one.
#
# torch is never reinstalled: every package the base image ships is pinned to its installed
# version (as NGC's own /etc/pip/constraint.txt does), pyproject.toml's compatible ranges are
# resolved against those pins at build time, the result must pass `pip check`, and the base's
# packages are verified unchanged afterwards (docker/pin_to_image.py).
#
# Runs as any non-root UID (Kubernetes runAsUser, OpenShift random UIDs): HOME, the caches and
# /outputs are world-writable (sticky) and USER is numeric so runAsNonRoot can verify it.
# PID 1 is tini: it forwards SIGTERM to the launcher (which owns the emergency checkpoint) and
# reaps orphaned dataloader and async-checkpoint processes.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:26.07-py3
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
USER 0

RUN apt-get update \
    && apt-get install -y --no-install-recommends "tini=0.19.*" \
    && rm -rf /var/lib/apt/lists/* \
    && tini --version

ENV APP_DIR=/workspace/torchtitan-runai
WORKDIR ${APP_DIR}

# Dependencies first (only pyproject.toml decides them), so code edits do not rebuild this layer.
COPY pyproject.toml docker/pin_to_image.py docker/
RUN python docker/pin_to_image.py plan docker/pyproject.toml \
        --constraints /etc/torchtitan-runai-constraints.txt --requirements /tmp/requirements.txt \
    && { python -m pip install --no-cache-dir \
            -c /etc/torchtitan-runai-constraints.txt -r /tmp/requirements.txt \
        || { echo "pyproject.toml's ranges cannot be resolved against this base's pinned packages" \
                  "(pip names the conflict above). Fix: a BASE_IMAGE that docs/cluster.md lists as" \
                  "supported, or widen the range in pyproject.toml if the project works with the base's version" >&2; \
             exit 1; }; } \
    && rm /tmp/requirements.txt docker/pyproject.toml \
    && python -m pip check

# --no-deps: the layer above installed exactly these dependencies from the same pyproject.toml;
# `pip check` proves the package's requirements are met. --no-build-isolation: build with the
# base's setuptools instead of fetching one, so a code change rebuilds without the network.
COPY . .
RUN python -m pip install --no-cache-dir --no-deps --no-build-isolation \
        -c /etc/torchtitan-runai-constraints.txt . \
    && python -m pip check \
    && python docker/pin_to_image.py verify /etc/torchtitan-runai-constraints.txt \
    && python -c "import torch, torchtitan, torchtitan_runai; print('torch', torch.__version__)" \
    && chmod 0755 run_llama_train.sh \
    && rm -rf build ./*.egg-info \
    && mkdir -p /home/trainer/.cache /outputs \
    && chmod 1777 /home/trainer /home/trainer/.cache /outputs

# USER: getpass.getuser() (torch's inductor/triton cache paths) falls back to the passwd entry,
# which an arbitrary UID does not have; the env var answers first.
ENV HOME=/home/trainer \
    USER=trainer \
    XDG_CACHE_HOME=/home/trainer/.cache \
    TRITON_CACHE_DIR=/home/trainer/.cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/home/trainer/.cache/torchinductor \
    OUTPUT_DIR=/outputs \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

LABEL org.opencontainers.image.title="torchtitan-runai" \
      org.opencontainers.image.description="Llama 3.1 pretraining with torchtitan 0.2.2 on Run:ai / Kubeflow"

USER 1000

# -s: still reap children when tini is not PID 1 (e.g. shareProcessNamespace).
# nvidia_entrypoint.sh sets up the CUDA forward-compat libraries and prints the NGC banner, then execs.
ENTRYPOINT ["/usr/bin/tini", "-s", "--", "/opt/nvidia/nvidia_entrypoint.sh", "/workspace/torchtitan-runai/run_llama_train.sh"]
CMD []
