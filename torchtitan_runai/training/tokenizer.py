"""The tokenizer objects the ranks build: torchtitan's ``HuggingFaceTokenizer`` or Meta's tiktoken file.

``build_tokenizer`` (the train spec's ``build_tokenizer_fn``) resolves the files
(``inputs.tokenizer_files.ensure_tokenizer``: which files make a tokenizer, the Hub download) and
loads them: torchtitan's ``HuggingFaceTokenizer`` for ``tokenizer.json``; ``TiktokenTokenizer`` for
Meta's original file, which gives the same ids as Llama 3's ``tokenizer.json`` (same regex, same
ranks, the 256 special tokens after the base vocabulary, ``<|begin_of_text|>`` added by default as
the Hugging Face post-processor does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torchtitan_runai.config import Hub
from torchtitan_runai.inputs.tokenizer_files import (
    TOKENIZER_JSON,
    ensure_tokenizer,
    read_tiktoken_ranks,
    require_tokenizer_file,
)
from torchtitan_runai.upstream import BaseTokenizer, HuggingFaceTokenizer

# ---------------------------------------------------------------------------------------------
# resolution


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
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|step_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
    ]
    rest = LLAMA3_NUM_SPECIAL - len(named)
    return named + [f"<|reserved_special_token_{2 + i}|>" for i in range(rest)]


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
            name=Path(model_path).name,
            pat_str=LLAMA3_PATTERN,
            mergeable_ranks=ranks,
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
    found = require_tokenizer_file(folder, tokenizer_format)
    if found.name == TOKENIZER_JSON:
        return HuggingFaceTokenizer(str(folder))
    return TiktokenTokenizer(found)


def build_tokenizer(job_config: Any):
    """TrainSpec.build_tokenizer_fn: resolve (download if needed) and load the tokenizer."""
    hub_section = getattr(job_config, "hub", None) or Hub()
    return load_tokenizer(ensure_tokenizer(job_config), hub_section.tokenizer_format)
