"""inputs.tokenizer_files: tokenizer resolution and download, against a fake Hub on 127.0.0.1 (real client)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import pytest
from fakehub import FakeHub
from tokgen import write_tokenizer

from torchtitan_runai import hub as hub_mod
from torchtitan_runai.config import Hub
from torchtitan_runai.errors import UserError
from torchtitan_runai.inputs import tokenizer_files
from torchtitan_runai.training import tokenizer as tokenizer_mod

REPO = "meta-llama/Llama-3.1-8B"
TOKEN = "hf_CANARYcanary0123456789abcdefTOKEN"
ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return write_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def env(monkeypatch, tmp_path):
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HF_HOME", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return monkeypatch


@pytest.fixture
def hub(env, tok_dir):
    with FakeHub(token=TOKEN) as fake:
        fake.add_folder(REPO, tok_dir)
        fake.add_file(REPO, "model-00001-of-00004.safetensors", b"weights" * 1000)
        env.setenv("HF_ENDPOINT", fake.url)
        yield fake


def job(tmp_path: Path, assets_path: str | None = None, **hub_fields) -> SimpleNamespace:
    hub_fields.setdefault("backoff_s", 0.01)
    return SimpleNamespace(
        model=SimpleNamespace(hf_assets_path=assets_path or str(tmp_path / "missing-tokenizer")),
        job=SimpleNamespace(dump_folder=str(tmp_path / "out")),
        hub=Hub(**hub_fields),
    )


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- resolution without the Hub ------------------------------------------------------------------


def test_local_folder_is_used_without_network(env, tmp_path, tok_dir):
    env.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    cfg = job(tmp_path, str(tok_dir), repo_id=REPO)
    assert tokenizer_files.ensure_tokenizer(cfg) == tok_dir
    assert not (tmp_path / "out").exists()


def test_missing_folder_without_repo_names_the_setting(env, tmp_path):
    cfg = job(tmp_path, str(tmp_path / "nope"))
    with pytest.raises(UserError) as err:
        tokenizer_files.ensure_tokenizer(cfg)
    assert err.value.setting == "model.hf_assets_path"
    assert str(tmp_path / "nope") in err.value.line()


def test_folder_without_tokenizer_files_is_an_error(env, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no tokenizer.json"):
        tokenizer_files.ensure_tokenizer(job(tmp_path, str(tmp_path / "empty")))


def test_cache_dir_precedence(env, tmp_path):
    assert hub_mod.resolve_cache_dir(Hub(), "/pvc/run") == Path("/pvc/run/hf_cache")
    env.setenv("HF_HOME", "/h")
    assert hub_mod.resolve_cache_dir(Hub(), "/pvc/run") == Path("/h/hub")
    env.setenv("HF_HUB_CACHE", "/c")
    assert hub_mod.resolve_cache_dir(Hub(), "/pvc/run") == Path("/c")
    assert hub_mod.resolve_cache_dir(Hub(cache_dir="/pvc/hf"), "/pvc/run") == Path("/pvc/hf")


def test_hub_section_has_no_secret_field():
    assert not [f.name for f in fields(Hub) if "token" in f.name and f.name != "tokenizer_format"]


# ---- download ------------------------------------------------------------------------------------


def test_download_fetches_tokenizer_files_only_with_bearer_token(hub, tmp_path):
    folder = tokenizer_files.ensure_tokenizer(job(tmp_path, repo_id=REPO))
    assert (folder / "tokenizer.json").is_file()
    assert (folder / "original" / "tokenizer.model").is_file()
    assert str(folder).startswith(str(tmp_path / "out" / "hf_cache"))
    # every request for the repo carries the token (huggingface_hub 2.x's own first-call probe of
    # /api/agent-harnesses is not ours and goes without it)
    repo_requests = [authorized for _, path, authorized in hub.requests if REPO in path]
    assert repo_requests and all(repo_requests)
    assert hub.gets("safetensors") == 0
    assert hub.gets("tokenizer.json") == 1
    tok = tokenizer_mod.build_tokenizer(job(tmp_path, repo_id=REPO))
    assert tok.decode(tok.encode("hello world", add_bos=False, add_eos=False)) == "hello world"


def test_cached_tokenizer_needs_no_network(hub, tmp_path):
    first = tokenizer_files.ensure_tokenizer(job(tmp_path, repo_id=REPO))
    hub.stop()
    assert tokenizer_files.ensure_tokenizer(job(tmp_path, repo_id=REPO)) == first


def test_offline_mode_uses_cache_or_fails_clearly(hub, env, tmp_path):
    env.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        tokenizer_files.ensure_tokenizer(job(tmp_path, repo_id=REPO))
    assert err.value.setting == "HF_HUB_OFFLINE" and "not in the cache" in err.value.why
    assert hub.requests == []
    env.delenv("HF_HUB_OFFLINE")
    folder = tokenizer_files.ensure_tokenizer(job(tmp_path, repo_id=REPO))
    env.setenv("HF_HUB_OFFLINE", "1")
    hub.requests.clear()
    assert tokenizer_files.ensure_tokenizer(job(tmp_path, repo_id=REPO)) == folder
    assert hub.requests == []


def test_allow_download_false_is_cache_only(hub, tmp_path):
    with pytest.raises(UserError, match="hub.allow_download"):
        tokenizer_files.ensure_tokenizer(job(tmp_path, repo_id=REPO, allow_download=False))


def test_missing_token_is_401(hub, env, tmp_path):
    env.delenv("HF_TOKEN")
    with pytest.raises(UserError) as err:
        tokenizer_files.ensure_tokenizer(job(tmp_path, repo_id=REPO))
    assert err.value.setting == "HF_TOKEN" and "401" in err.value.why
    assert "not set" in err.value.why


def test_wrong_token_is_401_and_redacted(hub, env, tmp_path):
    env.setenv("HF_TOKEN", "hf_wrongWRONGwrong")
    with pytest.raises(UserError) as err:
        tokenizer_files.ensure_tokenizer(job(tmp_path, repo_id=REPO))
    assert "401" in err.value.why and "hf_wrongWRONGwrong" not in err.value.line()


def test_licence_not_accepted_is_403(hub, env, tmp_path):
    hub.ungated_tokens.add("hf_noLicence")
    env.setenv("HF_TOKEN", "hf_noLicence")
    with pytest.raises(UserError) as err:
        tokenizer_files.ensure_tokenizer(job(tmp_path, repo_id=REPO))
    assert "403" in err.value.why and "licence" in err.value.why
    assert f"https://huggingface.co/{REPO}" in err.value.fix


def test_unknown_repo_and_revision_are_404(hub, tmp_path):
    with pytest.raises(UserError) as err:
        tokenizer_files.ensure_tokenizer(job(tmp_path, repo_id="meta-llama/Nope"))
    assert err.value.setting == "hub.repo_id" and "404" in err.value.why
    with pytest.raises(UserError) as err:
        tokenizer_files.ensure_tokenizer(job(tmp_path, repo_id=REPO, revision="v9"))
    assert err.value.setting == "hub.revision"


def test_repo_without_tokenizer_files(hub, tmp_path):
    hub.add_file("org/weights-only", "config.json", b"{}")
    with pytest.raises(UserError, match="none of the tokenizer files"):
        tokenizer_files.ensure_tokenizer(job(tmp_path, repo_id="org/weights-only"))


def test_no_network_fails_clearly(env, tmp_path):
    env.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(UserError) as err:
        tokenizer_files.ensure_tokenizer(job(tmp_path, repo_id=REPO, retries=1))
    assert err.value.setting == "HF_ENDPOINT" and "cannot reach" in err.value.why


def test_rate_limit_is_retried_with_backoff(hub, tmp_path):
    hub.fail(429, times=3)
    folder = tokenizer_files.ensure_tokenizer(job(tmp_path, repo_id=REPO, retries=4))
    assert (folder / "tokenizer.json").is_file()
    assert sum(1 for m, p, _ in hub.requests if m == "HEAD" and p.endswith("/tokenizer.json")) == 5


def test_persistent_rate_limit_fails_clearly(hub, tmp_path):
    hub.fail(429, times=100)
    with pytest.raises(UserError) as err:
        tokenizer_files.ensure_tokenizer(job(tmp_path, repo_id=REPO, retries=2))
    assert "429" in err.value.why and "3 attempts" in err.value.why
    assert "stage" in err.value.fix


def test_hub_outage_fails_clearly(hub, tmp_path):
    hub.fail(503, times=100)
    with pytest.raises(UserError, match="503"):
        tokenizer_files.ensure_tokenizer(job(tmp_path, repo_id=REPO, retries=1))


def test_backoff_doubles_and_is_capped():
    waits: list[float] = []
    calls = iter([ConnectionError("x")] * 4 + [None])

    def flaky():
        error = next(calls)
        if error:
            raise error
        return "ok"

    assert hub_mod.with_backoff(flaky, retries=5, backoff_s=1, max_backoff_s=3, what="t", sleep=waits.append) == "ok"
    assert waits == [1, 2, 3, 3]


def test_one_download_per_cache_across_processes(hub, tmp_path):
    script = textwrap.dedent(f"""
        import sys; from types import SimpleNamespace as N
        from torchtitan_runai.config import Hub
        from torchtitan_runai.inputs.tokenizer_files import ensure_tokenizer
        cfg = N(model=N(hf_assets_path=""), job=N(dump_folder=sys.argv[1]),
                hub=Hub(repo_id={REPO!r}, backoff_s=0.01))
        print(ensure_tokenizer(cfg))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path / "out")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert len({out.strip() for out, _ in outs}) == 1
    assert hub.gets("/tokenizer.json") == 1 and hub.gets("/tokenizer.model") == 1


