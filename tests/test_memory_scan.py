"""memory_scan (DESIGN.md §1): an independent autograd twin, reference and chunked kept equal.

The twin below never looks at reference.py: it takes each token's gradient with
torch.autograd.grad of the written-out Omega loss, so a shared algebra slip in both
implementations cannot hide.
"""
import pytest
import torch
import torch.nn.functional as F

from atlas.memory import MemoryState, memory_scan


@pytest.fixture(autouse=True)
def one_thread():
    """These are many tiny ops: a second intra-op thread only adds sync cost (10x on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


POLY = torch.tensor([1.0, 0.5], dtype=torch.float64)  # phi(x) = x + x^2/2 (the 1/i! init)


def rel(a, b):
    """Relative error ||a - b|| / ||b||, in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def make(B=2, T=37, H=3, Dk=6, Dv=5, *, seed=0, dtype=torch.float64, alpha=(0.05, 0.95),
         eta=(0.05, 0.95), theta=(0.05, 0.95), gamma=(0.05, 0.95)):
    """Random (q, k, v, alpha, eta, theta, gamma): l2-normalised q/k, gates uniform in the ranges."""
    g = torch.Generator().manual_seed(seed)
    def gate(lo_hi):
        return lo_hi[0] + (lo_hi[1] - lo_hi[0]) * torch.rand(B, T, H, generator=g, dtype=torch.float64)
    q = F.normalize(torch.randn(B, T, H, Dk, generator=g, dtype=torch.float64), dim=-1)
    k = F.normalize(torch.randn(B, T, H, Dk, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(B, T, H, Dv, generator=g, dtype=torch.float64)
    out = [q, k, v, gate(alpha), gate(eta), gate(theta), None if gamma is None else gate(gamma)]
    return [None if x is None else x.to(dtype) for x in out]


def twin(q, k, v, alpha, eta, theta, gamma, *, chunk_size, window, poly=None, huber_delta=None, max_norm=None):
    """Independent float64 token loop from a zero state; returns (y, M, S)."""
    B, T, H, Dk = q.shape
    phi = (lambda x: x) if poly is None else (lambda x: sum(a * x ** (i + 1) for i, a in enumerate(poly)))
    gamma = torch.ones_like(alpha) if gamma is None else gamma
    M = torch.zeros(B, H, v.shape[-1], Dk, dtype=torch.float64)
    S = torch.zeros_like(M)
    ys = []
    for t in range(T):
        if t % chunk_size == 0:  # chunks aligned to token 0
            M_ref = M.clone().requires_grad_(True)
        lo = max(0, t - window + 1)  # tokens before the sequence start contribute nothing
        pred = torch.einsum("bhvk,bihk->bihv", M_ref, phi(k[:, lo:t + 1]))
        if huber_delta is None:
            per = 0.5 * (pred - v[:, lo:t + 1]) ** 2
        else:
            per = F.huber_loss(pred, v[:, lo:t + 1], reduction="none", delta=huber_delta)
        loss = (gamma[:, lo:t + 1, :, None] * per).sum()  # (b, h) pairs are independent: one grad call
        (grad,) = torch.autograd.grad(loss, M_ref)
        S = eta[:, t, :, None, None] * S - theta[:, t, :, None, None] * grad
        M = (1 - alpha[:, t, :, None, None]) * M + S
        ys.append(torch.einsum("bhvk,bhk->bhv", M, phi(q[:, t])))
        if max_norm is not None and ((t + 1) % chunk_size == 0 or t == T - 1):
            M = M * (max_norm / M.norm(dim=(-2, -1), keepdim=True)).clamp(max=1.0)
    return torch.stack(ys, dim=1), M, S


# 1. three-way equality on odd shapes ---------------------------------------------------------
@pytest.mark.parametrize("poly", [None, POLY], ids=["nopoly", "poly"])
@pytest.mark.parametrize("window", [1, 3, 11])
@pytest.mark.parametrize("chunk", [1, 5, 8, 64])
def test_three_way_equality(chunk, window, poly):
    args = make()
    y0, M0, S0 = twin(*args, chunk_size=chunk, window=window, poly=poly)
    assert y0.norm() > 0 and M0.norm() > 0 and S0.norm() > 0
    for impl in ("reference", "chunked"):
        y, st = memory_scan(*args, chunk_size=chunk, window=window, poly=poly, impl=impl)
        assert y.dtype == st.M.dtype == torch.float64 and y.shape == (2, 37, 3, 5)
        assert rel(y, y0) < 1e-8, impl
        assert rel(st.M, M0) < 1e-8 and rel(st.S, S0) < 1e-8, impl
        halo = slice(37 - (window - 1), None)  # the last window-1 raw keys and weights
        assert torch.equal(st.k, args[1][:, halo]) and torch.equal(st.gamma, args[6][:, halo]), impl


def test_gradients_match_reference():
    """Backward of chunked == backward of reference (float64, odd shapes, a carried state in)."""
    args = make(seed=15)
    _, st0 = memory_scan(*make(T=9, seed=16), chunk_size=8, window=11, poly=POLY)
    grads = []
    for impl in ("reference", "chunked"):
        xs = [x.clone().requires_grad_(True) for x in (*args, POLY, st0.M, st0.S, st0.k, st0.v, st0.gamma)]
        y, st = memory_scan(*xs[:7], chunk_size=8, window=11, poly=xs[7], state=MemoryState(*xs[8:]), impl=impl)
        w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)  # a fixed, non-symmetric cotangent
        ((y * w).sum() + (st.M ** 2).sum() + st.S.sum()).backward()
        grads.append([x.grad for x in xs])
    for i, (g_ref, g_ch) in enumerate(zip(*grads)):
        assert g_ref.norm() > 0 and rel(g_ch, g_ref) < 1e-8, i


@pytest.mark.parametrize("opts", [{"huber_delta": 0.3}, {"max_norm": 0.4}, {"huber_delta": 0.3, "max_norm": 0.4}])
def test_three_way_equality_options(opts):
    args = make(T=29, seed=1)
    y0, M0, S0 = twin(*args, chunk_size=6, window=4, poly=POLY, **opts)
    for impl in ("reference", "chunked"):
        y, st = memory_scan(*args, chunk_size=6, window=4, poly=POLY, impl=impl, **opts)
        assert rel(y, y0) < 1e-8 and rel(st.M, M0) < 1e-8 and rel(st.S, S0) < 1e-8, impl


@pytest.mark.parametrize("opts", [{}, {"huber_delta": 0.3}, {"max_norm": 0.4}], ids=["l2", "huber", "max_norm"])
def test_decoding_step_equals_twin(opts):
    """memory_step, one token at a time with the chunk bookkeeping a caller does (the start state at
    each chunk's first token, the clamp at its end), against the autograd twin on odd shapes."""
    from dataclasses import replace

    from atlas.memory.state import clamp_norm
    from atlas.memory.step import Running, memory_step
    B, T, H, Dk, Dv, C, W = 2, 23, 3, 7, 5, 6, 4
    args = make(B=B, T=T, H=H, Dk=Dk, Dv=Dv, seed=3)
    y0, M0, S0 = twin(*args, chunk_size=C, window=W, poly=POLY, **opts)
    now, ys = MemoryState.zeros(B, H, Dk, Dv, W, torch.float64, "cpu"), []
    for t in range(T):
        if t % C == 0:
            ref, run = now, Running(now.M, now.S)
        y, now, run = memory_step(*(x[:, t] for x in args), ref=ref, now=now, run=run, window=W, poly=POLY,
                                  huber_delta=opts.get("huber_delta"))
        if (t + 1) % C == 0 or t == T - 1:
            now = replace(now, M=clamp_norm(now.M, opts.get("max_norm")))
        ys.append(y)
    assert rel(torch.stack(ys, 1), y0) < 1e-8 and rel(now.M, M0) < 1e-8 and rel(now.S, S0) < 1e-8


def test_causality():
    args = make(seed=2)
    y, _ = memory_scan(*args, chunk_size=8, window=3, poly=POLY)
    moved = [x.clone() for x in args]
    for x in moved:
        x[:, 20:] = x[:, 20:].flip(1)  # change tokens 20.. inside the chunk 16..23
    y2, _ = memory_scan(*moved, chunk_size=8, window=3, poly=POLY)
    assert torch.equal(y[:, :20], y2[:, :20]) and not torch.allclose(y[:, 20:], y2[:, 20:])


# 2. gradcheck through chunked ------------------------------------------------------------------
@pytest.mark.parametrize("opts", [{}, {"muon": True, "max_norm": 0.3}], ids=["plain", "muon+max_norm"])
def test_gradcheck_chunked(opts):
    B, T, H, Dk, Dv, W = 1, 7, 2, 3, 2, 2
    args = make(B, T, H, Dk, Dv, seed=3, alpha=(0.2, 0.8), eta=(0.2, 0.8), theta=(0.2, 0.8), gamma=(0.2, 0.8))
    g = torch.Generator().manual_seed(4)
    st = [0.3 * torch.randn(*s, generator=g, dtype=torch.float64) for s in
          ((B, H, Dv, Dk), (B, H, Dv, Dk), (B, W - 1, H, Dk), (B, W - 1, H, Dv))]
    st.append(torch.full((B, W - 1, H), 0.7, dtype=torch.float64))
    inputs = [x.clone().requires_grad_(True) for x in (*args, POLY, *st)]

    def f(q, k, v, a, e, th, gm, poly, M, S, hk, hv, hg):
        y, out = memory_scan(q, k, v, a, e, th, gm, chunk_size=3, window=W, poly=poly,
                             state=MemoryState(M, S, hk, hv, hg), impl="chunked", **opts)
        return y, out.M, out.S

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


# 3./4. numerics: long chunks with small gates, fp32 against fp64 ------------------------------
def test_chunk_2048_small_gates_stable():
    gates = dict(alpha=(0.5, 0.9), eta=(0.01, 0.05))  # gate products over the chunk reach ~1e-1500
    a64 = make(1, 2048, 1, 4, 3, seed=5, **gates)
    a32 = [x.requires_grad_(True) for x in make(1, 2048, 1, 4, 3, seed=5, dtype=torch.float32, **gates)]
    y_ref, s_ref = memory_scan(*a64, chunk_size=2048, window=3, impl="reference")
    y64, s64 = memory_scan(*a64, chunk_size=2048, window=3, impl="chunked")
    y32, s32 = memory_scan(*a32, chunk_size=2048, window=3, impl="chunked")
    for t in (y64, y32, s64.M, s64.S, s32.M, s32.S):
        assert torch.isfinite(t).all()
    assert rel(y64, y_ref) < 1e-10 and rel(s64.M, s_ref.M) < 1e-10 and rel(s64.S, s_ref.S) < 1e-10
    assert rel(y32, y_ref) < 1e-5 and rel(s32.M, s_ref.M) < 1e-5 and rel(s32.S, s_ref.S) < 1e-5  # measured ~1e-7
    (y32.sum() + s32.M.sum()).backward()  # the backward of the 2048x2048 decay matrices is finite too
    assert all(torch.isfinite(x.grad).all() for x in a32)


def test_chunk_2048_long_memory_fp32():
    gates = dict(alpha=(0.0, 0.01), eta=(0.9, 0.99), theta=(0.0, 0.05))  # the other end: little decay
    y_ref, _ = memory_scan(*make(1, 2048, 1, 4, 3, seed=19, **gates), chunk_size=2048, window=3, impl="reference")
    y32, _ = memory_scan(*make(1, 2048, 1, 4, 3, seed=19, dtype=torch.float32, **gates), chunk_size=2048, window=3)
    assert torch.isfinite(y32).all() and rel(y32, y_ref) < 1e-5  # measured ~3e-7


@pytest.mark.parametrize("scale", [0.01, 1.0, 30.0])
def test_decay_backward_in_float32_matches_float64(scale, monkeypatch):
    """The decay matrices' backward runs in the gates' dtype (chunked._DecayExp; float64 only for
    the exponent): the log-gates' gradients in float32 equal plain autograd's float64 backward to
    float32 rounding, from gates near 1 (log 0.01 a token) to near 0 (log 30: products underflow)."""
    from atlas.memory import chunked
    gen = torch.Generator().manual_seed(7)
    lb, le = (-torch.rand(2, 3, 40, generator=gen, dtype=torch.float64) * scale for _ in range(2))
    th, g = torch.rand(2, 3, 40, generator=gen, dtype=torch.float64), torch.rand(2, 3, 45, generator=gen, dtype=torch.float64)
    weights, grads = None, {}
    for run, dt in (("autograd", torch.float64), ("fast", torch.float32)):
        with monkeypatch.context() as m:
            if run == "autograd":
                m.setattr(chunked._DecayExp, "apply", chunked._decay_exp)  # plain autograd: float64 backward
            xs = [x.to(dt).clone().requires_grad_(True) for x in (lb, le)]
            outs = chunked.gate_products(xs[0], xs[1], th.to(dt), g.to(dt), 6, dt)
        if weights is None:  # one random cotangent for every output, shared by both runs
            weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outs]
        sum((o * w.to(dt)).sum() for o, w in zip(outs, weights)).backward()
        grads[run] = [x.grad.double() for x in xs]
    for fast, ref in zip(grads["fast"], grads["autograd"]):
        assert rel(fast, ref) < 1e-5  # measured 8e-8 .. 1.3e-6


