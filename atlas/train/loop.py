"""`train(cfg, run_dir)`: the training loop, top to bottom.

Single-device model code; data sharding and logging are rank-aware so torchrun can wrap it.
"""
from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import Config, stage_at, total_steps
from ..memory.stats import memory_stats
from ..model import AtlasLM
from ..model.generate import generate
from .checkpoint import load_checkpoint, prune_checkpoints, save_checkpoint
from .data import load_data
from .flops import flops_per_token, peak_flops
from .logbook import Logbook, progress
from .optim import lr_at, make_optimizer, set_lr
from .rundir import write_config

PROMPTS = ["The quick brown fox", "Once upon a time", "She walked into the room and", "The capital of France is"]


def pick_device(cfg: Config) -> torch.device:
    if cfg.train.device != "auto":
        return torch.device(cfg.train.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def train(cfg: Config, run_dir: Path, resume_ckpt: Path | None = None) -> Path:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(cfg)
    t = cfg.train
    log = Logbook(run_dir, enabled=rank == 0)
    if rank == 0:
        write_config(run_dir, cfg)

    # ---- data: tokenizer and token streams (built once per run directory)
    data = load_data(cfg, run_dir, rank=rank, world=world)
    log.line(f"data: {data.describe()}")

    # ---- model and optimizer
    torch.manual_seed(t.seed)
    model = AtlasLM(cfg.model).to(device)
    opt = make_optimizer(model, cfg)
    step = 0
    if resume_ckpt is not None:
        trainer = load_checkpoint(resume_ckpt, model, opt)
        step = trainer["step"]
        data.train.load_state_dict(trainer["data"])
        log.line(f"resumed from {resume_ckpt} at step {step}")
    n_params = sum(p.numel() for p in model.parameters())
    log.line(f"model: {n_params:,} parameters on {device}; run directory {run_dir}")
    fwd = torch.compile(model) if t.compile else model
    use_bf16 = t.dtype == "bfloat16" or (t.dtype == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None

    last_step = total_steps(cfg)
    bar = progress(last_step, step, enabled=rank == 0)
    stage_idx = -1
    tokens_per_step = t.batch_size * t.seq_len * t.grad_accum * world
    loss_sum, steps_since_log, t_log = torch.zeros((), device=device), 0, time.perf_counter()
    while step < last_step:
        # ---- stage: the memory chunk size and LR scale of this part of the run (TNT)
        idx, stage = stage_at(cfg, step)
        if idx != stage_idx:
            model.set_chunk_size(stage.chunk_size)
            if stage_idx != -1 or step > 0:
                log.line(f"step {step}: stage {idx} begins (memory chunk {stage.chunk_size}, lr x{stage.lr_scale})")
                log.record("events", {"step": step, "event": "stage", "stage": idx, "chunk_size": stage.chunk_size})
            stage_idx = idx
        lr = lr_at(cfg, step)
        set_lr(opt, lr)

        # ---- one optimizer step over grad_accum micro-batches
        for _ in range(t.grad_accum):
            x, y = (a.to(device, non_blocking=True) for a in data.train.next())  # (B, T) each
            with autocast:
                logits, state = fwd(x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            (loss / t.grad_accum).backward()  # each backward() adds to .grad
            loss_sum += loss.detach() / t.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        steps_since_log += 1
        if bar is not None:
            bar.update(1)

        # ---- logging (the only host syncs are here, every log_every steps)
        if step % t.log_every == 0 or step == last_step:
            dt = time.perf_counter() - t_log
            mean_loss = (loss_sum / steps_since_log).item()
            tok_s = tokens_per_step * steps_since_log / dt
            row = {"step": step, "loss": mean_loss, "ppl": math.exp(min(mean_loss, 50.0)), "lr": lr,
                   "grad_norm": grad_norm.item(), "tokens_per_s": tok_s, "stage": stage_idx,
                   "chunk_size": stage.chunk_size}
            if peak is not None:
                row["mfu"] = tok_s / world * flops_per_token(cfg.model, t.seq_len, stage.chunk_size) / peak
            if step % t.stats_every == 0 or step == last_step:
                row.update(memory_stats(model, state))
            log.record("train_steps", row)
            msg = f"step {step}/{last_step} loss {mean_loss:.4f} lr {lr:.2e} gnorm {row['grad_norm']:.2f} {tok_s:,.0f} tok/s"
            if bar is not None:
                bar.set_postfix_str(f"loss {mean_loss:.3f} {tok_s:,.0f} tok/s")
            log.line(msg, echo=bar is None)
            loss_sum.zero_()
            steps_since_log, t_log = 0, time.perf_counter()

        if step % t.val_every == 0 or step == last_step:
            val = evaluate(model, data, t.val_batches, autocast)
            log.record("val_metrics", {"step": step, **val})
            log.line(f"step {step}: val_loss {val['val_loss']:.4f} val_ppl {val['val_ppl']:.1f}", echo=bar is None)
        if rank == 0 and (step % t.sample_every == 0 or step == last_step):
            write_samples(model, data.tokenizer, run_dir, step, t)
        if rank == 0 and (step % t.checkpoint_every == 0 or step == last_step):
            path = save_checkpoint(run_dir, step, model, opt, {"data": data.train.state_dict()},
                                   cfg.to_dict(), data.tokenizer_file)
            prune_checkpoints(run_dir, t.keep_last, t.checkpoint_every)
            log.line(f"step {step}: checkpoint {path}", echo=bar is None)
            t_log = time.perf_counter()  # don't charge checkpoint time to tokens/s
    if bar is not None:
        bar.close()
    log.line(f"done: {step} steps; run directory {run_dir}")
    log.close()
    return run_dir


@torch.no_grad()
def evaluate(model, data, n_batches: int, autocast) -> dict:
    """Mean loss over fixed validation batches, at the current memory chunk size."""
    model.eval()
    device = next(model.parameters()).device
    losses = []
    for x, y in data.val_batches(n_batches):
        with autocast:
            logits, _ = model(x.to(device))
        losses.append(F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten()))
    model.train()
    loss = torch.stack(losses).mean().item()
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


def write_samples(model, tokenizer, run_dir: Path, step: int, t) -> None:
    """Generations from the seed report's four prompts, into samples.jsonl. A private generator
    keeps sampling from moving the training RNG (resumed runs stay bit-identical)."""
    import json
    gen = torch.Generator().manual_seed(t.seed * 1_000_003 + step)
    model.eval()
    with open(run_dir / "samples.jsonl", "a") as f:
        for prompt in PROMPTS:
            ids = generate(model, tokenizer.encode(prompt), t.sample_tokens, generator=gen)
            f.write(json.dumps({"step": step, "prompt": prompt, "text": tokenizer.decode(ids)}) + "\n")
    model.train()
