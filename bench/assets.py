"""Offline benchmark inputs: a small BPE tokenizer and a generated text corpus, built on the fly.

The GPU machine has no network, and throughput does not depend on what the tokens mean: the
model's vocabulary stays Llama 3's 128,256 (the embedding and output layer keep their full size)
while the tokenizer only ever emits ids below a few thousand. The corpus is pseudo-random words
with a Zipf-like frequency, seeded, so every run sees the same token stream.
"""

from __future__ import annotations

import json
import random
from pathlib import Path


def _words(rng: random.Random, n: int) -> list[str]:
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    return ["".join(rng.choice(letters[: 8 + i % 18]) for _ in range(2 + i % 9)) for i in range(n)]


def build_corpus(folder: Path, *, documents: int = 2000, seed: int = 0) -> Path:
    """A folder of one JSON-lines file with {"text": ...} rows (what the c4_test loader reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train.jsonl"
    if path.exists():
        return folder
    rng = random.Random(seed)
    vocab = _words(rng, 5000)
    weights = [1.0 / (rank + 1) for rank in range(len(vocab))]
    with path.open("w") as f:
        for _ in range(documents):
            n = rng.randint(200, 1200)
            words = rng.choices(vocab, weights=weights, k=n)
            sentences = [" ".join(words[i : i + 12]).capitalize() + "." for i in range(0, n, 12)]
            f.write(json.dumps({"text": " ".join(sentences)}) + "\n")
    return folder


def build_tokenizer(folder: Path, corpus: Path, *, vocab_size: int = 2000) -> Path:
    """tokenizer.json + tokenizer_config.json that torchtitan's HuggingFaceTokenizer loads."""
    from torchtitan_runai.rehearsal import write_tokenizer

    if (folder / "tokenizer.json").exists():
        return folder

    def texts():
        with (corpus / "train.jsonl").open() as f:
            for i, line in enumerate(f):
                if i >= 300:
                    break
                yield json.loads(line)["text"]

    return write_tokenizer(texts(), folder, vocab_size)


def build_all(root: Path) -> tuple[Path, Path]:
    """(corpus folder, tokenizer folder) under ``root``, reused if already there."""
    corpus = build_corpus(root / "corpus")
    return corpus, build_tokenizer(root / "tokenizer", corpus)
