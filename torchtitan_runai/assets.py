"""The tokenizer: where its files come from, and the object that reads them.

Resolution (``ensure_tokenizer``), in order:

1. ``model.hf_assets_path`` already holds a tokenizer (``tokenizer.json``, or Meta's tiktoken file
   ``original/tokenizer.model`` / ``tokenizer.model``): use it, no network.
2. Otherwise, with ``hub.repo_id`` set (the cluster recipes name ``meta-llama/Llama-3.1-8B``), the
   tokenizer files only (``hub.files``) come from the Hub cache. The cache is ``hub.cache_dir``, else
   ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``<job.dump_folder>/hf_cache`` (the dump folder is on
   the PVC in cluster recipes, so the cache is shared by every pod and every later job). A file
   lock in the cache makes one process per cache download while the others wait, then read the
   cache: whoever comes first (the launcher, once per node, or any rank) does the work.
   ``HF_HUB_OFFLINE=1`` reads the cache only and fails clearly when the files are not there.
3. Otherwise: a ``UserError`` naming ``model.hf_assets_path`` and its value.

Access uses ``HF_TOKEN`` from the environment, passed to ``huggingface_hub`` as ``token=``. The
token is never a config field, never logged, and is redacted from every message we raise. Hub
failures become one-line ``UserError``s: 401 (token missing or wrong), 403 (licence not accepted
on the model page), 404 (repo, revision or file), no network, rate limited / Hub down (retried
with exponential backoff first: ``hub.retries``, ``hub.backoff_s``). ``HF_ENDPOINT`` is honoured
(read at call time), which is how the tests point the real client at a fake Hub on 127.0.0.1.

The tokenizer (``build_tokenizer``): torchtitan's ``HuggingFaceTokenizer`` for ``tokenizer.json``;
``TiktokenTokenizer`` for Meta's original file, which gives the same ids as Llama 3's
``tokenizer.json`` (same regex, same ranks, the 256 special tokens after the base vocabulary,
``<|begin_of_text|>`` added by default as the Hugging Face post-processor does).
"""

from __future__ import annotations

import base64
import functools
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

from torchtitan_runai.errors import UserError

TOKENIZER_JSON = "tokenizer.json"
TIKTOKEN_FILES = ("original/tokenizer.model", "tokenizer.model")
TOKEN_ENV = "HF_TOKEN"

T = TypeVar("T")
# Plain logging (propagates to torchtitan's root handler): the launcher uses this module without
# importing torch.
logger = logging.getLogger(__name__)


@dataclass
class Hub:
    """Where the tokenizer comes from when ``model.hf_assets_path`` lacks it ([hub] section)."""

    repo_id: str = ""
    """Hub repository of the tokenizer, e.g. "meta-llama/Llama-3.1-8B". Empty: never download;
    model.hf_assets_path must then hold the tokenizer."""

    revision: str = "main"
    """Branch, tag or commit of repo_id. Pin a commit for reproducible runs."""

    cache_dir: str = ""
    """Download cache (shared by all ranks; put it on the PVC). Empty: $HF_HUB_CACHE, else
    $HF_HOME/hub, else <job.dump_folder>/hf_cache."""

    files: list[str] = field(
        default_factory=lambda: [
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "original/tokenizer.model",
        ]
    )
    """Tokenizer files to fetch from repo_id (nothing else is downloaded). Files the repo lacks are
    skipped, as long as tokenizer.json or original/tokenizer.model arrives."""

    tokenizer_format: str = "auto"
    """"auto" (tokenizer.json if present, else tiktoken), "hf" or "tiktoken"."""

    allow_download: bool = True
    """False: use the cache only, as HF_HUB_OFFLINE=1 does."""

    retries: int = 5
    """Extra attempts after a rate limit (429), a Hub error (5xx) or a connection failure."""

    backoff_s: float = 2.0
    """First wait between attempts; doubled each time, capped at max_backoff_s."""

    max_backoff_s: float = 60.0
    """Longest single wait between attempts."""

    lock_timeout_s: float = 1800.0
    """How long a process waits for another one's download before giving up."""


# ---------------------------------------------------------------------------------------------
# secrets


def hf_token() -> str | None:
    """The Hub token from the environment (HF_TOKEN), or None."""
    return os.environ.get(TOKEN_ENV) or None


def redact(text: str, token: str | None = None) -> str:
    """``text`` with the Hub token (HF_TOKEN) replaced by ``***``."""
    token = token if token is not None else hf_token()
    return text.replace(token, "***") if token else text


