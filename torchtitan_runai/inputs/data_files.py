"""The training data as files: which settings name a dataset, which files make it, and their checks.

The launcher runs ``validate_data_config`` once per node before any worker starts, and the ranks
load what passes (``training.data``). Nothing here imports ``datasets`` or torch: torchtitan's named
datasets are read from its source (``upstream.text_dataset_paths``).

Mistakes are ``UserError``s naming the setting: a missing path, an empty file or folder, an
unknown format, mixed formats, a missing text column.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from torchtitan_runai.config import Data
from torchtitan_runai.errors import UserError

LOCAL = "local"
FORMATS = {"jsonl": "json", "json": "json", "parquet": "parquet", "arrow": "arrow", "text": "text"}
_SUFFIXES = {
    ".jsonl": "jsonl",
    ".json": "json",
    ".jsonl.gz": "jsonl",
    ".json.gz": "json",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".txt": "text",
    ".txt.gz": "text",
}
_SAVE_TO_DISK_MARKERS = ("state.json", "dataset_dict.json")
ORDERS = ("global", "per-rank")


def data_config(job_config: Any) -> Data:
    return getattr(job_config, "data", None) or Data()


def find_data_files(path: str | None, data: Data, setting: str = "training.dataset_path"):
    """(format, sorted files) of a local dataset, or ("disk", [folder]) for a save_to_disk folder."""
    if not path:
        raise UserError(
            setting,
            path,
            f'training.dataset = "{LOCAL}" needs a file or folder',
            "set training.dataset_path to a .jsonl/.parquet/.arrow/.txt file or folder",
        )
    root = Path(path).expanduser()
    if not root.exists():
        raise UserError(
            setting,
            path,
            "does not exist",
            "fix the path (relative paths are from the working directory) or mount the PVC",
        )
    if data.format != "auto" and data.format not in FORMATS:
        raise UserError("data.format", data.format, "unknown format", f'use "auto" or one of {sorted(FORMATS)}')
    if root.is_dir() and any((root / m).is_file() for m in _SAVE_TO_DISK_MARKERS):
        return "disk", [root]
    candidates = (
        [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    )
    found: dict[str, list[Path]] = {}
    for file in candidates:
        fmt = _format_of(file, data)
        if fmt is not None:
            found.setdefault(fmt, []).append(file)
    if not found:
        what = "is not a known data file" if root.is_file() else "holds no data files"
        raise UserError(
            setting,
            path,
            f"{what} (known: {sorted(_SUFFIXES)})",
            "point it at the data, or set data.format for files without a suffix",
        )
    if len(found) > 1:
        raise UserError(
            setting, path, f"mixes formats {sorted(found)}", "keep one format per folder, or point at a sub-folder"
        )
    fmt, files = next(iter(found.items()))
    if all(f.stat().st_size == 0 for f in files):
        raise UserError(setting, path, "is empty", "write the dataset first")
    return fmt, files


def _format_of(file: Path, data: Data) -> str | None:
    if data.format != "auto":
        return data.format
    name = file.name.lower()
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return _SUFFIXES[suffix]
    return None


def sniff_columns(fmt: str, file: Path) -> list[str] | None:
    """Column names from the first record / the schema, cheaply; None if unknown."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fmt == "text":
        return ["text"]
    if fmt == "parquet":
        return list(pq.read_schema(file).names)
    if fmt == "arrow":
        with open(file, "rb") as f:
            try:
                return list(pa.ipc.open_stream(f).schema.names)
            except pa.ArrowInvalid:
                f.seek(0)
                return list(pa.ipc.open_file(f).schema.names)
    opener = gzip.open if file.name.endswith(".gz") else open
    with opener(file, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    return None  # a JSON array file: datasets will tell
                return list(record) if isinstance(record, dict) else None
    return []


def check_column(columns: list[str] | None, data: Data, path: str) -> None:
    if columns is None:
        return
    if not columns:
        raise UserError("training.dataset_path", path, "has no records", "write the dataset first")
    if data.text_column not in columns:
        raise UserError(
            "data.text_column",
            data.text_column,
            f"{path} has no such column (columns: {columns})",
            "set data.text_column to the column holding the text",
        )


def _named_dataset_paths() -> dict[str, str]:
    """torchtitan's named datasets and their paths; read from its source (``upstream.text_dataset_paths``:
    the launcher's check imports no ``datasets``), else from the imported table."""
    from torchtitan_runai import upstream

    paths = upstream.text_dataset_paths()
    return paths if paths is not None else {k: v.path for k, v in upstream.text_datasets.DATASETS.items()}


def known_datasets() -> list[str]:
    return sorted(set(_named_dataset_paths()) | {LOCAL})


def check_dataset(name: str, path: str | None, data: Data, section: str = "training") -> None:
    """Cheap checks of one dataset setting (no loading): UserError naming the setting."""
    key = (name or "").lower()
    if key not in known_datasets():
        raise UserError(f"{section}.dataset", name, "unknown dataset", f"use one of {known_datasets()}")
    setting = f"{section}.dataset_path"
    if key == LOCAL:
        fmt, files = find_data_files(path, data, setting)
        if fmt != "disk":
            check_column(sniff_columns(fmt, files[0]), data, path or "")
        return
    effective = path or _named_dataset_paths()[key]
    if is_on_disk(name, path) and not Path(effective).expanduser().exists():
        raise UserError(
            setting,
            effective,
            f"the {key} data folder does not exist",
            f'set {setting}, or use training.dataset = "{LOCAL}" with your files',
        )


def is_on_disk(name: str, path: str | None) -> bool:
    """Whether a dataset setting names files on this machine (``local``, or a named dataset whose
    path is a folder, e.g. torchtitan's ``c4_test``) rather than a Hub dataset the ranks stream."""
    key = (name or "").lower()
    if key == LOCAL:
        return True
    effective = path or _named_dataset_paths().get(key) or ""
    return effective.startswith(("/", "./", "../", "~")) or key == "c4_test"


def on_disk(job_config: Any) -> bool:
    """Whether every dataset the ranks read (training, and validation when enabled) is on disk: the
    launcher then tells the workers to stay offline (``launcher.workers.environment``)."""
    if not is_on_disk(job_config.training.dataset, job_config.training.dataset_path):
        return False
    validation = getattr(job_config, "validation", None)
    if validation is not None and getattr(validation, "enable", False):
        return is_on_disk(validation.dataset, validation.dataset_path)
    return True


def validate_data_config(job_config: Any) -> None:
    """Launcher-side checks of the dataset settings, before any worker starts."""
    data = data_config(job_config)
    check_dataset(job_config.training.dataset, job_config.training.dataset_path, data, "training")
    validation = getattr(job_config, "validation", None)
    if validation is not None and getattr(validation, "enable", False):
        check_dataset(validation.dataset, validation.dataset_path, data, "validation")
