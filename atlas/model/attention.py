"""Causal self-attention with RoPE through SDPA, optionally a sliding window, with a KV cache."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class KVCache:
    k: torch.Tensor  # (B, H, L, D), rotated
    v: torch.Tensor  # (B, H, L, D)
    pos: int | torch.Tensor  # absolute position of the next token (a 0-dim tensor in a CUDA-graph decoder)
    # a CUDA-graph decoder's cache of fixed length (decode.StaticDecoder): which rows hold keys (L,);
    # the rest are padding, masked out, until the steps fill them
    valid: torch.Tensor | None = None


def rope(xs: tuple[torch.Tensor, ...], pos0: int | torch.Tensor, theta: float) -> tuple[torch.Tensor, ...]:
    """Rotate pairs of each x (B, H, T, D) by their absolute positions pos0 .. pos0+T-1; the
    angles are computed once for all of xs (q and k). pos0 may be a 0-dim tensor, so a step
    replayed from a CUDA graph reads its position from the device."""
    T, D = xs[0].shape[-2], xs[0].shape[-1]
    dev = xs[0].device
    inv_freq = theta ** (-torch.arange(0, D, 2, device=dev, dtype=torch.float32) / D)  # (D/2,)
    pos = torch.arange(T, device=dev, dtype=torch.float32) + pos0  # (T,): exact integers below 2**24
    ang = pos[:, None] * inv_freq  # (T, D/2)
    work = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    cos, sin = ang.cos().to(work), ang.sin().to(work)

    def rotate(x):
        x1, x2 = x.to(work).unflatten(-1, (D // 2, 2)).unbind(-1)  # (B, H, T, D/2) each
        return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).to(x.dtype)
    return tuple(rotate(x) for x in xs)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, window: int | None, rope_theta: float):
        super().__init__()
        self.H, self.D = n_heads, d_model // n_heads
        self.window = window
        self.rope_theta = rope_theta
        self.w_qkv = nn.Linear(d_model, 3 * d_model, bias=False)  # fused q, k, v
        self.w_out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, window: int | None = None):
        """window: this call's sliding window (a randomized-window training step); default self.window."""
        B, T, C = x.shape
        window = window or self.window
        pos0 = cache.pos if cache is not None else 0
        q, k, v = self.w_qkv(x).view(B, T, 3, self.H, self.D).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, D)
        q, k = rope((q, k), pos0, self.rope_theta)
        if cache is not None:
            k, v = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)  # (B, H, L+T, D)
        L = k.shape[2]
        valid = None  # a fixed-length cache's (CUDA-graph decoder's): which of the L keys are real
        if cache is not None and cache.valid is not None:
            if T != 1:
                raise ValueError(f"a fixed-length (CUDA-graph decoder's) attention cache takes one token a call, not {T}")
            valid = torch.cat([cache.valid, cache.valid.new_ones(T)])  # (L,): its length is within the window
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[None, :])  # (T=1, L)
        elif cache is None and (window is None or window >= T):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        elif T == 1 and (window is None or L <= window):  # decoding: every cached key is visible
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            i = torch.arange(L - T, L, device=x.device)[:, None]  # query positions within the keys
            j = torch.arange(L, device=x.device)[None, :]
            mask = j <= i
            if window is not None:
                mask = mask & (i - j < window)  # a token sees itself and window-1 before it
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if valid is not None:  # the length stays fixed: the oldest row goes
            keep = L - T
        else:
            keep = L if self.window is None else min(L, self.window - 1)
        new_cache = KVCache(k=k[:, :, L - keep:], v=v[:, :, L - keep:], pos=pos0 + T,
                            valid=None if valid is None else valid[L - keep:])
        return self.w_out(y.transpose(1, 2).reshape(B, T, C)), new_cache
