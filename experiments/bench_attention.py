"""Blockwise (flash) attention against the dense form, measured in the same run: time of
forward + backward and XLA's temporary memory for the gradient, as T grows.

    python experiments/bench_attention.py [--T 1024,2048,4096,8192] [--H 8] [--D 128]

One row of T tokens, H query heads sharing ``--Hkv`` key/value heads of D dims, float32,
causal, no segments; best of ``--repeats`` timed calls of the jitted gradient (compilation
excluded). Memory is ``compiled.memory_analysis().temp_size_in_bytes``: what XLA allocates
beyond arguments and outputs. Prints a markdown table with the ratios dense / blockwise.
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

from hybrid_jax.ops.attention import causal_attention  # noqa: E402
from hybrid_jax.ops.blockwise_attention import DEFAULT_BLOCK  # noqa: E402


def measure(method: str, block: int, q, k, v, repeats: int) -> tuple[float, int]:
    """(best seconds, temporary bytes) of the gradient of sum(attention^2) wrt q, k, v."""
    attend = lambda q, k, v: causal_attention(q, k, v, implementation=method, block_size=block)
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) ** 2), argnums=(0, 1, 2)))
    compiled = grad.lower(q, k, v).compile()
    jax.block_until_ready(compiled(q, k, v))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v))
        times.append(time.perf_counter() - start)
    return min(times), compiled.memory_analysis().temp_size_in_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", default="1024,2048,4096,8192")
    p.add_argument("--H", type=int, default=8)
    p.add_argument("--Hkv", type=int, default=8)
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--block", type=int, default=DEFAULT_BLOCK,
                   help="the blockwise form's block rows")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__}, {jax.devices()[0].platform}; H={args.H}, Hkv={args.Hkv}, "
          f"D={args.D}, float32, block {args.block}")
    print("| T | dense fwd+bwd ms | blockwise fwd+bwd ms | speed ratio | dense temp MiB "
          "| blockwise temp MiB | memory ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for t in (int(x) for x in args.T.split(",")):
        q, k, v = (jnp.asarray(rng.standard_normal((1, t, h, args.D)), jnp.float32)
                   for h in (args.H, args.Hkv, args.Hkv))
        dense_s, dense_b = measure("dense", args.block, q, k, v, args.repeats)
        block_s, block_b = measure("blockwise", args.block, q, k, v, args.repeats)
        print(f"| {t} | {1e3 * dense_s:.1f} | {1e3 * block_s:.1f} | {dense_s / block_s:.2f}x "
              f"| {dense_b / 2 ** 20:.0f} | {block_b / 2 ** 20:.1f} | {dense_b / block_b:.0f}x |",
              flush=True)


if __name__ == "__main__":
    main()
