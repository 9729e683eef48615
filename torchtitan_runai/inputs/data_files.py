"""The training data as files: which settings name a dataset, which files make it, and their checks.

The launcher runs ``validate_data_config`` once per node before any worker starts, and the ranks
load what passes (``training.data``). Nothing here imports ``datasets`` or torch: torchtitan's named
datasets are read from its source (``upstream.text_dataset_paths``).

Mistakes are ``UserError``s naming the setting: a missing path, an empty file or folder, an
unknown format, mixed formats, a missing text column.

The content is sampled too (``check_content``), every file of a local dataset, before any worker
starts: a JSON Lines file's first ``HEAD_LINES`` lines and, when it is not compressed, one whole line
at each of ``SPREAD_SAMPLES`` offsets spread through it (a seek each: a 100 GB file costs as little as a
small one); a text file's same lines; a Parquet or Arrow file's schema. Each sampled record must
parse, be a JSON object, have ``data.text_column``, and hold text there. A failure names the file,
the line (its number in the head, its byte offset further on) and the fix: a worker would otherwise
die on it after minutes of start-up, with a ``datasets`` traceback, in every rank.
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


HEAD_LINES = 20
"""How many lines from the start of each JSON Lines or text file ``check_content`` reads."""
SPREAD_SAMPLES = 8
"""How many more lines, at offsets spread through an uncompressed file, ``check_content`` reads."""


def _sample_lines(file: Path) -> list[tuple[str, bytes]]:
    """(where, raw line) for the head lines and, uncompressed, one whole line at each spread offset."""
    samples: list[tuple[str, bytes]] = []
    opener = gzip.open if file.name.endswith(".gz") else open
    with opener(file, "rb") as f:
        for number, line in enumerate(f, start=1):
            if number > HEAD_LINES:
                break
            samples.append((f"line {number}", line))
    if file.name.endswith(".gz"):
        return samples
    size = file.stat().st_size
    with open(file, "rb") as f:
        for i in range(1, SPREAD_SAMPLES + 1):
            offset = size * i // (SPREAD_SAMPLES + 1)
            f.seek(max(offset - 1, 0))
            f.readline()  # the rest of the line the offset falls in: the sample starts at a line's start
            start = f.tell()
            line = f.readline()
            if line:
                samples.append((f"the line at byte {start}", line))
    return samples


def _bad_record(file: Path, where: str, why: str, fix: str, setting: str = "training.dataset_path") -> UserError:
    return UserError(setting, str(file), f"{where}: {why}", fix)


def check_content(fmt: str, files: list[Path], data: Data) -> None:
    """Sample every file's content (the module docstring says how much); UserError naming the file
    and the line."""
    for file in files:
        if fmt in ("parquet", "arrow"):
            _check_schema(fmt, file, data)
            continue
        head_is_array = False
        for index, (where, raw) in enumerate(_sample_lines(file)):
            try:
                if b"\x00" in raw:  # valid UTF-8, but no text holds a NUL: a binary file
                    raise UnicodeDecodeError("utf-8", raw, raw.index(b"\x00"), raw.index(b"\x00") + 1, "NUL")
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _bad_record(
                    file,
                    where,
                    f"is not UTF-8 text (byte {e.start} of the line: a binary or compressed file under a "
                    f"{'text' if fmt == 'text' else 'JSON'} name?)",
                    "point training.dataset_path at the text data; a gzip file needs its .gz suffix, other "
                    "formats theirs (.parquet, .arrow)",
                ) from None
            if fmt == "text" or not line.strip():
                continue
            if index == 0 and line.lstrip().startswith("[") and not file.name.endswith((".jsonl", ".jsonl.gz")):
                head_is_array = True  # one JSON array (datasets reads it whole): not line by line
            if head_is_array:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if line.lstrip().startswith("{") and index == 0 and not file.name.endswith((".jsonl", ".jsonl.gz")):
                    break  # a pretty-printed JSON document, not JSON Lines: datasets reads it whole
                raise _bad_record(
                    file,
                    where,
                    f"is not JSON ({e.msg}, column {e.colno}): {line.strip()[:60]!r}",
                    'write one JSON object per line (JSON Lines), e.g. {"text": "..."}, or fix that line',
                ) from None
            _check_record(file, where, record, data)


def _check_record(file: Path, where: str, record: Any, data: Data) -> None:
    column = data.text_column
    if not isinstance(record, dict):
        raise _bad_record(
            file,
            where,
            f"is a JSON {type(record).__name__}, not an object",
            f'write one JSON object per line, with the text under "{column}"',
        )
    if column not in record:
        raise _bad_record(
            file,
            where,
            f"has no '{column}' column (columns: {list(record)[:10]})",
            "set data.text_column to the key holding the text, or add it to every record",
            setting="data.text_column",
        )
    if not isinstance(record[column], str):
        raise _bad_record(
            file,
            where,
            f"'{column}' holds a JSON {type(record[column]).__name__}, not text",
            f'store the text as a JSON string ("{column}": "..."), or set data.text_column to the key holding it',
            setting="data.text_column",
        )


def _check_schema(fmt: str, file: Path, data: Data) -> None:
    import pyarrow as pa

    try:
        columns = sniff_columns(fmt, file)
        schema = _schema(fmt, file)
    except (pa.ArrowException, OSError) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise
        raise _bad_record(
            file,
            "the file",
            f"is not a readable {fmt} file ({str(e).splitlines()[0][:120]})",
            f"point training.dataset_path at {fmt} files, or rename the file to its real format's suffix",
        ) from None
    check_column(columns, data, str(file))
    kind = schema.field(data.text_column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise _bad_record(
            file,
            "the schema",
            f"column '{data.text_column}' is {kind}, not text",
            "set data.text_column to the string column holding the text, or write it as strings",
            setting="data.text_column",
        )


def _schema(fmt: str, file: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fmt == "parquet":
        return pq.read_schema(file)
    with open(file, "rb") as f:
        try:
            return pa.ipc.open_stream(f).schema
        except pa.ArrowInvalid:
            f.seek(0)
            return pa.ipc.open_file(f).schema


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


def check_dataset(name: str, path: str | None, data: Data, section: str = "training", content: bool = True) -> None:
    """Cheap checks of one dataset setting (no loading): UserError naming the setting. ``content``:
    sample every file's content and its text column too (the launcher's check; a rank that the
    launcher started skips it: every rank reading the head of every shard is ranks x shards reads)."""
    key = (name or "").lower()
    if key not in known_datasets():
        raise UserError(f"{section}.dataset", name, "unknown dataset", f"use one of {known_datasets()}")
    setting = f"{section}.dataset_path"
    if key == LOCAL:
        fmt, files = find_data_files(path, data, setting)
        if fmt != "disk" and content:
            check_content(fmt, files, data)
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
