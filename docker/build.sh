#!/usr/bin/env bash
# Build the training image without a Docker daemon (buildah), as CI does.
#
#   docker/build.sh [TAG]        # TAG defaults to torchtitan-runai:dev
#   BASE_IMAGE=nvcr.io/nvidia/pytorch:<yy.mm>-py3 docker/build.sh
#
# With Docker, `docker build -t TAG .` builds the same image. pip inside the build reaches PyPI
# the way this host does: the host's CA bundle (TTR_CA_BUNDLE, default the system bundle) is
# bind-mounted for the build only, never copied into a layer. runc with --isolation oci: crun,
# the default runtime, rejects hosts with a hybrid cgroup layout; --format docker keeps SHELL
# (the OCI format drops it); --force-rm: a failed build leaves no working container behind.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tag="${1:-torchtitan-runai:dev}"
ca_bundle="${TTR_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
args=(--isolation oci --runtime runc --format docker --layers --force-rm --tag "${tag}")
if [[ -n "${BASE_IMAGE:-}" ]]; then
    args+=(--build-arg "BASE_IMAGE=${BASE_IMAGE}")
fi
if [[ -f "${ca_bundle}" ]]; then
    args+=(--volume "${ca_bundle}:/etc/ssl/certs/ca-certificates.crt:ro")
fi
exec buildah bud "${args[@]}" "${repo}"
