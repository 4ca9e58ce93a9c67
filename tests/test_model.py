"""The Atlas model: causality, state carry through every layer, decoding, stats, params."""
import pytest
import torch

from atlas.config import load_config
from atlas.errors import UserError
from atlas.memory.state import apply_poly
from atlas.memory.stats import STAT_NAMES, memory_stats
from atlas.model import AtlasLM
from atlas.model.decode import StaticDecoder, _cast_linears
from atlas.model.generate import generate
from atlas.model.params import count_by_component

SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=48", "model.vocab_size=97",
         "model.memory.d_key=24", "model.memory.d_value=16", "model.memory.heads=2", "model.memory.chunk_size=4",
         "model.memory.context_window=3"]


def make(*overrides, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return AtlasLM(load_config("tiny", SMALL + list(overrides)).model).to(dtype)


VARIANTS = [
    [],
    ["model.attn_window=5"],
    ["model.attn_window=null", "model.gate.kind=channel", "model.memory.rule=muon"],
    ["model.memory.rule=gd", "model.memory.bias=huber", "model.memory.poly_degree=0", "model.memory.conv_size=0",
     "model.gate.kind=branches"],
    ["model.memory.max_norm=0.02", "model.tie_embeddings=false", "model.gate.floor=0.2"],  # 0.02: the clamp acts
    ["model.memory.features=seed", "model.memory.conv_size=0", "model.gate.branch_norm=none"],
    ["model.memory.enabled=false"],
]


@pytest.mark.parametrize("overrides", VARIANTS)
def test_causal(overrides):
    """Perturbing tokens from position 13 on leaves logits at 0..12 unchanged."""
    m = make(*overrides)
    idx = torch.randint(0, 97, (2, 29))
    other = idx.clone()
    other[:, 13:] = torch.randint(0, 97, (2, 16))
    a, _ = m(idx)
    b, _ = m(other)
    assert torch.equal(a[:, :13], b[:, :13])
    assert not torch.allclose(a[:, 13:], b[:, 13:])


@pytest.mark.parametrize("overrides", VARIANTS)
def test_state_carry_and_decoding(overrides):
    """Pieces cut anywhere (mid-chunk too) with the state carried equal one call, and so does
    token-by-token decoding after a prompt: the open chunk's gradients are taken at its start
    state, so decoding computes the function training did (chunk 4 here), not per-token chunks."""
    m = make(*overrides)
    idx = torch.randint(0, 97, (2, 23))
    full, _ = m(idx)
    for cuts in ([(0, 8), (8, 12), (12, 23)], [(0, 5), (5, 6), (6, 13), (13, 23)]):
        state, pieces = None, []
        for a, b in cuts:
            out, state = m(idx[:, a:b], state)
            pieces.append(out)
        torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-10, atol=1e-10)

    # prompts ending mid-chunk, on a chunk boundary, and one token long; then one O(1) step a token
    for prompt in (10, 8, 1):
        out, state = m(idx[:, :prompt])
        steps = [out]
        for t in range(prompt, idx.shape[1]):
            out, state = m(idx[:, t:t + 1], state)
            steps.append(out)
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-10, atol=1e-10)
    # a several-token call after steps re-runs the open chunk from what the steps carried
    out, state = m(idx[:, 21:23], m(idx[:, 18:21], m(idx[:, 17:18], m(idx[:, :17])[1])[1])[1])
    torch.testing.assert_close(out, full[:, 21:23], rtol=1e-10, atol=1e-10)


def test_decoding_step_leaves_its_input_state_alone():
    """A state can be stepped from twice (beam search, the decode bench): the step appends to a new
    list of open-chunk pieces, and both calls give the same token."""
    m = make("model.memory.rule=muon", "model.memory.max_norm=0.02")
    idx = torch.randint(0, 97, (2, 11))
    _, state = m(idx[:, :10])  # chunk 4: two tokens open
    a, s1 = m(idx[:, 10:11], state)
    b, s2 = m(idx[:, 10:11], state)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    mem = state[0].memory
    assert mem.open_len == 2 and len(mem.pending) == 1 and s1[0].memory.open_len == 3


