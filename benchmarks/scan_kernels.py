"""The scan kernels of one checkout, for an A/B of two (run it in each, on the same GPU):
Triton's error against `chunked` (atlas.bench.kernel_error at chunk 64, and at the 300M model's
chunk 2048 with Omega window 16), and each kernel's device time in memory_scan forward + backward
at the 300M model's memory shape (B=2, T=4096, 8 heads of 128, chunk 2048, window 16, bf16),
eager, summed by the profiler over 10 calls (profile_layer.kernel_table) after the error checks
have compiled and tuned the kernels at this shape. --shape times another one (B,T,chunk,window;
one untimed call tunes it first), e.g. the layer's chunk 64 at B=1, T=32K, where the sequential
passes walk 512 sub-chunks.

    python3 benchmarks/scan_kernels.py --name main --out /tmp/main.json
    python3 benchmarks/scan_kernels.py --name main --out /tmp/b1.json --shape 1,32768,64,1
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from profile_layer import kernel_table  # benchmarks/, this script's folder

from atlas.bench import autotune_picks, kernel_error, scan_inputs
from atlas.memory import memory_scan
from atlas.timing import gpu


def ints(text: str) -> list[int]:
    """A comma-separated list of positive integers (an argparse type)."""
    parts = text.split(",")
    if not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: want positive integers separated by commas, e.g. 16,32")
    return [int(p) for p in parts]


def shape(text: str) -> tuple[int, int, int, int]:
    """--shape's B,T,chunk,window."""
    parts = text.split(",")
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"{text!r}: want four positive integers B,T,chunk,window, e.g. 1,32768,64,1")
    return tuple(ints(text))


def scan_call(B: int, T: int, chunk: int, window: int, dev, H: int = 8, D: int = 128):
    """One memory_scan forward + backward (Triton) on atlas bench's random inputs at this shape."""
    ins = [t.requires_grad_(True) for t in scan_inputs(B, T, H, D, dev, seed=2)]
    dy = torch.randn(B, T, H, D, device=dev).bfloat16()  # (B, T, H, D) like y

    def call():
        memory_scan(*ins, chunk_size=chunk, window=window, impl="triton")[0].backward(dy)
    return call


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True, help="what this checkout is (a branch name)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", default="2,4096,2048,16", type=shape, help="B,T,chunk,window of the timed calls")
    a = ap.parse_args()
    dev = gpu("scan_kernels.py")
    H, D = 8, 128
    res = {"device": torch.cuda.get_device_name(), "command": " ".join(["python3"] + sys.argv), "name": a.name,
           "rel_err": {"chunk64": kernel_error(2, 4096, H, D, 64, dev),
                       "chunk2048_w16": kernel_error(2, 4096, H, D, 2048, dev, 16)}}
    B, T, chunk, window = a.shape
    res["shape"] = {"B": B, "T": T, "H": H, "D": D, "chunk": chunk, "window": window}
    _, rows, _, _ = kernel_table(scan_call(B, T, chunk, window, dev, H, D), iters=10)  # the 40 largest kernels, largest first (after one untimed call)
    res["kernels_ms"] = {r["kernel"]: r["ms"] for r in rows}
    res["scan_kernels_ms"] = {r["kernel"]: r["ms"] for r in rows if r["kernel"].startswith("_")}  # _fwd_state, ...
    res["autotuned"] = autotune_picks()  # at the timed shape
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(a.name, {k: f"{max(v.values()):.2e}" for k, v in res["rel_err"].items()},
          {k: round(v, 4) for k, v in res["scan_kernels_ms"].items()}, f"sum {sum(res['scan_kernels_ms'].values()):.3f} ms")


if __name__ == "__main__":
    main()
