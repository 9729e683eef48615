"""The training image, built for real and run with podman: on CI's stand-in for its NGC base.

nvcr.io cannot be reached here, so docker/standin/build.sh assembles a stand-in for the Dockerfile's
default base (Debian rootfs, Python, the torch/triton release line of that NGC release, every
package pinned in /etc/pip/constraint.txt, NGC's entrypoint path and uid 1000 user) and tags it with
the FROM name; docker/build.sh then builds the Dockerfile on it, as `docker build` would. What
differs from NGC is listed in docs/cluster.md ("The image"); the GPU is the one thing mocked away
(the rehearsal trains on 2 CPU ranks over gloo).

Checks: every shipped file git tracks is in the image, `pip check` clean, torch (and triton) the base's byte for byte,
`--dry-run`, the 2-rank
rehearsal as the image's user and as an arbitrary UID in group 0 (OpenShift), `podman stop`
(SIGTERM) → exit 143 with a complete checkpoint and a resume from it, tini as PID 1, image size.

Two eras of base: the default (docker/standin/release.env, the newest supported NGC release) gets
every check; a stand-in of the oldest supported release (release-oldest.env: packages as PyPI had
them before 25.12 froze, click 8.3.1, so huggingface_hub 1.x) gets the build, `pip check` with the
base's pins unchanged, torch untouched and the rehearsal (the ``era_images`` tests). The two share
the Debian rootfs, the python/pip layers and the torch/triton wheels.

Needs root, buildah, podman, runc and debootstrap. Without them the module is skipped, saying so;
with TTR_REQUIRE_IMAGE_TESTS=1 (set by .ci/run, which installs them) a skip is a failure instead.
The measured build times and sizes are written to outputs/image-checks.txt (.ci/run prints it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.image, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TAG = os.environ.get("TTR_IMAGE_TAG", "localhost/torchtitan-runai:ci")
TOOLS = ("buildah", "podman", "runc", "debootstrap")
REPORT = REPO / "outputs" / "image-checks.txt"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
STEP = re.compile(r"step:\s*(\d+)\s+loss:")

# crun (podman's default) rejects hybrid cgroup hosts; podman's default rlimits exceed a
# sandbox's hard limits; --network none: the rehearsal needs loopback only (and proves it is offline).
PODMAN_RUN = [
    "podman",
    "run",
    "--runtime",
    "runc",
    "--ulimit",
    "nofile=20000:20000",
    "--ulimit",
    "nproc=32768:32768",
    "--network",
    "none",
    "--shm-size",
    "1g",
]
REHEARSAL_ENV = ["-e", "NGPU=2", "-e", "CONFIG_FILE=./train_configs/debug_model.toml"]


def report(line: str) -> None:
    REPORT.parent.mkdir(exist_ok=True)
    with REPORT.open("a") as f:
        f.write(line + "\n")


def require_tools() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    reason = None
    if missing:
        reason = (
            f"container tools not installed: {', '.join(missing)} "
            "(apt-get install buildah podman runc debootstrap; .ci/run does)"
        )
    elif os.geteuid() != 0:
        reason = "the image checks need root (rootful buildah and podman, as in CI)"
    if reason is None:
        return
    if os.environ.get("TTR_REQUIRE_IMAGE_TESTS") == "1":
        pytest.fail(f"{reason}; TTR_REQUIRE_IMAGE_TESTS=1 makes a skipped image check a failure")
    pytest.skip(reason)


def sh(cmd: list[str], timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd[:6])} ... exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return proc


def image_size(ref: str) -> int:
    return int(sh(["podman", "image", "inspect", "--format", "{{.Size}}", ref]).stdout.strip())


ERAS = {"newest": "release.env", "oldest": "release-oldest.env"}
"""The supported NGC eras CI builds on: the stand-in's release file in docker/standin/."""
_built: dict[str, dict[str, str]] = {}


def build(era: str) -> dict[str, str]:
    """{"base": stand-in tag, "image": project image tag} of ``era``, built (or reused) once per session."""
    if era in _built:
        return _built[era]
    require_tools()
    if not _built:
        REPORT.unlink(missing_ok=True)
    tag = TAG if era == "newest" else f"{TAG}-{era}"
    t0 = time.monotonic()
    env_file = str(REPO / "docker" / "standin" / ERAS[era])
    base = sh([str(REPO / "docker" / "standin" / "build.sh"), env_file], timeout=3600).stdout.strip().splitlines()[-1]
    t1 = time.monotonic()
    proc = subprocess.run(
        [str(REPO / "docker" / "build.sh"), tag],
        capture_output=True,
        text=True,
        timeout=3600,
        env={**os.environ, "BASE_IMAGE": base},
    )
    if proc.returncode != 0:
        pytest.fail(f"image build on {base} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")
    t2 = time.monotonic()
    report(f"{era} era: stand-in base {base}: {t1 - t0:.0f} s (build or cache check)")
    report(f"{era} era: image {tag} on it: {t2 - t1:.0f} s")
    _built[era] = {"base": base, "image": tag}
    return _built[era]


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    """The newest era's images (the Dockerfile's default base): every check runs on them."""
    return build("newest")


