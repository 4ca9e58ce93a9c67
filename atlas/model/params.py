"""Parameter counts by component, for `atlas info`."""
from __future__ import annotations

from collections import OrderedDict

import torch.nn as nn

COMPONENTS = ("embeddings", "attention", "memory", "gates", "mlp", "norms")


def component_of(name: str) -> str:
    if name.startswith(("embed.", "head.")):
        return "embeddings"
    if ".gate." in name or ".w_gates." in name:  # the mixing gate and the memory's alpha/eta/theta/gamma
        return "gates"
    if ".memory." in name:
        return "memory"
    if ".attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    return "norms"


def count_by_component(model: nn.Module) -> "OrderedDict[str, int]":
    counts = OrderedDict((c, 0) for c in COMPONENTS)
    for name, p in model.named_parameters():  # shared (tied) tensors are listed once
        if "norm" in name.rsplit(".", 2)[-2] and component_of(name) != "memory":
            counts["norms"] += p.numel()
        else:
            counts[component_of(name)] += p.numel()
    counts["total"] = sum(counts.values())
    return counts
