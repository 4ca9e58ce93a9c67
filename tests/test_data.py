"""atlas.data: embedded corpus, tokenizer, shards with provenance, batches. CPU, ~15 s."""
import json
import os

import numpy as np
import pytest
import torch

from atlas.data import (Batches, TokenData, Tokenizer, build_embedded, embedded_split, load_embedded_corpus,
                        locate, prepare, train_bpe, val_batches)
from atlas.data.embedded import VAL_WORKS
from atlas.errors import UserError

SAMPLE = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
          "The slings and arrows of outrageous fortune,\n\n  Or to take arms against a sea of troubles\n")


@pytest.fixture(scope="module")
def tok():
    texts = [t for _, t in load_embedded_corpus()[:3]]
    return train_bpe(texts, 600)


@pytest.fixture(scope="module")
def shakespeare_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    return run, build_embedded(run, 512)


# --- embedded corpus ----------------------------------------------------------------------
def test_embedded_corpus_loads_and_splits_by_work():
    docs = load_embedded_corpus()
    names = [w for w, _ in docs]
    assert len(docs) == 42 and names == sorted(set(names)) and "hamlet" in names
    assert sum(len(t) for _, t in docs) > 5_000_000
    assert all("Project Gutenberg" not in t[:2000] for _, t in docs)  # headers stripped
    train, val = embedded_split()
    assert sorted(w for w, _ in val) == sorted(VAL_WORKS) and len(train) == 39
    assert {w for w, _ in train}.isdisjoint(w for w, _ in val)
    assert embedded_split() == (train, val)  # fixed, not random


# --- tokenizer ----------------------------------------------------------------------------
def test_bpe_round_trip_save_load(tmp_path, tok):
    weird = SAMPLE + "naïve café — 東京 🎭\r\n\ttabs  and   spaces \x01"
    for s in (SAMPLE, weird, "", " leading space"):
        assert tok.decode(tok.encode(s)) == s
    assert tok.vocab_size == 600 and tok.eos_id == 0
    assert tok.decode([tok.eos_id]) == "<|endoftext|>"
    path = tok.save(tmp_path)
    assert path.name == "tokenizer.json"
    for p in (path, tmp_path):  # file or folder
        again = Tokenizer.load(p)
        assert again.encode(weird) == tok.encode(weird) and again.vocab_size == 600
    texts = [t for _, t in load_embedded_corpus()[:3]]
    assert train_bpe(texts, 600).sha256() == tok.sha256()  # deterministic


def test_bpe_32000_on_shakespeare_and_short_corpus():
    train, val = embedded_split()
    big = train_bpe((t for _, t in train), 32000)
    assert big.vocab_size == 32000  # the 39 training works do fill 32000 (stops near 47.8K)
    ids = big.encode(val[0][1])
    assert max(ids) < 32000 and big.decode(ids) == val[0][1]
    torch.nn.Embedding(32000, 4)(torch.tensor(ids))  # a vocab-32000 model accepts every id
    small = train_bpe(["hello hello world"], 1000)  # cannot fill 1000: reports its true size
    assert 257 <= small.vocab_size < 1000
    assert max(small.encode("hello world, héllo")) < small.vocab_size
    with pytest.raises(UserError, match="vocab_size"):
        train_bpe(["x"], 100)


