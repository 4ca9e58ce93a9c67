"""Triton kernels of conv.py's causal depthwise conv + SiLU, as a `torch.library.custom_op` (so
torch.compile traces around it). Float32 accumulation; x, y, dy in their own dtype.

    forward   y = silu(a),  a[t] = sum_j P[t + j] w[:, j],  P = halo ++ x         one pass over x
              (columns < NORM: y / ||y|| over each group of GROUP columns, in the same tile)
    backward  da = dy * silu'(a)  (a recomputed; dy first through the normalisation)   one pass
              dP[p] = sum_j da[p - j] w[:, j]  -> dhalo = dP[:K-1], dx = dP[K-1:]      over x, dy
              and dw[:, j] = sum_t da[t] P[t + j]

Rows are tokens, columns channels: every load is a contiguous run of channels. The forward's
shifted rows P[t + j] of one block overlap the next block's, and come from L1/L2; the backward
walks its rows in order and carries the last K-1 rows of P and da.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .triton_kernels import _CACHE

BT, BC = 32, 128  # rows (tokens) and channels of a forward program; the backward takes BC channels too
ROWS = (32, 64, 128)  # the rows per program the backward's autotuner may pick
MAX_K = 4  # taps the kernels take (conv.py runs longer convs in PyTorch)
EPS = tl.constexpr(1e-12)  # F.normalize's (a constexpr: kernels may read no other globals)


def _warps():
    """4 or 8 warps, autotuned per width; one config under the interpreter, where timing means
    nothing, and with ATLAS_TRITON_TUNE=0."""
    if os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("ATLAS_TRITON_TUNE") == "0":
        return [triton.Config({}, num_warps=4)]
    return [triton.Config({}, num_warps=w) for w in (4, 8)]


def _rows():
    """_bwd's rows per program and warps (its channels: one normalised group fits BC)."""
    if os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("ATLAS_TRITON_TUNE") == "0":
        return [triton.Config({"R": ROWS[0], "BC": BC}, num_warps=4)]
    return [triton.Config({"R": r, "BC": BC}, num_warps=w) for r in ROWS for w in (1, 2, 4)]


@triton.jit
def _padded_rows(X, HALO, b, r, rc, T, C, K: tl.constexpr):
    """Rows r of P = halo ++ x for batch b (r < 0 reads the halo), (len(r), len(rc)), float32."""
    cm = (rc < C)[None, :]
    xv = tl.load(X + (b * T + r)[:, None] * C + rc[None, :], mask=((r >= 0) & (r < T))[:, None] & cm, other=0.0)
    hv = tl.load(HALO + (b * (K - 1) + (K - 1) + r)[:, None] * C + rc[None, :],
                 mask=((r < 0) & (r >= 1 - K))[:, None] & cm, other=0.0)
    return xv.to(tl.float32) + hv.to(tl.float32)


