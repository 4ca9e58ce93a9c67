"""The embedded default corpus: Shakespeare's 42 modern-spelling works, shipped in the package.

The file is atlas/data/corpus/shakespeare.jsonl.xz (see corpus/README.md for origin,
licence and how to rebuild it). Validation holds out whole works, not a slice of
every work, so validation loss measures generalisation to an unseen play rather
than to unseen lines of plays the model has memorised around.
"""
from __future__ import annotations

import functools
import hashlib
import json
import lzma
from pathlib import Path

from atlas.errors import UserError

CORPUS_FILE = Path(__file__).resolve().parent / "corpus" / "shakespeare.jsonl.xz"
# One tragedy, one comedy, one history: ~348K of 5.06M characters (~7%).
# A fixed list (not a hash rule) so the split never changes when the corpus is rebuilt.
VAL_WORKS = ("macbeth", "richard_ii", "twelfth_night")


@functools.lru_cache(maxsize=1)
def _records() -> tuple[tuple[str, str], ...]:
    try:
        raw = lzma.decompress(CORPUS_FILE.read_bytes())
    except (OSError, lzma.LZMAError) as e:
        raise UserError(f"embedded corpus {CORPUS_FILE} is missing or corrupt ({e}); "
                        f"reinstall atlas or rebuild it with atlas/data/corpus/build_corpus.py")
    recs = [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]
    return tuple((r["work"], r["text"]) for r in recs)


def load_embedded_corpus() -> list[tuple[str, str]]:
    """All 42 works as [(work_name, text)], sorted by name (e.g. ("hamlet", "HAMLET, PRINCE...")).

    Decompressing takes ~0.1 s; the result is cached per process.
    """
    return list(_records())


def embedded_split() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train_docs, val_docs): 39 training works and the 3 VAL_WORKS, each [(work, text)]."""
    docs = load_embedded_corpus()
    train = [d for d in docs if d[0] not in VAL_WORKS]
    val = [d for d in docs if d[0] in VAL_WORKS]
    assert len(val) == len(VAL_WORKS), "VAL_WORKS names a work the corpus lacks"
    return train, val


def corpus_sha256() -> str:
    """Digest of the shipped file: a prepared dataset records it to know when it is stale."""
    return hashlib.sha256(CORPUS_FILE.read_bytes()).hexdigest()
