"""Training-curve PNG from real TensorBoard event files (written with torch's SummaryWriter)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

from torchtitan_runai import plots, storage
from torchtitan_runai.errors import UserError

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(folder: Path, steps: range, loss_offset: float, mfu: bool = True) -> None:
    writer = SummaryWriter(str(folder))
    for step in steps:
        writer.add_scalar("loss_metrics/global_avg_loss", 10.0 / step + loss_offset, step)
        writer.add_scalar("throughput(tps)", 1000.0 + step, step)
        if mfu:
            writer.add_scalar("mfu(%)", 30.0, step)
    writer.close()


@pytest.fixture
def resumed_job(tmp_path):
    """A job that ran steps 1..30, was preempted, and re-ran 21..40 after resuming from 20."""
    tb = tmp_path / "dump" / "tb"
    write_run(tb / "20260101-1200", range(1, 31), loss_offset=0.0)
    time.sleep(0.01)  # the resumed run's wall times are later
    write_run(tb / "20260101-1300", range(21, 41), loss_offset=1.0)
    return tmp_path / "dump"


def test_runs_merge_by_step_newest_wins(resumed_job):
    scalars = plots.read_scalars(resumed_job)
    loss = scalars["loss_metrics/global_avg_loss"]
    assert sorted(loss) == list(range(1, 41))
    assert loss[10] == pytest.approx(1.0)  # first run only
    assert loss[25] == pytest.approx(10 / 25 + 1)  # re-run after resume replaces it
    assert scalars["throughput(tps)"][40] == 1040.0


def test_plot_defaults_beside_tensorboard_files(resumed_job):
    png = plots.plot_training_curves(resumed_job)
    assert png == resumed_job / "tb" / storage.PLOT_NAME
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
    assert not list(png.parent.glob(".*partial*"))


def test_cli_writes_requested_file(resumed_job, tmp_path):
    out = tmp_path / "curves" / "x.png"
    run = subprocess.run(
        [sys.executable, "-m", "torchtitan_runai.plots", str(resumed_job / "tb"), "-o", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(out)
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_without_mfu_and_with_tagged_metrics(tmp_path):
    writer = SummaryWriter(str(tmp_path / "tb" / "run"))
    for step in (1, 10, 20):  # torchtitan prefixes tags with the processor's tag when set
        writer.add_scalar("train/loss_metrics/global_avg_loss", 5.0 - step / 10, step)
        writer.add_scalar("train/throughput(tps)", 10.0, step)
    writer.close()
    assert plots.plot_training_curves(tmp_path / "tb").read_bytes()[:8] == PNG_MAGIC


def test_nothing_to_plot_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no 'loss_metrics/global_avg_loss' scalars"):
        plots.main([str(tmp_path)])
    with pytest.raises(UserError, match="no such folder"):
        plots.plot_training_curves(tmp_path / "missing")
