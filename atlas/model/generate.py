"""Text generation that carries the model state: the prompt is read once, then one token a step."""
from __future__ import annotations

import time

import torch

from .decode import StaticDecoder, unsupported

MIN_GRAPH_TOKENS = 16  # fewer tokens to generate than this: a capture would cost more than it saves


def _clock(device) -> float:
    """Seconds, once the device has finished what it was given (the phases of `times`)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def generate(model, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.8,
             top_k: int | None = 50, generator: torch.Generator | None = None,
             graphs: bool | None = None, compile: bool = False, times: dict | None = None) -> list[int]:
    """Sample continuation ids. The memory and attention caches carry across steps, so a new
    token's cost does not grow with the context (with sliding-window attention): the memory takes
    one O(1) step of the function the model was trained as (atlas/memory/step.py).
    graphs: replay each step from a CUDA graph (decode.StaticDecoder: the same function, one
    launch a token); None: on a GPU. compile: the graph's step through torch.compile (half a
    minute once, then about half the time a token). times: filled with the seconds spent on the
    prompt ("prompt_s"), on making the decoder ("setup_s": its capture and compile) and on the
    steps ("steps_s"), and how the steps ran ("steps": "graphs" or "eager")."""
    device = next(model.parameters()).device
    times = {} if times is None else times
    t0 = _clock(device)
    graphs = device.type == "cuda" if graphs is None else graphs
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
    logits, state = model(idx)
    t1 = _clock(device)
    decoder = None
    if graphs and max_new_tokens >= MIN_GRAPH_TOKENS and unsupported(model, max_new_tokens) is None:
        decoder = StaticDecoder(model, state, graphs=True, compile=compile, steps=max_new_tokens)
    t2 = _clock(device)
    out = []
    for _ in range(max_new_tokens):
        last = logits[:, -1].float()  # (1, V)
        if temperature <= 0:
            nxt = last.argmax(-1, keepdim=True)
        else:
            last = last / temperature
            if top_k is not None:
                kth = torch.topk(last, min(top_k, last.shape[-1])).values[:, -1:]
                last = last.masked_fill(last < kth, float("-inf"))
            probs = torch.softmax(last, -1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(device)  # (1, 1)
        out.append(int(nxt))
        if decoder is not None:
            logits = decoder.step(nxt)
        else:
            logits, state = model(nxt, state)
    times.update(prompt_s=t1 - t0, setup_s=t2 - t1, steps_s=_clock(device) - t2,
                 steps="graphs" if decoder is not None else "eager")
    return out
