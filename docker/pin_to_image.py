#!/usr/bin/env python3
"""Install the project's dependencies into the NGC base without changing anything the base ships.

NGC builds torch (and triton, NCCL, cuDNN, numpy, ...) for its CUDA stack and pins every package
it installed in /etc/pip/constraint.txt (``PIP_CONSTRAINT``). A resolver that "upgrades" any of them
to a PyPI wheel silently replaces that stack. So the image build works in two steps, each a
subcommand of this script, around one ordinary ``pip install`` that resolves the project's
compatible ranges (pyproject.toml) against whatever the base has:

``plan``   (before installing) writes a constraints file pinning *every* distribution the base
           has installed to its version, plus the lines of the base's own constraint files, and a
           requirements file with pyproject's runtime dependencies (never torch, triton or
           nvidia-*: the base provides them). It stops the build, naming the package, when the
           base's torch is older than torchtitan 0.2.2 needs or when the base ships a version of
           a dependency outside pyproject's range (pip would only say ``ResolutionImpossible``).
           ``pip install -c constraints -r requirements`` then can only add packages.
``verify`` (after installing) fails the build if any pinned package (torch first) changed.

Standard library only (plus ``packaging``, which every NGC base ships, or pip's vendored copy):
it runs in the bare base image.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from importlib import metadata

import tomllib

IMAGE_OWNED = re.compile(r"^(torch|triton|pytorch-triton|nvidia-.*)$")
"""Never installed by the project: the base image's CUDA build of these is the one we run."""

MIN_TORCH = (2, 10)
"""torchtitan 0.2.2 was released against torch 2.10 nightlies (NGC 25.12 ships 2.10.0a0)."""


def canonical(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return canonical(re.split(r"[\s<>=!~;\[@(]", requirement.strip(), maxsplit=1)[0])


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


def runtime_requirements(pyproject_text: str) -> list[str]:
    """pyproject's [project].dependencies, minus what the base image owns."""
    deps = tomllib.loads(pyproject_text).get("project", {}).get("dependencies", [])
    return [d for d in deps if not IMAGE_OWNED.match(requirement_name(d))]


def plan(
    requirements: list[str], installed: dict[str, str], base_constraints: list[str] = ()
) -> tuple[list[str], list[str]]:
    """(constraints, requirements) for installing ``requirements`` into an image with
    ``installed`` ({name: version}) and the base's own constraint lines: the image's versions win."""
    have = {canonical(n): (n, v) for n, v in installed.items()}
    pinned = dict(have)
    for line in base_constraints:
        line = line.split("#", 1)[0].strip()
        if line and "==" in line and not line.startswith("-"):
            name, version = (part.strip() for part in line.split("==", 1))
            pinned.setdefault(canonical(name), (name, version))
    constraints = [f"{n}=={v}" for _, (n, v) in sorted(pinned.items())]
    return constraints, list(requirements)


def out_of_range(requirements: list[str], installed: dict[str, str]) -> list[str]:
    """Requirements the base already has in a version the requirement's range excludes."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - every NGC base ships packaging
        from pip._vendor.packaging.requirements import Requirement
    have = {canonical(n): v for n, v in installed.items()}
    bad = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        version = have.get(canonical(req.name))
        if version is not None and not req.specifier.contains(version, prereleases=True):
            bad.append(f"{req.name} {req.specifier} (the base ships {version})")
    return bad


def changed(constraints: list[str], installed: dict[str, str], before: set[str]) -> list[str]:
    """Pinned packages whose version differs now, or that were installed at plan time (``before``,
    canonical names) and are gone. A base constraint for a package never installed is no change."""
    now = {canonical(n): v for n, v in installed.items()}
    diff = []
    for key, (name, version) in parse_pins(constraints).items():
        if key in now and now[key] != version:
            diff.append(f"{name}: {version} -> {now[key]}")
        elif key not in now and key in before:
            diff.append(f"{name}: {version} -> removed")
    return diff


INSTALLED_HEADER = "# installed at plan time: "
"""First line of the plan's constraints file: what verify must still find."""


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


def base_constraint_lines() -> list[str]:
    """The lines of the constraint files the base configures (NGC: PIP_CONSTRAINT)."""
    lines: list[str] = []
    for path in os.environ.get("PIP_CONSTRAINT", "").split():
        if os.path.isfile(path):
            with open(path) as f:
                lines.extend(f.read().splitlines())
    return lines


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pin_to_image.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_plan = sub.add_parser("plan", help="write constraints and requirements for this image")
    p_plan.add_argument("pyproject")
    p_plan.add_argument("--constraints", required=True)
    p_plan.add_argument("--requirements", required=True)
    p_verify = sub.add_parser("verify", help="fail if the install changed an image package")
    p_verify.add_argument("constraints")
    args = parser.parse_args(argv)

    installed = installed_distributions()
    if args.cmd == "plan":
        torch_version = next((v for n, v in installed.items() if canonical(n) == "torch"), None)
        if torch_version is None or torch_too_old(torch_version):
            print(
                f"pin_to_image: base image torch {torch_version} is older than "
                f"{'.'.join(map(str, MIN_TORCH))}, which torchtitan 0.2.2 needs; pick a newer "
                "NGC release (--build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:<yy.mm>-py3)",
                file=sys.stderr,
            )
            return 1
        with open(args.pyproject) as f:
            wanted = runtime_requirements(f.read())
        bad = out_of_range(wanted, installed)
        if bad:
            print(
                "pin_to_image: the base image ships versions outside pyproject.toml's ranges: "
                + "; ".join(bad)
                + ". Fix: widen the range in pyproject.toml [project].dependencies "
                "(if the project works with the base's version) or choose another BASE_IMAGE",
                file=sys.stderr,
            )
            return 1
        constraints, requirements = plan(wanted, installed, base_constraint_lines())
        with open(args.constraints, "w") as f:
            f.write(INSTALLED_HEADER + " ".join(sorted(canonical(n) for n in installed)) + "\n")
            f.write("\n".join(constraints) + "\n")
        with open(args.requirements, "w") as f:
            f.write("\n".join(requirements) + "\n")
        print(
            f"pin_to_image: torch {torch_version} kept; {len(installed)} image packages pinned, "
            f"{len(requirements)} requirements resolved against them"
        )
        return 0

    with open(args.constraints) as f:
        lines = f.read().splitlines()
    before = (
        set(lines[0][len(INSTALLED_HEADER) :].split()) if lines and lines[0].startswith(INSTALLED_HEADER) else set()
    )
    diff = changed(lines, installed, before)
    if diff:
        print(
            "pin_to_image: the install changed packages the base image ships:\n  " + "\n  ".join(diff), file=sys.stderr
        )
        return 1
    print("pin_to_image: base image packages unchanged (torch included)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
