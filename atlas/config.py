"""Typed configuration: dataclasses with Literal choices, YAML presets, dotted CLI overrides.

`load_config("tiny", ["train.max_steps=30"])` reads atlas/presets/tiny.yaml (or a YAML path),
applies the overrides, checks every key and type, and returns a `Config`. Every mistake is a
`UserError` naming the key and the file.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml

from .errors import UserError

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass
class MemoryConfig:
    enabled: bool = True  # False: the attention-only baseline of the same shape
    heads: int = 1  # memory heads; d_key and d_value are split across them
    d_key: int = 256
    d_value: int = 256
    poly_degree: int = 2  # phi(x) = sum_{i<=p} a_i x^i, a_i learnable (init 1/i!); 0 = identity
    context_window: int = 1  # Omega rule window c (1 = Titans)
    chunk_size: int = 64  # gradients inside a chunk are taken at its first memory (TNT knob)
    conv_size: int = 4  # short causal depthwise conv on q, k, v; 0 = none
    structure: Literal["linear"] = "linear"
    bias: Literal["l2", "huber"] = "l2"  # attentional bias (Miras axis 2)
    huber_delta: float = 1.0
    retention: Literal["decay"] = "decay"
    # the seed's global clamp of ||M|| (it used 50.0); off by default. The Triton scan runs one call
    # a chunk with it (3-18x its unclamped time at the seed recipe's shape: benchmarks/README.md)
    max_norm: Optional[float] = None
    rule: Literal["gd", "momentum", "muon"] = "momentum"  # learning rule (Miras axis 4)
    max_lr: float = 0.1  # theta = max_lr * sigmoid(.)
    alpha_init: float = 0.02  # forget gate at init
    eta_init: float = 0.9  # momentum gate at init
    # learning rate at init (absolute, < max_lr). A chunk sums every token's gradient at its start
    # memory, so with correlated keys its step is ~chunk x window x momentum gain larger than one
    # token's: at 0.005 the tiny quickstart's M grew to 1e3-1e16 in some layers (alerts), at 0.001
    # it stays ~1 and val loss is lower (4.903 vs 5.139, seed 1: 4.903 vs 5.034; README)
    theta_init: float = 0.001
    gamma_init: float = 0.95  # Omega weight of each token at init
    dropout: float = 0.0  # dropout on the memory branch's output while training
    # the seed's memory wrote under torch.no_grad(): its keys, values and gates got no gradient from
    # the loss, only the read (q) did. True reproduces that (experiments/memory_use); False (the
    # default) is the Titans outer loop, which learns what to write
    detach_writes: bool = False
    # the seed's read: every token read the memory after the call's last write, future tokens of the
    # call included (non-causal inside a call: its reads saw what came later). True reproduces that
    # (experiments/memory_use); False (the default) reads causally, each chunk before its own write
    read_after_write: bool = False
    # what the memory reads and writes. "atlas": conv, SiLU and unit-norm q and k, phi elementwise
    # (sum_i a_i x^i), the read RMS-normalised per head. "seed" (its code, to study its failure):
    # raw linear q, k, v; phi = [a_0, a_1 x, ..., a_p x^p] concatenated, a constant block included
    # (Dk (p+1) features); the read not normalised, so its size follows ||M|| and the projections
    features: Literal["atlas", "seed"] = "atlas"
    impl: Literal["reference", "chunked", "triton"] = "chunked"


@dataclass
class GateConfig:
    """The attention/memory mix of DESIGN.md §2: g = floor + (1 - floor) sigmoid(w)."""
    # one scalar per layer, or per channel from the input, or per channel from both branches' outputs
    # (the seed's code: sigmoid(W [mem, attn] + b))
    kind: Literal["scalar", "channel", "branches"] = "scalar"
    init: float = 0.5
    floor: float = 0.0
    branch_norm: Literal["rms", "none"] = "rms"  # normalise both branches before mixing
    aux_weight: float = 0.0  # memory-utilisation loss: aux_weight * sum_layers relu(aux_target - gate)^2
    aux_target: float = 0.3
    storage_gate: float = 0.9  # GateMode.STORAGE: g >= storage_gate while facts are written
    retrieval_floor: float = 0.3  # GateMode.RETRIEVAL: g >= retrieval_floor while they are queried


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 1024
    max_seq_len: int = 1024
    attn_window: Optional[int] = None  # sliding-window attention; None = full causal
    attn_window_min: Optional[int] = None  # randomized window: training draws it in [min, attn_window]
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    gate: GateConfig = field(default_factory=GateConfig)


@dataclass
class Stage:
    """One TNT stage: `steps` optimizer steps at memory chunk `chunk_size`, LR scaled by `lr_scale`."""
    steps: int = 1000
    chunk_size: int = 64
    lr_scale: float = 1.0


@dataclass
class Phase:
    """An episodic-training phase: `steps` optimizer steps with the gates in `mode`.
    storage / retrieval apply to every token; episodic takes each token's mode from the task data
    (facts -> STORAGE, queries -> RETRIEVAL); normal leaves the gates alone."""
    steps: int = 100
    mode: Literal["normal", "storage", "retrieval", "episodic"] = "normal"


@dataclass
class TrainConfig:
    max_steps: Optional[int] = None  # None: the sum of the stages' steps
    # stop after this much wall time (checked at log steps): that step is validated and
    # checkpointed as the last, and `--resume` continues the same schedule (a job's time limit)
    max_minutes: Optional[float] = None
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    gate_lr_mult: float = 1.0  # LR multiplier for the mixing-gate parameters
    # carry each layer's memory (detached) from one micro-batch to the next, emptied every this many
    # micro-batches: what the seed's trainer did (memory_reset_every 5000), so a sequence reads what
    # earlier, unrelated sequences wrote (a resumed run starts it empty). 0 (the default): every
    # sequence starts from an empty memory
    carry_memory: int = 0
    stages: list = field(default_factory=lambda: [Stage()])
    phases: list = field(default_factory=list)  # episodic gate phases from step 0; then normal
    gate_alert: float = 0.1  # an alert event when a layer's mean gate falls below this
    # ... and when a layer's memory share of the mix (mem_share) does (null: off). With unnormalised
    # branches the gate can stay above gate_alert while the memory's output has shrunk behind it:
    # the small-scale seed's gate ended at 0.12, its share at 0.02 (experiments/memory_use)
    share_alert: Optional[float] = 0.05
    # ... and when a layer's mean ||M||_F exceeds this (null: off). A memory mapping unit keys to
    # O(1) values stays near sqrt(Dk) * ||v|| (~100 at 128 dims); overshooting ones reached 1e7-1e9
    m_norm_alert: Optional[float] = 1000.0
    log_every: int = 10
    stats_every: int = 50  # per-layer gate and memory statistics
    val_every: int = 100
    val_batches: int = 8
    sample_every: int = 500
    sample_tokens: int = 48
    checkpoint_every: int = 200
    keep_last: int = 2  # plus geometric snapshots (steps 2^k * checkpoint_every)
    seed: int = 0
    compile: bool = False
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    device: str = "auto"


@dataclass
class DataConfig:
    path: Optional[str] = None  # a directory made by `atlas data prepare`; None = embedded Shakespeare
    tokenizer: Optional[str] = None  # tokenizer.json or sentencepiece .model; None = train a BPE
    task: Literal["text", "mqar", "passkey"] = "text"  # text: LM on data.path or Shakespeare
    mqar_kv_pairs: int = 16
    mqar_examples: Optional[int] = None  # a fixed training set of this many examples (Zoology: 40000)
    passkey_digits: int = 5


@dataclass
class Config:
    name: str = "atlas"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["train"]["betas"] = list(d["train"]["betas"])
        return d


# ---------------------------------------------------------------- building from plain data

def _build(cls, data, where: str, src: str):
    """Dataclass `cls` from dict `data`, rejecting unknown keys and wrong types by dotted name."""
    if not isinstance(data, dict):
        raise UserError(f"{src}: '{where or 'top level'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise UserError(f"{src}: unknown config key '{path}' (known here: {', '.join(sorted(names))})")
        kwargs[key] = _convert(hints[key], value, path, src)
    return cls(**kwargs)


def _convert(tp, value, path: str, src: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, src)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        return _convert(next(a for a in args if a is not type(None)), value, path, src)
    if origin is Literal:
        if value not in args:
            raise UserError(f"{src}: '{path}' is {value!r}; choose one of {', '.join(map(repr, args))}")
        return value
    if tp is list:  # train.stages and train.phases
        item = {"stages": Stage, "phases": Phase}[path.rsplit(".", 1)[-1]]
        if not isinstance(value, list) or (item is Stage and not value):
            raise UserError(f"{src}: '{path}' must be a {'non-empty ' if item is Stage else ''}list")
        return [_build(item, s, f"{path}[{i}]", src) for i, s in enumerate(value)]
    if tp is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise UserError(f"{src}: '{path}' must be a pair like [0.9, 0.95]")
        return tuple(float(v) for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{src}: '{path}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{src}: '{path}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 2e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{src}: '{path}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{src}: '{path}' must be a string, got {value!r}")
        return value
    raise TypeError(f"config field {path}: unsupported type {tp}")


def validate(cfg: Config, src: str) -> Config:
    """Reject impossible values in one line each."""
    m, mem, g, t = cfg.model, cfg.model.memory, cfg.model.gate, cfg.train
    checks = [
        (m.vocab_size >= 2, "model.vocab_size must be >= 2"),
        (m.d_model % m.n_heads == 0, f"model.d_model {m.d_model} is not divisible by model.n_heads {m.n_heads}"),
        ((m.d_model // m.n_heads) % 2 == 0, "model.d_model / model.n_heads must be even (RoPE rotates pairs)"),
        (m.attn_window is None or m.attn_window >= 1, "model.attn_window must be >= 1 or null (full attention)"),
        (m.attn_window_min is None or (m.attn_window is not None and 1 <= m.attn_window_min <= m.attn_window),
         "model.attn_window_min needs model.attn_window and must lie in [1, attn_window]"),
        (0 <= mem.dropout < 1, "model.memory.dropout must lie in [0, 1)"),
        (g.aux_weight >= 0 and 0 < g.aux_target < 1, "model.gate.aux_weight must be >= 0, aux_target in (0, 1)"),
        (0 < g.storage_gate < 1 and 0 <= g.retrieval_floor < 1, "model.gate.storage_gate and retrieval_floor must lie in [0, 1)"),
        (all(p.steps >= 1 for p in t.phases), "every train.phases entry needs steps >= 1"),
        (cfg.data.task != "text" or all(p.mode != "episodic" for p in t.phases),
         "train.phases mode 'episodic' needs a task that marks facts and queries (data.task=mqar or passkey)"),
        (min(m.n_layers, m.d_ff, m.max_seq_len) >= 1, "model.n_layers, d_ff and max_seq_len must be >= 1"),
        (mem.heads >= 1, "model.memory.heads must be >= 1"),
        (mem.d_key % mem.heads == 0, f"model.memory.d_key {mem.d_key} is not divisible by model.memory.heads {mem.heads}"),
        (mem.d_value % mem.heads == 0, f"model.memory.d_value {mem.d_value} is not divisible by model.memory.heads {mem.heads}"),
        (mem.context_window >= 1, f"model.memory.context_window is {mem.context_window}; it must be >= 1"),
        (mem.chunk_size >= 1, "model.memory.chunk_size must be >= 1"),
        (mem.poly_degree >= 0, "model.memory.poly_degree must be >= 0"),
        (mem.conv_size >= 0, "model.memory.conv_size must be >= 0"),
        (mem.features == "atlas" or mem.conv_size == 0,
         "model.memory.features=seed reads raw projections (no conv): set model.memory.conv_size=0"),
        (mem.max_norm is None or mem.max_norm > 0, "model.memory.max_norm must be > 0 or null"),
        (mem.huber_delta > 0, "model.memory.huber_delta must be > 0"),
        (mem.max_lr > 0 and 0 < mem.theta_init < mem.max_lr, "model.memory.theta_init must lie in (0, max_lr)"),
        (all(0 < x < 1 for x in (mem.alpha_init, mem.eta_init, mem.gamma_init)),
         "model.memory.alpha_init, eta_init and gamma_init must lie in (0, 1)"),
        (0 <= g.floor < 1, f"model.gate.floor is {g.floor}; it must lie in [0, 1)"),
        (g.floor < g.init < 1, f"model.gate.init is {g.init}; it must lie in (gate.floor={g.floor}, 1)"),
        (t.seq_len >= 1 and t.batch_size >= 1 and t.grad_accum >= 1, "train.seq_len, batch_size and grad_accum must be >= 1"),
        (t.seq_len <= m.max_seq_len, f"train.seq_len {t.seq_len} exceeds model.max_seq_len {m.max_seq_len}"),
        (t.lr > 0 and t.warmup_steps >= 0, "train.lr must be > 0 and train.warmup_steps >= 0"),
        (t.max_steps is None or t.max_steps >= 1, "train.max_steps must be >= 1"),
        (t.max_minutes is None or t.max_minutes >= 0, "train.max_minutes must be >= 0 or null"),
        (t.carry_memory >= 0, "train.carry_memory must be >= 0 (0: no memory carried between batches)"),
        (min(t.log_every, t.stats_every, t.val_every, t.sample_every, t.checkpoint_every) >= 1,
         "train.log_every, stats_every, val_every, sample_every and checkpoint_every must be >= 1"),
        (t.keep_last >= 1, "train.keep_last must be >= 1"),
        (t.m_norm_alert is None or t.m_norm_alert > 0, "train.m_norm_alert must be > 0 or null"),
        (t.share_alert is None or 0 < t.share_alert < 1, "train.share_alert must lie in (0, 1) or be null"),
        (all(s.steps >= 1 and s.chunk_size >= 1 and s.lr_scale > 0 for s in t.stages),
         "every train.stages entry needs steps >= 1, chunk_size >= 1, lr_scale > 0"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UserError(f"{src}: {msg}")
    return cfg


def set_dotted(tree: dict, dotted: str, src: str) -> None:
    if "=" not in dotted:
        raise UserError(f"override '{dotted}' must look like key.path=value (e.g. train.max_steps=30)")
    key, raw = dotted.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else None
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise UserError(f"override '{dotted}': '{p}' is not a section")
    node[parts[-1]] = value


def resolve_path(name_or_path: str) -> Path:
    """A preset name (atlas/presets/NAME.yaml) or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise UserError(f"config file '{p}' does not exist")
        return p
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        raise UserError(f"unknown preset '{name_or_path}'; choose one of {', '.join(preset_names())} or give a YAML path")
    return preset


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections (model, train, data)")
    return data


