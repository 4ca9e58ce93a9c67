"""Checkpoints that hold all mutable state, written atomically, loaded without pickle.

checkpoint_<step>/
  model.safetensors       weights (tied tensors stored once)
  optimizer.safetensors   AdamW moments and step counts;  optimizer.json  its param groups
  rng.safetensors         torch CPU (and CUDA) generator states
  trainer.json            step, data position, Python RNG state
  config.yaml  tokenizer.json (or tokenizer.model)
  COMPLETE                written last: a directory without it is ignored
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, load_model, save_file, save_model

from ..errors import UserError

MARKER = "COMPLETE"


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors = {f"{i}.{k}": v.contiguous() for i, st in sd["state"].items() for k, v in st.items()}
    return tensors, {"param_groups": sd["param_groups"]}


def save_checkpoint(run_dir: Path, step: int, model, opt, trainer_state: dict, config: dict,
                    tokenizer_file: Path | None) -> Path:
    ckpt_root = run_dir / "checkpoints"
    final = ckpt_root / f"checkpoint_{step}"
    tmp = ckpt_root / f".tmp_checkpoint_{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    tensors, meta = _optimizer_tensors(opt)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(meta))
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(tmp / "rng.safetensors"))
    state = dict(trainer_state, step=step, python_random=_py_rng_to_json(random.getstate()))
    (tmp / "trainer.json").write_text(json.dumps(state))
    (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if tokenizer_file is not None:  # MQAR runs have none
        shutil.copy(tokenizer_file, tmp / Path(tokenizer_file).name)
    (tmp / MARKER).write_text(f"step {step}\n")  # last: a crash before this leaves an ignorable .tmp_
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    root = run_dir / "checkpoints"
    found = []
    for p in root.glob("checkpoint_*") if root.is_dir() else []:
        step = p.name.removeprefix("checkpoint_")
        if step.isdigit() and (p / MARKER).is_file():
            found.append((int(step), p))
    return sorted(found)


def latest_checkpoint(path: Path, who: str = "--resume", hint: str = "start a new run instead") -> Path:
    """A run directory (its newest complete checkpoint) or one checkpoint directory. `who` and
    `hint` word the error for the command that asked (`--resume`, `atlas eval`)."""
    if (path / MARKER).is_file():
        return path
    if not path.is_dir():
        raise UserError(f"{who} {path}: no such run or checkpoint directory")
    found = complete_checkpoints(path)
    if not found:
        raise UserError(f"{who} {path}: no complete checkpoint in {path / 'checkpoints'} "
                        f"(nor a {MARKER} file in {path}); {hint}")
    return found[-1][1]


def load_checkpoint(ckpt: Path, model, opt) -> dict:
    """Restore model, optimizer and RNG in place; return trainer.json."""
    load_model(model, str(ckpt / "model.safetensors"), device=str(next(model.parameters()).device))
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    meta = json.loads((ckpt / "optimizer.json").read_text())
    state: dict = {}
    for key, t in tensors.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = t
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    rng = load_file(str(ckpt / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda_"))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    trainer = json.loads((ckpt / "trainer.json").read_text())
    random.setstate(_py_rng_from_json(trainer["python_random"]))
    return trainer


def prune_checkpoints(run_dir: Path, keep_last: int, every: int) -> None:
    """Keep the newest `keep_last`, plus geometric snapshots at every * 2^k steps."""
    found = complete_checkpoints(run_dir)
    recent = {s for s, _ in found[-keep_last:]}
    for step, path in found:
        ratio = step // every if step % every == 0 else 0
        geometric = ratio > 0 and ratio & (ratio - 1) == 0
        if step not in recent and not geometric:
            shutil.rmtree(path, ignore_errors=True)


def _py_rng_to_json(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _py_rng_from_json(data):
    version, internal, gauss = data
    return (version, tuple(internal), gauss)
