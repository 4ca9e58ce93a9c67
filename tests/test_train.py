"""atlas train: bit-identical resume, the seed's metric names, stage transitions, bad input."""
import json

import pytest

from atlas.cli import main

SMALL = ["model.vocab_size=512", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64",
         "model.attn_window=16", "model.memory.heads=2", "model.memory.d_key=16", "model.memory.d_value=16",
         "model.memory.chunk_size=8", "train.seq_len=32", "train.batch_size=2", "train.warmup_steps=2",
         "train.stages=[{steps: 4, chunk_size: 8}, {steps: 4, chunk_size: 4}]", "train.val_batches=1",
         "train.sample_tokens=4", "train.stats_every=2", "train.val_every=3"]


def rows(run, stream):
    return [json.loads(line) for line in (run / "metrics" / f"{stream}.jsonl").read_text().splitlines()]


def test_resume_is_bit_identical_and_metrics_are_named(tmp_path):
    a, b = tmp_path / "A", tmp_path / "B"
    common = SMALL + ["train.log_every=1", "train.checkpoint_every=2", "train.seed=7"]
    assert main(["train", "tiny", "--run-dir", str(a), "train.max_steps=6", *common]) == 0
    tok = str(a / "tokenizer.json")  # reuse A's BPE: B's data is then byte-identical and quick to build
    assert main(["train", "tiny", "--run-dir", str(b), "train.max_steps=4", f"data.tokenizer={tok}", *common]) == 0
    assert main(["train", "--resume", str(b), "train.max_steps=6"]) == 0

    loss_a = {r["step"]: r["loss"] for r in rows(a, "train_steps")}
    loss_b = {r["step"]: r["loss"] for r in rows(b, "train_steps")}
    assert [loss_b[s] for s in (5, 6)] == [loss_a[s] for s in (5, 6)]  # exact, not close
    drift_a = {r["step"]: r["gate_drift"] for r in rows(a, "train_steps") if "gate_drift" in r}
    drift_b = {r["step"]: r["gate_drift"] for r in rows(b, "train_steps") if "gate_drift" in r}
    assert drift_b[6] == drift_a[6]  # gate_drift picks up where the logs left off

    first = rows(a, "train_steps")[0]
    assert {"step", "loss", "ppl", "lr", "grad_norm", "tokens_per_s"} <= set(first)
    stats = [r for r in rows(a, "train_steps") if "gate" in r]
    assert stats and all(len(r[k]) == 2 for r in stats for k in ("gate", "M_norm", "M_std", "M_max", "M_mean", "S_norm"))
    assert [e["chunk_size"] for e in rows(a, "events") if e["event"] == "stage"] == [4]
    assert {"val_loss", "val_ppl", "val_loss_memory_off", "val_loss_memory_shuffled"} <= set(rows(a, "val_metrics")[0])
    assert len((a / "samples.jsonl").read_text().splitlines()) == 4  # four prompts, at the last step
    ckpts = sorted(p.name for p in (a / "checkpoints").iterdir())
    assert "checkpoint_6" in ckpts and all((a / "checkpoints" / c / "COMPLETE").is_file() for c in ckpts)
    for f in ("config.yaml", "training.log", "tokenizer.json"):
        assert (a / f).is_file()


def err_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    assert main(["train", "no_such_preset"]) == 2
    assert "unknown preset" in err_line(capsys)
    assert main(["train", "tiny", "train.max_stepz=3"]) == 2
    assert "train.max_stepz" in err_line(capsys)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", "tiny", "--run-dir", str(blocker / "run"), *SMALL]) == 2
    assert "not writable" in err_line(capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "--resume", str(empty)]) == 2
    assert "no complete checkpoint" in err_line(capsys)
    assert main(["train", "tiny", "--run-dir", str(tmp_path / "r"), "data.path=" + str(tmp_path / "nope"), *SMALL]) == 2
    assert "not a prepared dataset" in err_line(capsys) and not (tmp_path / "r").exists()


def test_resume_rejects_a_different_model(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "tiny", "--run-dir", str(run), "train.max_steps=2", "train.checkpoint_every=2", *SMALL]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "model.d_model=64"]) == 2
    assert "model.d_model" in err_line(capsys)
    assert main(["train", "tiny", "--run-dir", str(run), *SMALL]) == 2  # a new run over an old one
    assert "already holds a run" in err_line(capsys)


