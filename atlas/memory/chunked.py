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


def _decay_exp(cum, causal, dtype):
    """exp(cum_j - cum_r) on the causal triangle (0 above it), in `dtype`: _DecayExp's forward."""
    diff = cum[..., :, None] - cum[..., None, :]  # (..., n, n)
    return torch.exp(diff.masked_fill(~causal, float("-inf"))).to(dtype)


class _DecayExp(torch.autograd.Function):
    """L = exp(diff) (masked to the causal triangle) from float64 log-cumsums, in `dtype`, with a
    backward in `dtype`: dcum_j = sum_r t[j, r] - sum_r t[r, j], t = dL * L. Only the exponent
    needs float64 (differences of long sums); autograd's own backward ran the whole (n, n)
    gradient in float64 too (benchmarks/README.md, tenth session: gate-sums)."""

    @staticmethod
    def forward(ctx, cum, causal, dtype):
        L = _decay_exp(cum, causal, dtype)
        ctx.save_for_backward(L)
        return L

    @staticmethod
    def backward(ctx, dL):
        L, = ctx.saved_tensors
        t = dL * L  # zero above the diagonal, where L is
        return (t.sum(-1) - t.sum(-2)).double(), None, None


def _decay_matrix(log_gate: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """log_gate (..., n) -> (L, cum): L[j, r] = prod_{r<l<=j} gate_l for r <= j, else 0; cum = log prod_{l<=j}."""
    cum = torch.cumsum(log_gate.double(), dim=-1)  # float64: differences of long sums stay exact
    n = log_gate.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=log_gate.device).tril()
    return _DecayExp.apply(cum, causal, dtype), cum


