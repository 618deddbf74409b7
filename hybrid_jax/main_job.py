"""``hybrid-jax main``, the main job: ``hybrid-jax train`` with defaults that train the
``bytes`` preset (about 3.5M parameters: 3 GDN layers then attention, over UTF-8 bytes) on the
corpus shipped in ``hybrid_jax/corpus`` for a few minutes on a CPU, with a progress bar, then
print a sample of its text.

Every ``train`` option still applies and overrides these defaults (``--steps 50``,
``--text other.txt``, ``--set model.num_hidden_layers=8 ...``). The run goes to
``--checkpoint-dir`` (default ``out/main``, relative to the working directory). A run already
there is deleted first, saying so, unless ``--resume`` is given; then training continues from
its newest checkpoint (a finished run only samples again).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Any

DEFAULT_DIR = "out/main"
# Sized by runs on the project's 2-core CPU machine: 0.65 s a step (6,400 tokens/s), 3.5 min in
# all, the loss from 5.57 to 1.46 (lr 6e-3 ended no lower). One checkpoint kept: each is 38 MB.
DEFAULTS: dict[str, Any] = {
    "preset": "bytes", "seq_len": 256, "global_batch": 16, "steps": 300, "lr": 3e-3,
    "checkpoint_dir": DEFAULT_DIR, "sample": 600,
    "set": [
        # One document: speeches run on into each other, as char-rnn trained on this text; a
        # sample then flows across them.
        "data.doc_separator=null",
        "loop.checkpoint_every=100", "loop.keep_checkpoints=1",
    ],
}


def add_main_parser(sub: Any) -> None:
    """``hybrid-jax main``: the train parser with the main job's defaults, and ``--resume``."""
    from hybrid_jax.corpus import corpus_path
    from hybrid_jax.train_cli import add_train_parser

    shown = [f"--{k.replace('_', '-')} {v}" for k, v in DEFAULTS.items() if k != "set"]
    shown += [f"--set {item}" for item in DEFAULTS["set"]]
    p = add_train_parser(sub, "main", help="the main job: train a small model on the "
                         "embedded corpus, then sample from it",
                         description=__doc__ + "\n" + textwrap.fill(
                             f"Defaults: --text {corpus_path()} {' '.join(shown)}", 95,
                             break_on_hyphens=False))
    p.set_defaults(text=str(corpus_path()), **DEFAULTS)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --checkpoint-dir instead of starting afresh")


def _is_run_entry(path: Path) -> bool:
    """What a training run writes in its checkpoint dir: step directories (orbax's, named by
    the step), log.jsonl and sample.txt."""
    return path.name in ("log.jsonl", "sample.txt") or path.name[:1].isdigit()


def run_main(args: argparse.Namespace) -> int:
    """Start afresh (or resume with --resume), then ``hybrid-jax train``'s run."""
    from hybrid_jax.train_cli import run_train

    if args.data:  # a token file replaces the embedded text
        args.text = None
    ckpt = Path(args.checkpoint_dir)
    if not args.resume and ckpt.is_dir() and any(ckpt.iterdir()):
        strangers = sorted(p.name for p in ckpt.iterdir() if not _is_run_entry(p))
        if strangers:
            print(f"error: --checkpoint-dir {ckpt} holds {strangers[:5]}, which a training run "
                  f"does not write; not deleting it (choose another directory, or --resume)",
                  file=sys.stderr)
            return 2
        print(f"{ckpt}: deleting the previous run to start afresh (--resume continues it)",
              file=sys.stderr)
        shutil.rmtree(ckpt)
    return run_train(args)


__all__ = ["DEFAULTS", "DEFAULT_DIR", "add_main_parser", "run_main"]
