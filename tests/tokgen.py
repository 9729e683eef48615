"""Build a tiny Llama-3-style tokenizer in both of Llama 3's published formats, for tests.

One byte-level BPE is trained (``tokenizers``) with Llama 3's pre-tokenizer regex, then written as
- ``tokenizer.json`` + ``tokenizer_config.json`` (the Hugging Face format, with Llama 3.1's
  ``<|begin_of_text|>`` post-processor and bos/eos settings), and
- ``original/tokenizer.model`` (Meta's tiktoken format: ``base64(bytes) rank`` per line),
from the same vocabulary and merge order, plus Llama 3's 256 special tokens after the base
vocabulary. Both files therefore describe the same tokenizer, as Meta's two files do.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from torchtitan_runai.training.tokenizer import llama3_special_tokens

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2024 and we're training Llama 3.1 models!",
    "Distributed training on Kubernetes: 16 pods, 8 GPUs each, 128 ranks in total.",
    "Data parallel ranks read their own share of the dataset; the tokenizer must match exactly.",
    "Naïve café résumé — unicode text, emoji 🦙 and numbers 1234567 should round-trip.\n\n",
    "    indented code: def f(x):\n        return x * 2  # comment\n",
    "Tokenizers, tokenizer, tokenization; the the the and and and of of of in in in.",
]

TEST_TEXT = (
    "Hello world! It's 2025: the fox's 12345 llamas aren't lazy.\n\n  Naïve café 🦙 tokens\t"
    "tabs,   spaces and <|end_of_text|> inside text."
)


def _byte_decoder() -> dict[str, int]:
    # GPT-2's byte <-> printable-unicode map used by ByteLevel, inverted.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def write_tokenizer(folder: Path, vocab_size: int = 600, formats: tuple[str, ...] = ("hf", "tiktoken")) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        min_frequency=1,
    )
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    base = tok.get_vocab_size()
    specials = llama3_special_tokens()
    tok.add_special_tokens(specials)
    bos = base
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    if "hf" in formats:
        tok.save(str(folder / "tokenizer.json"))
        config = {
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|end_of_text|>",
            "added_tokens_decoder": {
                str(base + i): {
                    "content": t,
                    "special": True,
                    "normalized": False,
                    "lstrip": False,
                    "rstrip": False,
                    "single_word": False,
                }
                for i, t in enumerate(specials)
            },
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    if "tiktoken" in formats:
        decode = _byte_decoder()
        vocab = json.loads(tok.to_str())["model"]["vocab"]
        lines = []
        for token, rank in sorted(vocab.items(), key=lambda kv: kv[1]):
            raw = bytes(decode[ch] for ch in token)
            lines.append(f"{base64.b64encode(raw).decode()} {rank}")
        (folder / "original").mkdir(exist_ok=True)
        (folder / "original" / "tokenizer.model").write_text("\n".join(lines) + "\n")
    return folder
