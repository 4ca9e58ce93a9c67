"""impl="triton" against its twin impl="chunked": outputs, final state and every gradient.

Without CUDA the kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1, set below before
the kernels are defined) on tiny odd shapes; with CUDA the same tests run on the GPU, plus bf16.
"""
import os
import warnings

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated
os.environ.setdefault("ATLAS_TRITON_TUNE", "0")  # many small shapes: compile one config of each
os.environ.setdefault("ATLAS_TRITON_COMPILE_GATES", "0")  # and no inductor compile per shape
pytest.importorskip("triton", reason="impl='triton' needs the triton package (pip install 'atlas-lm[gpu]')")

from atlas.errors import UserError  # noqa: E402
from atlas.memory import MemoryState, memory_scan  # noqa: E402
from atlas.memory import triton_scan  # noqa: E402

from test_memory_scan import POLY, make, rel  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-5 if DEV == "cpu" else 1e-4  # float32 either way; the GPU sums in another order


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny numpy ops in the interpreter: a second thread only adds sync cost
    yield
    torch.set_num_threads(n)


def run_both(T, chunk, W, *, poly=None, huber=None, Dk=12, Dv=10, carry=True, dtype=torch.float32, seed=0):
    """Forward and backward of chunked (float32, on the same values) and triton; returns both
    (y, M, S, grads) with grads of q, k, v, the four gates, poly and the five state tensors."""
    args = [x.to(DEV) for x in make(B=2, T=T, H=2, Dk=Dk, Dv=Dv, seed=seed, dtype=torch.float32)]
    args = [x.to(dtype) if i < 3 else x for i, x in enumerate(args)]  # q, k, v in the tested dtype
    st = MemoryState.zeros(2, 2, Dk, Dv, W, torch.float32, DEV)
    if carry:  # a state that is not zero: memory, momentum and window halo from an earlier call
        g = torch.Generator().manual_seed(seed + 1)
        st = MemoryState(*(0.3 * torch.rand(x.shape, generator=g).to(DEV) for x in (st.M, st.S, st.k, st.v, st.gamma)))
    out = []
    for impl in ("chunked", "triton"):
        xs = [x.detach().clone().requires_grad_(True) for x in args]
        p = None if poly is None else poly.float().to(DEV).requires_grad_(True)
        sx = [x.clone().requires_grad_(True) for x in (st.M, st.S, st.k, st.v, st.gamma)]
        y, s = memory_scan(*xs, chunk_size=chunk, window=W, poly=p, state=MemoryState(*sx), impl=impl,
                           huber_delta=huber)
        gen = torch.Generator().manual_seed(seed + 2)
        wy, wm, ws = (torch.randn(x.shape, generator=gen).to(DEV) for x in (y, s.M, s.S))
        ((y.float() * wy).sum() + (s.M * wm).sum() + (s.S * ws).sum()).backward()
        n_state = 5 if W > 1 else 2  # with W = 1 the halo tensors are empty
        grads = [x.grad for x in xs] + ([] if p is None else [p.grad]) + [x.grad for x in sx[:n_state]]
        out.append((y, s, grads))
    return out


def check(ref, got, tol, gtol):
    (y0, s0, g0), (y1, s1, g1) = ref, got
    assert y1.dtype == y0.dtype or y1.dtype == torch.bfloat16
    assert rel(y1, y0) < tol and rel(s1.M, s0.M) < tol and rel(s1.S, s0.S) < tol
    for name in ("k", "v", "gamma"):
        assert torch.allclose(getattr(s1, name), getattr(s0, name)), name
    for i, (a, b) in enumerate(zip(g1, g0)):
        assert torch.isfinite(a).all(), i
        if b.norm() == 0:  # a zero halo weight makes the halo's keys and values irrelevant
            assert a.norm() == 0, i
        else:
            assert rel(a, b) < gtol, (i, rel(a, b))


