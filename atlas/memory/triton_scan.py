"""`impl="triton"`: the chunked function (chunked.py) with its heavy part in Triton kernels.

Split in two:
  * gates, in PyTorch (autograd differentiates them): for every sub-chunk at once, the decay
    matrices of chunked.py -- G, P, f, c_S and the end-of-sub-chunk factors pl, fl, pel, gl;
  * the scan, a `torch.library.custom_op` with a hand-written backward (triton_kernels.py): a
    sequential pass over sub-chunks for the states, then parallel kernels for y and gradients.

Sub-chunks: kernels work on blocks of at most SUB_CHUNK tokens. A chunk longer than that is cut
into sub-chunks whose errors all use the memory at the *chunk* start (the kernels carry it), so
chunk 2048 is the same function at the cost of chunk 64. Every (sub-)chunk is padded to BT rows
(a power of two) with inert gates (alpha = 0, eta = 1, theta = 0) and gamma = 0 on padded keys,
so padding changes nothing, and the end-of-sub-chunk factors are read at its last real row.
Queries, keys, values, y and dq stay in the token layout ((B, T, H, D); keys and values as
(B, W-1+T, H, D), the window halo's rows first): the kernels read and write each sub-chunk's rows
in place, masking the padding. Only dk and dv come out per sub-chunk row in the padded layout (a
key sits in its own sub-chunk and in the halo of the next): their copies are summed by gathers.

Not in the kernels (they fall back to `chunked` with a warning): muon, float64 inputs, Dk > 128,
and windows longer than SUB_CHUNK tokens. max_norm (the seed's clamp of M where a chunk closes)
runs the kernels one chunk a call, clamping between. A window W > 1 shortens sub-chunks to
SUB_CHUNK + 1 - W tokens or fewer (chunk 64, W = 4: two sub-chunks of 32), so it costs up to 2x.

Speed: benchmarks/README.md (`atlas bench`, `benchmarks/profile_layer.py`). A call shorter than
DECODE_T tokens runs `chunked`: a few tokens are a few tiny matmuls. (Decoding one token at a time
does not come here: MemoryLayer takes step.py's O(1) step.)
"""
import os
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import torch
import triton

from ..errors import UserError
from . import triton_kernels as kern
from .chunked import gate_products, log_gates, memory_scan_chunked
from .state import SUB_CHUNK, MemoryState, apply_poly, clamp_norm, last_rows

DECODE_T = 8  # calls shorter than this run `chunked`: the same function


@dataclass(frozen=True)
class _Plan:
    """Where each token sits in the padded sub-chunk layout (all index tensors on the device)."""
    NSC: int  # sub-chunks
    BT: int  # query rows per sub-chunk (padded)
    BL: int  # key rows per sub-chunk: W-1 halo rows, then the sub-chunk's own (padded)
    identity: bool  # the key layout is a plain reshape: no gathers needed
    big: bool  # some chunk spans several sub-chunks
    last_row: Union[int, None]  # the last real row, where it is the same in every sub-chunk
    qidx: torch.Tensor  # (NSC*BT,) token of each query row (0 on padding)
    qpad: torch.Tensor  # (NSC, BT) True on padded query rows
    kidx: torch.Tensor  # (NSC*BL,) halo-coordinate row of each key row (0 on padding)
    kpad: torch.Tensor  # (NSC, BL)
    start: torch.Tensor  # (NSC,) int32 first token of each sub-chunk: the kernels read queries in place
    qlen: torch.Tensor  # (NSC,) int32 its tokens
    # the key gathers' backward as gathers too (index_select's own backward is an atomic
    # index_add, 5% of the 300M step at window 16): every key row holding each halo-coordinate
    # row, NSC*BL (a zero row) if none
    kback: torch.Tensor  # (copies, W-1+T)
    last: torch.Tensor  # (NSC,) last real row of each sub-chunk
    ref: torch.Tensor  # (NSC,) int32 first sub-chunk of each sub-chunk's chunk


