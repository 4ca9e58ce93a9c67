"""Per-layer observability, from the state a forward pass already returned (no second pass).

Names follow the seed report: gate, M_norm, M_std, M_max, M_mean, S_norm; plus M_eff_rank,
the effective rank of M (exp of the entropy of its normalised singular values, Roy & Vetterli
2007): 1 for a rank-one memory, Dk for one that uses every direction equally; and mem_share,
the memory's share of what the block adds, ||g m|| / (||g m|| + ||(1 - g) a||): the gate alone
says that only when both branches are normalised (model.gate.branch_norm=rms).
"""
from __future__ import annotations

import math

import torch

STAT_NAMES = ("gate", "M_norm", "M_std", "M_max", "M_mean", "S_norm", "M_eff_rank", "mem_share")


def effective_rank(M: torch.Tensor) -> torch.Tensor:
    """M (..., Dv, Dk) -> (...,) effective rank."""
    s = torch.linalg.svdvals(M.float())
    p = s / s.sum(-1, keepdim=True).clamp_min(1e-30)
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
    return torch.exp(entropy)


@torch.no_grad()
def memory_stats(model, state) -> dict[str, list[float]]:
    """One list per statistic, one entry per memory layer (averaged over batch and heads)."""
    rows = []
    for block, s in zip(model.blocks, state):
        if not block.has_memory:
            continue
        M, S = s.memory.memory.M.float(), s.memory.memory.S.float()  # (B, H, Dv, Dk)
        rows.append(torch.stack([
            block.last_gate.float() if block.last_gate is not None else torch.tensor(float("nan")),
            M.norm(dim=(-2, -1)).mean(), M.std(), M.abs().max(), M.mean(),
            S.norm(dim=(-2, -1)).mean(), effective_rank(M).mean(),
            block.last_share.float() if block.last_share is not None else torch.tensor(float("nan")),
        ]).cpu())
    if not rows:
        return {}
    table = torch.stack(rows).T.tolist()  # one host transfer for all layers
    return dict(zip(STAT_NAMES, table))


def gate_drift(gate: list[float], before: list[float], lr_sum: float, floor: float) -> list[float]:
    """How fast each layer's gate logit w (g = floor + (1 - floor) sigmoid(w)) moved between two
    stats rows, in units of the farthest Adam could move it: about lr a step, lr_sum in all.
    -1: pushed shut at full speed the whole time; gradient noise averages out near 0. The seed's
    collapse ran at about -0.6 for its first 11.5K steps (experiments/memory_use/README.md)."""
    def logit(g):
        p = min(max((g - floor) / (1 - floor), 1e-7), 1 - 1e-7)
        return math.log(p / (1 - p))
    return [(logit(g) - logit(b)) / lr_sum if math.isfinite(g) and math.isfinite(b) else float("nan")
            for g, b in zip(gate, before)]
