"""Preemption on the GPU pod's path, modelled on CPU: ``async_with_pinned_mem`` (the shipped 8B
recipe's mode: staging plus DCP's checkpoint-writing process; unpinned here), real signals to the
real launcher, 2 ranks over gloo, exact losses compared (float.hex, TORCHTITAN_RUNAI_STEP_TRACE).

The upload is made slow enough to still be in flight when the test signals with
``slow_storage/sitecustomize.py`` (on PYTHONPATH): DCP's writing process writes at most
``WRITE_BPS`` bytes/s, like a slow volume (see that file for how it differs from one). The debug
model's checkpoint is ~38 MB per rank, so an upload takes ~10 s.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from resilience_util import REPO, losses, run, start, trace_steps, train_args, worker_pids

from torchtitan_runai.checkpoint.folder import MARKER, examine, scan

SEED = ["--debug.seed", "1234"]
STEPS, INTERVAL = 10, 5
PINNED = ["--checkpoint.async_mode", "async_with_pinned_mem"]
SLOW_STORAGE = Path(__file__).resolve().parent / "slow_storage"
WRITE_BPS = 4_000_000


def slow_env() -> dict:
    path = os.pathsep.join(p for p in (str(SLOW_STORAGE), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "TORCHTITAN_RUNAI_TEST_WRITE_BPS": str(WRITE_BPS)}


def wait_until(what: str, check, proc: subprocess.Popen, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        if proc.poll() is not None:
            raise AssertionError(f"launcher exited {proc.returncode} before {what}")
        time.sleep(0.05)
    raise AssertionError(f"no {what} within {timeout}s")


def uploading(folder: Path) -> bool:
    """An upload in flight: shards being written, DCP's ``.metadata`` (written last) not yet."""
    return folder.is_dir() and any(folder.glob("*.distcp")) and not (folder / ".metadata").exists()


def steps_on_disk(tmp: Path) -> dict[int, object]:
    return {f.step: f for f in scan(tmp / "out/checkpoint")}


@pytest.fixture(scope="module")
def pinned_baseline(tmp_path_factory):
    """Uninterrupted, async_with_pinned_mem: 10 steps, checkpoints at 5 and 10."""
    tmp = tmp_path_factory.mktemp("pinned-baseline")
    rc, log = run(tmp, train_args(tmp, STEPS, INTERVAL, *SEED, *PINNED))
    assert rc == 0, log[-3000:]
    assert "Non-blocking copy" not in log and "Traceback" not in log
    assert "checkpoint upload process ready" in log
    found = steps_on_disk(tmp)
    assert found[5].complete and found[10].complete
    # 16 writer threads (checkpoint_perf.writer_threads): 16 shard files per rank
    assert len(list((tmp / "out/checkpoint/step-5").glob("__0_*.distcp"))) == 16
    return tmp, losses(tmp)


def resumed_copy(baseline_dir: Path, tmp: Path) -> None:
    """The baseline's folder with only step-5: a run restarted there trains steps 6..10."""
    shutil.copytree(baseline_dir / "out", tmp / "out")
    shutil.rmtree(tmp / "out/checkpoint/step-10")


@pytest.mark.slow
def test_sigterm_during_an_upload_finishes_it_saves_the_step_and_resumes_exactly(pinned_baseline, tmp_path):
    base, reference = pinned_baseline
    resumed_copy(base, tmp_path)
    p = start(tmp_path, train_args(tmp_path, STEPS, 2, *SEED, *PINNED), **slow_env())
    step6 = tmp_path / "out/checkpoint/step-6"
    wait_until("the step-6 upload", lambda: uploading(step6), p)
    sent = time.monotonic()
    p.send_signal(signal.SIGTERM)
    in_flight = uploading(step6)
    rc = p.wait(90)
    took = time.monotonic() - sent
    log = (tmp_path / "log.txt").read_text()
    assert rc == 143, log[-4000:]
    assert in_flight, "the upload had finished before the signal: the test proves nothing"
    assert "Traceback" not in log and "Checkpoint background process is dead" not in log
    print(f"SIGTERM during an upload -> launcher exit: {took:.2f}s")
    found = steps_on_disk(tmp_path)
    stopped = max(found)
    assert found[6].complete and (step6 / MARKER).exists(), "the upload in flight was finished and marked"
    assert stopped > 6 and found[stopped].complete and found[stopped].kind == "full"
    assert f"preemption: signal -> step {stopped} checkpoint marked in" in log
    assert "for step 6's upload and marked it" in log
    rc, log = run(tmp_path, train_args(tmp_path, STEPS, 2, *SEED, *PINNED), log_name="resume.txt")
    assert rc == 0, log[-3000:]
    assert f"resuming from step {stopped} (" in log
    assert losses(tmp_path) == {s: reference[s] for s in range(6, STEPS + 1)}


@pytest.mark.slow
def test_kill9_during_an_upload_resumes_from_the_newest_complete_checkpoint(pinned_baseline, tmp_path):
    base, reference = pinned_baseline
    resumed_copy(base, tmp_path)
    p = start(tmp_path, train_args(tmp_path, STEPS, 2, *SEED, *PINNED), **slow_env())
    step6 = tmp_path / "out/checkpoint/step-6"
    wait_until("the step-6 upload", lambda: uploading(step6), p)
    workers = worker_pids(p.pid)
    os.killpg(p.pid, signal.SIGKILL)  # the whole pod: launcher, ranks and their writing processes
    for pid in workers.values():
        os.killpg(pid, signal.SIGKILL)
    p.wait(30)
    assert not examine(step6).complete
    rc, log = run(tmp_path, train_args(tmp_path, STEPS, 2, *SEED, *PINNED), log_name="resume.txt")
    assert rc == 0, log[-3000:]
    assert "skipping incomplete checkpoint" in log and "step-6" in log.split("skipping incomplete checkpoint")[1][:300]
    assert "resuming from step 5 (" in log
    assert list((tmp_path / "out/checkpoint/.incomplete").glob("step-6.*"))
    assert losses(tmp_path) == {s: reference[s] for s in range(6, STEPS + 1)}


