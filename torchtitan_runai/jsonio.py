"""JSON records on shared storage: written atomically (readers see the old file or the whole new one),
read back as a dict or None (a missing, partial or foreign file is no record).

Every record of the run is one: the checkpoint markers, ``job.json`` and ``lock.json``, the goodput
ledger's launch and segment records.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk: leave no half-written temp file holding its space
        tmp.unlink(missing_ok=True)
        raise
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # some network file systems refuse fsync on a directory
        pass


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None