@pytest.mark.parametrize("T, chunk, W, poly, huber, sub", [
    (37, 8, 3, None, None, 64),  # partial last chunk, window halo from the carried state
    (63, 16, 1, POLY, None, 64),  # Titans' window, polynomial map, 63 = 3 chunks + 15
    (63, 24, 4, POLY, None, 16),  # chunks of 24 run as sub-chunks of 16 + 8 sharing M_ref
    (40, 5, 2, None, 0.3, 64),  # Huber: errors beyond delta are clipped, their cotangent masked
    (63, 40, 3, None, 0.3, 16),  # Huber across sub-chunks
    (48, 16, 2, None, None, 64),  # every sub-chunk full: the end-of-sub-chunk row is one slice
    (32, 16, 1, None, None, 64),  # no halo, full sub-chunks of a power of two: no gathers at all
    (45, 20, 12, None, None, 16),  # a window longer than a sub-chunk: keys in up to 4 sub-chunks' rows
    (50, 64, 2, None, None, 16),  # one partial chunk of several sub-chunks
    (70, 32, 5, POLY, 0.2, 16),  # Huber and the polynomial map over chunks of several sub-chunks
])
def test_triton_equals_chunked(T, chunk, W, poly, huber, sub, monkeypatch):
    monkeypatch.setattr(triton_scan, "SUB_CHUNK", sub)
    ref, got = run_both(T, chunk, W, poly=poly, huber=huber)
    check(ref, got, TOL, 10 * TOL)


@pytest.mark.parametrize("BV", [4, 8, 16, 32, 64])
def test_every_value_block(BV, monkeypatch):
    """On the GPU the autotuner picks each kernel's Dv block (4 to 32 in the sequential passes, 32
    or 64 in the others); the tests above run one. Each block against chunked, with Dv = 60 (a
    partial last block at 8, 16, 32 and 64), chunks of several sub-chunks, window halo, poly and
    Huber. The parallel kernels take blocks of 16 or more (Dv is their products' K dimension)."""
    import triton
    from atlas.memory import triton_kernels as kern
    for name in ("_fwd_state", "_fwd_out", "_bwd_state", "_bwd_q", "_bwd_k"):  # one config: no tuning
        bv = BV if name.endswith("_state") else max(BV, 16)
        monkeypatch.setattr(getattr(kern, name), "configs", [triton.Config({"BV": bv}, num_warps=4)])
    monkeypatch.setattr(triton_scan, "SUB_CHUNK", 16)
    ref, got = run_both(45, 40, 3, poly=POLY, huber=0.3, Dk=20, Dv=60, seed=8)
    check(ref, got, TOL, 10 * TOL)


def test_wide_heads_no_carry():
    """Dk = 60 is no power of two: blocks are masked to it; the state starts at zero."""
    ref, got = run_both(33, 64, 3, Dk=60, Dv=33, carry=False, seed=4)
    check(ref, got, TOL, 10 * TOL)


def test_chunk_aligned_pieces_equal_one_call():
    args = [x.to(DEV) for x in make(T=40, seed=7, dtype=torch.float32, Dk=12, Dv=10)]
    kw = dict(chunk_size=8, window=3, poly=POLY.float().to(DEV), impl="triton")
    y, st = memory_scan(*args, **kw)
    ys, state = [], None
    for lo, hi in ((0, 16), (16, 24), (24, 40)):
        yp, state = memory_scan(*[x[:, lo:hi] for x in args], state=state, **kw)
        ys.append(yp)
    assert rel(torch.cat(ys, 1), y) < TOL and rel(state.M, st.M) < TOL and rel(state.S, st.S) < TOL


def test_unsupported_options_fall_back_to_chunked():
    args = [x.to(DEV) for x in make(T=12, seed=3, dtype=torch.float32)]
    with pytest.warns(UserWarning, match="using impl='chunked'"):
        y, _ = memory_scan(*args, chunk_size=4, impl="triton", muon=True)
    y0, _ = memory_scan(*args, chunk_size=4, impl="chunked", muon=True)
    assert torch.equal(y, y0)


