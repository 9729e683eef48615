"""training.tokenizer: the tokenizer objects the ranks build (tiktoken and tokenizer.json), and the format choice.

Where the files come from (a folder, the Hub) is tests/unit/inputs/test_tokenizer_files.py.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from tokgen import TEST_TEXT, write_tokenizer

from torchtitan_runai.config import Hub
from torchtitan_runai.errors import UserError
from torchtitan_runai.training import tokenizer as tokenizer_mod
from torchtitan_runai.training.tokenizer import TiktokenTokenizer

TOKEN = "hf_CANARYcanary0123456789abcdefTOKEN"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return write_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def env(monkeypatch, tmp_path):
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HF_HOME", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return monkeypatch


def job(tmp_path: Path, assets_path: str | None = None, **hub_fields) -> SimpleNamespace:
    hub_fields.setdefault("backoff_s", 0.01)
    return SimpleNamespace(
        model=SimpleNamespace(hf_assets_path=assets_path or str(tmp_path / "missing-tokenizer")),
        job=SimpleNamespace(dump_folder=str(tmp_path / "out")),
        hub=Hub(**hub_fields),
    )


# ---- tokenizers ----------------------------------------------------------------------------------


def test_tiktoken_and_tokenizer_json_give_the_same_ids(tok_dir, tmp_path):
    from torchtitan_runai.upstream import HuggingFaceTokenizer

    hf = HuggingFaceTokenizer(str(tok_dir))
    tt = TiktokenTokenizer(tok_dir / "original" / "tokenizer.model")
    assert tt.encode(TEST_TEXT) == hf.encode(TEST_TEXT)
    ids = tt.encode(TEST_TEXT, add_bos=True, add_eos=True)
    assert ids == hf.encode(TEST_TEXT, add_bos=True, add_eos=True)
    assert len(set(ids)) > 20 and ids[0] == hf.bos_id and ids[-1] == hf.eos_id
    assert (tt.bos_id, tt.eos_id, tt.get_vocab_size()) == (hf.bos_id, hf.eos_id, hf.get_vocab_size())
    assert tt.decode(tt.encode(TEST_TEXT, add_bos=False)) == TEST_TEXT


def test_build_tokenizer_picks_the_format(env, tok_dir, tmp_path):
    only_tiktoken = tmp_path / "tt"
    (only_tiktoken / "original").mkdir(parents=True)
    (only_tiktoken / "original" / "tokenizer.model").write_bytes(
        (tok_dir / "original" / "tokenizer.model").read_bytes()
    )
    assert isinstance(tokenizer_mod.build_tokenizer(job(tmp_path, str(only_tiktoken))), TiktokenTokenizer)
    assert type(tokenizer_mod.build_tokenizer(job(tmp_path, str(tok_dir)))).__name__ == "HuggingFaceTokenizer"
    forced = tokenizer_mod.build_tokenizer(job(tmp_path, str(tok_dir), tokenizer_format="tiktoken"))
    assert isinstance(forced, TiktokenTokenizer)


def test_sentencepiece_file_is_rejected(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\n\x0e\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02")
    with pytest.raises(UserError, match="not a Llama 3 tiktoken file"):
        TiktokenTokenizer(tmp_path / "tokenizer.model")


def test_very_long_text_is_chunked_consistently(tok_dir):
    tt = TiktokenTokenizer(tok_dir / "original" / "tokenizer.model")
    text = "word " * 100_001
    assert tt.decode(tt.encode(text, add_bos=False)) == text
