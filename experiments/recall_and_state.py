"""Experiment 2, recall and state tracking: the three families (transformer, 3:1 hybrid, pure
GDN, matched in parameters) on multi-query associative recall and on running parity, accuracy
against length.

    python experiments/recall_and_state.py                 # ~18 min on 2 CPU cores
    python experiments/recall_and_state.py --tasks mqar --models transformer --mqar-steps 6000
    python experiments/recall_and_state.py --smoke         # tiny, for CI; writes to a tmp dir

Models: hidden 64, 4 layers, 2 heads (attention heads of 32; GDN key heads of 16, value heads
of 32), MLP 192, vocabulary 256, RoPE on attention layers; about 0.25M parameters each.
Same optimiser and budget for every model (AdamW, lr 3e-3, batch 32, one seed).

- **MQAR** (``synthetic_tasks.mqar``): N key-value pairs, then N keys asked (drawn with
  replacement, so no answer follows by elimination); trained
  on sequences of 64 tokens with N uniform in [2, 16]; accuracy on the recalled values at
  N = 4, 8, 16 (context 4N = 16..64 tokens) and N = 32 (128 tokens: twice the training length
  and twice the pairs).
- **Parity** (``synthetic_tasks.parity``): the XOR of all bits so far at each position, trained
  at length 64; accuracy of the final parity at lengths 64, 128, 256 and 512 (chance: 50%).
  A fourth model, pure GDN with ``linear_allow_neg_eigval=False`` (beta in [0, 1], the
  transition's eigenvalues in [0, 1]), shows what OLMo Hybrid's default (beta in [0, 2],
  eigenvalues in [-1, 1]) buys.

Writes ``experiments/results/recall_and_state.json`` and ``experiments/recall_and_state.png``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthetic_tasks as tasks  # noqa: E402
from small_scale import (FAMILIES, TrainConfig, accuracy_panel, accuracy_run,  # noqa: E402
                         add_output_arguments, family_config, pyplot, report, resolve_outputs,
                         save)

HERE = Path(__file__).resolve().parent
MODELS = (*FAMILIES, "gdn-no-neg")
MQAR_PAIRS = (4, 8, 16, 32)
PARITY_LENGTHS = (64, 128, 256, 512)
TEST_ROWS = 256
# --smoke: the first two sizes, a few rows, one call of steps.
SMOKE = {"pairs": MQAR_PAIRS[:2], "lengths": PARITY_LENGTHS[:2], "rows": 8, "steps": 10}


def model(name: str):
    """``name``: a family, or "gdn-no-neg" (pure GDN with eigenvalues in [0, 1])."""
    family, neg = (name, True) if name != "gdn-no-neg" else ("gdn", False)
    return family_config(family, hidden=64, layers=4, heads=2, vocab=tasks.VOCAB,
                         linear_allow_neg_eigval=neg)


def run_mqar(name: str, steps: int, seed: int, pairs: tuple[int, ...] = MQAR_PAIRS,
             rows: int = TEST_ROWS) -> dict:
    train_len = 64

    def batch_fn(step: int):
        rng = np.random.default_rng((seed, step))
        return tasks.mqar(rng, 32, rng.integers(2, 17, 32), train_len)

    tests = {n: tasks.mqar(np.random.default_rng((10_000 + seed, n)), rows, n,
                           max(train_len, 4 * n)) for n in pairs}
    return accuracy_run(model(name), TrainConfig(steps=steps, lr=3e-3, warmup=30, seed=seed),
                        batch_fn, tests, baseline=tasks.value_guess_baseline)


def run_parity(name: str, steps: int, seed: int, lengths: tuple[int, ...] = PARITY_LENGTHS,
               rows: int = TEST_ROWS) -> dict:
    train_len = 64

    def batch_fn(step: int):
        return tasks.parity(np.random.default_rng((seed, step)), 32, train_len)

    tests = {n: tasks.parity(np.random.default_rng((10_000 + seed, n)), rows, n, score="last")
             for n in lengths}
    return accuracy_run(model(name), TrainConfig(steps=steps, lr=3e-3, warmup=30, seed=seed),
                        batch_fn, tests)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="mqar,parity")
    p.add_argument("--mqar-steps", type=int, default=2000)
    p.add_argument("--parity-steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", default=None,
                   help="of transformer, hybrid, gdn, gdn-no-neg (parity only); default all, "
                        "with --smoke hybrid")
    add_output_arguments(p, HERE / "results" / "recall_and_state.json", HERE / "recall_and_state.png")
    args = p.parse_args(argv)
    resolve_outputs(args)
    args.models = args.models or ("hybrid" if args.smoke else ",".join(MODELS))
    if args.smoke:
        args.mqar_steps = args.parity_steps = SMOKE["steps"]
    sizes = ({"pairs": SMOKE["pairs"], "lengths": SMOKE["lengths"], "rows": SMOKE["rows"]}
             if args.smoke else {"pairs": MQAR_PAIRS, "lengths": PARITY_LENGTHS, "rows": TEST_ROWS})
    chosen = args.tasks.split(",")
    names = args.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {unknown}")
    start = time.perf_counter()
    results: dict[str, dict] = {}
    if "mqar" in chosen:
        results["mqar"] = {}
        for name in [n for n in names if n in FAMILIES]:
            print(f"MQAR, {name}")
            results["mqar"][name] = run_mqar(name, args.mqar_steps, args.seed, sizes["pairs"],
                                             sizes["rows"])
    if "parity" in chosen:
        results["parity"] = {}
        for name in names:
            print(f"parity, {name}")
            results["parity"][name] = run_parity(name, args.parity_steps, args.seed,
                                                 sizes["lengths"], sizes["rows"])
    minutes = (time.perf_counter() - start) / 60

    for task, label, xs in (("mqar", "pairs N (context 4N)", sizes["pairs"]),
                            ("parity", "length", sizes["lengths"])):
        if task in results:
            report(f"{task}: accuracy by {label}", results[task], xs)
    print(f"total {minutes:.1f} min")
    out = save(args.out, {"args": vars(args), "results": results, "minutes": minutes})
    plot(results, Path(args.plot), sizes["pairs"], sizes["lengths"])
    print(f"wrote {out} and {args.plot}")


def plot(results: dict, path: Path, pairs: tuple[int, ...] = MQAR_PAIRS,
         lengths: tuple[int, ...] = PARITY_LENGTHS) -> None:
    panels = [t for t in ("mqar", "parity") if t in results]
    fig, axes = pyplot().subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), dpi=110,
                             squeeze=False)
    for ax, task in zip(axes[0], panels):
        xs = pairs if task == "mqar" else lengths
        accuracy_panel(ax, results[task], xs, baseline_label="guess a value seen")
        ax.set_ylabel("accuracy")
        if task == "mqar":
            ax.set_xlabel("key-value pairs N (context 4N; trained N <= 16)")
            ax.set_title("Multi-query associative recall")
        else:
            ax.set_xlabel("sequence length (trained at 64)")
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
            ax.set_title("Running parity: final bit")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
