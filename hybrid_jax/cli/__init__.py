"""``hybrid-jax`` command line.

    hybrid-jax main [--steps 300] [--resume] [any train option]
    hybrid-jax demo [--preset small] [--batch 2] [--seq-len 512] [--new-tokens 32]
    hybrid-jax convert hf-to-orbax SRC DST [--dtype D] [--overwrite]
    hybrid-jax convert orbax-to-hf SRC DST [--dtype D] [--max-shard-size 5GB] [--overwrite]
    hybrid-jax convert verify HF_DIR ORBAX_DIR [--seq-len 32] [--batch 2] [--tol T]
    hybrid-jax generate --checkpoint DIR --prompt TEXT [--tokenizer FILE] [--max-new-tokens 64]
        [--temperature 0] [--top-k K] [--top-p P] [--seed 0] [--max-length N]
        [--prefill-chunk-size N] [--dtype float32|bfloat16] [--eos-token-id [ID ...]]
    hybrid-jax train (--text FILE | --data TOKENS | --config RUN.yaml) [--preset tiny]
        [--set SECTION.KEY=VALUE ...] [--mesh fsdp=8] [--checkpoint-dir DIR] [--export-hf DIR]
    hybrid-jax eval --checkpoint DIR [--tasks T1,T2] [--include-path DIR] [--limit N]
        [--heldout [NAME=]FILES --seq-len T] [--output F.json]
    hybrid-jax eval lm-eval [lm_eval's own options: --model_args checkpoint=DIR,... --tasks T]
    hybrid-jax aot --topology v5p:4x4x4 --batch 512 --seq-len 8192 [--preset P] [--mesh ...]
        [--micro-batches A] [--programs train,prefill,decode] [--json OUT]
    hybrid-jax tokenize INPUT [INPUT ...] --out DIR --tokenizer FILE|bytes [--eos-id ID]
        [--format text|jsonl|parquet] [--field text] [--doc-separator SEP]
        [--dtype uint16|uint32] [--workers N] [--overwrite] [--no-progress]

``main`` (the default) is the main job: it trains a small hybrid model on the embedded corpus
for a few minutes, then prints a sample of its text (see ``hybrid_jax.cli.main_job``). ``demo``
builds an OLMo-Hybrid-shaped model, runs a batch through it with each form of the gated delta
rule, and prints the parameter count, the logits' shape, each form's compile and run time, and
how far the forms' logits are apart, then generates ``--new-tokens`` greedily after the first
half of the batch. ``convert`` moves weights between
transformers checkpoints and orbax checkpoints, and checks a pair against each other (see
``hybrid_jax.cli.convert``). ``generate`` loads either kind of checkpoint and streams the text it
generates after a prompt to stdout, encoded with a tokenizer.json (``--tokenizer``, else the
checkpoint's own) or as UTF-8 bytes, with a one-line timing summary on stderr (see
``hybrid_jax.cli.generate``). ``train`` trains (and resumes) a model on token files, a mixture
of them, or text, evaluating held-out sets as it goes (see ``hybrid_jax.cli.train``). ``eval``
scores a checkpoint on held-out token files and lm-evaluation-harness tasks, or
runs lm-eval's own command line with the ``hybrid-jax`` model registered (see
``hybrid_jax.cli.eval``). ``aot`` compiles the train, prefill and decode steps for a
TPU topology ahead of time, here, and reports per-device memory, cost and a roofline estimate
(see ``hybrid_jax.cli.aot``). ``tokenize`` turns text, JSON lines or parquet files into token
files, one per input, in parallel processes (see ``hybrid_jax.cli.tokenize``).
"""

from __future__ import annotations

import argparse
import sys

from hybrid_jax.cli import aot, convert, demo, eval, generate, main_job, tokenize, train
from hybrid_jax.cli.common import UsageError
from hybrid_jax.cli.platforms import choose_platforms

# Each command is a module with the same two entry points: ``register(subparsers)`` adds its
# parser, ``run(args) -> int`` runs it and gives the exit code; what they share is in
# ``common``. In the order ``--help`` lists them; ``main`` is also the default.
COMMANDS = {"demo": demo, "convert": convert, "generate": generate, "train": train, "eval": eval,
            "aot": aot, "tokenize": tokenize, "main": main_job}


def parser() -> argparse.ArgumentParser:
    """The ``hybrid-jax`` parser, one subparser per command of ``COMMANDS``."""
    p = argparse.ArgumentParser(prog="hybrid-jax", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")
    for module in COMMANDS.values():
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run a command; ``argv`` None means this process's command line, and then the process
    first restarts itself with transparent huge pages where that helps (``host_memory``).
    No command, or options alone, run ``main``. jax's platforms are chosen first
    (``platforms.choose_platforms``: no libtpu backend on a host without TPUs)."""
    if argv is None:
        from hybrid_jax.host_memory import restart_with_hugepages

        restart_with_hugepages()
    choose_platforms()
    p = parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["main", *argv]
    args = p.parse_args(argv)
    try:
        return COMMANDS[args.command].run(args)
    except UsageError as e:
        p.error(str(e))


__all__ = ["COMMANDS", "main", "parser"]
