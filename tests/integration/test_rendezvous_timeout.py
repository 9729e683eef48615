"""A 2-node job where only node 0 ever starts (issue 16): a real launcher and torchrun agent on
loopback, RDZV_TIMEOUT of a few seconds. main ended in a ~40-line RendezvousTimeoutError traceback."""

from __future__ import annotations

import subprocess

from conftest import REPO, free_port, launcher_cmd, pod_env


def test_rendezvous_timeout_is_one_line_naming_the_missing_node_and_rdzv_timeout(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = pod_env(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        RANK="0",
        PET_NODE_RANK="0",
        PET_NNODES="2",
        NGPU="1",
        RDZV_TIMEOUT="5",
        TMPDIR=str(scratch),
    )
    proc = subprocess.run(
        launcher_cmd("--job.dump_folder", str(tmp_path / "dump")),
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "RendezvousTimeoutError" not in proc.stderr
    assert len(errors) == 1, proc.stderr
    assert "RDZV_TIMEOUT = '5'" in errors[0] and "only 1 of 2 node(s) joined" in errors[0], errors[0]
    assert "missing: node rank(s) 1" in errors[0] and "Fix:" in errors[0]
    # every launch used to leave an empty /tmp/runai-launch-* folder behind
    assert not list(scratch.glob("runai-*")), list(scratch.iterdir())
