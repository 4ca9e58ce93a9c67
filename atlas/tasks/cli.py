"""`atlas eval mqar|passkey RUN_OR_CHECKPOINT`: retrieval accuracy of a trained checkpoint,
`atlas eval memory RUN_OR_CHECKPOINT`: its validation loss with the memory as trained, zeroed and
shuffled, and `atlas sample RUN_OR_CHECKPOINT`: text from it.

eval prints one JSON line on stdout (for scripts: `atlas eval mqar runs/x | jq .accuracy`) and one
human line on stderr; sample prints the text on stdout and its speed on stderr.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import UserError

# Zoology's grid (T -> κ); other lengths get T/16 pairs, the density of its T = 256 point.
ZOOLOGY_KV = {64: 4, 128: 8, 256: 16, 512: 64}


def load_for_eval(path_arg: str, device_arg: str = "auto", who: str = "atlas eval"):
    """RUN_DIR (its newest complete checkpoint) or a checkpoint directory -> (model, cfg, ckpt, step).

    The model is in eval mode, on `device_arg`, with the memory chunk size of the stage that the
    run's last optimizer step trained with (TNT stages change it)."""
    import torch
    from safetensors.torch import load_model

    from ..config import config_from_dict, read_yaml, stage_at
    from ..model import AtlasLM
    from ..train.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(Path(path_arg), who=who, hint="train first or pass another run")
    cfg_file = ckpt / "config.yaml"
    if not cfg_file.is_file():
        raise UserError(f"{who}: {cfg_file} is missing; the checkpoint is damaged, pass another one")
    cfg = config_from_dict(read_yaml(cfg_file), str(cfg_file))
    step = _step_of(ckpt)
    if device_arg == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(device_arg)
        except RuntimeError:
            raise UserError(f"{who}: --device {device_arg!r} is not a torch device; use cpu, cuda or cuda:N")
    model = AtlasLM(cfg.model).to(device)
    try:
        load_model(model, str(ckpt / "model.safetensors"), device=str(device))
    except (RuntimeError, OSError, FileNotFoundError) as e:
        raise UserError(f"{who}: cannot load {ckpt / 'model.safetensors'} into the model of {cfg_file} "
                        f"({str(e).splitlines()[0][:160]}); pass an intact checkpoint")
    _, stage = stage_at(cfg, max(step - 1, 0))  # step counts finished steps; the last one was step - 1
    model.set_chunk_size(stage.chunk_size)
    model.eval()
    return model, cfg, ckpt, step


