"""Where a run writes what it sees: training.log, metrics/*.jsonl, TensorBoard (if installed).

Only rank 0 writes; other ranks get a Logbook whose methods do nothing.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path


class Logbook:
    def __init__(self, run_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self.run_dir = run_dir
        self.tb = None
        if not enabled:
            return
        (run_dir / "metrics").mkdir(parents=True, exist_ok=True)
        self._log = open(run_dir / "training.log", "a", buffering=1)
        self._files = {}
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional dependency
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            self.tb = None

    def line(self, msg: str, echo: bool = True) -> None:
        """A human line: into training.log, and to stdout when asked."""
        if not self.enabled:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._log.write(f"{stamp} {msg}\n")
        if echo:
            print(msg, flush=True)

    def record(self, stream: str, row: dict) -> None:
        """One JSON line into metrics/<stream>.jsonl (train_steps, val_metrics, events)."""
        if not self.enabled:
            return
        f = self._files.get(stream)
        if f is None:
            f = self._files[stream] = open(self.run_dir / "metrics" / f"{stream}.jsonl", "a", buffering=1)
        f.write(json.dumps(row, allow_nan=True) + "\n")
        if self.tb is not None and "step" in row:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self.tb.add_scalar(f"{stream}/{k}", v, row["step"])
                elif isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
                    for i, x in enumerate(v):
                        self.tb.add_scalar(f"{stream}/{k}/layer_{i}", x, row["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        for f in self._files.values():
            f.close()
        self._log.close()
        if self.tb is not None:
            self.tb.close()


def progress(total: int, initial: int, enabled: bool):
    """A tqdm bar on a terminal; None otherwise (plain log lines are printed instead)."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
