"""Deterministic, resumable, rank-disjoint batches of generated task examples.

A task turns example ids into examples (`make(ids) -> x, y, modes`, numpy (B, T) each) that
depend only on the id and the seeds, never on what was generated before. The stream then
decides which ids a step gets, exactly as atlas.data.Batches does for text: rank r of W takes
items [pos + r*B, pos + (r+1)*B) of one global stream and every rank advances pos by W*B. So
ranks never share an item, and a resumed run (load_state_dict) regenerates the same batches.

With a fixed training set of N examples (Zoology trains on 40k for many epochs) the global
stream is a fresh permutation of range(N) each epoch; without one, item i is example id i.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from atlas.data.loader import PositionStream, mix
from atlas.errors import UserError

IGNORE = -100  # label of an unscored position (torch cross_entropy's default ignore_index)


def check_batching(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"bad batching arguments batch_size={batch_size} rank={rank} world_size={world_size}; "
                        f"need batch_size >= 1 and 0 <= rank < world_size")


class TaskBatches(PositionStream):
    """next() -> (x, y), int64 (B, T) each, y = -100 where unscored; last_modes: int8 (B, T)
    GateMode values of the last batch (1 STORAGE on facts, 2 RETRIEVAL on scored queries)."""

    def __init__(self, make: Callable, batch_size: int, seed: int, rank: int, world_size: int,
                 num_examples: int | None, meta: dict):
        check_batching(batch_size, rank, world_size)
        self.make, self.B, self.seed, self.rank, self.W = make, batch_size, seed, rank, world_size
        self.num_examples, self.meta = num_examples, meta
        self.position = 0  # items of the global stream consumed by all ranks together
        self.last_ids: np.ndarray | None = None
        self.last_modes: np.ndarray | None = None

    @property
    def steps_per_epoch(self) -> int | None:
        return None if self.num_examples is None else max(1, self.num_examples // (self.B * self.W))

    @property
    def epoch(self) -> int:
        return 0 if self.num_examples is None else self.position // self.num_examples

    def _ids(self, first: int, count: int) -> np.ndarray:
        if self.num_examples is None:
            return np.arange(first, first + count, dtype=np.int64)

        def order(e):
            return np.random.default_rng(mix("atlas-task-epoch", self.seed, e)).permutation(self.num_examples)
        return self._epoch_items(first, count, self.num_examples, order)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self._ids(self.position + self.rank * self.B, self.B)
        self.position += self.B * self.W
        x, y, modes = self.make(ids)
        self.last_ids, self.last_modes = ids, modes
        return torch_pair(x, y)

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "task": dict(self.meta)}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` left off; the task must be the same (a position means nothing
        in another task's stream). batch_size and world_size may change."""
        if state.get("task") != self.meta:
            raise UserError(f"data state is for task {state.get('task')}, this run's is {self.meta}; "
                            f"resume with the same task settings")
        self.position, self.seed, self._epoch_cache = int(state["position"]), state["seed"], None


def torch_pair(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(np.asarray(x, np.int64)), torch.from_numpy(np.asarray(y, np.int64))