def test_acceptance_chunk_256_fp32_momentum():
    gates = dict(alpha=(0.01, 0.1), eta=(0.04, 0.06), theta=(0.1, 0.5), gamma=None)
    a64 = make(1, 300, 2, 16, 16, seed=6, **gates)  # 300 = 256 + a partial chunk of 44
    a32 = make(1, 300, 2, 16, 16, seed=6, dtype=torch.float32, **gates)
    a64 = [x.requires_grad_(True) for x in a64[:6]]
    a32 = [x.requires_grad_(True) for x in a32[:6]]
    y_ref, _ = memory_scan(*a64, chunk_size=256, window=1, impl="reference")
    y32, s32 = memory_scan(*a32, chunk_size=256, window=1, impl="chunked")
    assert y32.dtype == s32.M.dtype == torch.float32
    assert torch.isfinite(y32).all() and rel(y32, y_ref) < 1e-3  # the bar
    assert rel(y32, y_ref) < 1e-5  # measured 1.4e-7: float32 rounding, nothing lost to the gates
    w = torch.linspace(-1, 1, y32.numel(), dtype=torch.float64).view_as(y32)
    (y_ref * w).sum().backward()
    (y32 * w.float()).sum().backward()
    for x32, x64 in zip(a32, a64):  # training sees the same gradients too (measured ~3e-7)
        assert torch.isfinite(x32.grad).all() and rel(x32.grad, x64.grad) < 1e-4


