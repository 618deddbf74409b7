"""Benchmark: the Pallas gated delta rule against XLA's chunk form and flash-linear-attention's
Triton kernel, forward and forward+backward, on one accelerator, in one run.

    python experiments/bench_kernels_gpu.py                 # the issue's three shapes, bf16
    python experiments/bench_kernels_gpu.py --smoke         # tiny shapes; on CPU in interpret mode

For each shape it first checks ``method="pallas"`` against ``method="chunk"`` on the device
(outputs, final state and gradients, relative error), then times, best of ``--repeats`` after a
warm-up and with compilation excluded:
  - ``pallas``: ``gated_delta_rule(method="pallas")``;
  - ``chunk``: ``gated_delta_rule(method="chunk")`` (XLA);
  - ``fla``: flash-linear-attention's ``chunk_gated_delta_rule`` on torch CUDA, when the
    ``fla`` package and a CUDA torch are importable (else reported as not run).
Inputs: q, k, v in ``--dtype``, g = logsigmoid-like decays and beta in (0, 1) in float32, an
initial state, L2-normalised q and k inside the rule (as OLMo Hybrid uses it). Ratios are
against FLA measured in the same run; the device is printed with every table.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax.ops import gated_delta_rule

# (B, T, H, Dk, Dv): OLMo Hybrid's layer, a mid-size batch, one long sequence.
SHAPES = [(1, 8192, 30, 96, 192), (4, 4096, 16, 128, 128), (1, 65536, 8, 128, 128)]
SMOKE_SHAPES = [(1, 150, 2, 24, 48), (2, 128, 2, 32, 32)]


def inputs(shape, dtype, seed: int = 0):
    b, t, h, dk, dv = shape
    keys = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(keys[0], (b, t, h, dk), dtype)
    k = jax.random.normal(keys[1], (b, t, h, dk), dtype)
    v = jax.random.normal(keys[2], (b, t, h, dv), dtype)
    g = jax.nn.log_sigmoid(jax.random.normal(keys[3], (b, t, h), jnp.float32) + 3.0)
    beta = jax.nn.sigmoid(jax.random.normal(keys[4], (b, t, h), jnp.float32))
    s0 = 0.1 * jax.random.normal(keys[5], (b, h, dk, dv), jnp.float32)
    return q, k, v, g, beta, s0


def jax_fns(method: str):
    def fwd(q, k, v, g, beta, s0):
        return gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True,
                                use_qk_l2norm=True, method=method)

    def loss(q, k, v, g, beta, s0):
        o, final = fwd(q, k, v, g, beta, s0)
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(final)

    return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=range(6)))


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def best_of(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # warm-up (and compile)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def fla_times(shape, dtype_name: str, repeats: int) -> tuple[float, float] | str:
    """(fwd ms, fwd+bwd ms) of FLA's Triton kernel, or why it did not run."""
    try:
        import torch
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception as e:  # noqa: BLE001 - reported
        return f"not run ({type(e).__name__}: {e})"
    if not torch.cuda.is_available():
        return "not run (no CUDA torch)"
    b, t, h, dk, dv = shape
    tdt = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    dev = "cuda"
    q = torch.randn(b, t, h, dk, dtype=tdt, device=dev, requires_grad=True)
    k = torch.randn(b, t, h, dk, dtype=tdt, device=dev, requires_grad=True)
    v = torch.randn(b, t, h, dv, dtype=tdt, device=dev, requires_grad=True)
    g = torch.nn.functional.logsigmoid(torch.randn(b, t, h, device=dev) + 3.0).requires_grad_()
    beta = torch.sigmoid(torch.randn(b, t, h, device=dev)).requires_grad_()
    s0 = (0.1 * torch.randn(b, h, dk, dv, device=dev)).requires_grad_()

    def fwd():
        return chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0,
                                      output_final_state=True, use_qk_l2norm_in_kernel=True)

    def fwd_bwd():
        o, final = fwd()
        (o.float().pow(2).sum() + final.sum()).backward()

    def timed(fn):
        fn()
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        return best * 1e3

    with torch.no_grad():
        f = timed(fwd)
    return f, timed(fwd_bwd)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU: interpret mode)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-fla", action="store_true")
    args = p.parse_args()
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    dtype = jnp.dtype(args.dtype)
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}, {args.dtype}",
          flush=True)
    rows = []
    for shape in shapes:
        data = inputs(shape, dtype)
        fns = {m: jax_fns(m) for m in ("pallas", "chunk")}
        # Correctness on the device first: pallas against chunk.
        (o_p, s_p), (o_c, s_c) = fns["pallas"][0](*data), fns["chunk"][0](*data)
        gp, gc = fns["pallas"][1](*data), fns["chunk"][1](*data)
        check = {"o": rel(o_p, o_c), "state": rel(s_p, s_c),
                 "grads": max(rel(a, b) for a, b in zip(gp, gc))}
        print(f"{shape}: pallas vs chunk relative error: " +
              ", ".join(f"{k} {v:.1e}" for k, v in check.items()), flush=True)
        row = {"shape": shape, "check": check}
        for m, (fwd, grad) in fns.items():
            row[m] = (best_of(lambda: fwd(*data), args.repeats),
                      best_of(lambda: grad(*data), args.repeats))
            print(f"  {m:<7} fwd {row[m][0]:9.3f} ms   fwd+bwd {row[m][1]:9.3f} ms", flush=True)
        row["fla"] = "not run (--no-fla)" if args.no_fla else fla_times(shape, args.dtype,
                                                                          args.repeats)
        if isinstance(row["fla"], tuple):
            print(f"  fla     fwd {row['fla'][0]:9.3f} ms   fwd+bwd {row['fla'][1]:9.3f} ms",
                  flush=True)
        else:
            print(f"  fla     {row['fla']}", flush=True)
        rows.append(row)
        del data, fns

    print(f"\ndevice: {dev.device_kind}; {args.dtype}; best of {args.repeats}")
    print("| B, T, H, Dk, Dv | pallas fwd ms | chunk fwd ms | fla fwd ms | pallas fwd+bwd ms | "
          "chunk fwd+bwd ms | fla fwd+bwd ms | fla/pallas fwd | fla/pallas fwd+bwd |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        fla = r["fla"] if isinstance(r["fla"], tuple) else (float("nan"), float("nan"))
        print(f"| {', '.join(map(str, r['shape']))} | {r['pallas'][0]:.3f} | {r['chunk'][0]:.3f} | "
              f"{fla[0]:.3f} | {r['pallas'][1]:.3f} | {r['chunk'][1]:.3f} | {fla[1]:.3f} | "
              f"{fla[0] / r['pallas'][0]:.2f}x | {fla[1] / r['pallas'][1]:.2f}x |")


if __name__ == "__main__":
    main()
