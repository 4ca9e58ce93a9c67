"""Combine the parts written by run.py into results.json, plots and a markdown table.

    python experiments/memory_use/report.py DIR [DIR ...] [--out experiments/memory_use]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

COMMAND = ("python experiments/memory_use/run.py --part {lm,mqar,passkey} [--only RECIPE] [--points T:kv] "
           "--out DIR  (on the GPU machine); python experiments/memory_use/report.py DIR [DIR ...]  "
           "(the parts and the exact commands: experiments/memory_use/README.md)")


MQAR_HEADLINE = (512, 32, 32)  # T, kv pairs, attention window


def load_parts(dirs: list[Path]) -> dict:
    parts = {}
    for d in dirs:
        for name in ("lm", "mqar", "passkey"):
            f = d / f"{name}.json"
            if f.exists():  # a part split over several directories (e.g. MQAR points) is merged
                part = json.loads(f.read_text())
                if name in parts:
                    part["results"] = {**parts[name]["results"], **part["results"]}
                parts[name] = part
    return parts


def gate_travel(r: dict, init: float, gates: list[float]) -> dict:
    """How far each layer's gate logit moved over the run, against the sum of the learning rates
    its steps had (atlas.memory.stats.gate_drift over the whole run, unsigned): Adam moves a
    parameter by about lr a step at most, so a gradient of one sign all along would use it all.
    The seed's field report went from 0.501 to 0.259 in 11.5K steps at lr 1.5e-4: |dw| 1.05 of a
    budget of ~1.7, i.e. ~0.6."""
    from atlas.config import load_config
    from atlas.memory.stats import gate_drift
    from atlas.train.optim import gate_lr_sum
    cfg = load_config("tiny", r["overrides"])
    budget = gate_lr_sum(cfg, 0, r["final_val"]["step"])
    drift = gate_drift(gates, [init] * len(gates), budget, cfg.model.gate.floor)
    return {"lr_budget": budget, "fraction_per_layer": [abs(d) for d in drift]}


def recipe_row(r: dict, init: float | None) -> dict:
    final = r["final_val"]
    gates = r["gates"][-1][1] if r["gates"] else None
    share = r["mem_share"][-1][1] if r.get("mem_share") else None  # parts from before it was logged: none
    return {"initial_gate": init, "final_gate_per_layer": gates,
            "mean_final_gate": sum(gates) / len(gates) if gates else None,
            # ||g m|| / (||g m|| + ||(1-g) a||): the gate, unless the branches differ in size
            "final_mem_share_per_layer": share,
            "gate_logit_travel": gate_travel(r, init, gates) if gates else None,
            "val_loss": final["val_loss"], "val_loss_memory_off": final.get("val_loss_memory_off"),
            "val_loss_memory_shuffled": final.get("val_loss_memory_shuffled"), "steps": final["step"],
            "tokens_per_s": r["tokens_per_s"], "wall_s": r["wall_s"]}


def build(parts: dict) -> dict:
    out = {"device": None, "command": COMMAND}
    if "lm" in parts:
        out["device"] = parts["lm"]["device"]
        res = parts["lm"]["results"]
        out["recipes"] = {k: recipe_row(v, 0.5 if k in ("seed", "atlas") else None) for k, v in res.items()}
    if "mqar" in parts:
        out["device"] = out["device"] or parts["mqar"]["device"]
        res = parts["mqar"]["results"]
        points = sorted({(v["point"]["T"], v["point"]["kv_pairs"], v["point"]["attn_window"]) for v in res.values()})
        rows = []
        for T, kv, w in points:
            row = {"T": T, "kv_pairs": kv, "attn_window": w}
            for name in ("atlas", "swa_only"):
                r = res.get(f"{name}_T{T}_kv{kv}")
                if r:
                    row[name] = r["accuracy"]
                    row[f"{name}_budget"] = r["budget"]
                    lrs = [o.split("=", 1)[1] for o in r["overrides"] if o.startswith("model.memory.max_lr=")]
                    if name == "atlas" and lrs:
                        row["atlas_memory_max_lr"] = float(lrs[-1])
            rows.append(row)
        # the headline: the point whose pairs attention cannot reach (mqar_window_bound.py)
        # (when both models have a final evaluation there; else the first point that has them)
        complete = [r for r in rows if "atlas" in r and "swa_only" in r] or rows
        out["mqar"] = next((r for r in complete if (r["T"], r["kv_pairs"], r["attn_window"]) == MQAR_HEADLINE),
                           complete[0])
        out["mqar_harder"] = [r for r in rows if r["kv_pairs"] == 64]
        out["mqar_points"] = rows
    if "passkey" in parts:
        res = parts["passkey"]["results"]
        L = res["atlas"]["train_len"]
        out["passkey"] = {"train_len": L, "eval_len": 4 * L,
                          **{k: (res[k]["accuracy"][str(4 * L)] if k in res else None) for k in ("atlas", "swa_only")},
                          "by_length": {k: v["accuracy"] for k, v in res.items()},
                          "digit_accuracy_by_length": {k: v.get("digit_accuracy") for k, v in res.items()},
                          # the same keys by argmax with the answer fed in: equal to greedy when decoding is exact
                          "teacher_forced_by_length": {k: v.get("teacher_forced_accuracy") for k, v in res.items()},
                          "budget": {k: {"steps": v["final_val"]["step"], "wall_s": v["wall_s"]} for k, v in res.items()},
                          # teacher-forced accuracy on the answer tokens of validation haystacks (train length)
                          "answer_token_acc": {k: v["final_val"].get("retrieval_acc") for k, v in res.items()},
                          "answer_token_acc_memory_off": {k: v["final_val"].get("retrieval_acc_memory_off")
                                                          for k, v in res.items()}}
    return out


def plot(parts: dict, out_dir: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    made = []
    if "lm" in parts:
        res = parts["lm"]["results"]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, name in zip(axes, ("seed", "atlas")):
            g, share = res[name]["gates"], res[name].get("mem_share") or []
            for layer in range(len(g[0][1])):
                line, = ax.plot([s for s, _ in g], [v[layer] for _, v in g], label=f"layer {layer}")
                if share:
                    ax.plot([s for s, _ in share], [v[layer] for _, v in share], color=line.get_color(), ls=":")
            ax.set_title(f"{name}: gate (solid), memory share (dotted)")
            ax.set_xlabel("step")
            ax.axhline(0.5, color="grey", lw=0.5, ls="--")
        axes[0].set_ylabel("per layer")
        axes[1].legend()
        fig.tight_layout()
        fig.savefig(out_dir / "gates.png", dpi=110)
        made.append("gates.png")
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, r in res.items():
            ax.plot([s for s, _ in r["loss"]], [v for _, v in r["loss"]], label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_ylim(top=min(8.5, ax.get_ylim()[1]))
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "loss.png", dpi=110)
        made.append("loss.png")
    if "mqar" in parts:
        res = {k: v for k, v in parts["mqar"]["results"].items() if v["gates"]}
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, r in res.items():
            for layer in range(len(r["gates"][0][1])):
                ax.plot([s for s, _ in r["gates"]], [v[layer] for _, v in r["gates"]], label=f"{name} layer {layer}")
        ax.set_xlabel("step")
        ax.set_ylabel("gate (memory share)")
        ax.set_title("MQAR: mixing gate per layer")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "mqar_gates.png", dpi=110)
        made.append("mqar_gates.png")
    return made


def table(results: dict) -> str:
    lines = ["| recipe | initial gate | final gate per layer (mean) | memory share per layer | val loss "
             "| memory off | memory shuffled | tokens/s |", "|---|---|---|---|---|---|---|---|"]
    per_layer = lambda xs: ", ".join(f"{x:.3f}" for x in xs) if xs else "–"
    loss = lambda x: f"{x:.4f}" if x is not None else "–"
    for name, r in results.get("recipes", {}).items():
        gates = per_layer(r["final_gate_per_layer"])
        if r["mean_final_gate"] is not None:
            gates += f" ({r['mean_final_gate']:.3f})"
        init = r["initial_gate"] if r["initial_gate"] is not None else "–"
        lines.append(f"| {name} | {init} | {gates} | {per_layer(r.get('final_mem_share_per_layer'))} "
                     f"| {loss(r['val_loss'])} | {loss(r['val_loss_memory_off'])} "
                     f"| {loss(r.get('val_loss_memory_shuffled'))} | {r['tokens_per_s']:,.0f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("dirs", nargs="+")
    p.add_argument("--out", default=str(Path(__file__).parent))
    a = p.parse_args()
    parts = load_parts([Path(d) for d in a.dirs])
    out_dir = Path(a.out)
    results = build(parts)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    made = plot(parts, out_dir)
    print(table(results))
    print(json.dumps({k: results.get(k) for k in ("mqar", "mqar_harder", "passkey")}, indent=1))
    print("wrote", out_dir / "results.json", *made)


if __name__ == "__main__":
    main()
