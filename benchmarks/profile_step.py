"""Where the 300M training step's time goes, on one GPU: `atlas bench`'s model step (per-block
torch.compile, B=2, T=4096, bf16 autocast, AdamW) timed and profiled, for the preset and for
variants given as config overrides, with the kernels grouped by what launched them.

    python3 benchmarks/profile_step.py --out benchmarks/results/profile_step_h100.json \
        --variant off:model.memory.enabled=false --variant w1:model.memory.context_window=1

The "atlas" variant (the preset as `atlas bench` runs it: 8 memory heads of 128) is always
first. Groups: `scan` (the memory's Triton kernels), `matmul` (cuBLAS/cuTLASS GEMMs: projections,
MLP, logits), `attention` (FlashAttention), `fused` (Inductor's generated kernels: norms, gates,
conv, activations, the gate algebra), `optimizer`, `other`.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

from profile_layer import op_table  # benchmarks/, this script's folder

from atlas.bench import autotune_picks, build_model, train_step
from atlas.config import load_config
from atlas.timing import gpu, timed

SCAN = ("_fwd_state", "_fwd_out", "_bwd_state", "_bwd_q", "_bwd_k")


def group(kernel: str) -> str:
    k = kernel.lower()
    if kernel.startswith(SCAN):
        return "scan"
    if "flash" in k or "fmha" in k:
        return "attention"
    if any(s in k for s in ("gemm", "xmma", "cutlass", "nvjet", "cublas", "sm90_")):
        return "matmul"
    if "adam" in k or "foreach" in k:
        return "optimizer"
    if k.startswith("triton_"):
        return "fused"
    return "other"


def build_step(overrides: list[str], B: int, T: int, device):
    """atlas bench's model step, compiled per block (no CUDA graphs: the profiler sees each kernel)."""
    cfg = load_config("atlas_300m_omega", ["model.memory.heads=8", "model.memory.impl=triton",
                                           f"train.seq_len={T}"] + overrides)
    model, opt = build_model(cfg, device)
    model.compile_blocks()
    return train_step(model, opt, cfg.model.vocab_size, B, T, device)


def kernels(step, iters: int = 3, top: int = 40) -> dict:
    """Device ms per step: in all, by kernel, by group, and by the operator that launched them
    (`ops`: which eager op a library kernel such as a reduction or a fill came from, with its
    shapes); and kernels launched per step."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    per, launches = defaultdict(float), 0
    # ranges ("Optimizer.step#AdamW.step", "## Call CompiledFxGraph ...") show up on the GPU's
    # timeline too, spanning kernels that are counted on their own
    ranges = {e.name for e in prof.events() if getattr(e, "is_user_annotation", False)}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith("## ") and e.name not in ranges:
            per[e.name] += e.device_time / 1e3 / iters
            launches += 1
    groups = defaultdict(float)
    for name, ms in per.items():
        groups[group(name)] += ms
    slowest = sorted(per.items(), key=lambda kv: -kv[1])[:top]
    ops = op_table(prof, iters)
    return {"kernels_ms": sum(per.values()), "launches": launches / iters, "groups_ms": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
            "top": [{"kernel": k[:100], "ms": ms} for k, ms in slowest], "ops": ops[:top]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/profile_step_h100.json")
    ap.add_argument("--B", type=int, default=2)
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VAL[,KEY=VAL]",
                    help="a model with these config overrides (repeatable)")
    ap.add_argument("--top", type=int, default=40, help="how many kernels to list, by device time")
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    dev = gpu("profile_step.py")
    variants = {"atlas": []}
    for v in a.variant:
        name, _, over = v.partition(":")
        variants[name] = [o for o in over.split(",") if o]
    res = {"device": torch.cuda.get_device_name(), "command": " ".join(["python3"] + sys.argv),
           "B": a.B, "T": a.T, "variants": {}}
    out = Path(a.out)
    for name, over in variants.items():
        step = build_step(over, a.B, a.T, dev)
        ms = timed(step, warmup=5, reps=10)
        row = {"overrides": over, "ms": ms, "tok_s": a.B * a.T / ms * 1e3, **kernels(step, top=a.top),
               "autotuned": autotune_picks()}
        res["variants"][name] = row
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1) + "\n")
        print(f"{name}: {ms:.1f} ms/step ({row['tok_s']:,.0f} tok/s), kernels {row['kernels_ms']:.1f} ms: "
              + ", ".join(f"{g} {t:.1f}" for g, t in row["groups_ms"].items()), flush=True)
        del step
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
