"""How `atlas bench` and the scripts in benchmarks/ time things: medians of CUDA events after
warm-up (perf_counter on a CPU), Python's cyclic garbage collector off while they run, a forward +
backward step, the same step captured whole in one CUDA graph, and the fastest of several modes.

Two ways to run the timed calls (`set_method`):
  * "steady" (the default): back to back, as a training loop runs its steps -- no host
    synchronisation between them, so the host prepares call i+1 while the GPU still runs call i,
    and each call's events measure the GPU from the end of the call before to the end of this
    one: device time where the host keeps up, host time where it does not (Triton's do_bench
    times the same way);
  * "synced": the host waits for each call to finish before starting the next, so each call
    also carries the host's work before its first kernel, which in a training loop overlaps the
    step before (how `atlas bench` timed up to the thirteenth session).
"""
from __future__ import annotations

import gc
import statistics
import sys
import time

import torch

METHODS = ("steady", "synced")
_method = "steady"


def set_method(name: str) -> None:
    """How later timings run their calls: "steady" (back to back) or "synced" (see the docstring)."""
    global _method
    if name not in METHODS:
        raise ValueError(f"timing method {name!r}: choose from {', '.join(METHODS)}")
    _method = name


def gpu(script: str) -> torch.device:
    """The CUDA device a benchmarks/ script times on; without one, one line and exit 1 (a script
    that times GPU kernels has nothing to say on a CPU)."""
    if not torch.cuda.is_available():
        sys.exit(f"{script}: no CUDA device here; it times GPU kernels, so run it on a GPU machine")
    return torch.device("cuda")


def timed(fn, warmup: int = 3, reps: int = 10) -> float:
    """Median milliseconds of fn() (CUDA events on GPU, perf_counter on CPU)."""
    return statistics.median(times_ms(fn, warmup, reps))


def times_ms(fn, warmup: int = 3, reps: int = 10) -> list[float]:
    """Milliseconds of each of `reps` calls of fn() after `warmup` untimed ones. Python's cyclic
    garbage collector is off while they run (as in `timeit`): in host-bound code (decoding) a
    collection landing in one call is the host's noise, not the call's cost."""
    for _ in range(warmup):
        fn()
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _timed_reps(fn, reps)
    finally:
        if was_enabled:
            gc.enable()


def _timed_reps(fn, reps: int) -> list[float]:
    if not torch.cuda.is_available():
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return times
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
        if _method == "synced":
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def fwd_bwd(module_fn, inputs, params=()):
    """One forward + backward. Gradients are dropped after each step (as zero_grad(set_to_none)
    does): accumulating into a CUDA graph's output buffer from the step before is an error."""
    params = list(params)

    def step():
        torch.compiler.cudagraph_mark_step_begin()  # a new step for CUDA-graph replays; a no-op otherwise
        out = module_fn(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        out.float().square().mean().backward()
        for t in (*inputs, *params):
            t.grad = None
    return step


def captured(step):
    """step() (forward, loss and backward) recorded once into one CUDA graph and replayed: the
    device's own time, with no host work between kernels -- neither launches nor the autograd
    engine, the eager loss or the input copies that torch.compile's CUDA graphs still leave between
    their replays. It is how a whole training step runs when captured, and what a module costs inside
    one. Captured at the first call, after warm-up calls on a side stream (autotuning, compiling and
    the allocator's first allocations stay out of the graph); code that synchronises with the host
    cannot be captured and raises there."""
    graph = None

    def replay():
        nonlocal graph
        if graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                step()
            graph = g
        graph.replay()
    return replay


def fresh(t: torch.Tensor) -> torch.Tensor:
    """A copy of an input that needs a gradient, for a captured step: no autograd node of another
    mode's steps (a CUDA-graph tree may keep them alive) accumulates into it from another stream,
    which would fail the capture."""
    return t.detach().clone().requires_grad_(t.requires_grad)


def time_modes(prefix: str, steps: dict, tokens: int, beside: tuple = ("captured",)) -> dict:
    """Time each mode's step: {prefix}_{mode}_ms and _tok_s (or _error: the others keep their
    numbers), and the fastest as {prefix}_ms, _tok_s and _mode. Modes in `beside` are timed and
    recorded but never the headline: by default `captured` (the whole step in one CUDA graph, see
    `captured`), which is not how a module runs on its own."""
    out = {}
    for mode, step in steps.items():
        try:
            ms = timed(step)
        except Exception as e:  # noqa: BLE001 - keep the other modes' numbers, say why
            out[f"{prefix}_{mode}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            continue
        out[f"{prefix}_{mode}_ms"], out[f"{prefix}_{mode}_tok_s"] = ms, tokens / ms * 1e3
    done = [m for m in steps if f"{prefix}_{m}_ms" in out and m not in beside]
    if done:
        best = min(done, key=lambda m: out[f"{prefix}_{m}_ms"])
        out[f"{prefix}_mode"] = best
        out[f"{prefix}_ms"], out[f"{prefix}_tok_s"] = out[f"{prefix}_{best}_ms"], out[f"{prefix}_{best}_tok_s"]
    return out
