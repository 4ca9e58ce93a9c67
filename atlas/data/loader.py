"""Open prepared token folders, build the embedded dataset, and cut batches.

Batches are deterministic in (seed, position): the training stream is a sequence of
epochs; epoch e is a permutation of the corpus's non-overlapping windows (seq_len + 1
tokens, consecutive windows share one token), shifted by a random phase < seq_len so
that window boundaries move between epochs. Rank r of W takes items
[pos + r*B, pos + (r+1)*B) of that stream at each step and every rank advances pos by
W*B, so ranks never overlap within an epoch and a resumed run (load_state_dict) sees
exactly the batches it would have seen.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from atlas.data import embedded
from atlas.data.shards import SPLITS, load_index, locate, write_dataset
from atlas.data.sources import Doc
from atlas.data.tokenizer import Tokenizer, check_bpe_vocab, train_bpe
from atlas.errors import UserError


class TokenData:
    """A prepared folder: .train / .val are read-only 1-D np.memmap arrays (uint16/uint32)."""

    def __init__(self, directory):
        self.dir = Path(directory)
        self.index = load_index(self.dir)
        self.dtype = np.dtype(self.index["dtype"])
        self.vocab_size, self.eos_id = int(self.index["vocab_size"]), int(self.index["eos_id"])
        self._arrays = {s: self._open(s) for s in SPLITS}

    def _open(self, split: str) -> np.ndarray:
        sp = self.index["splits"][split]
        path, n = self.dir / sp["file"], int(sp["tokens"])
        if not path.is_file() or path.stat().st_size != n * self.dtype.itemsize:
            raise UserError(f"{path} is missing or has the wrong size (expected {n} tokens); "
                            f"prepare the data again")
        if n == 0:
            return np.zeros(0, self.dtype)  # np.memmap refuses empty files
        return np.memmap(path, dtype=self.dtype, mode="r", shape=(n,))

    def tokens(self, split: str) -> np.ndarray:
        if split not in self._arrays:
            raise UserError(f"unknown split {split!r} in {self.dir}; use 'train' or 'val'")
        return self._arrays[split]

    train = property(lambda self: self._arrays["train"])
    val = property(lambda self: self._arrays["val"])

    @property
    def tokenizer_path(self) -> Path:
        return (self.dir / self.index["tokenizer"]).resolve()

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.tokenizer_path)

    def locate(self, split: str, token_offset: int) -> dict:
        return locate(self.index, split, token_offset)

    def batches(self, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0,
                world_size: int = 1, split: str = "train") -> "Batches":
        return Batches(self, batch_size, seq_len, seed=seed, rank=rank, world_size=world_size, split=split)

    def val_batches(self, batch_size: int, seq_len: int, n: int, rank: int = 0, world_size: int = 1):
        return val_batches(self.val, batch_size, seq_len, n, rank, world_size, where=f"{self.dir} (val)")

    def __repr__(self) -> str:
        return f"TokenData({str(self.dir)!r}, train={len(self.train)}, val={len(self.val)}, vocab={self.vocab_size})"


def build_embedded(run_dir, vocab_size: int, tokenizer_path=None) -> TokenData:
    """Make (or reuse) the Shakespeare dataset of a run: run_dir/tokenizer.json + run_dir/data/.

    Trains byte-level BPE with `vocab_size` on the 39 training works (the 3 validation
    works never shape the vocabulary), or copies the tokenizer at tokenizer_path. A
    second call with the same arguments only checks digests (~0.1 s). A run_dir
    prepared with another vocabulary or tokenizer is a UserError, never overwritten:
    its checkpoints would no longer match the data.
    """
    run, data_dir = Path(run_dir), Path(run_dir) / "data"
    given = Tokenizer.load(tokenizer_path) if tokenizer_path is not None else None
    if given is None:
        check_bpe_vocab(vocab_size)
    run.mkdir(parents=True, exist_ok=True)
    with _Lock(run / ".data.lock"):  # several ranks may call this at once: one builds, the rest reuse
        return _build_embedded(run, data_dir, vocab_size, given)


def _build_embedded(run: Path, data_dir: Path, vocab_size: int, given) -> TokenData:
    want = {"corpus": "shakespeare", "corpus_sha256": embedded.corpus_sha256(),
            "vocab_size_requested": None if given else int(vocab_size),
            "tokenizer_sha256": given.sha256() if given else None}
    if (data_dir / "index.json").is_file():
        meta = load_index(data_dir).get("meta", {})
        have = {k: meta.get(k) for k in want}
        if given is None:  # the tokenizer this call would train is whatever is already there
            have["tokenizer_sha256"] = None
        if have != want:
            diff = ", ".join(f"{k}: {have[k]} -> {want[k]}" for k in want if have[k] != want[k])
            raise UserError(f"{data_dir} was prepared differently ({diff}); "
                            f"use a new run directory or delete {data_dir}")
        data = TokenData(data_dir)
        if data.tokenizer().sha256() != data.index["tokenizer_sha256"]:
            raise UserError(f"{data.tokenizer_path} changed since {data_dir} was prepared; "
                            f"restore it or delete {data_dir} to rebuild")
        return data
    train_docs, val_docs = embedded.embedded_split()
    tok = given if given is not None else train_bpe((t for _, t in train_docs), int(vocab_size))
    name = tok.save(run).name
    docs = [Doc(text, f"atlas:shakespeare/{work}", "embedded", 1, tracked=True, split=split)
            for split, part in (("train", train_docs), ("val", val_docs)) for work, text in part]
    meta = dict(want, tokenizer_sha256=tok.sha256(), vocab_size=tok.vocab_size,
                val_works=list(embedded.VAL_WORKS))
    write_dataset(data_dir, tok, docs, meta=meta, tokenizer_file=f"../{name}", overwrite=True)
    return TokenData(data_dir)


class _Lock:
    """Exclusive flock on a file (POSIX); a no-op where fcntl is missing."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.f = open(self.path, "a")
        try:
            import fcntl
            fcntl.flock(self.f, fcntl.LOCK_EX)
        except ImportError:
            pass
        return self

    def __exit__(self, *exc):
        self.f.close()  # closing releases the lock


