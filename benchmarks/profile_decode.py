"""Where a decoding step's time goes, on one GPU: `atlas bench`'s decode model (300M, 8 memory
heads of 128, sliding window 1024, bf16 autocast) after a prefill, one token a step through
`StaticDecoder`, plain and compiled. Each is timed replayed from its CUDA graph (as `generate`
runs it) and as its eager twin, and the twin is profiled (inside a graph the profiler sees no
kernels): its kernels by device time and group, and how many it launches a step. Their sum
against the replayed step says whether the step is its kernels' work or their count.

    python3 benchmarks/profile_decode.py --out benchmarks/results/profile_decode_h100.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from profile_step import kernels  # benchmarks/, this script's folder

from atlas.config import load_config
from atlas.model import AtlasLM
from atlas.model.decode import StaticDecoder
from atlas.timing import gpu, timed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/profile_decode_h100.json")
    ap.add_argument("--context", type=int, default=4096, help="prefill tokens before the steps")
    ap.add_argument("--top", type=int, default=40, help="how many kernels to list, by device time")
    a = ap.parse_args()
    dev = gpu("profile_decode.py")
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = load_config("atlas_300m_omega", ["model.memory.heads=8", "model.memory.impl=triton", "model.attn_window=1024",
                                           f"model.max_seq_len={a.context + 1}", "train.seq_len=16"])
    model = AtlasLM(cfg.model).to(dev).eval()
    res = {"device": torch.cuda.get_device_name(), "command": " ".join(["python3"] + sys.argv), "context": a.context,
           "ways": {}}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        idx = torch.randint(0, cfg.model.vocab_size, (1, a.context), device=dev)
        _, state = model(idx)
        tok = idx[:, -1:]
        for name, compile_ in (("graphs", False), ("compiled_graphs", True)):
            graph = StaticDecoder(model, state, graphs=True, compile=compile_)
            twin = StaticDecoder(model, state, graphs=False, compile=compile_)
            res["ways"][name] = {"graph_ms": timed(lambda: graph.step(tok), warmup=5, reps=30),  # noqa: B023
                                 "twin_ms": timed(lambda: twin.step(tok), warmup=5, reps=30),  # noqa: B023
                                 **kernels(lambda: twin.step(tok), iters=5, top=a.top)}  # noqa: B023
            w = res["ways"][name]
            print(f"{name}: replayed {w['graph_ms']:.2f} ms, eager twin {w['twin_ms']:.2f} ms, kernels "
                  f"{w['kernels_ms']:.2f} ms in {w['launches']:.0f} launches; "
                  + ", ".join(f"{g} {ms:.2f}" for g, ms in w["groups_ms"].items()), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
