"""`MemoryLayer`: the module that turns hidden states into memory_scan's inputs and back."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from ..config import MemoryConfig
from .chunked import log_gates
from .conv import conv_silu
from .scan import memory_scan
from .state import MemoryState, apply_poly, clamp_norm, last_rows, newton_schulz5
from .step import Running, memory_step


@dataclass
class MemoryLayerState:
    """What a later call needs to continue the sequence as one call over all of it would.

    Chunks are aligned to the sequence start, and inside a chunk every token's gradient is taken
    at the chunk-start memory. So a call that ends mid-chunk keeps that chunk's start state and
    its tokens' scan inputs; a later call of several tokens re-runs the open chunk from there,
    and a single token takes one O(1) step of the same recurrence (step.py). Decoding is then
    the function training computed, not a different one with per-token chunks, whose memory
    drifts from what training wrote -- and diverges outright with the large learning rates
    training tolerates in chunks.
    """
    memory: MemoryState  # after every token so far, M clamped (what the per-layer stats read)
    conv: torch.Tensor | None  # (B, conv_size-1, C): the conv's input halo
    chunk_start: MemoryState | None = None  # at the open chunk's first token
    # the open chunk's scan inputs (q, k, v, alpha, eta, theta, gamma), each (B, n_i, ...), in the
    # pieces they came in: a decoding step appends its token instead of copying the chunk so far
    pending: list | None = None
    running: Running | None = None  # the open chunk's unclamped M and seen momentum (for the step)
    open_len: int = 0  # tokens in the open chunk


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
        p, seed = cfg.poly_degree, cfg.features == "seed"
        self.poly = nn.Parameter(torch.tensor([1 / math.factorial(i) for i in range(1, p + 1)])) if p and not seed else None
        # the seed's phi: [a_0, a_1 x, ..., a_p x^p] side by side, applied before the scan (poly None there)
        self.seed_phi = nn.Parameter(torch.tensor([1 / math.factorial(i) for i in range(p + 1)])) if seed else None
        self.out_norm = None if seed else nn.RMSNorm(self.Dv, eps=1e-5)
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
        conv_state, w, halo = None, None, None
        if self.seed_phi is not None:  # the seed's features: raw q, k, v (no conv, SiLU or norm)
            q, k, v = qkv.split([H * Dk, H * Dk, H * Dv], dim=-1)
            q, k = (self._seed_features(t.view(B, T, H, Dk)) for t in (q, k))  # (B, T, H, Dk (p+1))
            return self._memory(x, (q, k, v.view(B, T, H, Dv)), state, conv_state)
        if self.conv is not None:
            K = self.conv.kernel_size[0]
            halo = state.conv if state is not None else qkv.new_zeros(B, K - 1, qkv.shape[-1])
            conv_state = last_rows(halo.to(qkv.dtype), qkv, K - 1)  # (B, K-1, C), for the next call
            w = self.conv.weight[:, 0]
        # (B, T, C): conv, SiLU and unit-norm query and key heads, in the projection's dtype (bf16
        # q, k, v are what the Triton kernels read at full tensor-core rate); with the Triton scan
        # one pass of the conv's kernels
        qkv = conv_silu(qkv, w, halo, triton=self.impl == "triton", norm=(2 * H * Dk, Dk))
        q, k, v = qkv.split([H * Dk, H * Dk, H * Dv], dim=-1)
        return self._memory(x, (q.view(B, T, H, Dk), k.view(B, T, H, Dk), v.view(B, T, H, Dv)), state, conv_state)

    def _seed_features(self, x: torch.Tensor) -> torch.Tensor:
        """(..., Dk) -> (..., Dk (p+1)): [a_0, a_1 x, ..., a_p x^p], the seed's polynomial features."""
        return torch.cat([a * x ** i for i, a in enumerate(self.seed_phi)], dim=-1).to(x.dtype)

    def _memory(self, x: torch.Tensor, qkv: tuple, state: MemoryLayerState | None, conv_state):
        """The scan (or a decoding step) over q, k (B, T, H, Dk'), v (B, T, H, Dv) and the gates
        from x; returns the output (B, T, d_model) and the state to continue from."""
        B, T, _ = x.shape
        H, c = self.H, self.cfg
        q, k, v = qkv
        gate_dtype = torch.promote_types(x.dtype, torch.float32)  # bf16 logits would quantise the decays
        gates = torch.sigmoid(self.w_gates(x).to(gate_dtype)).view(B, T, H, 4)  # (B, T, H, 4)
        alpha, eta, theta, gamma = gates.unbind(-1)
        theta = theta * c.max_lr
        if c.rule == "gd":
            eta = torch.zeros_like(eta)  # no momentum: S_t = -theta_t grad
        ins = (q, k, v, alpha, eta, theta, gamma)
        if c.detach_writes:  # the seed's memory: what it writes learns nothing from the loss
            ins = (q,) + tuple(x.detach() for x in ins[1:])
        if T == 1 and state is not None:  # decoding: one O(1) step
            y, new_state = self._step(ins, state)  # y (B, 1, H, Dv)
        else:
            y, new_state = self._scan(ins, state)  # y (B, T, H, Dv)
        if c.read_after_write:  # the seed's read: the memory after this call's last write, for every token
            dt = torch.promote_types(q.dtype, torch.float32)
            y = torch.einsum("bthk,bhvk->bthv", apply_poly(q.to(dt), self.poly), new_state.memory.M.to(dt))
        # per-head norm (in float32: with a float32 weight and bf16 input RMSNorm takes a slow
        # unfused path), then heads side by side
        if self.out_norm is not None:
            y = self.out_norm(y.float())
        y = y.to(x.dtype).reshape(B, T, H * self.Dv)
        new_state.conv = conv_state
        return self.w_out(y), new_state

    def _scan(self, ins: tuple, state: MemoryLayerState | None):
        """memory_scan over this call's tokens, continuing an open chunk if the state has one.
        ins: q, k (B, T, H, Dk), v (B, T, H, Dv), alpha, eta, theta, gamma (B, T, H).
        Returns y (B, T, H, Dv) and the new state (its conv halo left for the caller)."""
        c, C, T = self.cfg, self.chunk_size, ins[0].shape[1]
        start = None if state is None else state.memory
        if state is not None and state.pending is not None:
            start = state.chunk_start
            ins = tuple(torch.cat([p.to(x.dtype) for p in ps] + [x], dim=1) for ps, x in zip(zip(*state.pending), ins))
        n = ins[0].shape[1]
        cut = n // C * C  # the closed chunks; the rest stays open

        def scan(lo, hi, st, max_norm):
            return memory_scan(
                *(x[:, lo:hi] for x in ins), chunk_size=C, window=c.context_window, poly=self.poly, state=st,
                impl=self.impl, huber_delta=self._huber, max_norm=max_norm, muon=c.rule == "muon")
        ys, closed = [], start
        if cut:
            y, closed = scan(0, cut, start, c.max_norm)
            ys.append(y)
        after, running = closed, None
        if n > cut or not cut:  # the open rest; an empty call also lands here (empty y, state kept)
            # unclamped: max_norm acts when a chunk closes, and the decoding step continues this M
            y, after = scan(cut, n, closed, None)
            ys.append(y)
            S_seen = after.S
            if c.rule == "muon" and closed is not None:  # M saw momentum NS5(S_ref), decayed by the etas
                alpha, eta = (x[:, cut:].to(after.S.dtype) for x in ins[3:5])
                decay = torch.exp(log_gates(alpha, eta)[1].sum(1))[..., None, None]  # (B, H, 1, 1): prod of etas
                S_seen = S_seen + decay * (newton_schulz5(closed.S) - closed.S)
            running = Running(after.M, S_seen)
            after = replace(after, M=clamp_norm(after.M, c.max_norm))
        y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)
        pending = [tuple(x[:, cut:] for x in ins)] if n > cut else None
        if pending and closed is None:  # the sequence's first chunk is open: it started from zeros
            B, _, H, Dk = ins[0].shape
            closed = MemoryState.zeros(B, H, Dk, self.Dv, c.context_window, after.M.dtype, after.M.device)
        return y[:, n - T:], MemoryLayerState(after, None, closed, pending, running if pending else None, n - cut)

    @property
    def _huber(self):
        return self.cfg.huber_delta if self.cfg.bias == "huber" else None

    def _step(self, ins: tuple, state: MemoryLayerState):
        """One token (T = 1) continuing `state`, equal to _scan's result on it (step.py)."""
        c, C = self.cfg, self.chunk_size
        q = ins[0]
        if state.pending is None:  # the token opens a chunk
            ref, n_open = state.memory, 0
            run = Running(ref.M, newton_schulz5(ref.S) if c.rule == "muon" else ref.S)
        else:
            ref, n_open, run = state.chunk_start, state.open_len, state.running
        poly = None if self.poly is None else self.poly.to(ref.M.dtype)
        y, after, run = memory_step(*(x[:, 0] for x in ins), ref=ref, now=state.memory, run=run,
                                    window=c.context_window, poly=poly, huber_delta=self._huber)
        after = replace(after, M=clamp_norm(after.M, c.max_norm))
        y = y[:, None].to(q.dtype)  # (B, 1, H, Dv)
        if n_open + 1 == C:  # the chunk closes: the next token starts from here
            return y, MemoryLayerState(after, None, after, None, None)
        pending = [ins] if state.pending is None else state.pending + [ins]  # a new list: `state` stays valid
        return y, MemoryLayerState(after, None, ref, pending, run, n_open + 1)
