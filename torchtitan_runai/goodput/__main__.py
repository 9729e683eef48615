"""Where a job's wall time went: the goodput breakdown of a finished or running job.

Usage::

    python -m torchtitan_runai.goodput FOLDER [-o goodput.png] [--json]

``FOLDER`` is the job's output folder (``job.dump_folder``, e.g. ``/outputs/llama3_8b``), its
checkpoint folder, or the ledger folder itself (``<checkpoint folder>/goodput``). Prints the
share of the held time that went to productive steps, every category in seconds and as a share,
and one line per process life (segment): how it started and ended, which step it resumed from
and how far it got. Writes the PNG (timeline over totals) next to the ledger's output folder
unless ``-o`` names another file; ``--json`` prints the summary as JSON instead of the table.
Reading a running job's ledger is safe: every record is replaced atomically.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from torchtitan_runai import storage
from torchtitan_runai.errors import UserError, cli, writing
from torchtitan_runai.goodput import report
from torchtitan_runai.goodput.ledger import read_records


def find_ledger(folder: Path) -> Path:
    """The ledger folder for an output, checkpoint or ledger folder."""
    candidates = [
        folder,
        folder / storage.GOODPUT_LEDGER,
        *sorted(p / storage.GOODPUT_LEDGER for p in folder.glob("*") if p.is_dir()),
    ]
    for c in candidates:
        if c.is_dir() and read_records(c):
            return c
    raise UserError(
        "FOLDER",
        str(folder),
        "holds no goodput ledger (no goodput/launch-*.json or segment-*.json)",
        "pass the job's output folder (job.dump_folder), its checkpoint folder, or <checkpoint>/goodput",
    )


def table(summary: dict) -> list[str]:
    sec, held = summary["seconds"], summary["held_s"] or 1.0
    lines = [report.goodput_line(summary), "", f"{'category':<20} {'seconds':>10} {'share':>7}"]
    for c in report.CATEGORIES:
        share = "" if c == "away" else f"{100 * sec[c] / held:6.1f}%"
        lines.append(f"{report.LABELS[c]:<20} {sec[c]:>10.1f} {share:>7}")
    lines.append(f"{'held (span - away)':<20} {summary['held_s']:>10.1f}")
    lines.append(f"{'span':<20} {summary['span_s']:>10.1f}")
    lines += ["", "process lives (rank 0):"]
    for i, s in enumerate(summary["segments"]):
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(s["started_at"]))
        lines.append(
            f"  {i + 1}. {started} UTC, {report.short(s['last_seen'] - s['started_at'])}: "
            f"resumed from step {s['resume_step']}, reached step {s['last_step']}, "
            f"newest complete checkpoint {s['durable_step']}, {s['saves']} save(s), "
            f"ended: {s['outcome'] or 'unknown (killed, or still running)'}"
        )
    return lines


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m torchtitan_runai.goodput", description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("-o", "--output", type=Path, default=None, help="the PNG (default: FOLDER-level goodput.png)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        raise UserError("FOLDER", str(args.folder), "is not a folder", "pass the job's output folder (job.dump_folder)")
    ledger = find_ledger(args.folder)
    summary = report.summarize(read_records(ledger), now=time.time())
    if args.json:
        print(json.dumps(report.json_summary(summary), indent=1, sort_keys=True))
    else:
        print("\n".join(table(summary)))
    png = args.output or _output_folder(args.folder, ledger) / storage.GOODPUT_PLOT
    with writing(png):
        report.plot(summary, png)
    print(f"plot written to {png}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _output_folder(given: Path, ledger: Path) -> Path:
    # a ledger beside checkpoints lives two levels below the dump folder; one below without them
    if given != ledger and given != ledger.parent:
        return given
    return ledger.parent.parent if (ledger.parent / "job.json").exists() else ledger.parent


if __name__ == "__main__":
    cli(main, prog="python -m torchtitan_runai.goodput")
