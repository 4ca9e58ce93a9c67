"""Triton kernels of the memory scan (DESIGN.md §1): two sequential passes over sub-chunks for the
states, three parallel kernels (one forward, two backward) for everything else. triton_scan.py
prepares their inputs.

Per (batch, head) and sub-chunk s, with Q (BT, Dk) the sub-chunk's phi(q), K (BL, Dk) and V (BL, Dv)
its window keys and values (W-1 halo rows first), Ms, Ss (Dv, Dk) the memory and momentum at the
sub-chunk start and Mr (Dv, Dk) the memory at the start of the chunk holding s (where gradients
are taken; Mr = Ms unless a chunk spans several sub-chunks):

    E  = clamp(K Mr^T - V)                                  errors, Huber-clipped when asked
    Y  = P * (Q Ms^T) + f * (Q Ss^T) - (G * Q K^T) E         rows of P, f scale rows
    M' = pl Ms + fl Ss - (gl * E)^T K        S' = pel Ss - (cs * E)^T K

G, P, f, gl, cs, pl, fl, pel hold every gate (triton_scan.py builds them). Every matmul
accumulates in float32. q/k/v may be bf16 in memory; then the per-sub-chunk states Ms, Ss and
their cotangents dM', dS' are stored in bf16 too (the sequential passes carry M, S, dM, dS in
float32 registers and round only the copies they store), so the parallel kernels multiply bf16
by bf16 on the tensor cores instead of float32 at TF32 -- in the 300M step their time fell from
19.5 to 9.6 ms with the error against `chunked` unchanged (benchmarks/README.md). The sequential
passes' own products take the same bf16 copies (of Mr, dM, dS, and of E, dE) against bf16 k:
their iterations cost more than in proportion to the key rows (benchmarks/README.md, wide keys),
which a float32 copy of k (64 registers a thread at 64 x 128) made worse. The parallel kernels'
float32 intermediates meet the tensor cores rounded to bf16 the same way: E in (G * Q K^T) E and
dY E^T, the cotangent dA of Q K^T in dQ and dK. E itself is computed once, by _fwd_state (which
needs it for M' and S'), and stored (Es, in the states' dtype) for _fwd_out, _bwd_q and _bwd_k.
Tensor layouts (all contiguous): Q, Y, dY, dQ (B, T, H, D) and K, V (B, W-1+T, H, D) (the window
halo's rows first), read and written in place: sub-chunk s holds tokens QSTART[s] + r for
r < QLEN[s] (its other BT - QLEN[s] rows are padding), and keys from W-1 before; the key-side
gradients dK and -dE (DVB) per sub-chunk row in the padded layout (B, NSC, BL, H, D), summed
over a token's copies afterwards;
G (B, H, NSC, BT, BL); P, f (B, H, NSC, BT); gl, cs (B, H, NSC, BL); LAST = (pl, fl, pel)
(B, H, NSC, 3); states M0, S0 (B, H, Dv, Dk) float32; per-sub-chunk states (B, H, NSC, Dv, Dk)
in q's dtype (float32 for float32 q);
REF (NSC,) int32: the first sub-chunk of s's chunk.
"""
from __future__ import annotations

import inspect
import os

import triton
import triton.language as tl


