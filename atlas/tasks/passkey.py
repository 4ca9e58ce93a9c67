"""Passkey (single-needle) retrieval in natural-text haystacks from the embedded Shakespeare.

One sequence, in token space:

    haystack[:d]  "The pass key is 48213. Remember it. 48213 is the pass key.\\n"  haystack[d:]
    "\\nWhat is the pass key? The pass key is"  " 48213"

The haystack is contiguous text from a random line of the split's works (training works for
training examples, the held-out validation works for evaluation); d is the requested depth in
[0, 1] of the haystack, moved to the nearest line start within SNAP tokens so the needle reads
as a line of its own. The number is always encoded on its own as " 48213" (with its space), in
both needle mentions and in the answer: GPT-2-style byte-level BPE cuts " 48213" into one
pre-token wherever it stands, so the answer ids equal the needle's digit ids. (The BPE trained
on Shakespeare has almost no digit merges: " 48213" is " ", "4", "8", "2", "1", "3" at 4096
entries; at 8192 " 1" and " 4" are single tokens, so the answer is 5 or 6 tokens long.)
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from atlas.data import embedded_split
from atlas.errors import UserError
from atlas.tasks.mqar import RETRIEVAL, STORAGE, eval_mode, model_device
from atlas.data.loader import mix
from atlas.tasks.stream import IGNORE, TaskBatches, torch_pair

QUESTION = "\nWhat is the pass key? The pass key is"
SNAP = 16  # tokens the needle may move to start on a new line
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


@functools.lru_cache(maxsize=2)
def split_text(split: str) -> str:
    """The split's works joined into one haystack source ("train": 39 works, "val": 3)."""
    train, val = embedded_split()
    return "\n\n".join(text for _, text in (train if split == "train" else val))


@dataclass
class PasskeyExample:
    ids: list  # the sequence: haystack with the needle, the question, and the answer if asked for
    needle_start: int  # index of the needle's first token in ids
    needle_len: int
    haystack_len: int  # filler tokens around the needle
    answer_ids: list  # the number's tokens (" 48213")
    key: str  # "48213"