def mix(*parts) -> int:
    """A 63-bit seed from ints and strings, stable across processes (Python's hash() is salted)."""
    return int.from_bytes(hashlib.blake2b(json.dumps(parts).encode(), digest_size=8).digest(), "little") >> 1


class PositionStream:
    """An endless batch stream whose whole state is `position`: the items of the global stream
    all ranks have consumed. Subclasses set B (batch size) and W (world size) and define next()."""
    B: int
    W: int
    position: int

    def __next__(self):
        return self.next()

    def __iter__(self):
        return self

    def seek(self, step: int) -> None:
        """Jump to training step `step` (as if next() had been called `step` times)."""
        self.position = int(step) * self.B * self.W

    _epoch_cache: tuple[int, np.ndarray] | None = None  # (epoch, its visiting order)

    def _epoch_items(self, first: int, count: int, n: int, order) -> np.ndarray:
        """Items first .. first+count-1 of a stream that visits epoch e of n items as order(e), an
        int64 (n,) array; the current epoch's order is cached. A batch may straddle two epochs."""
        idx = np.arange(first, first + count, dtype=np.int64)
        out = np.empty(count, np.int64)
        for e in np.unique(idx // n):
            if self._epoch_cache is None or self._epoch_cache[0] != e:
                self._epoch_cache = (int(e), order(int(e)))
            sel = idx // n == e
            out[sel] = self._epoch_cache[1][idx[sel] % n]
        return out


def _need(n_tokens: int, seq_len: int, where: str) -> None:
    if n_tokens < seq_len + 1:
        raise UserError(f"corpus {where} has {n_tokens} tokens, fewer than one sequence "
                        f"(seq_len + 1 = {seq_len + 1}); add text or lower seq_len")


class Batches(PositionStream):
    """Infinite deterministic training batches: next() -> (x, y), int64 tensors of shape (B, T).

    data: a TokenData (provenance available) or any 1-D integer array.
    """

    def __init__(self, data, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, split: str = "train"):
        if isinstance(data, TokenData):
            self.data, self.tokens, where = data, data.tokens(split), f"{data.dir} ({split})"
        else:
            self.data, self.tokens, where = None, np.asarray(data), "(array)"
        if self.tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {self.tokens.shape}")
        if batch_size < 1 or seq_len < 1 or not 0 <= rank < world_size:
            raise UserError(f"bad batching arguments batch_size={batch_size} seq_len={seq_len} "
                            f"rank={rank} world_size={world_size}; need >=1, >=1 and 0<=rank<world_size")
        _need(len(self.tokens), seq_len, where)
        self.B, self.T, self.seed, self.rank, self.W, self.split = batch_size, seq_len, seed, rank, world_size, split
        self.n_windows = (len(self.tokens) - 1) // seq_len
        self.slack = (len(self.tokens) - 1) - self.n_windows * seq_len  # room for the epoch phase
        self.position = 0  # items of the global stream consumed by all ranks together
        self.last_starts: np.ndarray | None = None

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.n_windows // (self.B * self.W))

    @property
    def epoch(self) -> int:
        return self.position // self.n_windows

    def _starts(self, epoch: int) -> np.ndarray:
        """Window start offsets of `epoch` in visiting order, int64 (n_windows,)."""
        rng = np.random.default_rng(mix("atlas-batches", self.seed, epoch))
        phase = int(rng.integers(0, self.slack + 1))
        return phase + rng.permutation(self.n_windows).astype(np.int64) * self.T

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self._epoch_items(self.position + self.rank * self.B, self.B, self.n_windows, self._starts)
        self.position += self.B * self.W
        self.last_starts = starts
        win = np.asarray(self.tokens[starts[:, None] + np.arange(self.T + 1)], dtype=np.int64)  # (B, T+1)
        t = torch.from_numpy(win)
        return t[:, :-1], t[:, 1:]

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "seq_len": self.T,
                "n_tokens": len(self.tokens), "split": self.split}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` left off. The same corpus and seq_len are required: a
        position means nothing on other windows. batch_size and world_size may change."""
        if state.get("n_tokens") != len(self.tokens) or state.get("seq_len") != self.T:
            raise UserError(f"data state is for {state.get('n_tokens')} tokens / seq_len {state.get('seq_len')}, "
                            f"this run has {len(self.tokens)} / {self.T}; resume with the same data and seq_len")
        self.position, self.seed = int(state["position"]), state["seed"]
        self._epoch_cache = None

    def provenance(self) -> list[dict]:
        """For each sequence of the last batch: {"start", "end"} token offsets (+ source, line)."""
        if self.last_starts is None:
            return []
        out = []
        for s in self.last_starts.tolist():
            rec = {"split": self.split, "start": s, "end": s + self.T + 1}
            if self.data is not None:
                rec.update(self.data.locate(self.split, s))
            out.append(rec)
        return out


def val_batches(tokens, batch_size: int, seq_len: int, n: int, rank: int = 0, world_size: int = 1,
                where: str = "(val)") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Up to n batches (x, y) of non-overlapping windows spread evenly over `tokens`.

    Always the same windows for the same arguments; ranks get disjoint windows and the
    same number of batches (the last may be smaller than batch_size).
    """
    _need(len(tokens), seq_len, where)
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows < world_size:
        raise UserError(f"corpus {where} has {n_windows} windows of {seq_len + 1} tokens for "
                        f"{world_size} ranks; add validation text or lower seq_len")
    total = min(n * batch_size * world_size, n_windows // world_size * world_size)
    picks = (np.arange(total, dtype=np.int64) * n_windows) // total  # evenly spread, increasing
    mine = picks[rank::world_size] * seq_len
    ar = np.arange(seq_len + 1)
    for i in range(0, len(mine), batch_size):
        win = torch.from_numpy(np.asarray(tokens[mine[i:i + batch_size, None] + ar], dtype=np.int64))
        yield win[:, :-1], win[:, 1:]
