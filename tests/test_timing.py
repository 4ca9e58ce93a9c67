"""atlas/timing.py: how the benchmarks time things."""
import time

import pytest
import torch

from atlas import timing
from atlas.timing import captured, time_modes, timed


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


def test_unknown_timing_method_is_refused():
    with pytest.raises(ValueError, match="steady, synced"):
        timing.set_method("fast")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="times a GPU kernel")
def test_steady_timing_hides_host_work_behind_the_call_before():
    a = torch.randn(8192, 8192, device="cuda")  # float32: ~20 ms of matmul on an H100

    def call():  # 10 ms of host work, then the kernel
        time.sleep(0.01)
        a @ a
    try:
        timing.set_method("synced")
        synced = timed(call, warmup=1, reps=5)
        timing.set_method("steady")
        steady = timed(call, warmup=1, reps=5)
    finally:
        timing.set_method("steady")
    # synced: sleep + kernel; steady: the sleep runs while the call before's kernel does
    assert steady < synced - 5, (steady, synced)
