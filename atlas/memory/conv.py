"""The short causal depthwise conv on q, k, v, with its SiLU: y[t] = silu(sum_j P[t + j] w[:, j]),
P = halo ++ x (the K-1 rows before the call, zeros at the sequence start).

`conv_silu` is one function with two implementations: K shifted multiply-adds in PyTorch (any
device; the twin) and, on CUDA with impl="triton", Triton kernels (triton_conv.py) that read x
once forward and twice backward. In the 300M step the PyTorch form's compiled kernels took
~0.45 ms a layer forward + backward (benchmarks/profile_step.py).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F


def conv_silu_torch(x: torch.Tensor, w: torch.Tensor, halo: torch.Tensor) -> torch.Tensor:
    """x (B, T, C), w (C, K), halo (B, K-1, C) -> (B, T, C) in x's dtype.

    In (B, T, C) on purpose: Conv1d works channels-first and hands back a stride-T last dim, which
    made every later op (normalise, the scan's gathers, their backward) a strided copy."""
    T, K = x.shape[1], w.shape[1]
    padded = torch.cat([halo.to(x.dtype), x], dim=1)  # (B, K-1+T, C)
    w = w.to(x.dtype)
    return F.silu(sum(padded[:, j:j + T] * w[:, j] for j in range(K)))


def conv_silu(x: torch.Tensor, w: torch.Tensor, halo: torch.Tensor, triton: bool = False) -> torch.Tensor:
    """The conv and SiLU; triton=True takes the kernels where they run (CUDA, or the interpreter)
    and take the width (up to triton_conv.MAX_K taps; the default conv_size is 4)."""
    if triton and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        from .triton_conv import MAX_K, conv_silu_triton
        if w.shape[1] <= MAX_K:
            return conv_silu_triton(x, w, halo)
    return conv_silu_torch(x, w, halo)
