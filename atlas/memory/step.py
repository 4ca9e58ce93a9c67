"""One token of `memory_scan` in O(1): the decoding step.

Inside a chunk every gradient is taken at M_ref, the memory at the chunk start (DESIGN.md §1),
so the chunk's closed form is also a plain recurrence over its tokens:

    grad_t = sum_{i in t's Omega window} gamma_i e_i phi(k_i)^T,   e_i = M_ref phi(k_i) - v_i
    S_t = eta_t S_{t-1} - theta_t grad_t,   M_t = (1 - alpha_t) M_{t-1} + S'_t

where S'_t is the momentum M sees: the same recurrence started from NS5(S_ref) under Muon
(S' = S otherwise). max_norm clamps M only when a chunk closes. A token then costs one window
of errors at M_ref, whatever the context or the position in the chunk; `chunked` and `triton`
compute the same function for whole chunks at once (tests/test_model.py ties them).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .chunked import clamp_gates
from .state import MemoryState, apply_poly


@dataclass
class Running:
    """The open chunk's unclamped memory and the momentum it sees, (B, H, Dv, Dk) each."""
    M: torch.Tensor
    S_seen: torch.Tensor


@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def memory_step(q, k, v, alpha, eta, theta, gamma, *, ref: MemoryState, now: MemoryState, run: Running,
                window: int, poly=None, huber_delta=None):
    """One token. q, k: (B, H, Dk); v: (B, H, Dv); gates (B, H). ref: the state at the chunk
    start (its M is M_ref); now: the state after the previous token (its S is the carried momentum,
    its k, v, gamma the window halo); run: the open chunk's unclamped M and seen momentum.
    Returns y (B, H, Dv) in the state's dtype, the unclamped state after the token, and `run`
    after it. The caller clamps M (max_norm) when the chunk closes."""
    dt = now.M.dtype
    q, k, v, alpha, eta, theta, gamma = (t.to(dt) for t in (q, k, v, alpha, eta, theta, gamma))
    ks = torch.cat([now.k, k[:, None]], dim=1)  # (B, W, H, Dk): halo, then this token
    vs = torch.cat([now.v, v[:, None]], dim=1)  # (B, W, H, Dv)
    gs = torch.cat([now.gamma, gamma[:, None]], dim=1)  # (B, W, H)
    pk = apply_poly(ks, poly).transpose(1, 2)  # (B, H, W, Dk)
    err = pk @ ref.M.transpose(-1, -2) - vs.transpose(1, 2)  # (B, H, W, Dv): e_i at M_ref
    if huber_delta is not None:
        err = err.clamp(-huber_delta, huber_delta)
    grad = (gs.transpose(1, 2)[..., None] * err).transpose(-1, -2) @ pk  # (B, H, Dv, Dk)
    alpha, eta = clamp_gates(alpha, eta)  # as chunked does: one function at the edges too
    beta, eta, theta = (1 - alpha)[..., None, None], eta[..., None, None], theta[..., None, None]  # (B, H, 1, 1)
    S = eta * now.S - theta * grad
    S_seen = eta * run.S_seen - theta * grad
    M = beta * run.M + S_seen  # (B, H, Dv, Dk), unclamped
    y = (M @ apply_poly(q, poly)[..., None])[..., 0]  # (B, H, Dv)
    W1 = window - 1
    halo = MemoryState(M=M, S=S, k=ks[:, ks.shape[1] - W1:], v=vs[:, vs.shape[1] - W1:],
                       gamma=gs[:, gs.shape[1] - W1:])
    return y, halo, Running(M, S_seen)
