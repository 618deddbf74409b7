"""``hybrid-jax main``, the main job: ``hybrid-jax train`` with defaults that train the
``bytes`` preset (about 3.5M parameters: 3 GDN layers then attention, over UTF-8 bytes) on the
corpus shipped in ``hybrid_jax/corpus`` for a few minutes on a CPU, with a progress bar, then
print a sample of its text.

Every ``train`` option still applies and overrides these defaults (``--steps 50``,
``--text other.txt``, ``--config run.yaml``, ``--set model.num_hidden_layers=8 ...``): they are
the lowest layer of the run's configuration. The run goes to the checkpoint dir (default
``out/main``, relative to the working directory). Once every option has been checked, a run
already there is deleted, saying so, unless ``--resume`` is given; then training continues
from its newest checkpoint (a finished run only samples again). A directory holding anything
a run does not write is never deleted.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Any

from hybrid_jax.cli import train
from hybrid_jax.cli.common import error

DEFAULT_DIR = "out/main"
# Sized by runs on the project's 2-core CPU machine: 0.4 s a step (10,200 tokens/s at 4 steps per
# call), 2.8 min in all, the loss from 5.57 to 1.47 (lr 6e-3 ended no lower). One checkpoint
# kept: each is 38 MB.
# The lowest layer of the run's configuration: --config, flags and --set all override it.
BASE_CONFIG: dict[str, dict[str, Any]] = {
    # One document: speeches run on into each other, as char-rnn trained on this text; a
    # sample then flows across them. The corpus's last 5% is kept out of training and
    # evaluated (loss, perplexity, bits per byte) every 100 steps, its first 128 rows.
    "data": {"seq_len": 256, "global_batch": 16, "doc_separator": None, "holdout": 0.05},
    "eval": {"every": 100, "max_rows": 128},
    # Four steps per jitted call: steadier and faster steps on CPU (LoopConfig.steps_per_call).
    "loop": {"steps": 300, "checkpoint_every": 100, "keep_checkpoints": 1, "steps_per_call": 4},
    "optimizer": {"lr": 3e-3},
    "run": {"checkpoint_dir": DEFAULT_DIR},
}
FLAG_DEFAULTS: dict[str, Any] = {"preset": "bytes", "sample": 600}


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``hybrid-jax main``'s parser to ``subparsers``: the train parser with the main
    job's defaults, and ``--resume``."""
    from hybrid_jax.corpus import corpus_path

    shown = [f"--{k} {v}" for k, v in FLAG_DEFAULTS.items()]
    shown += [f"{section}.{key}={value}" for section, values in BASE_CONFIG.items()
              for key, value in values.items()]
    p = train.register(subparsers, "main", help="the main job: train a small model on the "
                         "embedded corpus, then sample from it",
                         description=__doc__ + "\n" + textwrap.fill(
                             f"Defaults (any option overrides them): --text {corpus_path()} "
                             f"{' '.join(shown)}", 95, break_on_hyphens=False))
    p.set_defaults(fallback_text=str(corpus_path()), base_config=BASE_CONFIG, **FLAG_DEFAULTS)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in the checkpoint dir instead of starting afresh")
    return p


# What a training run writes in its checkpoint dir: orbax's step directories (named by the
# step, or a step's temporary while it is written), log.jsonl and sample.txt.
_RUN_DIR = re.compile(r"\d+(\.orbax-checkpoint-tmp-\d+)?")


def _is_run_entry(path: Path) -> bool:
    if path.is_dir() and not path.is_symlink():
        return _RUN_DIR.fullmatch(path.name) is not None
    return path.name in ("log.jsonl", "sample.txt") and path.is_file()


def _start_afresh(ckpt: str | None) -> int | None:
    """Delete the previous run in ``ckpt`` (saying so); refuse, with exit code 2, when it
    holds anything a run does not write."""
    if ckpt is None:
        return None
    path = Path(ckpt)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        return error(f"checkpoint dir {ckpt} is a link or a file; not deleting it (choose "
                     f"another directory, or --resume)")
    if not path.is_dir() or not any(path.iterdir()):
        return None
    strangers = sorted(p.name for p in path.iterdir() if not _is_run_entry(p))
    if strangers:
        return error(f"checkpoint dir {ckpt} holds {strangers[:5]}, which a training run "
                     f"does not write; not deleting it (choose another directory, or --resume)")
    print(f"{ckpt}: deleting the previous run to start afresh (--resume continues it)",
          file=sys.stderr)
    try:
        shutil.rmtree(path)
    except OSError as e:
        return error(f"deleting {ckpt}: {e}")
    return None


def run(args: argparse.Namespace) -> int:
    """``hybrid-jax train``'s run, which first checks every option; then, unless --resume,
    the previous run in the (merged) checkpoint dir is deleted before training."""
    if args.resume:
        return train.run(args)
    return train.run(args, before_training=lambda cfg: _start_afresh(cfg.run.checkpoint_dir))


__all__ = ["BASE_CONFIG", "DEFAULT_DIR", "FLAG_DEFAULTS", "register", "run"]
