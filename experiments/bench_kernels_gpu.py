"""Benchmark: the Pallas gated delta rule against XLA's chunk form and flash-linear-attention's
Triton kernel, forward and forward+backward, on one accelerator, in one run.

    python experiments/bench_kernels_gpu.py                 # the issue's three shapes, bf16
    python experiments/bench_kernels_gpu.py --smoke         # tiny shapes; on CPU in interpret mode
    python experiments/bench_kernels_gpu.py --shapes 0 --ablation   # + each kernel, variants

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
import functools
import os
import time
import traceback

# JAX and torch share the card in this process: no preallocation.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from hybrid_jax.gdn import gated_delta_rule  # noqa: E402

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


def _patched(module, attrs: dict, fn):
    """fn() with module attributes replaced (and jax's caches cleared, so kernels retrace)."""
    saved = {name: getattr(module, name) for name in attrs}
    try:
        for name, value in attrs.items():
            setattr(module, name, value)
        jax.clear_caches()
        return fn()
    finally:
        for name, value in saved.items():
            setattr(module, name, value)
        jax.clear_caches()


class _Printed(dict):
    """The ablation's times, each printed as it is measured: a call stopped by its time limit
    still reports every figure it reached."""

    def __setitem__(self, name: str, ms) -> None:
        super().__setitem__(name, ms)
        ms = " / ".join(f"{x:.3f}" for x in (ms if isinstance(ms, tuple) else (ms,)))
        print(f"  {name:<52} {ms} ms", flush=True)


def _pallas_fns(plan):
    """(forward, gradient) of the Pallas pipeline under ``plan``, jitted (q and k are
    L2-normalised first, as in ``jax_fns``)."""
    from hybrid_jax.gdn import l2_normalize
    from hybrid_jax.gdn.pallas import gdn_pallas

    def fwd(q, k, v, g, beta, s0):
        q, k = l2_normalize(q), l2_normalize(k)
        return gdn_pallas(q, k, v, g, beta, q.shape[-1] ** -0.5, s0, None, plan=plan)

    def loss(*args):
        o, final = fwd(*args)
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(final)

    return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=range(6)))


