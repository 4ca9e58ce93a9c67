"""The seed recipe with and without what the seed's code did to its memory: mean gate over layers
against steps, one line per run, into seed_code.png, and a table (experiments/memory_use/README.md,
"What the seed's code did").

    python experiments/memory_use/seed_code.py
"""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent
PARTS = HERE / "parts"
# (label, part file): each holds one `seed` run (its overrides are in the file)
RUNS = [
    ("seed recipe on Atlas's memory (gate LR x1)", PARTS / "lm_seed" / "lm.json"),
    ("+ gate LR x5 (the seed's trainer)", PARTS / "seed_code" / "gate_lr5" / "lm.json"),
    ("+ writes under no_grad", PARTS / "seed_code" / "detach" / "lm.json"),
    ("+ memory carried across batches, forget 0.0006 (the seed's memory)", PARTS / "seed_code" / "seed_memory" / "lm.json"),
    ("the same, 3,000 steps", PARTS / "seed_code" / "seed_memory_3000" / "lm.json"),
    ("the seed's memory, and its gate: per channel from both branches", PARTS / "seed_code" / "gate_branches" / "lm.json"),
    ("the seed's memory (scalar gate) and its features, in its memory regime (theta 0.0125)", PARTS / "seed_features" / "seed_feat_lo" / "lm.json"),
    ("the same, 3,000 steps (the `seed` recipe now)", PARTS / "lm3000" / "seed" / "lm.json"),
]


def main() -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    print("| run | steps | mean final gate | final gate per layer | val loss | memory off |")
    print("|---|---:|---:|---|---:|---:|")
    for label, f in RUNS:
        r = json.loads(f.read_text())["results"]["seed"]
        steps = [s for s, _ in r["gates"]]
        mean = [sum(g) / len(g) for _, g in r["gates"]]
        ax.plot(steps, mean, label=label)
        v, last = r["final_val"], r["gates"][-1][1]
        print(f"| {label} | {v['step']:,} | {mean[-1]:.3f} | {', '.join(f'{g:.3f}' for g in last)} | "
              f"{v['val_loss']:.4f} | {v['val_loss_memory_off']:.4f} |")
    ax.axhline(0.25, color="grey", lw=0.5, ls="--")  # half the initial gate: the collapse line
    ax.set_xlabel("step")
    ax.set_ylabel("mean gate over layers")
    ax.set_title("seed recipe: the gate against what the seed's code did")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.2), ncol=1)  # below the axes: no curve under it
    fig.tight_layout()
    fig.savefig(HERE / "seed_code.png", dpi=110, bbox_inches="tight")
    print("wrote", HERE / "seed_code.png")


if __name__ == "__main__":
    main()
