"""``hybrid-jax eval``: score a checkpoint on held-out token files and on
lm-evaluation-harness tasks.

    hybrid-jax eval --checkpoint DIR [--tasks T1,T2] [--include-path DIR] [--batch-size 8]
        [--limit N] [--num-fewshot N] [--output FILE.json] [--log-samples]
        [--dtype float32|bfloat16] [--tokenizer FILE] [--max-length N] [--max-gen-toks N]
        [--heldout [NAME=]FILES ... --seq-len T [--token-dtype uint16] [--eos-id ID]
         [--max-rows N] [--step S]]
    hybrid-jax eval lm-eval [lm_eval's own options ...]

DIR is a transformers, orbax or training-run checkpoint directory (``--step`` picks a training
run's checkpoint, default its newest). ``--heldout`` evaluates token files as training's
in-loop evaluation does (``hybrid_jax.cli.eval_heldout``): loss, perplexity and, with a
tokenizer (``--tokenizer``, ``bytes``, or DIR's tokenizer.json), bits per byte; the results go
under "heldout" in ``--output``.

The first form loads DIR as lm-eval's
``hybrid-jax`` model (``hybrid_jax.eval.harness.HybridJaxLM``; its tokenizer is ``--tokenizer``,
else DIR/tokenizer.json), runs the tasks with ``lm_eval.simple_evaluate``, prints lm-eval's
results table and writes lm-eval's results to ``--output`` (with every request's inputs and
outputs under "samples" if ``--log-samples``). Tasks are lm-eval's names or glob patterns;
``--include-path`` adds a directory of task YAML files. When every task is found in
``--include-path``, lm-eval's own task collection is not indexed at all.

The second form runs lm-eval's own command line (``lm-eval run ...``; ``ls`` and ``validate``
too) with the ``hybrid-jax`` model registered, which a bare ``lm_eval`` cannot see: lm-eval
finds models only in packages that are already imported. ``--model hybrid-jax`` is added when
no ``--model`` is given, e.g.

    hybrid-jax eval lm-eval --model_args checkpoint=DIR,dtype=bfloat16 --batch_size 8 --tasks hellaswag

(lm-eval passes its own ``--batch_size``, default 1, so the model's batch size goes there, not
in ``--model_args``.)

Needs the ``eval`` extra (lm-eval). Exit codes: 0 success, 2 bad input (missing checkpoint or
tokenizer, unknown task, missing include path), reported as one ``error:`` line before the
model is loaded where it can be.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

from hybrid_jax.cli import eval_heldout
from hybrid_jax.cli.common import CommandError, UsageError, error

PASSTHROUGH = ("lm-eval", "lm_eval")
_LM_EVAL_COMMANDS = ("run", "ls", "validate")
# The options of the first form that the second would silently drop.
_OWN_OPTIONS = ("checkpoint", "tasks", "include_path", "limit", "num_fewshot", "output", "dtype",
                "tokenizer", "max_length", "max_gen_toks", "seq_len", "eos_id", "max_rows",
                "step")
# Those of them that have defaults: given when they differ from them.
_OWN_DEFAULTS = {"heldout": [], "batch_size": 8, "token_dtype": "uint16"}


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``eval`` parser to ``subparsers``."""
    p = subparsers.add_parser("eval", help="score a checkpoint on lm-evaluation-harness tasks",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", metavar="DIR",
                   help="transformers, orbax or training-run checkpoint directory")
    p.add_argument("--tasks", metavar="T1,T2", help="lm-eval task names or patterns, comma-separated")
    p.add_argument("--include-path", metavar="DIR", help="a directory of extra task YAML files")
    p.add_argument("--batch-size", type=int, default=8, help="rows per compiled call (default 8)")
    p.add_argument("--limit", type=float, default=None,
                   help="documents per task (a fraction below 1: that share of them)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--output", metavar="FILE.json",
                   help="write the results here (lm-eval's, and the held-out sets' under "
                        "\"heldout\")")
    p.add_argument("--log-samples", action="store_true",
                   help="also write each request's inputs and outputs to --output")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="parameter and compute dtype (default: the checkpoint's)")
    p.add_argument("--tokenizer", metavar="FILE", default=None,
                   help="tokenizer.json (default: DIR/tokenizer.json); for --heldout alone, "
                        "'bytes' counts UTF-8 bytes")
    p.add_argument("--max-length", type=int, default=None,
                   help="longest input in tokens (default: the config's max_position_embeddings)")
    p.add_argument("--max-gen-toks", type=int, default=None,
                   help="new tokens when a task does not say (default 256)")
    eval_heldout.add_arguments(p)
    p.add_argument("passthrough", nargs=argparse.REMAINDER, metavar="lm-eval ...",
                   help="run lm-eval's own command line with the hybrid-jax model registered")
    return p


# ----------------------------------------------------------------------------- lm-eval's CLI
def lm_eval_argv(args: list[str]) -> list[str]:
    """lm-eval's arguments for ``args``: ``run`` first unless a subcommand is named, and
    ``--model hybrid-jax`` added to a run that names no model."""
    args = list(args)
    if not args or args[0] not in _LM_EVAL_COMMANDS:
        args = ["run", *args]
    names_model = any(a == "--model" or a.startswith("--model=") for a in args)
    if args[0] == "run" and not names_model and "-h" not in args and "--help" not in args:
        args += ["--model", "hybrid-jax"]
    return args


def _run_lm_eval_cli(args: list[str]) -> int:
    """lm-eval's command line on ``args``, our model registered; its exit status."""
    from lm_eval.__main__ import cli_evaluate

    importlib.import_module("hybrid_jax.eval.harness")  # registers "hybrid-jax"

    saved = sys.argv
    sys.argv = ["lm-eval", *lm_eval_argv(args)]
    try:
        cli_evaluate()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0


