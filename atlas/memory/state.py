"""The memory's carried state and the two small pieces every implementation shares."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MemoryState:
    """What one `memory_scan` call hands to the next.

    M, S: (B, H, Dv, Dk) memory and momentum ("surprise"), float32 or float64.
    k, v, gamma: the last `window - 1` raw keys (B, W-1, H, Dk), values (B, W-1, H, Dv)
    and Omega weights (B, W-1, H): the window halo the next call's first tokens see.
    """

    M: torch.Tensor
    S: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    gamma: torch.Tensor

    @classmethod
    def zeros(cls, B: int, H: int, Dk: int, Dv: int, window: int, dtype, device) -> "MemoryState":
        z = lambda *s: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
        return cls(M=z(B, H, Dv, Dk), S=z(B, H, Dv, Dk), k=z(B, window - 1, H, Dk),
                   v=z(B, window - 1, H, Dv), gamma=z(B, window - 1, H))


def apply_poly(x: torch.Tensor, poly: torch.Tensor | None) -> torch.Tensor:
    """phi(x) = sum_i a_i x^i elementwise (a_1..a_p); None is the identity."""
    if poly is None:
        return x
    out, power = torch.zeros_like(x), torch.ones_like(x)
    for a in poly:
        power = power * x
        out = out + a * power
    return out


def last_rows(halo: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
    """The last n rows (dim 1) of halo ++ x, in halo's dtype, copying only those rows: the halo a
    call hands to the next one (the Omega window's keys, the conv's inputs)."""
    x = torch.cat([halo, x[:, max(0, x.shape[1] - n):].to(halo.dtype)], dim=1)
    return x[:, x.shape[1] - n:]


# Tokens per Triton kernel block (triton_scan.py): a longer chunk runs as blocks of this many
# sharing the chunk-start memory. Here, not in triton_scan, so FLOP counts need no triton.
SUB_CHUNK = 64

# Newton–Schulz-5 coefficients used by Muon (Jordan et al., 2024).
_NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz5(S: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Orthogonalise the last two dims of S, keeping its Frobenius norm.

    Muon's update direction is NS5(S), whose singular values are all near 1; we scale it
    back to ||S||_F so that switching the learning rule does not change the step size.
    """
    a, b, c = _NS_COEFFS
    norm = S.norm(dim=(-2, -1), keepdim=True)
    X = S / (norm + eps)
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.transpose(-2, -1)
    for _ in range(steps):
        A = X @ X.transpose(-2, -1)
        X = a * X + (b * A + c * A @ A) @ X
    if tall:
        X = X.transpose(-2, -1)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    return X * norm


def clamp_norm(M: torch.Tensor, max_norm: float | None) -> torch.Tensor:
    """The seed's global retention clamp: rescale each memory to Frobenius norm <= max_norm."""
    if max_norm is None:
        return M
    norm = M.norm(dim=(-2, -1), keepdim=True)
    return M * torch.clamp(max_norm / (norm + 1e-12), max=1.0)
