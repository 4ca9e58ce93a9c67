"""What `model.memory.max_norm` (the seed's clamp of ||M||) costs memory_scan, per implementation.

With max_norm the Triton scan runs one call a chunk, clamping between calls (the kernels carry M
through a call unclamped); `chunked` clamps inside its own loop. Eager forward + backward at the
`seed` recipe's shape in experiments/memory_use (B=16, T=512, 2 heads of 128, window 4), at its two
chunk sizes, with and without the clamp: a JSON file and a table.

    python3 benchmarks/max_norm_scan.py --out benchmarks/results/max_norm_scan_h100.json
(ATLAS_TRITON_TUNE=0 skips the autotuner: one kernel config, for a short device call.)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from atlas.bench import scan_inputs
from atlas.memory import memory_scan
from atlas.timing import fwd_bwd, gpu, timed


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--shape", default="16,512,2,128", help="B,T,H,D")
    p.add_argument("--chunks", default="256,32")
    p.add_argument("--max-norm", type=float, default=6.25)
    a = p.parse_args()
    device = gpu("max_norm_scan.py")
    B, T, H, D = (int(x) for x in a.shape.split(","))
    rows = []
    for chunk in (int(c) for c in a.chunks.split(",")):
        for impl in ("triton", "chunked"):
            for max_norm in (None, a.max_norm):
                ins = [t.requires_grad_(True) for t in scan_inputs(B, T, H, D, device, seed=3)]

                def scan(*xs, impl=impl, chunk=chunk, max_norm=max_norm):
                    return memory_scan(*xs, chunk_size=chunk, window=4, impl=impl, max_norm=max_norm)[0]
                ms = timed(fwd_bwd(scan, ins))
                rows.append({"chunk": chunk, "impl": impl, "max_norm": max_norm, "ms": ms, "tok_s": B * T / ms * 1e3})
                print(f"| {chunk} | {impl} | {max_norm} | {ms:.3f} | {B * T / ms * 1e3:,.0f} |", flush=True)
    out = {"device": torch.cuda.get_device_name(device), "shape": {"B": B, "T": T, "H": H, "D": D, "window": 4},
           "command": "python3 " + " ".join(sys.argv), "timing": "eager forward + backward, CUDA events, median of 10",
           "rows": rows}
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", a.out)


if __name__ == "__main__":
    main()
