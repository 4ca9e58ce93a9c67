"""MQAR, multi-query associative recall, as Zoology defines it (Arora et al. 2023).

One example of length T with kv_pairs = κ (the `multiquery_ar` generator of HazyResearch/zoology):

    positions 0 .. 2κ-1   k_1 v_1 k_2 v_2 ... k_κ v_κ     keys: κ distinct ids from [1, V/2)
                                                          values: κ distinct ids from [V/2, V)
    positions 2κ .. T-1   every key once more, as a query, at 2κ + 2·gap_i; the κ gaps are drawn
                          without replacement from [0, (T-2κ)/2) with weight (gap+1)^(a-1), a = 0.01
                          (a power law: most queries come soon after the pairs, a few far away)
    every other position  a uniformly random id from [0, V)   (Zoology's random_non_queries)

Only the κ query positions are scored: their label is the value paired with the queried key;
every other label is -100. As in Zoology the value is *not* written into the input after a
query (the next input token is random filler): the model must produce it from memory. Zoology
requires T even, V > T and 4κ <= T; so do we.

Examples are generated in blocks of BLOCK from a seed mixed from (task seed, stream, block), so
any example can be rebuilt from its id alone: resuming and sharding over ranks need nothing else.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from collections import OrderedDict

import numpy as np
import torch

from atlas.errors import UserError
from atlas.data.loader import mix
from atlas.tasks.stream import IGNORE, TaskBatches, torch_pair

BLOCK = 256  # examples generated together (vectorised numpy); ids -> (block, row)
POWER_A = 0.01  # Zoology's default train_power_a / test_power_a
STORAGE, RETRIEVAL = 1, 2  # atlas.model.block.GateMode values (not imported: keep tasks model-free)


def _ordered_sample(rng: np.random.Generator, n: int, m: int, k: int) -> np.ndarray:
    """n rows of k distinct ints from [0, m) in random order, int64 (n, k): like Zoology's
    np.random.choice(m, k, replace=False) per row, vectorised (the k smallest of m uniforms)."""
    r = rng.random((n, m))  # (n, m)
    idx = np.argpartition(r, k - 1, axis=1)[:, :k] if k < m else np.broadcast_to(np.arange(m), (n, m))
    order = np.argsort(np.take_along_axis(r, idx, axis=1), axis=1)  # argpartition's order is not random
    return np.take_along_axis(idx, order, axis=1).astype(np.int64)


def generate(rng: np.random.Generator, n: int, seq_len: int, kv_pairs: int, vocab_size: int,
             power_a: float = POWER_A) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n MQAR examples -> x int64 (n, T), query positions int64 (n, κ), their values int64 (n, κ)."""
    T, kv, V = seq_len, kv_pairs, vocab_size
    half = V // 2
    keys = 1 + _ordered_sample(rng, n, half - 1, kv)  # (n, κ); 0 is Zoology's filler placeholder, never a key
    values = half + _ordered_sample(rng, n, V - half, kv)  # (n, κ)
    space = (T - 2 * kv) // 2
    # Gumbel top-k of log-weights = successive draws without replacement, as np.random.choice(p=...)
    # does; the draw order matters because Zoology gives the i-th drawn gap to the i-th key.
    logw = (power_a - 1) * np.log(np.arange(1, space + 1))  # (space,)
    gaps = np.argsort(-(logw + rng.gumbel(size=(n, space))), axis=1)[:, :kv]  # (n, κ)
    x = rng.integers(0, V, size=(n, T), dtype=np.int64)  # (n, T) random filler
    x[:, 0:2 * kv:2], x[:, 1:2 * kv:2] = keys, values
    qpos = 2 * kv + 2 * gaps  # (n, κ)
    np.put_along_axis(x, qpos, keys, axis=1)
    return x, qpos, values


