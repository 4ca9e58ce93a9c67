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
"""
from __future__ import annotations

import argparse

import torch

from scan_kernels import scan_call, shape  # benchmarks/, this script's folder

from atlas.bench import autotune_picks
from atlas.timing import gpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="2,4096,64,1", type=shape, help="B,T,chunk,window (default: atlas bench's layer)")
    a = ap.parse_args()
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
