"""Benchmark: the gated delta rule's three JAX forms against transformers' torch reference.

Times, in one run and on the same inputs, forward and forward+backward of
  - hybrid_jax.gdn.gated_delta_rule(method="recurrent" | "chunk" | "assoc_scan"), jitted;
  - transformers' ``torch_chunk_gated_delta_rule`` (the pure-torch fallback, torch CPU);
and prints each one's ratio to the torch reference plus the forward's achieved FLOP rate against
this machine's float32 matmul rate, measured in the same run.

    .venv/bin/python experiments/bench_gdn.py            # B=1, T=4096, H=8, Dk=Dv=128
    .venv/bin/python experiments/bench_gdn.py --T 1024 --repeats 3

FLOPs are those of the chunked algorithm (chunk C, per head and chunk): k k^T and q k^T
(2 C^2 Dk each), the triangular inverse (C^3 / 3), its products with beta*v and beta*k
(2 C^2 (Dv + Dk)), w S, q S and k^T v_new (2 C Dk Dv each) and the intra-chunk P v_new
(2 C^2 Dv). The same count is used for every method, so rates compare times, not algorithms.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax.ops import gated_delta_rule


def chunk_flops(b: int, t: int, h: int, dk: int, dv: int, c: int = 64) -> float:
    n = -(-t // c)
    per_chunk = 2 * c * c * dk * 2 + c**3 / 3 + 2 * c * c * (dk + dv) + 3 * 2 * c * dk * dv + 2 * c * c * dv
    return float(b * h * n * per_chunk)


def timeit(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` after one warm-up call (which also compiles)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_rate(n: int = 2048, repeats: int = 5) -> float:
    """float32 FLOP/s of one large jitted matmul: this machine's practical peak."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    return 2 * n**3 / timeit(lambda: f(a, b).block_until_ready(), repeats)


def make_inputs(b, t, h, dk, dv, hk=None, seed=0):
    rng = np.random.default_rng(seed)
    f32 = np.float32
    hk = h if hk is None else hk
    return dict(
        q=rng.standard_normal((b, t, hk, dk)).astype(f32),
        k=rng.standard_normal((b, t, hk, dk)).astype(f32),
        v=rng.standard_normal((b, t, h, dv)).astype(f32),
        # OLMo Hybrid-like decays: -exp(A_log) * softplus(.) with small dt.
        g=-rng.uniform(0.005, 0.2, (b, t, h)).astype(f32),
        beta=rng.uniform(0.0, 2.0, (b, t, h)).astype(f32),
    )


def _rule(method: str, chunk_size: int):
    """gated_delta_rule for a method name; "chunk_in_scan" / "chunk_batched" force where the
    chunk form computes its per-chunk factors (it picks by backend otherwise)."""
    rule = functools.partial(gated_delta_rule, use_qk_l2norm=True, chunk_size=chunk_size)
    if method not in ("chunk_in_scan", "chunk_batched"):
        return functools.partial(rule, method=method)
    dispatch = importlib.import_module("hybrid_jax.gdn.rule")

    def forced(*args):
        original = dispatch.gdn_chunk  # patched only while tracing
        dispatch.gdn_chunk = functools.partial(original, factors_in_scan=method == "chunk_in_scan")
        try:
            return rule(*args, method="chunk")
        finally:
            dispatch.gdn_chunk = original

    return forced


def jax_timers(method: str, x: dict, chunk_size: int, repeats: int):
    args = [jnp.asarray(x[n]) for n in ("q", "k", "v", "g", "beta")]
    rule = _rule(method, chunk_size)
    fwd = jax.jit(lambda *a: rule(*a)[0])
    do = jnp.asarray(np.random.default_rng(1).standard_normal(x["v"].shape).astype(np.float32))
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(rule(*a)[0] * do), argnums=range(5)))
    t_fwd = timeit(lambda: fwd(*args).block_until_ready(), repeats)
    t_bwd = timeit(lambda: jax.block_until_ready(grad(*args)), repeats)
    return t_fwd, t_bwd


def torch_timers(x: dict, chunk_size: int, repeats: int):
    import torch
    from transformers.models.olmo_hybrid.modeling_olmo_hybrid import torch_chunk_gated_delta_rule

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    args = [torch.from_numpy(x[n]).to(device) for n in ("q", "k", "v", "g", "beta")]
    do = torch.from_numpy(np.random.default_rng(1).standard_normal(x["v"].shape).astype(np.float32)).to(device)
    rule = functools.partial(torch_chunk_gated_delta_rule, chunk_size=chunk_size, use_qk_l2norm_in_kernel=True)

    def fwd():
        with torch.no_grad():
            rule(*args)
        sync()

    def fwd_bwd():
        leaves = [a.clone().requires_grad_(True) for a in args]
        (rule(*leaves)[0] * do).sum().backward()
        sync()

    return timeit(fwd, repeats), timeit(fwd_bwd, repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--T", default="4096", help="sequence length(s), comma separated")
    p.add_argument("--H", type=int, default=8, help="value heads")
    p.add_argument("--Hk", type=int, default=None, help="key heads (default: H)")
    p.add_argument("--Dk", type=int, default=128)
    p.add_argument("--Dv", type=int, default=128)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--methods", default="recurrent,chunk,assoc_scan",
                   help="any of recurrent, chunk, assoc_scan, chunk_in_scan, chunk_batched")
    p.add_argument("--no-torch", action="store_true", help="skip the transformers reference")
    args = p.parse_args()

    import logging
    logging.getLogger("transformers").setLevel(logging.ERROR)
    peak = matmul_rate()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}; "
          f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    print(f"float32 matmul rate (2048^3, jax): {peak / 1e9:.1f} GFLOP/s")
    for t in (int(s) for s in args.T.split(",")):
        bench_one(args, t, peak)


def bench_one(args: argparse.Namespace, t: int, peak: float) -> None:
    x = make_inputs(args.B, t, args.H, args.Dk, args.Dv, hk=args.Hk)
    flops = chunk_flops(args.B, t, args.H, args.Dk, args.Dv, args.chunk_size)
    print(f"\nshape: B={args.B} T={t} Hk={args.Hk or args.H} Hv={args.H} Dk={args.Dk} Dv={args.Dv} "
          f"chunk={args.chunk_size}, q/k L2 norm, float32; chunked-algorithm forward "
          f"{flops / 1e9:.2f} GFLOP")
    rows = {}
    if not args.no_torch:
        rows["torch reference"] = torch_timers(x, args.chunk_size, args.repeats)
    for method in args.methods.split(","):
        rows[method] = jax_timers(method, x, args.chunk_size, args.repeats)

    ref = rows.get("torch reference")
    print(f"{'method':<18}{'fwd ms':>10}{'fwd+bwd ms':>12}{'fwd x torch':>13}{'f+b x torch':>13}"
          f"{'fwd GFLOP/s':>13}{'% matmul':>10}")
    for name, (tf, tb) in rows.items():
        rate = flops / tf
        sf = f"{ref[0] / tf:.2f}x" if ref else "-"
        sb = f"{ref[1] / tb:.2f}x" if ref else "-"
        print(f"{name:<18}{tf * 1e3:>10.3f}{tb * 1e3:>12.3f}{sf:>13}{sb:>13}"
              f"{rate / 1e9:>13.1f}{100 * rate / peak:>9.1f}%", flush=True)


if __name__ == "__main__":
    main()
