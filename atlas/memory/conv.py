"""The short causal depthwise conv on q, k, v, with its SiLU: y[t] = silu(sum_j P[t + j] w[:, j]),
P = halo ++ x (the K-1 rows before the call, zeros at the sequence start).

`conv_silu` is one function with two implementations: K shifted multiply-adds in PyTorch (any
device; the twin) and, on CUDA with impl="triton", Triton kernels (triton_conv.py) that read x
once forward and once backward. In the 300M step the PyTorch form's compiled kernels took
~0.45 ms a layer forward + backward (benchmarks/profile_step.py).

`norm=(cols, group)` also L2-normalises the first `cols` channels in groups of `group` (the
memory's query and key heads) after the SiLU. The kernels do it inside the tile they already
hold, where a group fits one (a power of two up to triton_conv.BC channels); otherwise it is a
separate `l2_groups` in PyTorch, the same function.
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


def l2_groups(y: torch.Tensor, cols: int, group: int) -> torch.Tensor:
    """y (..., C) with its first `cols` channels L2-normalised in groups of `group` (in float32,
    as autocast runs F.normalize), in y's dtype."""
    if not cols:
        return y
    head = F.normalize(y[..., :cols].unflatten(-1, (cols // group, group)).float(), dim=-1)
    return torch.cat([head.flatten(-2).to(y.dtype), y[..., cols:]], dim=-1)


def conv_silu(x: torch.Tensor, w: torch.Tensor | None, halo: torch.Tensor | None, triton: bool = False,
              norm: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """The conv (none when w is None) and SiLU, then l2_groups(., *norm); triton=True takes the
    kernels where they run (CUDA, or the interpreter) and take the width (up to
    triton_conv.MAX_K taps; the default conv_size is 4)."""
    cols, group = norm
    if cols % group:
        raise ValueError(f"conv_silu: {cols} normalised channels are not whole groups of {group}")
    if w is None:
        return l2_groups(F.silu(x), cols, group)
    if triton and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        from .triton_conv import BC, MAX_K, conv_silu_triton
        if w.shape[1] <= MAX_K:
            fused = group <= BC and group & (group - 1) == 0  # a group is inside one tile
            y = conv_silu_triton(x, w, halo, (cols, group) if fused else (0, 1))
            return y if fused else l2_groups(y, cols, group)
    return l2_groups(conv_silu_torch(x, w, halo), cols, group)
