"""Where the 300M step's GPU time goes, as a picture: one stacked bar per profiled variant (or per
recorded step of a session's profile file), split into profile_step.py's kernel groups.

    python3 benchmarks/plot_profile.py benchmarks/results/profile_step_h100_session7.json \
        --out benchmarks/results/profile_step_h100_session7.png

Reads either profile_step.py's output ({"variants": {name: row}}) or a session's record of
several profiles ({"steps": [{"after": ..., "kernels_ms", "groups_ms"}, ...]}). Needs matplotlib
(`pip install -e '.[plots]'`).
"""
from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

GROUPS = ("scan", "matmul", "fused", "attention", "other", "optimizer")  # profile_step.group's names


def rows(profile: dict) -> list[tuple[str, dict]]:
    """(label, groups_ms) for each profiled model in the file."""
    if "variants" in profile:
        return [(name, row["groups_ms"]) for name, row in profile["variants"].items()]
    return [(textwrap.shorten(step["after"], 60, placeholder="..."), step["groups_ms"]) for step in profile["steps"]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("profile", help="a JSON file written by profile_step.py, or a session's record")
    ap.add_argument("--out", required=True, help="the PNG to write")
    a = ap.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = rows(json.loads(Path(a.profile).read_text()))
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(data) + 2))
    for i, (_, groups) in enumerate(data):
        left = 0.0
        for g, color in zip(GROUPS, plt.get_cmap("tab10").colors):
            ms = groups.get(g, 0.0)
            ax.barh(i, ms, left=left, color=color, label=g if i == 0 else None)
            left += ms
        ax.text(left + 0.5, i, f"{left:.1f} ms", va="center", fontsize=8)
    ax.set_yticks(range(len(data)), [label for label, _ in data], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("GPU kernel time per training step (ms)")
    ax.set_title(f"300M step by kernel group ({Path(a.profile).name})", fontsize=10)
    ax.set_xlim(0, 1.1 * max(sum(groups.values()) for _, groups in data))  # room for the totals
    ax.legend(ncol=len(GROUPS), loc="upper center", bbox_to_anchor=(0.5, -0.18), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(a.out, dpi=120)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
