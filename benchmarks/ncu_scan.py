"""One memory_scan forward + backward under Nsight Compute: why each scan kernel takes its time
(occupancy, registers, stall reasons, bytes moved). A warm call first compiles and tunes the
kernels; only the second call is profiled. Under ncu the autotuner tunes again (Triton's disk
cache of its picks did not carry over from a run without ncu, 2026-11-27) with every launch
serialised by ncu, so its picks can differ from a plain run's: the script prints them last; run it
without ncu too to see the plain picks.

    python3 benchmarks/ncu_scan.py --shape 2,4096,64,1           # the plain picks
    ncu --profile-from-start off --clock-control none --kernel-name regex:'^_(fwd|bwd)_' \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --section MemoryWorkloadAnalysis --section SchedulerStats python3 benchmarks/ncu_scan.py --shape 2,4096,64,1

Where one kernel's warps wait, per instruction (ncu's sampled stall reasons, its source page as
CSV), summed by reason and by opcode, with the instructions that wait most:

    ncu --profile-from-start off --clock-control none -k regex:'^_fwd_state' -c 1 --section WarpStateStats \
        --section SourceCounters --page source --print-source sass --csv \
        python3 benchmarks/ncu_scan.py --shape 1,32768,64,1 > fwd_state.csv
    python3 benchmarks/ncu_scan.py --stalls fwd_state.csv
"""
from __future__ import annotations

import argparse
import collections
import csv
import sys

import torch

from scan_kernels import scan_call, shape  # benchmarks/, this script's folder

from atlas.bench import autotune_picks
from atlas.timing import gpu


def stalls(path: str, top: int = 12) -> None:
    """Print the stall samples of ncu's source page (CSV) by reason, by opcode and by instruction."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except OSError as e:
        sys.exit(f"ncu_scan.py --stalls: cannot read {path}: {e.strerror}")
    at = next((i for i, r in enumerate(rows) if r[:1] == ["Address"]), None)  # past ncu's and the script's log lines
    if at is None or "Warp Stall Sampling (All Samples)" not in rows[at]:
        sys.exit(f"ncu_scan.py --stalls: {path} holds no source page with stall samples: make it with the "
                 "ncu command in this script's docstring (--section SourceCounters --page source --csv)")
    head, rows = rows[at], [r for r in rows[at + 1:] if len(r) == len(rows[at])]
    col = {h: i for i, h in enumerate(head)}
    num = lambda r, h: float(r[col[h]] or 0)  # noqa: E731
    total = sum(num(r, "Warp Stall Sampling (All Samples)") for r in rows) or 1.0  # none sampled: shares of 0
    reasons = [h for h in head if h.startswith("stall_") and not h.endswith("(Not Issued)")]
    print(f"{path}: {int(total)} samples over {len(rows)} instructions")
    for h in sorted(reasons, key=lambda h: -sum(num(r, h) for r in rows)):
        share = sum(num(r, h) for r in rows) / total
        if share >= 0.005:
            print(f"  {h[6:]:18} {share:6.1%}")
    ops = collections.Counter()
    for r in rows:
        words = r[col["Source"]].split()
        op = words[1] if words[0].startswith("@") else words[0]  # past a predicate
        ops[op.split(".")[0]] += num(r, "Warp Stall Sampling (All Samples)") / total
    print("  by opcode: " + ", ".join(f"{op} {v:.1%}" for op, v in ops.most_common(10)))
    for r in sorted(rows, key=lambda r: -num(r, "Warp Stall Sampling (All Samples)"))[:top]:
        why = max(reasons, key=lambda h: num(r, h))
        print(f"  {num(r, 'Warp Stall Sampling (All Samples)') / total:6.1%} {why[6:]:10} {r[col['Source']][:60]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="2,4096,64,1", type=shape, help="B,T,chunk,window (default: atlas bench's layer)")
    ap.add_argument("--stalls", metavar="CSV", help="summarise ncu's source page of one kernel instead (see above)")
    a = ap.parse_args()
    if a.stalls:
        return stalls(a.stalls)
    call = scan_call(*a.shape, gpu("ncu_scan.py"))
    call()  # compiles and tunes
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    call()  # the profiled one
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print("autotuned:", autotune_picks())


if __name__ == "__main__":
    main()