# 5. state carry ------------------------------------------------------------------------------
@pytest.mark.parametrize("opts", [{}, {"muon": True, "max_norm": 1.0, "huber_delta": 0.5}], ids=["plain", "options"])
@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_chunk_aligned_pieces_equal_one_call(impl, opts):
    args = make(T=40, seed=7)
    kw = dict(chunk_size=8, window=5, poly=POLY, impl=impl, **opts)
    y, st = memory_scan(*args, **kw)
    ys, state = [], None
    for lo, hi in ((0, 16), (16, 24), (24, 40)):
        yp, state = memory_scan(*[x[:, lo:hi] for x in args], state=state, **kw)
        ys.append(yp)
    assert rel(torch.cat(ys, 1), y) < 1e-12
    for name in ("M", "S", "k", "v", "gamma"):
        assert torch.allclose(getattr(state, name), getattr(st, name), rtol=1e-12, atol=1e-14), name


@pytest.mark.parametrize("window", [1, 3])
@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_token_by_token_decoding_equals_chunk_1(impl, window):
    args = make(T=25, seed=8)
    y, st = memory_scan(*args, chunk_size=1, window=window, poly=POLY, impl=impl)
    ys, state = [], None
    for t in range(25):
        yt, state = memory_scan(*[x[:, t:t + 1] for x in args], chunk_size=4, window=window, poly=POLY,
                                state=state, impl=impl)  # a T=1 call is one (partial) chunk
        ys.append(yt)
    assert rel(torch.cat(ys, 1), y) < 1e-12 and rel(state.M, st.M) < 1e-12 and rel(state.S, st.S) < 1e-12