def _configs(bvs, warps, stages=(2,)):
    """A few block shapes for H100. One under the CPU interpreter, where timing means nothing, and
    one with ATLAS_TRITON_TUNE=0 (tests on many small shapes: compile each once, not per config).
    Configs that do not fit (shared memory) are skipped by the autotuner. Pipeline stages 1-3 are
    offered to _bwd_k alone, where they paid in the 300M step (4.79 -> 4.25 ms, with BV 64); the
    other four kernels did not move with them (benchmarks/README.md, sixth session)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BV": 16}, num_warps=4)]
    if os.environ.get("ATLAS_TRITON_TUNE") == "0":
        return [triton.Config({"BV": 32}, num_warps=4, num_stages=2)]
    return [triton.Config({"BV": bv}, num_warps=w, num_stages=n) for bv in bvs for w in warps for n in stages]


# The sequential passes run one program per (batch, head, block of BV value rows), and every
# program walks all the sub-chunks: more, smaller blocks (8 or 4 rows; tl.dot pads M and N below
# 16, only K must reach 16) do not shorten that chain, but lighter iterations may (at B=1, T=32K
# _bwd_state took 8 rows), while at B=16 fewer, larger blocks win (32 rows). The best block
# follows the number of (batch, head) pairs, BH, which is in the autotune key for that reason:
# without it the first shape tuned set the blocks for every other (benchmarks/README.md, twelfth
# session: B=1, T=32K 9.38 ms on blocks tuned at B=16, 8.11 tuned at its own shape).
_SEQ_CONFIGS = _configs([4, 8, 16, 32], [4])


# Triton >= 3.4 keeps autotune timings in its on-disk cache: a second process (the next training
# run, the eval after it) skips the ~1 min of tuning a new shape costs.
_CACHE = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


# the number of sub-chunks and of tokens (the kernels read q, k, v in place) follow T: left
# unspecialised, a new sequence length (every prefill piece, every TNT stage) reuses the compiled
# kernel instead of compiling it again
_ANY_T = ["NSC", "T"]
_ANY_BH = _ANY_T + ["BH"]  # the sequential passes': B*H is in their autotune key (_SEQ_CONFIGS)


# Tiles are addressed as rows r0 + rr of a row-major matrix with row stride ld: r0 a scalar (int64:
# the tensors pass 2^31 elements), rr the rows' offsets from it (int32, the same for every
# sub-chunk). Each tile's address then costs one 64-bit scalar and a loop-invariant int32 tile;
# rows computed per element in int64 cost the sequential passes' loops 13-14% of their instructions
# (benchmarks/kernel_regs.py --loop; _bwd_state 7% faster at B=1, T=32K, _fwd_state, which mostly
# waits, unchanged: benchmarks/README.md).
@triton.jit
def _at(ptr, r0, rr, cols, ld):
    """Pointers to the (len(rr), len(cols)) tile at rows r0 + rr."""
    return ptr + r0 * ld + (rr[:, None] * ld + cols[None, :])


@triton.jit
def _atT(ptr, r0, rr, cols, ld):
    """_at's pointers transposed, (len(cols), len(rr))."""
    return ptr + r0 * ld + (rr[None, :] * ld + cols[:, None])


@triton.jit
def _tile(ptr, r0, rr, cols, ld, ncols):
    """Load a tile of a row-major matrix, widened to float32."""
    return tl.load(_at(ptr, r0, rr, cols, ld), mask=cols[None, :] < ncols, other=0.0).to(tl.float32)


@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    """a @ b accumulated in float32: bf16 operands multiply exactly, float32 ones at PREC."""
    if a.dtype == tl.float32:
        c = tl.dot(a, b, input_precision=PREC)
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def _state(ptr, base, rv, rk, DV, DK):
    """Load the (BV, BK) tile at rows rv of the (Dv, Dk) float32 state starting at ptr + base."""
    return tl.load(ptr + base + (rv[:, None] * DK + rk[None, :]), mask=(rv[:, None] < DV) & (rk[None, :] < DK),
                   other=0.0)


@triton.jit
def _qrows(QSTART, QLEN, b, s, rt, T, H, h):
    """Sub-chunk s's query rows in the (B, T, H, D) token layout, as rows r0 + rr of a (B*T*H, D)
    matrix, and which of its BT rows are real tokens (the rest is padding: loads read zeros,
    stores skip it)."""
    return (b * T + tl.load(QSTART + s)) * H + h, rt * H, rt < tl.load(QLEN + s)


@triton.jit
def _krows(QSTART, QLEN, b, s, rl, T, W1, H, h):
    """Sub-chunk s's key rows in place in the (B, W-1+T, H, D) halo-first layout (its W-1 halo
    rows, then its own), as _qrows, and which of its BL rows are real."""
    return (b * (T + W1) + tl.load(QSTART + s)) * H + h, rl * H, rl < tl.load(QLEN + s) + W1


@triton.jit
def _rraw(ptr, r0, rr, ok, cols, ld, ncols):
    """A tile in the tensor's own dtype (bf16 operands feed the tensor cores as they are), zeros on
    the rows where not ok."""
    return tl.load(_at(ptr, r0, rr, cols, ld), mask=ok[:, None] & (cols[None, :] < ncols), other=0.0)


