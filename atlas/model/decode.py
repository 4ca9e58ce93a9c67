"""Decoding one token a step from a CUDA graph.

Eager decoding is host-bound: every PyTorch op of a step is a Python call and a kernel launch
(~40 ms a token for the 300M model on an H100, benchmarks/README.md). `StaticDecoder`
runs the model's own one-token forward on a state whose tensors sit in fixed buffers, writes the
step's new state back into them, and on a GPU captures all of that once in a CUDA graph: a step
is then one replay. The function is the model's, unchanged; only where the state lives differs:

  * attention: the cache has a fixed length -- the sliding window's window - 1 keys, or with full
    attention the prefill's keys plus the steps the decoder is made for -- padded at the front
    with rows masked out until the steps fill them (KVCache.valid); the position is a 0-dim
    tensor on the device (rope reads it there);
  * memory: every token of a chunk runs the same step (step.py) against the chunk-start memory
    and the running M; only which buffers those are changes where a chunk opens, which the host
    knows by counting tokens. There the decoder copies the memory into them (outside the graph)
    as MemoryLayer._step does when a token opens a chunk.

The open chunk's inputs that a later several-token call would re-run (MemoryLayerState.pending)
are not kept: the decoder's state is its own, for generating. graphs=False runs the same steps
eagerly: the twin the tests hold the graph to, and the tests' way to check the bookkeeping on CPU.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from ..memory.layer import MemoryLayerState
from ..memory.state import MemoryState, newton_schulz5
from ..memory.step import Running
from .attention import KVCache
from .block import BlockState


def unsupported(model, steps: int | None = None) -> str | None:
    """Why `model` cannot be stepped by a StaticDecoder made for `steps` steps (None: it can)."""
    for block in model.blocks:
        if block.attn.window is None and steps is None:
            return ("attention has no sliding window (model.attn_window), so its cache grows with every token: "
                    "give the most tokens the decoder will step (steps=)")
        if block.has_memory and block.ablation is not None:
            return "the memory ablation is on"
        if block.has_memory and block.memory.chunk_size < 2:
            return "memory chunks of one token close at every step"
    return None


def _fixed_cache(kv: KVCache, rows: int) -> KVCache:
    """kv's keys and values at the end of `rows` rows, the padding before them masked out."""
    B, H, n, _ = kv.k.shape

    def padded(x):  # (B, H, n, D) -> (B, H, rows, D)
        return torch.cat([x.new_zeros(B, H, rows - n, x.shape[-1]), x], dim=2)
    valid = torch.arange(rows, device=kv.k.device) >= rows - n  # (rows,)
    return KVCache(padded(kv.k), padded(kv.v), torch.as_tensor(kv.pos, device=kv.k.device).clone(), valid)


def _cast_linears(model, dtype) -> dict[str, torch.Tensor]:
    """`dtype` copies of the nn.Linear weights and biases that autocast casts at every call: a
    graph cannot keep autocast's cache of them, and the casts were a third of the compiled step's
    kernel time (benchmarks/results/profile_decode_h100.json). A parameter that another kind of
    module shares (a head tied to the embedding) stays as it is, and so is cast as before."""
    shared = {id(p) for m in model.modules() if not isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}
    return {f"{name}.{pn}": p.detach().to(dtype) for name, m in model.named_modules() if isinstance(m, nn.Linear)
            for pn, p in m.named_parameters(recurse=False) if id(p) not in shared and p.dtype != dtype}


def _clone_memory(m: MemoryState) -> MemoryState:
    return MemoryState(*(t.clone() for t in (m.M, m.S, m.k, m.v, m.gamma)))


def _copy_memory(dst: MemoryState, src: MemoryState) -> None:
    for d, s in zip((dst.M, dst.S, dst.k, dst.v, dst.gamma), (src.M, src.S, src.k, src.v, src.gamma)):
        d.copy_(s)