def test_prepare_then_train_on_own_text(tmp_path, capsys):
    src = tmp_path / "notes.txt"
    src.write_text("".join(f"line {i}: the memory writes what attention forgets.\n" for i in range(400)))
    out = tmp_path / "prepared"
    assert main(["data", "prepare", str(src), "--out", str(out), "--vocab-size", "300"]) == 0
    assert "data.path=" in capsys.readouterr().out
    run = tmp_path / "run"
    assert main(["train", "tiny", "--run-dir", str(run), f"data.path={out}", "train.max_steps=2", *SMALL]) == 0
    from atlas.data import TokenData
    where = TokenData(out).locate("train", 1000)
    assert where["source"] == str(src.resolve()) and where["line"] > 1
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9\n")
    assert main(["data", "prepare", str(bad), "--out", str(tmp_path / "o2")]) == 2
    assert "invalid UTF-8" in err_line(capsys) and not (tmp_path / "o2").exists()


def test_gate_alert_and_phases(tmp_path):
    run = tmp_path / "run"
    # gates start at 0.5: a threshold of 0.6 must raise the alert at the first stats step
    assert main(["train", "tiny", "--run-dir", str(run), "train.max_steps=2", "train.gate_alert=0.6",
                 "train.phases=[{steps: 1, mode: storage}, {steps: 1, mode: retrieval}]", *SMALL]) == 0
    alerts = [e for e in rows(run, "events") if e["event"] == "alert"]
    assert alerts and alerts[0]["kind"] == "gate_low" and alerts[0]["layers"] == [0, 1]
    assert "ALERT" in (run / "training.log").read_text()
    assert not [e for e in alerts if e["kind"] == "memory_norm_high"]  # tiny memories stay far below 1000


def test_memory_norm_alert(tmp_path):
    run = tmp_path / "run"
    # any written memory has a norm above 1e-9: the alert names every layer, with its norms
    assert main(["train", "tiny", "--run-dir", str(run), "train.max_steps=2", "train.m_norm_alert=1e-9", *SMALL]) == 0
    alerts = [e for e in rows(run, "events") if e["event"] == "alert" and e["kind"] == "memory_norm_high"]
    assert alerts and alerts[0]["layers"] == [0, 1] and all(m > 1e-9 for m in alerts[0]["M_norm"])
    assert "M_norm above 1e-09" in (run / "training.log").read_text()
    assert main(["train", "tiny", "--run-dir", str(tmp_path / "r2"), "train.m_norm_alert=0", *SMALL]) == 2


def test_memory_share_alert(tmp_path):
    run = tmp_path / "run"
    # the memory's share of a mix at gate 0.5 is near 0.5: a threshold of 0.9 names every layer
    assert main(["train", "tiny", "--run-dir", str(run), "train.max_steps=2", "train.share_alert=0.9", *SMALL]) == 0
    alerts = [e for e in rows(run, "events") if e["event"] == "alert" and e["kind"] == "memory_share_low"]
    assert alerts and alerts[0]["layers"] == [0, 1] and all(0 < x < 0.9 for x in alerts[0]["mem_share"])
    assert "share of the mix below 0.9" in (run / "training.log").read_text()
    quiet = tmp_path / "quiet"  # the default threshold stays silent on a memory in use
    assert main(["train", "tiny", "--run-dir", str(quiet), "train.max_steps=2", *SMALL]) == 0
    assert "ALERT" not in (quiet / "training.log").read_text()
    assert main(["train", "tiny", "--run-dir", str(tmp_path / "r2"), "train.share_alert=1.5", *SMALL]) == 2


def test_divergence_stops_without_a_broken_checkpoint(tmp_path, capsys):
    """A learning rate that blows the model up ends the run with an alert, not a NaN checkpoint."""
    from atlas.config import load_config
    from atlas.train.loop import TrainingDiverged, train
    cfg = load_config("tiny", SMALL + ["train.max_steps=6", "train.lr=1e30", "train.warmup_steps=0",
                                       "train.grad_clip=1e30", "train.log_every=1", "train.checkpoint_every=1"])
    with pytest.raises(TrainingDiverged):
        train(cfg, tmp_path / "run")
    events = rows(tmp_path / "run", "train_steps"), rows(tmp_path / "run", "events")
    assert any(e["kind"] == "diverged" for e in events[1] if e["event"] == "alert")
    from atlas.train.checkpoint import complete_checkpoints
    from safetensors.torch import load_file
    for _, ckpt in complete_checkpoints(tmp_path / "run"):
        assert all(t.isfinite().all() for t in load_file(str(ckpt / "model.safetensors")).values())