def test_token_never_leaks_to_output_or_files(hub, tmp_path):
    """Canary: run every Hub path in a subprocess with debug logging; grep all output and files."""
    hub.ungated_tokens.add(TOKEN + "x")
    script = textwrap.dedent(f"""
        import logging, os, sys; from types import SimpleNamespace as N
        logging.basicConfig(level=logging.DEBUG)
        from torchtitan_runai.config import Hub
        from torchtitan_runai.inputs.tokenizer_files import ensure_tokenizer
        from torchtitan_runai.errors import UserError
        def run(repo, **kw):
            cfg = N(model=N(hf_assets_path=""), job=N(dump_folder=sys.argv[1]),
                    hub=Hub(repo_id=repo, backoff_s=0.01, retries=1, **kw))
            try:
                print(ensure_tokenizer(cfg))
            except UserError as e:
                print(e.line()); print(repr(e)); print(e.args)
        run({REPO!r})
        run("meta-llama/Nope")
        os.environ["HF_TOKEN"] = {TOKEN + "x"!r}; run("org/x"); run({REPO!r}, cache_dir=sys.argv[1] + "/c2")
        os.environ["HF_TOKEN"] = {TOKEN!r} + "-wrong"; run({REPO!r}, cache_dir=sys.argv[1] + "/c3")
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_VERBOSITY": "debug"}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "401" in proc.stdout and "403" in proc.stdout and "404" in proc.stdout
    output = proc.stdout + proc.stderr
    assert TOKEN not in output
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert written
    assert not [p for p in written if TOKEN.encode() in p.read_bytes()]


def test_a_first_attempt_that_cannot_connect_is_not_retried():
    waits: list[float] = []

    def refused():
        raise ConnectionRefusedError(111, "Connection refused")

    with pytest.raises(ConnectionRefusedError):
        hub_mod.with_backoff(refused, retries=5, backoff_s=1, max_backoff_s=3, what="t", sleep=waits.append)
    assert waits == []  # no network: at once
    calls = iter([ConnectionError("reset"), ConnectionRefusedError(111, "refused"), None])

    def flaky():  # connected once (reset mid-answer): then a refusal is a server restarting, retried
        error = next(calls)
        if error:
            raise error
        return "ok"

    assert hub_mod.with_backoff(flaky, retries=5, backoff_s=1, max_backoff_s=3, what="t", sleep=waits.append) == "ok"
    assert waits == [1, 2]
