"""Experiment 1, data efficiency: transformer vs 3:1 hybrid vs pure GDN at matched parameter
counts, same data, same token budget, several seeds.

    python experiments/data_efficiency.py                  # 3 families x 3 seeds, ~31 min on 2 CPU cores
    python experiments/data_efficiency.py --steps 20 --seeds 1   # a quick look
    python experiments/data_efficiency.py --smoke          # tiny, for CI; writes to a tmp dir

Data: the embedded corpus (tiny shakespeare) as UTF-8 bytes; the first 90% trains, the last
10% is held out. Each family has the ``bytes`` preset's shape (hidden 256, 4 layers, MLP 768,
about 3.55M parameters): AAAA, GGGA, GGGG. A seed fixes the initialisation and the order of
the training windows, which every family shares. The held-out loss (nats per byte, 32 fixed
windows of ``--seq-len``) is measured every ``--eval-every`` steps.

Writes ``experiments/results/data_efficiency.json`` and ``experiments/data_efficiency.png``
(held-out loss against tokens, mean and spread over seeds), and prints, for each family, the
final loss and the tokens it needs to reach the transformer's final held-out loss (linear
interpolation between evaluations of the seed-mean curve).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from small_scale import (  # noqa: E402
    FAMILIES,
    TrainConfig,
    add_output_arguments,
    evaluator,
    family_config,
    parameter_count,
    pyplot,
    resolve_outputs,
    save,
    train,
)

HERE = Path(__file__).resolve().parent


def corpus_bytes() -> np.ndarray:
    from hybrid_jax.corpus import corpus_path

    return np.frombuffer(corpus_path().read_bytes(), np.uint8).astype(np.int32)


def windows(data: np.ndarray, starts: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    rows = np.stack([data[s:s + seq_len + 1] for s in starts])
    return {"inputs": rows[:, :-1], "targets": rows[:, 1:],
            "mask": np.ones((len(starts), seq_len), np.float32)}


def tokens_to_reach(tokens: np.ndarray, losses: np.ndarray, target: float) -> float | None:
    """First token count at which the curve reaches ``target`` (linear between points)."""
    below = np.nonzero(losses <= target)[0]
    if not len(below):
        return None
    i = below[0]
    if i == 0:
        return float(tokens[0])
    t0, t1, l0, l1 = tokens[i - 1], tokens[i], losses[i - 1], losses[i]
    return float(t0 + (t1 - t0) * (l0 - target) / (l0 - l1))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--families", default=",".join(FAMILIES))
    add_output_arguments(p, HERE / "results" / "data_efficiency.json", HERE / "data_efficiency.png")
    args = p.parse_args(argv)
    resolve_outputs(args)
    if args.smoke:  # one call of two steps, two families (the transformer is the reference)
        args.steps = args.eval_every = args.batch = 2
        args.seq_len, args.seeds, args.families = 32, 1, "transformer,hybrid"

    data = corpus_bytes()
    split = int(0.9 * len(data))
    train_data, held_out = data[:split], data[split:]
    eval_rng = np.random.default_rng(12345)
    eval_batch = windows(held_out, eval_rng.integers(0, len(held_out) - args.seq_len - 1, 32),
                         args.seq_len)
    tokens_per_step = args.batch * args.seq_len
    families = args.families.split(",")
    runs: dict[str, list[dict]] = {f: [] for f in families}
    configs = {f: family_config(f, hidden=256, layers=4, heads=4, intermediate=768)
               for f in families}
    params = {f: parameter_count(c) for f, c in configs.items()}
    print("parameters:", params)
    start = time.perf_counter()
    for seed in range(args.seeds):
        def batch_fn(step: int, seed=seed) -> dict[str, np.ndarray]:
            rng = np.random.default_rng((seed, step))
            return windows(train_data, rng.integers(0, split - args.seq_len - 1, args.batch),
                           args.seq_len)

        for family in families:
            print(f"{family}, seed {seed}")
            tc = TrainConfig(steps=args.steps, lr=args.lr, warmup=20,
                             steps_per_call=args.eval_every, seed=seed)
            result = train(configs[family], tc, batch_fn,
                           evaluate=evaluator(configs[family], {"held_out": eval_batch}),
                           eval_every=args.eval_every)
            runs[family].append({
                "seed": seed, "seconds": result.seconds, "train_loss": result.losses.tolist(),
                "eval_steps": [s for s, _ in result.evals],
                "held_out_loss": [m["held_out_loss"] for _, m in result.evals]})
    elapsed = time.perf_counter() - start

    summary = {}
    curves = {f: np.mean([r["held_out_loss"] for r in runs[f]], axis=0) for f in families}
    tokens = np.asarray(runs[families[0]][0]["eval_steps"]) * tokens_per_step
    reference = curves["transformer"][-1] if "transformer" in curves else None
    print(f"\n{'family':12s} {'params':>10s} {'final held-out loss (seeds)':>36s} "
          f"{'tokens to transformer final':>28s}")
    for f in families:
        finals = [r["held_out_loss"][-1] for r in runs[f]]
        need = tokens_to_reach(tokens, curves[f], reference) if reference is not None else None
        summary[f] = {"params": params[f], "final_mean": float(np.mean(finals)),
                      "final_std": float(np.std(finals)), "finals": finals,
                      "tokens_to_transformer_final": need,
                      "fraction_of_budget": None if need is None else need / tokens[-1]}
        shown = "not reached" if need is None else f"{need / 1e6:.3f}M ({need / tokens[-1]:.0%})"
        print(f"{f:12s} {params[f]:10,d} {np.mean(finals):10.4f} +- {np.std(finals):.4f} "
              f"({', '.join(f'{x:.3f}' for x in finals)}) {shown:>20s}")
    print(f"total {elapsed / 60:.1f} min on {platform.processor() or platform.machine()}")

    out = save(args.out, {"args": vars(args), "tokens": tokens.tolist(), "runs": runs,
                          "summary": summary, "minutes": elapsed / 60})
    plot(tokens, runs, summary, Path(args.plot))
    print(f"wrote {out} and {args.plot}")


def plot(tokens: np.ndarray, runs: dict, summary: dict, path: Path) -> None:
    fig, ax = pyplot().subplots(figsize=(6.4, 4.2), dpi=110)
    for f, rs in runs.items():
        curves = np.asarray([r["held_out_loss"] for r in rs])
        mean = curves.mean(0)
        ax.plot(tokens / 1e6, mean, label=f"{f} ({summary[f]['params'] / 1e6:.2f}M params)")
        ax.fill_between(tokens / 1e6, curves.min(0), curves.max(0), alpha=0.2)
    if "transformer" in summary:
        ax.axhline(summary["transformer"]["final_mean"], color="grey", lw=0.8, ls="--",
                   label="transformer's final loss")
    ax.set_xlabel("training tokens (millions of bytes)")
    ax.set_ylabel("held-out loss (nats per byte)")
    ax.set_ylim(top=min(ax.get_ylim()[1], 3.0))
    ax.set_title(f"Data efficiency, tiny shakespeare, {len(next(iter(runs.values())))} seeds "
                 "(band: min-max)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
