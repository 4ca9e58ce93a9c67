"""The causal conv + SiLU on its Triton kernels against the PyTorch twin: output and the gradients
of x, w and the halo, on odd shapes (under the CPU interpreter without CUDA)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated
pytest.importorskip("triton", reason="the Triton conv needs the triton package")

from atlas.memory.conv import conv_silu, conv_silu_torch, l2_groups  # noqa: E402

from test_memory_scan import rel  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def both(B, T, C, K, dtype=torch.float32, seed=0, norm=(0, 1)):
    g = torch.Generator().manual_seed(seed)
    x, halo = torch.randn(B, T, C, generator=g), torch.randn(B, K - 1, C, generator=g)
    w, dy = 0.5 * torch.randn(C, K, generator=g), torch.randn(B, T, C, generator=g)
    out = []
    for triton in (False, True):
        ins = [t.to(DEV).requires_grad_(True) for t in (x.to(dtype), w, halo.to(dtype))]
        xs = ins if triton else [t.detach().float().requires_grad_(True) for t in ins]  # the twin in float32
        y = conv_silu(*xs, triton=True, norm=norm) if triton else l2_groups(conv_silu_torch(*xs), *norm)
        (y.float() * dy.to(DEV)).sum().backward()
        out.append([y] + [t.grad for t in xs])
    return out


@pytest.mark.parametrize("B, T, C, K", [(2, 37, 20, 4), (1, 2, 131, 4), (2, 70, 9, 1), (1, 5, 7, 3), (2, 300, 5, 4), (1, 9, 6, 6)])
def test_triton_conv_equals_torch(B, T, C, K):
    """T shorter than the window (2 < 3 halo rows), channels past a block (131), K = 1 (no halo),
    K = 3 (not a power of two), T = 300 (several programs of the backward, the last one part empty),
    K = 6 (beyond the kernels' taps: the PyTorch form, still the same function)."""
    ref, got = both(B, T, C, K)
    for name, a, b in zip(("y", "dx", "dw", "dhalo"), got, ref):
        if b.numel():
            assert rel(a, b) < 1e-5, name


@pytest.mark.parametrize("B, T, C, K, norm", [(2, 37, 3 * 16 + 5, 4, (32, 16)), (1, 70, 300, 3, (256, 128)),
                                               (2, 9, 130, 4, (128, 64)), (1, 33, 45, 4, (30, 15))])
def test_normalised_groups(B, T, C, K, norm):
    """The query and key heads normalised inside the kernels' tile: groups of 16 in part of a
    tile, of 128 (a whole tile) with a tile half normalised, 64; 15 is not a power of two (the
    kernels leave it to l2_groups). A zero group (silu(0) = 0) takes F.normalize's eps branch."""
    ref, got = both(B, T, C, K, norm=norm)
    for name, a, b in zip(("y", "dx", "dw", "dhalo"), got, ref):
        assert rel(a, b) < 1e-5, name


def test_zero_group_stays_finite():
    """A group that is all zeros (x = 0 there, its window too) comes out 0 with finite gradients,
    as F.normalize's does."""
    x = torch.randn(1, 8, 48, device=DEV)
    x[..., :16] = 0
    halo, w = torch.zeros(1, 3, 48, device=DEV), torch.randn(48, 4, device=DEV)
    ys = []
    for triton in (False, True):
        xs = [t.clone().requires_grad_(True) for t in (x, w, halo)]
        y = conv_silu(*xs, triton=triton, norm=(32, 16))
        y.square().sum().backward()
        ys.append([y] + [t.grad for t in xs])
    for a, b in zip(*ys):
        assert torch.isfinite(a).all() and rel(a, b) < 1e-5


@pytest.mark.parametrize("rows", [32, 64, 128])
def test_every_backward_tile(rows, monkeypatch):
    """The backward is autotuned over its rows per program on the GPU (fewer programs with more
    rows: the per-program dw shares they leave are zeros); the test above runs one."""
    import triton
    from atlas.memory import triton_conv
    monkeypatch.setattr(triton_conv._bwd, "configs", [triton.Config({"R": rows, "BC": triton_conv.BC}, num_warps=4)])
    ref, got = both(2, 150, 131, 4, seed=3)
    for name, a, b in zip(("y", "dx", "dw", "dhalo"), got, ref):
        assert rel(a, b) < 1e-5, name


@pytest.mark.skipif(DEV != "cuda", reason="bf16 kernels need a GPU")
def test_triton_conv_bf16_on_gpu():
    ref, got = both(2, 1000, 3 * 1024 + 5, 4, dtype=torch.bfloat16, norm=(2048, 128))
    for name, a, b in zip(("y", "dx", "dw", "dhalo"), got, ref):
        assert rel(a, b) < 1e-2, name