def _step_of(ckpt: Path) -> int:
    try:
        return int(json.loads((ckpt / "trainer.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        tail = ckpt.name.removeprefix("checkpoint_")
        return int(tail) if tail.isdigit() else 0


def _report(result: dict, human: str) -> None:
    print(json.dumps(result), flush=True)
    print(human, file=sys.stderr)


def cmd_eval_mqar(args) -> None:
    from .mqar import MQAR, mqar_accuracy

    model, cfg, ckpt, step = load_for_eval(args.run, args.device)
    T = args.seq_len or cfg.train.seq_len
    data = cfg.data
    trained_on_mqar = data.task == "mqar" and T == cfg.train.seq_len
    kv = args.kv_pairs or (data.mqar_kv_pairs if trained_on_mqar else ZOOLOGY_KV.get(T, max(1, T // 16)))
    V = args.vocab_size or cfg.model.vocab_size
    if V > cfg.model.vocab_size:
        raise UserError(f"atlas eval mqar: --vocab-size {V} exceeds the model's {cfg.model.vocab_size}; lower it")
    if args.n < 1:
        raise UserError(f"atlas eval mqar: --n {args.n}; use at least 1 example")
    seed = cfg.train.seed if args.seed is None else args.seed
    task = MQAR(T, kv, vocab_size=V, seed=seed)
    acc = mqar_accuracy(model, task, n_examples=args.n, batch_size=args.batch_size)
    _report({"task": "mqar", "checkpoint": str(ckpt), "step": step, "seq_len": T, "kv_pairs": kv,
             "vocab_size": V, "n": args.n, "seed": seed, "accuracy": acc},
            f"mqar accuracy {acc:.4f} on {args.n} held-out examples (T={T}, {kv} pairs, vocab {V}); "
            f"{ckpt.name} of {ckpt.parent.parent}")


def cmd_eval_passkey(args) -> None:
    from ..data import Tokenizer
    from .passkey import passkey_eval

    model, cfg, ckpt, step = load_for_eval(args.run, args.device)
    tok = Tokenizer.load(ckpt)  # the tokenizer the run trained with, copied into every checkpoint
    length = args.length or 4 * cfg.train.seq_len
    digits = args.digits or cfg.data.passkey_digits
    if args.n < 1:
        raise UserError(f"atlas eval passkey: --n {args.n}; use at least 1 example")
    r = passkey_eval(model, tok, length, n=args.n, digits=digits, seed=args.seed, batch_size=args.batch_size)
    _report({"task": "passkey", "checkpoint": str(ckpt), "step": step, "length": length,
             "train_len": cfg.train.seq_len, "attn_window": cfg.model.attn_window, "digits": digits,
             "seed": args.seed, **r},
            f"passkey accuracy {r['accuracy']:.3f} on {args.n} haystacks of {length} tokens "
            f"({length / cfg.train.seq_len:.1f}x the training length); {ckpt.name} of {ckpt.parent.parent}")


def cmd_eval_memory(args) -> None:
    """The validation of a training run (atlas.train.loop.evaluate) on a checkpoint: for runs
    from before an ablation was logged, or on more batches than the run used."""
    from ..train.data import load_data
    from ..train.loop import autocast_for, evaluate

    model, cfg, ckpt, step = load_for_eval(args.run, args.device)
    n = cfg.train.val_batches if args.batches is None else args.batches
    if n < 1:
        raise UserError(f"atlas eval memory: --batches {n}; use at least 1")
    if not model.memory_layers():
        raise UserError(f"atlas eval memory: the model of {ckpt} has no memory (model.memory.enabled is false)")
    data = load_data(cfg, ckpt.parent.parent)  # the run directory: its tokenized data and tokenizer
    r = evaluate(model, data, n, autocast_for(cfg.train, next(model.parameters()).device))
    _report({"task": "memory", "checkpoint": str(ckpt), "step": step, "batches": n,
             "batch_size": cfg.train.batch_size, "seq_len": cfg.train.seq_len, **r},
            f"val_loss {r['val_loss']:.4f}, memory off {r['val_loss_memory_off']:.4f}"
            + (f", memory shuffled {r['val_loss_memory_shuffled']:.4f}" if "val_loss_memory_shuffled" in r else "")
            + f" on {n} validation batches; {ckpt.name} of {ckpt.parent.parent}")


def cmd_sample(args) -> None:
    """Generate from a checkpoint: the prompt is read once, then one O(1) step a token."""
    import torch

    from ..data import Tokenizer
    from ..model.generate import generate

    if args.tokens < 1 or args.temperature < 0 or (args.top_k is not None and args.top_k < 1):
        raise UserError(f"atlas sample: --tokens {args.tokens}, --temperature {args.temperature}, --top-k "
                        f"{args.top_k}; use tokens >= 1, temperature >= 0 (0: greedy), top-k >= 1")
    model, cfg, ckpt, step = load_for_eval(args.run, args.device, who="atlas sample")
    tok = Tokenizer.load(ckpt)  # the tokenizer the run trained with
    ids = tok.encode(args.prompt)
    if not ids:
        raise UserError("atlas sample: the prompt encodes to no tokens; pass some text with --prompt")
    device = next(model.parameters()).device
    times = {}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):  # as trained
        out = generate(model, ids, args.tokens, temperature=args.temperature, top_k=args.top_k,
                       generator=torch.Generator().manual_seed(args.seed), compile=args.compile, times=times)
    print(tok.decode(ids + out))
    setup = f", {times['setup_s']:.2f} s to capture{' and compile' if args.compile else ''} the step" \
        if times["steps"] == "graphs" else ""
    print(f"{len(out)} tokens after a {len(ids)}-token prompt: prompt {times['prompt_s']:.2f} s{setup}, then "
          f"{1e3 * times['steps_s'] / len(out):.1f} ms a token ({times['steps']}); step {step}, {ckpt.name} of "
          f"{ckpt.parent.parent}", file=sys.stderr)


def add_inference_commands(sub) -> None:
    sm = sub.add_parser("sample", help="generate text from a checkpoint (memory and attention state carried)")
    sm.add_argument("run", metavar="RUN_OR_CHECKPOINT",
                    help="a run directory (its newest complete checkpoint) or a checkpoint directory")
    sm.add_argument("--prompt", default="ROMEO:", help="text to continue (default ROMEO:)")
    sm.add_argument("--tokens", type=int, default=100, help="tokens to generate (default 100)")
    sm.add_argument("--temperature", type=float, default=0.8, help="0 for greedy (default 0.8)")
    sm.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest (default 50)")
    sm.add_argument("--seed", type=int, default=0)
    sm.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    sm.add_argument("--compile", action="store_true",
                    help="on a GPU, torch.compile the decoding step under its CUDA graph: ~35 s once for the "
                         "300M model, then about half the time a token (for long generations)")
    sm.set_defaults(fn=cmd_sample)

    ev = sub.add_parser("eval", help="evaluations of a checkpoint (mqar, passkey, memory)")
    tasks = ev.add_subparsers(dest="eval_cmd", required=True)
    common = dict(help="a run directory (its newest complete checkpoint) or a checkpoint directory")

    mq = tasks.add_parser("mqar", help="Zoology's multi-query associative recall, held-out examples")
    mq.add_argument("run", metavar="RUN_OR_CHECKPOINT", **common)
    mq.add_argument("--seq-len", type=int, help="sequence length T (default: the run's train.seq_len)")
    mq.add_argument("--kv-pairs", type=int, help="key-value pairs (default: Zoology's grid, 16 at T=256)")
    mq.add_argument("--n", type=int, default=1000, help="examples (default 1000)")
    mq.add_argument("--vocab-size", type=int, help="MQAR vocabulary (default: the model's)")
    mq.add_argument("--seed", type=int, help="task seed (default: the run's train.seed)")
    mq.add_argument("--batch-size", type=int, default=64)
    mq.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    mq.set_defaults(fn=cmd_eval_mqar)

    pk = tasks.add_parser("passkey", help="pass-key retrieval in haystacks from the validation works")
    pk.add_argument("run", metavar="RUN_OR_CHECKPOINT", **common)
    pk.add_argument("--length", type=int, help="prompt length in tokens (default: 4x the run's train.seq_len)")
    pk.add_argument("--n", type=int, default=50, help="haystacks, spread over depths 0.1..0.9 (default 50)")
    pk.add_argument("--digits", type=int, help="digits of the pass key (default 5)")
    pk.add_argument("--seed", type=int, default=1234)
    pk.add_argument("--batch-size", type=int, default=8)
    pk.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    pk.set_defaults(fn=cmd_eval_passkey)

    me = tasks.add_parser("memory", help="validation loss with the memory as trained, zeroed and shuffled "
                                         "(each sequence reading another's)")
    me.add_argument("run", metavar="RUN_OR_CHECKPOINT", **common)
    me.add_argument("--batches", type=int, help="validation batches (default: the run's train.val_batches, "
                                                "so the last checkpoint gives the run's last validation)")
    me.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    me.set_defaults(fn=cmd_eval_memory)
