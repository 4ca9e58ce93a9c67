"""The memory layer of `atlas bench`'s scaling section timed at the given shapes, in the given
order, in one process, with the scan kernels' autotuned picks: does a shape's time depend on what
ran before it? (It did, through torch.compile's limit of 8 compiles of one function, not through
the picks: benchmarks/README.md, seventh session. `atlas.bench.layer_ms` now resets the compiler
for each shape.) Each row keeps the sequential passes' picks at that shape: their autotune key
holds B*H, so B=1 and B=16 may take different blocks.

    python3 benchmarks/scaling_order.py --shapes 2x16384,1x32768,1x32768 --out results/x.json
    python3 benchmarks/scaling_order.py --shapes 16x2048,8x4096,4x8192,2x16384,1x32768   # B*T = 32K
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from atlas.bench import GRAPHS, autotune_picks, layer_ms
from atlas.timing import gpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="2x16384,1x32768,1x32768", help="BxT,BxT,... in order")
    ap.add_argument("--out", default="benchmarks/results/scaling_order_h100.json")
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    dev, dt, H, D = gpu("scaling_order.py"), torch.bfloat16, 8, 128
    rows = []
    for shape in a.shapes.split(","):
        b, t = (int(x) for x in shape.split("x"))
        ms = layer_ms(b, t, H, D, "triton", 64, dt, dev, GRAPHS)
        picks = {k: v for k, v in autotune_picks().items() if k.endswith("_state")}
        rows.append({"B": b, "T": t, "ms": ms, "us_per_token": ms / (b * t) * 1e3, "picks": picks})
        print(f"B={b} T={t}: {ms:.2f} ms, {ms / (b * t) * 1e3:.3f} us/token, {picks}", flush=True)
    out = {"device": torch.cuda.get_device_name(), "command": "python3 benchmarks/scaling_order.py --shapes " + a.shapes,
           "rows": rows, "autotuned": autotune_picks()}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