# ----------------------------------------------------------------------------- tasks
def task_manager(tasks: list[str], include_path: str | None) -> Any:
    """A ``TaskManager`` that knows every one of ``tasks``: over ``include_path`` alone when it
    holds them all (indexing lm-eval's own collection is slow), else over both. CommandError
    naming the tasks found in neither."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).is_dir():
            raise CommandError(f"--include-path {include_path}: directory not found")
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(local.match_tasks([t]) for t in tasks):
            return local
    manager = TaskManager(include_path=include_path)
    missing = [t for t in tasks if not manager.match_tasks([t])]
    if missing:
        where = "lm-eval's tasks" + (f" or {include_path}" if include_path else "")
        raise CommandError(f"--tasks: unknown task(s) {', '.join(missing)} (not among {where})")
    return manager


def _task_names(value: str | None) -> list[str]:
    names = [t.strip() for t in (value or "").split(",") if t.strip()]
    if not names:
        raise CommandError("--tasks: no task given")
    return names


def _check_inputs(args: argparse.Namespace, tasks: bool) -> None:
    """Checks that need no model: the checkpoint directory, the tokenizer file (for
    ``tasks``)."""
    from hybrid_jax.convert.checkpoint import checkpoint_format
    from hybrid_jax.eval.checkpoints import is_train_run
    from hybrid_jax.inference.text import TOKENIZER_FILE

    if args.checkpoint is None:
        raise CommandError("--checkpoint is required")
    if not is_train_run(args.checkpoint):
        checkpoint_format(args.checkpoint)
    if args.batch_size <= 0:
        raise CommandError(f"--batch-size must be positive, got {args.batch_size}")
    if not tasks:
        return
    tokenizer = Path(args.tokenizer or Path(args.checkpoint) / TOKENIZER_FILE)
    if not tokenizer.is_file():
        hint = "" if args.tokenizer else " (the checkpoint has none: pass --tokenizer FILE)"
        raise CommandError(f"{tokenizer}: tokenizer file not found{hint}")


def _load_lm(args: argparse.Namespace) -> Any:
    from hybrid_jax.eval.harness import DEFAULT_MAX_GEN_TOKS, HybridJaxLM

    return HybridJaxLM(checkpoint=args.checkpoint, tokenizer=args.tokenizer,
                       batch_size=args.batch_size, dtype=args.dtype, max_length=args.max_length,
                       max_gen_toks=args.max_gen_toks or DEFAULT_MAX_GEN_TOKS)


def _run_tasks(args: argparse.Namespace, tasks: list[str], manager: Any) -> dict:
    """lm-eval's results for ``tasks``, its table printed to stdout."""
    import lm_eval
    from lm_eval.utils import make_table

    limit = args.limit if args.limit is None or args.limit < 1 else int(args.limit)
    results = lm_eval.simple_evaluate(model=_load_lm(args), tasks=tasks,
                                      num_fewshot=args.num_fewshot, limit=limit,
                                      task_manager=manager, log_samples=args.log_samples)
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    return results


def _write(path: str, report: dict) -> None:
    from lm_eval.utils import handle_non_serializable

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=handle_non_serializable,
                              ensure_ascii=False) + "\n")
    print(f"results written to {out}", file=sys.stderr)


def _evaluate(args: argparse.Namespace) -> int:
    """Each evaluation that was asked for, in turn, into one report (``--output``)."""
    tasks = _task_names(args.tasks) if args.tasks is not None or not args.heldout else []
    _check_inputs(args, bool(tasks))
    manager = task_manager(tasks, args.include_path) if tasks else None  # before the model
    report: dict[str, Any] = {}
    if args.heldout:
        report["heldout"] = eval_heldout.run_heldout(args)
    if tasks:
        report.update(_run_tasks(args, tasks, manager))
    if args.output:
        _write(args.output, report)
    return 0


def run(args: argparse.Namespace) -> int:
    """Evaluate, or run lm-eval's CLI: 0 success, 2 bad input (one ``error:`` line naming the
    culprit); lm-eval's own exit status for its CLI."""
    if args.passthrough:
        if args.passthrough[0] not in PASSTHROUGH:
            raise UsageError(f"unrecognized arguments: {' '.join(args.passthrough)}")
        own = [f"--{k.replace('_', '-')}" for k in _OWN_OPTIONS if getattr(args, k) is not None]
        own += [f"--{k.replace('_', '-')}" for k, default in _OWN_DEFAULTS.items()
                if getattr(args, k) != default]
        if own:
            raise UsageError(f"{' '.join(own)} before lm-eval: lm-eval takes its own options "
                             f"(--model_args checkpoint=DIR,..., --tasks, --include_path, ...)")
        return _run_lm_eval_cli(args.passthrough[1:])
    from hybrid_jax.convert.from_hf import CheckpointError
    from hybrid_jax.convert.orbax_io import OrbaxCheckpointError
    from hybrid_jax.data import DataError
    from hybrid_jax.inference.text import TokenizerError

    try:
        return _evaluate(args)
    except (CommandError, CheckpointError, OrbaxCheckpointError, TokenizerError,
            DataError) as e:
        return error(str(e).strip() or type(e).__name__)
    except (FileNotFoundError, NotADirectoryError, PermissionError) as e:
        return error(f"{e.filename}: {e.strerror}" if e.filename else str(e))
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "lm_eval":
            raise
        return error(f"hybrid-jax eval needs lm-eval: pip install 'hybrid-jax[eval]' ({e})")


__all__ = ["PASSTHROUGH", "lm_eval_argv", "register", "run", "task_manager"]
