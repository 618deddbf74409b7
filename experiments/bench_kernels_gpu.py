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
import os
import time
import traceback

# JAX and torch share the card in this process: no preallocation.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from hybrid_jax.ops import gated_delta_rule  # noqa: E402

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


def fla_run(data, repeats: int) -> dict | str:
    """FLA's Triton kernel on the same inputs: its outputs (for a cross-check) and (fwd ms,
    fwd+bwd ms), or why it did not run."""
    try:
        import torch
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception as e:  # noqa: BLE001 - reported
        return f"not run ({type(e).__name__}: {e})"
    if not torch.cuda.is_available():
        return "not run (no CUDA torch)"
    from fla.ops.common import chunk_o
    if getattr(chunk_o, "TRITON_ABOVE_3_7_1", True) is False:
        # FLA refuses its gated dq/dk/dw/dg backward kernel with Triton 3.4-3.7.0 on Hopper
        # (it miscompiles there, FLA #640); a newer Triton is too large to carry to the
        # device. Time that kernel anyway: its results are not used, only its speed.
        chunk_o.TRITON_ABOVE_3_7_1 = True
        print("  fla: backward guard bypassed (Triton < 3.7.1 on Hopper); fwd+bwd is a "
              "timing only", flush=True)
    dev = "cuda"
    # Same values as the JAX inputs (bf16 through float32 is exact).
    q, k, v, g, beta, s0 = (torch.from_numpy(np.asarray(x.astype(jnp.float32))).to(dev)
                            for x in data)
    tdt = {jnp.dtype(jnp.bfloat16): torch.bfloat16,
           jnp.dtype(jnp.float32): torch.float32}[jnp.dtype(data[0].dtype)]
    q, k, v = (x.to(tdt).requires_grad_() for x in (q, k, v))
    g, beta, s0 = (x.requires_grad_() for x in (g, beta, s0))

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
        o, final = fwd()
        out = {"o": o.float().cpu().numpy(), "state": final.float().cpu().numpy()}
        out["fwd"] = timed(fwd)
    out["fwd_bwd"] = timed(fwd_bwd)
    return out


def pallas_breakdown(data, repeats: int) -> dict:
    """Time of each Pallas kernel alone, forward and backward (the rest of ``pallas`` is
    layout, padding, l2norm and, in the backward, the factors' cotangents in XLA)."""
    from hybrid_jax.kernels.gdn_chunk_factors import (
        chunk_factors_backward_kernel,
        chunk_factors_kernel,
    )
    from hybrid_jax.kernels.gdn_state_pass import state_pass, state_pass_backward
    from hybrid_jax.ops.gdn_pallas import _kernel_inputs, _pad_state

    q, k, v, g, beta, s0 = data
    dk = q.shape[-1]
    (*args, seg), pk, pv = _kernel_inputs(q, k, v, g, beta, None, 64)
    interpret = jax.default_backend() == "cpu"
    scale = dk ** -0.5
    factors = jax.jit(lambda *a: chunk_factors_kernel(*a, seg, scale=scale,
                                                      interpret=interpret))
    f = jax.block_until_ready(factors(*args))
    s0p = _pad_state(s0, pk, pv)
    times = {"factors": best_of(lambda: factors(*args), repeats)}
    for bv in (32, 64):
        fn = jax.jit(lambda *a, bv=bv: state_pass(*a, block_v=bv, interpret=interpret))
        times[f"state_pass bv={bv}"] = best_of(lambda: fn(*f, s0p), repeats)
        fn = jax.jit(lambda *a, bv=bv: state_pass(*a, block_v=bv, return_states=True,
                                                  interpret=interpret))
        times[f"state_pass+states bv={bv}"] = best_of(lambda: fn(*f, s0p), repeats)
        fn = jax.jit(lambda *a, bv=bv: state_pass_backward(*a, block_v=bv,
                                                           interpret=interpret))
        d_o = jnp.ones_like(f[0])
        times[f"state_pass_backward bv={bv}"] = best_of(lambda: fn(d_o, *f[1:], s0p), repeats)
    d_f = [jnp.ones(x.shape, jnp.float32) for x in f]
    fn = jax.jit(lambda *a: chunk_factors_backward_kernel(*a, scale=scale,
                                                          interpret=interpret))
    times["factors_backward"] = best_of(lambda: fn(*args, seg, *d_f), repeats)
    return times


