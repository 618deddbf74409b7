"""Blockwise (flash) attention against the dense form, measured in the same run: time of
forward + backward and XLA's temporary memory for the gradient, as T grows.

    python experiments/bench_attention.py [--T 1024,2048,4096,8192] [--H 8] [--D 128]

One row of T tokens, H query heads sharing ``--Hkv`` key/value heads of D dims, float32,
causal, no segments; the jitted gradient (compilation excluded), each form in its own process,
the two alternated over ``--rounds`` rounds of ``--runs`` calls (experiments/isolated_timing.py):
median and min of each, the ratio of medians. Memory is
``compiled.memory_analysis().temp_size_in_bytes``: what XLA allocates beyond arguments and
outputs. Prints a markdown table with the ratios dense / blockwise.
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

from hybrid_jax.ops.attention import causal_attention  # noqa: E402
from hybrid_jax.ops.blockwise_attention import DEFAULT_BLOCK  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import isolated_timing  # noqa: E402


def attention_contender(method: str, block: int, t: int, h: int, hkv: int,
                        d: int) -> tuple[Callable[[], None], dict]:
    """The compiled gradient of sum(attention^2) wrt q, k, v in one form, and its XLA
    temporary bytes."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, t, n, d)), jnp.float32) for n in (h, hkv, hkv))
    attend = lambda q, k, v: causal_attention(q, k, v, implementation=method, block_size=block)
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) ** 2), argnums=(0, 1, 2)))
    compiled = grad.lower(q, k, v).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    return (lambda: jax.block_until_ready(compiled(q, k, v))), {"temp_bytes": temp}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", default="1024,2048,4096,8192")
    p.add_argument("--H", type=int, default=8)
    p.add_argument("--Hkv", type=int, default=8)
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--block", type=int, default=DEFAULT_BLOCK,
                   help="the blockwise form's block rows")
    isolated_timing.add_arguments(p, rounds=3, runs=3)
    args = p.parse_args()
    print(isolated_timing.machine_header())
    print(f"# H={args.H}, Hkv={args.Hkv}, D={args.D}, float32, block {args.block}; "
          + isolated_timing.describe(args.rounds, args.runs, args.settle))
    print("| T | dense ms (median) | dense ms (min) | blockwise ms (median) | blockwise ms (min) "
          "| speed ratio | runs | dense temp MiB | blockwise temp MiB | memory ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t in (int(x) for x in args.T.split(",")):
        shape = dict(block=args.block, t=t, h=args.H, hkv=args.Hkv, d=args.D)
        res = isolated_timing.compare(
            [isolated_timing.Contender(m, __file__, "attention_contender", dict(method=m, **shape))
             for m in ("dense", "blockwise")], **isolated_timing.options(args))
        dense, block = res["dense", "call"], res["blockwise", "call"]
        db, bb = dense.info["temp_bytes"], block.info["temp_bytes"]
        print(f"| {t} | {1e3 * dense.median:.1f} | {1e3 * dense.min:.1f} | "
              f"{1e3 * block.median:.1f} | {1e3 * block.min:.1f} | "
              f"{isolated_timing.ratio(dense, block):.2f}x | {dense.runs} | {db / 2 ** 20:.0f} | "
              f"{bb / 2 ** 20:.1f} | {db / bb:.0f}x |", flush=True)


if __name__ == "__main__":
    main()