@pytest.fixture(scope="module", params=list(ERAS))
def era_images(request) -> dict[str, str]:
    """Each supported era's images in turn: the checks that must hold on every base."""
    return build(request.param)


def output_dir(tmp_path: Path) -> Path:
    out = tmp_path / "outputs"
    out.mkdir()
    out.chmod(0o777)  # the container's user is not the host's
    return out


def in_image(ref: str, *python: str, user: list[str] = ()) -> subprocess.CompletedProcess:
    return sh([*PODMAN_RUN, "--rm", *user, "--entrypoint", "python", ref, *python])


def steps(log: str) -> list[int]:
    return [int(m) for m in STEP.findall(ANSI.sub("", log))]


def test_pip_check_is_clean_and_the_base_constraints_hold(era_images):
    images = era_images
    proc = in_image(images["image"], "-m", "pip", "check")
    assert "No broken requirements found" in proc.stdout, proc.stdout + proc.stderr
    # every pin of the base's own constraint file still holds in the final image
    check = (
        "import os, re\nfrom importlib import metadata as m\n"
        "have = {}\n"
        "for d in m.distributions(): have.setdefault(re.sub(r'[-_.]+', '-', d.metadata['Name']).lower(), d.version)\n"
        "bad = []\n"
        "for line in open(os.environ['PIP_CONSTRAINT']):\n"
        "    name, _, v = line.strip().partition('==')\n"
        "    key = re.sub(r'[-_.]+', '-', name).lower()\n"
        "    if v and key in have and have[key] != v: bad.append(f'{name}: {v} -> {have[key]}')\n"
        "print('changed:', bad)\n"
    )
    assert "changed: []" in in_image(images["image"], "-c", check).stdout


TORCH_FINGERPRINT = """
import hashlib, base64, sys
from importlib import metadata as m
for name in ("torch", "triton"):
    d = m.distribution(name)
    record = d.read_text("RECORD")
    bad = 0
    for line in record.splitlines():
        path, digest, _ = line.rsplit(",", 2)
        if not digest.startswith("sha256="):
            continue
        data = d.locate_file(path).read_bytes()
        if base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode() != digest[7:]:
            bad += 1
    print(name, d.version, hashlib.sha256(record.encode()).hexdigest(), "modified:", bad)
"""


def test_torch_and_triton_are_the_bases_byte_for_byte(era_images):
    images = era_images
    base = in_image(images["base"], "-c", TORCH_FINGERPRINT).stdout.split("\n")
    image = in_image(images["image"], "-c", TORCH_FINGERPRINT).stdout.split("\n")
    assert [line for line in image if line] == [line for line in base if line], (base, image)
    assert all(line.endswith("modified: 0") for line in image if line), image  # every file matches its RECORD hash


def test_the_build_time_ca_bundle_is_not_in_the_image(images):
    bundle = "/etc/ssl/certs/ca-certificates.crt"
    digest = ["-c", f"import hashlib; print(hashlib.sha256(open({bundle!r}, 'rb').read()).hexdigest())"]
    base_digest, image_digest = (in_image(images[k], *digest).stdout.strip() for k in ("base", "image"))
    assert image_digest == base_digest  # the base's own bundle; the host's was only mounted during the build


# what the image runs: the package, the recipes and the two entry points (the rest is for CI and docs)
SHIPPED = ("torchtitan_runai/", "train_configs/", "train.py", "run_llama_train.sh", "pyproject.toml")


def test_the_image_holds_every_shipped_file_git_tracks(images):
    # a .dockerignore pattern such as `**/checkpoint` once dropped the torchtitan_runai.checkpoint package
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    want = sorted(f for f in tracked.splitlines() if f.startswith(SHIPPED))
    assert any(f.startswith("torchtitan_runai/checkpoint/") for f in want)
    listing = "import os, sys\nfor f in sys.argv[1:]:\n    print(f if os.path.isfile(f) else 'MISSING ' + f)\n"
    proc = in_image(images["image"], "-c", listing, *want)
    assert [line for line in proc.stdout.splitlines() if line.startswith("MISSING")] == []


def test_dry_run_prints_the_torchrun_command(images):
    proc = sh([*PODMAN_RUN, "--rm", *REHEARSAL_ENV, images["image"], "--dry-run"], timeout=300)
    last = proc.stdout.rstrip("\n").splitlines()[-1]
    assert "torchrun" in last or "torch.distributed.run" in last, proc.stdout[-2000:]
    assert "--nproc-per-node=2" in last or "--nproc_per_node=2" in last or "nproc" in last, last


