"""AdamW with parameter groups, and the warmup + cosine schedule with per-stage LR scale."""
from __future__ import annotations

import math

import torch

from ..config import Config, stage_at


def param_groups(model: torch.nn.Module, cfg: Config) -> list[dict]:
    """Three groups: decayed matrices; no decay for norms, gains, biases, poly and memory gates;
    the mixing gates with their own LR multiplier (the seed asks for a separate gate LR)."""
    decay, no_decay, gates = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".gate." in name:
            gates.append(p)
        elif p.dim() < 2 or ".w_gates." in name:
            no_decay.append(p)
        else:
            decay.append(p)
    t = cfg.train
    groups = [
        {"name": "decay", "params": decay, "weight_decay": t.weight_decay, "lr_mult": 1.0},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0},
        {"name": "gates", "params": gates, "weight_decay": 0.0, "lr_mult": t.gate_lr_mult},
    ]
    return [g for g in groups if g["params"]]


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    device = next(model.parameters()).device
    fused = device.type in ("cuda", "cpu")  # fused AdamW exists on both in torch >= 2.4
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.train.lr, betas=cfg.train.betas, fused=fused)


def schedule_horizon(cfg: Config) -> int:
    """The cosine runs over the planned stages, not over train.max_steps: stopping early (or
    resuming with a larger max_steps) must not change the LR of steps already taken."""
    return sum(s.steps for s in cfg.train.stages)


def lr_at(cfg: Config, step: int) -> float:
    """Learning rate of optimizer step `step` (0-based)."""
    t = cfg.train
    _, stage = stage_at(cfg, step)
    if step < t.warmup_steps:
        f = (step + 1) / t.warmup_steps
    else:
        horizon = max(schedule_horizon(cfg) - t.warmup_steps, 1)
        progress = min((step - t.warmup_steps) / horizon, 1.0)
        f = t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return t.lr * stage.lr_scale * f


def gate_lr_sum(cfg: Config, start: int, end: int) -> float:
    """The learning rate the mixing gates had over optimizer steps start .. end-1: as far as Adam
    can move a gate logit in them (gate_drift's unit)."""
    return sum(lr_at(cfg, s) for s in range(start, end)) * cfg.train.gate_lr_mult


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr * g["lr_mult"]
