"""`atlas train` and `atlas data prepare`."""
from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import UserError


def cmd_train(args) -> None:
    from ..config import load_config
    from .checkpoint import latest_checkpoint
    from .loop import train
    from .rundir import check_new_run_dir, default_run_dir, resume_config

    positional = [a for a in args.args if "=" not in a]
    overrides = [a for a in args.args if "=" in a]
    if len(positional) > 1:
        raise UserError(f"atlas train takes one CONFIG, got {positional}; overrides look like key=value")
    config_arg = positional[0] if positional else None
    if args.resume:
        ckpt = latest_checkpoint(Path(args.resume))
        cfg = resume_config(ckpt, config_arg, overrides)
        run_dir = Path(args.run_dir) if args.run_dir else ckpt.parent.parent
        train(cfg, run_dir, resume_ckpt=ckpt)
        return
    cfg = load_config(config_arg or "tiny", overrides)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(cfg)
    created = not run_dir.exists()
    check_new_run_dir(run_dir)
    try:
        train(cfg, run_dir)
    except UserError:
        if created:  # bad input found before training: leave no half-made run behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def cmd_prepare(args) -> None:
    from ..data.shards import load_index, prepare
    from ..data.sources import expand_inputs, read_docs
    from ..data.tokenizer import Tokenizer, train_bpe

    if args.tokenizer:
        tok = Tokenizer.load(args.tokenizer)
    else:  # a BPE trained on the inputs themselves (checked and read once more by prepare)
        files = expand_inputs(args.inputs)
        tok = train_bpe((d.text for path, kind in files for d in read_docs(path, kind, args.text_field)),
                        args.vocab_size)
    out = prepare(args.inputs, args.out, tok, text_field=args.text_field, val_fraction=args.val_fraction)
    index = load_index(out)
    counts = ", ".join(f"{s} {v['tokens']:,} tokens" for s, v in index["splits"].items())
    print(f"prepared {out}: {counts}; tokenizer {tok.vocab_size} entries; train with data.path={out}")


def add_train_commands(sub) -> None:
    p = sub.add_parser("train", help="train a model (default: tiny on the embedded Shakespeare)")
    p.add_argument("args", nargs="*", metavar="CONFIG|key=value",
                   help="a preset name or YAML path, then dotted overrides such as train.max_steps=30")
    p.add_argument("--run-dir", help="where the run lives (default runs/<name>-<time>)")
    p.add_argument("--resume", metavar="PATH", help="a run directory or checkpoint to continue from")
    p.set_defaults(fn=cmd_train)

    data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_cmd", required=True)
    prep = data.add_parser("prepare", help="text files to token shards with provenance")
    prep.add_argument("inputs", nargs="+", help=".txt, .jsonl, .parquet files or a datasets directory")
    prep.add_argument("--out", required=True, help="output directory (created)")
    prep.add_argument("--tokenizer", help="tokenizer.json or sentencepiece .model (default: train a BPE)")
    prep.add_argument("--vocab-size", type=int, default=8192)
    prep.add_argument("--text-field", default="text")
    prep.add_argument("--val-fraction", type=float, default=0.01)
    prep.set_defaults(fn=cmd_prepare)
