"""The chunked LM-head loss against the loss over full logits, measured in the same run: time of
the loss and its gradient (hidden states and head kernel) and XLA's temporary memory, as T
grows.

    python experiments/bench_loss.py [--T 2048,4096,8192] [--D 512] [--V 100352] [--chunk 1024]

One row of T positions, hidden size D, vocabulary V (OLMo's 100,352 by default), float32
(``--dtype bfloat16`` for bf16 products), z-loss 1e-4; best of ``--repeats`` timed calls of the
jitted value-and-gradient (compilation excluded). "full" is autodiff of
``train.loss.lm_loss_sums`` over ``hidden @ head``; "chunked" is ``ops.lm_head_loss`` with
``--chunk`` positions at a time. Memory is ``compiled.memory_analysis().temp_size_in_bytes``.
Prints a markdown table with the ratios full / chunked.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from hybrid_jax.aot.topology import quiet_libtpu_environment  # noqa: E402

quiet_libtpu_environment()  # the tpu extra's libtpu, if installed, stays quiet

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from hybrid_jax.ops.lm_head_loss import lm_head_loss_sums  # noqa: E402
from hybrid_jax.train.loss import lm_loss_sums  # noqa: E402

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


def measure(loss, h, w, repeats: int) -> tuple[float, int, float]:
    """(best seconds, temporary bytes, loss value) of value_and_grad wrt hidden and head."""
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    compiled = fn.lower(h, w).compile()
    value, _ = jax.block_until_ready(compiled(h, w))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(h, w))
        times.append(time.perf_counter() - start)
    return min(times), compiled.memory_analysis().temp_size_in_bytes, float(value)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", default="2048,4096,8192")
    p.add_argument("--D", type=int, default=512)
    p.add_argument("--V", type=int, default=100352)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    dtype = jnp.dtype(args.dtype)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__}, {jax.devices()[0].platform}; D={args.D}, V={args.V}, "
          f"{args.dtype} products, chunks of {args.chunk}")
    print("| T | full ms | chunked ms | speed ratio | full temp MiB | chunked temp MiB "
          "| memory ratio | loss rel. diff |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(args.D, args.V)) * args.D ** -0.5, jnp.float32)
    for t in (int(x) for x in args.T.split(",")):
        h = jnp.asarray(rng.normal(size=(1, t, args.D)), jnp.float32)
        targets = jnp.asarray(rng.integers(0, args.V, (1, t)), jnp.int32)
        mask = jnp.ones((1, t), jnp.float32)
        full = measure(_loss("full", args.chunk, dtype, targets, mask), h, w, args.repeats)
        chunked = measure(_loss("chunked", args.chunk, dtype, targets, mask), h, w,
                          args.repeats)
        mib = lambda n: n / 2 ** 20
        print(f"| {t} | {1e3 * full[0]:.1f} | {1e3 * chunked[0]:.1f} | "
              f"{full[0] / chunked[0]:.2f}x | {mib(full[1]):.0f} | {mib(chunked[1]):.0f} | "
              f"{full[1] / chunked[1]:.1f}x | {abs(chunked[2] - full[2]) / abs(full[2]):.1e} |",
              flush=True)


if __name__ == "__main__":
    main()
