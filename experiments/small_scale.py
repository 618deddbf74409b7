"""What the small-scale experiments share: three model families at matched parameter counts,
and one trainer for any (inputs, targets, loss mask) task.

    transformer   every layer full attention (OLMo 3's post-norm attention block)
    hybrid        OLMo Hybrid's pattern: 3 Gated DeltaNet layers, then 1 attention layer
    gdn           every layer Gated DeltaNet

The families differ only in ``layer_types``. A GDN layer's projections (q and k to half the
hidden width, v, the output gate and the output to the full width) hold as many weights as an
attention layer's four; its short convolutions, gates and norms are the difference: 0.4%
between families at hidden 256 (3.5M parameters), 1.1% at hidden 64 (0.25M).

The trainer is the library's AdamW (``hybrid_jax.train.make_optimizer``) on the library's model
(``model_template``), with a cross-entropy over the positions a task marks, several steps per
jitted call (``lax.scan``), and the batch a pure function of (seed, step).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hybrid_jax.config import ATTENTION, GDN, ModelConfig, hybrid_layer_types, olmo_hybrid_tiny
from hybrid_jax.train import (
    OptimizerConfig,
    init_train_state,
    make_optimizer,
    model_template,
    scan_steps,
)
from hybrid_jax.train.loss import lm_loss_sums

FAMILIES = ("transformer", "hybrid", "gdn")
Batch = dict[str, np.ndarray]  # "inputs", "targets" [B, T] int32; "mask" [B, T] float32


def family_config(family: str, *, hidden: int, layers: int = 4, heads: int = 4,
                  vocab: int = 256, intermediate: int | None = None,
                  rope_theta: float | None = 10000.0, **overrides) -> ModelConfig:
    """A ``ModelConfig`` of ``family`` whose GDN layers match its attention layers in weights:
    ``heads`` attention heads of hidden / heads; as many GDN key and value heads, keys of
    half that width, values of its full width. ``rope_theta=None``: NoPE attention."""
    if family not in FAMILIES:
        raise ValueError(f"family {family!r} is not one of {FAMILIES}")
    if hidden % (2 * heads):
        raise ValueError(f"hidden {hidden} must be a multiple of 2 x heads ({2 * heads})")
    kinds = {"transformer": (ATTENTION,) * layers, "gdn": (GDN,) * layers,
             "hybrid": hybrid_layer_types(layers)}[family]
    head = hidden // heads
    return olmo_hybrid_tiny(**{
        "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
        "intermediate_size": intermediate or 3 * hidden, "layer_types": kinds,
        "num_attention_heads": heads, "num_key_value_heads": heads,
        "linear_num_key_heads": heads, "linear_num_value_heads": heads,
        "linear_key_head_dim": head // 2, "linear_value_head_dim": head,
        "rope_theta": rope_theta,
        # Unrolled: XLA:CPU runs an unrolled backward faster than a scan over layers, and the
        # three families then compile alike.
        "scan_layers": False, **overrides})


def parameter_count(cfg: ModelConfig) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model_template(cfg).abstract))


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser and loop settings; the batch size is whatever ``batch_fn`` returns."""

    steps: int
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.1
    steps_per_call: int = 10
    seed: int = 0


@dataclass
class TrainResult:
    params: dict
    losses: np.ndarray  # [steps] training loss of each step
    evals: list  # (step, metrics) from ``evaluate`` every ``eval_every`` steps
    seconds: float  # training time, compiles included


def masked_loss(cfg: ModelConfig):
    """``loss(params, batch) -> (mean CE over marked positions, accuracy there)``."""
    template = model_template(cfg)

    def loss(params, batch):
        logits = template.model(params)(batch["inputs"])
        sums = lm_loss_sums(logits, batch["targets"], batch["mask"])
        n = jnp.maximum(sums["tokens"], 1.0)
        hit = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32) * batch["mask"]
        return sums["ce"] / n, jnp.sum(hit) / n

    return loss


def train(cfg: ModelConfig, tc: TrainConfig, batch_fn: Callable[[int], Batch], *,
          evaluate: Callable[[dict], dict] | None = None, eval_every: int = 0,
          log: Callable[[str], None] | None = print) -> TrainResult:
    """Train ``cfg`` from seed ``tc.seed`` on ``batch_fn(step)`` for ``tc.steps`` steps
    (AdamW, linear warmup then cosine to 10%, clipping at 1.0); ``evaluate(params)`` at step 0,
    every ``eval_every`` steps and at the end."""
    opt = make_optimizer(OptimizerConfig(lr=tc.lr, warmup_steps=min(tc.warmup, tc.steps),
                                         total_steps=tc.steps, weight_decay=tc.weight_decay))
    state = init_train_state(cfg, opt, seed=tc.seed)
    params, opt_state = state.params, state.opt_state
    loss_fn = masked_loss(cfg)

    def one_step(carry, batch):
        params, opt_state = carry
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    steps_fn = jax.jit(scan_steps(one_step), donate_argnums=0)  # K steps per call

    k = tc.steps_per_call
    if eval_every and eval_every % k:
        raise ValueError(f"eval_every {eval_every} must be a multiple of steps_per_call {k}")
    evals, losses = [], []
    start = time.perf_counter()
    if evaluate is not None:
        evals.append((0, evaluate(params)))
    for first in range(0, tc.steps, k):
        n = min(k, tc.steps - first)
        batches = [batch_fn(first + i) for i in range(n)]
        stacked = {key: np.stack([b[key] for b in batches]) for key in batches[0]}
        (params, opt_state), loss = steps_fn((params, opt_state), stacked)
        losses.extend(np.asarray(loss).tolist())
        done = first + n
        if evaluate is not None and (done == tc.steps or (eval_every and done % eval_every == 0)):
            evals.append((done, evaluate(params)))
            if log:
                shown = ", ".join(f"{key} {v:.4g}" for key, v in evals[-1][1].items()
                                  if np.ndim(v) == 0)
                log(f"  step {done:5d}  loss {losses[-1]:.4f}  {shown}  "
                    f"({time.perf_counter() - start:.0f} s)")
    return TrainResult(params, np.asarray(losses), evals, time.perf_counter() - start)


