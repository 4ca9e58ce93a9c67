"""What sliding-window attention alone can reach on MQAR: the share of queries whose key-value
pair lies within reach. With L layers of window w, information travels at most L*(w-1) tokens, so
an attention-only model can answer at most those queries (plus chance on the rest).

    python experiments/memory_use/mqar_window_bound.py
"""
import numpy as np

from atlas.tasks.mqar import generate

LAYERS = 2
for T, kv, window in ((256, 16, 32), (512, 64, 64), (512, 32, 32)):
    x, qpos, _ = generate(np.random.default_rng(0), 20000, T, kv, 8192)
    key_pos = 2 * np.arange(kv)  # (κ,) the i-th drawn gap goes to the i-th key; its value follows it
    dist = qpos - key_pos  # (n, κ)
    one, reach = (dist < window).mean(), (dist <= LAYERS * (window - 1)).mean()
    print(f"T={T} kv={kv} window={window}: pair inside one window {one:.3f}; "
          f"within {LAYERS} layers' reach ({LAYERS * (window - 1)} tokens) {reach:.3f}")
