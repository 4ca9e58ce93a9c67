"""One Atlas block (DESIGN.md §2):

    h  = x + mix(attn(norm(x)), memory(norm(x)))      mix = g * rms(mem) + (1 - g) * rms(attn)
    x' = h + mlp(norm(h))                              g = floor + (1 - floor) * sigmoid(w)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import GateConfig, ModelConfig
from ..memory.layer import MemoryLayer, MemoryLayerState
from .attention import Attention, KVCache


class GateMode(IntEnum):
    """Episodic training (the seed's follow-up): per token, what the mixing gate may do."""
    NORMAL = 0  # the learned gate
    STORAGE = 1  # facts are being written: g >= gate.storage_gate
    RETRIEVAL = 2  # facts are queried beyond the attention window: g >= gate.retrieval_floor


@dataclass
class BlockState:
    attn: KVCache
    memory: MemoryLayerState | None


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w_in = nn.Linear(d_model, 2 * d_ff, bias=False)  # fused gate and up projections
        self.w_out = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        a, b = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(F.silu(a) * b)


class MixGate(nn.Module):
    """The attention/memory gate: a scalar per layer, or per channel from the block's input
    (`channel`) or from both branches' outputs side by side (`branches`: the seed's gate,
    sigmoid(W [mem, attn] + b))."""

    def __init__(self, d_model: int, cfg: GateConfig):
        super().__init__()
        self.cfg = cfg
        w0 = math.log((cfg.init - cfg.floor) / (1 - cfg.init))  # sigmoid(w0) maps to g = init
        if cfg.kind == "scalar":
            self.w = nn.Parameter(torch.tensor(w0))
        else:
            self.proj = nn.Linear(2 * d_model if cfg.kind == "branches" else d_model, d_model)
            nn.init.zeros_(self.proj.weight)  # start input-independent, at exactly `init`
            nn.init.constant_(self.proj.bias, w0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C) the block's normed input, or (B, T, 2C) both branches for `branches`."""
        logit = self.w if self.cfg.kind == "scalar" else self.proj(x)  # () or (B, T, C)
        return self.cfg.floor + (1 - self.cfg.floor) * torch.sigmoid(logit)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.norm_in = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.attn = Attention(d, cfg.n_heads, cfg.attn_window, cfg.rope_theta)
        self.has_memory = cfg.memory.enabled
        if self.has_memory:
            self.memory = MemoryLayer(d, cfg.memory)
            self.gate = MixGate(d, cfg.gate)
            norm = cfg.gate.branch_norm == "rms"
            self.norm_attn = nn.RMSNorm(d, eps=cfg.norm_eps) if norm else nn.Identity()
            self.norm_mem = nn.RMSNorm(d, eps=cfg.norm_eps) if norm else nn.Identity()
        self.norm_mlp = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.mlp = SwiGLU(d, cfg.d_ff)
        self.gate_cfg, self.mem_dropout = cfg.gate, cfg.memory.dropout
        # the ablations (AtlasLM.memory_ablated): "off", the memory branch contributes zeros;
        # "shuffled", each sequence gets another's memory output (the batch rolled by one)
        self.ablation: str | None = None
        self.gate_mean = None  # mean learned gate of the last forward (with grad, for the aux loss)
        self.last_gate = None  # the same, detached (reading it later costs no host sync now)
        self.last_share = None  # the memory's share of the mix, ||g m|| / (||g m|| + ||(1 - g) a||), detached

    def forward(self, x: torch.Tensor, state: BlockState | None = None, gate_modes: torch.Tensor | None = None,
                window: int | None = None):
        """gate_modes: (B, T) GateMode values or None; window: this call's attention window."""
        hx = self.norm_in(x)
        a, kv = self.attn(hx, state.attn if state is not None else None, window)
        mem_state = None
        if self.has_memory:
            if self.ablation == "off":  # nothing to compute, nothing to carry
                m = torch.zeros_like(hx)
            else:
                m, mem_state = self.memory(hx, state.memory if state is not None else None)
                if self.ablation == "shuffled":  # the same kind of output, none of this sequence's content
                    m = m.roll(1, dims=0)
            m = F.dropout(m, self.mem_dropout, self.training)
            m, a = self.norm_mem(m), self.norm_attn(a)
            g = self.gate(torch.cat([m, a], dim=-1) if self.gate_cfg.kind == "branches" else hx)  # () or (B, T, C)
            self.gate_mean = g.float().mean()
            self.last_gate = self.gate_mean.detach()
            if gate_modes is not None:
                c = self.gate_cfg
                low = torch.zeros(gate_modes.shape, device=x.device, dtype=torch.float32)  # (B, T)
                low = low.masked_fill(gate_modes == GateMode.STORAGE, c.storage_gate)
                low = low.masked_fill(gate_modes == GateMode.RETRIEVAL, c.retrieval_floor)
                g = torch.maximum(g, low[..., None].to(g.dtype))  # (B, T, 1) or (B, T, C)
            gm, ga = g * m, (1 - g) * a
            # the gate is the memory's share only when both branches have one size: unnormalised,
            # the memory's own output projection can shrink or grow it behind an unmoved gate
            with torch.no_grad():  # float32 sums over the bf16 tensors, no float32 copies of them
                acc = torch.promote_types(gm.dtype, torch.float32)
                n_mem, n_attn = (torch.linalg.vector_norm(t, dtype=acc) for t in (gm, ga))
                self.last_share = n_mem / (n_mem + n_attn).clamp_min(1e-30)
            a = gm + ga
        h = x + a
        return h + self.mlp(self.norm_mlp(h)), BlockState(attn=kv, memory=mem_state)
