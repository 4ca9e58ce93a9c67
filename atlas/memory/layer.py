"""`MemoryLayer`: the module that turns hidden states into memory_scan's inputs and back."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import MemoryConfig
from .scan import memory_scan
from .state import MemoryState


@dataclass
class MemoryLayerState:
    """What a later call needs to continue the sequence as one call over all of it would.

    Chunks are aligned to the sequence start, and inside a chunk every token's gradient is taken
    at the chunk-start memory. So a call that ends mid-chunk keeps that chunk's start state and
    its tokens' scan inputs; the next call re-runs the open chunk from there. Token-by-token
    decoding is then the function training computed (re-running up to chunk_size - 1 tokens a
    step), not a different one with per-token chunks, whose memory drifts from what training
    wrote -- and diverges outright with the large learning rates training tolerates in chunks.
    """
    memory: MemoryState  # after every token so far (what the per-layer stats read)
    conv: torch.Tensor | None  # (B, conv_size-1, C): the conv's input halo
    chunk_start: MemoryState | None = None  # at the open chunk's first token (None: zeros)
    pending: tuple | None = None  # the open chunk's scan inputs q, k, v, alpha, eta, theta, gamma (B, n, ...)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


class MemoryLayer(nn.Module):
    def __init__(self, d_model: int, cfg: MemoryConfig):
        super().__init__()
        self.cfg = cfg
        self.H = cfg.heads
        self.Dk, self.Dv = cfg.d_key // cfg.heads, cfg.d_value // cfg.heads
        self.chunk_size = cfg.chunk_size  # a training stage may change it
        self.impl = cfg.impl
        qkv_dim = 2 * cfg.d_key + cfg.d_value
        self.w_qkv = nn.Linear(d_model, qkv_dim, bias=False)  # fused q, k, v projection
        # depthwise causal conv: weight (C, 1, K); padding is done by hand so decoding can carry it
        self.conv = nn.Conv1d(qkv_dim, qkv_dim, cfg.conv_size, groups=qkv_dim, bias=False) if cfg.conv_size else None
        # gates alpha, eta, theta, gamma for each head, from the input
        self.w_gates = nn.Linear(d_model, 4 * self.H)
        p = cfg.poly_degree
        self.poly = nn.Parameter(torch.tensor([1 / math.factorial(i) for i in range(1, p + 1)])) if p else None
        self.out_norm = nn.RMSNorm(self.Dv, eps=1e-5)
        self.w_out = nn.Linear(cfg.d_value, d_model, bias=False)
        self.reset_gates()

    @torch.no_grad()
    def reset_gates(self):
        c = self.cfg
        self.w_gates.weight.normal_(0, 0.02)
        init = torch.tensor([_logit(c.alpha_init), _logit(c.eta_init), _logit(c.theta_init / c.max_lr),
                             _logit(c.gamma_init)])
        self.w_gates.bias.copy_(init.repeat(self.H))  # laid out (H, 4)

    def forward(self, x: torch.Tensor, state: MemoryLayerState | None = None):
        B, T, _ = x.shape
        H, Dk, Dv, c = self.H, self.Dk, self.Dv, self.cfg
        qkv = self.w_qkv(x)  # (B, T, 2*H*Dk + H*Dv)
        conv_state = None
        if self.conv is not None:
            K = self.conv.kernel_size[0]
            halo = state.conv if state is not None else qkv.new_zeros(B, K - 1, qkv.shape[-1])
            padded = torch.cat([halo.to(qkv.dtype), qkv], dim=1)  # (B, K-1+T, C)
            conv_state = padded[:, padded.shape[1] - (K - 1):]
            # the conv as K shifted multiply-adds in (B, T, C): Conv1d would work channels-first and
            # hand back q, k, v with a stride-T last dim, which made every later op (normalise,
            # the scan's gathers, their backward) a strided copy -- 3x the layer's kernel time
            w = self.conv.weight[:, 0].to(qkv.dtype)  # (C, K)
            qkv = sum(padded[:, j:j + T] * w[:, j] for j in range(K))  # (B, T, C)
        qkv = F.silu(qkv)
        q, k, v = qkv.split([H * Dk, H * Dk, H * Dv], dim=-1)
        # back to the projection's dtype: autocast runs normalize in float32, and bf16 q, k, v are
        # what the Triton kernels read at full tensor-core rate
        q = F.normalize(q.view(B, T, H, Dk), dim=-1).to(qkv.dtype)  # (B, T, H, Dk)
        k = F.normalize(k.view(B, T, H, Dk), dim=-1).to(qkv.dtype)  # (B, T, H, Dk)
        v = v.view(B, T, H, Dv)  # (B, T, H, Dv)

        gate_dtype = torch.promote_types(x.dtype, torch.float32)  # bf16 logits would quantise the decays
        gates = torch.sigmoid(self.w_gates(x).to(gate_dtype)).view(B, T, H, 4)  # (B, T, H, 4)
        alpha, eta, theta, gamma = gates.unbind(-1)
        theta = theta * c.max_lr
        if c.rule == "gd":
            eta = torch.zeros_like(eta)  # no momentum: S_t = -theta_t grad
        y, memory, chunk_start, pending = self._scan((q, k, v, alpha, eta, theta, gamma), state)  # y (B, T, H, Dv)
        # per-head norm (in float32: with a float32 weight and bf16 input RMSNorm takes a slow
        # unfused path), then heads side by side
        y = self.out_norm(y.float()).to(x.dtype).reshape(B, T, H * Dv)
        return self.w_out(y), MemoryLayerState(memory, conv_state, chunk_start, pending)

    def _scan(self, ins: tuple, state: MemoryLayerState | None):
        """memory_scan over this call's tokens, continuing an open chunk if the state has one.
        ins: q, k (B, T, H, Dk), v (B, T, H, Dv), alpha, eta, theta, gamma (B, T, H).
        Returns y (B, T, H, Dv), the memory after every token, the memory at the open chunk's
        start, and the open chunk's inputs (None when no chunk is open)."""
        c, C, T = self.cfg, self.chunk_size, ins[0].shape[1]
        start = None if state is None else state.memory
        if state is not None and state.pending is not None:
            start = state.chunk_start
            ins = tuple(torch.cat([p.to(x.dtype), x], dim=1) for p, x in zip(state.pending, ins))
        n = ins[0].shape[1]
        cut = n // C * C  # the closed chunks; the rest stays open

        def scan(lo, hi, st):
            return memory_scan(
                *(x[:, lo:hi] for x in ins), chunk_size=C, window=c.context_window, poly=self.poly, state=st,
                impl=self.impl, huber_delta=c.huber_delta if c.bias == "huber" else None, max_norm=c.max_norm,
                muon=c.rule == "muon")
        ys, closed = [], start
        if cut:
            y, closed = scan(0, cut, start)
            ys.append(y)
        after = closed
        if n > cut or not cut:  # the open rest; an empty call also lands here (empty y, state kept)
            y, after = scan(cut, n, closed)
            ys.append(y)
        y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)
        pending = tuple(x[:, cut:] for x in ins) if n > cut else None
        return y[:, n - T:], after, closed, pending