def test_gate_drift_is_logit_speed_against_the_lr(tmp_path):
    """gate_drift: each layer's gate-logit change between stats rows over the LR the gates had in
    between (at the first row, from the gate's init)."""
    import math
    run = tmp_path / "run"
    assert main(["train", "tiny", "--run-dir", str(run), *SMALL, "train.max_steps=6", "train.log_every=1",
                 "train.stats_every=3", "train.gate_lr_mult=2.0", "model.gate.floor=0.1"]) == 0
    steps = rows(run, "train_steps")
    stats = [r for r in steps if "gate" in r]
    assert [r["step"] for r in stats] == [3, 6]
    logit = lambda g: math.log((g - 0.1) / 0.9 / (1 - (g - 0.1) / 0.9))  # noqa: E731
    before = [0.5, 0.5]  # model.gate.init
    for r in stats:
        lr_sum = 2.0 * sum(s["lr"] for s in steps if r["step"] - 3 < s["step"] <= r["step"])
        want = [(logit(g) - logit(b)) / lr_sum for g, b in zip(r["gate"], before)]
        assert r["gate_drift"] == pytest.approx(want, rel=1e-6)
        before = r["gate"]
    assert any(abs(d) > 0 for d in stats[-1]["gate_drift"])


def test_gate_drift_after_a_resume_from_between_stats_rows(tmp_path):
    """A run killed during step 5 (checkpoint at 4, last stats row at 3), resumed: its gate_drift at
    step 6 equals the uninterrupted run's (the LR of step 4 is counted from the logs' row at 3)."""
    import shutil
    a, b = tmp_path / "A", tmp_path / "B"
    common = SMALL + ["train.log_every=1", "train.stats_every=3", "train.checkpoint_every=2", "train.seed=3"]
    assert main(["train", "tiny", "--run-dir", str(a), "train.max_steps=6", *common]) == 0
    tok = str(a / "tokenizer.json")
    assert main(["train", "tiny", "--run-dir", str(b), "train.max_steps=5", f"data.tokenizer={tok}", *common]) == 0
    shutil.rmtree(b / "checkpoints" / "checkpoint_5")  # killed during step 5: its logs and checkpoint are gone
    f = b / "metrics" / "train_steps.jsonl"
    f.write_text("".join(line + "\n" for line in f.read_text().splitlines() if json.loads(line)["step"] <= 4))
    assert main(["train", "--resume", str(b), "train.max_steps=6"]) == 0
    drift = lambda run: [r["gate_drift"] for r in rows(run, "train_steps") if r["step"] == 6][-1]  # noqa: E731
    assert drift(b) == drift(a)


def test_time_limit_stops_at_a_log_step_and_resume_continues(tmp_path):
    """train.max_minutes: the first log step past the limit is the last (validated, checkpointed,
    a time_limit event); --resume without the limit goes on exactly as an uninterrupted run."""
    a, b = tmp_path / "A", tmp_path / "B"
    common = SMALL + ["train.log_every=2", "train.checkpoint_every=100", "train.seed=3", "train.max_steps=6"]
    assert main(["train", "tiny", "--run-dir", str(a), *common]) == 0
    tok = str(a / "tokenizer.json")
    assert main(["train", "tiny", "--run-dir", str(b), "train.max_minutes=0", f"data.tokenizer={tok}", *common]) == 0
    assert [e["step"] for e in rows(b, "events") if e["event"] == "time_limit"] == [2]
    assert rows(b, "val_metrics")[-1]["step"] == 2 and (b / "checkpoints" / "checkpoint_2" / "COMPLETE").is_file()
    assert main(["train", "--resume", str(b), "train.max_minutes=null"]) == 0
    loss_a = {r["step"]: r["loss"] for r in rows(a, "train_steps")}
    loss_b = {r["step"]: r["loss"] for r in rows(b, "train_steps")}
    assert max(loss_b) == 6 and [loss_b[s] for s in (4, 6)] == [loss_a[s] for s in (4, 6)]


def test_carried_memory_reaches_the_next_batch_and_resets(tmp_path):
    """train.carry_memory (the seed's trainer): the memory one micro-batch leaves is where the next
    one starts; emptied every micro-batch (carry_memory=1) the run is the default one, bit for bit."""
    common = [*SMALL, "train.max_steps=2", "train.grad_accum=2", "train.log_every=1", "train.seed=3"]
    losses = {}
    for name, extra in (("fresh", []), ("every", ["train.carry_memory=1"]), ("carried", ["train.carry_memory=3"])):
        run = tmp_path / name
        assert main(["train", "tiny", "--run-dir", str(run), *common, *extra]) == 0
        losses[name] = [r["loss"] for r in rows(run, "train_steps")]
    assert losses["every"] == losses["fresh"]
    assert losses["carried"][0] != losses["fresh"][0]  # the step's second micro-batch read the first's memory
