"""Choosing, checking and describing a run directory (DESIGN.md §3)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import yaml

from ..config import Config, config_from_dict, load_config, read_yaml, set_dotted
from ..errors import UserError
from .checkpoint import complete_checkpoints

# Keys a resumed run may change: they steer logging and stopping, not the trajectory.
RESUMABLE = {"name", "train.max_steps", "train.log_every", "train.stats_every", "train.val_every",
             "train.val_batches", "train.sample_every", "train.sample_tokens", "train.checkpoint_every",
             "train.keep_last", "train.compile", "train.device", "train.max_minutes"}


def default_run_dir(cfg: Config) -> Path:
    return Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_new_run_dir(run_dir: Path) -> None:
    if complete_checkpoints(run_dir):
        raise UserError(f"run directory {run_dir} already holds a run; continue it with "
                        f"--resume {run_dir} or choose another --run-dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_test.{os.getpid()}"  # per process: torchrun's ranks probe at once
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"run directory {run_dir} is not writable ({e.strerror}); choose another --run-dir") from None


def write_config(run_dir: Path, cfg: Config) -> None:
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def resume_config(ckpt: Path, config_arg: str | None, overrides: list[str]) -> Config:
    """The checkpoint's config with the overrides; a CONFIG given beside --resume must match it."""
    src = str(ckpt / "config.yaml")
    saved = config_from_dict(read_yaml(ckpt / "config.yaml"), src)
    tree = saved.to_dict()
    for o in overrides:
        set_dotted(tree, o, src)
    cfg = config_from_dict(tree, src + " (with overrides)")
    if config_arg is not None:
        _must_match(saved, load_config(config_arg, overrides), f"config {config_arg}", ckpt)
    _must_match(saved, cfg, "the overrides", ckpt)
    return cfg


def _must_match(saved: Config, new: Config, what: str, ckpt: Path) -> None:
    a, b = _flatten(saved.to_dict()), _flatten(new.to_dict())
    diff = [k for k in a if k not in RESUMABLE and a[k] != b.get(k)]
    if diff:
        k = diff[0]
        raise UserError(f"--resume {ckpt}: {what} does not match the checkpoint's config at '{k}' "
                        f"({b.get(k)!r} vs {a[k]!r}); only {', '.join(sorted(RESUMABLE))} may change")
