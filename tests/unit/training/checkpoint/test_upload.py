"""torchtitan_runai.training.checkpoint.upload: DCP's writing process started early and deaf to SIGTERM,
and dead with its worker; parallel writers; CPU staging options (checkpoint.staging).

The signal test runs a real single-rank gloo process in its own session and sends SIGTERM to that
whole session's process group, the way torchrun forwards the pod's SIGTERM to a worker (killpg).
The worker-death test kills such a process with SIGKILL while its writing process is in an upload
(slowed by tests/integration/slow_storage), the way a worker dies with its killed launcher.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import REPO, free_port

from torchtitan_runai.training.checkpoint import upload
from torchtitan_runai.training.checkpoint.staging import build_stager, staging_options

SCRIPT = textwrap.dedent("""
    import json, os, signal, sys, time
    import torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
    from torchtitan_runai.training.checkpoint import upload
    from torchtitan_runai.training.checkpoint.staging import build_stager

    # the writing process is a spawn child that re-imports this file: guard the script like train.py
    if __name__ == "__main__":
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1")
        dist.init_process_group("gloo")
        pg = dist.new_group(backend="gloo")
        got = []
        signal.signal(signal.SIGTERM, lambda s, f: got.append(s))  # the trainer's handler, as StopFlag
        up = upload.UploadProcess().start(pg)
        up.wait_ready()
        os.killpg(0, signal.SIGTERM)  # torchrun's forwarding: the worker's whole process group
        time.sleep(0.5)
        alive = up.alive()
        result = dcp.async_save({"w": torch.arange(1 << 20, dtype=torch.float32)}, process_group=pg,
                                storage_writer=upload.writer(sys.argv[1], 4),
                                async_checkpointer_type=AsyncCheckpointerType.PROCESS, async_stager=build_stager())
        result.upload_completion.result(timeout=120)
        pid = up.pid
        up.shutdown()
        print(json.dumps({"handler": got, "alive_after_sigterm": alive,
                          "metadata": os.path.exists(sys.argv[1] + "/.metadata"),
                          "files": sorted(os.listdir(sys.argv[1])),
                          "stopped": not os.path.exists(f"/proc/{pid}/status")}))
        sys.stdout.flush()
        os._exit(0)
""")


def _this_checkout(*first: Path) -> dict[str, str]:
    """The environment of a probe script outside the repository: it imports this checkout's package
    (the virtual environment's editable install may point at another)."""
    path = [*map(str, first), str(REPO), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}


def test_the_upload_process_survives_the_pods_sigterm_and_still_writes(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ck"), str(free_port())],
        cwd=REPO,
        env=_this_checkout(),
        capture_output=True,
        text=True,
        timeout=240,
        start_new_session=True,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["handler"] == [15], "the trainer's own handler still gets the signal"
    assert out["alive_after_sigterm"], "the writing process died of the signal meant for the trainer"
    assert out["metadata"] and sum(f.endswith(".distcp") for f in out["files"]) == 4  # 4 writer threads
    assert out["stopped"]


UPLOADING = textwrap.dedent("""
    import json, os, sys, time
    import torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
    from torchtitan_runai.training.checkpoint import upload
    from torchtitan_runai.training.checkpoint.staging import build_stager

    if __name__ == "__main__":
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1")
        dist.init_process_group("gloo")
        pg = dist.new_group(backend="gloo")
        up = upload.UploadProcess().start(pg)
        up.wait_ready()
        time.sleep(1.0)  # long after the thread that spawned it finished its work
        dcp.async_save({f"w{i}": torch.full((1 << 20,), float(i)) for i in range(8)}, process_group=pg,
                       storage_writer=upload.writer(sys.argv[1], 8),
                       async_checkpointer_type=AsyncCheckpointerType.PROCESS, async_stager=build_stager())
        print(json.dumps({"upload": up.pid}), flush=True)
        time.sleep(300)
""")


def test_the_upload_process_dies_with_its_worker_in_the_middle_of_an_upload(tmp_path):
    script, folder = tmp_path / "probe.py", tmp_path / "ck"
    script.write_text(UPLOADING)
    slow = REPO / "tests/integration/slow_storage"
    env = _this_checkout(slow)
    env["TORCHTITAN_RUNAI_TEST_WRITE_BPS"] = str(1 << 20)  # 32 MiB: 32 s of upload
    proc = subprocess.Popen(
        [sys.executable, str(script), str(folder), str(free_port())],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    child = None
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()[-3000:]
        child = json.loads(line)["upload"]
        deadline = time.monotonic() + 60
        while not list(folder.glob("*.distcp")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(folder.glob("*.distcp")), "no upload started"
        proc.kill()  # the worker, as its killed launcher takes it: SIGKILL, nothing runs in it
        proc.wait(10)
        killed = time.monotonic()
        while Path(f"/proc/{child}/environ").exists() and _state(child) != "Z" and time.monotonic() - killed < 5:
            time.sleep(0.05)
        assert _state(child) in (None, "Z"), "the writing process outlived its worker"
    finally:
        proc.kill()
        if _state(child) not in (None, "Z"):
            os.kill(child, signal.SIGKILL)
    time.sleep(1.0)
    assert not (folder / ".metadata").exists(), "the upload went on after its worker died"


def _state(pid: int | None) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def test_the_writer_uses_the_thread_count(tmp_path):
    dcp.save(
        {f"t{i}": torch.full((256,), float(i)) for i in range(8)},
        storage_writer=upload.writer(tmp_path, 3),
        no_dist=True,
    )
    assert len(list(tmp_path.glob("*.distcp"))) == 3
    assert upload.writer(tmp_path, 0).thread_count == 1


# What the CI machine and a laptop running the 8B recipe have: no GPU.
@pytest.mark.skipif(torch.cuda.is_available(), reason="staging on a machine without a GPU; this one has one")
def test_pinned_mode_stages_without_a_gpu():
    opts = staging_options()
    assert not opts.use_pinned_memory and not opts.use_non_blocking_copy
    assert opts.use_shared_memory and opts.use_async_staging
    stager = build_stager()  # torchtitan's (True, True, True, True) raises "Non-blocking copy requires ..."
    staged = stager.stage({"w": torch.ones(4)})
    staged = staged.result() if hasattr(staged, "result") else staged
    assert torch.equal(staged["w"], torch.ones(4)) and staged["w"].is_shared()
    stager.close()
