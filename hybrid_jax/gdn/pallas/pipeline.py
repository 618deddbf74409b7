"""The chunked gated delta rule as a pipeline of Pallas kernels, forward and backward.

Forward: the factors local to each chunk (``chunk_factors_kernel``), then the state carried
across chunks on chip (``state_pass_*``), forming the output on the way (or, on GPU with
``forward_output="parallel"``, the states first and every chunk's output at once).

Backward (``jax.custom_vjp``), recomputing rather than storing anything per chunk: the
factors again (now with each chunk's T^T), the state entering each chunk, the state's
cotangent from the last chunk to the first, the factors' cotangents from those (local to each
chunk), and the factor kernel's VJP back to q, k, v, g and beta. The per-chunk arrays passed
between kernels (states, their cotangents, T^T) are stored in the matmul operand dtype, bf16
for bf16 inputs, as flash-linear-attention stores them; every running state and sum is
float32.

Every stage takes the call's ``KernelPlan`` (``plan.py``), decided once, statically.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from hybrid_jax.gdn.pallas.chunk_factors import chunk_factors_kernel, chunk_factors_with_inverse
from hybrid_jax.gdn.pallas.chunk_factors_vjp import chunk_factors_vjp
from hybrid_jax.gdn.pallas.layout import (
    from_per_token,
    from_sequences,
    kernel_inputs,
    pad_state,
    per_token,
    unpad_state,
)
from hybrid_jax.gdn.pallas.plan import KernelPlan, plan_kernels
from hybrid_jax.gdn.pallas.state_pass import (
    chunk_outputs,
    entering_states_gpu,
    state_pass_backward_gpu,
    state_pass_gpu,
)
from hybrid_jax.gdn.pallas.state_pass_tpu import (
    entering_states_tpu,
    state_pass_backward_tpu,
    state_pass_tpu,
)
from hybrid_jax.gdn.pallas.step_cotangents import step_cotangents


class StatePasses(NamedTuple):
    """One backend's passes across chunks (same arguments and results on both)."""

    forward: Any  # (factors, s0, plan) -> PassOutput
    entering: Any  # (factors, s0, plan) -> EnteringStates
    backward: Any  # (d_out, factors, d_final, plan) -> PassCotangents


STATE_PASSES = {
    "gpu": StatePasses(state_pass_gpu, entering_states_gpu, state_pass_backward_gpu),
    "tpu": StatePasses(state_pass_tpu, entering_states_tpu, state_pass_backward_tpu),
}


def _forward(q, k, v, g, beta, initial_state, reset, scale: float, plan: KernelPlan):
    """(o [B, T, H, Dv] in q's dtype, final state [B, H, Dk, Dv] float32): factors, then the
    pass across chunks."""
    b, t = v.shape[:2]
    passes = STATE_PASSES[plan.backend]
    inputs = kernel_inputs(q, k, v, g, beta, reset, plan)
    factors = chunk_factors_kernel(inputs, scale=scale, plan=plan)
    s0 = pad_state(initial_state, plan)
    if plan.backend == "gpu" and plan.forward_output == "parallel":
        entering = passes.entering(factors, s0, plan=plan)
        o, final = chunk_outputs(factors, entering, plan=plan), entering.final
    else:
        o, final = passes.forward(factors, s0, plan=plan)
    return from_per_token(o, b, t, v.shape[-1], plan), unpad_state(final, initial_state)


def _backward(scale: float, plan: KernelPlan, saved: tuple, cotangents: tuple) -> tuple:
    """Cotangents of (q, k, v, g, beta, initial_state, reset=None), recomputing the factors
    (with T^T) and the entering states, then passing the state's cotangent backwards."""
    q, k, v, g, beta, initial_state, reset = saved
    d_out, d_final = cotangents
    passes = STATE_PASSES[plan.backend]
    inputs = kernel_inputs(q, k, v, g, beta, reset, plan)
    factors, inverse_t = chunk_factors_with_inverse(inputs, scale=scale, plan=plan)
    entering = passes.entering(factors, pad_state(initial_state, plan), plan=plan)
    d_o = per_token(d_out, plan.value_dim, plan).astype(factors.w.dtype)  # zero past T, Dv
    passed = passes.backward(d_o, factors, pad_state(d_final, plan), plan=plan)
    d_factors = step_cotangents(entering, d_o, passed, plan=plan)
    grads = chunk_factors_vjp(inputs, d_factors, inverse_t, scale=scale, plan=plan)
    return (*_input_cotangents(grads, q, k, v, g, beta, plan),
            unpad_state(passed.d_initial, initial_state), None)