@triton.jit
def _act(X, HALO, Wt, b, rt, rc, T, C, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """a for rows rt: (BT, BC) float32."""
    a = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(K):
        wj = tl.load(Wt + rc * K + j, mask=rc < C, other=0.0).to(tl.float32)
        a += _padded_rows(X, HALO, b, rt + j - (K - 1), rc, T, C, K) * wj[None, :]
    return a


@triton.jit
def _group_sums(x, BT: tl.constexpr, BC: tl.constexpr, GROUP: tl.constexpr):
    """(BT, BC) -> the sum over each group of GROUP columns, broadcast back to (BT, BC)."""
    g = tl.sum(tl.reshape(x, (BT, BC // GROUP, GROUP)), 2)  # (BT, BC // GROUP)
    return tl.reshape(tl.broadcast_to(g[:, :, None], (BT, BC // GROUP, GROUP)), (BT, BC))


@triton.autotune(configs=_warps(), key=["C", "K", "GROUP"], **_CACHE)
@triton.jit
def _fwd(X, HALO, Wt, Y, T, C, NORM, K: tl.constexpr, GROUP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """Grid (B, T/BT, C/BC). GROUP = 0: no normalisation."""
    b = tl.program_id(0).to(tl.int64)
    rt = tl.program_id(1) * BT + tl.arange(0, BT)
    rc = tl.program_id(2) * BC + tl.arange(0, BC)
    a = _act(X, HALO, Wt, b, rt, rc, T, C, K, BT, BC)
    y = a * tl.sigmoid(a)
    if GROUP > 0:  # F.normalize: y / max(||y||, eps)
        den = tl.maximum(tl.sqrt(_group_sums(y * y, BT, BC, GROUP)), EPS)
        y = tl.where((rc < NORM)[None, :], y / den, y)
    tl.store(Y + (b * T + rt)[:, None] * C + rc[None, :], y.to(Y.dtype.element_ty),
             mask=(rt < T)[:, None] & (rc < C)[None, :])


@triton.jit
def _prow(X, HALO, b, p, rc, T, C, K: tl.constexpr):
    """Row p of P = halo ++ x for batch b, (BC,) float32; zeros outside [0, K-1+T)."""
    cm, pv = rc < C, p + 0 * rc  # the row as a vector: masks of vectors (the interpreter's & of a
    # vector and a scalar bool comes out int32)
    xv = tl.load(X + (b * T + p - (K - 1)) * C + rc, mask=cm & (pv >= K - 1) & (pv < K - 1 + T), other=0.0)
    hv = tl.load(HALO + (b * (K - 1) + p) * C + rc, mask=cm & (pv >= 0) & (pv < K - 1), other=0.0)
    return xv.to(tl.float32) + hv.to(tl.float32)


@triton.jit
def _dyrow(DY, b, t, rc, T, C):
    """Row t of dy (BC,) float32, zeros outside [0, T)."""
    tv = t + 0 * rc
    return tl.load(DY + (b * T + t) * C + rc, mask=(rc < C) & (tv >= 0) & (tv < T), other=0.0).to(tl.float32)


@triton.jit
def _tap(Wt, rc, C, J: tl.constexpr, K: tl.constexpr, BC: tl.constexpr):
    """w[:, J] (BC,) float32; zeros for a tap before the first (J < 0, when K < 4)."""
    w = tl.zeros([BC], dtype=tl.float32)
    if J >= 0:
        w = tl.load(Wt + rc * K + J, mask=rc < C, other=0.0).to(tl.float32)
    return w


@triton.jit
def _row_sums(x, BC: tl.constexpr, GROUP: tl.constexpr):
    """(BC,) -> the sum over each group of GROUP channels, broadcast back to (BC,)."""
    g = tl.sum(tl.reshape(x, (BC // GROUP, GROUP)), 1)
    return tl.reshape(tl.broadcast_to(g[:, None], (BC // GROUP, GROUP)), (BC,))


@triton.jit
def _da(a, dy, rc, NORM, BC: tl.constexpr, GROUP: tl.constexpr):
    """da = dy * silu'(a) for one row, dy first through the normalisation's backward."""
    s = tl.sigmoid(a)
    if GROUP > 0:  # u = y / max(n, eps), n = ||y||: dy/den - u (u . dy)/den where n > eps, else dy/eps
        y = a * s
        n = tl.sqrt(_row_sums(y * y, BC, GROUP))
        den = tl.maximum(n, EPS)
        u = y / den
        dyn = dy / den - tl.where(n > EPS, u * _row_sums(u * dy, BC, GROUP) / den, 0.0)
        dy = tl.where(rc < NORM, dyn, dy)
    return dy * s * (1 + a * (1 - s))


# reset_to_zero: configs differ in their number of programs, each writing its own share of dw
@triton.autotune(configs=_rows(), key=["C", "K", "GROUP"], reset_to_zero=["DWP"], **_CACHE)
@triton.jit
def _bwd(X, HALO, Wt, DY, DX, DHALO, DWP, T, C, NORM, K: tl.constexpr, GROUP: tl.constexpr, R: tl.constexpr,
         BC: tl.constexpr):
    """The whole backward in one pass, a row at a time: program (b, pb, c) owns rows t = p of
    [pb*R, pb*R + R) and walks them in order, carrying the last K-1 rows of P and of da in
    registers (da[t] recomputed for the K-1 rows before its first): dP[t] = sum_j da[t - j] w[:, j]
    (the halo's rows to DHALO, the rest to DX) and its share of dw[j] = sum_t da[t] P[t + j]
    (DWP (B*programs, C, K) float32). Grid (B, (K-1+T)/R, C/BC).

    Rows, not (rows x channels) tiles: a tile cannot shift its rows in registers. The two passes
    this replaces (da written out in bf16, then read back at K shifts) took 0.194 ms a call at the
    300M model's shape, this 0.109 with 32 rows and 1 warp picked; loading two rows ahead, or 16
    rows or 256 channels a program, gained nothing (benchmarks/results/model_ab_h100_conv_rows.json)."""
    b = tl.program_id(0).to(tl.int64)
    pb = tl.program_id(1)
    rc = tl.program_id(2) * BC + tl.arange(0, BC)
    cm = rc < C
    # a[t] = sum_m P[t+K-1-m] v_m with v_m = w[:, K-1-m]; the carried rows are newest first
    v0, v1 = _tap(Wt, rc, C, K - 1, K, BC), _tap(Wt, rc, C, K - 2, K, BC)
    v2, v3 = _tap(Wt, rc, C, K - 3, K, BC), _tap(Wt, rc, C, K - 4, K, BC)
    t0 = pb * R - (K - 1)  # the first row whose da the program needs
    p1, p2, p3 = _prow(X, HALO, b, t0 + K - 2, rc, T, C, K), _prow(X, HALO, b, t0 + K - 3, rc, T, C, K), \
        _prow(X, HALO, b, t0 + K - 4, rc, T, C, K)  # P[t+K-2], P[t+K-3], P[t+K-4] for t = t0
    d1 = tl.zeros([BC], dtype=tl.float32)  # da[t-1], da[t-2], da[t-3]
    d2 = tl.zeros([BC], dtype=tl.float32)
    d3 = tl.zeros([BC], dtype=tl.float32)
    w0 = tl.zeros([BC], dtype=tl.float32)  # this program's dw[:, j], j = K-1-m: sum da[t] P[t+K-1-m]
    w1 = tl.zeros([BC], dtype=tl.float32)
    w2 = tl.zeros([BC], dtype=tl.float32)
    w3 = tl.zeros([BC], dtype=tl.float32)
    # the next row's loads are issued before this row computes (the walk is latency-bound)
    np0 = _prow(X, HALO, b, t0 + K - 1, rc, T, C, K)
    ndy = _dyrow(DY, b, t0, rc, T, C)
    for i in range(R + K - 1):
        t = t0 + i
        tv = t + 0 * rc  # as a vector, for masks (see _prow)
        p0, dy = np0, ndy
        np0 = _prow(X, HALO, b, t + K, rc, T, C, K)
        ndy = _dyrow(DY, b, t + 1, rc, T, C)
        a = p0 * v0 + p1 * v1 + p2 * v2 + p3 * v3
        da = tl.where((tv >= 0) & (tv < T), _da(a, dy, rc, NORM, BC, GROUP), 0.0)
        if i >= K - 1:  # t is this program's: dP[t] and t's share of dw
            d = da * v0  # dP[t] = sum_j da[t - j] w[:, j], w[:, j] = v_(K-1-j)
            if K == 2:
                d = da * v1 + d1 * v0
            elif K == 3:
                d = da * v2 + d1 * v1 + d2 * v0
            elif K == 4:
                d = da * v3 + d1 * v2 + d2 * v1 + d3 * v0
            tl.store(DX + (b * T + t - (K - 1)) * C + rc, d.to(DX.dtype.element_ty),
                     mask=cm & (tv >= K - 1) & (tv < K - 1 + T))
            tl.store(DHALO + (b * (K - 1) + t) * C + rc, d.to(DHALO.dtype.element_ty),
                     mask=cm & (tv >= 0) & (tv < K - 1))
            w0 += da * p0
            w1 += da * p1
            w2 += da * p2
            w3 += da * p3
        p1, p2, p3 = p0, p1, p2
        d1, d2, d3 = da, d1, d2
    base = DWP + ((b * tl.num_programs(1) + pb) * C + rc) * K  # (BC,) this program's share of dw
    tl.store(base + K - 1, w0, mask=cm)
    if K > 1:
        tl.store(base + K - 2, w1, mask=cm)
    if K > 2:
        tl.store(base + K - 3, w2, mask=cm)
    if K > 3:
        tl.store(base + K - 4, w3, mask=cm)


@torch.library.custom_op("atlas::conv_silu_fwd", mutates_args=())
def _conv_fwd(x: torch.Tensor, w: torch.Tensor, halo: torch.Tensor, norm: int, group: int) -> torch.Tensor:
    """group: 0, or a power of two dividing BC (conv.py checks)."""
    B, T, C = x.shape
    y = torch.empty_like(x)
    _fwd[(B, triton.cdiv(T, BT), triton.cdiv(C, BC))](x, halo, w, y, T, C, norm, K=w.shape[1], GROUP=group,
                                                       BT=BT, BC=BC)
    return y


@_conv_fwd.register_fake
def _(x, w, halo, norm, group):
    return torch.empty_like(x)


@torch.library.custom_op("atlas::conv_silu_bwd", mutates_args=())
def _conv_bwd(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, halo: torch.Tensor, norm: int,
              group: int) -> list[torch.Tensor]:
    B, T, C = x.shape
    K = w.shape[1]
    dx, dhalo = torch.empty_like(x), torch.empty_like(halo)
    most = triton.cdiv(K - 1 + T, min(ROWS))  # programs along the rows with the fewest rows each
    dwp = torch.zeros(B * most, C, K, device=x.device, dtype=torch.float32)  # per-program shares of dw
    _bwd[lambda m: (B, triton.cdiv(K - 1 + T, m["R"]), triton.cdiv(C, m["BC"]))](
        x, halo, w, dy.contiguous(), dx, dhalo, dwp, T, C, norm, K=K, GROUP=group)
    return [dx, dwp.sum(0).to(w.dtype), dhalo]


@_conv_bwd.register_fake
def _(dy, x, w, halo, norm, group):
    return [torch.empty_like(x), torch.empty_like(w), torch.empty_like(halo)]


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3])
    ctx.norm = inputs[3:]


def _backward(ctx, dy):
    return (*_conv_bwd(dy, *ctx.saved_tensors, *ctx.norm), None, None)


_conv_fwd.register_autograd(_backward, setup_context=_setup)


def conv_silu_triton(x: torch.Tensor, w: torch.Tensor, halo: torch.Tensor, norm: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """conv.py's conv_silu on the kernels: x (B, T, C), w (C, K), halo (B, K-1, C); norm (cols,
    group) with group a power of two up to BC."""
    cols, group = norm
    return _conv_fwd(x.contiguous(), w.contiguous(), halo.to(x.dtype).contiguous(), cols, group if cols else 0)
