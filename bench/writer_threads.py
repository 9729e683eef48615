"""DCP write speed by writer-thread count: what ``checkpoint_perf.writer_threads`` defaults to.

Writes a host state dict shaped like a staged checkpoint (many tensors of a few hundred MiB, plus
small ones) with ``FileSystemWriter(thread_count=k)`` through ``dcp.save`` in one process, the way
this fork's checkpoint process writes a staged checkpoint, and reports bytes/s per thread count.
Each folder is deleted before the next write; every count is written ``--repeat`` times (median).

    python -m bench.writer_threads --dir /mnt/ck --gib 8 --out bench/results            # GPU host
    python -m bench.writer_threads --dir /tmp/wt --gib 1 --threads 1,2,4 --out /tmp/wt  # CPU box

``--sync`` picks ``sync_files`` (fsync every file; on by default in DCP and in this fork, since
the completion marker must only follow data that is on disk).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from pathlib import Path


def machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0).replace(" ", "-")
    except Exception:
        pass
    return f"cpu{os.cpu_count()}-{platform.node()}"


def fs_type(path: Path) -> str:
    try:
        out = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True, check=True).stdout
        return out.splitlines()[1].split()[1]
    except Exception:
        return "?"


def state_dict(total_bytes: int, tensor_bytes: int = 256 << 20):
    """fp32 tensors in shared memory (what the staging hands the checkpoint process)."""
    import torch

    sd = {}
    n = max(1, total_bytes // tensor_bytes)
    for i in range(n):
        t = torch.empty(tensor_bytes // 4, dtype=torch.float32).share_memory_()
        t.fill_(float(i))
        sd[f"layer{i}.weight"] = t
    for i in range(64):  # norms, biases, small optimizer entries
        sd[f"small{i}"] = torch.full((1024,), float(i))
    return sd


def write_once(sd, folder: Path, threads: int, sync: bool) -> float:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    shutil.rmtree(folder, ignore_errors=True)
    began = time.perf_counter()
    dcp.save(sd, storage_writer=FileSystemWriter(str(folder), thread_count=threads, sync_files=sync), no_dist=True)
    took = time.perf_counter() - began
    shutil.rmtree(folder, ignore_errors=True)
    return took


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True, help="folder on the storage to measure (a checkpoint volume)")
    p.add_argument("--gib", type=float, default=8.0)
    p.add_argument("--threads", default="1,2,4,8,16,32")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--sync", choices=["on", "off", "both"], default="on")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--tag", default="")
    a = p.parse_args(argv)
    import torch

    root = Path(a.dir)
    root.mkdir(parents=True, exist_ok=True)
    nbytes = int(a.gib * 2**30)
    sd = state_dict(nbytes)
    real = sum(t.numel() * t.element_size() for t in sd.values())
    rows = []
    syncs = {"on": [True], "off": [False], "both": [True, False]}[a.sync]
    for sync in syncs:
        for k in [int(x) for x in a.threads.split(",")]:
            times = [write_once(sd, root / f"wt-{k}", k, sync) for _ in range(a.repeat)]
            med = statistics.median(times)
            rows.append(
                {
                    "threads": k,
                    "sync_files": sync,
                    "seconds": [round(t, 3) for t in times],
                    "gib_per_s": round(real / med / 2**30, 2),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    report = {
        "date": dt.date.today().isoformat(),
        "machine": machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "dir": str(root),
        "fs": fs_type(root),
        "bytes": real,
        "rows": rows,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"writer-threads-{report['date']}-{report['machine']}{('-' + a.tag) if a.tag else ''}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    lines = [
        f"# DCP writer threads: {report['machine']}, {report['cpus']} CPUs, torch {report['torch']}",
        "",
        f"{real / 2**30:.1f} GiB host state dict to `{root}` ({report['fs']}), median of {a.repeat}.",
        "",
        "| threads | sync_files | GiB/s | seconds |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {r['threads']} | {r['sync_files']} | {r['gib_per_s']} | {r['seconds']} |" for r in rows]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
