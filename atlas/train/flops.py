"""FLOPs per trained token (forward + backward), counting the memory's own matmuls, for MFU."""
from __future__ import annotations

from ..config import ModelConfig
from ..memory.state import SUB_CHUNK

# Dense bf16 peak FLOP/s by device-name fragment (no sparsity).
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "A6000": 154.8e12, "L40S": 362e12, "4090": 165e12}


def peak_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in device_name), None)


def flops_per_token(m: ModelConfig, seq_len: int, chunk_size: int) -> float:
    d, L = m.d_model, m.n_layers
    attn_proj = 4 * d * d
    mlp = 3 * d * m.d_ff
    mem = m.memory
    mem_proj = (2 * mem.d_key + 2 * mem.d_value) * d + 4 * mem.heads * d if mem.enabled else 0
    matmul_params = L * (attn_proj + mlp + mem_proj) + d * m.vocab_size  # the head reads every token
    flops = 6 * matmul_params
    span = min(m.attn_window or seq_len, seq_len)
    flops += 3 * L * 2 * 2 * d * span / 2  # QK^T and AV; causal: half the span on average
    if mem.enabled:
        # inside a chunk every error is taken at M_ref, so a chunk runs as blocks of <= 64 tokens
        # sharing it (SUB_CHUNK): longer chunks cost no more, and counting the gate
        # matrices at n = chunk_size (2048) would triple the count with work no kernel does
        Dk, Dv, W = mem.d_key // mem.heads, mem.d_value // mem.heads, mem.context_window
        n = min(chunk_size, seq_len, SUB_CHUNK + 1 - W)
        per_head = (2 * (n + W) * (Dk + Dv)  # Phi(Q) Phi(K)^T and its product with the errors
                    + 10 * Dk * Dv  # reads of M_ref and S_ref, errors at M_ref, the M and S updates
                    + 2 * n * n + 2 * n * (n + W))  # gate matrices B @ E and G, per token
        flops += 3 * L * mem.heads * per_head
    return float(flops)