@triton.jit
def _rstore(ptr, r0, rr, ok, cols, ld, ncols, x):
    tl.store(_at(ptr, r0, rr, cols, ld), x.to(ptr.dtype.element_ty), mask=ok[:, None] & (cols[None, :] < ncols))


@triton.jit
def _store(ptr, r0, rr, cols, ld, ncols, x):
    tl.store(_at(ptr, r0, rr, cols, ld), x.to(ptr.dtype.element_ty), mask=cols[None, :] < ncols)


@triton.jit
def _rawT(ptr, r0, rr, ok, cols, ld, ncols):
    """_rraw's tile transposed, (len(cols), len(rr)), read as such: the sequential passes hold
    value rows first (below), and a transposed load costs nothing on their loop's path."""
    return tl.load(_atT(ptr, r0, rr, cols, ld), mask=ok[None, :] & (cols[:, None] < ncols), other=0.0)


@triton.jit
def _storeT(ptr, r0, rr, cols, ld, ncols, xt):
    """_store of xt = x transposed, (len(cols), len(rr))."""
    tl.store(_atT(ptr, r0, rr, cols, ld), xt.to(ptr.dtype.element_ty), mask=cols[:, None] < ncols)


@triton.jit
def _fwd_state_ins(K, V, GL, CS, LAST, QSTART, QLEN, bh, b, h, s, NSC, T, W1, H, rl, rk, rv, DK, DV,
                   BL: tl.constexpr):
    """_fwd_state's inputs of sub-chunk s: K (BL, BK) raw, V^T (BV, BL), gl, cs (BL,), pl, fl, pel."""
    k0, kr, kok = _krows(QSTART, QLEN, b, s, rl, T, W1, H, h)
    g0, lo = (bh * NSC + s) * BL, (bh * NSC + s) * 3
    return (_rraw(K, k0, kr, kok, rk, DK, DK), _rawT(V, k0, kr, kok, rv, DV, DV).to(tl.float32), tl.load(GL + g0 + rl),
            tl.load(CS + g0 + rl), tl.load(LAST + lo), tl.load(LAST + lo + 1), tl.load(LAST + lo + 2))


@triton.autotune(configs=_SEQ_CONFIGS, key=["BL", "BK", "DV", "BH"], **_CACHE)
@triton.jit(do_not_specialize=_ANY_BH)
def _fwd_state(K, V, GL, CS, LAST, REF, QSTART, QLEN, M0, S0, MS, SS, ES, MOUT, SOUT, NSC, T, W1, H, BH, DK, DV, delta,
               BL: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               HUBER: tl.constexpr, BIG: tl.constexpr, PREC: tl.constexpr):
    """Sequential over sub-chunks: store Ms, Ss at each start and each sub-chunk's errors E, return
    the final M, S. Grid (B*H, Dv/BV)."""
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    rv = tl.program_id(1) * BV + tl.arange(0, BV)
    rk, rl = tl.arange(0, BK), tl.arange(0, BL)
    sm = (rv[:, None] < DV) & (rk[None, :] < DK)
    st = rv[:, None] * DK + rk[None, :]  # (BV, BK) offsets inside one (Dv, Dk) state
    M = tl.load(M0 + bh * DV * DK + st, mask=sm, other=0.0)
    S = tl.load(S0 + bh * DV * DK + st, mask=sm, other=0.0)
    Mr = M
    # the next sub-chunk's inputs are loaded while this one computes (the loop is latency-bound):
    # 3.52 -> 3.19 ms in the 300M step. In _bwd_state the same cost more than it hid (6.4 -> 11.2
    # ms; 7.1 prefetching only its small inputs). Separate names, not a tuple: older Triton
    # carries no tuples through loops.
    nk, nvt, ngl, ncs, npl, nfl, npel = _fwd_state_ins(K, V, GL, CS, LAST, QSTART, QLEN, bh, b, h, 0, NSC, T, W1, H,
                                                      rl, rk, rv, DK, DV, BL)
    for s in range(NSC):
        k, vt, gl, cs, pl, fl, pel = nk, nvt, ngl, ncs, npl, nfl, npel
        nk, nvt, ngl, ncs, npl, nfl, npel = _fwd_state_ins(K, V, GL, CS, LAST, QSTART, QLEN, bh, b, h,
                                                          tl.minimum(s + 1, NSC - 1), NSC, T, W1, H, rl, rk, rv,
                                                          DK, DV, BL)
        if BIG:  # a chunk starts here: gradients of its sub-chunks are taken at this M
            Mr = tl.where(tl.load(REF + s) == s, M, Mr)
        else:
            Mr = M
        o = (bh * NSC + s) * DV * DK
        tl.store(MS + o + st, M.to(MS.dtype.element_ty), mask=sm)  # bf16 copies with bf16 q, k, v
        tl.store(SS + o + st, S.to(SS.dtype.element_ty), mask=sm)
        # products in k's dtype (bf16: the tensor cores' full rate and half the registers of a
        # float32 copy of k), accumulated in float32; M and S stay float32. The errors are held
        # transposed, value rows first like M: each product's result is the next one's left
        # operand as it sits in registers, with no transpose through shared memory on the path
        # from M to M'.
        Et = _mm(Mr.to(k.dtype), tl.trans(k), PREC) - vt  # (BV, BL) = E^T
        if HUBER:
            Et = tl.minimum(tl.maximum(Et, -delta), delta)
        # the parallel kernels read E (rounded like the states) instead of recomputing K Mr^T - V
        _storeT(ES, (bh * NSC + s) * BL, rl, rv, DV, DV, Et)
        M_next = pl * M + fl * S - _mm((Et * gl[None, :]).to(k.dtype), k, PREC)
        S = pel * S - _mm((Et * cs[None, :]).to(k.dtype), k, PREC)
        M = M_next
    tl.store(MOUT + bh * DV * DK + st, M, mask=sm)
    tl.store(SOUT + bh * DV * DK + st, S, mask=sm)


