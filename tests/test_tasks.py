"""Retrieval tasks: MQAR's layout against Zoology's definition, passkey haystacks, accuracies, eval CLI."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from atlas.cli import main
from atlas.errors import UserError
from atlas.tasks import MQAR, Passkey, mqar_accuracy, passkey_accuracy, passkey_eval
from atlas.tasks.mqar import generate
from atlas.tasks.passkey import QUESTION, SNAP, split_text

# ----------------------------------------------------------------------------------- MQAR


def check_mqar_rows(x, y, modes, kv, V):
    """Every row is Zoology's layout: pairs, then each key queried once, labelled with its value."""
    x, y = x.numpy(), y.numpy()
    for r in range(len(x)):
        keys, vals = x[r, 0:2 * kv:2], x[r, 1:2 * kv:2]
        assert ((keys >= 1) & (keys < V // 2)).all() and len(set(keys)) == kv
        assert ((vals >= V // 2) & (vals < V)).all() and len(set(vals)) == kv
        scored = np.nonzero(y[r] != -100)[0]
        assert len(scored) == kv and (scored >= 2 * kv).all() and ((scored - 2 * kv) % 2 == 0).all()
        pair = dict(zip(keys.tolist(), vals.tolist()))
        assert sorted(x[r, scored].tolist()) == sorted(keys.tolist())  # each key queried exactly once
        assert all(y[r, t] == pair[x[r, t]] for t in scored)  # the value paired with it earlier
        want = np.zeros(x.shape[1], np.int8)
        want[:2 * kv], want[scored] = 1, 2
        assert (modes[r] == want).all()


def test_mqar_layout_matches_zoology():
    task = MQAR(seq_len=256, kv_pairs=16, num_examples=None, seed=1)
    b = task.batches(32)
    for _ in range(3):
        x, y = b.next()
        assert x.shape == y.shape == (32, 256) and x.dtype == y.dtype == torch.int64
        assert b.last_modes.dtype == np.int8 and b.last_modes.shape == (32, 256)
        check_mqar_rows(x, y, b.last_modes, 16, 8192)
    x, y = next(task.val_batches(16, 1))
    check_mqar_rows(x, y, np.where(np.arange(256) < 32, 1, 0) + 2 * (y.numpy() != -100), 16, 8192)


def test_mqar_gaps_follow_zoologys_power_law():
    """Our Gumbel top-k draws against Zoology's np.random.choice(replace=False, p=...) per row."""
    T, kv, n = 128, 8, 3000
    _, qpos, _ = generate(np.random.default_rng(0), n, T, kv, 8192)
    ours = (qpos - 2 * kv) // 2  # (n, κ) gaps, in key order
    space = (T - 2 * kv) // 2
    p = 0.01 * np.arange(1, space + 1) ** (0.01 - 1)
    rs = np.random.RandomState(0)
    ref = np.stack([rs.choice(space, kv, replace=False, p=p / p.sum()) for _ in range(n)])
    for a, b in ((0, 1), (1, 4), (4, 16), (16, space)):  # the share of gaps in [a, b)
        fo, fr = ((ours >= a) & (ours < b)).mean(), ((ref >= a) & (ref < b)).mean()
        assert abs(fo - fr) < 0.02, (a, b, fo, fr)
    assert abs(ours[:, 0].mean() - ref[:, 0].mean()) < 2.0  # the first key gets the first (shortest) draw
    assert ours[:, 0].mean() < ours[:, -1].mean()


def test_mqar_determinism_resume_and_ranks():
    a, b = MQAR(64, 4, seed=5).batches(8, seed=2), MQAR(64, 4, seed=5).batches(8, seed=2)
    assert all(torch.equal(a.next()[0], b.next()[0]) for _ in range(3))
    assert not torch.equal(MQAR(64, 4, seed=6).batches(8, seed=2).next()[0], MQAR(64, 4, seed=5).batches(8, seed=2).next()[0])

    task = MQAR(64, 4, num_examples=20, seed=0)  # 20 examples, batches of 8: epochs straddle batches
    full = task.batches(8, seed=3)
    for _ in range(4):
        full.next()
    saved = full.state_dict()
    after = [full.next() for _ in range(3)]
    resumed = MQAR(64, 4, num_examples=20, seed=0).batches(8, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(saved)))  # survives a JSON round trip (trainer.json)
    for (x0, y0), (x1, y1) in zip(after, [resumed.next() for _ in range(3)]):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    with pytest.raises(UserError, match="same task"):
        MQAR(64, 8, num_examples=20).batches(8).load_state_dict(saved)

    # two ranks of 5 = one rank of 10; an epoch visits every example once
    r0, r1 = (task.batches(5, seed=1, rank=r, world_size=2) for r in (0, 1))
    one = task.batches(10, seed=1)
    seen = []
    for _ in range(2):
        x0, x1, xo = r0.next()[0], r1.next()[0], one.next()[0]
        assert torch.equal(torch.cat([x0, x1]), xo)
        assert not set(r0.last_ids) & set(r1.last_ids)
        seen += list(r0.last_ids) + list(r1.last_ids)
    assert sorted(seen) == list(range(20))
    s0, s1 = MQAR(64, 4).batches(4, rank=0, world_size=2), MQAR(64, 4).batches(4, rank=1, world_size=2)
    rows0 = {tuple(r) for r in s0.next()[0].tolist()}
    assert not rows0 & {tuple(r) for r in s1.next()[0].tolist()}


def test_mqar_rejects_impossible_settings():
    for args in ((255, 4), (64, 17), (64, 0)):
        with pytest.raises(UserError, match="MQAR"):
            MQAR(*args)
    with pytest.raises(UserError, match="vocab_size"):
        MQAR(256, 16, vocab_size=256)


class MQAROracle(nn.Module):
    """Answers each token with the value its key was paired with at the start (from inputs only)."""

    def __init__(self, kv, V):
        super().__init__()
        self.kv, self.V = kv, V

    def forward(self, idx, state=None):
        keys, vals = idx[:, 0:2 * self.kv:2], idx[:, 1:2 * self.kv:2]  # (B, κ) each
        hit = idx[:, :, None] == keys[:, None, :]  # (B, T, κ)
        pred = torch.gather(vals, 1, hit.float().argmax(-1))  # (B, T)
        return nn.functional.one_hot(pred, self.V).float(), None


def test_mqar_accuracy_oracle_and_random():
    task = MQAR(64, 4, seed=3)
    assert mqar_accuracy(MQAROracle(4, 8192), task, n_examples=100, batch_size=32) == 1.0
    torch.manual_seed(0)
    rand = lambda idx, state=None: (torch.randn(*idx.shape, 8192), None)  # noqa: E731
    assert mqar_accuracy(rand, task, n_examples=100, batch_size=32) < 0.01
    with pytest.raises(UserError, match="output ids"):
        mqar_accuracy(lambda idx, state=None: (torch.zeros(*idx.shape, 512), None), task, n_examples=4)


# ----------------------------------------------------------------------------------- passkey

@pytest.fixture(scope="module")
def tok():
    from atlas.data import embedded_split, train_bpe
    train, _ = embedded_split()
    return train_bpe([t[:20000] for _, t in train], 400)  # ~0.2 s; Shakespeare-like number handling


def test_passkey_batches_structure(tok):
    task = Passkey(tok, 256, digits=5, seed=0)
    b = task.batches(4, seed=1)
    x, y = b.next()
    m = b.last_modes
    assert x.shape == y.shape == m.shape == (4, 256)
    for r in range(4):
        scored = np.nonzero(y[r].numpy() != -100)[0]
        a = len(scored)
        assert list(scored) == list(range(256 - a, 256)) and (m[r, 256 - a:] == 2).all()
        answer = y[r, scored].tolist()
        assert answer == x[r, 257 - a:].tolist() + [y[r, -1].item()]  # y is x shifted by one
        key = tok.decode(answer).strip()
        assert key.isdigit() and len(key) == 5 and tok.encode(f" {key}") == answer
        needle = x[r, m[r] == 1].tolist()
        assert tok.decode(needle) == f"The pass key is {key}. Remember it. {key} is the pass key.\n"
        assert tok.encode(tok.decode(needle)) == needle  # pieces encode as the whole sentence does
        starts = [i for i in range(len(needle) - a + 1) if needle[i:i + a] == answer]
        assert len(starts) == 2  # both mentions carry exactly the answer's tokens
        q = tok.encode(QUESTION)
        assert x[r, 257 - a - len(q):257 - a].tolist() == q  # the question right before the answer
        assert set(np.unique(m[r])) == {0, 1, 2}
    # resume and ranks use the same stream as MQAR's
    saved = b.state_dict()
    nxt = b.next()[0]
    again = Passkey(tok, 256, seed=0).batches(4, seed=1)
    again.load_state_dict(saved)
    assert torch.equal(again.next()[0], nxt)
    r0, r1 = (Passkey(tok, 256).batches(2, rank=r, world_size=2) for r in (0, 1))
    assert not torch.equal(r0.next()[0], r1.next()[0])
    v1, v2 = list(task.val_batches(2, 2)), list(task.val_batches(2, 2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(v1, v2))


def test_passkey_depth_length_and_source(tok):
    task = Passkey(tok, 1024, split="val")
    val_text = split_text("val")
    for i, depth in enumerate((0.0, 0.1, 0.5, 0.9, 1.0)):
        ex = task.sample(np.random.default_rng(i), 1024, depth=depth, with_answer=False)
        assert len(ex.ids) == 1024 and ex.haystack_len == 1024 - ex.needle_len - len(tok.encode(QUESTION))
        assert abs(ex.needle_start - depth * ex.haystack_len) <= SNAP
        assert tok.decode(ex.ids[ex.needle_start:ex.needle_start + ex.needle_len]).startswith("The pass key is")
        before = tok.decode(ex.ids[max(0, ex.needle_start - 20):ex.needle_start])
        assert before in val_text and (ex.needle_start == 0 or before.endswith("\n"))  # a line of its own
    with pytest.raises(UserError, match="no haystack"):
        Passkey(tok, 40)


class PasskeyOracle(nn.Module):
    """Reads the digits after the first "The pass key is" and emits them one step at a time,
    through the carried state (as a model with memory would)."""

    def __init__(self, tok):
        super().__init__()
        self.tok, self.prefix, self.stop = tok, tok.encode("The pass key is"), tok.encode(". Remember")[0]

    def forward(self, idx, state=None):
        V = self.tok.vocab_size
        if state is None:
            rows = []
            for row in idx.tolist():
                i = next(i for i in range(len(row)) if row[i:i + len(self.prefix)] == self.prefix) + len(self.prefix)
                rows.append(row[i:row.index(self.stop, i)])
            state = (rows, 0)
        rows, k = state
        nxt = torch.tensor([r[min(k, len(r) - 1)] for r in rows])  # (B,)
        logits = torch.zeros(idx.shape[0], idx.shape[1], V)
        logits[:, -1] = nn.functional.one_hot(nxt, V).float()
        return logits, (rows, k + 1)


def test_passkey_accuracy_oracle_and_wrong_model(tok):
    r = passkey_eval(PasskeyOracle(tok), tok, length=512, n=10, digits=5)
    assert r["accuracy"] == 1.0 and set(r["per_depth"]) == {"0.1", "0.3", "0.5", "0.7", "0.9"}
    seven = tok.encode("7")[0]
    always7 = lambda idx, state=None: (nn.functional.one_hot(torch.full(idx.shape, seven), tok.vocab_size).float(), None)  # noqa: E731
    assert passkey_accuracy(always7, tok, length=512, n=10) == 0.0


# ----------------------------------------------------------------------------------- CLI

SMALL = ["model.vocab_size=512", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64",
         "model.attn_window=16", "model.memory.heads=2", "model.memory.d_key=16", "model.memory.d_value=16",
         "train.seq_len=32", "train.batch_size=2", "train.warmup_steps=2", "train.val_batches=1",
         "train.stages=[{steps: 4, chunk_size: 8}, {steps: 4, chunk_size: 4}]", "train.sample_tokens=4"]


def test_eval_cli_on_a_tiny_run(tmp_path, capsys):
    src = tmp_path / "text.txt"
    src.write_text(split_text("train")[:60000])
    data = tmp_path / "data"
    assert main(["data", "prepare", str(src), "--out", str(data), "--vocab-size", "300"]) == 0
    run = tmp_path / "run"
    assert main(["train", "tiny", "--run-dir", str(run), f"data.path={data}", "train.max_steps=5", *SMALL]) == 0
    capsys.readouterr()

    assert main(["eval", "mqar", str(run), "--seq-len", "32", "--kv-pairs", "4", "--n", "8"]) == 0
    out = capsys.readouterr()
    res = json.loads(out.out.strip())
    assert res["task"] == "mqar" and res["step"] == 5 and 0.0 <= res["accuracy"] <= 1.0
    assert res["vocab_size"] == 512 and "mqar accuracy" in out.err

    ckpt = run / "checkpoints" / "checkpoint_5"
    assert main(["eval", "passkey", str(ckpt), "--length", "128", "--n", "2"]) == 0
    res = json.loads(capsys.readouterr().out.strip())
    assert res["task"] == "passkey" and res["length"] == 128 and res["train_len"] == 32 and res["n"] == 2

    # the run's own validation, again from its last checkpoint: the same numbers, ablations included
    assert main(["eval", "memory", str(run)]) == 0
    res = json.loads(capsys.readouterr().out.strip())
    last = json.loads((run / "metrics" / "val_metrics.jsonl").read_text().splitlines()[-1])
    assert res["step"] == last["step"] == 5
    assert all(res[k] == last[k] for k in ("val_loss", "val_loss_memory_off", "val_loss_memory_shuffled"))

    from atlas.tasks.cli import load_for_eval
    model, *_ = load_for_eval(str(run), "cpu")
    assert {m.chunk_size for m in model.memory_layers()} == {4}  # the second stage's chunk (steps 4..)

    for argv in (["eval", "mqar", str(tmp_path / "nope")], ["eval", "passkey", str(data)],
                 ["eval", "memory", str(run), "--batches", "0"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "atlas eval" in err

    greedy = ["sample", str(run), "--prompt", "ROMEO:", "--tokens", "6", "--temperature", "0"]
    assert main(greedy) == 0
    first = capsys.readouterr()
    assert first.out.startswith("ROMEO:") and "ms a token" in first.err
    assert main(greedy) == 0 and capsys.readouterr().out == first.out  # greedy: the same text again
    assert main(greedy + ["--compile"]) == 0 and capsys.readouterr().out == first.out  # a GPU's option; eager here
    for argv in (greedy[:2] + ["--tokens", "0"], ["sample", str(tmp_path / "nope")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "atlas sample" in err
