"""The grouped state pass, checked on a CPU before any kernel (benchmarks/README.md, "Next").

The sequential passes walk one sub-chunk a step; for the l2 rule (no Huber clamp, no max_norm)
a group of G sub-chunks can be walked in three dependent products. In triton_kernels.py's terms,
per sub-chunk j with keys K_j (BL, Dk), values V_j^T (Dv, BL), per-key weights gl_j, cs_j (BL,)
and scalars pl_j, fl_j, pel_j:

    E_j = M_j K_j^T - V_j^T      M_{j+1} = pl_j M_j + fl_j S_j - (E_j * gl_j) K_j
                                 S_{j+1} = pel_j S_j - (E_j * cs_j) K_j

Inside a group M_j = a_j M_0 + b_j S_0 - sum_{i<j} (E_i * u_ij) K_i, with scalars a, b and
per-key u_ij made of the gates alone, so the errors solve a unit block-triangular system

    [E_0 ... E_{G-1}] T = [R_0 ... R_{G-1}],   R_j = a_j M_0 K_j^T + b_j S_0 K_j^T - V_j^T,
    T_ij = diag(u_ij) K_i K_j^T  (i < j),  T_jj = I

whose matrix T does not depend on the state: it can be inverted off the chain, leaving the state
against all G sub-chunks' keys, that against T^-1, and the update. This script ties the grouped
form to the sequential one on random inputs shaped like the layer's (unit keys; per-key steps up to 0.05,
and up to 0.5), in float64 and in float32, for a few G.

    python3 benchmarks/grouped_state.py
"""
from __future__ import annotations

import torch


def inputs(n: int, Dk: int, Dv: int, BL: int, dtype, lr: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    K = torch.nn.functional.normalize(torch.randn(n, BL, Dk, generator=g, dtype=torch.float64), dim=-1)
    Vt = torch.randn(n, Dv, BL, generator=g, dtype=torch.float64)
    gl, cs = lr * torch.rand(n, BL, generator=g, dtype=torch.float64), lr * torch.rand(n, BL, generator=g, dtype=torch.float64)
    pl, fl, pel = 1 - 0.1 * torch.rand(n, generator=g, dtype=torch.float64), torch.rand(n, generator=g, dtype=torch.float64), \
        0.5 + 0.5 * torch.rand(n, generator=g, dtype=torch.float64)
    M0, S0 = torch.randn(Dv, Dk, generator=g, dtype=torch.float64), torch.randn(Dv, Dk, generator=g, dtype=torch.float64)
    return [x.to(dtype) for x in (K, Vt, gl, cs, pl, fl, pel, M0, S0)]


def sequential(K, Vt, gl, cs, pl, fl, pel, M, S):
    """The passes' recurrence, one sub-chunk a step: the errors E_j and the end state."""
    Es = []
    for j in range(K.shape[0]):
        E = M @ K[j].T - Vt[j]  # (Dv, BL)
        M, S = pl[j] * M + fl[j] * S - (E * gl[j]) @ K[j], pel[j] * S - (E * cs[j]) @ K[j]
        Es.append(E)
    return torch.stack(Es), M, S


def grouped(K, Vt, gl, cs, pl, fl, pel, M, S, G: int):
    """The same, G sub-chunks a step: a solve against a state-free T per group."""
    Es, n, BL = [], K.shape[0], K.shape[1]
    for g0 in range(0, n, G):
        idx = list(range(g0, min(g0 + G, n)))
        a, b, d = [1.0], [0.0], [1.0]  # M_j = a_j M_0 + b_j S_0 - ..., S_j = d_j S_0 - ...
        u = {}  # (i, j) -> per-key weight of E_i K_i in M_j;  v: the same in S_j
        v = {}
        for jj, j in enumerate(idx):  # coefficients for M_{jj+1}, S_{jj+1} (gates only: off the chain)
            a.append(pl[j] * a[jj])
            b.append(pl[j] * b[jj] + fl[j] * d[jj])
            d.append(pel[j] * d[jj])
            for i in range(jj):
                u[i, jj + 1] = pl[j] * u[i, jj] + fl[j] * v[i, jj]
                v[i, jj + 1] = pel[j] * v[i, jj]
            u[jj, jj + 1], v[jj, jj + 1] = gl[j], cs[j]
        m = len(idx)
        T = torch.eye(m * BL, dtype=K.dtype)
        for j in range(m):
            for i in range(j):
                T[i * BL:(i + 1) * BL, j * BL:(j + 1) * BL] = u[i, j][:, None] * (K[idx[i]] @ K[idx[j]].T)
        Kg = K[idx].reshape(m * BL, -1)  # (m BL, Dk): the group's keys
        one = torch.ones(BL, dtype=K.dtype)
        coef, coef_s = torch.cat([a[j] * one for j in range(m)]), torch.cat([b[j] * one for j in range(m)])
        R = (M @ Kg.T) * coef + (S @ Kg.T) * coef_s - torch.cat([Vt[j] for j in idx], dim=1)  # 1st product
        E = torch.linalg.solve_triangular(T, R, upper=True, left=False)  # 2nd: R T^-1 (T^-1 off the chain)
        wu = torch.cat([u[i, m] for i in range(m)])
        wv = torch.cat([v[i, m] for i in range(m)])
        M, S = a[m] * M + b[m] * S - (E * wu) @ Kg, d[m] * S - (E * wv) @ Kg  # 3rd: the update
        Es.append(E.reshape(E.shape[0], m, BL).permute(1, 0, 2))
    return torch.cat(Es), M, S


def rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def main() -> None:
    n, Dk, Dv, BL = 64, 128, 32, 64  # 64 sub-chunks of 64 keys, one block of 32 value rows
    print(f"{n} sub-chunks of {BL} keys, Dk {Dk}, {Dv} value rows; relative error against the float64 sequential pass")
    print("per-key step  form        dtype    G   errors     end M      end S")
    for lr in (0.05, 0.5):  # gl, cs up to this: a memory learning rate as the layer's, and a seed-like one
        ref = sequential(*inputs(n, Dk, Dv, BL, torch.float64, lr))
        for dtype in (torch.float64, torch.float32):
            ins = inputs(n, Dk, Dv, BL, dtype, lr)
            for G in (1, 2, 4, 8):
                out = sequential(*ins) if G == 1 else grouped(*ins, G=G)
                name = "sequential" if G == 1 else "grouped"
                print(f"{lr:<13} {name:11} {str(dtype)[6:]:8} {G:<3} "
                      + "  ".join(f"{rel(o, r):.2e}" for o, r in zip(out, ref)))


if __name__ == "__main__":
    main()