class StaticDecoder:
    """`model` stepped one token at a time from `state` (a prefill's), the state in buffers that
    each step overwrites; graphs=True (CUDA) replays each step from one CUDA graph. compile=True
    runs the step through torch.compile first, fusing its small ops (on an H100 the 300M model's
    step took 2.2 ms a token against 4.9, after a compile of 12-37 s, benchmarks/README.md)."""

    @torch.no_grad()
    def __init__(self, model, state: list[BlockState], graphs: bool, compile: bool = False,
                 steps: int | None = None):
        """steps: the most tokens it will step (needed with full attention, whose cache keeps every
        token; with a sliding window the cache keeps window - 1 and any number of steps can follow)."""
        why = unsupported(model, steps)
        if why:
            raise ValueError(f"StaticDecoder: {why}; decode eagerly (model(token, state)) instead")
        device = state[0].attn.k.device
        if graphs and device.type != "cuda":
            raise ValueError(f"StaticDecoder: CUDA graphs need a CUDA device, and the state is on {device}; "
                             "pass graphs=False")
        self.graph = None
        # under autocast, the model with its linear layers' weights cast once (their copies cost
        # 2 bytes a parameter): the same numbers autocast computes, without a cast a step
        amp = torch.is_autocast_enabled(device.type)
        weights = _cast_linears(model, torch.get_autocast_dtype(device.type)) if amp else {}

        def forward(tok, state):
            return torch.func.functional_call(model, weights, (tok, state)) if weights else model(tok, state)
        self.forward = torch.compile(forward, dynamic=False) if compile else forward
        self.tok = torch.zeros(state[0].attn.k.shape[0], 1, dtype=torch.long, device=device)  # (B, 1)
        self.blocks, self.state, self.steps_left = model.blocks, [], steps
        self.n_open, self.chunk = 0, None  # tokens in the open chunk, and the chunk size (None: no memory)
        for block, s in zip(model.blocks, state):
            w = block.attn.window
            kv = _fixed_cache(s.attn, w - 1 if w is not None else s.attn.k.shape[2] + steps)
            mem = None
            if s.memory is not None:
                m = s.memory
                opened = m.pending is not None
                # buffers for the chunk start and the running M; a chunk that opens copies into them
                start = _clone_memory(m.chunk_start if opened else m.memory)
                run = Running(*(t.clone() for t in ((m.running.M, m.running.S_seen) if opened else (m.memory.M, m.memory.S))))
                # pending=[] and open_len=0: MemoryLayer._step's mid-chunk branch, whatever the count
                mem = MemoryLayerState(_clone_memory(m.memory), None if m.conv is None else m.conv.clone(),
                                       start, [], run, 0)
                self.n_open, self.chunk = (m.open_len if opened else 0), block.memory.chunk_size
            self.state.append(BlockState(kv, mem))
        if graphs:
            self._capture()

    def _run(self) -> None:
        """The model's one-token forward on the buffers, its new state written back into them."""
        self.logits, new = self.forward(self.tok, self.state)  # (B, 1, V)
        for s, n in zip(self.state, new):
            s.attn.k.copy_(n.attn.k)
            s.attn.v.copy_(n.attn.v)
            s.attn.pos.copy_(n.attn.pos)
            s.attn.valid.copy_(n.attn.valid)
            if s.memory is not None:
                _copy_memory(s.memory.memory, n.memory.memory)
                if s.memory.conv is not None:
                    s.memory.conv.copy_(n.memory.conv)
                s.memory.running.M.copy_(n.memory.running.M)
                s.memory.running.S_seen.copy_(n.memory.running.S_seen)

    def _capture(self) -> None:
        # under autocast, capture without its cache of cast weights (torch.cuda.graph's rule)
        ctx = (torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
               if torch.is_autocast_enabled("cuda") else contextlib.nullcontext())
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), ctx:  # warm-up (Triton's autotuning, cuBLAS's workspaces): reads the state only
            for _ in range(2):
                self.forward(self.tok, self.state)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), ctx:
            self._run()

    def _open_chunk(self) -> None:
        """The next token opens a chunk: its start is the memory now, and the running M and momentum
        start from it (NS5 of the momentum under Muon), as MemoryLayer._step opens one."""
        for block, s in zip(self.blocks, self.state):
            if s.memory is not None:
                mem = s.memory.memory
                _copy_memory(s.memory.chunk_start, mem)
                s.memory.running.M.copy_(mem.M)
                s.memory.running.S_seen.copy_(newton_schulz5(mem.S) if block.memory.cfg.rule == "muon" else mem.S)

    @torch.no_grad()
    def step(self, tok: torch.Tensor) -> torch.Tensor:
        """tok (B, 1) ids -> logits (B, 1, V) of the next token. The logits live in a buffer the
        next step overwrites: read or copy them first."""
        if self.steps_left is not None:
            if self.steps_left == 0:
                raise ValueError("StaticDecoder: made for fewer steps than asked of it; make it with a larger steps=")
            self.steps_left -= 1
        if self.chunk is not None and self.n_open == 0:
            self._open_chunk()
        self.tok.copy_(tok)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._run()
        if self.chunk is not None:
            self.n_open = (self.n_open + 1) % self.chunk  # the chunk closes: the next token opens one
        return self.logits
