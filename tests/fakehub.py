"""A small fake Hugging Face Hub on 127.0.0.1 for tests that use the real ``huggingface_hub`` client.

It answers what ``hf_hub_download`` (HEAD + GET on ``/{repo}/resolve/{rev}/{file}``, also under
``/datasets/``) and ``snapshot_download`` (``/api/models/{repo}[/revision/{rev}]`` and
``/api/models/{repo}/tree/{rev}``) ask for, with the headers the client requires
(``X-Repo-Commit``, ``ETag``, ``Content-Length``) and the error codes the real Hub uses
(``X-Error-Code: RepoNotFound / GatedRepo / EntryNotFound / RevisionNotFound``). It also serves
what ``datasets`` streaming asks through ``huggingface_hub``'s ``HfFileSystem`` (``hf://`` paths):
the tree of a folder (``/api/datasets/{repo}/tree/{rev}/{folder}``, ``?recursive=true``, with its
directories) and byte ranges of a file (``Range: bytes=a-b``, 206). ``served`` counts the bytes of
each file's content written to clients: what a job pulled from the Hub.

Authorization: when ``token`` is set, a request must carry ``Authorization: Bearer <token>``:
none or another token gets 401 (the Hub's answer for a gated repo to an anonymous caller).
``ungated_tokens``: tokens whose user has not accepted the licence get 403 ``GatedRepo``.
``fail(status, times)`` makes the next ``times`` requests answer ``status`` (429 carries
``Retry-After: 0``). Every request is recorded in ``requests`` as (method, path, authorized).

    with FakeHub(token="hf_x") as hub:
        hub.add_file("meta-llama/Llama-3.1-8B", "tokenizer.json", data)
        os.environ["HF_ENDPOINT"] = hub.url
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"

_RESOLVE = re.compile(r"^/(?:(datasets|spaces)/)?(.+?)/resolve/([^/]+)/(.+)$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
_API = re.compile(r"^/api/(models|datasets)/(.+?)(?:/(revision|tree|paths-info)/([^/]+)(?:/(.*))?)?$")


class FakeHub:
    def __init__(self, token: str | None = None):
        self.token = token
        self.ungated_tokens: set[str] = set()
        self.repos: dict[tuple[str, str], dict[str, bytes]] = {}
        self.requests: list[tuple[str, str, bool]] = []
        self.served: dict[str, int] = {}
        """Bytes of each repo file's content written to a client (a file's path in its repo)."""
        self._failures: list[int] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # ---- setup -------------------------------------------------------------------------------
    def add_file(self, repo_id: str, path: str, data: bytes, repo_type: str = "model") -> None:
        self.repos.setdefault((repo_type, repo_id), {})[path] = data

    def add_folder(self, repo_id: str, folder, repo_type: str = "model") -> None:
        from pathlib import Path

        root = Path(folder)
        for f in sorted(root.rglob("*")):
            if f.is_file():
                self.add_file(repo_id, f.relative_to(root).as_posix(), f.read_bytes(), repo_type)

    def fail(self, status: int, times: int = 1) -> None:
        with self._lock:
            self._failures.extend([status] * times)

    def gets(self, suffix: str = "") -> int:
        """How many GET requests for a path ending in ``suffix`` were answered."""
        return sum(1 for m, p, _ in self.requests if m == "GET" and p.endswith(suffix))

    # ---- lifecycle ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    # ---- helpers -----------------------------------------------------------------------------
    def _send(
        self, status: int, data: bytes = b"", headers: dict | None = None, body: bool = True, count: str = ""
    ) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body and data:
            sent = 0
            try:
                for at in range(0, len(data), 64 * 1024):  # a client that stops reading stops the count
                    self.wfile.write(data[at : at + 64 * 1024])
                    sent += len(data[at : at + 64 * 1024])
            finally:
                if count:
                    with self.fake._lock:
                        self.fake.served[count] = self.fake.served.get(count, 0) + sent

    def _error(self, status: int, code: str | None, message: str, body: bool) -> None:
        headers = {"X-Error-Message": message, "X-Repo-Commit": COMMIT}
        if code:
            headers["X-Error-Code"] = code
        if status == 429:
            headers["Retry-After"] = "0"
        self._send(status, json.dumps({"error": message}).encode(), headers, body)

    def _serve(self, body: bool) -> None:
        fake = self.fake
        path = unquote(urlsplit(self.path).path)
        auth = self.headers.get("Authorization", "")
        given = auth[len("Bearer ") :] if auth.startswith("Bearer ") else None
        authorized = fake.token is None or given == fake.token or given in fake.ungated_tokens
        with fake._lock:
            fake.requests.append((self.command, path, authorized))
            forced = fake._failures.pop(0) if fake._failures else None
        if forced is not None:
            return self._error(forced, None, f"forced {forced}", body)
        if not authorized:
            if given is not None:
                return self._error(401, None, "Invalid credentials in Authorization header", body)
            return self._error(
                401, "GatedRepo", "Access to this model is restricted. You must be authenticated to access it.", body
            )
        if given in fake.ungated_tokens:
            return self._error(
                403,
                "GatedRepo",
                "Access to this model is restricted and you are "
                "not in the authorized list. Visit the model page to ask for access.",
                body,
            )

        match = _RESOLVE.match(path)
        if match:
            kind, repo_id, revision, filename = match.groups()
            repo_type = {"datasets": "dataset", "spaces": "space"}.get(kind or "", "model")
            return self._resolve(repo_type, repo_id, revision, filename, body)
        match = _API.match(path)
        if match:
            kinds, repo_id, sub, revision, inner = match.groups()
            return self._api(kinds[:-1], repo_id, sub, revision or "main", body, inner or "")
        self._error(404, None, "Not found", body)

    def _repo(self, repo_type: str, repo_id: str, revision: str, body: bool):
        files = self.fake.repos.get((repo_type, repo_id))
        if files is None:
            self._error(404, "RepoNotFound", "Repository not found", body)
            return None
        if revision not in ("main", COMMIT):
            self._error(404, "RevisionNotFound", "Invalid rev id", body)
            return None
        return files

    def _resolve(self, repo_type, repo_id, revision, filename, body) -> None:
        files = self._repo(repo_type, repo_id, revision, body)
        if files is None:
            return
        if filename not in files:
            return self._error(404, "EntryNotFound", f"{filename} does not exist", body)
        data = files[filename]
        headers = {
            "X-Repo-Commit": COMMIT,
            "ETag": '"' + hashlib.sha1(data).hexdigest() + '"',
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
        }
        status, part = 200, data
        wanted = _RANGE.match(self.headers.get("Range", ""))
        if wanted:
            first = int(wanted.group(1))
            last = min(int(wanted.group(2)) if wanted.group(2) else len(data) - 1, len(data) - 1)
            status, part = 206, data[first : last + 1]
            headers["Content-Range"] = f"bytes {first}-{first + len(part) - 1}/{len(data)}"
        self._send(status, part, headers, body, count=filename)

    def _api(self, repo_type, repo_id, sub, revision, body, inner: str = "") -> None:
        files = self._repo(repo_type, repo_id, revision, body)
        if files is None:
            return
        if sub == "tree":
            recursive = "recursive=true" in urlsplit(self.path).query.lower()
            data = json.dumps(_tree(files, inner.strip("/"), recursive)).encode()
        else:
            data = json.dumps(
                {
                    "id": repo_id,
                    "sha": COMMIT,
                    "private": False,
                    "siblings": [{"rfilename": p} for p in sorted(files)],
                }
            ).encode()
        self._send(200, data, {"Content-Type": "application/json"}, body)


def _entry(path: str, data: bytes | None) -> dict:
    if data is None:
        return {"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest()}
    return {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}


def _tree(files: dict[str, bytes], folder: str, recursive: bool) -> list[dict]:
    """The Hub's tree listing of ``folder`` (files and directories; below it too when ``recursive``)."""
    prefix = f"{folder}/" if folder else ""
    out: dict[str, bytes | None] = {}
    for path, data in files.items():
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix) :].split("/")
        for depth in range(1, len(parts)):  # the directories on the way
            if recursive or depth == 1:
                out.setdefault(prefix + "/".join(parts[:depth]), None)
        if recursive or len(parts) == 1:
            out[path] = data
    return [_entry(p, d) for p, d in sorted(out.items())]
