"""The data a training run reads: its tokenizer, training batches and validation batches.

data.task = text: language modelling on data.path (made by `atlas data prepare`) or on the
embedded Shakespeare; mqar / passkey: the built-in retrieval tasks (atlas/tasks), whose batches
also mark each token's GateMode for episodic training.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..config import Config
from ..data import TokenData, Tokenizer, build_embedded
from ..errors import UserError


@dataclass
class RunData:
    train: object  # .next() -> (x, y); .state_dict(); .load_state_dict(); tasks also .last_modes
    val_batches: Callable  # n -> iterator of (x, y)
    tokenizer: Tokenizer | None  # None for MQAR (synthetic ids)
    tokenizer_file: Path | None
    description: str
    task: str = "text"

    def describe(self) -> str:
        return self.description


def _text_source(cfg: Config, run_dir: Path) -> TokenData:
    if cfg.data.path is None:
        return build_embedded(run_dir, cfg.model.vocab_size, cfg.data.tokenizer)
    path = Path(cfg.data.path)
    if not (path / "index.json").is_file():
        raise UserError(f"data.path {path} is not a prepared dataset (no index.json); "
                        "make one with `atlas data prepare FILES --out DIR`")
    return TokenData(path)


def _check_vocab(n: int, cfg: Config, what: str) -> None:
    if n > cfg.model.vocab_size:
        raise UserError(f"{what} has {n} entries but model.vocab_size is {cfg.model.vocab_size}; "
                        "raise model.vocab_size")


def load_data(cfg: Config, run_dir: Path, rank: int = 0, world: int = 1) -> RunData:
    t, task = cfg.train, cfg.data.task
    if task == "mqar":
        from ..tasks.mqar import MQAR
        mq = MQAR(t.seq_len, cfg.data.mqar_kv_pairs, num_examples=cfg.data.mqar_examples, seed=t.seed)
        _check_vocab(mq.V, cfg, "the MQAR vocabulary")
        return RunData(mq.batches(t.batch_size, seed=t.seed, rank=rank, world_size=world),
                       lambda n: mq.val_batches(t.batch_size, n), None, None,
                       f"MQAR: T={t.seq_len}, {cfg.data.mqar_kv_pairs} key-value pairs, vocab {mq.V}, "
                       f"{cfg.data.mqar_examples or 'unlimited'} training examples", task)
    source = _text_source(cfg, run_dir)
    tok = source.tokenizer()
    _check_vocab(tok.vocab_size, cfg, f"tokenizer {source.tokenizer_path}")
    if task == "passkey":
        from ..tasks.passkey import Passkey
        pk = Passkey(tok, t.seq_len, digits=cfg.data.passkey_digits, seed=t.seed)
        return RunData(pk.batches(t.batch_size, seed=t.seed, rank=rank, world_size=world),
                       lambda n: pk.val_batches(t.batch_size, n), tok, source.tokenizer_path,
                       f"passkey in Shakespeare haystacks: T={t.seq_len}, {cfg.data.passkey_digits} digits", task)
    return RunData(source.batches(t.batch_size, t.seq_len, seed=t.seed, rank=rank, world_size=world),
                   lambda n: source.val_batches(t.batch_size, t.seq_len, n, rank, world), tok,
                   source.tokenizer_path,
                   f"{source.dir}: {len(source.train):,} training and {len(source.val):,} validation tokens, "
                   f"tokenizer {source.tokenizer_path.name} ({tok.vocab_size} entries)", task)