def _rows_inverse(a, row, col, matmul):
    """The factor kernels' previous solve (until 2026-11-27), kept here for the ablation: forward
    substitution one row per step with masked reductions on [C, C] tiles."""
    del matmul
    c = a.shape[0]
    a_t = a.T
    col_1 = jax.lax.broadcasted_iota(jnp.int32, (1, c), 1)

    def substitute(i, x):
        a_i = jnp.sum(jnp.where(col == i, a_t, 0.0), axis=1, keepdims=True)
        new = jnp.where(col_1 == i, 1.0, 0.0) - jnp.sum(a_i * x, axis=0, keepdims=True)
        return jnp.where(row == i, new, x)

    return jax.lax.fori_loop(1, c, substitute, (row == col).astype(jnp.float32))


def ablation(data, repeats: int) -> dict:
    """The factor kernels (forward and VJP) and the state pass under variants, each swapped in
    by patching the kernel module and clearing jax's caches: the solve (doubling with split
    bf16 matmuls, the same with float32 matmuls, the previous row-by-row substitution, none at
    all: the floor of everything else), and 8 warps instead of 4."""
    import hybrid_jax.kernels.common as common
    import hybrid_jax.kernels.gdn_chunk_factors as cf
    import hybrid_jax.kernels.gdn_state_pass as sp
    from hybrid_jax.ops.gdn_pallas import _kernel_inputs, _pad_state

    q, k, v, g, beta, s0 = data
    (*args, seg), pk, pv = _kernel_inputs(q, k, v, g, beta, None, 64)
    interpret = jax.default_backend() == "cpu"
    scale = q.shape[-1] ** -0.5
    warps8 = lambda *a, **kw: common.compiler_params(*a, **{**kw, "num_warps": 8})
    variants = {
        "doubling (split bf16)": {},
        "doubling, float32 dots": {"solve_matmul": lambda dt: common.mm},
        "rows (previous)": {"_unit_lower_inverse": _rows_inverse},
        "no solve (floor)": {"_unit_lower_inverse": lambda a, row, col, mm: a},
        "doubling, 8 warps": {"compiler_params": warps8},
    }
    times = {}
    s0p = _pad_state(s0, pk, pv)
    for name, patch in variants.items():
        saved = {attr: getattr(cf, attr) for attr in patch}
        try:
            for attr, value in patch.items():
                setattr(cf, attr, value)
            jax.clear_caches()
            fwd = jax.jit(lambda *a: cf.chunk_factors_kernel(*a, seg, scale=scale,
                                                             interpret=interpret))
            f = jax.block_until_ready(fwd(*args))
            times[f"factors {name}"] = best_of(lambda: fwd(*args), repeats)
            d_f = [jnp.ones(x.shape, jnp.float32) for x in f]
            bwd = jax.jit(lambda *a: cf.chunk_factors_backward_kernel(
                *a, scale=scale, interpret=interpret))
            times[f"factors_backward {name}"] = best_of(lambda: bwd(*args, seg, *d_f), repeats)
        finally:
            for attr, value in saved.items():
                setattr(cf, attr, value)
    jax.clear_caches()
    f = cf.chunk_factors_kernel(*args, seg, scale=scale, interpret=interpret)
    for warps in (4, 8):
        saved = sp.compiler_params
        try:
            sp.compiler_params = lambda *a, w=warps, **kw: saved(*a, **{**kw, "num_warps": w})
            jax.clear_caches()
            for bv in (32, 64):
                fn = jax.jit(lambda *a, bv=bv: sp.state_pass(*a, block_v=bv, interpret=interpret))
                times[f"state_pass bv={bv} warps={warps}"] = best_of(lambda: fn(*f, s0p), repeats)
                fn = jax.jit(lambda *a, bv=bv: sp.state_pass_backward(*a, block_v=bv,
                                                                      interpret=interpret))
                d_o = jnp.ones_like(f[0])
                times[f"state_pass_backward bv={bv} warps={warps}"] = best_of(
                    lambda: fn(d_o, *f[1:], s0p), repeats)
        finally:
            sp.compiler_params = saved
    jax.clear_caches()
    return times