# 6. bf16 -------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_bf16_inputs(impl):
    a32 = make(T=33, seed=9, dtype=torch.float32)
    y32, s32 = memory_scan(*a32, chunk_size=8, window=3, poly=POLY.float(), impl=impl)
    y16, s16 = memory_scan(*[x.bfloat16() for x in a32], chunk_size=8, window=3, poly=POLY.bfloat16(), impl=impl)
    assert y16.dtype == torch.bfloat16 and s16.M.dtype == s16.S.dtype == torch.float32
    assert torch.isfinite(y16).all() and rel(y16, y32) < 2e-2 and rel(s16.M, s32.M) < 2e-2
    # the bf16 state carries into a second call
    y2, _ = memory_scan(*[x.bfloat16() for x in a32], chunk_size=8, window=3, poly=POLY.bfloat16(),
                        state=s16, impl=impl)
    assert y2.dtype == torch.bfloat16 and torch.isfinite(y2).all()


# 7. options ----------------------------------------------------------------------------------
@pytest.mark.parametrize("opts", [{"huber_delta": 0.2}, {"max_norm": 0.3}, {"muon": True},
                                  {"muon": True, "max_norm": 0.3, "huber_delta": 0.2}])
def test_options_reference_equals_chunked(opts):
    args = make(T=31, seed=10)
    kw = dict(chunk_size=7, window=4, poly=POLY, **opts)
    y_r, s_r = memory_scan(*args, impl="reference", **kw)
    y_c, s_c = memory_scan(*args, impl="chunked", **kw)
    y_plain, _ = memory_scan(*args, chunk_size=7, window=4, poly=POLY)
    assert rel(y_c, y_r) < 1e-8 and rel(s_c.M, s_r.M) < 1e-8 and rel(s_c.S, s_r.S) < 1e-8
    assert rel(y_r, y_plain) > 1e-3  # the option is active, not silently ignored


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_max_norm_bounds_memory(impl):
    args = make(T=30, seed=11, alpha=(0.01, 0.05), theta=(0.5, 0.95))
    _, free = memory_scan(*args, chunk_size=7, window=2, impl=impl)
    _, st = memory_scan(*args, chunk_size=7, window=2, impl=impl, max_norm=0.5)
    norms = st.M.norm(dim=(-2, -1))  # (B, H)
    assert (free.M.norm(dim=(-2, -1)) > 0.5).all()  # the clamp has work to do in every (b, h)
    assert (norms <= 0.5 * (1 + 1e-9)).all() and (norms > 0.5 * (1 - 1e-9)).any()


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_huge_huber_delta_is_l2(impl):
    args = make(T=23, seed=12)
    y, st = memory_scan(*args, chunk_size=5, window=3, poly=POLY, impl=impl)
    y_h, st_h = memory_scan(*args, chunk_size=5, window=3, poly=POLY, impl=impl, huber_delta=1e6)
    assert rel(y_h, y) < 1e-14 and rel(st_h.M, st.M) < 1e-14