@triton.autotune(configs=_configs([32, 64], [4, 8]), key=["BT", "BL", "BK", "DV"], **_CACHE)
@triton.jit(do_not_specialize=_ANY_T)
def _fwd_out(Q, K, ES, G, P, F, QSTART, QLEN, MS, SS, Y, AS, NSC, T, W1, H, DK, DV,
             BT: tl.constexpr, BL: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """Y of one sub-chunk and one Dv tile, and A = G * Q K^T in q's dtype (AS, for _bwd_state).
    Grid (NSC, B*H, Dv/BV)."""
    s = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    rv = tl.program_id(2) * BV + tl.arange(0, BV)
    rk, rl, rt = tl.arange(0, BK), tl.arange(0, BL), tl.arange(0, BT)
    q0, qr, qok = _qrows(QSTART, QLEN, b, s, rt, T, H, h)
    k0, kr, kok = _krows(QSTART, QLEN, b, s, rl, T, W1, H, h)
    q, k = _rraw(Q, q0, qr, qok, rk, DK, DK), _rraw(K, k0, kr, kok, rk, DK, DK)  # (BT, BK), (BL, BK)
    g0 = (bh * NSC + s) * BT  # rows g0 + rt of the per-sub-chunk-row tensors
    A = _mm(q, tl.trans(k), PREC) * _tile(G, g0, rt, rl, BL, BL)  # (BT, BL)
    if tl.program_id(2) == 0:  # the backward's sequential pass reads A instead of recomputing it
        _store(AS, g0, rt, rl, BL, BL, A)
    o = (bh * NSC + s) * DV * DK
    # the stored states are in q's dtype: bf16 products at full tensor-core rate
    Ms, Ss = _state(MS, o, rv, rk, DV, DK), _state(SS, o, rv, rk, DV, DK)  # (BV, BK)
    E = _rraw(ES, (bh * NSC + s) * BL, rl, rl < BL, rv, DV, DV)  # (BL, BV) as _fwd_state stored it
    y = (tl.load(P + g0 + rt)[:, None] * _mm(q, tl.trans(Ms), PREC)
         + tl.load(F + g0 + rt)[:, None] * _mm(q, tl.trans(Ss), PREC)
         - _mm(A.to(q.dtype), E.to(q.dtype), PREC))  # (BT, BV): A as stored, E rounded like it
    _rstore(Y, q0, qr, qok, rv, DV, DV, y)


@triton.autotune(configs=_SEQ_CONFIGS, key=["BT", "BL", "BK", "DV", "BH"], **_CACHE)
@triton.jit(do_not_specialize=_ANY_BH)
def _bwd_state(Q, K, V, AS, P, F, GL, CS, LAST, REF, QSTART, QLEN, MS, DY, DMOUT, DSOUT, DME, DSE, DVB, DM0, DS0,
               NSC, T, W1, H, BH, DK, DV, delta, BT: tl.constexpr, BL: tl.constexpr, BK: tl.constexpr,
               BV: tl.constexpr, HUBER: tl.constexpr, BIG: tl.constexpr, PREC: tl.constexpr):
    """Reverse pass over sub-chunks: store the cotangents dM', dS' of each sub-chunk's end states
    and dV (= minus the error cotangent); return dM0, dS0.
    Grid (B*H, Dv/BV)."""
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    rv = tl.program_id(1) * BV + tl.arange(0, BV)
    rk, rl, rt = tl.arange(0, BK), tl.arange(0, BL), tl.arange(0, BT)
    sm = (rv[:, None] < DV) & (rk[None, :] < DK)
    st = rv[:, None] * DK + rk[None, :]
    dM = tl.load(DMOUT + bh * DV * DK + st, mask=sm, other=0.0)  # (BV, BK) cotangent of the running M
    dS = tl.load(DSOUT + bh * DV * DK + st, mask=sm, other=0.0)
    dMr = tl.zeros([BV, BK], dtype=tl.float32)  # cotangent of the chunk-start M, from the errors
    for i in range(NSC):
        s = NSC - 1 - i
        o = (bh * NSC + s) * DV * DK
        dMb, dSb = dM.to(DME.dtype.element_ty), dS.to(DSE.dtype.element_ty)  # the stored copies
        tl.store(DME + o + st, dMb, mask=sm)
        tl.store(DSE + o + st, dSb, mask=sm)
        q0, qr, qok = _qrows(QSTART, QLEN, b, s, rt, T, H, h)
        p0 = (b * NSC + s) * BL * H + h  # the key rows in the padded (B, NSC, BL, H, D) layout: p0 + kr
        # every product in q's dtype, the carried cotangents' too (their stored copies, which
        # _bwd_k reads): bf16 at the tensor cores' full rate, k never widened to float32
        k0, kr, kok = _krows(QSTART, QLEN, b, s, rl, T, W1, H, h)
        q, k = _rraw(Q, q0, qr, qok, rk, DK, DK), _rraw(K, k0, kr, kok, rk, DK, DK)  # (BT, BK), (BL, BK)
        # value rows first, like dM (as in _fwd_state): each product's result feeds the next as it
        # sits in registers, with no transpose through shared memory on the loop's path
        dyt = _rawT(DY, q0, qr, qok, rv, DV, DV)  # (BV, BT) = dY^T, zero on padded rows
        g0 = (bh * NSC + s) * BT
        # A = G * Q K^T as _fwd_out stored it, in q's dtype: its (BT, BL, Dk) product, the largest
        # of an iteration, is not on the loop's path
        A = tl.load(_at(AS, g0, rt, rl, BL))  # (BT, BL), in q's dtype
        gk = (bh * NSC + s) * BL
        dEt = (-_mm(dyt, A, PREC)
               - tl.load(GL + gk + rl)[None, :] * _mm(dMb.to(k.dtype), tl.trans(k), PREC)
               - tl.load(CS + gk + rl)[None, :] * _mm(dSb.to(k.dtype), tl.trans(k), PREC))  # (BV, BL) = dE^T
        if HUBER:  # clamp passes the cotangent only where the error was inside [-delta, delta]
            Mr = _state(MS, (bh * NSC + tl.load(REF + s)) * DV * DK, rv, rk, DV, DK)
            E0t = _mm(Mr, tl.trans(k), PREC) - _rawT(V, k0, kr, kok, rv, DV, DV).to(tl.float32)
            dEt = tl.where(tl.abs(E0t) <= delta, dEt, 0.0)
        _storeT(DVB, p0, kr, rv, DV, DV, -dEt)
        lo = (bh * NSC + s) * 3
        pl, fl, pel = tl.load(LAST + lo), tl.load(LAST + lo + 1), tl.load(LAST + lo + 2)
        dM_prev = pl * dM + _mm((dyt * tl.load(P + g0 + rt)[None, :]).to(q.dtype), q, PREC)
        dS = fl * dM + pel * dS + _mm((dyt * tl.load(F + g0 + rt)[None, :]).to(q.dtype), q, PREC)
        through_E = _mm(dEt.to(k.dtype), k, PREC)  # (BV, BK)
        if BIG:  # errors read the chunk-start M: collect, and hand over where that chunk starts
            dMr += through_E
            first = tl.load(REF + s) == s
            dM_prev = tl.where(first, dM_prev + dMr, dM_prev)
            dMr = tl.where(first, 0.0, dMr)
        else:
            dM_prev += through_E
        dM = dM_prev
    tl.store(DM0 + bh * DV * DK + st, dM, mask=sm)
    tl.store(DS0 + bh * DV * DK + st, dS, mask=sm)


@triton.autotune(configs=_configs([32, 64], [4, 8]), key=["BT", "BL", "BK", "DV"], **_CACHE)
@triton.jit(do_not_specialize=_ANY_T)
def _bwd_q(Q, K, ES, G, P, F, QSTART, QLEN, MS, SS, DY, DQ, DG, DA, DP, DF, NSC, T, W1, H, DK, DV,
           BT: tl.constexpr, BL: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """Query-side gradients of one sub-chunk (dQ, dG, dP, df) and dA, the cotangent of Q K^T that
    _bwd_k needs, looping over Dv tiles. Grid (NSC, B*H)."""
    s = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    rk, rl, rt = tl.arange(0, BK), tl.arange(0, BL), tl.arange(0, BT)
    q0, qr, qok = _qrows(QSTART, QLEN, b, s, rt, T, H, h)
    k0, kr, kok = _krows(QSTART, QLEN, b, s, rl, T, W1, H, h)
    q, k = _rraw(Q, q0, qr, qok, rk, DK, DK), _rraw(K, k0, kr, kok, rk, DK, DK)  # (BT, BK), (BL, BK)
    g0 = (bh * NSC + s) * BT  # rows g0 + rt of the per-sub-chunk-row tensors
    p, f = tl.load(P + g0 + rt), tl.load(F + g0 + rt)  # (BT,)
    dq = tl.zeros([BT, BK], dtype=tl.float32)
    dyE = tl.zeros([BT, BL], dtype=tl.float32)  # dY E^T, summed over Dv
    dp, df = tl.zeros([BT], dtype=tl.float32), tl.zeros([BT], dtype=tl.float32)
    o = (bh * NSC + s) * DV * DK
    for v0 in range(0, DV, BV):
        rv = v0 + tl.arange(0, BV)
        Ms, Ss = _state(MS, o, rv, rk, DV, DK), _state(SS, o, rv, rk, DV, DK)  # (BV, BK), q's dtype
        dyr = _rraw(DY, q0, qr, qok, rv, DV, DV)  # (BT, BV), zero on padded rows, in dy's dtype
        dy = dyr.to(tl.float32)
        E = _rraw(ES, (bh * NSC + s) * BL, rl, rl < BL, rv, DV, DV)  # (BL, BV) as _fwd_state stored it
        dyE += _mm(dyr, tl.trans(E.to(dyr.dtype)), PREC)
        dp += tl.sum(dy * _mm(q, tl.trans(Ms), PREC), 1)
        df += tl.sum(dy * _mm(q, tl.trans(Ss), PREC), 1)
        dq += _mm((p[:, None] * dy).to(Ms.dtype), Ms, PREC) + _mm((f[:, None] * dy).to(Ss.dtype), Ss, PREC)
    A = _mm(q, tl.trans(k), PREC)  # (BT, BL)
    dA = -_tile(G, g0, rt, rl, BL, BL) * dyE
    _store(DG, g0, rt, rl, BL, BL, -A * dyE)
    _store(DA, g0, rt, rl, BL, BL, dA)
    _rstore(DQ, q0, qr, qok, rk, DK, DK, dq + _mm(dA.to(k.dtype), k, PREC))
    tl.store(DP + g0 + rt, dp)
    tl.store(DF + g0 + rt, df)


@triton.autotune(configs=_configs([32, 64], [4, 8], (1, 2, 3)), key=["BT", "BL", "BK", "DV"], **_CACHE)
@triton.jit(do_not_specialize=_ANY_T)
def _bwd_k(Q, K, ES, GL, CS, REF, QSTART, QLEN, MS, SS, DME, DSE, DVB, DA, DKK, DGL, DCS, DLAST, NSC, T, W1, H, DK,
           DV, BT: tl.constexpr, BL: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """Key-side gradients of one sub-chunk (dK, dgl, dcs) and those of its end factors (pl, fl, pel),
    looping over Dv tiles. Grid (NSC, B*H)."""
    s = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    rk, rl, rt = tl.arange(0, BK), tl.arange(0, BL), tl.arange(0, BT)
    k0, kr, kok = _krows(QSTART, QLEN, b, s, rl, T, W1, H, h)
    p0 = (b * NSC + s) * BL * H + h  # the same rows in the padded (B, NSC, BL, H, D) layout: p0 + kr
    k = _rraw(K, k0, kr, kok, rk, DK, DK)  # (BL, BK)
    gk = (bh * NSC + s) * BL  # rows gk + rl of the per-key-row tensors
    gl, cs = tl.load(GL + gk + rl), tl.load(CS + gk + rl)  # (BL,)
    dk = tl.zeros([BL, BK], dtype=tl.float32)
    dgl, dcs = tl.zeros([BL], dtype=tl.float32), tl.zeros([BL], dtype=tl.float32)
    dpl, dfl, dpel = tl.zeros([BK], dtype=tl.float32), tl.zeros([BK], dtype=tl.float32), tl.zeros([BK], dtype=tl.float32)
    o, oref = (bh * NSC + s) * DV * DK, (bh * NSC + tl.load(REF + s)) * DV * DK
    for v0 in range(0, DV, BV):
        rv = v0 + tl.arange(0, BV)
        Mr = _state(MS, oref, rv, rk, DV, DK)  # (BV, BK), q's dtype like every stored state
        dMe, dSe = _state(DME, o, rv, rk, DV, DK), _state(DSE, o, rv, rk, DV, DK)
        Ms, Ss = _state(MS, o, rv, rk, DV, DK).to(tl.float32), _state(SS, o, rv, rk, DV, DK).to(tl.float32)
        dpl += tl.sum(dMe.to(tl.float32) * Ms, 0)  # M' = pl Ms + fl Ss + ...,  S' = pel Ss + ...
        dfl += tl.sum(dMe.to(tl.float32) * Ss, 0)
        dpel += tl.sum(dSe.to(tl.float32) * Ss, 0)
        dE = -_tile(DVB, p0, kr, rv, DV, DV)  # (BL, BV) error cotangent, masked by Huber already
        E = _rraw(ES, (bh * NSC + s) * BL, rl, rl < BL, rv, DV, DV).to(tl.float32)  # (BL, BV), as stored
        dgl -= tl.sum(E * _mm(k, tl.trans(dMe), PREC), 1)
        dcs -= tl.sum(E * _mm(k, tl.trans(dSe), PREC), 1)
        dk += (_mm(dE.to(Mr.dtype), Mr, PREC) - _mm((gl[:, None] * E).to(dMe.dtype), dMe, PREC)
               - _mm((cs[:, None] * E).to(dSe.dtype), dSe, PREC))
    q0, qr, qok = _qrows(QSTART, QLEN, b, s, rt, T, H, h)
    dA = _tile(DA, (bh * NSC + s) * BT, rt, rl, BL, BL)  # (BT, BL)
    q = _rraw(Q, q0, qr, qok, rk, DK, DK)
    _store(DKK, p0, kr, rk, DK, DK, dk + _mm(tl.trans(dA.to(q.dtype)), q, PREC))
    tl.store(DGL + gk + rl, dgl)
    tl.store(DCS + gk + rl, dcs)
    lo = (bh * NSC + s) * 3
    tl.store(DLAST + lo, tl.sum(dpl, 0))
    tl.store(DLAST + lo + 1, tl.sum(dfl, 0))
    tl.store(DLAST + lo + 2, tl.sum(dpel, 0))