def config_from_dict(tree: dict, src: str) -> Config:
    return validate(_build(Config, tree, "", src), src)


def load_config(name_or_path: str = "tiny", overrides: list[str] = ()) -> Config:
    path = resolve_path(name_or_path)
    tree = read_yaml(path)
    for o in overrides:
        set_dotted(tree, o, str(path))
    src = str(path) + (" (with overrides)" if overrides else "")
    return config_from_dict(tree, src)


def total_steps(cfg: Config) -> int:
    return cfg.train.max_steps or sum(s.steps for s in cfg.train.stages)


def _segment_at(segments, step: int) -> int | None:
    """Index of the segment holding optimizer step `step` (0-based) when segments (each with
    .steps) run back to back from step 0; None past their end."""
    end = 0
    for i, seg in enumerate(segments):
        end += seg.steps
        if step < end:
            return i
    return None


def phase_at(cfg: Config, step: int) -> str:
    """The gate mode of optimizer step `step` (0-based): the phases run from step 0, then normal."""
    i = _segment_at(cfg.train.phases, step)
    return "normal" if i is None else cfg.train.phases[i].mode


def stage_at(cfg: Config, step: int) -> tuple[int, Stage]:
    """The stage that optimizer step `step` (0-based) belongs to; the last stage runs on past its end."""
    stages = cfg.train.stages
    i = _segment_at(stages, step)
    i = len(stages) - 1 if i is None else i
    return i, stages[i]