def test_tokenizer_load_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        Tokenizer.load(tmp_path / "nope.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match=str(bad)):
        Tokenizer.load(bad)
    with pytest.raises(UserError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path / "empty") if (tmp_path / "empty").mkdir() is None else None
    (tmp_path / "t.model").write_bytes(b"garbage")
    with pytest.raises(UserError, match="t.model"):
        Tokenizer.load(tmp_path / "t.model")  # not installed -> pip hint; installed -> invalid model


# --- prepare + provenance -----------------------------------------------------------------
def _expected_lines(tok, ids, text):
    """Line (1-based) of every token's first character, by decoding prefixes (ASCII text)."""
    lens = np.cumsum([0] + [len(tok.decode([i])) for i in ids[:-1]])
    return [text[:c].count("\n") + 1 for c in lens]


def _corpus_files(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text(SAMPLE * 3)
    jl = tmp_path / "b.jsonl"
    recs = [{"text": f"record {i}: " + "all the world's a stage " * (i % 4 + 1), "id": i} for i in range(30)]
    lines = [json.dumps(r) for r in recs]
    lines.insert(5, "")  # a blank line: records after it sit one line further down
    jl.write_text("\n".join(lines) + "\n")
    return txt, jl, recs


def test_prepare_txt_jsonl_provenance(tmp_path, tok):
    txt, jl, recs = _corpus_files(tmp_path)
    out = prepare([str(txt), str(jl)], tmp_path / "out", tok, val_fraction=0.0)
    data = TokenData(out)
    assert data.train.dtype == np.uint16 and len(data.val) == 0
    assert sorted(os.listdir(out)) == ["index.json", "tokenizer.json", "train.bin", "train_lines.npy", "val.bin"]
    t = data.index["splits"]["train"]["table"]
    assert len(t["offset"]) == 31 and data.index["total_tokens"] == len(data.train)
    # .txt: every token maps to the line its first character is on
    n0 = t["length"][0]
    ids = data.train[:n0].tolist()
    assert ids[-1] == tok.eos_id and tok.decode(ids[:-1]) == SAMPLE * 3
    want = _expected_lines(tok, ids[:-1], SAMPLE * 3)
    got = [locate(data.index, "train", k) for k in range(n0 - 1)]
    assert [g["line"] for g in got] == want and {g["source"] for g in got} == {str(txt.resolve())}
    # .jsonl: each record maps to its own line (the blank line shifts records 5.. by one)
    for d in range(1, 31):
        off, n = t["offset"][d], t["length"][d]
        i = d - 1
        loc = data.locate("train", off + n // 2)
        assert loc["source"] == str(jl.resolve()) and loc["line"] == i + 1 + (i >= 5)
        assert tok.decode(data.train[off:off + n - 1]) == recs[i]["text"]
    # a training sequence maps back to the right file and line
    b = Batches(data, batch_size=4, seq_len=16, seed=3)
    b.next()
    for p in b.provenance():
        assert p == {**p, **data.locate("train", p["start"])} and p["end"] - p["start"] == 17


def test_prepare_val_split_rules(tmp_path, tok):
    txt, jl, _ = _corpus_files(tmp_path)
    d = TokenData(prepare([jl], tmp_path / "docs", tok, val_fraction=0.2))
    assert d.index["val_rule"] == "documents"
    assert 0.1 < len(d.val) / d.index["total_tokens"] < 0.3
    assert d.val[-1] == tok.eos_id and len(d.train) + len(d.val) == d.index["total_tokens"]
    again = TokenData(prepare([jl], tmp_path / "docs2", tok, val_fraction=0.2))
    assert np.array_equal(again.val, d.val)
    one = TokenData(prepare([txt], tmp_path / "tail", tok, val_fraction=0.1))  # one document: tail split
    assert one.index["val_rule"] == "tail"
    whole = np.concatenate([one.train, one.val]).tolist()
    assert tok.decode(whole[:-1]) == SAMPLE * 3
    lines = _expected_lines(tok, whole[:-1], SAMPLE * 3)
    n = len(one.train)
    assert [one.locate("val", k)["line"] for k in range(len(one.val) - 1)] == lines[n:]


def test_prepare_parquet(tmp_path, tok):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"body": ["first doc", "", "third doc here"]}), p)
    d = TokenData(prepare([p], tmp_path / "out", tok, text_field="body", val_fraction=0))
    t = d.index["splits"]["train"]["table"]
    assert [d.locate("train", o)["row"] for o in t["offset"]] == [0, 2]  # the empty row is skipped
    with pytest.raises(UserError, match="no column 'text'"):
        prepare([p], tmp_path / "out2", tok)


def test_prepare_hf_dataset(tmp_path, tok, monkeypatch):
    """save_to_disk folders: a stub `datasets` module stands in (the real one is optional)."""
    import sys
    import types

    class Dataset:
        def __init__(self, cols):
            self.cols, self.column_names = cols, list(cols)
        def __len__(self):
            return len(next(iter(self.cols.values())))
        def __getitem__(self, key):
            return self.cols[key] if isinstance(key, str) else {k: v[key] for k, v in self.cols.items()}

    saved = {"train": Dataset({"text": ["a b c", "", "d e f"]}), "test": Dataset({"text": ["g h"]})}
    stub = types.SimpleNamespace(Dataset=Dataset, load_from_disk=lambda path: saved)
    monkeypatch.setitem(sys.modules, "datasets", stub)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    d = TokenData(prepare([tmp_path / "hf"], tmp_path / "out", tok, val_fraction=0))
    t = d.index["splits"]["train"]["table"]
    locs = [d.locate("train", o) for o in t["offset"]]
    src = str((tmp_path / "hf").resolve())
    assert [(l["source"], l["row"]) for l in locs] == [(src + "[test]", 0), (src + "[train]", 0), (src + "[train]", 2)]
    with pytest.raises(UserError, match="no column 'body'"):
        prepare([tmp_path / "hf"], tmp_path / "out2", tok, text_field="body")
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed -> pip hint
    with pytest.raises(UserError, match="pip install datasets"):
        prepare([tmp_path / "hf"], tmp_path / "out3", tok)