@pytest.mark.slow
def test_sigterm_twice_ends_cleanly_with_every_checkpoint_complete(pinned_baseline, tmp_path):
    resumed_copy(pinned_baseline[0], tmp_path)
    p = start(tmp_path, train_args(tmp_path, STEPS, 2, *SEED, *PINNED), **slow_env())
    step6 = tmp_path / "out/checkpoint/step-6"
    wait_until("the step-6 upload", lambda: uploading(step6), p)
    p.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    p.send_signal(signal.SIGTERM)
    rc = p.wait(90)
    log = (tmp_path / "log.txt").read_text()
    assert rc == 143, log[-4000:]
    assert "received SIGTERM again; ignored" in log
    assert "Traceback" not in log
    found = steps_on_disk(tmp_path)
    assert all(f.complete for f in found.values()), {s: f.why for s, f in found.items()}
    assert max(found) > 6


@pytest.mark.slow
def test_sigterm_before_the_first_step_exits_143_at_once_and_leaves_the_folder_as_it_was(pinned_baseline, tmp_path):
    resumed_copy(pinned_baseline[0], tmp_path)
    before = sorted(p.name for p in (tmp_path / "out/checkpoint").iterdir())
    p = start(tmp_path, train_args(tmp_path, STEPS, 2, *SEED, *PINNED))
    wait_until(
        "the trainer loading step 5",
        lambda: (
            "resuming from step 5 ("
            in "".join(line for line in (tmp_path / "log.txt").read_text().splitlines() if "[rank" in line)
        ),
        p,
    )
    sent = time.monotonic()
    p.send_signal(signal.SIGTERM)
    rc = p.wait(60)
    took = time.monotonic() - sent
    log = (tmp_path / "log.txt").read_text()
    assert rc == 143, log[-4000:]
    assert "before this process finished a training step" in log
    assert "Traceback" not in log
    assert took < 15, f"exit took {took:.1f}s"
    assert not trace_steps(tmp_path), "no step was trained"
    assert sorted(p.name for p in (tmp_path / "out/checkpoint").iterdir()) == before
    assert examine(tmp_path / "out/checkpoint/step-5").resumable


STOCK_CPU = "tests.integration.stock_cpu"


@pytest.mark.slow
def test_a_folder_written_by_stock_torchtitan_is_adopted_and_resumed(tmp_path):
    """torchtitan's own Trainer (``torchtitan.train``, its llama3 spec) writes the folder, on 2 CPU
    ranks through the device/gloo shims our package applies (``stock_cpu``); then our launcher."""
    data = [
        "--model.flavor",
        "debugmodel",
        "--model.hf_assets_path",
        "./assets/rehearsal/tokenizer",
        "--training.dataset",
        "c4_test",
        "--training.dataset_path",
        "./assets/rehearsal/data",
        "--training.seq_len",
        "128",
        "--training.local_batch_size",
        "4",
        "--debug.seed",
        "1234",
        "--training.mixed_precision_param",
        "float32",
        "--optimizer.lr",
        "8e-4",
        "--lr_scheduler.warmup_steps",
        "5",
    ]
    dump = tmp_path / "out"
    stock = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "torchtitan.train",
        "--experimental.custom_import",
        STOCK_CPU,
        "--model.name",
        "llama3_stock_cpu",
        *data,
        "--job.dump_folder",
        str(dump),
        "--training.steps",
        "4",
        "--checkpoint.enable",
        "--checkpoint.interval",
        "2",
        "--checkpoint.folder",
        "checkpoint",
        "--compile.no-enable",
        "--metrics.log_freq",
        "1",
        "--lr_scheduler.total_steps",
        "8",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "MASTER_", "TORCHELASTIC"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(stock, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    folder = dump / "checkpoint"
    assert not list(folder.glob("*/" + MARKER)), "stock writes no completion marker"
    found = steps_on_disk(tmp_path)
    assert found[2].adopted and found[2].resumable, found[2]
    assert found[4].complete and found[4].kind == "model-only"  # stock's last_save_model_only default
    files = {p.relative_to(folder): p.stat().st_size for p in folder.rglob("*") if p.is_file()}

    # keep_latest_k 0: no retirement of old checkpoints, so any change to stock's files would be ours
    rc, log = run(
        tmp_path,
        [
            "--training.steps",
            "8",
            "--checkpoint.interval",
            "3",
            "--checkpoint.keep_latest_k",
            "0",
            "--job.dump_folder",
            str(dump),
            "--metrics.log_freq",
            "1",
            *data,
            "--lr_scheduler.total_steps",
            "8",
        ],
    )
    assert rc == 0, log[-4000:]
    assert f"adopted {folder / 'step-2'}" in log
    assert "resuming from step 2 (" in log
    assert "--checkpoint.initial_load_path" in log and "step-4: a model-only checkpoint cannot be resumed" in log
    assert "has no RNG state for this rank" in log
    assert sorted(losses(tmp_path)) == list(range(3, 9))
    for rel, size in files.items():  # complete checkpoints are never moved aside
        assert (folder / rel).is_file() and (folder / rel).stat().st_size == size, rel
    assert not (folder / ".incomplete").exists()
