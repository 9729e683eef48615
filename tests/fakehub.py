"""A small fake Hugging Face Hub on 127.0.0.1 for tests that use the real ``huggingface_hub`` client.

It answers what ``hf_hub_download`` (HEAD + GET on ``/{repo}/resolve/{rev}/{file}``, also under
``/datasets/``) and ``snapshot_download`` (``/api/models/{repo}[/revision/{rev}]`` and
``/api/models/{repo}/tree/{rev}``) ask for, with the headers the client requires
(``X-Repo-Commit``, ``ETag``, ``Content-Length``) and the error codes the real Hub uses
(``X-Error-Code: RepoNotFound / GatedRepo / EntryNotFound / RevisionNotFound``).

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
_API = re.compile(r"^/api/(models|datasets)/(.+?)(?:/(revision|tree)/([^/]+)(?:/.*)?)?$")


class FakeHub:
    def __init__(self, token: str | None = None):
        self.token = token
        self.ungated_tokens: set[str] = set()
        self.repos: dict[tuple[str, str], dict[str, bytes]] = {}
        self.requests: list[tuple[str, str, bool]] = []
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
    def _send(self, status: int, data: bytes = b"", headers: dict | None = None, body: bool = True):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body and data:
            self.wfile.write(data)

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
            kinds, repo_id, sub, revision = match.groups()
            return self._api(kinds[:-1], repo_id, sub, revision or "main", body)
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
        }
        self._send(200, data, headers, body)

    def _api(self, repo_type, repo_id, sub, revision, body) -> None:
        files = self._repo(repo_type, repo_id, revision, body)
        if files is None:
            return
        if sub == "tree":
            listing = [
                {"type": "file", "path": p, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                for p, d in sorted(files.items())
            ]
            data = json.dumps(listing).encode()
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
