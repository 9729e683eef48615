"""Loss and throughput curves as one PNG, from the TensorBoard event files of a job.

Usage::

    python -m torchtitan_runai.plots DUMP_OR_TB_DIR [-o training_curves.png]

``DUMP_OR_TB_DIR`` is the job's ``job.dump_folder``, its TensorBoard folder
(``<dump_folder>/<metrics.save_tb_folder>``) or any folder above event files: every
``events.out.tfevents.*`` below it is read. torchtitan starts a new run folder (named by date and
time) each time a job starts, so a resumed job has several; they are merged by step, the most
recently written value winning (steps re-run after a restart replace the lost ones). The default
output is ``training_curves.png`` in the TensorBoard folder (in the folder given otherwise).

Panels: loss (average, and validation loss when present) and throughput (tokens/s per device,
with MFU on a second axis when it was recorded), against the training step. The trainer calls
``plot_at_end(job_config)`` on the metrics rank when training ends; a failure there is a warning,
never a failed job.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path
from typing import Any

from torchtitan_runai import storage
from torchtitan_runai.errors import UserError, cli, writing

LOSS = "loss_metrics/global_avg_loss"
VALIDATION_LOSS = "validation_metrics/loss"
TPS = "throughput(tps)"
MFU = "mfu(%)"


def event_files(folder: str | os.PathLike) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("events.out.tfevents.*") if p.is_file())


def _tag_suffix(tag: str, name: str) -> bool:
    # torchtitan prefixes tags with the processor's tag ("tag/loss_metrics/...") when it has one.
    return tag == name or tag.endswith("/" + name)


def read_scalars(folder: str | os.PathLike) -> dict[str, dict[int, float]]:
    """{metric: {step: value}} over every event file below ``folder``, newest write winning."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    newest: dict[str, dict[int, tuple[float, float]]] = {}
    for path in event_files(folder):
        accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags().get("scalars", []):
            series = newest.setdefault(tag, {})
            for event in accumulator.Scalars(tag):
                if event.step not in series or event.wall_time >= series[event.step][0]:
                    series[event.step] = (event.wall_time, event.value)
    return {tag: {step: v for step, (_, v) in sorted(s.items())} for tag, s in newest.items()}


def _series(scalars: dict[str, dict[int, float]], name: str) -> tuple[list[int], list[float]]:
    for tag, series in scalars.items():
        if _tag_suffix(tag, name) and series:
            return list(series), list(series.values())
    return [], []


def plot_training_curves(
    folder: str | os.PathLike, output: str | os.PathLike | None = None, title: str | None = None
) -> Path:
    """Write the PNG; returns its path. Raises UserError when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display in a pod
    import matplotlib.pyplot as plt

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(
            "DUMP_OR_TB_DIR", str(folder), "no such folder", "pass the job's dump_folder or its TensorBoard folder"
        )
    scalars = read_scalars(folder)
    steps, loss = _series(scalars, LOSS)
    if not steps:
        raise UserError(
            "DUMP_OR_TB_DIR",
            str(folder),
            f"no '{LOSS}' scalars in any TensorBoard event file below it",
            "enable metrics.enable_tensorboard and point at its folder",
        )
    output = Path(output) if output else _default_output(folder)

    figure, (loss_ax, tps_ax) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    loss_ax.plot(steps, loss, label="train loss", color="tab:blue")
    val_steps, val_loss = _series(scalars, VALIDATION_LOSS)
    if val_steps:
        loss_ax.plot(val_steps, val_loss, "o-", label="validation loss", color="tab:orange")
    loss_ax.set_ylabel("loss")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend(loc="upper right")
    loss_ax.set_title(title or f"{folder.resolve().name}: last step {steps[-1]}, loss {loss[-1]:.4f}")

    tps_steps, tps = _series(scalars, TPS)
    tps_ax.plot(tps_steps, tps, color="tab:green", label="tokens/s per device")
    tps_ax.set_ylabel("tokens/s per device")
    tps_ax.set_xlabel("step")
    tps_ax.grid(alpha=0.3)
    mfu_steps, mfu = _series(scalars, MFU)
    if mfu_steps:
        mfu_ax = tps_ax.twinx()
        mfu_ax.plot(mfu_steps, mfu, color="tab:red", alpha=0.6, label="MFU %")
        mfu_ax.set_ylabel("MFU %")
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial.png")
    try:
        with writing(output):
            figure.savefig(partial, dpi=100)
            partial.replace(output)  # a reader never sees half a PNG
    finally:
        plt.close(figure)
        with contextlib.suppress(OSError):  # a full disk: no half PNG left holding its space
            partial.unlink(missing_ok=True)
    return output


def _default_output(folder: Path) -> Path:
    tb = folder / "tb"
    return storage.plot_file(tb if tb.is_dir() and event_files(tb) else folder)


def plot_at_end(job_config: Any) -> Path | None:
    """End-of-training PNG beside the TensorBoard files; never raises (it is a convenience)."""
    from torchtitan_runai.upstream import logger

    if not job_config.metrics.enable_tensorboard:
        return None
    folder = storage.tensorboard_dir(job_config)
    if not event_files(folder):
        return None
    try:
        path = plot_training_curves(folder, storage.plot_file(folder))
    except Exception as error:  # noqa: BLE001  (a plot must not fail a finished job)
        logger.warning(f"Could not plot training curves from {folder}: {error}")
        return None
    logger.info(f"Training curves written to {path}")
    return path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m torchtitan_runai.plots", description="Plot loss and throughput from TensorBoard files."
    )
    parser.add_argument("folder", help="job.dump_folder, its TensorBoard folder, or above")
    parser.add_argument("-o", "--output", help=f"PNG path (default: <tb folder>/{storage.PLOT_NAME})")
    parser.add_argument("--title")
    args = parser.parse_args(argv)
    print(plot_training_curves(args.folder, args.output, args.title))
    return 0


if __name__ == "__main__":
    cli(main, "torchtitan_runai.plots")