def test_backward_and_bf16_forward():
    m = make(dtype=torch.float32)
    idx = torch.randint(0, 97, (2, 19))
    logits, _ = m(idx)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten()).backward()
    grads = {n: p.grad for n, p in m.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), [n for n, g in grads.items() if g is None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lb, _ = m(idx)
    assert torch.isfinite(lb).all()


def test_stats_names_and_values():
    m = make("model.gate.init=0.3")
    seen = {}  # the branches as mixed: block i's normed memory and attention outputs
    for i, b in enumerate(m.blocks):
        for name in ("norm_mem", "norm_attn"):
            getattr(b, name).register_forward_hook(lambda mod, args, out, key=(i, name): seen.__setitem__(key, out))
    _, state = m(torch.randint(0, 97, (2, 17)))
    stats = memory_stats(m, state)
    assert tuple(stats) == STAT_NAMES
    assert all(len(v) == 2 for v in stats.values())
    assert stats["gate"] == pytest.approx([0.3, 0.3])
    M = state[0].memory.memory.M
    assert stats["M_norm"][0] == pytest.approx(M.norm(dim=(-2, -1)).mean().item(), rel=1e-5)
    assert 1.0 <= stats["M_eff_rank"][0] <= M.shape[-1]
    for i in range(2):
        mem, attn = 0.3 * seen[i, "norm_mem"].norm(), 0.7 * seen[i, "norm_attn"].norm()
        assert stats["mem_share"][i] == pytest.approx((mem / (mem + attn)).item(), rel=1e-6)
    # unnormalised, the memory's output projection moves its share behind an unmoved gate
    m = make("model.gate.init=0.3", "model.gate.branch_norm=none")
    idx = torch.randint(0, 97, (2, 17))
    before = memory_stats(m, m(idx)[1])
    with torch.no_grad():
        m.blocks[0].memory.w_out.weight.mul_(100)
    after = memory_stats(m, m(idx)[1])
    assert before["gate"] == after["gate"] == pytest.approx([0.3, 0.3])
    assert before["mem_share"][0] < 0.5 and 0.9 < after["mem_share"][0] < 1


def test_effective_rank_of_known_matrices():
    from atlas.memory.stats import effective_rank
    assert effective_rank(torch.eye(6)).item() == pytest.approx(6.0, rel=1e-5)
    assert effective_rank(torch.outer(torch.randn(5), torch.randn(7))).item() == pytest.approx(1.0, abs=1e-3)


def test_param_counts_add_up_and_tying():
    m = make()
    counts = count_by_component(m)
    assert counts["total"] == sum(p.numel() for p in m.parameters())
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    untied = count_by_component(make("model.tie_embeddings=false"))
    assert untied["embeddings"] == 2 * counts["embeddings"]


def test_gate_modes_force_and_floor():
    """STORAGE raises g to storage_gate, RETRIEVAL to the floor; both leave the learned gate recorded."""
    m = make("model.gate.storage_gate=0.9", "model.gate.retrieval_floor=0.3")
    idx = torch.randint(0, 97, (2, 11))
    from atlas.model import GateMode
    storage = torch.full((2, 11), int(GateMode.STORAGE))
    forced, _ = m(idx, gate_modes=storage)
    assert m.blocks[0].last_gate.item() == pytest.approx(0.5)
    retrieval, _ = m(idx, gate_modes=torch.full((2, 11), int(GateMode.RETRIEVAL)))
    plain, _ = m(idx)
    torch.testing.assert_close(retrieval, plain)  # 0.5 is above the 0.3 floor
    with torch.no_grad():
        for b in m.blocks:
            b.gate.w.fill_(torch.logit(torch.tensor(0.9, dtype=torch.float64)))
    torch.testing.assert_close(forced, m(idx)[0])


def test_detached_writes_compute_the_same_and_train_only_the_read():
    """model.memory.detach_writes (the seed's memory): the same outputs, but the loss reaches only
    the query's projection and the memory's output side, not keys, values or the memory's gates."""
    idx = torch.randint(0, 97, (2, 11))
    outs = {}
    for detach in (False, True):
        m = make(f"model.memory.detach_writes={detach}")
        logits, _ = m(idx)
        logits.square().mean().backward()
        layer = m.blocks[0].memory
        q_rows = layer.H * layer.Dk  # w_qkv's rows: q, then k, then v
        outs[detach] = logits.detach()
        if detach:
            assert layer.w_gates.weight.grad is None or not layer.w_gates.weight.grad.any()
            assert not layer.w_qkv.weight.grad[q_rows:].any() and layer.w_qkv.weight.grad[:q_rows].any()
        else:
            assert layer.w_gates.weight.grad.any() and layer.w_qkv.weight.grad[q_rows:].any()
    assert torch.equal(outs[False], outs[True])


def test_read_after_write_reads_the_calls_last_memory(monkeypatch):
    """model.memory.read_after_write (the seed's read): every token reads the memory after the call's
    last write, so the first token's output moves with the last token (causal attention cannot do
    that); by default it does not."""
    idx = torch.randint(0, 97, (2, 11))
    later = idx.clone()
    later[:, -1] = (later[:, -1] + 1) % 97
    for on in (False, True):
        m = make(f"model.memory.read_after_write={on}")
        with torch.no_grad():
            first, changed = m(idx)[0][:, 0], m(later)[0][:, 0]
        assert torch.equal(first, changed) != on
    # the read itself: phi(q) M^T, with M the state the call hands on
    import atlas.memory.layer as layer_module
    seen = []
    monkeypatch.setattr(layer_module, "apply_poly", lambda q, poly: seen.append(q) or apply_poly(q, poly))
    layer = m.blocks[0].memory
    x = torch.randn(2, 11, layer.w_qkv.in_features, dtype=torch.float64)
    y, state = layer(x)
    read = torch.einsum("bthk,bhvk->bthv", apply_poly(seen[-1], layer.poly), state.memory.M)
    torch.testing.assert_close(y, layer.w_out(layer.out_norm(read).reshape(2, 11, -1)))


def test_seed_features_are_powers_side_by_side_and_the_read_unnormalised():
    """model.memory.features=seed: raw projections, phi = [a_0, a_1 x, a_2 x^2] concatenated (the
    memory is Dv x 3 Dk per head), and the read goes to w_out without a norm."""
    from atlas.memory.scan import memory_scan
    m = make("model.memory.features=seed", "model.memory.conv_size=0", "model.memory.detach_writes=true")
    layer, c = m.blocks[1].memory, m.cfg.memory
    with torch.no_grad():
        layer.seed_phi.copy_(torch.tensor([0.7, -1.3, 0.4]))  # not the init, so each power is checked
    B, T, H, Dk, Dv = 2, 11, layer.H, layer.Dk, layer.Dv
    x = torch.randn(B, T, layer.w_qkv.in_features, dtype=torch.float64)
    y, state = layer(x)
    q, k, v = layer.w_qkv(x).split([H * Dk, H * Dk, H * Dv], dim=-1)
    phi = lambda t: torch.cat([0.7 * torch.ones_like(t), -1.3 * t, 0.4 * t * t], -1)  # (B, T, H, 3 Dk)
    alpha, eta, theta, gamma = torch.sigmoid(layer.w_gates(x)).view(B, T, H, 4).unbind(-1)
    ref, ref_state = memory_scan(phi(q.view(B, T, H, Dk)), phi(k.view(B, T, H, Dk)), v.view(B, T, H, Dv), alpha, eta,
                                 theta * c.max_lr, gamma, chunk_size=c.chunk_size, window=c.context_window,
                                 impl="reference")
    assert state.memory.M.shape == (B, H, Dv, 3 * Dk)
    torch.testing.assert_close(state.memory.M, ref_state.M)
    torch.testing.assert_close(y, layer.w_out(ref.reshape(B, T, H * Dv)))
    y.sum().backward()  # only the read learns: q's rows and phi's coefficients, not k's or v's
    assert layer.seed_phi.grad.abs().min() > 0 and layer.w_qkv.weight.grad[:H * Dk].any()
    assert not layer.w_qkv.weight.grad[H * Dk:].any()
    with pytest.raises(UserError, match="features=seed reads raw projections"):
        load_config("tiny", SMALL + ["model.memory.features=seed"])


def test_memory_ablations_and_aux_loss():
    m = make("model.gate.aux_weight=1.0", "model.gate.aux_target=0.6")
    idx = torch.randint(0, 97, (2, 11))
    on, _ = m(idx)
    aux = m.gate_aux_loss()
    assert aux.item() == pytest.approx(2 * 0.1 ** 2)  # two layers at 0.5 against a 0.6 target
    aux.backward()
    assert m.blocks[0].gate.w.grad.item() < 0  # the loss pushes the gate up
    with m.memory_ablated():
        off, _ = m(idx)
    assert not torch.allclose(on, off)
    with m.memory_ablated("shuffled"):
        shuffled, _ = m(idx)
    assert not torch.allclose(on, shuffled) and not torch.allclose(off, shuffled)
    same = idx[:1].expand(2, -1)  # two copies of one sequence: the other's memory is its own
    ref, _ = m(same)
    with m.memory_ablated("shuffled"):
        torch.testing.assert_close(m(same)[0], ref)
    torch.testing.assert_close(m(idx)[0], on)  # restored after the block


def test_randomized_window_trains_and_evaluates_fixed():
    m = make("model.attn_window=8", "model.attn_window_min=2")
    idx = torch.randint(0, 97, (1, 23))
    m.eval()
    a, _ = m(idx)
    torch.testing.assert_close(a, m(idx)[0])
    m.train()
    torch.manual_seed(1)
    outs = {tuple(m(idx)[0][0, -1, :3].tolist()) for _ in range(6)}
    assert len(outs) > 1  # different windows were drawn


def test_compile_blocks_keeps_numbers_and_keys():
    """Per-block torch.compile (as `train.compile` applies it): same logits, same state_dict keys."""
    m = make(dtype=torch.float32)
    idx = torch.randint(0, 97, (2, 16))
    keys = list(m.state_dict())
    ref, _ = m(idx)
    m.compile_blocks(backend="aot_eager")
    out, _ = m(idx)
    assert list(m.state_dict()) == keys
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", [["model.attn_window=5"] + v for v in VARIANTS])  # the third: full attention
def test_static_decoder_steps_as_the_model_does(overrides):
    """StaticDecoder (its eager twin here; the CUDA graph in test_static_decoder_graph_on_gpu) gives
    the logits of model(token, state) step after step, across chunk boundaries (chunk 4), from
    prompts ending mid-chunk, on a boundary, and shorter than the attention window (its cache
    padded), and stops at the steps it was made for."""
    m = make(*overrides)
    idx = torch.randint(0, 97, (2, 23))
    for prompt in (9, 8, 2):
        _, state = m(idx[:, :prompt])
        dec = StaticDecoder(m, state, graphs=False, steps=idx.shape[1] - prompt)
        for t in range(prompt, idx.shape[1]):
            want, state = m(idx[:, t:t + 1], state)
            torch.testing.assert_close(dec.step(idx[:, t:t + 1]), want, rtol=1e-12, atol=1e-12)
        with pytest.raises(ValueError, match="made for fewer steps"):
            dec.step(idx[:, :1])


def test_static_decoder_refuses_what_it_cannot_hold():
    m = make("model.attn_window=null")
    with pytest.raises(ValueError, match="no sliding window.*steps="):
        StaticDecoder(m, m(torch.randint(0, 97, (1, 6)))[1], graphs=False)
    if not torch.cuda.is_available():
        m = make("model.attn_window=5")
        with pytest.raises(ValueError, match="need a CUDA device"):
            StaticDecoder(m, m(torch.randint(0, 97, (1, 6)))[1], graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_static_decoder_graph_on_gpu(impl):
    """The captured step replays the eager step's logits, under bf16 autocast as the bench runs it."""
    m = make("model.attn_window=5", f"model.memory.impl={impl}", "model.memory.rule=muon",
             "model.memory.max_norm=0.02", dtype=torch.float32).cuda()
    idx = torch.randint(0, 97, (2, 30), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        _, state = m(idx[:, :3])  # shorter than the window: the cache starts padded
        dec = StaticDecoder(m, state, graphs=True)
        for t in range(3, idx.shape[1]):
            want, state = m(idx[:, t:t + 1], state)
            torch.testing.assert_close(dec.step(idx[:, t:t + 1]), want, rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("window", ["5", "null"])
def test_generate_with_graphs_samples_what_eager_does(window):
    m = make(f"model.attn_window={window}", "model.memory.impl=triton", dtype=torch.float32).cuda()
    prompt = torch.randint(0, 97, (3,)).tolist()
    eager = generate(m, prompt, 40, temperature=0, graphs=False)
    assert generate(m, prompt, 40, temperature=0, graphs=True) == eager


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_static_decoder_compiled_under_the_graph():
    """compile=True: the step through torch.compile, then captured; float32, so fusion only reorders sums."""
    m = make("model.attn_window=5", "model.memory.impl=triton", "model.memory.rule=muon", dtype=torch.float32).cuda()
    idx = torch.randint(0, 97, (2, 20), device="cuda")
    with torch.no_grad():
        _, state = m(idx[:, :9])
        dec = StaticDecoder(m, state, graphs=True, compile=True)
        for t in range(9, idx.shape[1]):
            want, state = m(idx[:, t:t + 1], state)
            torch.testing.assert_close(dec.step(idx[:, t:t + 1]), want, rtol=1e-4, atol=1e-4)


def test_static_decoder_under_autocast_casts_the_linears_once():
    """Under autocast the decoder steps with bf16 copies of the linear weights made once (a graph
    cannot keep autocast's cache): the same logits as the eager step, bit for bit; the head tied to
    the embedding is left to autocast."""
    m = make("model.attn_window=5", dtype=torch.float32)
    casts = _cast_linears(m, torch.bfloat16)
    assert "blocks.0.attn.w_qkv.weight" in casts and "blocks.0.memory.w_gates.bias" in casts
    assert "head.weight" not in casts and all(t.dtype == torch.bfloat16 for t in casts.values())
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, state = m(idx[:, :7])
        dec = StaticDecoder(m, state, graphs=False)
        for t in range(7, idx.shape[1]):
            want, state = m(idx[:, t:t + 1], state)
            torch.testing.assert_close(dec.step(idx[:, t:t + 1]), want, rtol=0, atol=0)


def test_generate_reports_where_its_time_went():
    m = make("model.attn_window=5", dtype=torch.float32)
    times = {}
    out = generate(m, [1, 2, 3], 20, temperature=0, times=times)
    assert len(out) == 20 and times["steps"] == "eager"  # a CPU: no graphs
    assert all(times[k] >= 0 for k in ("prompt_s", "setup_s", "steps_s"))
