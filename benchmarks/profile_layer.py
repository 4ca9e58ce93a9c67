"""Where the memory layer's time goes, on one GPU: the layer of `atlas bench` (B=2, T=4096, H=8,
D=128, chunk 64, bf16, forward + backward) run several ways, and its kernels from the profiler.

    python3 benchmarks/profile_layer.py --out benchmarks/results/profile_h100.json

  eager            the module as a user calls it (gate part through torch.compile, scan kernels)
  graphed          torch.cuda.make_graphed_callables: the same kernels replayed from a CUDA graph,
                   i.e. with no host-side launch cost
  compiled         torch.compile(layer)
  compiled_graphs  torch.compile(layer, mode="reduce-overhead") (compile + CUDA graphs)
  scan             torch.compile(memory_scan) alone on atlas bench's random inputs (no projections)
  scan_graphs      the same with CUDA graphs

The profiler part sums device time per kernel over the eager runs: if it is far below the eager
wall time, the host (launches, dispatch) is the cost, not the kernels. For the two CUDA-graph ways
it lists where the device sits idle between kernels (idle_gaps).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

from atlas.bench import memory_layer, scan_inputs
from atlas.memory import memory_scan
from atlas.timing import fwd_bwd, gpu, timed


def op_table(prof, iters: int) -> list[dict]:
    """The operators (the PyTorch op or custom op that launched kernels), with their input shapes,
    by their own device time per iteration, largest first."""
    return sorted(({"op": e.key, "shapes": str(e.input_shapes)[:120], "ms": e.self_device_time_total / 1e3 / iters,
                    "calls": e.count // iters} for e in prof.key_averages(group_by_input_shape=True)
                   if e.self_device_time_total > 0), key=lambda r: -r["ms"])


def kernel_table(step, iters: int = 5) -> tuple[float, list[dict], list[dict], list[dict]]:
    """Device ms per iteration, the top kernels by device time, the top operators (op_table), and
    the top operators by host time."""
    from torch.profiler import ProfilerActivity, profile
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    per = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name][0] += e.device_time / 1e3 / iters  # ms per iteration
            per[e.name][1] += 1
    rows = sorted(({"kernel": k[:90], "ms": v[0], "launches": v[1] // iters} for k, v in per.items()),
                  key=lambda r: -r["ms"])
    ops = op_table(prof, iters)
    host = sorted(({"op": e.key, "host_ms": e.self_cpu_time_total / 1e3 / iters, "calls": e.count // iters}
                   for e in prof.key_averages()), key=lambda r: -r["host_ms"])
    # "## Call CompiledFxGraph ..." rows span the kernels they launch: not counted twice
    return sum(r["ms"] for r in rows if not r["kernel"].startswith("## ")), rows[:40], ops[:30], host[:25]


def idle_gaps(step, iters: int = 5, top: int = 12) -> dict:
    """Where the GPU waits: over `iters` steps, the device's busy time (the union of its kernels and
    copies) against the span from the first to the last, and the longest gaps between one kernel's
    end and the next one's start, with the kernels on either side. With CUDA graphs the host's
    launch cost is gone, so a gap there is the host doing something else between graph replays
    (the autograd engine, an eager op, a graph break)."""
    from torch.profiler import ProfilerActivity, profile
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    ev = sorted(((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                 if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda x: x[0])
    busy, gaps, end, prev = 0.0, [], ev[0][0], ev[0][2]
    for s, e, name in ev:  # time_range is in microseconds
        if s > end:
            gaps.append({"us": s - end, "after": prev[:70], "before": name[:70]})
        busy += max(0.0, e - max(s, end))
        if e > end:
            end, prev = e, name
    span = end - ev[0][0]
    return {"span_ms": span / 1e3 / iters, "busy_ms": busy / 1e3 / iters, "kernels": len(ev) // iters,
            "gaps_over_5us_ms": sum(g["us"] for g in gaps if g["us"] > 5) / 1e3 / iters,
            "longest": sorted(gaps, key=lambda g: -g["us"])[:top]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/profile_h100.json")
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--B", type=int, default=2)
    ap.add_argument("--ways", default="eager,graphed,compiled,compiled_graphs")
    a = ap.parse_args()
    dev, dt = gpu("profile_layer.py"), torch.bfloat16
    torch.backends.cuda.matmul.allow_tf32 = True  # as atlas bench and training run
    B, T, H, D = a.B, a.T, 8, 128
    res = {"device": torch.cuda.get_device_name(), "command": " ".join(["python3"] + sys.argv),
           "B": B, "T": T, "H": H, "D": D, "ms": {}}
    out = Path(a.out)

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1) + "\n")

    torch.manual_seed(0)
    x = torch.randn(B, T, H * D, device=dev, dtype=dt, requires_grad=True)
    layer = memory_layer(H * D, H, "triton", 64, dt, dev)
    ways = a.ways.split(",")
    scan_in = [t.requires_grad_(True) for t in scan_inputs(B, T, H, D, dev, seed=2)]

    def scan(*ins):
        return memory_scan(*ins, chunk_size=64, impl="triton")[0]
    for name in ("eager", "compiled", "scan"):
        if name not in ways:
            continue
        if name == "scan":
            step = fwd_bwd(torch.compile(scan, dynamic=False), scan_in)
        else:
            fn = layer if name == "eager" else torch.compile(memory_layer(H * D, H, "triton", 64, dt, dev), dynamic=False)
            step = fwd_bwd(fn, (x,), fn.parameters())
        res["ms"][name] = timed(step, warmup=5, reps=20)
        res[f"{name}_kernels_ms"], res[f"{name}_kernels"], res[f"{name}_ops"], res[f"{name}_host"] = kernel_table(step)
        save()
        print(f"{name} {res['ms'][name]:.2f} ms; kernels {res[f'{name}_kernels_ms']:.2f} ms/iter", flush=True)
        for r in res[f"{name}_ops"][:15]:
            print(f"  {r['ms']:7.3f} ms  x{r['calls']:<3d} {r['op'][:60]} {r['shapes'][:60]}")
        for r in res[f"{name}_host"][:15]:
            print(f"  host {r['host_ms']:7.3f} ms  x{r['calls']:<3d} {r['op'][:80]}")
    if "graphed" in ways:
        y_only = torch.nn.Module()  # graphs take tensors out: drop the returned state
        y_only.layer, y_only.forward = layer, lambda t: layer(t)[0]
        g = torch.cuda.make_graphed_callables(y_only, (x,), num_warmup_iters=5)
        res["ms"]["graphed"] = timed(fwd_bwd(g, (x,), layer.parameters()), warmup=5, reps=20)
        save()
        print(f"graphed {res['ms']['graphed']:.2f} ms", flush=True)
    for name in ("compiled_graphs", "scan_graphs"):
        if name in ways:
            try:
                if name == "scan_graphs":
                    step = fwd_bwd(torch.compile(scan, mode="reduce-overhead"), scan_in)
                else:
                    fn = torch.compile(memory_layer(H * D, H, "triton", 64, dt, dev), mode="reduce-overhead")
                    step = fwd_bwd(fn, (x,), fn.parameters())
                res["ms"][name] = timed(step, warmup=5, reps=20)
                res[f"{name}_idle"] = gaps = idle_gaps(step)
                print(f"{name}: device busy {gaps['busy_ms']:.2f} of {gaps['span_ms']:.2f} ms a step; "
                      f"gaps over 5 us {gaps['gaps_over_5us_ms']:.2f} ms", flush=True)
                for g in gaps["longest"]:
                    print(f"  gap {g['us']:7.1f} us  after {g['after'][:50]}  before {g['before'][:50]}")
            except Exception as e:  # noqa: BLE001 - record why, keep the other numbers
                res["ms"][name] = None
                res[f"{name}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            save()
            print(f"{name} {res['ms'][name]} ms", flush=True)
    print(json.dumps(res["ms"]))


if __name__ == "__main__":
    main()
