"""`atlas bench`: the memory layer against FlashAttention (SDPA), titans-pytorch and a plain
transformer, on one GPU. Writes benchmarks/results/<name>.json and prints a table.

Every number is the median of >= 10 timed runs after warm-up, timed with CUDA events, on random
inputs; the runs go back to back as a training loop's steps do (`--timing synced` waits for each
one instead; atlas/timing.py). `--smoke` runs tiny shapes on whatever device there is (a CPU
check of the code path).
"""
from __future__ import annotations

import json
import re
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import timing
from .config import load_config
from .errors import UserError
from .memory.layer import MemoryLayer
from .model import AtlasLM
from .model.decode import StaticDecoder
from .timing import captured, fresh, fwd_bwd, time_modes, timed, times_ms
from .train.flops import flops_per_token, peak_flops


def memory_layer(d: int, H: int, impl: str, chunk: int, dtype, device) -> MemoryLayer:
    cfg = load_config("atlas_300m_omega", [f"model.memory.heads={H}", f"model.memory.d_key={d}",
                                           f"model.memory.d_value={d}", f"model.memory.chunk_size={chunk}",
                                           f"model.memory.impl={impl}", "model.memory.context_window=1"]).model.memory
    return MemoryLayer(d, cfg).to(device=device, dtype=dtype)


def compiled(layer, mode=None):
    """The layer as training runs it on a GPU: torch.compile fuses the projections' glue (conv,
    SiLU, norms, gates) around the Triton op; mode "reduce-overhead" also replays it from CUDA
    graphs, so the host's launch cost (compiled 4.29 ms vs graphed 2.07 ms at B=1, T=2K:
    benchmarks/results/profile_h100_B1_T2048.json) leaves the critical path.
    One compile per shape (dynamic=False)."""
    return torch.compile(layer, dynamic=False, mode=mode) if torch.cuda.is_available() else layer


GRAPHS = "reduce-overhead"


def layer_ms(B, T, H, D, impl, chunk, dtype, device, mode=None, capture=False) -> float:
    """Forward + backward of a fresh (compiled) memory layer on random (B, T, H*D) input, in ms;
    capture=True: compiled without graphs, inside a captured step (`captured`: device time alone).
    Each shape compiles from a clean slate, as in a fresh process: torch.compile keeps at most
    8 compiles of one function (torch._dynamo.config.recompile_limit) and runs later shapes
    eagerly -- the scaling section's ninth shape (B=1, T=32K) timed 19.6 ms eager for ~10 compiled
    (benchmarks/README.md)."""
    torch._dynamo.reset()
    x = torch.randn(B, T, H * D, device=device, dtype=dtype, requires_grad=True)
    layer = compiled(memory_layer(H * D, H, impl, chunk, dtype, device), None if capture else mode)
    step = fwd_bwd(layer, (x,), layer.parameters())
    return timed(captured(step) if capture else step)


def autotune_picks() -> dict:
    """The block shape, warps and stages Triton's autotuner picked for each memory kernel it has run."""
    from .memory import triton_conv, triton_kernels
    out = {}
    for mod in (triton_kernels, triton_conv):
        for name, fn in vars(mod).items():
            best = getattr(fn, "best_config", None)
            if best is not None:
                out[name] = {**best.kwargs, "num_warps": best.num_warps, "num_stages": best.num_stages}
    return out