@pytest.mark.parametrize("user", [[], ["--user", "12345:0"]], ids=["image-user-1000", "arbitrary-uid-group-0"])
def test_rehearsal_trains_as_the_image_user_and_an_arbitrary_uid(images, tmp_path, user):
    out = output_dir(tmp_path)
    proc = sh(
        [
            *PODMAN_RUN,
            "--rm",
            *user,
            *REHEARSAL_ENV,
            "-v",
            f"{out}:/outputs",
            images["image"],
            "--training.steps",
            "12",
        ],
        timeout=900,
    )
    log = proc.stdout + proc.stderr
    assert steps(log) and max(steps(log)) == 12, log[-3000:]
    checkpoints = sorted(out.rglob("step-*"))
    assert checkpoints and all((c / ".complete.json").exists() for c in checkpoints), checkpoints
    uid = 12345 if user else 1000
    assert {p.stat().st_uid for p in out.rglob("*")} == {uid}  # written as that user, nothing as root


def test_the_oldest_supported_base_trains_on_huggingface_hub_1(tmp_path):
    """NGC 25.12's era pins click 8.3.1, which no huggingface_hub 2.x accepts: the build resolves a 1.x
    (issue 23) and the rehearsal trains on it, as the image's user."""
    images = build("oldest")
    version = in_image(images["image"], "-c", "import huggingface_hub; print(huggingface_hub.__version__)")
    assert version.stdout.strip().startswith("1."), version.stdout
    click = in_image(images["base"], "-c", "from importlib import metadata; print(metadata.version('click'))")
    report(f"oldest era: click {click.stdout.strip()} in the base, huggingface_hub {version.stdout.strip()} resolved")
    out = output_dir(tmp_path)
    proc = sh(
        [*PODMAN_RUN, "--rm", *REHEARSAL_ENV, "-v", f"{out}:/outputs", images["image"], "--training.steps", "12"],
        timeout=900,
    )
    log = proc.stdout + proc.stderr
    assert steps(log) and max(steps(log)) == 12, log[-3000:]
    assert all((c / ".complete.json").exists() for c in sorted(out.rglob("step-*"))), log[-3000:]


def test_sigterm_checkpoints_exits_143_and_the_next_run_resumes(images, tmp_path):
    out = output_dir(tmp_path)
    name = f"ttr-preempt-{uuid.uuid4().hex[:8]}"
    run = [
        *PODMAN_RUN,
        "--name",
        name,
        *REHEARSAL_ENV,
        "-v",
        f"{out}:/outputs",
        images["image"],
        "--training.steps",
        "400",
    ]
    sh([*run[:2], "-d", *run[2:]])
    try:
        log = wait_for_log(name, lambda text: max(steps(text), default=0) >= 13, timeout=600)
        # tini is PID 1 (it forwards the signal and reaps); the entrypoint scripts exec the launcher
        assert sh(["podman", "exec", name, "cat", "/proc/1/comm"]).stdout.strip() == "tini"
        sh(["podman", "stop", "--time", "120", name], timeout=300)  # SIGTERM, SIGKILL only after 120 s
        state = json.loads(sh(["podman", "inspect", name]).stdout)[0]["State"]
        log = logs(name)
        assert state["ExitCode"] == 143, log[-3000:]
    finally:
        sh(["podman", "rm", "-f", name], check=False)
    saved = max(steps(log))
    complete = sorted(int(p.name.split("-")[1]) for p in out.rglob("step-*") if (p / ".complete.json").exists())
    assert complete and complete[-1] >= saved - 1, (complete, saved, log[-3000:])

    # the next pod: resumes from that checkpoint (stopped again once it has trained a step)
    name2 = f"{name}-resume"
    sh(
        [
            *PODMAN_RUN,
            "-d",
            "--name",
            name2,
            *REHEARSAL_ENV,
            "-v",
            f"{out}:/outputs",
            images["image"],
            "--training.steps",
            "400",
        ]
    )
    try:
        text = wait_for_log(
            name2,
            lambda t: f"resuming from step {complete[-1]}" in t and max(steps(t), default=0) > complete[-1],
            timeout=600,
        )
    finally:
        sh(["podman", "rm", "-f", name2], check=False)
    assert min(steps(text)) == complete[-1] + 1, text[-3000:]


def logs(name: str) -> str:
    proc = sh(["podman", "logs", name], check=False)
    return proc.stdout + proc.stderr


def wait_for_log(name: str, done, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = logs(name)
        if done(text):
            return text
        state = json.loads(sh(["podman", "inspect", name]).stdout)[0]["State"]
        if not state["Running"]:
            pytest.fail(f"container {name} exited {state['ExitCode']} early:\n{text[-3000:]}")
        time.sleep(2)
    pytest.fail(f"container {name}: timed out after {timeout} s:\n{logs(name)[-3000:]}")


def test_runs_as_uid_1000_by_default_and_reports_its_size(images):
    config = json.loads(sh(["podman", "image", "inspect", images["image"]]).stdout)[0]["Config"]
    assert config["User"] == "1000"
    assert config["Entrypoint"][0] == "/usr/bin/tini"
    base, image = image_size(images["base"]), image_size(images["image"])
    added = image - base
    report(
        f"image size {image / 1e9:.2f} GB; stand-in base {base / 1e9:.2f} GB; added by the Dockerfile "
        f"{added / 1e6:.0f} MB"
    )
    # the project adds its Python dependencies and code, nothing like a second torch
    assert 0 < added < 800e6, added
