"""Config: presets load, unknown keys and impossible values are rejected in one clear line."""
import pytest

from atlas.cli import main
from atlas.config import load_config, preset_names, total_steps
from atlas.errors import UserError


def test_presets_load():
    assert {"tiny", "62m", "atlas_300m_omega", "atlas_1b"} <= set(preset_names())
    for name in preset_names():
        load_config(name)


def test_seed_table_verbatim():
    c = load_config("atlas_300m_omega")
    m, mem, t = c.model, c.model.memory, c.train
    assert (m.d_model, m.n_layers, m.n_heads, m.d_ff, m.vocab_size, m.max_seq_len) == (1024, 16, 8, 4096, 32000, 4096)
    assert (mem.d_key, mem.d_value, mem.poly_degree, mem.context_window, mem.heads) == (1024, 1024, 2, 16, 1)
    assert (m.gate.kind, m.gate.init, t.lr, t.batch_size, t.grad_accum) == ("scalar", 0.5, 1.5e-4, 2, 64)
    assert [(s.steps, s.chunk_size) for s in t.stages] == [(100000, 2048), (10000, 256)]
    assert total_steps(c) == 110000
    b = load_config("atlas_1b").model
    assert (b.d_model, b.n_layers) == (1536, 24)


@pytest.mark.parametrize("override, needle", [
    ("model.foo=1", "unknown config key 'model.foo'"),
    ("train.stages=[{steps: 5, chunk: 3}]", "unknown config key 'train.stages[0].chunk'"),
    ("model.memory.heads=3", "not divisible by model.memory.heads 3"),
    ("model.memory.context_window=0", "context_window is 0"),
    ("model.gate.floor=1.0", "gate.floor is 1.0"),
    ("model.memory.rule=adam", "choose one of 'gd', 'momentum', 'muon'"),
    ("model.n_layers=two", "must be an integer"),
    ("train.seq_len=4096", "exceeds model.max_seq_len"),
    ("train.max_minutes=-1", "train.max_minutes must be >= 0 or null"),
    ("nokey", "must look like key.path=value"),
    ("train.phases=[{steps: 5, mode: episodic}]", "needs a task that marks facts"),
    ("train.phases=[{steps: 5, mode: forget}]", "choose one of 'normal', 'storage', 'retrieval', 'episodic'"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(UserError, match=None) as e:
        load_config("tiny", [override])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_unknown_key_in_file_names_file(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("model:\n  d_modle: 64\n")
    with pytest.raises(UserError) as e:
        load_config(str(p))
    assert "mine.yaml" in str(e.value) and "model.d_modle" in str(e.value)


def test_cli_errors_exit_2(capsys):
    assert main(["info", "no_such_preset"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown preset 'no_such_preset'" in err


def test_cli_info_prints_breakdown(capsys):
    assert main(["info", "atlas_300m_omega"]) == 0
    out = capsys.readouterr().out
    for word in ("embeddings", "attention", "memory", "gates", "mlp", "total"):
        assert word in out