class Passkey:
    """Passkey(tokenizer, seq_len, digits=5, seed=0, split="train").

    batches(): training sequences of seq_len + 1 tokens ending in the answer, cut into
    x = seq[:-1], y = seq[1:] with -100 everywhere but the answer; val_batches(): the same
    from the validation works and a held-out stream.
    """

    def __init__(self, tokenizer, seq_len: int, digits: int = 5, seed: int = 0, split: str = "train"):
        if split not in ("train", "val"):
            raise UserError(f"Passkey split={split!r}; use 'train' (training works) or 'val' (held-out works)")
        if not 1 <= digits <= 18:
            raise UserError(f"Passkey digits={digits}; use 1..18")
        self.tok, self.T, self.digits, self.seed, self.split = tokenizer, seq_len, digits, seed, split
        self.question = tokenizer.encode(QUESTION)
        # the needle's fixed text, encoded once (each training example would re-encode it)
        self._lead, self._mid, self._tail = (tokenizer.encode(t) for t in ("The pass key is", ". Remember it.",
                                                                            " is the pass key.\n"))
        longest = self._needle("9" * digits)
        fixed = len(longest[0]) + len(self.question) + len(longest[1])
        if seq_len < fixed + 16:
            raise UserError(f"passkey length {seq_len} leaves no haystack: needle, question and answer take "
                            f"{fixed} tokens with this tokenizer; use a length >= {fixed + 16}")

    @functools.cached_property
    def _ends_line(self) -> np.ndarray:
        """bool (vocab,): the token's text ends with a newline (the next token starts a line)."""
        return np.array([self.tok.decode([i]).endswith("\n") for i in range(self.tok.vocab_size)])

    @property
    def meta(self) -> dict:
        return {"task": "passkey", "seq_len": self.T, "digits": self.digits, "task_seed": self.seed,
                "split": self.split, "tokenizer_sha256": self.tok.sha256()}

    def _needle(self, key: str) -> tuple[list, list]:
        """(needle ids, answer ids): the number is encoded alone, with its leading space, every time."""
        num = self.tok.encode(f" {key}")
        needle = self._lead + num + self._mid + num + self._tail
        return needle, num

    def _haystack(self, rng: np.random.Generator, n: int, text: str) -> list:
        """n tokens of contiguous text from a random line start (wrapping around the split)."""
        nl = text.find("\n", int(rng.integers(len(text))))
        off = nl + 1 if nl >= 0 else 0
        est = 4 * n + 64  # characters: Shakespeare BPE averages ~3.5 a token; retried larger if short
        while True:
            chunk = text[off:off + est]
            while len(chunk) < est:  # past the end of the split: continue from its start
                chunk += "\n\n" + text[:est - len(chunk)]
            ids = self.tok.encode(chunk)
            if len(ids) > n:  # strictly more: the cut at the chunk's end never reaches the kept tokens
                return ids[:n]
            est *= 2

    def _snap(self, hay: list, depth: float) -> int:
        """Insertion index for `depth`: the nearest line start within SNAP tokens, else exact."""
        n = len(hay)
        d = int(round(depth * n))
        ends = self._ends_line
        best = d
        for i in sorted(range(max(0, d - SNAP), min(n, d + SNAP) + 1), key=lambda i: (abs(i - d), i)):
            if i == 0 or i == n or ends[hay[i - 1]]:
                best = i
                break
        return best

    def sample(self, rng: np.random.Generator, total: int, depth: float | None = None,
               with_answer: bool = True, split: str | None = None) -> PasskeyExample:
        """One example of exactly `total` tokens (with_answer: the answer is the last tokens)."""
        key = str(int(rng.integers(10 ** (self.digits - 1), 10 ** self.digits)))
        depth = float(rng.random()) if depth is None else depth
        if not 0.0 <= depth <= 1.0:
            raise UserError(f"passkey depth {depth} is outside [0, 1]")
        needle, answer = self._needle(key)
        n_hay = total - len(needle) - len(self.question) - (len(answer) if with_answer else 0)
        if n_hay < 1:
            raise UserError(f"passkey length {total} leaves no haystack around a {len(needle)}-token needle; "
                            f"use a longer length")
        hay = self._haystack(rng, n_hay, split_text(split or self.split))
        d = self._snap(hay, depth)
        ids = hay[:d] + needle + hay[d:] + self.question + (answer if with_answer else [])
        return PasskeyExample(ids, d, len(needle), n_hay, answer, key)

    def _make(self, stream, split: str):
        def make(ids: np.ndarray):
            B, T = len(ids), self.T
            x = np.empty((B, T), np.int64)  # (B, T)
            y = np.full((B, T), IGNORE, np.int64)  # (B, T)
            modes = np.zeros((B, T), np.int8)  # (B, T)
            for r, i in enumerate(ids.tolist()):
                rng = np.random.default_rng(mix("atlas-passkey", self.seed, stream, T, self.digits, i))
                ex = self.sample(rng, T + 1, split=split)
                seq = np.asarray(ex.ids, np.int64)  # (T + 1,)
                x[r], a = seq[:-1], len(ex.answer_ids)
                y[r, T - a:] = seq[T + 1 - a:]  # the positions that predict the answer tokens
                modes[r, ex.needle_start:ex.needle_start + ex.needle_len] = STORAGE
                modes[r, T - a:] = RETRIEVAL
            return x, y, modes
        return make

    def batches(self, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> TaskBatches:
        """Fresh training examples forever: next() -> (x, y) int64 (B, T); .last_modes int8 (B, T)."""
        return TaskBatches(self._make(("train", seed), self.split), batch_size, seed, rank, world_size, None,
                           self.meta)

    def val_batches(self, batch_size: int, n: int):
        """n batches (x, y) from the validation works and a held-out stream: always the same."""
        make = self._make("val", "val")
        for i in range(n):
            x, y, _ = make(np.arange(i * batch_size, (i + 1) * batch_size, dtype=np.int64))
            yield torch_pair(x, y)


@torch.no_grad()
def _greedy(model, prompts: torch.Tensor, steps: int) -> torch.Tensor:
    """prompts (B, L) -> (B, steps) greedy continuations; the model's state (memory and attention
    cache) carries from the prompt through every step, as in atlas.model.generate.generate."""
    logits, state = model(prompts)  # (B, L, V)
    out = []
    for _ in range(steps):
        nxt = logits[:, -1].float().argmax(-1, keepdim=True)  # (B, 1)
        out.append(nxt)
        logits, state = model(nxt, state)
    return torch.cat(out, dim=1)


def passkey_eval(model, tokenizer, length: int, n: int = 50, depths=DEPTHS, digits: int = 5, seed: int = 1234,
                 device=None, batch_size: int = 8, autocast: bool | None = None) -> dict:
    """n prompts of exactly `length` tokens from the validation works, depth i % len(depths) for
    prompt i, answered greedily. Returns {"accuracy" (whole keys), "digit_accuracy" (digits in
    place), "per_depth": {depth: accuracy}, "teacher_forced_accuracy", "n", "length"}.

    teacher_forced_accuracy: keys whose every token is the argmax with the true answer fed in, one
    call over prompt + answer. Greedy decoding yields exactly those keys when the carried state
    computes the function a single call does, so a gap between the two means decoding is not the
    trained function (or rounding flipped an argmax). autocast: bf16 as training runs it (default:
    on CUDA), so evaluation sees the numerics the model was trained with."""
    if n < 1 or batch_size < 1 or not depths:
        raise UserError(f"passkey_eval: n={n} batch_size={batch_size} depths={depths}; need n, batch_size >= 1 "
                        f"and at least one depth")
    device = torch.device(device or model_device(model))
    amp = torch.autocast(device.type, dtype=torch.bfloat16,
                         enabled=device.type == "cuda" if autocast is None else autocast)
    task = Passkey(tokenizer, max(length, 1), digits=digits, seed=seed, split="val")
    exs = [task.sample(np.random.default_rng(mix("atlas-passkey-eval", seed, length, digits, i)), length,
                       depth=depths[i % len(depths)], with_answer=False) for i in range(n)]
    hits, digit_hits, forced = [], [], []  # whole keys; digits in place; keys by teacher forcing
    with eval_mode(model), amp, torch.no_grad():
        for s in range(0, n, batch_size):
            part = exs[s:s + batch_size]
            a = max(len(e.answer_ids) for e in part)
            prompts = torch.tensor([e.ids for e in part], dtype=torch.long, device=device)  # (b, length)
            gen = _greedy(model, prompts, a).tolist()
            for g, e in zip(gen, part):
                said = tokenizer.decode(g[:len(e.answer_ids)]).strip()
                hits.append(said == e.key)
                digit_hits.append(sum(x == y for x, y in zip(said, e.key)) / len(e.key))
            answers = torch.tensor([e.answer_ids + e.answer_ids[-1:] * (a - len(e.answer_ids)) for e in part],
                                   dtype=torch.long, device=device)  # (b, a), short answers padded
            logits, _ = model(torch.cat([prompts, answers], dim=1))  # (b, length + a, V)
            pred = logits[:, length - 1:length - 1 + a].argmax(-1).tolist()  # (b, a): the answer positions
            forced += [p[:len(e.answer_ids)] == e.answer_ids for p, e in zip(pred, part)]
    per_depth = {str(d): float(np.mean(hits[i::len(depths)])) for i, d in enumerate(depths) if hits[i::len(depths)]}
    return {"accuracy": float(np.mean(hits)), "digit_accuracy": float(np.mean(digit_hits)),
            "per_depth": per_depth, "teacher_forced_accuracy": float(np.mean(forced)), "n": n, "length": length}


def passkey_accuracy(model, tokenizer, length: int, n: int = 50, depths=DEPTHS, digits: int = 5,
                     seed: int = 1234, device=None) -> float:
    """Exact-match rate of greedily decoded pass keys in haystacks of `length` tokens."""
    return passkey_eval(model, tokenizer, length, n, depths, digits, seed, device)["accuracy"]
