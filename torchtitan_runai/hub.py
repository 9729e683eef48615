"""The Hugging Face Hub: the token, retries with backoff, one-line errors, the locked cache download.

Access uses ``HF_TOKEN`` from the environment, else the file ``HF_TOKEN_PATH`` names (a mounted
Secret; ``hf_token``, the one lookup: the download, the launcher's check and preflight all use it;
``token_source`` says which one it found), stripped of surrounding whitespace (a Secret made from a
file ends in a newline, an invalid header value), passed to ``huggingface_hub`` as ``token=``. A
token file that cannot be read or is empty is one line naming ``HF_TOKEN_PATH``, never an anonymous
download. The token is never a config field, never logged, and is redacted, in every spelling (as
is, stripped, ``repr``), from every message we build (``redact``, ``describe``: exception text and
chained causes); the HTTP client's DEBUG trace, which quotes request headers, is never switched on
(``quiet_http_trace``). Hub failures become one-line ``UserError``s (``hub_error``): 401 (token
missing or wrong), 403 (licence not accepted on the model page), 404 (repo, revision or file), no
network, rate limited / Hub down (retried with exponential backoff first, ``with_backoff``:
``hub.retries``, ``hub.backoff_s``). ``HF_ENDPOINT`` is honoured (read at call time), which is how
the tests point the real client at a fake Hub on 127.0.0.1.

The cache is ``hub.cache_dir``, else ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
``<job.dump_folder>/hf_cache`` (``resolve_cache_dir``). ``locked_download`` makes one process per
cache download while the others wait, then read the cache (``cached_snapshot``, no network).
``offline()`` is ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``. What is downloaded (the tokenizer
files) is the caller's business: ``torchtitan_runai.training.tokenizer`` and ``stage``.

Both majors of ``huggingface_hub`` work (1.x on httpx, 2.x on httpx2): this module uses only what
both have (``hf_hub_download``, ``get_hf_file_metadata``, ``hf_hub_url``, ``try_to_load_from_cache``,
``huggingface_hub.errors``) and recognises either client's transport errors (``transport_errors``).
`make test` runs the hub tests on the locked 2.x and again on 1.x (`make test-hub1`).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable, Mapping, TypeVar

from torchtitan_runai import storage
from torchtitan_runai.config import Hub
from torchtitan_runai.errors import UserError

TOKEN_ENV = "HF_TOKEN"
TOKEN_PATH_ENV = "HF_TOKEN_PATH"
OFFLINE_ENVS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")

T = TypeVar("T")
# Plain logging (propagates to torchtitan's root handler).
logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# secrets


def _raw_token(strict: bool = True, env: Mapping[str, str] | None = None) -> tuple[str | None, str | None]:
    """(the token as written, where it came from) or (None, None); the one lookup (``hf_token``).

    An empty ``HF_TOKEN`` counts as unset, as huggingface_hub counts it. ``strict``: a token file
    that cannot be read, or holds nothing, is a ``UserError`` (else: no token)."""
    env = os.environ if env is None else env
    raw = env.get(TOKEN_ENV)
    if raw is not None and raw.strip():
        return raw, TOKEN_ENV
    path = env.get(TOKEN_PATH_ENV)
    if not path:
        return None, None
    fix = (
        "put the token in the Secret the file is mounted from (kubectl create secret generic hf-token "
        "--from-file=HF_TOKEN=/dev/stdin, the token on stdin; runai --secret-volume mounts it), or unset "
        "HF_TOKEN_PATH to go to the Hub without a token"
    )
    try:
        raw = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as error:
        if not strict:
            return None, None
        why = getattr(error, "strerror", None) or "not text"
        raise UserError(TOKEN_PATH_ENV, path, f"cannot read the token file ({why})", fix) from None
    if not raw.strip():
        if not strict:
            return None, None
        # huggingface_hub would go to the Hub anonymously: a gated repo's 401 much later, or a
        # public file fetched with no word that the Secret is empty
        raise UserError(
            TOKEN_PATH_ENV, path, "the token file is empty, so the Hub would be called without a token", fix
        )
    return raw, f"{TOKEN_PATH_ENV} ({path})"


def hf_token(env: Mapping[str, str] | None = None) -> str | None:
    """The Hub token: HF_TOKEN, else the file HF_TOKEN_PATH names (a mounted Secret), or None.

    Surrounding whitespace is dropped: a Secret made from a file usually ends in a newline, which
    is not a valid HTTP header value. A token file that cannot be read or is empty is a ``UserError``
    naming HF_TOKEN_PATH. ``env``: the environment to read (default ``os.environ``).
    """
    return (_raw_token(env=env)[0] or "").strip() or None


def token_source(env: Mapping[str, str] | None = None) -> str | None:
    """Where ``hf_token`` finds the token, for a person to read (``"HF_TOKEN"`` or
    ``"HF_TOKEN_PATH (/the/file)"``), never the token; None when there is none. Raises as ``hf_token``."""
    return _raw_token(env=env)[1]


def _spellings(token: str) -> list[str]:
    """The ways a token can appear in a message: as is, stripped, and as the Python repr of a str or
    of bytes (where a newline is the two characters ``\\n``), longest first."""
    forms = set()
    for t in {token, token.strip()}:
        forms |= {t, repr(t)[1:-1], repr(t.encode())[2:-1]}
    return sorted((f for f in forms if len(f.strip()) >= 4), key=len, reverse=True)


def redact(text: str, token: str | None = None) -> str:
    """``text`` with the Hub token (HF_TOKEN or HF_TOKEN_PATH's, in any spelling) replaced by ``***``."""
    raw = _raw_token(strict=False)[0]
    for t in [token] if token is not None else [raw]:
        for form in _spellings(t) if t else ():
            text = text.replace(form, "***")
    return text


def describe(error: BaseException) -> str:
    """``Type: first line`` of an exception and of its causes, token redacted: what every Hub failure
    message is built from (never the bare exception: the HTTP client quotes a refused header)."""
    parts, seen = [], set()
    while error is not None and id(error) not in seen and len(parts) < 3:
        seen.add(id(error))
        first = (str(error).strip().splitlines() or [""])[0]
        part = f"{type(error).__name__}: {first}" if first else type(error).__name__
        if not parts or part != parts[-1]:  # a client that re-raises its cause as itself: said once
            parts.append(part)
        error = error.__cause__ or error.__context__
    return redact(" <- ".join(parts))


HTTP_TRACE_LOGGERS = ("httpcore2", "httpcore", "httpx2", "httpx")

HTTP_CLIENTS = ("httpx2", "httpx")
"""huggingface_hub's HTTP client: httpx2 from 2.0, httpx in 1.x. We never import one ourselves
except to recognise its errors, so either major works (pyproject depends on neither)."""


def transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's connection-level errors (refused, dropped, timed out, a header it refuses to
    send), with the standard library's: ``TransportError`` of whichever of httpx2 / httpx is
    installed (an NGC base may ship httpx beside huggingface_hub 2.x's httpx2: both count)."""
    import importlib

    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for name in HTTP_CLIENTS:
        try:
            found.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def quiet_http_trace() -> None:
    """The HTTP client's DEBUG trace quotes a refused request header, token included, in its
    exception text: it is never switched on here (its INFO line, method and URL, stays)."""
    for name in HTTP_TRACE_LOGGERS:
        log = logging.getLogger(name)
        if log.getEffectiveLevel() < logging.INFO:
            log.setLevel(logging.INFO)


# ---------------------------------------------------------------------------------------------
# where


def offline(env: Mapping[str, str] | None = None) -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) asks for no network."""
    env = os.environ if env is None else env
    return any(env.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in OFFLINE_ENVS)


def resolve_cache_dir(hub: Hub, dump_folder: str = "./outputs") -> Path:
    """The Hub download cache: hub.cache_dir, $HF_HUB_CACHE, $HF_HOME/hub, <dump_folder>/hf_cache."""
    if hub.cache_dir:
        return Path(hub.cache_dir).expanduser()
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return storage.default_hub_cache(dump_folder)


def _snapshot_folder(path: str | Path, name: str) -> Path:
    """The snapshot folder of a cached file ``name`` (which may sit in a subfolder, original/...)."""
    folder = Path(path).parent
    for _ in Path(name).parts[:-1]:
        folder = folder.parent
    return folder


def cached_snapshot(hub: Hub, cache_dir: Path, usable: Callable[[Path], bool] = lambda folder: True) -> Path | None:
    """The cached snapshot folder of ``hub.repo_id``@``hub.revision`` holding any of ``hub.files``
    that ``usable`` accepts; no network."""
    from huggingface_hub import try_to_load_from_cache

    for name in hub.files:
        found = try_to_load_from_cache(hub.repo_id, name, cache_dir=str(cache_dir), revision=hub.revision)
        if isinstance(found, str):
            folder = _snapshot_folder(found, name)
            if usable(folder):
                return folder
    return None


# ---------------------------------------------------------------------------------------------
# downloading


def _lock_name(repo_id: str) -> str:
    return "runai-tokenizer-" + repo_id.replace("/", "--") + ".lock"


def locked_download(hub: Hub, cache_dir: Path, usable: Callable[[Path], bool], what: str) -> Path:
    """The snapshot folder of ``hub.files`` in ``cache_dir``: from the cache when ``usable`` accepts
    it, else downloaded (once per cache: a file lock). ``what`` names the files in messages."""
    from filelock import FileLock, Timeout

    cache_dir = Path(cache_dir)
    try:
        (cache_dir / ".locks").mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(
            "hub.cache_dir",
            str(cache_dir),
            f"cannot create the cache folder ({error})",
            "set hub.cache_dir (or HF_HUB_CACHE) to a writable folder, e.g. on the PVC",
        )
    lock = FileLock(str(cache_dir / ".locks" / _lock_name(hub.repo_id)), timeout=hub.lock_timeout_s)
    try:
        with lock:
            cached = cached_snapshot(hub, cache_dir, usable)
            if cached is not None:
                return cached
            if offline() or not hub.allow_download:
                setting = "HF_HUB_OFFLINE" if offline() else "hub.allow_download"
                raise UserError(
                    setting,
                    os.environ.get("HF_HUB_OFFLINE") if offline() else False,
                    f"downloads are off and the {what} of {hub.repo_id}@{hub.revision} is not in the cache {cache_dir}",
                    "stage it first (python -m torchtitan_runai.stage --config FILE) or point "
                    "hub.cache_dir / HF_HUB_CACHE at the staged cache",
                )
            folder = None
            for name in hub.files:
                path = download_file(hub, name, cache_dir=cache_dir)
                if path is not None:
                    folder = _snapshot_folder(path, name)
            if folder is None or not usable(folder):
                raise UserError(
                    "hub.repo_id",
                    hub.repo_id,
                    f"the repo has none of the tokenizer files {hub.files} at revision {hub.revision}",
                    "name a repo with tokenizer.json or original/tokenizer.model, or fix hub.files",
                )
            return folder
    except Timeout:
        raise UserError(
            "hub.lock_timeout_s",
            hub.lock_timeout_s,
            f"another process held the download lock in {cache_dir} too long",
            "check for a stuck process, or remove the stale lock file under .locks/",
        )


def download_file(
    hub: Hub,
    name: str,
    *,
    cache_dir: Path | None = None,
    local_dir: Path | None = None,
    repo_type: str | None = None,
    optional: bool = True,
) -> Path | None:
    """One file of ``hub.repo_id`` through our backoff and errors; None when an optional file is
    absent from the repo. Into the cache (``cache_dir``) or a plain folder (``local_dir``)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import RemoteEntryNotFoundError

    quiet_http_trace()
    token = hf_token()
    endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/") or None
    url = hf_hub_url(hub.repo_id, name, revision=hub.revision, endpoint=endpoint, repo_type=repo_type)
    try:
        # A HEAD without the client's own retries first, so that rate limits and outages go
        # through our bounded backoff (and tests can keep it short).
        with_backoff(
            lambda: get_hf_file_metadata(url, token=token or False, endpoint=endpoint),
            retries=hub.retries,
            backoff_s=hub.backoff_s,
            max_backoff_s=hub.max_backoff_s,
            what=f"Hub download of {hub.repo_id}",
        )
        path = hf_hub_download(
            hub.repo_id,
            name,
            revision=hub.revision,
            repo_type=repo_type,
            cache_dir=str(cache_dir) if cache_dir is not None else None,
            local_dir=str(local_dir) if local_dir is not None else None,
            token=token or False,
            endpoint=endpoint,
        )
    except RemoteEntryNotFoundError as error:
        if optional:
            return None  # optional file absent from this repo
        raise hub_error(error, hub, token) from None
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - every Hub failure becomes one line
        raise hub_error(error, hub, token) from None
    return Path(path)


