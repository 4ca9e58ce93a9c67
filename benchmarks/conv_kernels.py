"""The conv kernels of one checkout, for an A/B of two (run it in each, on the same GPU): their
error against the PyTorch twin (conv.py's conv_silu_torch + l2_groups) and the device time of each
kernel of `conv_silu` forward + backward at the 300M model's shape (B=2, T=4096, q, k, v of
8 heads of 128: 3072 channels, the first 2048 normalised per head, 4 taps, bf16), summed by the
profiler over 10 calls (profile_layer.kernel_table) after a first call has tuned them.

    python3 benchmarks/conv_kernels.py --name main --out /tmp/conv_main.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from profile_layer import kernel_table  # benchmarks/, this script's folder

from atlas.bench import autotune_picks
from atlas.memory.conv import conv_silu, conv_silu_torch, l2_groups
from atlas.timing import gpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True, help="what this checkout is (a branch name)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    dev = gpu("conv_kernels.py")
    B, T, C, K, norm = 2, 4096, 3072, 4, (2048, 128)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(B, T, C, device=dev, generator=g).bfloat16().requires_grad_(True)  # (B, T, C)
    w = (torch.randn(C, K, device=dev, generator=g) / K ** 0.5).requires_grad_(True)  # (C, K)
    halo = torch.randn(B, K - 1, C, device=dev, generator=g).bfloat16().requires_grad_(True)  # (B, K-1, C)
    dy = torch.randn(B, T, C, device=dev, generator=g).bfloat16()

    def grads(fn):
        for t in (x, w, halo):
            t.grad = None
        y = fn()
        y.backward(dy)
        return [y.float(), x.grad.float(), w.grad.float(), halo.grad.float()]
    ref = grads(lambda: l2_groups(conv_silu_torch(x.float(), w, halo.float()), *norm))
    got = grads(lambda: conv_silu(x, w, halo, triton=True, norm=norm))
    err = {n: ((b - r).norm() / r.norm()).item() for n, r, b in zip(("y", "dx", "dw", "dhalo"), ref, got)}

    def call():
        for t in (x, w, halo):
            t.grad = None  # no accumulation kernels in the table
        conv_silu(x, w, halo, triton=True, norm=norm).backward(dy)
    _, rows, ops, _ = kernel_table(call, iters=10)
    res = {"device": torch.cuda.get_device_name(), "command": " ".join(["python3"] + sys.argv), "name": a.name,
           "rel_err_vs_float32_twin": err, "kernels_ms": {r["kernel"]: r["ms"] for r in rows}, "ops": ops,
           "autotuned": autotune_picks()}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(a.name, {k: f"{v:.1e}" for k, v in err.items()}, {r["kernel"][:60]: round(r["ms"], 4) for r in rows},
          f"sum {sum(r['ms'] for r in rows):.3f} ms")


if __name__ == "__main__":
    main()
