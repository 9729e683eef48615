"""Goodput: every second of a job's wall time in one category, across restarts.

``ledger`` keeps the records (the launcher's and rank 0's), ``report`` turns them into the
breakdown, the log line, TensorBoard scalars, ``goodput.json`` and a PNG, and
``python -m torchtitan_runai.goodput FOLDER`` prints it for a finished or running job
(``__main__``). The trainer and the launcher use the builders here.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from torchtitan_runai import storage
from torchtitan_runai.goodput.ledger import LAUNCH_ID_ENV, LaunchRecord, Ledger, NullLedger, read_records
from torchtitan_runai.goodput.report import WHOLE_JOB, goodput_line, json_summary, so_far, summarize
from torchtitan_runai.jsonio import write_json_atomic


def enabled(config: Any) -> bool:
    gp = getattr(config, "goodput", None)
    return gp is None or gp.enable


def build_ledger(config: Any, env: Mapping[str, str] = os.environ) -> Ledger | NullLedger:
    """Rank 0's ledger, started (its heartbeat thread writing); a NullLedger on the other ranks."""
    if int(env.get("RANK", "0")) != 0 or not enabled(config):
        return NullLedger()
    gp = config.goodput
    return Ledger(
        storage.goodput_dir(config), heartbeat_s=gp.heartbeat_seconds, launch_id=env.get(LAUNCH_ID_ENV)
    ).start()


def build_launch_record(config: Any) -> LaunchRecord | None:
    """The launcher's record (node 0, after it holds the folder), written; its id goes to the workers
    (``LAUNCH_ID_ENV``, in the launcher's ``workers.environment``)."""
    if not enabled(config):
        return None
    return LaunchRecord(storage.goodput_dir(config)).open()


def write_summary(config: Any, summary: dict[str, Any]) -> None:
    try:
        write_json_atomic(storage.goodput_summary_file(config), json_summary(summary))
    except OSError:
        pass  # a report, never a reason to fail a step


def report_at_exit(config: Any) -> str:
    """The launcher's last word on goodput, the one figure of a finished run (``report.WHOLE_JOB``):
    the whole job's ledger, every launch from its launcher's start (start-up, restarts, the time
    between pods) to this launcher's exit (teardown included); also goodput.json in the dump folder.
    Rank 0's lines during the run are progress figures of the same ledger (``report.so_far``) and it
    prints none at the end. (No PNG here: matplotlib would cost the pod seconds at every exit;
    ``python -m torchtitan_runai.goodput`` draws it.)"""
    try:
        summary = summarize(read_records(storage.goodput_dir(config)))
        write_summary(config, summary)
        return goodput_line(summary, WHOLE_JOB)
    except Exception as e:  # a report: never the reason a finished job fails
        return f"goodput: not reported ({type(e).__name__}: {e})"


__all__ = [
    "LAUNCH_ID_ENV",
    "Ledger",
    "NullLedger",
    "build_launch_record",
    "build_ledger",
    "goodput_line",
    "report_at_exit",
    "so_far",
    "summarize",
    "write_summary",
]