def ablation(data, repeats: int) -> dict:
    """Kernels alone, and under variants of the plan (``hybrid_jax.gdn.pallas.KernelPlan``), in
    this order: the whole op with q, k, v and the output read and written token-major (as it
    is) or as [B*H, N, C, D] sequences around the kernels; the forward with its output formed
    in the state pass or by its own parallel kernel, whole and the passes alone; the factor
    kernels (forward and VJP, three kernels) as they are, with 8 warps, and with no solve at
    all (the floor of everything else; the only variant swapped in by patching); the factors'
    cotangents kernel at 4 or 8 warps; the state passes by value block, software-pipelining
    stages and warps."""
    import dataclasses

    import hybrid_jax.gdn.pallas.chunk_factors as cf
    from hybrid_jax.gdn.chunk_factors import ChunkFactors
    from hybrid_jax.gdn.pallas import Layout, PassStages, plan_kernels
    from hybrid_jax.gdn.pallas.chunk_factors_vjp import chunk_factors_vjp
    from hybrid_jax.gdn.pallas.layout import kernel_inputs, pad_state
    from hybrid_jax.gdn.pallas.state_pass import (
        chunk_outputs,
        entering_states_gpu,
        state_pass_backward_gpu,
        state_pass_gpu,
    )
    from hybrid_jax.gdn.pallas.step_cotangents import step_cotangents

    q, k, v, g, beta, s0 = data
    b, _, h, dv = v.shape
    plan = plan_kernels(batch=b, heads=h, key_dim=q.shape[-1], value_dim=dv, dtype=q.dtype,
                        interpret=jax.default_backend() == "cpu")
    with_ = functools.partial(dataclasses.replace, plan)
    inputs = kernel_inputs(q, k, v, g, beta, None, plan)
    scale = q.shape[-1] ** -0.5
    times = _Printed()

    def whole_op(p):
        fwd, grad = _pallas_fns(p)
        return best_of(lambda: fwd(*data), repeats), best_of(lambda: grad(*data), repeats)

    times["whole pallas fwd / fwd+bwd, token-major (as is)"] = whole_op(plan)
    times["whole pallas fwd / fwd+bwd, transposed to sequences"] = whole_op(
        with_(layout=Layout(token_major=False, heads=h)))
    outs = {}
    for mode in ("fused", "parallel"):
        fwd = _pallas_fns(with_(forward_output=mode))[0]
        times[f"whole pallas fwd, output {mode}"] = best_of(lambda: fwd(*data), repeats)
        outs[mode] = fwd(*data)
    print("  parallel against fused output, relative difference: o "
          f"{rel(outs['parallel'][0], outs['fused'][0]):.1e}, state "
          f"{rel(outs['parallel'][1], outs['fused'][1]):.1e}", flush=True)

    def factors(p):
        fwd = jax.jit(lambda x: cf.chunk_factors_kernel(x, scale=scale, plan=p))
        f = jax.block_until_ready(fwd(inputs))
        d_f = ChunkFactors(*(jnp.ones(x.shape, jnp.float32) for x in f))
        # The VJP given T, as the backward has it from its recompute of the factors.
        inverse_t = cf.chunk_factors_with_inverse(inputs, scale=scale, plan=p).inverse_t
        bwd = jax.jit(lambda *a: chunk_factors_vjp(*a, scale=scale, plan=p))
        return best_of(lambda: fwd(inputs), repeats), best_of(
            lambda: bwd(inputs, d_f, inverse_t), repeats)

    times["factors, factors_backward as is"] = factors(plan)
    times["factors, factors_backward 8 warps"] = factors(with_(num_warps=8))
    times["factors, factors_backward no solve (floor)"] = _patched(
        cf, {"unit_lower_inverse_tile": lambda a, r, c, mm: a}, lambda: factors(plan))

    f = cf.chunk_factors_kernel(inputs, scale=scale, plan=plan)
    s0p = pad_state(s0, plan)
    entering = entering_states_gpu(f, s0p, plan=plan)
    d_o = jnp.ones(plan.layout.shape(*f.u.shape), f.u.dtype)
    passed = state_pass_backward_gpu(d_o, f, s0p, plan=plan)

    def cotangents(p):
        fn = jax.jit(lambda *a: step_cotangents(*a, plan=p))
        return best_of(lambda: fn(entering, d_o, passed), repeats)

    fused = jax.jit(lambda *a: state_pass_gpu(*a, plan=plan))
    split = jax.jit(lambda f, s: chunk_outputs(f, entering_states_gpu(f, s, plan=plan),
                                               plan=plan))
    times["state pass fused / with states + chunk_outputs"] = (
        best_of(lambda: fused(f, s0p), repeats), best_of(lambda: split(f, s0p), repeats))
    times["step_cotangents kernel as is (4 warps)"] = cotangents(plan)
    times["step_cotangents kernel, 8 warps"] = cotangents(with_(num_warps=8))

    # At OLMo's layer (block_v 64) the forward pass spilled registers at 4 warps and not at 8
    # (experiments/kernel_registers.py, experiments/RESULTS.md).
    for bv, stages, warps in ((64, 2, 4), (64, 3, 4), (32, 3, 4), (64, 3, 8), (64, 2, 8)):
        p = with_(block_v=bv, stages=PassStages(stages, stages, stages), num_warps=warps)
        fwd = jax.jit(lambda f, s, p=p: state_pass_gpu(f, s, plan=p))
        bwd = jax.jit(lambda d, f, s, p=p: state_pass_backward_gpu(d, f, s, plan=p))
        times[f"state_pass, backward bv={bv} stages={stages} warps={warps}"] = (
            best_of(lambda: fwd(f, s0p), repeats), best_of(lambda: bwd(d_o, f, s0p), repeats))
    return times