def evaluator(cfg: ModelConfig, batches: dict[str, Batch]):
    """``evaluate(params) -> {name: accuracy, name + "_loss": loss}`` over fixed batches (one
    jitted loss per batch shape)."""
    loss_fn = jax.jit(masked_loss(cfg))

    def evaluate(params) -> dict:
        out = {}
        for name, b in batches.items():
            loss, acc = loss_fn(params, b)
            out[name], out[name + "_loss"] = float(acc), float(loss)
        return out

    return evaluate


def accuracy_run(cfg: ModelConfig, tc: TrainConfig, batch_fn: Callable[[int], Batch],
                 tests: dict[int, Batch], evaluations: int = 10,
                 baseline: Callable[[Batch], float] | None = None) -> dict:
    """Train, scoring ``tests`` (batches keyed by the length or size they test) about
    ``evaluations`` times; the final accuracies, the curve, the size and the time, and with
    ``baseline`` its accuracy on each test batch (a model-free guesser's)."""
    every = max(tc.steps // evaluations, tc.steps_per_call) // tc.steps_per_call * tc.steps_per_call
    r = train(cfg, tc, batch_fn, evaluate=evaluator(cfg, {str(x): b for x, b in tests.items()}),
              eval_every=every)
    final = r.evals[-1][1]
    out = {"params": parameter_count(cfg), "seconds": r.seconds, "steps": tc.steps,
           "accuracy": {x: final[str(x)] for x in tests}, "curve": r.evals}
    if baseline is not None:
        out["baseline"] = {x: baseline(b) for x, b in tests.items()}
    return out


def _baseline(results: dict[str, dict]) -> dict | None:
    """The baseline the runs share (each run's test batches are the same), if they have one."""
    return next(iter(results.values())).get("baseline")


def report(title: str, results: dict[str, dict], xs: tuple[int, ...]) -> None:
    """Print ``accuracy_run`` results as a table: a row per model, a column per x, and the
    baseline's row where the runs have one."""
    print(f"\n{title}")
    print(f"{'model':18s}" + "".join(f"{x:>8d}" for x in xs) + "   params  minutes")
    for name, r in results.items():
        print(f"{name:18s}" + "".join(f"{r['accuracy'][x]:8.3f}" for x in xs)
              + f"  {r['params']:,d}  {r['seconds'] / 60:.1f}")
    base = _baseline(results)
    if base:
        print(f"{'(baseline)':18s}" + "".join(f"{base[x]:8.3f}" for x in xs))


def save(path: str | Path, record: dict) -> Path:
    """Write ``record`` as JSON at ``path`` (directories made as needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    return path


def add_output_arguments(p: argparse.ArgumentParser, out: Path, plot: Path) -> None:
    """--out, --plot and --smoke: the committed results' paths by default; a smoke run (tiny
    sizes, a few steps, for CI) writes into a fresh temporary folder unless told otherwise, so
    it never overwrites the committed results or plots."""
    p.add_argument("--out", default=None, help=f"results JSON (default {out})")
    p.add_argument("--plot", default=None, help=f"plot PNG (default {plot})")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes and a few steps, outputs in a temporary folder (for CI)")
    p.set_defaults(_default_out=out, _default_plot=plot)


def resolve_outputs(args: argparse.Namespace) -> None:
    """Fill in --out and --plot as ``add_output_arguments`` describes."""
    folder = Path(tempfile.mkdtemp(prefix="smoke_")) if args.smoke else None
    out, plot = args._default_out, args._default_plot
    args.out = args.out or str(folder / out.name if folder else out)
    args.plot = args.plot or str(folder / plot.name if folder else plot)
    del args._default_out, args._default_plot


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_panel(ax, results: dict[str, dict], xs: tuple[int, ...],
                   baseline_label: str = "") -> None:
    """One line per model of ``accuracy_run`` results against ``xs`` (log 2 axis), and the
    baseline's, dotted, where the runs have one."""
    for name, r in results.items():
        ax.plot(xs, [r["accuracy"][x] for x in xs], marker="o", label=name)
    base = _baseline(results)
    if base:
        ax.plot(xs, [base[x] for x in xs], color="grey", lw=0.8, ls=":", label=baseline_label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