def clamp_gates(alpha: torch.Tensor, eta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha and eta clamped just inside their edges (alpha = 1, eta = 0): there they get no
    gradient, which through log_gates would be ~1/eta times a sum that cancels to zero, i.e.
    rounding noise of order 1e35. Sigmoid gates never sit exactly on the edge."""
    alpha_max = 1 - torch.finfo(alpha.dtype).eps / 2  # the largest float below 1
    return alpha.clamp(max=alpha_max), eta.clamp(min=_GATE_MIN)


def log_gates(alpha: torch.Tensor, eta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log(1 - alpha), log(eta) of the clamped gates."""
    alpha, eta = clamp_gates(alpha, eta)
    return torch.log1p(-alpha), torch.log(eta)


def gate_products(log_beta, log_eta, th, g, W: int, dtype):
    """The decay products of a block of n queries against its n + W - 1 (or more, padded) keys.

    log_beta, log_eta, th (..., n); g (..., L) Omega weights of the keys, halo first.
    Returns Le (..., n, n), P, Pe, f (..., n), th_band (..., n, L), G (..., n, L)."""
    Lb, cb = _decay_matrix(log_beta, dtype)
    Le, ce = _decay_matrix(log_eta, dtype)
    P = torch.exp(cb).to(dtype)  # prod_{l<=j} beta_l
    Pe = torch.exp(ce).to(dtype)  # prod_{l<=j} eta_l
    f = (Lb * Pe[..., None, :]).sum(-1)  # Lb @ Pe as a row sum: fused with Lb's making, no matvec
    m = torch.arange(log_beta.shape[-1], device=g.device)[:, None]
    i = torch.arange(g.shape[-1], device=g.device)[None, :]
    band = ((i >= m) & (i <= m + W - 1)).to(dtype)  # (n, L): key i is in query m's window
    th_band = th[..., None] * band
    G = ((Lb @ Le) @ th_band) * g[..., None, :]
    return Le, P, Pe, f, th_band, G


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
    log_beta, log_eta = (x.transpose(1, 2) for x in log_gates(alpha, eta))  # (B, H, T) each
    th = theta.transpose(1, 2)  # (B, H, T)

    M, S = state.M, state.S  # (B, H, Dv, Dk)
    ys = []
    full = T // chunk_size * chunk_size
    # the full chunks as one batch, then the partial last chunk (if any) as a batch of one
    for s0, n, nc in ((0, chunk_size, T // chunk_size), (full, T - full, 1)):
        if nc == 0 or n == 0:
            continue
        y, M, S = _scan_chunks(pkx, vx, gx, pq, log_beta, log_eta, th, M, S, s0, n, nc, W, dt,
                               huber_delta, max_norm, muon)
        ys.append(y)

    y = torch.cat(ys, dim=2).transpose(1, 2)  # (B, T, H, Dv)
    cut = kx.shape[2] - (W - 1)
    # copies, not views: a view would keep the whole (W-1+T)-token buffers alive in the carried state
    halo = MemoryState(M=M, S=S, k=kx[:, :, cut:].transpose(1, 2).clone(), v=vx[:, :, cut:].transpose(1, 2).clone(),
                       gamma=gx[:, :, cut:].transpose(1, 2).clone())
    return y, halo


def _scan_chunks(pkx, vx, gx, pq, log_beta, log_eta, th, M, S, s0, n, nc, W, dt, huber_delta, max_norm, muon):
    """`nc` consecutive chunks of `n` tokens from token s0. Everything that depends only on the
    gates and keys is computed for all chunks at once; the loop carries only M and S."""
    dev = pq.device
    rows = s0 + torch.arange(nc, device=dev)[:, None] * n  # (nc, 1) first token of each chunk
    qi = rows + torch.arange(n, device=dev)  # (nc, n) token indices
    ki = rows + torch.arange(n + W - 1, device=dev)  # (nc, n+W-1) halo coordinates: W-1 before, then own
    pk, v, g = pkx[:, :, ki], vx[:, :, ki], gx[:, :, ki]  # (B, H, nc, n+W-1, .)
    q_c = pq[:, :, qi]  # (B, H, nc, n, Dk)

    # Le (B, H, nc, n, n); P, Pe, f (B, H, nc, n); th_band, G (B, H, nc, n, n+W-1)
    Le, P, Pe, f, th_band, G = gate_products(log_beta[..., qi], log_eta[..., qi], th[..., qi], g, W, dt)
    c_S = (Le[..., -1, :, None] * th_band).sum(-2) * g  # (B, H, nc, n+W-1): Le's last row times th_band
    A = G * (q_c @ pk.transpose(-1, -2))  # (B, H, nc, n, n+W-1): queries against window keys

    M_refs, S_seens, errs = [], [], []
    for c in range(nc):  # the only sequential part: chunk-start states
        S_seen = newton_schulz5(S) if muon else S
        M_refs.append(M)
        S_seens.append(S_seen)
        err = _errors(pk[:, :, c], v[:, :, c], M, huber_delta)  # (B, H, n+W-1, Dv)  e_i at M_ref
        errs.append(err)
        M_new = (P[:, :, c, -1, None, None] * M + f[:, :, c, -1, None, None] * S_seen
                 - (G[:, :, c, -1, :, None] * err).transpose(-1, -2) @ pk[:, :, c])  # (B, H, Dv, Dk)
        S = Pe[:, :, c, -1, None, None] * S - (c_S[:, :, c, :, None] * err).transpose(-1, -2) @ pk[:, :, c]
        M = clamp_norm(M_new, max_norm)

    M_ref, S_ref = torch.stack(M_refs, 2), torch.stack(S_seens, 2)  # (B, H, nc, Dv, Dk)
    err = torch.stack(errs, 2)  # (B, H, nc, n+W-1, Dv)
    y = (P[..., None] * (q_c @ M_ref.transpose(-1, -2)) + f[..., None] * (q_c @ S_ref.transpose(-1, -2))
         - A @ err)  # (B, H, nc, n, Dv)
    return y.flatten(2, 3), M, S


def _errors(pk, v, M, huber_delta):
    """e_i = M_ref phi(k_i) - v_i; Huber's gradient is the clipped error."""
    err = pk @ M.transpose(-1, -2) - v
    return err if huber_delta is None else err.clamp(-huber_delta, huber_delta)