def test_max_norm_chunk_by_chunk():
    """max_norm (the seed's clamp where a chunk closes) runs the kernels a chunk a call: the same
    function as chunked, gradients included, with the clamp binding at every chunk, a window halo
    carried across the calls and a partial last chunk."""
    args = [x.to(DEV) for x in make(B=2, T=45, H=2, Dk=12, Dv=10, seed=9, dtype=torch.float32)]
    out = []
    for impl in ("chunked", "triton"):
        xs = [x.clone().requires_grad_(True) for x in args]
        y, st = memory_scan(*xs, chunk_size=16, window=3, poly=POLY.float().to(DEV), impl=impl, max_norm=0.05)
        assert st.M.norm(dim=(-2, -1)).max() <= 0.05 + 1e-6
        (y.square().sum() + st.M.sum()).backward()
        out.append((y, st, [x.grad for x in xs]))
    (y0, s0, g0), (y1, s1, g1) = out
    assert rel(y1, y0) < TOL and rel(s1.M, s0.M) < TOL and rel(s1.S, s0.S) < TOL
    for i, (a, b) in enumerate(zip(g1, g0)):
        assert rel(a, b) < 10 * TOL, i
    with pytest.warns(UserWarning, match="float64"):
        memory_scan(*[x.double() for x in args], chunk_size=4, impl="triton")


def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(UserError, match="CUDA"):
        memory_scan(*make(T=4, dtype=torch.float32), chunk_size=4, impl="triton")


def test_compile_traces_around_the_op():
    """torch.compile sees the kernels as one opaque op (register_fake): a full graph, same numbers."""
    args = [x.to(DEV).requires_grad_(True) for x in make(B=1, T=20, Dk=12, Dv=10, seed=5, dtype=torch.float32)]

    def f(*a):
        y, st = memory_scan(*a, chunk_size=8, window=2, impl="triton")
        return y.sum() + st.M.sum()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = torch.compile(f, backend="aot_eager", fullgraph=True)(*args)
    (g,) = torch.autograd.grad(out, args[2])
    (g0,) = torch.autograd.grad(f(*args), args[2])
    assert rel(out, f(*args)) < TOL and rel(g, g0) < TOL


@pytest.mark.skipif(DEV != "cuda", reason="bf16 kernels need a GPU")
@pytest.mark.parametrize("W, chunk, sub", [(1, 16, 64), (3, 16, 64), (3, 40, 16)])
def test_bf16_on_gpu(W, chunk, sub, monkeypatch):
    """bf16 q, k, v against chunked on the same (bf16-valued) inputs in float32: the issue's 1e-2 bar.
    The stored sub-chunk states are bf16 here; the last case spans chunks over several sub-chunks
    (the 300M preset's layout: errors at the chunk-start M, read back from a bf16 copy)."""
    monkeypatch.setattr(triton_scan, "SUB_CHUNK", sub)
    ref, got = run_both(63, chunk, W, poly=POLY, Dk=60, Dv=60, dtype=torch.bfloat16, seed=6)
    check(ref, got, 1e-2, 2e-2)


def test_layer_decoding_with_triton_equals_one_call(monkeypatch):
    """A MemoryLayer on impl="triton": a prompt ending mid-chunk, then pieces of 1 and of 9 tokens
    (the one-token step, and the kernels re-running the open chunk), equals one call."""
    from atlas.config import load_config
    from atlas.memory.layer import MemoryLayer
    monkeypatch.setattr(triton_scan, "SUB_CHUNK", 16)
    cfg = load_config("tiny", ["model.memory.heads=2", "model.memory.d_key=24", "model.memory.d_value=20",
                               "model.memory.chunk_size=12", "model.memory.context_window=2",
                               "model.memory.impl=triton"]).model.memory
    torch.manual_seed(0)
    layer = MemoryLayer(32, cfg).to(DEV)
    x = torch.randn(2, 40, 32, device=DEV)
    with torch.no_grad():
        full, _ = layer(x)
        y, st = layer(x[:, :17])
        pieces = [y]
        for a, b in [(17, 18), (18, 27), (27, 28), (28, 40)]:
            y, st = layer(x[:, a:b], st)
            pieces.append(y)
    assert rel(torch.cat(pieces, 1), full) < TOL