# 8. special cases and input checks -----------------------------------------------------------
@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_eta_0_window_1_is_gated_delta_rule(impl):
    q, k, v, alpha, eta, theta, _ = make(T=21, seed=13)
    eta = torch.zeros_like(eta)
    M = torch.zeros(2, 3, 5, 6, dtype=torch.float64)
    ys = []
    for t in range(21):
        kt, vt = k[:, t, :, :, None], v[:, t, :, :, None]  # (B, H, D, 1)
        M = (1 - alpha[:, t, :, None, None]) * M - theta[:, t, :, None, None] * (M @ kt - vt) @ kt.transpose(-1, -2)
        ys.append((M @ q[:, t, :, :, None])[..., 0])
    y, st = memory_scan(q, k, v, alpha, eta, theta, chunk_size=1, window=1, impl=impl)
    assert rel(y, torch.stack(ys, 1)) < 1e-12 and rel(st.M, M) < 1e-12


def test_gate_edges_forward():
    """eta = 0 and alpha = 1 exactly: finite, and equal to the reference up to chunked's documented
    clamps (eta >= 1e-35, alpha <= 1 - 2**-24, i.e. a full forget keeps 6e-8 of M; measured 8e-9)."""
    q, k, v, a, e, th, g = make(T=20, seed=17)
    a[:, 5], e[:, 9], a[:, 13], e[:, 13] = 1.0, 0.0, 1.0, 0.0
    y_r, s_r = memory_scan(q, k, v, a, e, th, g, chunk_size=4, window=2, impl="reference")
    y_c, s_c = memory_scan(q, k, v, a, e, th, g, chunk_size=4, window=2, impl="chunked")
    assert torch.isfinite(y_c).all() and rel(y_c, y_r) < 1e-6 and rel(s_c.M, s_r.M) < 1e-6