_PLANS: dict = {}  # (T, chunk, W, sub, device) -> _Plan, oldest first
_MAX_PLANS = 64  # inference calls come in many lengths (prompts, pieces): keep the recent


def _plan(T: int, chunk: int, W: int, sub: int, device: torch.device) -> _Plan:
    """The layout, cached by shape. A compiled caller reads a cached plan through a guarded dict
    lookup (no graph break, no host work); an uncached one is traced from plain Python lists."""
    key = (T, chunk, W, sub, device)
    if key in _PLANS:
        return _PLANS[key]
    plan = _make_plan(T, chunk, W, sub, device)
    if not torch.compiler.is_compiling():
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.pop(next(iter(_PLANS)))
        _PLANS[key] = plan
    return plan


def _make_plan(T: int, chunk: int, W: int, sub: int, device: torch.device) -> _Plan:
    # equal sub-chunks, as few as keep each one's window keys (bs + W - 1) within sub rows
    n_sub = -(-chunk // (sub + 1 - W))
    bs = -(-chunk // n_sub)
    BT = max(16, triton.next_power_of_2(bs))
    BL = max(16, triton.next_power_of_2(bs + W - 1))
    starts, lens, ref = [], [], []
    for c0 in range(0, T, chunk):
        first, n = len(starts), min(chunk, T - c0)
        for s0 in range(0, n, bs):
            starts.append(c0 + s0)
            lens.append(min(bs, n - s0))
            ref.append(first)
    # plain lists (no boolean-mask indexing, whose data-dependent shapes break torch.compile)
    qpad = [[r >= n for r in range(BT)] for n in lens]  # (NSC, BT) padded query rows
    kpad = [[r >= n + W - 1 for r in range(BL)] for n in lens]  # (NSC, BL)
    qidx = [0 if p else s + r for s, pads in zip(starts, qpad) for r, p in enumerate(pads)]
    kidx = [0 if p else s + r for s, pads in zip(starts, kpad) for r, p in enumerate(pads)]
    # a key row sits in its own sub-chunk and in the halo of the next ones: ceil((W-1)/bs) + 1 copies
    holders = [[] for _ in range(W - 1 + T)]
    for r, (i, p) in enumerate(zip(kidx, (p for pads in kpad for p in pads))):
        if not p:
            holders[i].append(r)
    copies = max(len(h) for h in holders) if holders else 1
    kback = [[h[c] if c < len(h) else len(kidx) for h in holders] for c in range(copies)]
    identity = BT == bs and BL == bs and T % bs == 0 and chunk % bs == 0
    full = T % chunk == 0 and chunk % bs == 0  # every sub-chunk ends at row bs - 1

    def dev(x, dtype=torch.long):
        return torch.tensor(x, dtype=dtype, device=device)
    return _Plan(len(starts), BT, BL, identity, big=bs < chunk and T > bs, last_row=bs - 1 if full else None,
                 qidx=dev(qidx), qpad=dev(qpad, torch.bool), kidx=dev(kidx), kpad=dev(kpad, torch.bool),
                 start=dev(starts, torch.int32), qlen=dev(lens, torch.int32), kback=dev(kback),
                 last=dev([n - 1 for n in lens]), ref=dev(ref, torch.int32))


def _gather_sum(g: torch.Tensor, back: torch.Tensor) -> torch.Tensor:
    """(B, N, ...) per-row gradients of a gather -> (B, M, ...) of its source: row n is the sum over
    c of g's row back[c, n] (back = N reads zeros). Gathers, not index_add's atomic scatter-add,
    which ran at a fraction of bandwidth (5% of the 300M step at window 16)."""
    g = torch.cat([g, g.new_zeros(g.shape[0], 1, *g.shape[2:])], dim=1)  # the zero row last
    out = g.index_select(1, back[0])
    for c in range(1, back.shape[0]):
        out = out + g.index_select(1, back[c])
    return out


def _rows(x, idx, plan, rows):
    """(B, N, ...) -> (B, NSC, rows, ...): the rows each sub-chunk reads, in the padded layout (the
    small float32 gate tensors; the kernels read q, k, v in place)."""
    if plan.identity:
        return x.reshape(x.shape[0], plan.NSC, rows, *x.shape[2:])
    return x.index_select(1, idx).view(x.shape[0], plan.NSC, rows, *x.shape[2:])


def _gates(alpha, eta, theta, gx, W, plan):
    """chunked.py's gate algebra for every sub-chunk at once, in float32 (autograd does the rest).

    alpha, eta, theta (B, T, H); gx (B, W-1+T, H) Omega weights with the halo's first.
    Returns G (B, H, NSC, BT, BL), P, f (B, H, NSC, BT), gl, cs (B, H, NSC, BL), last (B, H, NSC, 3).
    """
    def q_rows(x, pad_value):  # (B, T, H) -> (B, H, NSC, BT), padded rows inert
        return _rows(x, plan.qidx, plan, plan.BT).masked_fill(plan.qpad[None, :, :, None], pad_value).permute(0, 3, 1, 2)
    log_beta, log_eta = (q_rows(x, 0.0) for x in log_gates(alpha, eta))
    th = q_rows(theta, 0.0)
    gk = _rows(gx, plan.kidx, plan, plan.BL).masked_fill(plan.kpad[None, :, :, None], 0.0).permute(0, 3, 1, 2)
    # Le (B, H, NSC, BT, BT); P, Pe, f (B, H, NSC, BT); thb, G (B, H, NSC, BT, BL)
    Le, P, Pe, f, thb, G = gate_products(log_beta, log_eta, th, gk, W, alpha.dtype)

    def at_last(x):  # (B, H, NSC, BT, *rest) -> (B, H, NSC, *rest): each sub-chunk's last real row
        if plan.last_row is not None:
            return x[:, :, :, plan.last_row]
        idx = plan.last.view(1, 1, -1, 1, *(1,) * (x.dim() - 4)).expand(*x.shape[:3], 1, *x.shape[4:])
        return x.gather(3, idx).squeeze(3)
    cs = (at_last(Le)[..., :, None] * thb).sum(-2) * gk  # (B, H, NSC, BL): Le's last row times thb
    last = torch.stack([at_last(P), at_last(f), at_last(Pe)], dim=-1)  # (B, H, NSC, 3): pl, fl, pel
    return G, P, f, at_last(G), cs, last


_compiled_gates = None


def _gates_for(device):
    """_gates through torch.compile on CUDA: fused, its ~50 small ops stop costing a launch each
    (eager: ~1.7 ms of a 5.4 ms step at 2x4096x8x128). ATLAS_TRITON_COMPILE_GATES=0 turns it off;
    inside a model being compiled it is simply traced along. Not under no_grad: inference calls
    come in many lengths (prompts, pieces re-running an open chunk), each a new compile."""
    global _compiled_gates
    if (device.type != "cuda" or torch.compiler.is_compiling() or not torch.is_grad_enabled()
            or os.environ.get("ATLAS_TRITON_COMPILE_GATES") == "0"):
        return _gates
    if _compiled_gates is None:
        _compiled_gates = torch.compile(_gates, dynamic=False)
    return _compiled_gates


# --- the custom op ---------------------------------------------------------------------------
def _stored(q):
    """The dtype of the sub-chunk-start states kept for the parallel kernels and the backward: q's
    when it is 16-bit (half the bytes, and bf16 products at full tensor-core rate), else float32.
    The sequential passes carry M, S and their cotangents in float32 either way."""
    return q.dtype if q.dtype in (torch.bfloat16, torch.float16) else torch.float32


def _launch_args(q, k, G, Dv):
    B, T, H, Dk = q.shape
    NSC, BT, BL = G.shape[2:]
    prec = "ieee" if q.dtype == torch.float32 else "tf32"  # bf16 data: tf32 keeps the float32 states' bits
    return B, T, k.shape[1] - T, NSC, BT, BL, H, Dk, Dv, triton.next_power_of_2(max(Dk, 16)), prec


@torch.library.custom_op("atlas::memory_scan_fwd", mutates_args=())
def _scan_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, G: torch.Tensor, P: torch.Tensor,
              f: torch.Tensor, gl: torch.Tensor, cs: torch.Tensor, last: torch.Tensor, ref: torch.Tensor,
              start: torch.Tensor, qlen: torch.Tensor, kback: torch.Tensor, M0: torch.Tensor, S0: torch.Tensor,
              huber: Optional[float], big: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                         torch.Tensor]:
    """y (B, T, H, Dv), final M and S (B, H, Dv, Dk), and what the backward reads: the sub-chunk-start
    states Ms, Ss (B, H, NSC, Dv, Dk), As = G * Q K^T (B, H, NSC, BT, BL) in q's dtype and the errors
    Es = clamp(K Mr^T - V) (B, H, NSC, BL, Dv) in the states' dtype."""
    B, T, W1, NSC, BT, BL, H, Dk, Dv, BK, prec = _launch_args(q, k, G, v.shape[-1])
    Ms = M0.new_empty(B, H, NSC, Dv, Dk, dtype=_stored(q))
    Ss, Mout, Sout = torch.empty_like(Ms), torch.empty_like(M0), torch.empty_like(S0)
    y, As = q.new_empty(B, T, H, Dv), q.new_empty(G.shape)
    Es = Ms.new_empty(B, H, NSC, BL, Dv)  # each sub-chunk's errors, in the states' dtype
    kern._fwd_state[lambda m: (B * H, triton.cdiv(Dv, m["BV"]))](
        k, v, gl, cs, last, ref, start, qlen, M0, S0, Ms, Ss, Es, Mout, Sout, NSC, T, W1, H, B * H, Dk, Dv,
        huber or 0.0, BL=BL, BK=BK, HUBER=huber is not None, BIG=big, PREC=prec)
    kern._fwd_out[lambda m: (NSC, B * H, triton.cdiv(Dv, m["BV"]))](
        q, k, Es, G, P, f, start, qlen, Ms, Ss, y, As, NSC, T, W1, H, Dk, Dv, BT=BT, BL=BL, BK=BK, PREC=prec)
    return y, Mout, Sout, Ms, Ss, As, Es


@_scan_fwd.register_fake
def _(q, k, v, G, P, f, gl, cs, last, ref, start, qlen, kback, M0, S0, huber, big):
    B, T, H, Dk = q.shape
    Ms = M0.new_empty(B, H, P.shape[2], v.shape[-1], Dk, dtype=_stored(q))
    return (q.new_empty(B, T, H, v.shape[-1]), torch.empty_like(M0), torch.empty_like(S0), Ms, torch.empty_like(Ms),
            q.new_empty(G.shape), Ms.new_empty(B, H, P.shape[2], G.shape[-1], v.shape[-1]))


@torch.library.custom_op("atlas::memory_scan_bwd", mutates_args=())
def _scan_bwd(dy: torch.Tensor, dM: torch.Tensor, dS: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor, G: torch.Tensor, P: torch.Tensor, f: torch.Tensor, gl: torch.Tensor,
              cs: torch.Tensor, last: torch.Tensor, ref: torch.Tensor, start: torch.Tensor, qlen: torch.Tensor,
              Ms: torch.Tensor, Ss: torch.Tensor, As: torch.Tensor, Es: torch.Tensor, huber: Optional[float],
              big: bool) -> list[torch.Tensor]:
    """Gradients of (q, G, P, f, gl, cs, last, M0, S0) given those of (y, M, S), and those of k and v
    per sub-chunk row in the padded layout (B, NSC, BL, H, D): _backward sums a token's copies."""
    B, T, W1, NSC, BT, BL, H, Dk, Dv, BK, prec = _launch_args(q, k, G, v.shape[-1])
    dy = dy.contiguous()
    dMe, dSe = torch.empty_like(Ms), torch.empty_like(Ss)
    dM0, dS0 = torch.empty_like(dM), torch.empty_like(dS)
    dv = v.new_empty(B, NSC, BL, H, Dv)
    delta, hub = huber or 0.0, huber is not None
    kern._bwd_state[lambda m: (B * H, triton.cdiv(Dv, m["BV"]))](
        q, k, v, As, P, f, gl, cs, last, ref, start, qlen, Ms, dy, dM, dS, dMe, dSe, dv, dM0, dS0,
        NSC, T, W1, H, B * H, Dk, Dv, delta, BT=BT, BL=BL, BK=BK, HUBER=hub, BIG=big, PREC=prec)
    dq, dk = torch.empty_like(q), k.new_empty(B, NSC, BL, H, Dk)
    dG, dP, df, dgl, dcs, dlast = (torch.empty_like(x) for x in (G, P, f, gl, cs, last))
    dA = torch.empty_like(G, dtype=q.dtype)  # (B, H, NSC, BT, BL): _bwd_k multiplies it in q's dtype
    kern._bwd_q[(NSC, B * H)](q, k, Es, G, P, f, start, qlen, Ms, Ss, dy, dq, dG, dA, dP, df, NSC, T, W1, H, Dk,
                              Dv, BT=BT, BL=BL, BK=BK, PREC=prec)
    kern._bwd_k[(NSC, B * H)](q, k, Es, gl, cs, ref, start, qlen, Ms, Ss, dMe, dSe, dv, dA, dk, dgl, dcs, dlast,
                              NSC, T, W1, H, Dk, Dv, BT=BT, BL=BL, BK=BK, PREC=prec)
    return [dq, dk, dv, dG, dP, df, dgl, dcs, dlast, dM0, dS0]


@_scan_bwd.register_fake
def _(dy, dM, dS, q, k, v, G, P, f, gl, cs, last, ref, start, qlen, Ms, Ss, As, Es, huber, big):
    B, H, NSC, _, BL = G.shape
    dk, dv = k.new_empty(B, NSC, BL, H, k.shape[-1]), v.new_empty(B, NSC, BL, H, v.shape[-1])
    return [torch.empty_like(q), dk, dv] + [torch.empty_like(x) for x in (G, P, f, gl, cs, last, dM, dS)]


def _setup(ctx, inputs, output):
    q, k, v, G, P, f, gl, cs, last, ref, start, qlen, kback, M0, S0, huber, big = inputs
    ctx.save_for_backward(q, k, v, G, P, f, gl, cs, last, ref, start, qlen, kback, *output[3:7])
    ctx.huber, ctx.big = huber, big
    # no zero-filled cotangents for Ms, Ss, As, Es (memsets of up to 67 MB each at 4K tokens)
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, dM, dS, _dMs, _dSs, _dAs, _dEs):
    q, k, v, G, P, f, gl, cs, last, ref, start, qlen, kback, Ms, Ss, As, Es = ctx.saved_tensors
    dy = q.new_zeros(*q.shape[:-1], v.shape[-1]) if dy is None else dy  # (B, T, H, Dv)
    dM = Ms.new_zeros(Ms[:, :, 0].shape, dtype=torch.float32) if dM is None else dM.contiguous()  # (B, H, Dv, Dk)
    dS = Ms.new_zeros(Ms[:, :, 0].shape, dtype=torch.float32) if dS is None else dS.contiguous()
    grads = _scan_bwd(dy, dM, dS, q, k, v, G, P, f, gl, cs, last, ref, start, qlen, Ms, Ss, As, Es, ctx.huber,
                      ctx.big)
    dk, dv = grads[1].flatten(1, 2), grads[2].flatten(1, 2)  # (B, NSC*BL, H, D): one row per sub-chunk copy
    if dk.shape[1] == k.shape[1]:  # no padding, no halo: the copies are the tokens
        dk, dv = dk.view_as(k), dv.view_as(v)
    else:
        dk, dv = _gather_sum(dk, kback), _gather_sum(dv, kback)
    return (grads[0], dk, dv, *grads[3:9], None, None, None, None, *grads[9:], None, None)


