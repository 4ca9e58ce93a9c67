"""`train(cfg, run_dir)`: the training loop, top to bottom.

Single-device model code; parallel.py wraps it under torchrun (data sharding and logging are
rank-aware: every rank trains, rank 0 writes).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import Config, phase_at, stage_at, total_steps
from ..errors import UserError
from ..memory.stats import gate_drift, memory_stats
from ..model import AtlasLM, GateMode
from ..model.block import BlockState
from ..model.generate import generate
from ..tasks.mqar import scored_hits
from .checkpoint import load_checkpoint, prune_checkpoints, save_checkpoint
from .data import load_data
from .flops import flops_per_token, peak_flops
from .logbook import Logbook, progress
from . import parallel
from .optim import gate_lr_sum, lr_at, make_optimizer, set_lr
from .rundir import write_config

class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run stops before writing a broken checkpoint."""


PROMPTS = ["The quick brown fox", "Once upon a time", "She walked into the room and", "The capital of France is"]


def pick_device(cfg: Config) -> torch.device:
    if cfg.train.device != "auto":
        return torch.device(cfg.train.device)
    if torch.cuda.is_available():
        local, n = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
        if local >= n:  # one GPU a process (NCCL refuses two ranks on one GPU)
            raise UserError(f"train: process {local} of this machine has no GPU of its own ({n} here); start at most "
                            f"{n} (torchrun --nproc_per_node {n}), or train on CPUs with train.device=cpu")
        return torch.device("cuda", local)
    return torch.device("cpu")


def train(cfg: Config, run_dir: Path, resume_ckpt: Path | None = None) -> Path:
    device = pick_device(cfg)
    rank, world = parallel.setup(device)
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
    # the seed's failure modes, on purpose (experiments/memory_use/README.md)
    if cfg.model.memory.detach_writes:
        log.line("note: model.memory.detach_writes is on: the loss does not train what the memory writes (the seed's)")
    if cfg.model.memory.read_after_write:
        log.line("note: model.memory.read_after_write is on: every token reads the memory after its call's last write,"
                 " future tokens included (the seed's; not causal)")
    if cfg.model.memory.features == "seed":
        log.line("note: model.memory.features=seed: raw q, k, v, phi's powers side by side with a constant block,"
                 " the read not normalised (the seed's)")
    if t.carry_memory:
        log.line(f"note: train.carry_memory={t.carry_memory}: each batch starts from the last one's memory (the seed's)")
    if t.compile:
        model.compile_blocks()
    fwd = parallel.wrap(model, device)  # DDP under torchrun; the model itself stays single-device
    autocast = autocast_for(t, device)
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None

    last_step = total_steps(cfg)
    bar = progress(last_step, step, enabled=rank == 0)
    stage_idx = -1
    tokens_per_step = t.batch_size * t.seq_len * t.grad_accum * world
    loss_sum, steps_since_log, t_log = torch.zeros((), device=device), 0, time.perf_counter()
    # (step, gates) of the last stats row, for gate_drift: at step 0 the gates' init
    init_gates = [cfg.model.gate.init] * sum(b.has_memory for b in model.blocks)
    gates_then = gates_before(run_dir, step, init_gates) if step else (0, init_gates)
    t_start = time.perf_counter()
    carried, micro_n = None, 0  # train.carry_memory: the memory one micro-batch leaves to the next
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

        mode = phase_at(cfg, step)

        # ---- one optimizer step over grad_accum micro-batches
        for micro in range(t.grad_accum):
            x, y = (a.to(device, non_blocking=True) for a in data.train.next())  # (B, T) each
            modes = gate_modes(mode, x, data.train)  # (B, T) GateMode or None
            with parallel.accumulating(fwd, last=micro == t.grad_accum - 1):  # all-reduce once a step
                with autocast:
                    logits, state = fwd(x, state=carried, gate_modes=modes)
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())  # -100 labels are not scored
                aux = model.gate_aux_loss()
                ((loss + aux) / t.grad_accum).backward()  # each backward() adds to .grad
            loss_sum += loss.detach() / t.grad_accum
            if t.carry_memory:
                micro_n += 1
                carried = None if micro_n % t.carry_memory == 0 else memory_of(state)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        steps_since_log += 1
        if bar is not None:
            bar.update(1)
        if step % t.log_every == 0 and step < last_step and out_of_time(t_start, t.max_minutes):
            last_step = step  # this step logs, validates and checkpoints as the last one
            log.record("events", {"step": step, "event": "time_limit", "max_minutes": t.max_minutes})
            log.line(f"step {step}: train.max_minutes={t.max_minutes:g} reached; stopping here "
                     f"(atlas train --resume {run_dir} continues)")

        # ---- logging (the only host syncs are here, every log_every steps)
        if step % t.log_every == 0 or step == last_step:
            dt = time.perf_counter() - t_log
            mean_loss = parallel.mean(loss_sum / steps_since_log)  # over ranks: the global batch's loss
            if not math.isfinite(mean_loss):
                stop_diverged(log, step, run_dir, f"loss is {mean_loss}")
            tok_s = tokens_per_step * steps_since_log / dt
            row = {"step": step, "loss": mean_loss, "ppl": math.exp(min(mean_loss, 50.0)), "lr": lr,
                   "grad_norm": grad_norm.item(), "tokens_per_s": tok_s, "stage": stage_idx,
                   "chunk_size": stage.chunk_size}
            if peak is not None:
                row["mfu"] = tok_s / world * flops_per_token(cfg.model, t.seq_len, stage.chunk_size) / peak
            if step % t.stats_every == 0 or step == last_step:
                row.update(memory_stats(model, state))
                if "gate" in row:
                    if gates_then is not None:
                        since, before = gates_then
                        row["gate_drift"] = gate_drift(row["gate"], before, gate_lr_sum(cfg, since, step),
                                                       cfg.model.gate.floor)
                    gates_then = step, row["gate"]
                memory_alerts(log, step, row, t)
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
            extra = "".join(f" {k} {v:.4f}" for k, v in val.items() if k not in ("val_loss", "val_ppl"))
            log.line(f"step {step}: val_loss {val['val_loss']:.4f} val_ppl {val['val_ppl']:.1f}{extra}", echo=bar is None)
        if rank == 0 and data.tokenizer is not None and (step % t.sample_every == 0 or step == last_step):
            write_samples(model, data.tokenizer, run_dir, step, t)
        if step % t.checkpoint_every == 0 or step == last_step:
            finite = torch.stack([p.isfinite().all() for p in model.parameters()]).all()  # one host sync
            if not finite:  # never save a broken model
                stop_diverged(log, step, run_dir, "the weights are not finite")
            if rank == 0:
                path = save_checkpoint(run_dir, step, model, opt, {"data": data.train.state_dict()},
                                       cfg.to_dict(), data.tokenizer_file)
                prune_checkpoints(run_dir, t.keep_last, t.checkpoint_every)
                log.line(f"step {step}: checkpoint {path}", echo=bar is None)
                t_log = time.perf_counter()  # don't charge checkpoint time to tokens/s
    if bar is not None:
        bar.close()
    log.line(f"done: {step} steps; run directory {run_dir}")
    log.close()
    parallel.teardown()
    return run_dir