@pytest.mark.parametrize("edge", ["eta=0", "alpha=1"])
def test_gate_edge_gradients(edge):
    """A gate exactly at its edge gets zero gradient in chunked (documented there: through the
    log it would be 1/eta times a cancelling sum); every other gradient still equals the reference."""
    q, k, v, a, e, th, g = make(T=12, seed=18)
    (e if edge == "eta=0" else a)[:, 5] = 0.0 if edge == "eta=0" else 1.0
    grads = []
    for impl in ("reference", "chunked"):
        gate = (e if edge == "eta=0" else a).clone().requires_grad_(True)
        gates = (a, gate) if edge == "eta=0" else (gate, e)
        y, _ = memory_scan(q, k, v, *gates, th, g, chunk_size=4, window=2, impl=impl)
        (grad,) = torch.autograd.grad(y.sum(), gate)
        grads.append(grad)
    ref, chk = grads
    assert torch.isfinite(chk).all() and torch.all(chk[:, 5] == 0)
    others = torch.ones(12, dtype=torch.bool)
    others[5] = False
    assert rel(chk[:, others], ref[:, others]) < 1e-8


def test_gamma_none_is_ones():
    q, k, v, a, e, th, _ = make(T=17, seed=14)
    y, _ = memory_scan(q, k, v, a, e, th, chunk_size=4, window=3)
    y1, _ = memory_scan(q, k, v, a, e, th, torch.ones_like(a), chunk_size=4, window=3)
    assert torch.equal(y, y1)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_empty_sequence(impl):
    args = make(T=0)
    y, st = memory_scan(*args, chunk_size=4, window=3, impl=impl)
    assert y.shape == (2, 0, 3, 5) and st.M.shape == (2, 3, 5, 6) and st.k.shape == (2, 2, 3, 6)
    _, full = memory_scan(*make(T=5), chunk_size=4, window=3, impl=impl)
    y, st2 = memory_scan(*args, chunk_size=4, window=3, impl=impl, state=full)
    assert y.shape == (2, 0, 3, 5) and torch.equal(st2.M, full.M) and torch.equal(st2.k, full.k)


def test_bad_inputs_raise():
    q, k, v, a, e, th, gm = make(T=6)
    ok = dict(chunk_size=2, window=3)
    with pytest.raises(ValueError, match="impl"):
        memory_scan(q, k, v, a, e, th, gm, impl="fast", **ok)
    with pytest.raises(ValueError, match="chunk_size"):
        memory_scan(q, k, v, a, e, th, gm, chunk_size=0, window=3)
    with pytest.raises(ValueError):
        memory_scan(q, k, v, a, e, th, gm, chunk_size=2, window=0)
    with pytest.raises(ValueError):
        memory_scan(q, k[..., :5], v, a, e, th, gm, **ok)  # Dk of k != Dk of q
    with pytest.raises(ValueError):
        memory_scan(q, k, v[:, :5], a, e, th, gm, **ok)  # v has fewer tokens
    with pytest.raises(ValueError, match="gamma"):
        memory_scan(q, k, v, a, e, th, gm[:, :, :2], **ok)
    _, st = memory_scan(q, k, v, a, e, th, gm, **ok)
    with pytest.raises(ValueError, match="halo"):
        memory_scan(q, k, v, a, e, th, gm, chunk_size=2, window=5, state=st)


@pytest.mark.parametrize("bad", ["batch", "Dv", "M-only"])
def test_mismatched_state_raises_value_error(bad):
    args = make(T=6)  # B=2, H=3, Dk=6, Dv=5
    st = MemoryState.zeros(*{"batch": (1, 3, 6, 5), "Dv": (2, 3, 6, 4), "M-only": (2, 3, 6, 5)}[bad],
                           1, torch.float64, "cpu")
    if bad == "M-only":  # halo fine, M and S of batch 1
        st.M, st.S = torch.ones(1, 3, 5, 6, dtype=torch.float64), torch.zeros(1, 3, 5, 6, dtype=torch.float64)
    with pytest.raises(ValueError):
        memory_scan(*args, chunk_size=2, window=1, state=st)