# ---------------------------------------------------------------------------------------------
# errors and retries


def is_transient(error: BaseException) -> bool:
    """Worth retrying: rate limit, Hub/server error, dropped or refused connection, timeout."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, HfHubHTTPError):
        response = getattr(error, "response", None)
        status = getattr(response, "status_code", None)
        return status in (408, 429) or (status is not None and status >= 500)
    return isinstance(error, transport_errors())


def cannot_connect(error: BaseException) -> bool:
    """No connection was made at all: the host's name does not resolve, no route to it, or it refuses
    (``httpx.ConnectError``, ``socket.gaierror``, ``ECONNREFUSED``, ``ENETUNREACH``, ``EHOSTUNREACH``), as
    opposed to a 429, a 5xx, a timeout or a connection dropped mid-answer."""
    import errno
    import importlib
    import socket

    refused: list[type[BaseException]] = [ConnectionRefusedError, socket.gaierror]
    for name in HTTP_CLIENTS:  # whichever client the installed huggingface_hub uses
        try:
            refused.append(importlib.import_module(name).ConnectError)
        except (ImportError, AttributeError):
            continue
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, tuple(refused)):
            return True
        if isinstance(error, OSError) and error.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return True
        error = error.__cause__ or error.__context__
    return False


def with_backoff(
    fn: Callable[[], T],
    *,
    retries: int,
    backoff_s: float,
    max_backoff_s: float,
    what: str,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``fn()``, retried on transient errors with exponential backoff, at most ``retries`` times.

    A first attempt that cannot connect at all (``cannot_connect``: no network, a name that does not
    resolve, a proxy that is needed) fails at once: waiting does not bring a network, and a command
    without one would otherwise spend a minute in backoff before its line. Once a connection has been
    made, or for a 429 / 5xx / timeout / dropped connection, the backoff applies."""
    wait = backoff_s
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as error:  # noqa: BLE001
            if attempt >= retries or not is_transient(error) or (attempt == 0 and cannot_connect(error)):
                raise
            logger.warning(f"{what}: {describe(error)}; retry {attempt + 1}/{retries} in {wait:.1f}s")
            sleep(wait)
            wait = min(max_backoff_s, wait * 2)
    raise AssertionError("unreachable")


