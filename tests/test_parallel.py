"""torchrun data parallelism (gloo on CPU): 2 ranks x batch 2 train like 1 process x batch 4; a rank
without a GPU of its own is one clear line."""
import json
import subprocess
import sys

import pytest
import torch

from atlas.cli import main
from atlas.config import load_config
from atlas.errors import UserError
from atlas.train.loop import pick_device
from test_train import SMALL

# on CPUs (gloo) wherever it runs: a one-GPU machine has no GPU for the second rank
RUN = SMALL + ["train.max_steps=3", "train.log_every=1", "train.seed=3", "train.checkpoint_every=3", "train.device=cpu"]


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics" / "train_steps.jsonl").read_text().splitlines()]


def test_two_ranks_match_one_process_with_the_global_batch(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", "tiny", "--run-dir", str(one), *RUN, "train.batch_size=4"]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "atlas", "train", "tiny", "--run-dir", str(two), *RUN, "train.batch_size=2",
           f"data.tokenizer={one / 'tokenizer.json'}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 3
    assert all(abs(x - y) < 1e-5 * abs(x) for x, y in zip(a, b)), (a, b)  # same batches; sums in another order
    assert (two / "checkpoints" / "checkpoint_3" / "COMPLETE").is_file()


def test_more_ranks_than_gpus_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(UserError, match=r"no GPU of its own \(1 here\).*--nproc_per_node 1.*train.device=cpu"):
        pick_device(load_config("tiny"))
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert pick_device(load_config("tiny")) == torch.device("cuda", 0)
