"""experiments/memory_use/report.py: the numbers it derives for results.json."""
import importlib.util
import math
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "memory_use_report", Path(__file__).parents[1] / "experiments" / "memory_use" / "report.py")
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)


@pytest.mark.parametrize("floor", [0.0, 0.1])
def test_gate_travel_is_logit_distance_over_the_lr_sum(floor):
    """Constant lr 0.01 for 10 steps: a budget of 0.1; a logit moved by +0.05 and -0.02 uses half
    and a fifth of it, whatever the gate floor."""
    over = ["train.lr=0.01", "train.warmup_steps=1", "train.min_lr_ratio=1.0", "train.stages=[{steps: 10}]",
            f"model.gate.floor={floor}"]
    gate = lambda w: floor + (1 - floor) / (1 + math.exp(-w))  # noqa: E731
    out = report.gate_travel({"overrides": over, "final_val": {"step": 10}}, gate(0.0), [gate(0.05), gate(-0.02)])
    assert out["lr_budget"] == pytest.approx(0.1)
    assert out["fraction_per_layer"] == pytest.approx([0.5, 0.2])


def test_recipe_rows_carry_the_memory_share_and_the_table_shows_it():
    """results.json's recipe row: the last stats row's gates and mem_share, the three validation
    losses; parts written before mem_share was logged give None and a dash in the table."""
    over = ["train.lr=0.01", "train.warmup_steps=1", "train.stages=[{steps: 10}]"]
    run = {"gates": [[5, [0.5, 0.5]], [10, [0.4, 0.2]]], "mem_share": [[5, [0.5, 0.5]], [10, [0.3, 0.1]]],
           "final_val": {"step": 10, "val_loss": 4.0, "val_loss_memory_off": 4.5, "val_loss_memory_shuffled": 5.0},
           "overrides": over, "tokens_per_s": 1000.0, "wall_s": 1.0}
    row = report.recipe_row(run, 0.5)
    assert row["final_gate_per_layer"] == [0.4, 0.2] and row["mean_final_gate"] == pytest.approx(0.3)
    assert row["final_mem_share_per_layer"] == [0.3, 0.1] and row["val_loss_memory_shuffled"] == 5.0
    old = report.recipe_row({k: v for k, v in run.items() if k != "mem_share"}, 0.5)
    assert old["final_mem_share_per_layer"] is None
    text = report.table({"recipes": {"new": row, "old": old}})
    assert "| new | 0.5 | 0.400, 0.200 (0.300) | 0.300, 0.100 | 4.0000 | 4.5000 | 5.0000 | 1,000 |" in text
    assert "| old | 0.5 | 0.400, 0.200 (0.300) | – |" in text
