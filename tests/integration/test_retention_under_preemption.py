"""Checkpoint retention under repeated preemptions, on the GPU pod's path modelled on CPU: the real
launcher, 2 ranks over gloo, ``async_with_pinned_mem`` (uploads by DCP's checkpoint process),
``checkpoint.keep_latest_k = 2``, a save every 5 steps, real SIGTERMs at about steps 7 and 13 with
a restart after each, then an uninterrupted finish. After every launch the complete checkpoints
are counted on disk (``scan``).

The small volumes are real: a tmpfs of a given size, mounted in a private mount namespace
(``unshare -m``, as root, like tests/unit/test_bad_input.py). A holder process keeps the namespace
(and the tmpfs with its checkpoints) alive across launches; each launch enters it with ``nsenter``,
and the test reads the volume through ``/proc/<holder>/root``. The debug model's checkpoint is
~73 MB (both ranks); the dump folder (checkpoints, TensorBoard, goodput records) is on the volume,
like a PVC mounted at ``OUTPUT_DIR``.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from resilience_util import REPO, finish, launch_env, losses, wait_for_step

from torchtitan_runai.checkpoint.folder import MARKER, scan
from torchtitan_runai.storage import BYTES_PER_PARAM_FULL_CHECKPOINT

STEPS, INTERVAL, KEEP = 20, 5, 2
SETTINGS = [
    "--checkpoint.keep_latest_k",
    str(KEEP),
    "--checkpoint.async_mode",
    "async_with_pinned_mem",
    "--debug.seed",
    "1234",
]


def _unshare_works() -> bool:
    return (
        shutil.which("unshare") is not None
        and shutil.which("nsenter") is not None
        and subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0
    )


needs_unshare = pytest.mark.skipif(not _unshare_works(), reason="needs root for unshare -m / nsenter")


class Volume:
    """A tmpfs of ``size`` bytes at ``mount``, seen only by the processes started through it."""

    def __init__(self, mount: Path, size: int):
        mount.mkdir(parents=True, exist_ok=True)
        self.mount = mount
        self.holder = subprocess.Popen(
            [
                "unshare",
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                f"mount -t tmpfs -o size={size} tmpfs {mount} && echo ready && exec sleep 3600",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.holder.stdout.readline().strip() == "ready"

    def path(self, inside: Path) -> Path:
        """``inside`` (a path on the volume) as this process can read it."""
        return Path(f"/proc/{self.holder.pid}/root") / Path(inside).relative_to("/")

    def prefix(self) -> list[str]:
        return ["nsenter", "-t", str(self.holder.pid), "-m", "--"]

    def free(self) -> int:
        return shutil.disk_usage(self.path(self.mount)).free

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait()


def train_args(dump: Path) -> list[str]:
    return [
        "--training.steps",
        str(STEPS),
        "--checkpoint.interval",
        str(INTERVAL),
        "--job.dump_folder",
        str(dump),
        "--metrics.log_freq",
        "1",
        *SETTINGS,
    ]


def start(tmp: Path, args: list[str], log_name: str, volume: Volume | None = None, **env) -> subprocess.Popen:
    log = open(tmp / log_name, "w")
    prefix = volume.prefix() if volume else []
    return subprocess.Popen(
        [*prefix, str(REPO / "run_llama_train.sh"), *args],
        cwd=REPO,
        env=launch_env(tmp, **env),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def preempted_launch(tmp: Path, args: list[str], at: int, log_name: str, volume: Volume | None = None, **env):
    """One launch, SIGTERM once the trace shows step ``at``; (exit code, log)."""
    p = start(tmp, args, log_name, volume, **env)
    wait_for_step(tmp, at, p, timeout=240)
    p.send_signal(signal.SIGTERM)
    return finish(p, tmp, log_name, timeout=120)


def steps_on_disk(folder: Path) -> dict[int, bool]:
    return {f.step: f.complete for f in scan(folder)}


def check_kept(folder: Path, rc: int, log: str, expected_rc: int) -> dict[int, bool]:
    assert rc == expected_rc, log[-4000:]
    assert "Traceback" not in log and "No space left" not in log, log[-4000:]
    found = steps_on_disk(folder)
    assert sum(found.values()) <= KEEP, f"{sorted(found)} complete on disk, keep_latest_k = {KEEP}"
    assert all(found.values()), f"incomplete step folders left behind: {found}"
    # counted from outside, as an operator would: a half-removed folder (a retention pass cut off by
    # the worker's os._exit) still holds .metadata and was spared as "recently written"
    dcp_saves = sorted(int(p.parent.name.split("-")[1]) for p in folder.glob("step-*/.metadata"))
    assert len(dcp_saves) <= KEEP, f"step folders holding .metadata: {dcp_saves}, keep_latest_k = {KEEP}"
    return found


def preemptions_and_restarts(tmp: Path, dump: Path, checkpoints: Path, volume: Volume | None = None):
    """SIGTERM at ~7 and ~13 with a restart after each, then the finish; the kept count after each."""
    args = train_args(dump)
    kept = []
    rc, log = preempted_launch(tmp, args, 7, "first.txt", volume)
    found = check_kept(checkpoints, rc, log, 143)
    stopped = max(found)
    assert stopped >= 7 and "preemption: signal -> step" in log
    kept.append(sorted(found))
    rc, log = preempted_launch(tmp, args, 13, "second.txt", volume)
    assert f"resuming from step {stopped} (" in log
    found = check_kept(checkpoints, rc, log, 143)
    assert max(found) >= 13
    kept.append(sorted(found))
    p = start(tmp, args, "third.txt", volume)
    rc, log = finish(p, tmp, "third.txt")
    found = check_kept(checkpoints, rc, log, 0)
    assert max(found) == STEPS
    kept.append(sorted(found))
    print(f"complete checkpoints on disk after each launch: {kept}")
    assert sorted(losses(tmp)) == list(range(1, STEPS + 1))
    return kept


@pytest.mark.slow
def test_repeated_preemptions_with_async_uploads_keep_at_most_keep_latest_k(tmp_path):
    """Stock's purge never ran after the preemption or final saves and missed the async save in
    flight: the folder held 4 checkpoints after each restart (3 complete at least)."""
    preemptions_and_restarts(tmp_path, tmp_path / "out", tmp_path / "out/checkpoint")


def debug_checkpoint_bytes() -> int:
    """What preflight counts for one debug-model checkpoint (12 bytes per parameter)."""
    from torchtitan_runai import model_lookup
    from torchtitan_runai.job import parse_job_config
    from torchtitan_runai.launcher.memory_estimate import TrainSettings, estimate_memory

    config = parse_job_config(["--job.config_file", "train_configs/debug_model.toml"])
    return (
        BYTES_PER_PARAM_FULL_CHECKPOINT
        * estimate_memory(model_lookup.model_args(config), TrainSettings.from_config(config, 2)).params
    )


@pytest.mark.slow
@needs_unshare
def test_a_volume_sized_for_the_promise_survives_repeated_preemptions(tmp_path):
    """keep_latest_k = 2 promises 3 checkpoints at the peak (2 kept + 1 being written): a tmpfs of
    3 checkpoints and a little slack passes preflight and outlives two preemptions and the finish.
    Before retention held the count, the fourth checkpoint ran the volume out of space."""
    size = int(3 * debug_checkpoint_bytes() * 1.05) + (16 << 20)
    volume = Volume(tmp_path / "vol", size)
    try:
        dump = tmp_path / "vol" / "out"
        preemptions_and_restarts(tmp_path, dump, volume.path(dump / "checkpoint"), volume)
    finally:
        volume.close()


@pytest.mark.slow
@needs_unshare
def test_a_full_disk_during_the_preemption_save_is_one_line_and_exit_2_then_resumes(tmp_path):
    """Something else fills the volume; the preemption save then cannot be written (old checkpoints
    cannot make room: only the newest complete one is there). The launcher ends with one line naming
    the folder and the step, exit 2, no traceback; nothing saved is lost, and once the space is
    free again the run resumes from the newest complete checkpoint."""
    size = int(3 * debug_checkpoint_bytes() * 1.05) + (16 << 20)
    volume = Volume(tmp_path / "vol", size)
    try:
        dump = tmp_path / "vol" / "out"
        checkpoints = volume.path(dump / "checkpoint")
        args = train_args(dump)
        p = start(tmp_path, args, "full.txt", volume, MAX_RESTARTS="0")
        wait_for_step(tmp_path, 7, p, timeout=240)
        deadline = time.monotonic() + 60
        while not (checkpoints / "step-5" / MARKER).exists():
            assert time.monotonic() < deadline, "step 5 was never marked complete"
            time.sleep(0.05)
        filler = volume.path(tmp_path / "vol" / "filler")
        with open(filler, "wb") as f:  # leave 8 MiB: far less than a checkpoint
            f.truncate(0)
            f.write(b"\0" * max(0, volume.free() - (8 << 20)))
        p.send_signal(signal.SIGTERM)
        rc, log = finish(p, tmp_path, "full.txt", timeout=120)
        lines = [line for line in log.splitlines() if line.strip()]
        assert rc == 2, log[-4000:]
        assert "Traceback" not in log, log[-4000:]
        last = lines[-1]
        assert "disk is full" in last and str(dump / "checkpoint") in last and "Fix:" in last, lines[-5:]
        assert "step 5) is intact" in last and "keep_latest_k" in last
        found = steps_on_disk(checkpoints)
        assert found == {5: True}, found  # the partial preemption save was removed
        filler.unlink()
        rc, log = finish(start(tmp_path, args, "after.txt", volume), tmp_path, "after.txt")
        assert "resuming from step 5 (" in log
        found = check_kept(checkpoints, rc, log, 0)
        assert max(found) == STEPS
    finally:
        volume.close()
