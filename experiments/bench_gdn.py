"""Benchmark: the gated delta rule's three JAX forms against transformers' torch reference.

Times, in one run and on the same inputs, forward and forward+backward of
  - hybrid_jax.gdn.gated_delta_rule(method="recurrent" | "chunk" | "assoc_scan"), jitted;
  - transformers' ``torch_chunk_gated_delta_rule`` (the pure-torch fallback, torch CPU);
and prints each one's ratio to the torch reference plus the forward's achieved FLOP rate against
this machine's float32 matmul rate, measured in the same run. Each contender runs in its own
process, the processes alternated over ``--rounds`` rounds of ``--runs`` calls
(experiments/isolated_timing.py), so that one cannot slow the next down.

    .venv/bin/python experiments/bench_gdn.py            # B=1, T=4096, H=8, Dk=Dv=128
    .venv/bin/python experiments/bench_gdn.py --T 1024 --rounds 2 --runs 3

FLOPs are those of the chunked algorithm (chunk C, per head and chunk): k k^T and q k^T
(2 C^2 Dk each), the triangular inverse (C^3 / 3), its products with beta*v and beta*k
(2 C^2 (Dv + Dk)), w S, q S and k^T v_new (2 C Dk Dv each) and the intra-chunk P v_new
(2 C^2 Dv). The same count is used for every method, so rates compare times, not algorithms.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax.ops import gated_delta_rule

sys.path.insert(0, str(Path(__file__).resolve().parent))
import isolated_timing  # noqa: E402


def chunk_flops(b: int, t: int, h: int, dk: int, dv: int, c: int = 64) -> float:
    n = -(-t // c)
    per_chunk = 2 * c * c * dk * 2 + c**3 / 3 + 2 * c * c * (dk + dv) + 3 * 2 * c * dk * dv + 2 * c * c * dv
    return float(b * h * n * per_chunk)


def matmul_contender(n: int = 2048) -> Callable[[], None]:
    """One large jitted float32 matmul: the machine's practical peak, 2 n^3 FLOPs a call."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    return lambda: f(a, b).block_until_ready()


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


def jax_contender(method: str, shape: dict, chunk_size: int) -> dict[str, Callable[[], None]]:
    """The jitted forward and gradient of one JAX form, on ``make_inputs(**shape)``."""
    x = make_inputs(**shape)
    args = [jnp.asarray(x[n]) for n in ("q", "k", "v", "g", "beta")]
    rule = _rule(method, chunk_size)
    fwd = jax.jit(lambda *a: rule(*a)[0])
    do = jnp.asarray(np.random.default_rng(1).standard_normal(x["v"].shape).astype(np.float32))
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(rule(*a)[0] * do), argnums=range(5)))
    return {"fwd": lambda: fwd(*args).block_until_ready(),
            "fwd+bwd": lambda: jax.block_until_ready(grad(*args))}


def torch_contender(shape: dict, chunk_size: int) -> dict[str, Callable[[], None]]:
    """transformers' ``torch_chunk_gated_delta_rule``, forward and forward+backward."""
    import logging

    import torch
    from transformers.models.olmo_hybrid.modeling_olmo_hybrid import torch_chunk_gated_delta_rule

    logging.getLogger("transformers").setLevel(logging.ERROR)
    x = make_inputs(**shape)
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

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--T", default="4096", help="sequence length(s), comma separated")
    p.add_argument("--H", type=int, default=8, help="value heads")
    p.add_argument("--Hk", type=int, default=None, help="key heads (default: H)")
    p.add_argument("--Dk", type=int, default=128)
    p.add_argument("--Dv", type=int, default=128)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--matmul-n", type=int, default=2048, help="size of the peak-rate matmul")
    isolated_timing.add_arguments(p, rounds=3, runs=3)
    p.add_argument("--methods", default="recurrent,chunk,assoc_scan",
                   help="any of recurrent, chunk, assoc_scan, chunk_in_scan, chunk_batched")
    p.add_argument("--no-torch", action="store_true", help="skip the transformers reference")
    args = p.parse_args()

    print(isolated_timing.machine_header())
    n = args.matmul_n
    mm = isolated_timing.measure_alone(
        isolated_timing.Contender("matmul", __file__, "matmul_contender", {"n": n}),
        runs=args.runs * args.rounds)["call"]
    peak = 2 * n**3 / mm.median
    print(f"float32 matmul rate ({n}^3, jax, own process): {peak / 1e9:.1f} GFLOP/s "
          f"(median of {mm.runs}; best {2 * n**3 / mm.min / 1e9:.1f})", flush=True)
    for t in (int(s) for s in args.T.split(",")):
        bench_one(args, t, peak)


def contenders(args: argparse.Namespace, t: int) -> list[isolated_timing.Contender]:
    """The torch reference (unless --no-torch) and each of --methods, on one shape."""
    shape = dict(b=args.B, t=t, h=args.H, dk=args.Dk, dv=args.Dv, hk=args.Hk)
    c = isolated_timing.Contender
    out = [] if args.no_torch else [
        c("torch reference", __file__, "torch_contender", dict(shape=shape, chunk_size=args.chunk_size))]
    return out + [c(m, __file__, "jax_contender", dict(method=m, shape=shape, chunk_size=args.chunk_size))
                  for m in args.methods.split(",")]


def bench_one(args: argparse.Namespace, t: int, peak: float) -> None:
    flops = chunk_flops(args.B, t, args.H, args.Dk, args.Dv, args.chunk_size)
    print(f"\nshape: B={args.B} T={t} Hk={args.Hk or args.H} Hv={args.H} Dk={args.Dk} Dv={args.Dv} "
          f"chunk={args.chunk_size}, q/k L2 norm, float32; chunked-algorithm forward "
          f"{flops / 1e9:.2f} GFLOP", flush=True)
    res = isolated_timing.compare(contenders(args, t), **isolated_timing.options(args))
    names = list(dict.fromkeys(name for name, _ in res))
    ref = "torch reference" if "torch reference" in names else None
    print("| method | fwd ms (median) | fwd ms (min) | fwd+bwd ms (median) | fwd+bwd ms (min) "
          "| fwd vs torch | fwd+bwd vs torch | fwd GFLOP/s | % of matmul rate |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in names:
        f, b = res[name, "fwd"], res[name, "fwd+bwd"]
        vs = lambda task: f"{isolated_timing.ratio(res[ref, task], res[name, task]):.2f}x" if ref else "-"
        rate = flops / f.median
        print(f"| {name} | {f.median * 1e3:.1f} | {f.min * 1e3:.1f} | {b.median * 1e3:.1f} | "
              f"{b.min * 1e3:.1f} | {vs('fwd')} | {vs('fwd+bwd')} | {rate / 1e9:.1f} | "
              f"{100 * rate / peak:.1f}% |")
    runs = res[names[0], "fwd"].runs
    print(f"({runs} runs each: " + isolated_timing.describe(args.rounds, args.runs, args.settle)
          + ")", flush=True)


if __name__ == "__main__":
    main()