def scan_inputs(B, T, H, D, device, seed=0):
    """Random memory_scan inputs as a layer makes them: unit-norm bf16 q, k; bf16 v; float32 gates
    alpha (forget) < 0.1, eta (momentum) > 0.5, theta < 0.1, gamma in (0, 1)."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(B, T, H, device=device, generator=g)
    q, k = (F.normalize(torch.randn(B, T, H, D, device=device, generator=g), dim=-1).bfloat16() for _ in range(2))
    v = torch.randn(B, T, H, D, device=device, generator=g).bfloat16()
    return q, k, v, rnd(hi=0.1), rnd(lo=0.5), rnd(hi=0.1), rnd()


def kernel_error(B, T, H, D, chunk, device, window: int = 1) -> dict:
    """||triton - chunked|| / ||chunked|| on random bf16 q, k, v (chunked computes in float32 from
    the same bf16 values), for y, the final M and S, and the gradients of q, k, v and theta."""
    from .memory import memory_scan
    q, k, v, *gates = scan_inputs(B, T, H, D, device)
    dy = torch.randn(B, T, H, D, device=device, generator=torch.Generator(device=device).manual_seed(1))
    outs = {}
    for impl in ("triton", "chunked"):
        xs = [t.clone().float().requires_grad_(True) if impl == "chunked" else t.clone().requires_grad_(True)
              for t in (q, k, v)]
        th = gates[2].clone().requires_grad_(True)
        y, st = memory_scan(*xs, gates[0], gates[1], th, gates[3], chunk_size=chunk, window=window, impl=impl)
        (y.float() * dy).sum().backward()
        outs[impl] = {"y": y, "M": st.M, "S": st.S, "dq": xs[0].grad, "dk": xs[1].grad, "dv": xs[2].grad, "dtheta": th.grad}
    return {n: ((outs["triton"][n].float() - r.float()).norm() / r.float().norm()).item()
            for n, r in outs["chunked"].items()}


def bench_scan(B, T, H, D, chunk, device) -> dict:
    """memory_scan alone, the Triton op with its gate algebra: like for like with SDPA, which also
    maps q, k, v to y without the layer's projections. Eager, compiled, and with CUDA graphs; and
    captured whole (beside the headline)."""
    from .memory import memory_scan
    ins = [t.requires_grad_(True) for t in scan_inputs(B, T, H, D, device, seed=2)]

    def scan(q, k, v, alpha, eta, theta, gamma):
        return memory_scan(q, k, v, alpha, eta, theta, gamma, chunk_size=chunk, impl="triton")[0]
    steps = {"eager": fwd_bwd(scan, ins), "compiled": fwd_bwd(torch.compile(scan, dynamic=False), ins),
             "graphs": fwd_bwd(torch.compile(scan, dynamic=False, mode=GRAPHS), ins)}
    if device.type == "cuda":
        steps["captured"] = captured(fwd_bwd(torch.compile(scan, dynamic=False), [fresh(t) for t in ins]))
    return time_modes("atlas_scan", steps, B * T)


def bench_triton_modes(x, d, H, chunk, dtype, device) -> dict:
    """The Triton layer eager, compiled and compiled with CUDA graphs (the fastest is the headline),
    and compiled inside a captured step (beside the headline)."""
    def step(mode=None, inp=x):
        layer = memory_layer(d, H, "triton", chunk, dtype, device)
        layer = layer if mode == "eager" else compiled(layer, mode)
        return fwd_bwd(layer, (inp,), layer.parameters())
    steps = {"eager": step("eager"), "compiled": step(), "graphs": step(GRAPHS)}
    if device.type == "cuda":
        steps["captured"] = captured(step(inp=fresh(x)))
    return time_modes("atlas_triton", steps, x.shape[0] * x.shape[1])


def bench_layer(B, T, H, D, chunk, dtype, device, impls) -> dict:
    """The layer section. Atlas, SDPA and titans-pytorch each also inside a captured step
    (`captured`): their device time alone, with no host work between kernels."""
    d = H * D
    cuda = device.type == "cuda"
    x = torch.randn(B, T, d, device=device, dtype=dtype, requires_grad=True)
    out = {"B": B, "T": T, "H": H, "D": D, "chunk_size": chunk}
    layer = memory_layer(d, H, "chunked", chunk, dtype, device)
    ms = timed(fwd_bwd(layer, (x,), layer.parameters()))
    out["atlas_chunked_ms"], out["atlas_chunked_tok_s"] = ms, B * T / ms * 1e3
    if "triton" in impls:
        out.update(bench_triton_modes(x, d, H, chunk, dtype, device))
        out.update(bench_scan(B, T, H, D, chunk, device))
    q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))

    def sdpa(a, b, c):
        return F.scaled_dot_product_attention(a, b, c, is_causal=True)
    steps = {"eager": fwd_bwd(sdpa, (q, k, v))}
    if cuda:
        steps["captured"] = captured(fwd_bwd(sdpa, [fresh(t) for t in (q, k, v)]))
    out.update(time_modes("sdpa", steps, B * T))
    try:
        from titans_pytorch import NeuralMemory
        from titans_pytorch.memory_models import MemoryMLP
    except ImportError as e:
        out["titans_pytorch_tok_s"] = None
        out["titans_pytorch_note"] = f"not installed ({e})"
        return out

    def titans():  # a module of its own for each mode; float32, run under bf16 autocast as a user would
        mem = NeuralMemory(dim=d, chunk_size=chunk, heads=H, dim_head=D, model=MemoryMLP(D, depth=1)).to(device)
        step = fwd_bwd(mem, (torch.randn(B, T, d, device=device, requires_grad=True),), mem.parameters())

        def run():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                step()
        return run
    # eager is the headline (titans-pytorch as shipped, as the issue measured it); captured beside it
    steps = {"eager": titans(), **({"captured": captured(titans())} if cuda else {})}
    out.update(time_modes("titans_pytorch", steps, B * T))
    return out


def build_model(cfg, device):
    """AtlasLM(cfg.model) on device and its AdamW, as the model section times them."""
    m = AtlasLM(cfg.model).to(device)
    return m, torch.optim.AdamW(m.parameters(), lr=1e-4, fused=device.type == "cuda")


def train_step(model, opt, vocab_size: int, B: int, T: int, device):
    """One training step (bf16 autocast forward, cross-entropy, backward, AdamW) on random tokens."""
    idx = torch.randint(0, vocab_size, (B, T + 1), device=device)

    def step():
        torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits, _ = model(idx[:, :-1])
        F.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def bench_model(preset: str, overrides: list[str], B: int, T: int, device, compile_: bool, mode=None) -> dict:
    res = {}
    for name, extra in (("atlas", []), ("transformer", ["model.memory.enabled=false"])):
        cfg = load_config(preset, overrides + extra + [f"train.seq_len={T}"])
        model, opt = build_model(cfg, device)
        is_compiled = False
        if compile_:
            try:  # fall back to eager (and say so) rather than lose the measurement
                model.compile_blocks(mode=mode)
                torch.compiler.cudagraph_mark_step_begin()
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    model(torch.randint(0, cfg.model.vocab_size, (B, T), device=device))
                is_compiled = True
            except Exception as e:  # noqa: BLE001
                res[f"{name}_compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                model, opt = build_model(cfg, device)
        res[f"{name}_compiled"] = is_compiled
        step = train_step(model, opt, cfg.model.vocab_size, B, T, device)
        ms = timed(step, warmup=3 if not compile_ else 5)
        tok_s = B * T / ms * 1e3
        res[f"{name}_ms"], res[f"{name}_tok_s"] = ms, tok_s
        print(f"model: {name} {ms:.1f} ms/step, {tok_s:,.0f} tok/s (compiled: {is_compiled})", flush=True)
        peak = peak_flops(torch.cuda.get_device_name()) if device.type == "cuda" else None
        if peak:
            res[f"{name}_mfu"] = tok_s * flops_per_token(cfg.model, T, cfg.model.memory.chunk_size) / peak
        del model, opt
    return res


@torch.no_grad()
def bench_decode(preset: str, overrides: list[str], contexts: list[int], device, rounds: int = 5,
                 steps: int = 10) -> list[dict]:
    """Per-token latency of generation after a prefill of each context, three ways: each step
    replayed from a CUDA graph (`StaticDecoder`, as `generate` runs on a GPU), the same with the
    step compiled under the graph (GPU only; `compile_s`: making that context's decoder, its
    compile and capture), and the eager step; the fastest is the headline. On a CPU the decoder runs its eager twin. Every context is
    prefilled first, then all are timed in turns: `rounds` rounds of `steps` generation steps each
    (the state moves on, as it does when generating), the median over all of them. Eager decoding
    is host-bound, and the host's speed drifts within a run: timed one context after the other,
    the last (32K) once read 62.6 ms against 39.1-41.9 for the others, and 39.7 in a rerun
    (benchmarks/README.md). In turns, every context sees the same drift."""
    cfg = load_config(preset, overrides)
    model = AtlasLM(cfg.model).to(device).eval()
    cuda = device.type == "cuda"
    ways = ("graphs", "compiled_graphs", "eager") if cuda else ("graphs", "eager")
    boxes = {}
    times = {(ctx, way): [] for ctx in contexts for way in ways}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        for ctx in contexts:
            idx = torch.randint(0, cfg.model.vocab_size, (1, ctx), device=device)
            state = None  # prefill in pieces: the memory absorbs the context, attention keeps its window
            for piece in idx.split(4096, dim=1):
                _, state = model(piece, state)
            box = boxes[ctx] = {"eager": state, "tok": idx[:, -1:], "graphs": StaticDecoder(model, state, graphs=cuda)}
            if cuda:
                t0 = time.perf_counter()
                box["compiled_graphs"] = StaticDecoder(model, state, graphs=True, compile=True)
                box["compile_s"] = time.perf_counter() - t0  # the first compiles; whether later ones reuse it shows here
        for r in range(rounds):
            for ctx, box in boxes.items():
                def eager(box=box):  # one generation step of this context's sequence
                    _, box["eager"] = model(box["tok"], box["eager"])
                # each way steps its own copy of the state
                step = {w: eager if w == "eager" else (lambda d=box[w], t=box["tok"]: d.step(t)) for w in ways}
                for way in ways:
                    times[ctx, way] += times_ms(step[way], warmup=3 if r == 0 else 1, reps=steps)
    rows = []
    for ctx in contexts:
        row = {"context": ctx, **{f"{w}_ms_per_token": statistics.median(times[ctx, w]) for w in ways},
               "steps": len(times[ctx, ways[0]])}
        row["mode"] = min(ways, key=lambda w: row[f"{w}_ms_per_token"]) if cuda else "eager twin"
        row["ms_per_token"] = row[f"{row['mode']}_ms_per_token"] if cuda else row["graphs_ms_per_token"]
        if "compile_s" in boxes[ctx]:
            row["compile_s"] = boxes[ctx]["compile_s"]
        rows.append(row)
        print(f"decode: context {ctx}: {row['ms_per_token']:.2f} ms/token ({row['mode']}; "
              + ", ".join(f"{w} {row[f'{w}_ms_per_token']:.2f}" for w in ways) + ")", flush=True)
    return rows


SECTIONS = ("layer", "scaling", "model", "decode")


def default_out(device_name: str) -> str:
    """benchmarks/results/<GPU model>.json: h100.json on an "NVIDIA H100 80GB HBM3", h200.json on an
    "NVIDIA H200", so that one GPU's run never lands in another's file."""
    m = re.search(r"[A-Za-z]*\d+[A-Za-z]*", device_name.replace("NVIDIA", ""))
    return f"benchmarks/results/{m.group(0).lower() if m else 'gpu'}.json"


def _results_in(path: Path) -> dict:
    """What an existing --out holds ({} when there is none); one clear line when it is not a results file."""
    if not path.exists():
        return {}
    try:
        old = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"bench: {path} is not JSON ({e}); move it away or give another --out") from None
    if not isinstance(old, dict):
        raise UserError(f"bench: {path} is not a results object; move it away or give another --out")
    return old


def run(out_path: Path, smoke: bool, sections=SECTIONS, compile_model: bool = True,
        method: str = "steady") -> dict:
    timing.set_method(method)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    impls = ["chunked"] + (["triton"] if device.type == "cuda" else [])
    if smoke:
        B, T, H, D, chunk, Ts, ctxs = 1, 128, 2, 16, 32, [64, 128], [32, 64]
        model_over = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.d_ff=128",
                      "model.memory.d_key=64", "model.memory.d_value=64", "model.memory.heads=2",
                      "model.memory.chunk_size=32", "model.vocab_size=512", "model.max_seq_len=256"]
        mB, mT = 1, 64
    else:
        B, T, H, D, chunk, Ts, ctxs = 2, 4096, 8, 128, 64, [2048, 4096, 8192, 16384, 32768], [1024, 2048, 4096, 8192, 16384, 32768]
        # 8 memory heads of 128 (the Triton kernel takes Dk <= 128; the same parameters as 1 x 1024)
        model_over, mB, mT = ["model.memory.heads=8"], 2, 4096
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    old = _results_in(out_path)
    if old.get("device", device_name) != device_name:  # sections of two devices never share a file
        raise UserError(f"bench: {out_path} holds results measured on {old['device']}, and this is {device_name}; "
                        f"give another --out (this device's default: {default_out(device_name)})")
    result = old if set(sections) != set(SECTIONS) else {}
    result.update({"device": device_name, "dtype": str(dtype).replace("torch.", "")})
    result.setdefault("commands", {})
    result.setdefault("timing", {})  # each section's timing method (atlas/timing.py)
    result["command"] = "atlas bench  (sections and their exact commands: 'commands')"
    def save():  # after every section: a run cut short keeps what it measured
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1) + "\n")
    base = "atlas bench" + (" --smoke" if smoke else "") + ("" if method == "steady" else f" --timing {method}")
    # the command that remakes this file's sections as they were run
    cmd = base if set(sections) == set(SECTIONS) else f"{base} --sections {','.join(s for s in SECTIONS if s in sections)}"
    best = impls[-1]
    if "layer" in sections:
        result["layer"] = bench_layer(B, T, H, D, chunk, dtype, device, impls)
        if "triton" in impls:
            result["layer"]["triton_vs_chunked_rel_err"] = kernel_error(B, T, H, D, chunk, device)
            # and at the 300M model's memory: chunks of 2048 over sub-chunks, Omega window 16
            result["layer"]["triton_vs_chunked_rel_err_chunk2048_w16"] = kernel_error(B, T, H, D, 2048, device, 16)
        result["timing"]["layer"] = method
        result["commands"]["layer"] = cmd
        save()
    if "scaling" in sections:
        result["scaling"], result["scaling_fixed_tokens"] = [], []
        # the layer section's faster mode; with no layer section in --out (--sections scaling alone),
        # CUDA graphs, its pick at every shape so far (benchmarks/README.md)
        picked = result.get("layer", {}).get("atlas_triton_mode", "graphs" if device.type == "cuda" else "compiled")
        mode = GRAPHS if picked == "graphs" else None
        result["timing"]["scaling"] = method
        result["commands"]["scaling"] = cmd
        done = {}  # (B, T) -> ms: the two series meet at the longest T (B = 1), timed once
        for t in Ts:
            # B=1 (the series), and B*T fixed at the longest T's tokens (FlashAttention's
            # benchmarks do the same): per-token time without the fixed cost of a small call
            for rows, b in (("scaling", 1), ("scaling_fixed_tokens", max(1, Ts[-1] // t))):
                if (b, t) not in done:
                    done[b, t] = layer_ms(b, t, H, D, best, chunk, dtype, device, mode)
                ms = done[b, t]
                row = {"T": t, "B": b, "ms": ms, "us_per_token": ms / (b * t) * 1e3, "impl": best, "mode": mode or "compiled"}
                if rows == "scaling" and device.type == "cuda":  # B=1 beside: device time alone, no host per call
                    row["captured_ms"] = layer_ms(b, t, H, D, best, chunk, dtype, device, capture=True)
                    row["captured_us_per_token"] = row["captured_ms"] / (b * t) * 1e3
                result[rows].append(row)
                save()  # each shape compiles from scratch (the section ran past 330 s on the H100): keep the rows so far
    if "model" in sections:
        result["model"] = bench_section_model(model_over, best, mB, mT, device, compile_model and device.type == "cuda")
        result["timing"]["model"] = method
        result["commands"]["model"] = cmd + ("" if compile_model else " --no-compile")
        save()
    if "decode" in sections:
        dec_over = model_over + [f"model.memory.impl={best}", f"model.attn_window={ctxs[0]}",
                                 f"model.max_seq_len={max(ctxs) + 1}", "train.seq_len=16"]
        result["decode"] = bench_decode("atlas_300m_omega", dec_over, ctxs, device)
        result["timing"]["decode"] = method
        result["commands"]["decode"] = cmd
        save()
    return result


def bench_section_model(model_over, best, mB, mT, device, compile_) -> dict:
    """Each model at its faster mode: per-block torch.compile, and the same with CUDA graphs."""
    over = model_over + [f"model.memory.impl={best}"]
    runs = {"compiled" if compile_ else "eager": bench_model("atlas_300m_omega", over, mB, mT, device, compile_)}
    if compile_:
        runs["graphs"] = bench_model("atlas_300m_omega", over, mB, mT, device, compile_, mode=GRAPHS)
    out = {"B": mB, "T": mT}
    for name in ("atlas", "transformer"):
        mode = max(runs, key=lambda m: runs[m][f"{name}_tok_s"])
        top = runs[mode]
        out[f"{name}_300m_tok_s"], out[f"{name}_300m_mfu"] = top[f"{name}_tok_s"], top.get(f"{name}_mfu")
        out[f"{name}_mode"] = mode if top[f"{name}_compiled"] else "eager"  # a failed compile ran eagerly
        for m, r in runs.items():
            out[f"{name}_{m}_tok_s"] = r[f"{name}_tok_s"]
            if f"{name}_compile_error" in r:
                out[f"{name}_{m}_error"] = r[f"{name}_compile_error"]
    out["ratio"] = out["atlas_300m_tok_s"] / out["transformer_300m_tok_s"]
    return out


def table(r: dict) -> str:
    methods = ", ".join(f"{sec} {m}" for sec, m in r.get("timing", {}).items())
    lines = [f"device {r['device']}, {r['dtype']}" + (f"; timed calls: {methods} (atlas/timing.py)" if methods else "")]
    L = r.get("layer")
    if L:
        lines += [f"memory layer B={L['B']} T={L['T']} H={L['H']} D={L['D']} chunk {L['chunk_size']}, forward+backward:",
                  "| what | ms | tokens/s |", "|---|---:|---:|"]
        # one row per timed mode, the headline marked; the headline's own copy ({prefix}_ms) is not repeated
        headline = {f"{p[:-len('_mode')]}_{m}" for p, m in L.items() if p.endswith("_mode")}
        lines += [f"| {k[:-3]}{' (headline)' if k[:-3] in headline else ''} | {L[k]:.2f} | {L[k[:-3] + '_tok_s']:,.0f} |"
                  for k in L if k.endswith("_ms") and k[:-3] + "_tok_s" in L and k[:-3] + "_mode" not in L]
        if L.get("atlas_triton_tok_s") and L.get("titans_pytorch_tok_s"):
            lines.append(f"layer vs titans-pytorch NeuralMemory (both with projections; titans-pytorch eager, as shipped): "
                         f"{L['atlas_triton_tok_s'] / L['titans_pytorch_tok_s']:.1f}x")
        if L.get("atlas_triton_tok_s"):
            lines.append(f"vs SDPA (q, k, v -> y): layer {L['atlas_triton_tok_s'] / L['sdpa_tok_s']:.2f}x, "
                         f"memory_scan alone {L.get('atlas_scan_tok_s', 0) / L['sdpa_tok_s']:.2f}x")
        cap = {k[:-len("_captured_ms")]: v for k, v in L.items() if k.endswith("_captured_ms")}
        if "atlas_triton" in cap:  # device time against device time
            vs = [f"titans-pytorch {cap['titans_pytorch'] / cap['atlas_triton']:.1f}x"] if "titans_pytorch" in cap else []
            if "sdpa" in cap:
                vs.append(f"SDPA: layer {cap['sdpa'] / cap['atlas_triton']:.2f}x"
                          + (f", memory_scan alone {cap['sdpa'] / cap['atlas_scan']:.2f}x" if "atlas_scan" in cap else ""))
            lines.append("each inside a captured step (device time alone): layer vs " + "; vs ".join(vs))
    m = r.get("model")
    if m:
        lines.append(f"300M train step (B={m['B']}, T={m['T']}): Atlas {m['atlas_300m_tok_s']:,.0f} tok/s, "
                     f"memory off {m['transformer_300m_tok_s']:,.0f} tok/s (ratio {m['ratio']:.2f})")
    if r.get("scaling"):
        lines.append("scaling, B=1 (us/token): " + ", ".join(f"T={s['T']}: {s['us_per_token']:.2f}" for s in r["scaling"]))
    if r.get("scaling") and "captured_us_per_token" in r["scaling"][0]:
        lines.append("scaling, B=1, inside a captured step (us/token): "
                     + ", ".join(f"T={s['T']}: {s['captured_us_per_token']:.3f}" for s in r["scaling"]))
    if r.get("scaling_fixed_tokens"):
        lines.append("scaling, B*T fixed (us/token): "
                     + ", ".join(f"T={s['T']}: {s['us_per_token']:.2f}" for s in r["scaling_fixed_tokens"]))
    if r.get("decode"):
        lines.append("decode (ms/token): " + ", ".join(f"{d['context']}: {d['ms_per_token']:.2f}" for d in r["decode"]))
        for way in ("graphs", "compiled_graphs", "eager"):
            if f"{way}_ms_per_token" in r["decode"][0]:
                lines.append(f"decode, {way} (ms/token): "
                             + ", ".join(f"{d['context']}: {d[f'{way}_ms_per_token']:.2f}" for d in r["decode"]))
    return "\n".join(lines)


def cmd_bench(args) -> None:
    sections = tuple(args.sections.split(",")) if args.sections else SECTIONS
    bad = set(sections) - set(SECTIONS)
    if bad:
        raise UserError(f"--sections: unknown {sorted(bad)}; choose from {', '.join(SECTIONS)}")
    if args.smoke and args.out is None:  # not benchmarks/results/: tiny shapes, any device
        raise UserError("bench --smoke: give --out, e.g. `atlas bench --smoke --out /tmp/bench.json`")
    if not args.smoke and not torch.cuda.is_available():  # hours of CPU time, and --out's GPU numbers replaced
        raise UserError("bench: no CUDA device here, and the benchmark's shapes (B=2, T=4096, a 300M model) "
                        "are for one GPU; run it on a GPU, or check the code path on CPU with "
                        "`atlas bench --smoke --out /tmp/bench.json`")
    out = args.out or default_out(torch.cuda.get_device_name())
    r = run(Path(out), args.smoke, sections, compile_model=not args.no_compile, method=args.timing)
    print(table(r))
    print(f"wrote {out}")


def add_bench_command(sub) -> None:
    p = sub.add_parser("bench", help="GPU benchmark: memory layer vs SDPA vs titans-pytorch, model, scaling, decode")
    p.add_argument("--out", help="the JSON to write (default: benchmarks/results/<GPU model>.json, "
                                 "e.g. h100.json on an H100)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, any device (checks the code path)")
    p.add_argument("--sections", help=f"comma-separated subset of {','.join(SECTIONS)}; others are kept from --out")
    p.add_argument("--no-compile", action="store_true", help="time the 300M step eagerly")
    p.add_argument("--timing", choices=timing.METHODS, default="steady",
                   help="steady: timed calls back to back, as training runs them (default); "
                        "synced: the host waits for each call (atlas/timing.py)")
    p.set_defaults(fn=cmd_bench)
