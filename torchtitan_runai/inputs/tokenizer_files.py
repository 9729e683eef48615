"""The tokenizer as files: where they come from, and the check that they can be read.

Resolution (``ensure_tokenizer``), in order:

1. ``model.hf_assets_path`` already holds a tokenizer (``tokenizer.json``, or Meta's tiktoken file
   ``original/tokenizer.model`` / ``tokenizer.model``): use it, no network.
2. Otherwise, with ``hub.repo_id`` set (the cluster recipes name ``meta-llama/Llama-3.1-8B``), the
   tokenizer files only (``hub.files``) come from the Hub cache. The cache is ``hub.cache_dir``, else
   ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``<job.dump_folder>/hf_cache`` (the dump folder is on
   the PVC in cluster recipes, so the cache is shared by every pod and every later job). A file
   lock in the cache makes one process per cache download while the others wait, then read the
   cache: the launcher, once per node before any worker starts, so the ranks find it cached.
   ``HF_HUB_OFFLINE=1`` reads the cache only and fails clearly when the files are not there.
3. Otherwise: a ``UserError`` naming ``model.hf_assets_path`` and its value.

``verify_tokenizer`` reads the file (the launcher's check: a truncated ``tokenizer.json`` is one line
naming it, not a parser traceback in every rank).

Hub access (the ``HF_TOKEN`` path, retries, one-line errors, the locked download) is
``torchtitan_runai.hub``; the tokenizer objects the ranks build are ``training.tokenizer``.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any, Callable

from torchtitan_runai import hub
from torchtitan_runai.config import Hub
from torchtitan_runai.errors import UserError

TOKENIZER_JSON = "tokenizer.json"
TIKTOKEN_FILES = ("original/tokenizer.model", "tokenizer.model")


def find_tokenizer_files(folder: Path, tokenizer_format: str = "auto") -> Path | None:
    """The tokenizer file in ``folder`` that ``load_tokenizer`` would use, or None."""
    hf = folder / TOKENIZER_JSON
    tiktoken_files = [folder / name for name in TIKTOKEN_FILES]
    candidates = {
        "auto": [hf, *tiktoken_files],
        "hf": [hf],
        "tiktoken": tiktoken_files,
    }.get(tokenizer_format)
    if candidates is None:
        raise UserError(
            "hub.tokenizer_format", tokenizer_format, "unknown tokenizer format", 'use "auto", "hf" or "tiktoken"'
        )
    return next((c for c in candidates if c.is_file()), None)


def ensure_tokenizer(job_config: Any) -> Path:
    """The folder holding the job's tokenizer, downloading it first if needed (see module doc)."""
    hub_section = getattr(job_config, "hub", None) or Hub()
    return resolve_tokenizer(
        assets_path=job_config.model.hf_assets_path,
        hub=hub_section,
        cache_dir=hub.resolve_cache_dir(hub_section, job_config.job.dump_folder),
    )


def resolve_tokenizer(assets_path: str | None, hub: Hub, cache_dir: Path) -> Path:
    """``ensure_tokenizer`` with explicit arguments."""
    if assets_path:
        folder = Path(assets_path).expanduser()
        if folder.is_dir() and find_tokenizer_files(folder, hub.tokenizer_format):
            return folder
    if not hub.repo_id:
        if not assets_path or not Path(assets_path).expanduser().exists():
            why = "the tokenizer folder does not exist and no hub.repo_id is set to download it from"
        else:
            why = "the folder has no tokenizer.json or original/tokenizer.model and no hub.repo_id is set"
        raise UserError(
            "model.hf_assets_path",
            assets_path,
            why,
            "point it at a folder with the tokenizer files, or set hub.repo_id "
            '(e.g. "meta-llama/Llama-3.1-8B") and export HF_TOKEN',
        )
    return download_tokenizer(hub, cache_dir)


def _usable(hub_section: Hub) -> Callable[[Path], bool]:
    return lambda folder: find_tokenizer_files(folder, hub_section.tokenizer_format) is not None


def cached_tokenizer(hub_section: Hub, cache_dir: Path) -> Path | None:
    """The cached snapshot folder holding a usable tokenizer of ``hub.repo_id``, or None; no network."""
    return hub.cached_snapshot(hub_section, cache_dir, _usable(hub_section))


def download_tokenizer(hub_section: Hub, cache_dir: Path) -> Path:
    """Fetch ``hub.files`` of ``hub.repo_id`` into ``cache_dir`` (once: file lock), return their folder."""
    return hub.locked_download(hub_section, cache_dir, _usable(hub_section), "tokenizer")


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Meta's tokenizer.model (``base64 rank`` per line); a UserError for anything else."""
    ranks: dict[bytes, int] = {}
    try:
        for number, line in enumerate(Path(path).read_bytes().splitlines(), 1):
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
    except (ValueError, UnicodeDecodeError) as error:
        raise UserError(
            "model.hf_assets_path",
            str(path),
            f"not a Llama 3 tiktoken file (line {number}: {type(error).__name__}); a SentencePiece "
            "tokenizer.model (Llama 2) is not supported",
            "use Llama 3's original/tokenizer.model or its tokenizer.json",
        ) from None
    if not ranks:
        raise UserError(
            "model.hf_assets_path", str(path), "the tiktoken file is empty", "download it again (delete it and rerun)"
        )
    return ranks


def require_tokenizer_file(folder: Path, tokenizer_format: str = "auto") -> Path:
    """``find_tokenizer_files``, or a UserError naming the folder that holds none."""
    found = find_tokenizer_files(Path(folder), tokenizer_format)
    if found is None:
        raise UserError(
            "model.hf_assets_path",
            str(folder),
            "no tokenizer.json or original/tokenizer.model in the folder",
            "see docs/data.md",
        )
    return found


def verify_tokenizer(folder: Path, tokenizer_format: str = "auto") -> Path:
    """Read the tokenizer file ``load_tokenizer`` would use; a damaged or truncated file is a
    UserError naming it (the launcher calls this before any worker starts)."""
    found = require_tokenizer_file(folder, tokenizer_format)
    if found.name != TOKENIZER_JSON:
        read_tiktoken_ranks(found)
        return found
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(found))
    except Exception as error:  # noqa: BLE001 - the Rust parser raises a bare Exception
        raise UserError(
            "model.hf_assets_path",
            str(found),
            f"tokenizer.json cannot be read as a tokenizer ({hub.describe(error)})",
            "replace it with the model's tokenizer.json (a file in the Hub cache: delete it and "
            "the next run downloads it again)",
        ) from None
    return found
