"""memory_scan(impl="chunked") forward + backward on the CPU: a quick proxy for changes to the
gate algebra that `chunked` shares with the Triton path (it is not a GPU number).

    python3 benchmarks/scan_cpu.py --name main --out /tmp/scan_cpu_main.json
    PYTHONPATH=.carry/x python3 benchmarks/scan_cpu.py --name x ...   # a branch copy (benchmarks/ab.sh prepare)

Median of 5 timed runs after 2 warm-up ones, `atlas bench`'s random inputs in float32.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from atlas.bench import scan_inputs
from atlas.memory import memory_scan
from atlas.timing import times_ms


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="main")
    ap.add_argument("--out", default=None)
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--window", type=int, default=16)
    a = ap.parse_args()
    B, T, H, D = a.B, a.T, a.H, a.D
    # atlas bench's random inputs (bf16 q, k, v there), in float32
    ins = [t.float().requires_grad_(True) for t in scan_inputs(B, T, H, D, torch.device("cpu"))]

    def step():
        y, _ = memory_scan(*ins, chunk_size=a.chunk, window=a.window, impl="chunked")
        y.square().mean().backward()
    ms = statistics.median(times_ms(step, warmup=2, reps=5))
    res = {"name": a.name, "command": " ".join(["python3"] + sys.argv), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "shape": {"B": B, "T": T, "H": H, "D": D, "chunk": a.chunk,
                                                          "window": a.window}, "ms": ms}
    print(f"{a.name}: {ms:.1f} ms (chunked fwd+bwd, CPU)")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
