"""Experiment 3, long context: needle-in-a-haystack retrieval at growing lengths, and
extrapolation past the training length with NoPE against RoPE attention layers.

    python experiments/long_context.py                    # ~16 min on 2 CPU cores
    python experiments/long_context.py --models hybrid-nope --steps 8000 --out A.json
    python experiments/long_context.py --plot-only A.json,B.json --plot both.png
    python experiments/long_context.py --smoke            # tiny, for CI; writes to a tmp dir

Decode throughput against context length, the other half of the claim, is
``experiments/bench_decode.py`` (RESULTS.md, "Decode and prefill"); this script trains and
tests retrieval.

Task (``synthetic_tasks.needles``): needles ``MARK key value`` at random places in random
filler, then as many questions at the end, keys drawn from the needles' with replacement;
accuracy on the recalled values. Trained at
64 tokens with 2 to 6 needles (cycling by step: sparse and dense hays); tested with 4 needles
at 64, 128, ..., 2048 tokens (the needles anywhere in the haystack). At 128 tokens and 4
needles from the start, the RoPE hybrid had learnt nothing after 1600 steps (that run was
stopped and not kept).

Models (hidden 64, 4 layers, 2 heads, about 0.25M parameters, the recall experiment's size):
    hybrid-rope   GGGA, the attention layer with RoPE (theta 10000)
    hybrid-nope   GGGA, the attention layer without positions (OLMo Hybrid's long-context
                  checkpoint); order reaches it through the GDN layers below
    gdn           GGGG: a fixed-size state, no attention
    transformer-rope, transformer-nope (not in the default run: at this budget the
                  transformer does not learn recall; see recall_and_state.py)
Same optimiser and budget for each (AdamW, lr 3e-3, batch 32, ``--steps``, one seed).

Writes ``experiments/results/long_context.json`` and ``experiments/long_context.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthetic_tasks as tasks  # noqa: E402
from small_scale import (TrainConfig, accuracy_panel, accuracy_run,  # noqa: E402
                         add_output_arguments, family_config, pyplot, report, resolve_outputs,
                         save)

HERE = Path(__file__).resolve().parent
MODELS = {
    "hybrid-rope": ("hybrid", 10000.0),
    "hybrid-nope": ("hybrid", None),
    "gdn": ("gdn", 10000.0),  # no attention layer: theta unused
    "transformer-rope": ("transformer", 10000.0),
    "transformer-nope": ("transformer", None),
}
TRAIN_LEN = 64
TEST_LENS = (64, 128, 256, 512, 1024, 2048)
SMOKE_LENS = TEST_LENS[:2]  # --smoke: two lengths, a few rows, one call of steps
SMOKE_ROWS, SMOKE_STEPS = 8, 10


def run(name: str, steps: int, seed: int, lengths: tuple[int, ...] = TEST_LENS,
        rows: int | None = None) -> dict:
    family, theta = MODELS[name]
    cfg = family_config(family, hidden=64, layers=4, heads=2, vocab=tasks.VOCAB,
                        rope_theta=theta)

    def batch_fn(step: int):
        return tasks.needles(np.random.default_rng((seed, step)), 32, TRAIN_LEN,
                             count=2 + step % 5)

    # Fewer rows at long lengths keep the attention scores' memory small (32 x 2 x 2048^2
    # float32 is 1 GB): 128 rows at 64 tokens, 32 (128 needles) from 256 on.
    tests = {n: tasks.needles(np.random.default_rng((10_000 + seed, n)),
                              rows or max(32, 8192 // n), n) for n in lengths}
    return accuracy_run(cfg, TrainConfig(steps=steps, lr=3e-3, warmup=30, seed=seed), batch_fn,
                        tests, evaluations=5, baseline=tasks.value_guess_baseline)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None,
                   help="default hybrid-rope,hybrid-nope,gdn; with --smoke hybrid-nope")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    add_output_arguments(p, HERE / "results" / "long_context.json", HERE / "long_context.png")
    p.add_argument("--plot-only", metavar="JSON[,JSON...]",
                   help="train nothing: plot the models of these result files together")
    args = p.parse_args(argv)
    resolve_outputs(args)
    args.models = args.models or ("hybrid-nope" if args.smoke else "hybrid-rope,hybrid-nope,gdn")
    if args.smoke:
        args.steps = SMOKE_STEPS
    lengths, rows = (SMOKE_LENS, SMOKE_ROWS) if args.smoke else (TEST_LENS, None)
    if args.plot_only:
        merged = {}
        for path in args.plot_only.split(","):
            for name, r in json.loads(Path(path).read_text())["results"].items():
                merged[name] = {**r, **{key: {int(k): v for k, v in r[key].items()}
                                        for key in ("accuracy", "baseline") if key in r}}
        plot(merged, Path(args.plot), steps=sorted({r["steps"] for r in merged.values()}))
        print(f"wrote {args.plot}")
        return
    names = args.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    start = time.perf_counter()
    results = {}
    for name in names:
        print(f"needles, {name}")
        results[name] = run(name, args.steps, args.seed, lengths, rows)
    minutes = (time.perf_counter() - start) / 60
    report(f"needle accuracy by length (trained at {TRAIN_LEN})", results, lengths)
    print(f"total {minutes:.1f} min")
    out = save(args.out, {"args": vars(args), "results": results, "minutes": minutes})
    plot(results, Path(args.plot), steps=[args.steps], lengths=lengths)
    print(f"wrote {out} and {args.plot}")


def plot(results: dict, path: Path, steps: list[int],
         lengths: tuple[int, ...] = TEST_LENS) -> None:
    fig, ax = pyplot().subplots(figsize=(6.0, 3.9), dpi=110)
    accuracy_panel(ax, results, lengths, baseline_label="guess a needle's value")
    ax.axvline(TRAIN_LEN, color="grey", lw=0.8, ls="--", label="training length")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle recall accuracy")
    ax.set_title(f"4 needles in a haystack: NoPE vs RoPE ({'/'.join(map(str, steps))} steps)")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
