"""The Atlas language model: embeddings, blocks, final norm, head."""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn as nn

from ..config import ModelConfig
from .block import Block, BlockState


class AtlasLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm_out = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    @torch.no_grad()
    def reset_parameters(self):
        out_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)  # residual writers: keep the sum's variance flat
        for name, p in self.named_parameters():
            if p.dim() == 2 and "w_gates" not in name and "gate.proj" not in name:
                std = out_std if name.endswith("w_out.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor, state: list[BlockState] | None = None,
                gate_modes: torch.Tensor | None = None):
        """idx (B, T) token ids -> logits (B, T, V) and the state to continue from.
        gate_modes: optional (B, T) GateMode per token (episodic training)."""
        x = self.embed(idx)  # (B, T, C)
        window = None
        lo, hi = self.cfg.attn_window_min, self.cfg.attn_window
        if self.training and lo is not None:  # randomized window (SWAX): one draw per step, on the checkpointed RNG
            window = int(torch.randint(lo, hi + 1, ()))
        new_state = []
        for i, block in enumerate(self.blocks):
            x, s = block(x, state[i] if state is not None else None, gate_modes, window)
            new_state.append(s)
        return self.head(self.norm_out(x)), new_state

    def compile_blocks(self, **kw) -> None:
        """torch.compile each block in place (as torchtitan does): the blocks share one compiled
        graph, so compile time does not grow with depth, and state_dict keys do not change."""
        for b in self.blocks:
            b.compile(**kw)

    def gate_aux_loss(self) -> torch.Tensor:
        """The memory-utilisation loss of the last forward: sum_layers relu(target - mean gate)^2."""
        c = self.cfg.gate
        gates = [b.gate_mean for b in self.blocks if b.has_memory and b.gate_mean is not None]
        if not gates or c.aux_weight == 0:
            return torch.zeros((), device=self.embed.weight.device)
        return c.aux_weight * sum(torch.relu(c.aux_target - g) ** 2 for g in gates)

    @contextmanager
    def memory_ablated(self, kind: str = "off"):
        """Inside this block every memory branch contributes zeros ("off"), or each sequence of a
        batch reads another one's memory output ("shuffled": the batch rolled by one). Zeroing
        also removes the branch's share of the mix, which a model with unnormalised branches
        misses whether or not the memory tells it anything; shuffling keeps the share and
        removes only what the memory read from this sequence."""
        if kind not in ("off", "shuffled"):
            raise ValueError(f"memory ablation {kind!r}: 'off' or 'shuffled'")
        blocks = [b for b in self.blocks if b.has_memory]
        for b in blocks:
            b.ablation = kind
        try:
            yield self
        finally:
            for b in blocks:
                b.ablation = None

    def set_chunk_size(self, chunk_size: int) -> None:
        """TNT stages change the memory chunk size during training."""
        for m in self.memory_layers():
            m.chunk_size = chunk_size

    def memory_layers(self):
        return [b.memory for b in self.blocks if b.has_memory]
