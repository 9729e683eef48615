#!/usr/bin/env bash
# Build (or reuse) CI's stand-in for the NGC PyTorch base, tagged with the Dockerfile's FROM name.
#
#   docker/standin/build.sh [ENV_FILE]   # prints the tag it built or found
#
# nvcr.io cannot be reached from CI, so the base is assembled here from Debian packages
# (debootstrap) and PyPI, with the versions of the NGC release in ENV_FILE: docker/standin/release.env
# (the default base, the newest supported era) or release-oldest.env (the oldest supported era).
# The stand-ins share the Debian rootfs, the python/pip layers and the torch/triton wheels.
# Everything downloaded is cached under $TTR_CI_CACHE (default /var/cache/torchtitan-runai-ci,
# outside the clone, because CI clones fresh): the Debian rootfs, the torch and triton wheels,
# and the image itself (in container storage, labelled with a digest of its inputs). A second
# run on the same machine downloads nothing.
#
# Needs root, buildah, runc and debootstrap (.ci/run installs them). pip inside the build reaches
# PyPI the way the host does: the host's CA bundle is bind-mounted for the build only.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
env_file="${1:-${here}/release.env}"
# shellcheck source=docker/standin/release.env
source "${env_file}"
BASE_PIP_VERSION="${BASE_PIP_VERSION:-${PIP_VERSION}}"
cache="${TTR_CI_CACHE:-/var/cache/torchtitan-runai-ci}"
tag="nvcr.io/nvidia/pytorch:${NGC_RELEASE}-py3"
ca_bundle="${TTR_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"

inputs_digest="$(cat "${here}/Containerfile" "${here}/packages.txt" "${env_file}" \
    "${here}/nvidia_entrypoint.sh" | sha256sum | cut -c1-16)"
existing="$(buildah inspect --type image --format '{{index .ImageAnnotations "org.torchtitan-runai.standin"}}{{index .Docker.Config.Labels "org.torchtitan-runai.standin"}}' "${tag}" 2>/dev/null || true)"
if [[ "${existing}" == "${inputs_digest}" ]]; then
    echo "stand-in ${tag} is up to date (${inputs_digest})" >&2
    echo "${tag}"
    exit 0
fi

mkdir -p "${cache}/rootfs" "${cache}/wheels"
rootfs="${cache}/rootfs/debian-${DEBIAN_SUITE}-minbase.tar"
if [[ ! -s "${rootfs}" ]]; then
    echo "debootstrap ${DEBIAN_SUITE} -> ${rootfs}" >&2
    tree="$(mktemp -d "${cache}/rootfs/tree.XXXXXX")"
    debootstrap --variant=minbase --include=ca-certificates "${DEBIAN_SUITE}" "${tree}" \
        http://deb.debian.org/debian >&2
    tar -C "${tree}" --numeric-owner -cf "${rootfs}.part" .
    rm -rf "${tree}"
    mv "${rootfs}.part" "${rootfs}"
fi

# keyed by what is in it, so stand-ins with the same torch and triton share one download
wheels="${cache}/wheels/$(printf '%s_%s_cp%s' "${TORCH_SPEC}" "${TRITON_SPEC}" "${PYTHON_TAG/./}" | tr -c 'A-Za-z0-9._+\n-' '_')"
if ! compgen -G "${wheels}/torch-*.whl" >/dev/null || ! compgen -G "${wheels}/triton-*.whl" >/dev/null; then
    echo "fetching ${TORCH_SPEC} ${TRITON_SPEC} (cp${PYTHON_TAG/./}) -> ${wheels}" >&2
    mkdir -p "${wheels}"
    if ! python3 -m pip download --no-deps --only-binary=:all: --python-version "${PYTHON_TAG}" \
        --platform manylinux_2_28_x86_64 -d "${wheels}" "${TORCH_SPEC}" "${TRITON_SPEC}" >&2; then
        echo "standin: cannot download ${TORCH_SPEC}: PyPI has only CUDA builds of torch; give pip" \
             "PyTorch's CPU index (PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu)" \
             "or put the wheel in ${wheels}" >&2
        exit 2
    fi
fi

context="$(mktemp -d)"
trap 'rm -rf "${context}"' EXIT
cp "${here}/Containerfile" "${here}/packages.txt" "${here}/nvidia_entrypoint.sh" "${context}/"
ln "${rootfs}" "${context}/rootfs.tar" 2>/dev/null || cp "${rootfs}" "${context}/rootfs.tar"

echo "building stand-in ${tag}" >&2
buildah bud --isolation oci --runtime runc --format docker --layers --force-rm \
    --volume "${wheels}:/standin-wheels:ro" \
    --volume "${ca_bundle}:/etc/ssl/certs/ca-certificates.crt:ro" \
    --build-arg "NGC_RELEASE=${NGC_RELEASE}" \
    --build-arg "PIP_VERSION=${PIP_VERSION}" \
    --build-arg "BASE_PIP_VERSION=${BASE_PIP_VERSION}" \
    --build-arg "PACKAGES_UPLOADED_BEFORE=${PACKAGES_UPLOADED_BEFORE}" \
    --label "org.torchtitan-runai.standin=${inputs_digest}" \
    --label "org.opencontainers.image.description=CI stand-in for NGC PyTorch ${NGC_RELEASE} (CPU only; see docs/cluster.md)" \
    --tag "${tag}" --file "${context}/Containerfile" "${context}" >&2
echo "${tag}"