# ---------------------------------------------------------------------------------------------
# resolution


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
        raise UserError("hub.tokenizer_format", tokenizer_format, "unknown tokenizer format",
                        'use "auto", "hf" or "tiktoken"')
    return next((c for c in candidates if c.is_file()), None)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def offline() -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) asks for no network."""
    return _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def resolve_cache_dir(hub: Hub, dump_folder: str = "./outputs") -> Path:
    """The Hub download cache: hub.cache_dir, $HF_HUB_CACHE, $HF_HOME/hub, <dump_folder>/hf_cache."""
    if hub.cache_dir:
        return Path(hub.cache_dir).expanduser()
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(dump_folder).expanduser() / "hf_cache"


def ensure_tokenizer(job_config: Any) -> Path:
    """The folder holding the job's tokenizer, downloading it first if needed (see module doc)."""
    hub = getattr(job_config, "hub", None) or Hub()
    return resolve_tokenizer(
        assets_path=job_config.model.hf_assets_path,
        hub=hub,
        cache_dir=resolve_cache_dir(hub, job_config.job.dump_folder),
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
            "model.hf_assets_path", assets_path, why,
            "point it at a folder with the tokenizer files, or set hub.repo_id "
            '(e.g. "meta-llama/Llama-3.1-8B") and export HF_TOKEN',
        )
    return download_tokenizer(hub, cache_dir)


def _lock_name(repo_id: str) -> str:
    return "runai-tokenizer-" + repo_id.replace("/", "--") + ".lock"


def download_tokenizer(hub: Hub, cache_dir: Path) -> Path:
    """Fetch ``hub.files`` of ``hub.repo_id`` into ``cache_dir`` (once: file lock), return their folder."""
    from filelock import FileLock, Timeout

    cache_dir = Path(cache_dir)
    try:
        (cache_dir / ".locks").mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError("hub.cache_dir", str(cache_dir), f"cannot create the cache folder ({error})",
                        "set hub.cache_dir (or HF_HUB_CACHE) to a writable folder, e.g. on the PVC")
    lock = FileLock(str(cache_dir / ".locks" / _lock_name(hub.repo_id)), timeout=hub.lock_timeout_s)
    try:
        with lock:
            cached = _from_cache(hub, cache_dir)
            if cached is not None:
                return cached
            if offline() or not hub.allow_download:
                setting = "HF_HUB_OFFLINE" if offline() else "hub.allow_download"
                raise UserError(
                    setting, os.environ.get("HF_HUB_OFFLINE") if offline() else False,
                    f"downloads are off and the tokenizer of {hub.repo_id}@{hub.revision} is not in "
                    f"the cache {cache_dir}",
                    "stage it first (python -m torchtitan_runai.stage --config FILE) or point "
                    "hub.cache_dir / HF_HUB_CACHE at the staged cache",
                )
            return _download(hub, cache_dir)
    except Timeout:
        raise UserError("hub.lock_timeout_s", hub.lock_timeout_s,
                        f"another process held the download lock in {cache_dir} too long",
                        "check for a stuck process, or remove the stale lock file under .locks/")


def _from_cache(hub: Hub, cache_dir: Path) -> Path | None:
    """The cached snapshot folder if it already holds a usable tokenizer; no network."""
    from huggingface_hub import try_to_load_from_cache

    for name in hub.files:
        found = try_to_load_from_cache(hub.repo_id, name, cache_dir=str(cache_dir),
                                       revision=hub.revision)
        if isinstance(found, str):
            folder = Path(found).parent
            for part in Path(name).parts[:-1]:
                folder = folder.parent
            if find_tokenizer_files(folder, hub.tokenizer_format):
                return folder
    return None


def _download(hub: Hub, cache_dir: Path) -> Path:
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import RemoteEntryNotFoundError

    token = hf_token()
    endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/") or None
    folder: Path | None = None
    for name in hub.files:
        url = hf_hub_url(hub.repo_id, name, revision=hub.revision, endpoint=endpoint)
        try:
            # A HEAD without the client's own retries first, so that rate limits and outages go
            # through our bounded backoff (and tests can keep it short).
            with_backoff(
                lambda: get_hf_file_metadata(url, token=token or False, endpoint=endpoint),
                retries=hub.retries, backoff_s=hub.backoff_s, max_backoff_s=hub.max_backoff_s,
                what=f"Hub download of {hub.repo_id}",
            )
            path = hf_hub_download(
                hub.repo_id, name, revision=hub.revision, cache_dir=str(cache_dir),
                token=token or False, endpoint=endpoint,
            )
        except RemoteEntryNotFoundError:
            continue  # optional file absent from this repo
        except UserError:
            raise
        except Exception as error:  # noqa: BLE001 - every Hub failure becomes one line
            raise hub_error(error, hub, token) from None
        folder = Path(path).parent
        for _ in Path(name).parts[:-1]:
            folder = folder.parent
    if folder is None or not find_tokenizer_files(folder, hub.tokenizer_format):
        raise UserError(
            "hub.repo_id", hub.repo_id,
            f"the repo has none of the tokenizer files {hub.files} at revision {hub.revision}",
            "name a repo with tokenizer.json or original/tokenizer.model, or fix hub.files",
        )
    return folder


