"""One Atlas block (DESIGN.md §2):

    h  = x + mix(attn(norm(x)), memory(norm(x)))      mix = g * rms(mem) + (1 - g) * rms(attn)
    x' = h + mlp(norm(h))                              g = floor + (1 - floor) * sigmoid(w)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import GateConfig, ModelConfig
from ..memory.layer import MemoryLayer, MemoryLayerState
from .attention import Attention, KVCache


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
    """The attention/memory gate: a scalar per layer, or per channel from the input."""

    def __init__(self, d_model: int, cfg: GateConfig):
        super().__init__()
        self.cfg = cfg
        w0 = math.log((cfg.init - cfg.floor) / (1 - cfg.init))  # sigmoid(w0) maps to g = init
        if cfg.kind == "scalar":
            self.w = nn.Parameter(torch.tensor(w0))
        else:
            self.proj = nn.Linear(d_model, d_model)
            nn.init.zeros_(self.proj.weight)  # start input-independent, at exactly `init`
            nn.init.constant_(self.proj.bias, w0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
        self.last_gate = None  # mean gate of the last forward, detached (no host sync)

    def forward(self, x: torch.Tensor, state: BlockState | None = None):
        hx = self.norm_in(x)
        a, kv = self.attn(hx, state.attn if state is not None else None)
        mem_state = None
        if self.has_memory:
            m, mem_state = self.memory(hx, state.memory if state is not None else None)
            g = self.gate(hx)  # () or (B, T, C)
            self.last_gate = g.detach().float().mean()
            a = g * self.norm_mem(m) + (1 - g) * self.norm_attn(a)
        h = x + a
        return h + self.mlp(self.norm_mlp(h)), BlockState(attn=kv, memory=mem_state)
