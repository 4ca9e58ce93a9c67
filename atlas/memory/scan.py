"""The public function: `memory_scan`, one function with several implementations."""
from __future__ import annotations

import torch

from ..errors import UserError
from .chunked import memory_scan_chunked
from .reference import memory_scan_reference
from .state import MemoryState


def _memory_scan_triton(*args, **kwargs):
    """Imported on first use, so that machines without triton still import atlas."""
    try:
        from .triton_scan import memory_scan_triton
    except ImportError as e:
        raise UserError(f"memory_scan(impl='triton') needs triton ({e}); pip install 'atlas-lm[gpu]'") from e
    return memory_scan_triton(*args, **kwargs)


IMPLS = {"reference": memory_scan_reference, "chunked": memory_scan_chunked, "triton": _memory_scan_triton}


def memory_scan(q, k, v, alpha, eta, theta, gamma=None, *, chunk_size, window=1, poly=None,
                state=None, impl="chunked", huber_delta=None, max_norm=None, muon=False):
    """Run the Titans/Miras/ATLAS memory over a sequence (DESIGN.md §1).

    q, k: (B, T, H, Dk); v: (B, T, H, Dv); alpha (forget), eta (momentum), theta (learning rate),
    gamma (Omega weight, default 1): (B, T, H) in [0, 1]. poly: None or coefficients a_1..a_p of
    phi(x) = sum a_i x^i, applied to q and k. state: None (zeros) or a returned MemoryState.

      loss_t(M) = sum_{i=t-window+1..t} gamma_i/2 ||M phi(k_i) - v_i||^2, gradient at the memory
      as it was at the start of t's chunk;  S_t = eta_t S_{t-1} - theta_t grad;
      M_t = (1 - alpha_t) M_{t-1} + S_t;  y_t = M_t phi(q_t).

    Options beyond the core (all off by default): huber_delta (Huber attentional bias: the error
    is clipped to +-delta), max_norm (the seed's global clamp of ||M||_F, applied at chunk ends),
    muon (ATLAS: the momentum carried into each chunk is orthogonalised by Newton–Schulz-5 once
    per chunk before it updates M). Chunks are aligned to the call's first token, so a sequence
    split into chunk-aligned pieces with the state carried gives the same result.

    Returns y (B, T, H, Dv) in q's dtype, and the new MemoryState (float32, or float64 for
    float64 inputs). bf16 inputs are computed in float32.
    """
    if impl not in IMPLS:
        raise ValueError(f"memory_scan: unknown impl {impl!r}; choose one of {sorted(IMPLS)}")
    if chunk_size < 1 or window < 1:
        raise ValueError(f"memory_scan: chunk_size and window must be >= 1 (got {chunk_size}, {window})")
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    if k.shape != q.shape or v.shape[:3] != (B, T, H):
        raise ValueError(f"memory_scan: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "must be (B, T, H, Dk), (B, T, H, Dk), (B, T, H, Dv)")
    for name, g in (("alpha", alpha), ("eta", eta), ("theta", theta), ("gamma", gamma)):
        if g is not None and g.shape != (B, T, H):
            raise ValueError(f"memory_scan: {name} is {tuple(g.shape)}, expected (B, T, H) = {(B, T, H)}")

    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    if state is None:
        state = MemoryState.zeros(B, H, Dk, Dv, window, dt, q.device)
    elif state.k.shape[1] != window - 1:
        raise ValueError(f"memory_scan: state holds a halo of {state.k.shape[1]} tokens, "
                         f"window {window} needs {window - 1}")
    else:
        W1 = window - 1
        want = {"M": (B, H, Dv, Dk), "S": (B, H, Dv, Dk), "k": (B, W1, H, Dk), "v": (B, W1, H, Dv), "gamma": (B, W1, H)}
        for name, shape in want.items():
            if tuple(getattr(state, name).shape) != shape:
                raise ValueError(f"memory_scan: state.{name} is {tuple(getattr(state, name).shape)}, "
                                 f"these inputs need {shape}")
    state = MemoryState(*(t.to(dt) for t in (state.M, state.S, state.k, state.v, state.gamma)))
    if gamma is None:
        gamma = torch.ones_like(alpha)
    # the Triton kernels read bf16/fp16 q, k, v as they are (half the bytes) and widen them on load
    keep = 3 if impl == "triton" and q.dtype in (torch.bfloat16, torch.float16) else 0
    args = [t if i < keep else t.to(dt) for i, t in enumerate((q, k, v, alpha, eta, theta, gamma))]
    if T == 0:
        return q.new_zeros(B, 0, H, Dv), state
    y, new_state = IMPLS[impl](*args, chunk_size=chunk_size, window=window,
                               poly=None if poly is None else poly.to(dt), state=state,
                               huber_delta=huber_delta, max_norm=max_norm, muon=muon)
    return y.to(q.dtype), new_state
