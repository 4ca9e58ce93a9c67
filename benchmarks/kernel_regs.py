"""Registers and spills of the scan kernels, compiled for an H100 (sm_90) on any machine with
Triton: its wheel carries ptxas and cuobjdump, so no GPU is needed. Spills (a stack frame) and
255 registers a thread mean one program per multiprocessor and local-memory traffic; read them
here before spending GPU time on a kernel change.

    python3 benchmarks/kernel_regs.py                         # every kernel, BV 16/32/64, 4 and 8 warps
    python3 benchmarks/kernel_regs.py --kernels _bwd_k --bv 32 --shape 64,64,128,128
    python3 benchmarks/kernel_regs.py --kernels _fwd_state,_bwd_state --bv 8 --warps 4 --loop

--loop also counts the instructions of each kernel's longest loop (the sequential passes' walk over
sub-chunks): all of them, the integer ones that compute addresses (IMAD, IADD3, LEA), barriers and
tensor-core products. Another checkout's kernels: PYTHONPATH=that/checkout (this script reads
atlas.memory.triton_kernels from the path).

Shapes are the kernels' constexprs BT,BL,BK,DV (default: the layer's chunk 64 with 128-wide heads);
pointers are taken 16-byte aligned and DK, DV, W1 divisible by 16, as a launch specialises them.
The GPU machine's Triton may allocate differently from this one's (same sm_90 target).
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile

# compile the kernels (the CPU tests interpret them): unset before Triton is imported, which
# decorates its own library's functions by it (interpreted ones failed a compile in one CI run)
os.environ.pop("TRITON_INTERPRET", None)
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from scan_kernels import ints  # noqa: E402  (benchmarks/, this script's folder)

from atlas.memory import triton_kernels as kern  # noqa: E402

BF, F32, I32 = "*bf16", "*fp32", "*i32"
# pointer arguments (bf16 q, k, v as in training; gates, G and per-row factors float32); every
# other argument is an i32 scalar or a constexpr
POINTERS = dict(Q=BF, K=BF, V=BF, ES=BF, AS=BF, MS=BF, SS=BF, DME=BF, DSE=BF, DVB=BF, DY=BF, DQ=BF, DKK=BF, DA=BF,
                Y=BF, G=F32, P=F32, F=F32, GL=F32, CS=F32, LAST=F32, M0=F32, S0=F32, MOUT=F32, SOUT=F32, DMOUT=F32,
                DSOUT=F32, DM0=F32, DS0=F32, DG=F32, DP=F32, DF=F32, DGL=F32, DCS=F32, DLAST=F32,
                REF=I32, QSTART=I32, QLEN=I32)
DIVISIBLE = ("DK", "DV", "W1")  # 128, 128, 0 at the layer's shape
FLAGS = dict(HUBER=False, BIG=False, PREC="tf32")
TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def source(fn, consts: dict) -> ASTSource:
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        sig[name] = POINTERS.get(name, "fp32" if name == "delta" else "i32")
        if sig[name].startswith("*") or name in DIVISIBLE:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)


def cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([os.path.join(TOOLS, "cuobjdump"), flag, f.name],
                              capture_output=True, text=True, check=True).stdout


def usage(cubin: bytes) -> str:
    out = cuobjdump(cubin, "--dump-resource-usage")
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return f"{m.group(1)} registers, {m.group(2)} bytes of stack" if m else out.strip()[-200:]


def loop(cubin: bytes) -> str:
    """Opcode counts of the longest loop in the SASS: from a backward branch's target to it."""
    lines = cuobjdump(cubin, "--dump-sass").splitlines()
    at = {int(m.group(1), 16): i for i, m in ((i, re.search(r"/\*([0-9a-f]{4,})\*/", x)) for i, x in enumerate(lines)) if m}
    spans = [(at[t], i) for i, x in enumerate(lines) for m in [re.search(r"@!?P\d BRA 0x([0-9a-f]+)", x)]
             if m and (t := int(m.group(1), 16)) in at and at[t] < i]
    if not spans:
        return "no loop"
    lo, hi = max(spans, key=lambda s: s[1] - s[0])
    ops = [re.sub(r"^.*?\*/\s+(@!?U?P\w+\s+)?", "", x).split()[0].split(".")[0]
           for x in lines[lo:hi + 1] if re.search(r"/\*[0-9a-f]{4,}\*/\s+\S", x)]
    n = lambda *o: sum(op in o for op in ops)  # noqa: E731
    return (f"loop {len(ops)} instructions ({n('IMAD', 'IADD3', 'LEA')} IMAD/IADD3/LEA, {n('BAR')} barriers, "
            f"{n('HMMA')} HMMA)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", default="_fwd_state,_fwd_out,_bwd_state,_bwd_q,_bwd_k")
    ap.add_argument("--bv", default="16,32,64", type=ints, help="value-row blocks to compile")
    ap.add_argument("--warps", default="4,8", type=ints)
    ap.add_argument("--shape", default="64,64,128,128", type=ints, help="BT,BL,BK,DV")
    ap.add_argument("--loop", action="store_true", help="also count the instructions of the longest loop")
    a = ap.parse_args()
    if len(a.shape) != 4:
        ap.error(f"--shape: want four numbers BT,BL,BK,DV, got {len(a.shape)}")
    BT, BL, BK, DV = a.shape
    for name in a.kernels.split(","):
        fn = getattr(kern, name, None)
        if fn is None:
            sys.exit(f"kernel_regs.py: no kernel {name!r} in atlas/memory/triton_kernels.py")
        fn = fn.fn  # the @triton.jit function under the autotuner
        for bv, warps in itertools.product(a.bv, a.warps):
            consts = {k: v for k, v in {**FLAGS, "BT": BT, "BL": BL, "BK": BK, "BV": bv}.items()
                      if k in fn.arg_names}
            try:
                c = triton.compile(source(fn, consts), target=GPUTarget("cuda", 90, 32),
                                   options={"num_warps": warps, "num_stages": 2})
            except triton.CompilationError as e:  # e.g. a block under tl.dot's 16 rows of K
                while e.__cause__ is not None:  # the innermost error says why
                    e = e.__cause__
                print(f"{name} BV={bv} warps={warps}: does not compile ({str(e).strip()[:100]})")
                continue
            print(f"{name} BV={bv} warps={warps}: {usage(c.asm['cubin'])}, "
                  f"{c.metadata.shared / 1024:.0f} KiB shared" + (f"; {loop(c.asm['cubin'])}" if a.loop else ""),
                  flush=True)


if __name__ == "__main__":
    main()