def _bad_inputs(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "bin.txt").write_bytes(b"hello\x00world")
    (tmp_path / "latin1.txt").write_bytes(b"line one\nline two caf\xe9\n")
    (tmp_path / "badjson.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    (tmp_path / "nofield.jsonl").write_text('{"text": "ok"}\n\n{"body": "x"}\n')
    (tmp_path / "nums.jsonl").write_text('{"text": 3}\n')
    (tmp_path / "data.csv").write_text("a,b\n")
    return [("missing.txt", "not found"), ("empty.txt", "empty"), ("bin.txt", "byte offset 5"),
            ("latin1.txt", "byte offset 21 \\(line 2\\)"), ("badjson.jsonl", "badjson.jsonl:2: invalid JSON"),
            ("nofield.jsonl", "nofield.jsonl:3: no 'text' field"), ("nums.jsonl", "nums.jsonl:1"),
            ("data.csv", "unsupported")]


def test_bad_inputs_are_one_line_user_errors(tmp_path, tok):
    good = tmp_path / "good.txt"
    good.write_text(SAMPLE)
    for name, pattern in _bad_inputs(tmp_path):
        out = tmp_path / f"out-{name}"
        with pytest.raises(UserError, match=pattern) as e:
            prepare([good, tmp_path / name], out, tok)  # the good file is tokenised first
        msg = str(e.value)
        assert str(tmp_path / name) in msg and "\n" not in msg, msg
        assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp folders left


def test_prepare_is_atomic(tmp_path, tok, monkeypatch):
    good = tmp_path / "good.txt"
    good.write_text(SAMPLE)
    out = tmp_path / "out"
    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr("atlas.data.shards._write_split", boom)
    with pytest.raises(RuntimeError):
        prepare([good], out, tok)
    assert sorted(os.listdir(tmp_path)) == ["good.txt"]
    monkeypatch.undo()
    prepare([good], out, tok)
    with pytest.raises(UserError, match="already exists"):
        prepare([good], out, tok)
    prepare([good], out, tok, overwrite=True)
    assert TokenData(out).index["total_tokens"] > 0
    (out / "index.json").unlink()
    with pytest.raises(UserError, match="index.json missing"):
        TokenData(out)


# --- batches ------------------------------------------------------------------------------
def test_batches_deterministic_and_resume():
    toks = np.arange(1000, dtype=np.uint16)  # token value == offset: easy to check windows
    a, b = Batches(toks, 4, 32, seed=7), Batches(toks, 4, 32, seed=7)
    seq_a = [a.next() for _ in range(20)]  # 31 windows: crosses epochs
    seq_b = [b.next() for _ in range(20)]
    for (xa, ya), (xb, yb) in zip(seq_a, seq_b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.dtype == torch.int64 and xa.shape == (4, 32) and torch.equal(ya, xa + 1)
    assert not torch.equal(Batches(toks, 4, 32, seed=8).next()[0], seq_a[0][0])
    state = a.state_dict()
    cont = [a.next() for _ in range(5)]
    r = Batches(toks, 4, 32, seed=0)
    r.load_state_dict(state)
    assert all(torch.equal(x, y[0]) for (x, _), y in zip([r.next() for _ in range(5)], cont))
    s = Batches(toks, 4, 32, seed=7)
    s.seek(20)
    assert torch.equal(s.next()[0], cont[0][0])  # deterministic in (seed, step)
    with pytest.raises(UserError, match="same data"):
        Batches(toks[:500], 4, 32).load_state_dict(state)
    # within one epoch every window is visited once
    c = Batches(toks, 1, 32, seed=1)
    starts = sorted(int(c.next()[0][0, 0]) for _ in range(c.n_windows))
    assert len(set(starts)) == c.n_windows and len({s % 32 for s in starts}) == 1


def test_rank_sharding_is_disjoint():
    toks = np.arange(5000, dtype=np.int64)
    W, B = 4, 3
    ranks = [Batches(toks, B, 16, seed=5, rank=r, world_size=W) for r in range(W)]
    seen = []
    for _ in range(ranks[0].steps_per_epoch):
        step = [set(r.next()[0][:, 0].tolist()) for r in ranks]
        assert sum(len(s) for s in step) == W * B and len(set().union(*step)) == W * B
        seen += [s for st in step for s in st]
    assert len(seen) == len(set(seen))  # no window twice in an epoch, across ranks
    single = Batches(toks, B * W, 16, seed=5)  # same stream as one rank with the global batch
    assert set(single.next()[0][:, 0].tolist()) == set(
        Batches(toks, B, 16, seed=5, rank=1, world_size=W).next()[0][:, 0].tolist()) | set().union(
        *[set(Batches(toks, B, 16, seed=5, rank=r, world_size=W).next()[0][:, 0].tolist()) for r in (0, 2, 3)])


def test_short_corpus_and_val_batches():
    with pytest.raises(UserError, match="has 10 tokens.*seq_len \\+ 1 = 33"):
        Batches(np.arange(10), 2, 32)
    toks = np.arange(2000)
    vb = list(val_batches(toks, 4, 64, n=3))
    assert len(vb) == 3 and all(x.shape == (4, 64) for x, _ in vb)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(vb, val_batches(toks, 4, 64, n=3)))
    per_rank = [[x[:, 0].tolist() for x, _ in val_batches(toks, 4, 64, n=10, rank=r, world_size=2)]
                for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1])
    flat = [set(sum(p, [])) for p in per_rank]
    assert flat[0].isdisjoint(flat[1]) and len(flat[0] | flat[1]) == (2000 - 1) // 64 // 2 * 2
    with pytest.raises(UserError, match="fewer than one sequence"):
        list(val_batches(np.arange(5), 1, 8, n=1))


