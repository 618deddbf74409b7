"""The chunked LM-head loss against the loss over full logits, measured in the same run: time of
the loss and its gradient (hidden states and head kernel) and XLA's temporary memory, as T
grows.

    python experiments/bench_loss.py [--T 2048,4096,8192] [--D 512] [--V 100352] [--chunk 1024]

One row of T positions, hidden size D, vocabulary V (OLMo's 100,352 by default), float32
(``--dtype bfloat16`` for bf16 products), z-loss 1e-4; the jitted value-and-gradient
(compilation excluded), each form in its own process, the two alternated over ``--rounds``
rounds of ``--runs`` calls (experiments/isolated_timing.py): median and min of each, the ratio
of medians. "full" is autodiff of ``train.loss.lm_loss_sums`` over ``hidden @ head``; "chunked"
is ``ops.lm_head_loss`` with ``--chunk`` positions at a time. Memory is ``compiled.memory_analysis().temp_size_in_bytes``.
Prints a markdown table with the ratios full / chunked.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from hybrid_jax.aot.topology import quiet_libtpu_environment  # noqa: E402

quiet_libtpu_environment()  # the tpu extra's libtpu, if installed, stays quiet

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from hybrid_jax.ops.lm_head_loss import lm_head_loss_sums  # noqa: E402
from hybrid_jax.train.loss import lm_loss_sums  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import isolated_timing  # noqa: E402

Z = 1e-4


def _loss(form: str, chunk: int, dtype, targets, mask):
    if form == "full":
        def loss(h, w):
            logits = jnp.dot(h.astype(dtype), w.astype(dtype)).astype(jnp.float32)
            sums = lm_loss_sums(logits, targets, mask, Z)
            return sums["ce"] + sums["z"]
    else:
        def loss(h, w):
            return lm_head_loss_sums(h, w, targets, mask, compute_dtype=dtype, z_loss_weight=Z,
                                     chunk_size=chunk)["loss"]
    return loss


def loss_contender(form: str, t: int, d: int, v: int, chunk: int,
                   dtype: str) -> tuple[Callable[[], None], dict]:
    """The compiled value-and-gradient wrt hidden states and head of one loss form, its XLA
    temporary bytes and its loss value."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(d, v)) * d ** -0.5, jnp.float32)
    h = jnp.asarray(rng.normal(size=(1, t, d)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (1, t)), jnp.int32)
    mask = jnp.ones((1, t), jnp.float32)
    loss = _loss(form, chunk, jnp.dtype(dtype), targets, mask)
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(h, w).compile()
    value, _ = jax.block_until_ready(compiled(h, w))
    info = {"temp_bytes": compiled.memory_analysis().temp_size_in_bytes, "loss": float(value)}
    return (lambda: jax.block_until_ready(compiled(h, w))), info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", default="2048,4096,8192")
    p.add_argument("--D", type=int, default=512)
    p.add_argument("--V", type=int, default=100352)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    isolated_timing.add_arguments(p, rounds=3, runs=3)
    args = p.parse_args()
    print(isolated_timing.machine_header())
    print(f"# D={args.D}, V={args.V}, {args.dtype} products, chunks of {args.chunk}; "
          + isolated_timing.describe(args.rounds, args.runs, args.settle))
    print("| T | full ms (median) | full ms (min) | chunked ms (median) | chunked ms (min) "
          "| speed ratio | runs | full temp MiB | chunked temp MiB | memory ratio "
          "| loss rel. diff |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t in (int(x) for x in args.T.split(",")):
        shape = dict(t=t, d=args.D, v=args.V, chunk=args.chunk, dtype=args.dtype)
        res = isolated_timing.compare(
            [isolated_timing.Contender(f, __file__, "loss_contender", dict(form=f, **shape))
             for f in ("full", "chunked")], **isolated_timing.options(args))
        full, chunked = res["full", "call"], res["chunked", "call"]
        fb, cb = full.info["temp_bytes"], chunked.info["temp_bytes"]
        fl, cl = full.info["loss"], chunked.info["loss"]
        print(f"| {t} | {1e3 * full.median:.1f} | {1e3 * full.min:.1f} | "
              f"{1e3 * chunked.median:.1f} | {1e3 * chunked.min:.1f} | "
              f"{isolated_timing.ratio(full, chunked):.2f}x | {full.runs} | {fb / 2 ** 20:.0f} | "
              f"{cb / 2 ** 20:.0f} | {fb / cb:.1f}x | {abs(cl - fl) / abs(fl):.1e} |", flush=True)


if __name__ == "__main__":
    main()