def guarded(label: str, fn):
    """Run fn; on failure print the error (the rest of the run goes on) and return None."""
    try:
        return fn()
    except Exception:  # noqa: BLE001 - reported, the benchmark goes on
        print(f"  {label} FAILED:\n" + traceback.format_exc(limit=4), flush=True)
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU: interpret mode)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-fla", action="store_true")
    p.add_argument("--breakdown", action="store_true",
                   help="also time each Pallas kernel alone, forward and backward")
    p.add_argument("--ablation", action="store_true",
                   help="also time the kernels under variants (solve, warps, value blocks)")
    p.add_argument("--shapes", default=None,
                   help="which of the shapes to run, by index, e.g. 0,2")
    args = p.parse_args()
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    if args.shapes:
        shapes = [shapes[int(i)] for i in args.shapes.split(",")]
    dtype = jnp.dtype(args.dtype)
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}, {args.dtype}",
          flush=True)
    rows = []
    for shape in shapes:
        data = inputs(shape, dtype)
        fns = {m: jax_fns(m) for m in ("pallas", "chunk")}
        row = {"shape": shape}
        print(f"{shape}:", flush=True)
        # Correctness on the device first: pallas against chunk (XLA) and against FLA.
        outs = {m: guarded(f"{m} forward", lambda m=m: fns[m][0](*data)) for m in fns}
        grads = {m: guarded(f"{m} gradient", lambda m=m: fns[m][1](*data)) for m in fns}
        if outs["pallas"] is not None and outs["chunk"] is not None:
            (o_p, s_p), (o_c, s_c) = outs["pallas"], outs["chunk"]
            check = {"o": rel(o_p, o_c), "state": rel(s_p, s_c)}
            if grads["pallas"] is not None and grads["chunk"] is not None:
                check["grads"] = max(rel(a, b) for a, b in zip(grads["pallas"], grads["chunk"]))
            print("  pallas vs chunk relative error: " +
                  ", ".join(f"{k} {v:.1e}" for k, v in check.items()), flush=True)
        for m, (fwd, grad) in fns.items():
            if outs[m] is None:
                row[m] = (float("nan"), float("nan"))
                continue
            row[m] = (best_of(lambda: fwd(*data), args.repeats),
                      guarded(f"{m} fwd+bwd timing",
                              lambda: best_of(lambda: grad(*data), args.repeats))
                      or float("nan"))
            print(f"  {m:<7} fwd {row[m][0]:9.3f} ms   fwd+bwd {row[m][1]:9.3f} ms", flush=True)
        if outs["pallas"] is not None and args.breakdown:
            parts = guarded("breakdown", lambda: pallas_breakdown(data, args.repeats))
            if parts:
                print("  pallas kernels alone: " +
                      ", ".join(f"{k} {v:.3f} ms" for k, v in parts.items()), flush=True)
        if outs["pallas"] is not None and args.ablation:
            parts = guarded("ablation", lambda: ablation(data, args.repeats))
            for name, ms in (parts or {}).items():
                print(f"  ablation: {name:<40} {ms:8.3f} ms", flush=True)
        fla = "not run (--no-fla)" if args.no_fla else (
            guarded("fla", lambda: fla_run(data, args.repeats)) or "failed")
        if isinstance(fla, dict):
            row["fla"] = (fla["fwd"], fla["fwd_bwd"])
            print(f"  fla     fwd {fla['fwd']:9.3f} ms   fwd+bwd {fla['fwd_bwd']:9.3f} ms",
                  flush=True)
            for m in fns:
                if outs[m] is not None:
                    print(f"  {m} vs fla relative error: o {rel(outs[m][0], fla['o']):.1e}, "
                          f"state {rel(outs[m][1], fla['state']):.1e}", flush=True)
        else:
            row["fla"] = fla
            print(f"  fla     {fla}", flush=True)
        rows.append(row)
        del data, fns, outs, grads

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
