"""The Hub token (issue 16): a Secret's trailing newline, a token file, and redaction at the source.

Real ``huggingface_hub`` against tests/fakehub.py on 127.0.0.1; the canary token must never appear
in any log line, warning, error or exception text.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ helpers

from fakehub import FakeHub  # noqa: E402
from tokgen import write_tokenizer  # noqa: E402

from torchtitan_runai import hub  # noqa: E402
from torchtitan_runai.config import Hub  # noqa: E402
from torchtitan_runai.errors import UserError  # noqa: E402
from torchtitan_runai.inputs.tokenizer_files import ensure_tokenizer  # noqa: E402

REPO = "meta-llama/Llama-3.1-8B"
CANARY = "hf_CANARYnewline0123456789abcdefTOKEN"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return write_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def env(monkeypatch):
    for name in (
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_HUB_CACHE",
        "HF_HOME",
        "HF_ENDPOINT",
        "HF_TOKEN",
        "HF_TOKEN_PATH",
    ):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def fake(env, tok_dir):
    with FakeHub(token=CANARY) as server:
        server.add_folder(REPO, tok_dir)
        env.setenv("HF_ENDPOINT", server.url)
        yield server


def job(tmp_path: Path, **hub_fields) -> SimpleNamespace:
    hub_fields.setdefault("backoff_s", 0.01)
    return SimpleNamespace(
        model=SimpleNamespace(hf_assets_path=str(tmp_path / "none")),
        job=SimpleNamespace(dump_folder=str(tmp_path / "out")),
        hub=Hub(repo_id=REPO, **hub_fields),
    )


def assert_no_canary(*texts: str) -> None:
    for text in texts:
        for piece in (CANARY, CANARY[:16], CANARY[16:]):
            assert piece not in text, text


@pytest.mark.parametrize("suffix", ["\n", "\r\n", "  \n", "\t"])
def test_token_with_trailing_whitespace_is_stripped_and_downloads(fake, env, tmp_path, caplog, capsys, suffix):
    # a Secret made with --from-file ends in "\n"; main sent it in the header and printed
    # "LocalProtocolError: Illegal header value b'Bearer hf_...\n'" (the whole token) on every retry
    env.setenv("HF_TOKEN", CANARY + suffix)
    caplog.set_level(logging.DEBUG)
    folder = ensure_tokenizer(job(tmp_path, retries=2))
    assert (folder / "tokenizer.json").is_file()
    assert all(ok for _, path, ok in fake.requests if "/resolve/" in path), fake.requests
    out = capsys.readouterr()
    assert_no_canary(caplog.text, out.out, out.err)


def test_token_file_named_by_hf_token_path_is_read_and_stripped(fake, env, tmp_path):
    # the Run:ai v2 form mounts the Secret as a file (runai --secret-volume) and names it
    token_file = tmp_path / "secret" / "HF_TOKEN"
    token_file.parent.mkdir()
    token_file.write_text(CANARY + "\n")
    env.setenv("HF_TOKEN_PATH", str(token_file))
    assert hub.hf_token() == CANARY
    assert (ensure_tokenizer(job(tmp_path)) / "tokenizer.json").is_file()
    env.setenv("HF_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(UserError, match="HF_TOKEN_PATH"):
        hub.hf_token()


@pytest.mark.parametrize("content", ["", "\n", "  \n\n"])
def test_an_empty_token_file_is_one_line_not_an_anonymous_download(fake, env, tmp_path, content):
    # issue 24: main went to the Hub without a token (a gated repo's 401 later, or silently anonymous)
    token_file = tmp_path / "HF_TOKEN"
    token_file.write_text(content)
    env.setenv("HF_TOKEN_PATH", str(token_file))
    with pytest.raises(UserError) as err:
        hub.hf_token()
    assert err.value.setting == "HF_TOKEN_PATH" and "empty" in err.value.why
    assert "unset HF_TOKEN_PATH" in err.value.fix and "Secret" in err.value.fix
    with pytest.raises(UserError, match="HF_TOKEN_PATH"):
        ensure_tokenizer(job(tmp_path))
    assert not [r for r in fake.requests if "/resolve/" in r[1]]  # nothing was asked of the Hub
    assert hub.redact("no token here") == "no token here"  # redaction never raises


def test_the_token_lookup_says_where_it_found_the_token(env, tmp_path):
    token_file = tmp_path / "HF_TOKEN"
    token_file.write_text(CANARY + "\n")
    assert hub.token_source({}) is None and hub.hf_token({}) is None
    assert hub.token_source({"HF_TOKEN": CANARY}) == "HF_TOKEN"
    from_file = {"HF_TOKEN_PATH": str(token_file)}
    assert hub.token_source(from_file) == f"HF_TOKEN_PATH ({token_file})" and hub.hf_token(from_file) == CANARY
    # HF_TOKEN wins; an empty HF_TOKEN counts as unset (as huggingface_hub counts it)
    assert hub.hf_token({**from_file, "HF_TOKEN": "hf_other"}) == "hf_other"
    assert hub.token_source({**from_file, "HF_TOKEN": ""}).startswith("HF_TOKEN_PATH")
    assert hub.token_source({"HF_TOKEN": "hf_set", "HF_TOKEN_PATH": str(tmp_path / "empty-or-missing")}) == "HF_TOKEN"


def test_a_token_the_client_rejects_never_reaches_a_message(fake, env, tmp_path, caplog, capsys):
    # whitespace inside the token survives the strip: the HTTP client refuses the header and quotes
    # it (repr, so the newline is the two characters \n) in every retry warning and in the error
    bad = CANARY[:16] + "\n" + CANARY[16:]
    env.setenv("HF_TOKEN", bad)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(UserError) as err:
        ensure_tokenizer(job(tmp_path, retries=2))
    out = capsys.readouterr()
    assert "retry 1/2" in caplog.text  # the warnings were printed, redacted
    assert_no_canary(caplog.text, out.out, out.err, err.value.line(), str(err.value), repr(err.value.args))
    assert err.value.__cause__ is None and err.value.__suppress_context__


@pytest.mark.parametrize(
    "spelling",
    [
        lambda t: t,
        lambda t: repr(t),
        lambda t: repr(t.encode()),
        lambda t: f"Bearer {t}",
        lambda t: repr(f"Bearer {t}".encode()),
    ],
)
def test_redact_covers_every_spelling_of_the_token(env, spelling):
    raw = CANARY + "\n"
    env.setenv("HF_TOKEN", raw)
    text = f"header value {spelling(raw)} refused"
    assert_no_canary(hub.redact(text))
    assert "***" in hub.redact(text)


def test_describe_redacts_chained_causes(env):
    env.setenv("HF_TOKEN", CANARY)
    try:
        try:
            raise ValueError(f"Illegal header value b'Bearer {CANARY}'")
        except ValueError as inner:
            raise RuntimeError("request failed") from inner
    except RuntimeError as outer:
        text = hub.describe(outer)
    assert "RuntimeError: request failed" in text and "ValueError" in text
    assert_no_canary(text)


# ---- both majors of huggingface_hub (1.x on httpx, 2.x on httpx2; `make test-hub1` runs this file on 1.x)


def test_these_tests_run_on_the_huggingface_hub_asked_for():
    """`make test-hub1` sets TTR_EXPECT_HUB: the overlay on PYTHONPATH must be the one imported."""
    import huggingface_hub

    want = __import__("os").environ.get("TTR_EXPECT_HUB")
    assert huggingface_hub.__version__.split(".")[0] in ("1", "2")
    if want:
        assert huggingface_hub.__version__ == want, huggingface_hub.__file__


def test_a_refused_connection_is_transient_and_one_line_on_either_http_client(tmp_path):
    """huggingface_hub 2.x raises httpx2's transport errors, 1.x httpx's: both are retried and both
    become the 'cannot reach the Hub' line (an NGC base may also ship httpx beside 2.x's httpx2)."""
    import importlib

    clients = []
    for name in hub.HTTP_CLIENTS:
        try:
            clients.append(importlib.import_module(name))
        except ImportError:
            continue
    assert clients  # the installed huggingface_hub brings one
    for client in clients:
        error = client.ConnectError("[Errno 111] Connection refused")
        assert hub.is_transient(error), client.__name__
        line = hub.hub_error(error, Hub(repo_id=REPO, retries=1), None).line()
        assert "HF_ENDPOINT" in line and "cannot reach the Hub" in line, line