# ---------------------------------------------------------------------------------------------
# errors and retries


def is_transient(error: BaseException) -> bool:
    """Worth retrying: rate limit, Hub/server error, dropped or refused connection, timeout."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, HfHubHTTPError):
        response = getattr(error, "response", None)
        status = getattr(response, "status_code", None)
        return status in (408, 429) or (status is not None and status >= 500)
    return isinstance(error, (httpx2.TransportError, ConnectionError, TimeoutError))


def with_backoff(fn: Callable[[], T], *, retries: int, backoff_s: float, max_backoff_s: float,
                 what: str, sleep: Callable[[float], None] = time.sleep) -> T:
    """``fn()``, retried on transient errors with exponential backoff, at most ``retries`` times."""
    wait = backoff_s
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as error:  # noqa: BLE001
            if attempt >= retries or not is_transient(error):
                raise
            logger.warning(f"{what}: {redact(type(error).__name__ + ': ' + str(error)).splitlines()[0]}"
                           f"; retry {attempt + 1}/{retries} in {wait:.1f}s")
            sleep(wait)
            wait = min(max_backoff_s, wait * 2)
    raise AssertionError("unreachable")


def hub_error(error: BaseException, hub: Hub, token: str | None) -> UserError:
    """A Hub failure as one actionable line (token redacted)."""
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    page = f"https://huggingface.co/{hub.repo_id}"
    status = getattr(getattr(error, "response", None), "status_code", None)
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    token_state = "HF_TOKEN is set" if token else "HF_TOKEN is not set"
    if isinstance(error, GatedRepoError) and status == 403:
        result = UserError(
            "hub.repo_id", hub.repo_id,
            "403 Forbidden: the licence of this gated model has not been accepted for the account "
            "of HF_TOKEN",
            f"sign in at {page}, accept the licence on the model page, wait for approval, then retry",
        )
    elif isinstance(error, RevisionNotFoundError):
        result = UserError("hub.revision", hub.revision, f"404: no such revision in {hub.repo_id}",
                           "use an existing branch, tag or commit")
    elif status == 401 or (isinstance(error, GatedRepoError) and status != 403):
        result = UserError(
            TOKEN_ENV, "***" if token else None,
            f"401 Unauthorized from the Hub for {hub.repo_id} ({token_state}; the token is missing, "
            "wrong or expired)",
            "create a read token at https://huggingface.co/settings/tokens and pass it as the "
            "HF_TOKEN environment variable (e.g. runai -e HF_TOKEN=$HF_TOKEN)",
        )
    elif isinstance(error, RepositoryNotFoundError) or status == 404:
        result = UserError("hub.repo_id", hub.repo_id,
                           f"404: repository not found ({token_state}; private repos need a token "
                           "with access)", "check the repo name on https://huggingface.co")
    elif isinstance(error, OfflineModeIsEnabled):
        result = UserError("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE"),
                           "offline mode and the tokenizer is not cached",
                           "stage it with python -m torchtitan_runai.stage, or unset HF_HUB_OFFLINE")
    elif status == 429:
        result = UserError(
            "hub.repo_id", hub.repo_id,
            f"429 rate limited by the Hub after {hub.retries + 1} attempts",
            "stage the tokenizer onto the PVC once (python -m torchtitan_runai.stage) so pods do "
            "not all call the Hub, or raise hub.retries / hub.backoff_s",
        )
    elif isinstance(error, HfHubHTTPError) and status is not None and status >= 500:
        result = UserError("hub.repo_id", hub.repo_id,
                           f"the Hub answered {status} after {hub.retries + 1} attempts",
                           "retry later, or use a staged cache with HF_HUB_OFFLINE=1")
    elif isinstance(error, (httpx2.TransportError, ConnectionError, TimeoutError)):
        result = UserError(
            "HF_ENDPOINT", endpoint,
            f"cannot reach the Hub (no network? {type(error).__name__}) after {hub.retries + 1} "
            "attempts",
            "check the pod's network/proxy, or stage the tokenizer and set HF_HUB_OFFLINE=1",
        )
    else:
        result = UserError("hub.repo_id", hub.repo_id,
                           f"download failed: {type(error).__name__}: {str(error).splitlines()[0]}",
                           "check hub.* settings and HF_TOKEN")
    if token:
        result.why, result.fix = redact(result.why, token), redact(result.fix, token)
        result.args = (result.line(),)
    return result


# ---------------------------------------------------------------------------------------------
# the tokenizer objects

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_SPECIAL = 256
# tiktoken's Rust core can overflow its stack on very long inputs (openai/tiktoken#195)
_MAX_ENCODE_CHARS = 400_000


def llama3_special_tokens() -> list[str]:
    named = [
        "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
        "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
    ]
    rest = LLAMA3_NUM_SPECIAL - len(named)
    return named + [f"<|reserved_special_token_{2 + i}|>" for i in range(rest)]


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
            "model.hf_assets_path", str(path),
            f"not a Llama 3 tiktoken file (line {number}: {type(error).__name__}); a SentencePiece "
            "tokenizer.model (Llama 2) is not supported",
            "use Llama 3's original/tokenizer.model or its tokenizer.json",
        ) from None
    if not ranks:
        raise UserError("model.hf_assets_path", str(path), "the tiktoken file is empty",
                        "download it again (delete it and rerun)")
    return ranks


@functools.cache
def _tiktoken_tokenizer_class() -> type:
    # Defined on first use: its base class lives in torchtitan (imports torch), and the launcher
    # imports this module for ensure_tokenizer alone.
    from torchtitan_runai.upstream import BaseTokenizer

    class TiktokenTokenizer(BaseTokenizer):
        """Llama 3's original ``tokenizer.model`` through tiktoken, with torchtitan's tokenizer API.

        ``encode(text, add_bos=True, add_eos=False)`` mirrors torchtitan's HuggingFaceTokenizer on Llama
        3's tokenizer.json (whose post-processor prepends ``<|begin_of_text|>``); special-token text in
        the input is encoded as the special token, as the Hugging Face tokenizer does.
        """

        def __init__(self, model_path: str | Path):
            super().__init__()
            import tiktoken

            self.model_path = str(model_path)
            ranks = read_tiktoken_ranks(Path(model_path))
            base = len(ranks)
            self.special_tokens = {t: base + i for i, t in enumerate(llama3_special_tokens())}
            self.model = tiktoken.Encoding(
                name=Path(model_path).name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                special_tokens=self.special_tokens,
            )
            self.bos_token, self.eos_token = "<|begin_of_text|>", "<|end_of_text|>"
            self.bos_id = self.special_tokens[self.bos_token]
            self.eos_id = self.special_tokens[self.eos_token]
            self.pad_id = -1

        def encode(self, *args, **kwargs) -> list[int]:
            text = args[0] if args else kwargs.get("text", "")
            add_bos = kwargs.get("add_bos", kwargs.get("bos", True))
            add_eos = kwargs.get("add_eos", kwargs.get("eos", False))
            ids: list[int] = []
            for chunk in _chunks(text):
                ids.extend(self.model.encode(chunk, allowed_special="all", disallowed_special=()))
            if add_bos:
                ids.insert(0, self.bos_id)
            if add_eos:
                ids.append(self.eos_id)
            return ids

        def decode(self, *args, **kwargs) -> str:
            ids = args[0] if args else kwargs.get("token_ids", [])
            return self.model.decode(list(ids))

        @property
        def vocab_size(self) -> int:
            return self.model.n_vocab

        def get_vocab_size(self) -> int:
            return self.model.n_vocab

    return TiktokenTokenizer


def __getattr__(name: str):
    if name == "TiktokenTokenizer":
        return _tiktoken_tokenizer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _chunks(text: str):
    """Very long text in pieces cut at whitespace (tiktoken's core can overflow on huge inputs)."""
    while len(text) > _MAX_ENCODE_CHARS:
        cut = max(text.rfind(" ", 0, _MAX_ENCODE_CHARS), text.rfind("\n", 0, _MAX_ENCODE_CHARS))
        cut = cut if cut > 0 else _MAX_ENCODE_CHARS
        yield text[:cut]
        text = text[cut:]
    yield text


def load_tokenizer(folder: Path, tokenizer_format: str = "auto"):
    """torchtitan's HuggingFaceTokenizer for tokenizer.json, else our TiktokenTokenizer."""
    from torchtitan_runai.upstream import HuggingFaceTokenizer

    found = find_tokenizer_files(Path(folder), tokenizer_format)
    if found is None:
        raise UserError("model.hf_assets_path", str(folder), "no tokenizer.json or "
                        "original/tokenizer.model in the folder", "see docs/data.md")
    if found.name == TOKENIZER_JSON:
        return HuggingFaceTokenizer(str(folder))
    return _tiktoken_tokenizer_class()(found)


def build_tokenizer(job_config: Any):
    """TrainSpec.build_tokenizer_fn: resolve (download if needed) and load the tokenizer."""
    hub = getattr(job_config, "hub", None) or Hub()
    return load_tokenizer(ensure_tokenizer(job_config), hub.tokenizer_format)
