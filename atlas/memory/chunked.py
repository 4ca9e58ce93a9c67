"""`impl="chunked"`: the same function as the reference, parallel inside each chunk.

Inside a chunk every token's gradient is taken at M_ref (the memory at the chunk start), so
the whole chunk unrolls into matmuls (DESIGN.md §1). With beta = 1 - alpha and positions
j, r, m in the chunk (i runs over the chunk plus the W-1 halo tokens before it):

    M_j = P_j M_ref + f_j S_ref - sum_i G[j, i] e_i phi(k_i)^T,     e_i = M_ref phi(k_i) - v_i
    P_j = prod_{l<=j} beta_l          f_j = sum_{r<=j} B[j, r] prod_{l<=r} eta_l
    B[j, r] = prod_{r<l<=j} beta_l    E[r, m] = prod_{m<l<=r} eta_l
    G = (B @ E) diag(theta) Band diag(gamma),   Band[m, i] = 1 iff i is in m's Omega window

so Y = diag(P) Phi(Q) M_ref^T + diag(f) Phi(Q) S_ref^T - (G * Phi(Q) Phi(K)^T) E_rr.
Every product of gates is exp of a difference of float64 log-cumsums, masked before the exp,
so chunk 2048 with gates near zero neither underflows into 0/0 nor overflows.
"""
from __future__ import annotations

import torch

from .state import MemoryState, apply_poly, clamp_norm, newton_schulz5

_GATE_MIN = 1e-35  # eta = 0 becomes exp(-80.6): still a float32 normal, and log's gradient stays finite


def _decay_matrix(log_gate: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """log_gate (..., n) -> (L, cum): L[j, r] = prod_{r<l<=j} gate_l for r <= j, else 0; cum = log prod_{l<=j}."""
    cum = torch.cumsum(log_gate.double(), dim=-1)  # float64: differences of long sums stay exact
    diff = cum[..., :, None] - cum[..., None, :]  # (..., n, n)
    n = log_gate.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=log_gate.device).tril()
    L = torch.exp(diff.masked_fill(~causal, float("-inf"))).to(dtype)
    return L, cum


def memory_scan_chunked(q, k, v, alpha, eta, theta, gamma, *, chunk_size, window, poly, state,
                        huber_delta=None, max_norm=None, muon=False):
    B, T, H, Dk = q.shape
    W = window
    dt = state.M.dtype
    # (B, T, H, D) -> (B, H, T, D): heads are a batch dimension from here on
    kx = torch.cat([state.k, k], dim=1).transpose(1, 2)  # (B, H, W-1+T, Dk), halo first
    vx = torch.cat([state.v, v], dim=1).transpose(1, 2)  # (B, H, W-1+T, Dv)
    gx = torch.cat([state.gamma, gamma], dim=1).transpose(1, 2)  # (B, H, W-1+T)
    pkx, pq = apply_poly(kx, poly), apply_poly(q.transpose(1, 2), poly)  # (B, H, *, Dk)
    # A gate exactly at its edge (eta = 0, alpha = 1) is clamped just inside it, and gets no
    # gradient there: through the log, its gradient would be ~1/eta times a sum that cancels to
    # zero, i.e. rounding noise of order 1e35. Sigmoid gates never sit exactly on the edge.
    alpha_max = 1 - torch.finfo(alpha.dtype).eps / 2  # the largest float below 1
    log_beta = torch.log1p(-alpha.clamp(max=alpha_max)).transpose(1, 2)  # (B, H, T)
    log_eta = torch.log(eta.clamp(min=_GATE_MIN)).transpose(1, 2)  # (B, H, T)
    th = theta.transpose(1, 2)  # (B, H, T)

    M, S = state.M, state.S  # (B, H, Dv, Dk)
    ys = []
    for s in range(0, T, chunk_size):
        n = min(chunk_size, T - s)
        pk_c, v_c, g_c = pkx[:, :, s:s + n + W - 1], vx[:, :, s:s + n + W - 1], gx[:, :, s:s + n + W - 1]
        pq_c = pq[:, :, s:s + n]  # (B, H, n, Dk)

        Lb, cb = _decay_matrix(log_beta[..., s:s + n], dt)  # (B, H, n, n), (B, H, n)
        Le, ce = _decay_matrix(log_eta[..., s:s + n], dt)
        P = torch.exp(cb).to(dt)  # (B, H, n)  prod_{l<=j} beta_l
        Pe = torch.exp(ce).to(dt)  # (B, H, n)  prod_{l<=j} eta_l
        f = (Lb @ Pe[..., None])[..., 0]  # (B, H, n)
        m_idx = torch.arange(n, device=q.device)[:, None]
        i_idx = torch.arange(n + W - 1, device=q.device)[None, :]
        band = ((i_idx >= m_idx) & (i_idx <= m_idx + W - 1)).to(dt)  # (n, n+W-1)
        th_c = th[..., s:s + n, None]  # (B, H, n, 1)
        G = ((Lb @ Le) @ (th_c * band)) * g_c[..., None, :]  # (B, H, n, n+W-1)
        c_S = ((Le[..., -1:, :] @ (th_c * band)) * g_c[..., None, :])[..., 0, :]  # (B, H, n+W-1)

        S_seen = newton_schulz5(S) if muon else S
        err = pk_c @ M.transpose(-1, -2) - v_c  # (B, H, n+W-1, Dv)  e_i at M_ref
        if huber_delta is not None:
            err = err.clamp(-huber_delta, huber_delta)
        y = (P[..., None] * (pq_c @ M.transpose(-1, -2))
             + f[..., None] * (pq_c @ S_seen.transpose(-1, -2))
             - (G * (pq_c @ pk_c.transpose(-1, -2))) @ err)  # (B, H, n, Dv)
        ys.append(y)

        M_new = (P[..., -1, None, None] * M + f[..., -1, None, None] * S_seen
                 - (G[..., -1, :, None] * err).transpose(-1, -2) @ pk_c)  # (B, H, Dv, Dk)
        S = Pe[..., -1, None, None] * S - (c_S[..., None] * err).transpose(-1, -2) @ pk_c
        M = clamp_norm(M_new, max_norm)

    y = torch.cat(ys, dim=2).transpose(1, 2)  # (B, T, H, Dv)
    cut = kx.shape[2] - (W - 1)
    halo = MemoryState(M=M, S=S, k=kx[:, :, cut:].transpose(1, 2), v=vx[:, :, cut:].transpose(1, 2),
                       gamma=gx[:, :, cut:].transpose(1, 2))
    return y, halo
