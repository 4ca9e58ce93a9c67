"""atlas/timing.py: how the benchmarks time things."""
import time

import pytest
import torch

from atlas.timing import captured, time_modes


def test_time_modes_keeps_the_others_when_one_fails():
    def broken():
        raise RuntimeError("no graphs here\nsecond line")
    r = time_modes("x", {"eager": lambda: None, "graphs": broken}, tokens=100)
    assert r["x_mode"] == "eager" and r["x_ms"] == r["x_eager_ms"] and r["x_tok_s"] > 0
    assert r["x_graphs_error"] == "RuntimeError: no graphs here"
    assert "x_mode" not in time_modes("y", {"graphs": broken}, tokens=100)


def test_time_modes_beside_is_timed_but_never_the_headline():
    r = time_modes("x", {"slow": lambda: time.sleep(0.002), "fast": lambda: None}, tokens=100, beside=("fast",))
    assert r["x_mode"] == "slow" and r["x_fast_ms"] < r["x_ms"] == r["x_slow_ms"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_step_replays_the_same_gradients():
    w = torch.randn(64, 64, device="cuda", requires_grad=True)
    x = torch.randn(8, 64, device="cuda")
    keep = {}

    def step():
        (x @ w).tanh().square().mean().backward()
        keep["grad"], w.grad = w.grad, None
    step()
    want = keep["grad"].clone()
    replay = captured(step)
    replay()
    replay()
    torch.cuda.synchronize()
    assert torch.allclose(keep["grad"], want)