class MQAR:
    """MQAR(seq_len, kv_pairs, vocab_size=8192, num_examples=None, seed=0).

    num_examples: a fixed training set (Zoology trains on e.g. 40k for several epochs), or None
    for fresh examples forever. The validation set comes from a held-out stream of the same seed.
    """

    def __init__(self, seq_len: int, kv_pairs: int, vocab_size: int = 8192, num_examples: int | None = None,
                 seed: int = 0):
        where = f"MQAR(seq_len={seq_len}, kv_pairs={kv_pairs}, vocab_size={vocab_size})"
        if seq_len < 4 or seq_len % 2:
            raise UserError(f"{where}: seq_len must be even and >= 4 (Zoology's layout pairs positions)")
        if kv_pairs < 1 or 4 * kv_pairs > seq_len:
            raise UserError(f"{where}: kv_pairs must lie in [1, seq_len/4] (κ pairs + κ queries need room); "
                            f"lower kv_pairs or raise seq_len")
        if vocab_size <= seq_len or vocab_size // 2 - 1 < kv_pairs:
            raise UserError(f"{where}: vocab_size must exceed seq_len (Zoology's rule) and hold kv_pairs keys; "
                            f"raise vocab_size")
        if num_examples is not None and num_examples < 1:
            raise UserError(f"{where}: num_examples is {num_examples}; use >= 1 or None (fresh examples)")
        self.T, self.kv, self.V, self.num_examples, self.seed = seq_len, kv_pairs, vocab_size, num_examples, seed
        self._cache: OrderedDict = OrderedDict()  # (stream, block) -> arrays, a few recent blocks
        self._fixed: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @property
    def meta(self) -> dict:
        return {"task": "mqar", "seq_len": self.T, "kv_pairs": self.kv, "vocab_size": self.V,
                "num_examples": self.num_examples, "task_seed": self.seed}

    def _block(self, stream, b: int):
        key = (stream, b)
        if key not in self._cache:
            rng = np.random.default_rng(mix("atlas-mqar", self.seed, stream, self.T, self.kv, self.V, b))
            self._cache[key] = generate(rng, BLOCK, self.T, self.kv, self.V)
            while len(self._cache) > 8:
                self._cache.popitem(last=False)
        return self._cache[key]

    def _gather(self, stream, ids: np.ndarray):
        """Examples `ids` of `stream` -> x, qpos, values (numpy, len(ids) rows)."""
        parts = [self._block(stream, int(b)) for b in ids // BLOCK]
        rows = ids % BLOCK
        return tuple(np.stack([p[i][r] for p, r in zip(parts, rows)]) for i in range(3))

    def _fixed_set(self):
        """The whole training set, built once (40k x 256 tokens: ~2 s, ~21 MB as int16)."""
        if self._fixed is None:
            n = self.num_examples
            blocks = [self._block("train", b) for b in range(math.ceil(n / BLOCK))]
            small = np.int16 if self.V <= np.iinfo(np.int16).max + 1 else np.int32
            x = np.concatenate([blk[0] for blk in blocks])[:n].astype(small)
            self._fixed = (x, *(np.concatenate([blk[i] for blk in blocks])[:n] for i in (1, 2)))
            self._cache.clear()
        return self._fixed

    def _finish(self, x, qpos, values):
        """x, query positions, values -> x, y, modes (numpy (B, T))."""
        B = x.shape[0]
        y = np.full((B, self.T), IGNORE, np.int64)  # (B, T)
        np.put_along_axis(y, qpos, values, axis=1)
        modes = np.zeros((B, self.T), np.int8)  # (B, T)
        modes[:, :2 * self.kv] = STORAGE
        np.put_along_axis(modes, qpos, RETRIEVAL, axis=1)
        return x.astype(np.int64), y, modes

    def batches(self, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> TaskBatches:
        """Training batches: next() -> (x, y) int64 (B, T); .last_modes int8 (B, T)."""
        if self.num_examples is None:  # fresh examples: the batch seed picks the stream
            def make(ids):
                return self._finish(*self._gather(("stream", seed), ids))
        else:  # the fixed set, reshuffled each epoch by the batch seed
            def make(ids):
                return self._finish(*(a[ids] for a in self._fixed_set()))
        return TaskBatches(make, batch_size, seed, rank, world_size, self.num_examples, self.meta)

    def val_batches(self, batch_size: int, n: int):
        """n batches (x, y) from the held-out "val" stream: always the same examples."""
        for i in range(n):
            ids = np.arange(i * batch_size, (i + 1) * batch_size, dtype=np.int64)
            x, y, _ = self._finish(*self._gather("val", ids))
            yield torch_pair(x, y)

    def __repr__(self) -> str:
        return (f"MQAR(seq_len={self.T}, kv_pairs={self.kv}, vocab_size={self.V}, "
                f"num_examples={self.num_examples}, seed={self.seed})")


def model_device(model) -> torch.device:
    p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return p.device if p is not None else torch.device("cpu")


@contextmanager
def eval_mode(model):
    """model.eval() inside, and back to the mode it came in (any callable without .eval() passes)."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        yield model
    finally:
        if was_training:
            model.train()


def scored_hits(logits: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    """(argmax == label, labels scored) over positions whose label is not IGNORE."""
    mask = y != IGNORE
    return int((logits.argmax(-1)[mask] == y[mask]).sum()), int(mask.sum())


@torch.no_grad()
def scored_accuracy(model, batches, device=None) -> tuple[int, int]:
    """(correct, scored) over (x, y) batches: argmax logit == label where label != -100."""
    device = device or model_device(model)
    correct = scored = 0
    for x, y in batches:
        logits, _ = model(x.to(device))  # (B, T, V)
        if logits.shape[-1] <= int(y.max()):
            raise UserError(f"the model has {logits.shape[-1]} output ids but the task uses ids up to "
                            f"{int(y.max())}; evaluate with vocab_size <= the model's")
        c, n = scored_hits(logits, y.to(device))
        correct, scored = correct + c, scored + n
    return correct, scored


def mqar_accuracy(model, task: MQAR, n_examples: int = 1000, batch_size: int = 64, device=None) -> float:
    """Fraction of scored positions of n_examples held-out examples where argmax logit == label.
    `model(idx)` returns (logits (B, T, V), state); the model is left in the mode it came in."""
    if n_examples < 1 or batch_size < 1:
        raise UserError(f"mqar_accuracy: n_examples={n_examples} batch_size={batch_size}; both must be >= 1")
    with eval_mode(model):
        n_batches = math.ceil(n_examples / batch_size)
        last = n_examples - (n_batches - 1) * batch_size

        def trimmed():
            for i, (x, y) in enumerate(task.val_batches(batch_size, n_batches)):
                yield (x[:last], y[:last]) if i == n_batches - 1 else (x, y)
        correct, scored = scored_accuracy(model, trimmed(), device)
    return correct / max(scored, 1)
