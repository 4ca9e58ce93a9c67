"""The data a training run reads: its tokenizer, training batches and validation batches."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..data import Batches, TokenData, Tokenizer, build_embedded
from ..errors import UserError


@dataclass
class RunData:
    source: TokenData
    tokenizer: Tokenizer
    train: Batches
    batch_size: int
    seq_len: int
    rank: int
    world: int
    task: str = "text"

    @property
    def tokenizer_file(self) -> Path:
        return self.source.tokenizer_path

    def val_batches(self, n: int):
        return self.source.val_batches(self.batch_size, self.seq_len, n, self.rank, self.world)

    def describe(self) -> str:
        return (f"{self.source.dir}: {len(self.source.train):,} training and {len(self.source.val):,} "
                f"validation tokens, tokenizer {self.tokenizer_file.name} ({self.tokenizer.vocab_size} entries)")


def load_data(cfg: Config, run_dir: Path, rank: int = 0, world: int = 1) -> RunData:
    """cfg.data.path (made by `atlas data prepare`), or the embedded Shakespeare tokenized
    into the run directory with a BPE of cfg.model.vocab_size (or cfg.data.tokenizer)."""
    t = cfg.train
    if cfg.data.path is not None:
        path = Path(cfg.data.path)
        if not (path / "index.json").is_file():
            raise UserError(f"data.path {path} is not a prepared dataset (no index.json); "
                            "make one with `atlas data prepare FILES --out DIR`")
        source = TokenData(path)
    else:
        source = build_embedded(run_dir, cfg.model.vocab_size, cfg.data.tokenizer)
    tok = source.tokenizer()
    if tok.vocab_size > cfg.model.vocab_size:
        raise UserError(f"tokenizer {source.tokenizer_path} has {tok.vocab_size} entries but "
                        f"model.vocab_size is {cfg.model.vocab_size}; raise model.vocab_size")
    batches = source.batches(t.batch_size, t.seq_len, seed=t.seed, rank=rank, world_size=world)
    return RunData(source, tok, batches, t.batch_size, t.seq_len, rank, world)