# --- embedded dataset in a run directory --------------------------------------------------
def test_build_embedded(shakespeare_run, tmp_path):
    run, data = shakespeare_run
    assert (run / "tokenizer.json").is_file() and data.vocab_size == 512
    assert len(data.train) > 1_000_000 and 50_000 < len(data.val) < 200_000
    vals = {data.locate("val", o)["source"] for o in data.index["splits"]["val"]["table"]["offset"]}
    assert vals == {f"atlas:shakespeare/{w}" for w in VAL_WORKS}
    again = build_embedded(run, 512)  # reused, not rebuilt
    assert np.array_equal(again.val, data.val)
    with pytest.raises(UserError, match="vocab_size_requested"):
        build_embedded(run, 1024)
    # a given tokenizer is copied in instead of training one
    other = build_embedded(tmp_path / "r2", 0, tokenizer_path=run / "tokenizer.json")
    assert np.array_equal(other.train, data.train)
    b = data.batches(4, 128, seed=0)
    b.next()
    tk = data.tokenizer()
    for p in b.provenance():  # each sequence starts on the line provenance names
        text = dict(load_embedded_corpus())[p["source"].split("/")[-1]]
        prefix = tk.decode(data.train[p["start"] - p["offset_in_document"]:p["start"]].tolist())
        assert text.startswith(prefix) and p["line"] == prefix.count("\n") + 1


def test_sentencepiece_tokenizer(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(t for _, t in load_embedded_corpus()[:2]))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "m"), vocab_size=500,
                                   model_type="bpe", minloglevel=2)
    tok = Tokenizer.load(tmp_path / "m.model")
    assert tok.kind == "spm" and tok.vocab_size == 500 and tok.eos_id >= 0
    assert tok.decode(tok.encode("To be, or not to be")) == "To be, or not to be"
    src = tmp_path / "in.txt"
    src.write_text("first line here\nsecond line\n\nfourth line\n")
    d = TokenData(prepare([src], tmp_path / "out", tok, val_fraction=0))
    assert (tmp_path / "out" / "tokenizer.model").is_file() and d.tokenizer().sha256() == tok.sha256()
    lines = [d.locate("train", k)["line"] for k in range(len(d.train))]
    words = [tok.decode([int(i)]) for i in d.train]
    assert lines[words.index("first") if "first" in words else 0] == 1 and lines[-1] == 4
    assert sorted(set(lines)) == [1, 2, 4] and lines == sorted(lines)
