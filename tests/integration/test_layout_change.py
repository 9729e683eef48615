"""A checkpoint at another tensor-parallel layout, with real processes: the launcher, torchrun, gloo.

A checkpoint written at TP 2 cannot be resumed at FSDP 2 (its optimizer state and data position
belong to that layout: ``checkpoint.resume.plan_resume``). The launcher refuses it in one line that
names the model-only route (``checkpoint.resume.weights_route``), and those flags, pasted as printed
with a new folder for ``<new>``, start a run at the new layout from the checkpoint's weights.

Proven: the refusal is exit 2, one line on stderr, before any worker starts; the route trains
(exit 0) from the TP run's weights: its first loss is far below the first loss of the same seed's
fresh weights (8.06 -> 5.15 measured, after 6 TP steps that end at 6.01), where a run that silently
started from fresh weights would log about 8.
"""

from __future__ import annotations

import re
import shlex
import subprocess

from conftest import REPO, launcher_cmd, losses, pod_env

TP_STEPS = 6


def launch(tmp, *more: str) -> subprocess.CompletedProcess:
    args = ["--job.dump_folder", str(tmp / "out"), "--debug.seed", "1234", *more]
    return subprocess.run(
        launcher_cmd(*args), env=pod_env(NGPU="2"), cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_a_tp_checkpoint_refused_at_fsdp_continues_by_the_printed_model_only_route(tmp_path):
    tp = launch(tmp_path, "--training.steps", str(TP_STEPS), "--parallelism.tensor_parallel_degree", "2")
    assert tp.returncode == 0, tp.stdout[-3000:] + tp.stderr[-3000:]
    tp_losses = losses(tp.stdout)
    assert sorted(tp_losses) == list(range(1, TP_STEPS + 1))
    checkpoint = tmp_path / "out" / "checkpoint"
    before = sorted(p.name for p in checkpoint.iterdir())
    assert f"step-{TP_STEPS}" in before

    refused = launch(tmp_path, "--training.steps", str(TP_STEPS + 2))  # the same folder at FSDP 2 (TP 1)
    assert refused.returncode == 2, refused.stdout[-3000:] + refused.stderr[-3000:]
    assert refused.stdout == "" and len(refused.stderr.splitlines()) == 1, refused.stderr
    line = refused.stderr.strip()
    assert line.startswith("run_llama_train.sh: error: parallelism.tensor_parallel_degree = 1: ")
    assert "written with tensor_parallel_degree = 2" in line and "--parallelism.tensor_parallel_degree 2" in line
    assert sorted(p.name for p in checkpoint.iterdir()) == before  # nothing written, no worker started
    route = re.search(r"--checkpoint\.folder <new> .*?--checkpoint\.initial_load_model_only", line)
    assert route, line
    flags = shlex.split(route.group(0))
    assert flags == [
        "--checkpoint.folder",
        "<new>",
        "--checkpoint.initial_load_path",
        str(checkpoint / f"step-{TP_STEPS}"),
        "--checkpoint.initial_load_model_only",
    ]

    flags[1] = "from_tp"  # the new folder, inside the same dump folder
    carried = launch(tmp_path, "--training.steps", "2", *flags)
    out = carried.stdout + carried.stderr
    assert carried.returncode == 0, out[-4000:]
    assert f"initial weights from {checkpoint / f'step-{TP_STEPS}'}" in out
    assert "tp=1" in out and "dp_shard=2" in out  # the new layout: FSDP 2
    first = losses(carried.stdout)[1]
    # fresh weights (this seed) log ~8.06 at step 1, the TP run ends at ~6.01: the TP run's weights
    assert first < tp_losses[1] - 2.0, (first, tp_losses)
    assert first < tp_losses[TP_STEPS] + 0.5, (first, tp_losses)
    assert sorted(p.name for p in checkpoint.iterdir()) == before  # the TP checkpoint is only read
    assert (tmp_path / "out" / "from_tp" / "step-2").is_dir()
