"""The causal conv + SiLU on its Triton kernels against the PyTorch twin: output and the gradients
of x, w and the halo, on odd shapes (under the CPU interpreter without CUDA)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated
pytest.importorskip("triton", reason="the Triton conv needs the triton package")

from atlas.memory.conv import conv_silu, conv_silu_torch  # noqa: E402

from test_memory_scan import rel  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def both(B, T, C, K, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, halo = torch.randn(B, T, C, generator=g), torch.randn(B, K - 1, C, generator=g)
    w, dy = 0.5 * torch.randn(C, K, generator=g), torch.randn(B, T, C, generator=g)
    out = []
    for triton in (False, True):
        ins = [t.to(DEV).requires_grad_(True) for t in (x.to(dtype), w, halo.to(dtype))]
        xs = ins if triton else [t.detach().float().requires_grad_(True) for t in ins]  # the twin in float32
        y = conv_silu(*xs, triton=True) if triton else conv_silu_torch(*xs)
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


@pytest.mark.parametrize("bt, bc", [(16, 64), (16, 128), (32, 64), (32, 128)])
def test_every_backward_tile(bt, bc, monkeypatch):
    """The backward's second pass is autotuned over its tile on the GPU (fewer row programs with
    32 rows: the per-program dw shares they leave are zeros); the test above runs one tile."""
    import triton
    from atlas.memory import triton_conv
    monkeypatch.setattr(triton_conv._bwd_in, "configs", [triton.Config({"BT": bt, "BC": bc}, num_warps=4)])
    ref, got = both(2, 150, 131, 4, seed=3)
    for name, a, b in zip(("y", "dx", "dw", "dhalo"), got, ref):
        assert rel(a, b) < 1e-5, name


@pytest.mark.skipif(DEV != "cuda", reason="bf16 kernels need a GPU")
def test_triton_conv_bf16_on_gpu():
    ref, got = both(2, 1000, 3 * 1024 + 5, 4, dtype=torch.bfloat16)
    for name, a, b in zip(("y", "dx", "dw", "dhalo"), got, ref):
        assert rel(a, b) < 1e-2, name
