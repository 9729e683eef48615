"""Pipeline parallel trains like FSDP, with real processes: the launcher, torchrun, gloo, 2 ranks.

Upstream torchtitan issue #2972: torch's pipeline schedule ran ``backward`` on the *sum* of token
losses, so PP's gradients and ``grad_norm`` were the global token count times FSDP's (~550x on the
debug model), and rank 0 (the first stage) logged ``loss: -1.00000``. The fix is ours
(``training.loss``: ``LossFn.pipelined``, ``pipeline_step``, ``last_stage_loss``).

A seed run (FSDP 2, one step) writes the initial weights; FSDP 2 and PP 2 then start from them
(model-only initial load: the same weights, fresh optimizer, data from the start) with the same
global batch of 4 (FSDP: 2 per rank; PP: 4 on its one pipeline, 4 microbatches of 1) for 4 steps.

Proven, step by step: the loss in the default log (rank 0, PP's first stage) and in TensorBoard,
and ``grad_norm``, are FSDP's; after 4 updates every weight is FSDP's. Tolerances (float32, another
order of the same sums; measured on this machine in brackets):

- loss: ``LOSS_REL_TOL`` relative [1.7e-7]: PP adds 4 microbatches of 1 on one rank, FSDP 2 ranks'
  batches of 2;
- grad_norm: ``NORM_REL_TOL`` relative [6.7e-5]: torch's float32 norm of the gradients itself is only
  good to ~1e-4 on the CPU (its ``foreach`` sum of squares: 1.1e-4 off the float64 norm for whole
  tensors, 4.5e-5 for FSDP's halves), and FSDP sums per-shard norms where PP has whole tensors;
  the bug it guards against was a factor of ~500;
- weights after 4 steps: ``WEIGHT_ATOL`` [2.4e-7]; a wrong update would differ by ~lr = 8e-4;
- the printed step line at its own precision (5 decimals for the loss, 4 for grad_norm).
"""

from __future__ import annotations

import math
import re
import subprocess

import pytest
from conftest import ANSI, REPO, launcher_cmd, pod_env

from torchtitan_runai.hf.export import read_model_state_dict
from torchtitan_runai.plots import read_scalars

STEPS, GLOBAL_BATCH, SEED = 4, 4, "1234"
LOSS_REL_TOL = 1e-6
NORM_REL_TOL = 2e-4
WEIGHT_ATOL = 2e-6
GRAD_NORM = re.compile(r"step:\s*(\d+)\s+loss:\s*(-?[0-9.]+)\s+grad_norm:\s*([0-9.]+)")


def launch(dump, *more: str) -> str:
    proc = subprocess.run(
        launcher_cmd("--job.dump_folder", str(dump), "--debug.seed", SEED, "--metrics.log_freq", "1", *more),
        env=pod_env(NGPU="2"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return proc.stdout


def from_seed(seed_step, dump, local_batch: int, *more: str) -> str:
    return launch(
        dump,
        "--training.steps",
        str(STEPS),
        "--lr_scheduler.warmup_steps",
        "2",
        "--training.global_batch_size",
        str(GLOBAL_BATCH),
        "--training.local_batch_size",
        str(local_batch),
        "--checkpoint.interval",
        str(STEPS),
        "--checkpoint.initial_load_path",
        str(seed_step),
        "--checkpoint.initial_load_model_only",
        *more,
    )


def logged(stdout: str) -> dict[int, tuple[float, float]]:
    """step -> (loss, grad_norm) from rank 0's step lines (the default log)."""
    found = {}
    for line in ANSI.sub("", stdout).splitlines():
        m = GRAD_NORM.search(line)
        if m:
            found[int(m.group(1))] = (float(m.group(2)), float(m.group(3)))
    return found


def curves(dump) -> tuple[dict[int, float], dict[int, float]]:
    scalars = read_scalars(dump / "tb")
    loss = next(s for t, s in scalars.items() if t.endswith("loss_metrics/global_avg_loss"))
    norm = next(s for t, s in scalars.items() if t.endswith("grad_norm"))
    return loss, norm


@pytest.mark.slow
def test_pp2_logs_fsdp2s_loss_and_grad_norm_and_makes_its_updates(tmp_path):
    launch(tmp_path / "seed", "--training.steps", "1", "--checkpoint.interval", "1")
    seed_step = tmp_path / "seed" / "checkpoint" / "step-1"
    assert (seed_step / ".metadata").is_file()

    fsdp_out = from_seed(seed_step, tmp_path / "fsdp", GLOBAL_BATCH // 2)
    pp_out = from_seed(seed_step, tmp_path / "pp", GLOBAL_BATCH, "--parallelism.pipeline_parallel_degree", "2")
    assert "pp=2" in pp_out and "dp_shard=2" in fsdp_out
    assert "Pipeline Parallel loss is not visible" not in pp_out  # it is: rank 0 logs the last stage's

    fsdp_log, pp_log = logged(fsdp_out), logged(pp_out)
    assert sorted(pp_log) == sorted(fsdp_log) == list(range(1, STEPS + 1)), (fsdp_log, pp_log)
    fsdp_loss, fsdp_norm = curves(tmp_path / "fsdp")
    pp_loss, pp_norm = curves(tmp_path / "pp")
    for step in range(1, STEPS + 1):
        # the default log (rank 0: PP's first stage) shows the real loss, at the log's precision
        assert pp_log[step][0] == pytest.approx(fsdp_log[step][0], abs=2e-5), (step, fsdp_log, pp_log)
        assert pp_log[step][1] == pytest.approx(fsdp_log[step][1], abs=5e-4), (step, fsdp_log, pp_log)
        assert math.isclose(pp_loss[step], fsdp_loss[step], rel_tol=LOSS_REL_TOL), (step, fsdp_loss, pp_loss)
        assert math.isclose(pp_norm[step], fsdp_norm[step], rel_tol=NORM_REL_TOL), (step, fsdp_norm, pp_norm)

    fsdp_step, pp_step = (tmp_path / d / "checkpoint" / f"step-{STEPS}" for d in ("fsdp", "pp"))
    from torch.distributed.checkpoint import FileSystemReader

    stored = FileSystemReader(str(fsdp_step)).read_metadata().state_dict_metadata
    shapes = {k: tuple(v.size) for k, v in stored.items() if k.startswith(("tok_", "layers.", "norm.", "output."))}
    fsdp_weights = read_model_state_dict(fsdp_step, shapes)
    pp_weights = read_model_state_dict(pp_step, shapes)
    seed_weights = read_model_state_dict(seed_step, shapes)
    moved = 0.0
    for name, weight in fsdp_weights.items():
        assert (pp_weights[name] - weight).abs().max().item() <= WEIGHT_ATOL, name
        moved = max(moved, (weight - seed_weights[name]).abs().max().item())
    assert moved > 100 * WEIGHT_ATOL  # the runs did update the weights
