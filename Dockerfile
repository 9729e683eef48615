# torchtitan-runai training image: NGC PyTorch + torchtitan 0.2.2 + this package.
#
# Base image. torchtitan 0.2.2 is built and tested against torch 2.10 nightlies; NGC PyTorch 25.12
# is the first NGC release on torch 2.10 (2.10.0a0+b4e4ee81d3, CUDA 13.1, Python 3.12,
# Ubuntu 24.04; release notes of 25.12). The seed's 25.01 (torch 2.6) predates APIs torchtitan
# 0.2.2 imports. A newer tag (torch >= 2.10) can be passed with --build-arg BASE_IMAGE=...;
# docker/pin_to_image.py stops the build if the base's torch is older than 2.10.
#
# torch is never reinstalled: every package the base image ships is pinned to its installed
# version in a constraints file before anything is installed, and verified unchanged afterwards
# (docker/pin_to_image.py). Our own dependencies come from docker/requirements.lock.
#
# Runs as any non-root UID (Kubernetes runAsUser, OpenShift random UIDs): HOME, the caches and
# /outputs are world-writable (sticky) and USER is numeric so runAsNonRoot can verify it.
# PID 1 is tini: it forwards SIGTERM to the launcher (which owns the emergency checkpoint) and
# reaps orphaned dataloader and async-checkpoint processes.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.12-py3
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN apt-get update \
    && apt-get install -y --no-install-recommends "tini=0.19.*" \
    && rm -rf /var/lib/apt/lists/* \
    && tini --version

ENV APP_DIR=/workspace/torchtitan-runai
WORKDIR ${APP_DIR}

# Dependencies first, so code edits do not rebuild this layer.
COPY docker/requirements.lock docker/pin_to_image.py docker/
RUN python docker/pin_to_image.py plan docker/requirements.lock \
        --constraints /etc/torchtitan-runai-constraints.txt --requirements /tmp/requirements.txt \
    && python -m pip install --no-cache-dir \
        -c /etc/torchtitan-runai-constraints.txt -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# --no-deps: pyproject.toml pins exact versions for a bare venv; here the image's versions win
# and the lock filled in the rest (tests/unit/test_dockerfile.py checks the lock covers pyproject).
COPY . .
RUN python -m pip install --no-cache-dir --no-deps -c /etc/torchtitan-runai-constraints.txt . \
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
