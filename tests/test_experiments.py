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
