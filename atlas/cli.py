"""The `atlas` command: info, train, data prepare (more subcommands register in main())."""
from __future__ import annotations

import argparse
import sys

from .errors import UserError


def cmd_info(args) -> None:
    import torch

    from .config import load_config
    from .model import AtlasLM
    from .model.params import count_by_component

    cfg = load_config(args.config, args.overrides)
    with torch.device("meta"):  # count without allocating: atlas_1b would take GBs
        model = AtlasLM(cfg.model)
    counts = count_by_component(model)
    m, mem = cfg.model, cfg.model.memory
    print(f"{cfg.name}: d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} attention heads, "
          f"vocab {m.vocab_size}, attention window {m.attn_window or 'full'}")
    print(f"memory: {'on' if mem.enabled else 'off'}, {mem.heads} head(s) of {mem.d_key // mem.heads}x"
          f"{mem.d_value // mem.heads}, poly degree {mem.poly_degree}, window {mem.context_window}, "
          f"rule {mem.rule}, chunk {mem.chunk_size}; gate {m.gate.kind} init {m.gate.init} floor {m.gate.floor}")
    print(f"{'component':<12}{'parameters':>16}{'share':>9}")
    for name, n in counts.items():
        print(f"{name:<12}{n:>16,}{100 * n / counts['total']:>8.1f}%")
    if not m.tie_embeddings:
        print("(embeddings include the untied output head)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="atlas", description="Language models with neural long-term memory.")
    sub = p.add_subparsers(dest="cmd", required=True)
    info = sub.add_parser("info", help="parameter counts by component for a preset or YAML config")
    info.add_argument("config", help="preset name (tiny, 62m, atlas_300m_omega, atlas_1b) or YAML path")
    info.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. model.n_layers=8")
    info.set_defaults(fn=cmd_info)
    from .train.cli import add_train_commands
    add_train_commands(sub)
    from .tasks.cli import add_inference_commands
    add_inference_commands(sub)
    from .bench import add_bench_command
    add_bench_command(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # positionals after an option (`train tiny --run-dir A key=value`) come back as extras
    if extra and hasattr(args, "args") and not any(e.startswith("-") for e in extra):
        args.args += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.fn(args)
    except UserError as e:
        print(f"atlas: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("atlas: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
