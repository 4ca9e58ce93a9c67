"""`impl="reference"`: the token loop that states the memory math (DESIGN.md §1).

Slow on purpose. Every other implementation is tested against this one.
"""
from __future__ import annotations

import torch

from .state import MemoryState, apply_poly, clamp_norm, newton_schulz5


def memory_scan_reference(q, k, v, alpha, eta, theta, gamma, *, chunk_size, window, poly, state,
                          huber_delta=None, max_norm=None, muon=False):
    B, T, H, Dk = q.shape
    W = window
    M, S = state.M, state.S  # (B, H, Dv, Dk)
    kx = torch.cat([state.k, k], dim=1)  # (B, W-1+T, H, Dk): halo keys, then this call's
    vx = torch.cat([state.v, v], dim=1)  # (B, W-1+T, H, Dv)
    gx = torch.cat([state.gamma, gamma], dim=1)  # (B, W-1+T, H)
    pk, pq = apply_poly(kx, poly), apply_poly(q, poly)

    ys = []
    for t in range(T):
        if t % chunk_size == 0:  # a chunk starts: freeze the memory the gradients are taken at
            M_ref, S_ref = M, S
            S_seen = newton_schulz5(S_ref) if muon else S_ref  # what the memory update sees of S_ref
            carry = torch.ones_like(alpha[:, 0])[..., None, None]  # prod of eta since chunk start
            S_new = torch.zeros_like(S_ref)  # momentum from this chunk's gradients
        # loss_t(M) = sum over the window i = t-W+1..t of gamma_i/2 ||M phi(k_i) - v_i||^2
        pk_w, v_w, g_w = pk[:, t:t + W], vx[:, t:t + W], gx[:, t:t + W]  # window in halo coords
        err = torch.einsum("bhvk,bwhk->bwhv", M_ref, pk_w) - v_w  # (B, W, H, Dv)
        if huber_delta is not None:
            err = err.clamp(-huber_delta, huber_delta)  # Huber's gradient is the clipped error
        grad = torch.einsum("bwh,bwhv,bwhk->bhvk", g_w, err, pk_w)  # (B, H, Dv, Dk)

        eta_t = eta[:, t, :, None, None]
        carry = carry * eta_t
        S_new = eta_t * S_new - theta[:, t, :, None, None] * grad
        S = carry * S_ref + S_new  # S_t = eta_t S_{t-1} - theta_t grad
        M = (1 - alpha[:, t, :, None, None]) * M + carry * S_seen + S_new
        ys.append(torch.einsum("bhvk,bhk->bhv", M, pq[:, t]))  # y_t = M_t phi(q_t)
        if (t + 1) % chunk_size == 0 or t == T - 1:
            M = clamp_norm(M, max_norm)

    y = torch.stack(ys, dim=1)  # (B, T, H, Dv)
    cut = kx.shape[1] - (W - 1)
    return y, MemoryState(M=M, S=S, k=kx[:, cut:].clone(), v=vx[:, cut:].clone(), gamma=gx[:, cut:].clone())