def _input_cotangents(grads, q, k, v, g, beta, plan: KernelPlan) -> tuple:
    """The kernels' dq, dk, dv, dg, dbeta back in the model's layout and dtypes; dq and dk,
    per value head, summed over each key head's group."""
    b, t, h, dv = v.shape
    dk = q.shape[-1]
    cast = lambda x, like: x.astype(like.dtype)

    def per_key_head(x, like):
        x = from_per_token(x, b, t, dk, plan)
        if like.shape[2] == h:
            return cast(x, like)
        x = x.astype(jnp.float32).reshape(b, t, like.shape[2], -1, dk)
        return cast(jnp.sum(x, axis=3), like)

    return (per_key_head(grads.dq, q), per_key_head(grads.dk, k),
            cast(from_per_token(grads.dv, b, t, dv, plan), v),
            cast(from_sequences(grads.dg, b, t, h), g),
            cast(from_sequences(grads.dbeta, b, t, h), beta))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _gdn_pallas(q, k, v, g, beta, initial_state, reset, scale, plan):
    return _forward(q, k, v, g, beta, initial_state, reset, scale, plan)


def _gdn_pallas_fwd(q, k, v, g, beta, initial_state, reset, scale, plan):
    out = _forward(q, k, v, g, beta, initial_state, reset, scale, plan)
    return out, (q, k, v, g, beta, initial_state, reset)


_gdn_pallas.defvjp(_gdn_pallas_fwd, _backward)


def gdn_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    scale: float,
    initial_state: jax.Array,
    reset: jax.Array | None,
    chunk_size: int = 64,
    *,
    backend: str | None = None,
    interpret: Any = None,
    forward_output: str = "fused",
    plan: KernelPlan | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Chunked form on the Pallas kernels: the arguments and results of ``gdn_chunk`` (q and k
    may also have fewer heads than v, Hk dividing H, each serving a group of consecutive value
    heads: the GPU kernels read them unrepeated).

    backend: "tpu" (Mosaic TPU) or "gpu" (Triton); interpret: run the kernels in Pallas
    interpret mode (True, or ``pltpu.InterpretParams`` for TPU semantics). Left None, both are
    chosen when the program is lowered, for the platform it is lowered for
    (``jax.lax.platform_dependent``): "tpu" compiled on TPU, "gpu" compiled on CUDA and ROCm,
    "gpu" interpreted elsewhere (CPU, where Pallas cannot compile). So a program traced on a
    CPU host and compiled ahead of time for a TPU topology runs the Mosaic kernels there.
    forward_output: the GPU forward's output, "fused" or "parallel" (``KernelPlan``).
    plan: the whole plan, made by ``plan_kernels`` for these shapes (overrides the rest):
      for experiments that tune blocks, stages or warps.
    """
    args = (q, k, v, g, beta, initial_state, reset)
    if plan is not None:
        return _gdn_pallas(*args, scale, plan)
    b, _, h, dv = v.shape
    shapes = dict(batch=b, heads=h, key_dim=q.shape[-1], value_dim=dv, dtype=q.dtype,
                  chunk_size=chunk_size, forward_output=forward_output)

    def on(platform: str):
        chosen = plan_kernels(
            backend=backend or ("tpu" if platform == "tpu" else "gpu"),
            interpret=platform == "cpu" if interpret is None else interpret, **shapes)
        return lambda *a: _gdn_pallas(*a, scale, chosen)

    if backend is not None and interpret is not None:
        return on("given")(*args)
    return jax.lax.platform_dependent(*args, tpu=on("tpu"), cuda=on("cuda"), rocm=on("rocm"),
                                      default=on("cpu"))
