"""Make the offline assets of the CPU rehearsal: a small text corpus and a tiny BPE tokenizer.

The rehearsal (``make train``) must run with no network, so it cannot fetch the gated Llama 3.1
tokenizer or C4. This module writes, deterministically:

- ``data/corpus.jsonl``: documents of simple, repetitive English-like text (``{"text": ...}`` per line),
  structured enough that the debug model's loss visibly falls within a few dozen steps;
- ``tokenizer/tokenizer.json`` and ``tokenizer/tokenizer_config.json``: a byte-level BPE tokenizer
  in the Hugging Face format with Llama 3's special tokens, small enough for the debug model's
  2048-entry vocabulary.

Run ``python -m torchtitan_runai.rehearsal [OUT_DIR]`` (default ``assets/rehearsal``). The outputs
are committed; the command exists so they can be rebuilt and reviewed.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
VOCAB_SIZE = 2000  # below the debug model's 2048 embeddings
N_DOCS = 1200
SEED = 1234

_SUBJECTS = "the cat|a dog|the old sailor|my neighbour|the small robot|a tired student|the baker|our teacher".split("|")
_VERBS = "sees|builds|carries|paints|finds|loses|cooks|writes about|remembers|follows".split("|")
_OBJECTS = (
    "a red boat|the green door|an empty box|the long road|a warm loaf|the quiet river|a paper map|the tall tree".split(
        "|"
    )
)
_PLACES = (
    "in the morning|near the harbour|after the rain|at the market|under the bridge|before dinner|on the hill".split("|")
)


def make_corpus(n_docs: int = N_DOCS, seed: int = SEED) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = [
            f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_PLACES)}."
            for _ in range(rng.randint(3, 8))
        ]
        docs.append(" ".join(s[0].upper() + s[1:] for s in sentences))
    return docs


def train_tokenizer(docs, vocab_size: int = VOCAB_SIZE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(docs, trainer=trainer)
    return tokenizer


def write_tokenizer(texts, tok_dir: Path, vocab_size: int = VOCAB_SIZE) -> Path:
    """Train on ``texts`` and write tokenizer.json + tokenizer_config.json (what torchtitan loads)."""
    tok_dir.mkdir(parents=True, exist_ok=True)
    train_tokenizer(texts, vocab_size).save(str(tok_dir / "tokenizer.json"))
    config = {
        "bos_token": BOS,
        "eos_token": EOS,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return tok_dir


def write_assets(out_dir: Path) -> None:
    docs = make_corpus()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    with open(out_dir / "data" / "corpus.jsonl", "w") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    write_tokenizer(docs, out_dir / "tokenizer")


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "assets/rehearsal")
    write_assets(target)
    print(f"wrote rehearsal assets to {target}")