def hub_error(error: BaseException, hub: Hub, token: str | None) -> UserError:
    """A Hub failure as one actionable line (token redacted)."""
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
            "hub.repo_id",
            hub.repo_id,
            "403 Forbidden: the licence of this gated model has not been accepted for the account of HF_TOKEN",
            f"sign in at {page}, accept the licence on the model page, wait for approval, then retry",
        )
    elif isinstance(error, RevisionNotFoundError):
        result = UserError(
            "hub.revision",
            hub.revision,
            f"404: no such revision in {hub.repo_id}",
            "use an existing branch, tag or commit",
        )
    elif status == 401 or (isinstance(error, GatedRepoError) and status != 403):
        result = UserError(
            TOKEN_ENV,
            "***" if token else None,
            f"401 Unauthorized from the Hub for {hub.repo_id} ({token_state}; the token is missing, wrong or expired)",
            "create a read token at https://huggingface.co/settings/tokens and pass it as the "
            "HF_TOKEN environment variable (e.g. runai -e HF_TOKEN=$HF_TOKEN)",
        )
    elif isinstance(error, RepositoryNotFoundError) or status == 404:
        result = UserError(
            "hub.repo_id",
            hub.repo_id,
            f"404: repository not found ({token_state}; private repos need a token with access)",
            "check the repo name on https://huggingface.co",
        )
    elif isinstance(error, OfflineModeIsEnabled):
        result = UserError(
            "HF_HUB_OFFLINE",
            os.environ.get("HF_HUB_OFFLINE"),
            "offline mode and the tokenizer is not cached",
            "stage it with python -m torchtitan_runai.stage, or unset HF_HUB_OFFLINE",
        )
    elif status == 429:
        result = UserError(
            "hub.repo_id",
            hub.repo_id,
            f"429 rate limited by the Hub after {hub.retries + 1} attempts",
            "stage the tokenizer onto the PVC once (python -m torchtitan_runai.stage) so pods do "
            "not all call the Hub, or raise hub.retries / hub.backoff_s",
        )
    elif isinstance(error, HfHubHTTPError) and status is not None and status >= 500:
        result = UserError(
            "hub.repo_id",
            hub.repo_id,
            f"the Hub answered {status} after {hub.retries + 1} attempts",
            "retry later, or use a staged cache with HF_HUB_OFFLINE=1",
        )
    elif cannot_connect(error):
        result = UserError(
            "HF_ENDPOINT",
            endpoint,
            f"cannot reach the Hub: no connection could be made ({describe(error)}; no network, or a proxy needed?)",
            "check the pod's network/proxy (HTTPS_PROXY), or stage the tokenizer where there is a network "
            "(python -m torchtitan_runai.stage) and set HF_HUB_OFFLINE=1",
        )
    elif isinstance(error, transport_errors()):
        result = UserError(
            "HF_ENDPOINT",
            endpoint,
            f"cannot reach the Hub (no network? {type(error).__name__}) after {hub.retries + 1} attempts",
            "check the pod's network/proxy, or stage the tokenizer and set HF_HUB_OFFLINE=1",
        )
    else:
        result = UserError(
            "hub.repo_id", hub.repo_id, f"download failed: {describe(error)}", "check hub.* settings and HF_TOKEN"
        )
    result.why, result.fix = redact(result.why), redact(result.fix)
    if token:
        result.why, result.fix = redact(result.why, token), redact(result.fix, token)
    result.args = (result.line(),)
    return result
