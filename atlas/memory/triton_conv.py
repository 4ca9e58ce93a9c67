"""Triton kernels of conv.py's causal depthwise conv + SiLU, as a `torch.library.custom_op` (so
torch.compile traces around it). Float32 accumulation; x, y, dy in their own dtype.

    forward   y = silu(a),  a[t] = sum_j P[t + j] w[:, j],  P = halo ++ x         one pass over x
              (columns < NORM: y / ||y|| over each group of GROUP columns, in the same tile)
    backward  da = dy * silu'(a)  (a recomputed; dy first through the normalisation)  pass 1
              dP[p] = sum_j da[p - j] w[:, j]  -> dhalo = dP[:K-1], dx = dP[K-1:]
              and dw[:, j] = sum_p da[p - j] P[p]                                   pass 2

Rows are tokens, columns channels: every load is a contiguous run of channels. The shifted rows
P[t + j] of one block overlap the next block's, and come from L1/L2.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .triton_kernels import _CACHE

BT, BC = 32, 128  # rows (tokens) and channels per program
BWD_ROWS = (16, 32)  # the rows per program _bwd_in's autotuner may pick
NB = 4  # row blocks per program of the backward's second pass: fewer shares of dw to sum
MAX_K = 4  # taps the kernels take (conv.py runs longer convs in PyTorch)
EPS = tl.constexpr(1e-12)  # F.normalize's (a constexpr: kernels may read no other globals)


def _warps():
    """4 or 8 warps, autotuned per width; one config under the interpreter, where timing means
    nothing, and with ATLAS_TRITON_TUNE=0."""
    if os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("ATLAS_TRITON_TUNE") == "0":
        return [triton.Config({}, num_warps=4)]
    return [triton.Config({}, num_warps=w) for w in (4, 8)]


def _tiles():
    """_bwd_in's tile (rows, channels) and warps: its per-tap accumulators are K tiles of float32,
    which at 32 x 128 and 4 warps leave little room in registers."""
    if os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("ATLAS_TRITON_TUNE") == "0":
        return [triton.Config({"BT": BT, "BC": BC}, num_warps=4)]
    return [triton.Config({"BT": bt, "BC": bc}, num_warps=w) for bt in BWD_ROWS for bc in (64, 128) for w in (4, 8)]


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


@triton.autotune(configs=_warps(), key=["C", "K", "GROUP"], **_CACHE)
@triton.jit
def _bwd_act(X, HALO, Wt, DY, DA, T, C, NORM, K: tl.constexpr, GROUP: tl.constexpr, BT: tl.constexpr,
             BC: tl.constexpr):
    """da = dy * silu'(a), dy first through the normalisation's backward. Grid (B, T/BT, C/BC)."""
    b = tl.program_id(0).to(tl.int64)
    rt = tl.program_id(1) * BT + tl.arange(0, BT)
    rc = tl.program_id(2) * BC + tl.arange(0, BC)
    m = (rt < T)[:, None] & (rc < C)[None, :]
    a = _act(X, HALO, Wt, b, rt, rc, T, C, K, BT, BC)
    s = tl.sigmoid(a)
    off = (b * T + rt)[:, None] * C + rc[None, :]
    dy = tl.load(DY + off, mask=m, other=0.0).to(tl.float32)
    if GROUP > 0:  # u = y / max(n, eps), n = ||y||: dy/den - u (u . dy)/den where n > eps, else dy/eps
        y = a * s
        n = tl.sqrt(_group_sums(y * y, BT, BC, GROUP))
        den = tl.maximum(n, EPS)
        u = y / den
        dyn = dy / den - tl.where(n > EPS, u * _group_sums(u * dy, BT, BC, GROUP) / den, 0.0)
        dy = tl.where((rc < NORM)[None, :], dyn, dy)
    da = dy * s * (1 + a * (1 - s))
    tl.store(DA + off, da.to(DA.dtype.element_ty), mask=m)


# reset_to_zero: configs differ in their number of programs, each writing its own share of dw
@triton.autotune(configs=_tiles(), key=["C", "K"], reset_to_zero=["DWP"], **_CACHE)
@triton.jit
def _bwd_in(X, HALO, DA, Wt, DX, DHALO, DWP, T, C, K: tl.constexpr, NB: tl.constexpr, BT: tl.constexpr,
            BC: tl.constexpr):
    """dP over NB blocks of padded rows p in [0, K-1+T): the halo's rows to DHALO, the rest to DX;
    and this program's share of dw[j] = sum_p da[p - j] P[p] (DWP (B*programs, C, K) float32,
    zero where a config has fewer programs). Grid (B, (K-1+T)/(NB*BT), C/BC)."""
    b = tl.program_id(0).to(tl.int64)
    pb = tl.program_id(1)
    rc = tl.program_id(2) * BC + tl.arange(0, BC)
    cm = (rc < C)[None, :]
    # dw[j]'s products summed over rows once at the end: a reduction across rows per block cost 3x
    # the pass. One accumulator per tap, so K <= MAX_K.
    w0 = tl.zeros([BT, BC], dtype=tl.float32)
    w1 = tl.zeros([BT, BC], dtype=tl.float32)
    w2 = tl.zeros([BT, BC], dtype=tl.float32)
    w3 = tl.zeros([BT, BC], dtype=tl.float32)
    for i in range(NB):
        rp = (pb * NB + i) * BT + tl.arange(0, BT)
        P = _padded_rows(X, HALO, b, rp - (K - 1), rc, T, C, K)  # (BT, BC) P[p]
        d = tl.zeros([BT, BC], dtype=tl.float32)
        for j in tl.static_range(K):
            t = rp - j  # a[t] read P[t + j] = P[p]
            wj = tl.load(Wt + rc * K + j, mask=rc < C, other=0.0).to(tl.float32)
            da = tl.load(DA + (b * T + t)[:, None] * C + rc[None, :], mask=((t >= 0) & (t < T))[:, None] & cm,
                         other=0.0).to(tl.float32)
            d += da * wj[None, :]
            if j == 0:
                w0 += da * P
            elif j == 1:
                w1 += da * P
            elif j == 2:
                w2 += da * P
            else:
                w3 += da * P
        r = rp - (K - 1)  # row of x
        tl.store(DX + (b * T + r)[:, None] * C + rc[None, :], d.to(DX.dtype.element_ty),
                 mask=((r >= 0) & (r < T))[:, None] & cm)
        tl.store(DHALO + (b * (K - 1) + rp)[:, None] * C + rc[None, :], d.to(DHALO.dtype.element_ty),
                 mask=(rp < K - 1)[:, None] & cm)
    base = DWP + ((b * tl.num_programs(1) + pb) * C + rc) * K  # (BC,) this program's share of dw
    for j in tl.static_range(K):
        if j == 0:
            tl.store(base + j, tl.sum(w0, 0), mask=rc < C)
        elif j == 1:
            tl.store(base + j, tl.sum(w1, 0), mask=rc < C)
        elif j == 2:
            tl.store(base + j, tl.sum(w2, 0), mask=rc < C)
        else:
            tl.store(base + j, tl.sum(w3, 0), mask=rc < C)


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
    da = torch.empty_like(x)
    _bwd_act[(B, triton.cdiv(T, BT), triton.cdiv(C, BC))](x, halo, w, dy.contiguous(), da, T, C, norm, K=K,
                                                          GROUP=group, BT=BT, BC=BC)
    dx, dhalo = torch.empty_like(x), torch.empty_like(halo)
    nb = min(NB, triton.cdiv(K - 1 + T, min(BWD_ROWS)))
    most = triton.cdiv(K - 1 + T, nb * min(BWD_ROWS))  # programs along the rows with the smallest tile
    dwp = torch.zeros(B * most, C, K, device=x.device, dtype=torch.float32)  # per-program shares of dw
    _bwd_in[lambda m: (B, triton.cdiv(K - 1 + T, nb * m["BT"]), triton.cdiv(C, m["BC"]))](
        x, halo, da, w, dx, dhalo, dwp, T, C, K=K, NB=nb)
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
