"""``hybrid-jax eval --heldout``: loss, perplexity and bits per byte of a checkpoint on
held-out token files, as training's in-loop evaluation computes them
(``hybrid_jax.eval.heldout``): the same rows, in the same batches, give the same numbers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from hybrid_jax.cli.common import CommandError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The held-out options of ``hybrid-jax eval``."""
    p.add_argument("--heldout", action="append", default=[], metavar="[NAME=]FILES",
                   help="held-out token files (a path or glob; NAME= names the set, default "
                        "'heldout'; repeatable)")
    p.add_argument("--seq-len", type=int, help="tokens per held-out row (as in training)")
    p.add_argument("--token-dtype", choices=["uint16", "uint32"], default="uint16",
                   help="the token files' dtype (default uint16)")
    p.add_argument("--eos-id", type=int, help="EOS id ending documents (default: the config's)")
    p.add_argument("--max-rows", type=int, help="evaluate the first N rows of each set")
    p.add_argument("--step", type=int,
                   help="a training run's checkpoint to evaluate (default: its newest)")


def _sets(items: list[str]) -> dict[str, list[str]]:
    """--heldout items by set name."""
    sets: dict[str, list[str]] = {}
    for item in items:
        name, eq, paths = item.partition("=")
        if not eq:
            name, paths = "heldout", item
        if not name or not paths:
            raise CommandError(f"--heldout {item!r}: expected [NAME=]FILES")
        sets.setdefault(name, []).append(paths)
    return sets


def _bytes_codec(args: argparse.Namespace) -> Any:
    """The codec that counts bytes: --tokenizer (``bytes``: UTF-8 bytes), else the
    checkpoint's tokenizer.json, else none (no bits per byte)."""
    from hybrid_jax.inference.text import TOKENIZER_FILE, ByteCodec, load_tokenizer

    if args.tokenizer == "bytes":
        return ByteCodec()
    if args.tokenizer:
        return load_tokenizer(args.tokenizer)
    own = Path(args.checkpoint) / TOKENIZER_FILE
    return load_tokenizer(own) if own.is_file() else None


def run_heldout(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """The held-out metrics of --checkpoint on each --heldout set, printed one line a set."""
    from flax import nnx

    from hybrid_jax.data import TokenRows
    from hybrid_jax.eval.checkpoints import load_model
    from hybrid_jax.eval.heldout import HeldoutEvaluator, heldout_set
    from hybrid_jax.train.state import model_template

    if args.max_rows is not None and args.max_rows < 1:
        raise CommandError(f"--max-rows must be positive, got {args.max_rows}")
    if args.seq_len is None or args.seq_len < 2:
        raise CommandError("--seq-len: the held-out rows' length (as in training) is required")
    sets = _sets(args.heldout)
    codec = _bytes_codec(args)
    model = load_model(args.checkpoint, dtype=args.dtype, step=args.step)
    cfg = model.config
    eos = args.eos_id if args.eos_id is not None else cfg.eos_token_id
    if eos is None:
        raise CommandError("--eos-id: the checkpoint's config has no eos_token_id")
    held = []
    for name, patterns in sets.items():
        rows = TokenRows.from_files(patterns, args.token_dtype, args.seq_len, cfg.vocab_size,
                                    f"--heldout {name}")
        held.append(heldout_set(name, rows, int(eos), codec, args.max_rows))
    evaluator = HeldoutEvaluator(model_template(cfg), held, args.batch_size)
    results = evaluator(nnx.to_pure_dict(nnx.state(model)))
    for name, m in results.items():
        bpb = m.get("bits_per_byte")
        print(f"{name}: loss {m['loss']:.6f}, perplexity {m['perplexity']:.4f}"
              f"{f', bits per byte {bpb:.6f}' if bpb is not None else ''}, "
              f"{m['tokens']:.0f} tokens", file=sys.stdout)
    return results


__all__ = ["add_arguments", "run_heldout"]