def guarded(label: str, fn):
    """Run fn; on failure print the error (the rest of the run goes on) and return None."""
    try:
        return fn()
    except Exception:  # noqa: BLE001 - reported, the benchmark goes on
        print(f"  {label} FAILED:\n" + traceback.format_exc(limit=4), flush=True)
        return None


def nan_pair(x) -> tuple[float, float]:
    return x if isinstance(x, tuple) else (float("nan"), float("nan"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU: interpret mode)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-fla", action="store_true")
    p.add_argument("--methods", default="pallas,chunk",
                   help="jax methods to time beside FLA (chunk is slow at long T)")
    p.add_argument("--ablation", action="store_true",
                   help="after the table, time each kernel alone and under variants (warps, "
                        "no solve, layouts, output kernel, value blocks, pipelining), first "
                        "shape")
    p.add_argument("--shapes", default=None,
                   help="which of the shapes to run, by index, e.g. 0,2")
    args = p.parse_args()
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    if args.shapes:
        shapes = [shapes[int(i)] for i in args.shapes.split(",")]
    methods = args.methods.split(",")
    dtype = jnp.dtype(args.dtype)
    dev = jax.devices()[0]
    start = time.perf_counter()
    stamp = lambda: f"[{time.perf_counter() - start:5.0f} s]"
    print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}, {args.dtype}",
          flush=True)
    rows = []
    for shape in shapes:
        data = inputs(shape, dtype)
        fns = {m: jax_fns(m) for m in methods}
        row = {"shape": shape}
        print(f"{stamp()} {shape}:", flush=True)
        # Correctness on the device first: pallas against chunk (XLA) and against FLA.
        outs = {m: guarded(f"{m} forward", lambda m=m: fns[m][0](*data)) for m in fns}
        grads = {m: guarded(f"{m} gradient", lambda m=m: fns[m][1](*data)) for m in fns}
        if outs.get("pallas") is not None and outs.get("chunk") is not None:
            (o_p, s_p), (o_c, s_c) = outs["pallas"], outs["chunk"]
            check = {"o": rel(o_p, o_c), "state": rel(s_p, s_c)}
            if grads["pallas"] is not None and grads["chunk"] is not None:
                check["grads"] = max(rel(a, b) for a, b in zip(grads["pallas"], grads["chunk"]))
            print("  pallas vs chunk relative error: " +
                  ", ".join(f"{k} {v:.1e}" for k, v in check.items()), flush=True)
        for m, (fwd, grad) in fns.items():
            if outs[m] is None:
                continue
            row[m] = (best_of(lambda: fwd(*data), args.repeats),
                      guarded(f"{m} fwd+bwd timing",
                              lambda: best_of(lambda: grad(*data), args.repeats))
                      or float("nan"))
            print(f"  {m:<7} fwd {row[m][0]:9.3f} ms   fwd+bwd {row[m][1]:9.3f} ms", flush=True)
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
            print(f"  fla     {fla}", flush=True)
        rows.append(row)
        del data, fns, outs, grads

    print(f"\n{stamp()} device: {dev.device_kind}; {args.dtype}; best of {args.repeats}")
    print("| B, T, H, Dk, Dv | pallas fwd ms | chunk fwd ms | fla fwd ms | pallas fwd+bwd ms | "
          "chunk fwd+bwd ms | fla fwd+bwd ms | fla/pallas fwd | fla/pallas fwd+bwd |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        (pf, pb), (cf, cb), (ff, fb) = (nan_pair(r.get(m)) for m in ("pallas", "chunk", "fla"))
        print(f"| {', '.join(map(str, r['shape']))} | {pf:.3f} | {cf:.3f} | {ff:.3f} | "
              f"{pb:.3f} | {cb:.3f} | {fb:.3f} | {ff / pf:.2f}x | {fb / pb:.2f}x |", flush=True)

    if args.ablation:
        print(f"\n{stamp()} ablation at {shapes[0]}:", flush=True)
        guarded("ablation", lambda: ablation(inputs(shapes[0], dtype), args.repeats))
        print(f"{stamp()} done", flush=True)


if __name__ == "__main__":
    main()