def autocast_for(t, device: torch.device):
    """The precision a run trains in (train.dtype; auto: bf16 autocast on a GPU, float32 on a CPU),
    for whatever later runs its model as trained."""
    use_bf16 = t.dtype == "bfloat16" or (t.dtype == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def memory_of(state: list[BlockState]) -> list[BlockState]:
    """The memory of `state`, detached, for the next batch to start from (train.carry_memory). The
    attention cache is left behind: the seed's attention never saw past its own call."""
    def detached(x):
        if isinstance(x, torch.Tensor):
            return x.detach()
        if isinstance(x, (list, tuple)):
            return type(x)(detached(v) for v in x)
        if dataclasses.is_dataclass(x):
            return dataclasses.replace(x, **{f.name: detached(getattr(x, f.name)) for f in dataclasses.fields(x)})
        return x
    return [BlockState(attn=None, memory=detached(s.memory)) for s in state]


def out_of_time(t_start: float, max_minutes: float | None) -> bool:
    """Whether any rank has run past max_minutes (a host sync: called at log steps only)."""
    if max_minutes is None:
        return False
    return parallel.mean(float(time.perf_counter() - t_start > max_minutes * 60)) > 0


def stop_diverged(log, step: int, run_dir: Path, what: str) -> None:
    log.record("events", {"step": step, "event": "alert", "kind": "diverged", "what": what})
    log.line(f"ALERT step {step}: {what}; stopping (the last checkpoint stays valid)")
    log.close()
    raise TrainingDiverged(f"training diverged by step {step} ({what}); see {run_dir / 'training.log'}")


def gates_before(run_dir: Path, step: int, init_gates: list[float]) -> tuple[int, list[float]] | None:
    """On resume: (step, gates) of the logs' last stats row at or before `step` (none: the init at
    step 0), so gate_drift continues as in an uninterrupted run; None without logs."""
    f = run_dir / "metrics" / "train_steps.jsonl"
    if not f.exists():
        return None
    last = [r for r in map(json.loads, f.read_text().splitlines()) if "gate" in r and r["step"] <= step]
    return (last[-1]["step"], last[-1]["gate"]) if last else (0, init_gates)


def gate_modes(mode: str, x: torch.Tensor, batches) -> torch.Tensor | None:
    """The (B, T) GateMode of each token in this phase (None: the learned gates alone)."""
    if mode == "normal":
        return None
    if mode == "episodic":  # facts and queries as the task marked them
        return torch.as_tensor(batches.last_modes, device=x.device)
    fill = GateMode.STORAGE if mode == "storage" else GateMode.RETRIEVAL
    return torch.full(x.shape, int(fill), device=x.device, dtype=torch.int8)


def memory_alerts(log, step: int, row: dict, t) -> None:
    """Alert events for the ways a memory goes unused: the gate closing on it (the seed's
    collapse), its share of the mix shrinking (behind a gate that need not move, with unnormalised
    branches), and M overshooting (its norm growing by orders of magnitude along a sequence while
    the output norm hides it from the loss; experiments/memory_use/README.md, "Passkey")."""
    low = [i for i, g in enumerate(row.get("gate", [])) if g < t.gate_alert]
    if low:
        mean_gate = sum(row["gate"]) / len(row["gate"])
        log.record("events", {"step": step, "event": "alert", "kind": "gate_low", "layers": low,
                              "gate": row["gate"], "threshold": t.gate_alert})
        log.line(f"ALERT step {step}: gate below {t.gate_alert} in layers {low} (mean {mean_gate:.3f})")
    small = [i for i, x in enumerate(row.get("mem_share", [])) if t.share_alert is not None and x < t.share_alert]
    if small:
        log.record("events", {"step": step, "event": "alert", "kind": "memory_share_low", "layers": small,
                              "mem_share": row["mem_share"], "threshold": t.share_alert})
        log.line(f"ALERT step {step}: the memory's share of the mix below {t.share_alert:g} in layers {small} "
                 f"(the memory is bypassed)")
    big = [i for i, m in enumerate(row.get("M_norm", [])) if t.m_norm_alert is not None and not m <= t.m_norm_alert]
    if big:
        log.record("events", {"step": step, "event": "alert", "kind": "memory_norm_high", "layers": big,
                              "M_norm": row["M_norm"], "threshold": t.m_norm_alert})
        log.line(f"ALERT step {step}: M_norm above {t.m_norm_alert:g} in layers {big} (the memory overshoots; "
                 f"lower model.memory.max_lr or theta_init)")


@torch.no_grad()
def _val_pass(model, data, n_batches: int, autocast) -> tuple[float, float | None, int]:
    """Mean loss over fixed validation batches, accuracy on scored (label != -100) positions
    when the task scores only some (retrieval tasks), and the batches' size."""
    device = next(model.parameters()).device
    losses, hits, scored = [], 0, 0
    retrieval_task = data.task != "text"  # text scores every position: no accuracy to report
    for x, y in data.val_batches(n_batches):
        x, y = x.to(device), y.to(device)
        with autocast:
            logits, _ = model(x)
        losses.append(F.cross_entropy(logits.float().flatten(0, 1), y.flatten()))
        if retrieval_task:
            c, n = scored_hits(logits, y)
            hits, scored = hits + c, scored + n
    retrieval = hits / scored if retrieval_task and scored else None
    return torch.stack(losses).mean().item(), retrieval, x.shape[0]


def evaluate(model, data, n_batches: int, autocast) -> dict:
    """Validation at the current memory chunk size: as the model is, with the memory branches
    zeroed, and (batches of two or more) with each sequence reading another's memory."""
    model.eval()
    loss, acc, B = _val_pass(model, data, n_batches, autocast)
    loss = parallel.mean(loss)  # each rank validated its own shard
    out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
    if acc is not None:
        out["retrieval_acc"] = acc
    # the ablations: how much does the model lean on its memory, and on what it read from this very
    # sequence? (a batch of one has no other sequence to read)
    kinds = ("off", "shuffled") if B > 1 else ("off",)
    for kind in kinds if model.memory_layers() else ():
        with model.memory_ablated(kind):
            loss_k, acc_k, _ = _val_pass(model, data, n_batches, autocast)
        out[f"val_loss_memory_{kind}"] = parallel.mean(loss_k)
        if acc_k is not None:
            out[f"retrieval_acc_memory_{kind}"] = acc_k
    model.train()
    return out


def write_samples(model, tokenizer, run_dir: Path, step: int, t) -> None:
    """Generations from the seed report's four prompts, into samples.jsonl. A private generator
    keeps sampling from moving the training RNG (resumed runs stay bit-identical)."""
    import json
    gen = torch.Generator().manual_seed(t.seed * 1_000_003 + step)
    model.eval()
    with open(run_dir / "samples.jsonl", "a") as f:
        for prompt in PROMPTS:
            # eager: the blocks may be compiled for training, and a few samples are not worth a capture
            ids = generate(model, tokenizer.encode(prompt), t.sample_tokens, generator=gen, graphs=False)
            f.write(json.dumps({"step": step, "prompt": prompt, "text": tokenizer.decode(ids)}) + "\n")
    model.train()