_scan_fwd.register_autograd(_backward, setup_context=_setup)


# --- the impl --------------------------------------------------------------------------------
def _fallback(reason, args, kw):
    """`chunked` on the same inputs, in the state's dtype; warns with the reason when one is given."""
    if reason:
        warnings.warn(f"memory_scan(impl='triton'): {reason}; using impl='chunked'", stacklevel=4)
    dt = kw["state"].M.dtype
    return memory_scan_chunked(*(t.to(dt) for t in args), **kw)


def memory_scan_triton(q, k, v, alpha, eta, theta, gamma, *, chunk_size, window, poly, state,
                       huber_delta=None, max_norm=None, muon=False):
    """Same contract as memory_scan_chunked. q, k, v may be bf16/fp16 (read as such, accumulated in
    float32); gates and state arrive in float32."""
    kw = dict(chunk_size=chunk_size, window=window, poly=poly, state=state,
              huber_delta=huber_delta, max_norm=max_norm, muon=muon)
    args = (q, k, v, alpha, eta, theta, gamma)
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise UserError("memory_scan(impl='triton') needs a CUDA device (or TRITON_INTERPRET=1 for the "
                        "slow CPU interpreter); use impl='chunked' on CPU")
    B, T, H, Dk = q.shape
    W, dt = window, state.M.dtype
    if T < DECODE_T:  # a few tokens are a few tiny matmuls; padded kernel blocks cost more
        return _fallback(None, args, kw)
    if muon:
        return _fallback("muon is not in the kernels", args, kw)
    if dt == torch.float64:
        return _fallback("the kernels compute in float32, not float64", args, kw)
    if Dk > 128 or W > SUB_CHUNK:
        return _fallback(f"Dk = {Dk} or window {W} is beyond the kernels' blocks (Dk <= 128, window <= {SUB_CHUNK})",
                         args, kw)
    if max_norm is not None and T > chunk_size:
        # the clamp acts where a chunk closes, and the kernels carry M through a call unclamped:
        # one call a chunk, clamped between (chunked's own loop; the halo rides in the state)
        ys, st = [], state
        for lo in range(0, T, chunk_size):
            y, st = memory_scan_triton(*(x[:, lo:lo + chunk_size] for x in args), **{**kw, "state": st})
            ys.append(y)
        return torch.cat(ys, dim=1), st
    plan = _plan(T, chunk_size, W, SUB_CHUNK, q.device)
    io = q.dtype if q.dtype in (torch.bfloat16, torch.float16) else dt  # dtype of q, k, v in memory

    def with_halo(halo, x):  # (B, W-1+T, ...): the halo's rows first; W = 1 skips the copy
        return torch.cat([halo.to(x.dtype), x], dim=1) if W > 1 else x
    kx, vx, gx = with_halo(state.k, k.to(io)), with_halo(state.v, v.to(io)), with_halo(state.gamma, gamma)
    pq = q.to(io) if poly is None else apply_poly(q.to(dt), poly).to(io)
    pkx = kx if poly is None else apply_poly(kx.to(dt), poly).to(io)
    G, P, f, gl, cs, last = _gates_for(q.device)(alpha, eta, theta, gx, W, plan)
    # q, k, v stay in the token layout: the kernels read each sub-chunk's rows in place
    # y (B, T, H, Dv)
    y, M, S, *_ = _scan_fwd(pq.contiguous(), pkx.contiguous(), vx.contiguous(), G.contiguous(), P.contiguous(),
                            f.contiguous(), gl.contiguous(), cs.contiguous(), last.contiguous(), plan.ref,
                            plan.start, plan.qlen, plan.kback, state.M.contiguous(), state.S.contiguous(),
                            huber_delta, plan.big)
    return y, MemoryState(M=clamp_norm(M, max_norm), S=S, k=last_rows(state.k, k, W - 1),
                          v=last_rows(state.v, v, W - 1), gamma=last_rows(state.gamma, gamma, W - 1))
