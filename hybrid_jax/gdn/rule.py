"""The gated delta rule: one function, several algorithms.

Per value head, with state S [Dk, Dv] in float32, for t = 1..T:
    S = exp(g_t) S;   S = S + k_t (beta_t (v_t - S^T k_t))^T;   o_t = S^T (scale q_t)
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from hybrid_jax.gdn.assoc_scan import gdn_assoc_scan
from hybrid_jax.gdn.chunk import gdn_chunk
from hybrid_jax.gdn.pallas.pipeline import gdn_pallas
from hybrid_jax.gdn.recurrent import gdn_recurrent

Method = Literal["auto", "recurrent", "chunk", "assoc_scan", "pallas"]
FORMS = ("recurrent", "chunk", "assoc_scan", "pallas")  # the implementations
METHODS = ("auto", *FORMS)


def resolve_method(method: str) -> str:
    """"auto" -> "pallas" where the kernels compile (GPU through Triton, TPU through Mosaic),
    else "chunk" (on CPU Pallas only interprets, far slower than XLA). Decided by the default
    backend when traced; any other method is returned as is."""
    if method != "auto":
        return method
    return "pallas" if jax.default_backend() in ("gpu", "tpu") else "chunk"


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x / sqrt(sum x^2 + eps) over the last axis, computed in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def segment_resets(segment_ids: jax.Array) -> jax.Array:
    """[B, T] ids -> [B, T] bool, True where the id differs from the previous position.

    Position 0 is never a reset: ``initial_state`` applies to each row's first segment.
    """
    changed = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = jnp.zeros((segment_ids.shape[0], 1), bool)  # not changed[:, :1]: empty when T = 1
    return jnp.concatenate([first, changed], axis=1)


def _check(q, k, v, g, beta, initial_state, segment_ids, method, chunk_size):
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(f"gated_delta_rule: q and k must be [B, T, H, Dk] of one shape, got "
                         f"q {q.shape} and k {k.shape}")
    b, t, hk, dk = q.shape
    if v.ndim != 4 or v.shape[:2] != (b, t):
        raise ValueError(f"gated_delta_rule: v must be [B, T, Hv, Dv] with B, T = {b, t}, got {v.shape}")
    hv, dv = v.shape[2:]
    if hv % hk:
        raise ValueError(f"gated_delta_rule: value heads ({hv}) must be a multiple of key heads ({hk})")
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (b, t, hv):
            raise ValueError(f"gated_delta_rule: {name} must be [B, T, Hv] = {(b, t, hv)}, got {x.shape}")
    if initial_state is not None and initial_state.shape != (b, hv, dk, dv):
        raise ValueError(f"gated_delta_rule: initial_state must be [B, Hv, Dk, Dv] = {(b, hv, dk, dv)}, "
                         f"got {initial_state.shape}")
    if segment_ids is not None and segment_ids.shape != (b, t):
        raise ValueError(f"gated_delta_rule: segment_ids must be [B, T] = {(b, t)}, got {segment_ids.shape}")
    if method not in METHODS:
        raise ValueError(f"gated_delta_rule: method {method!r} is not one of {METHODS}")
    if chunk_size <= 0:
        raise ValueError(f"gated_delta_rule: chunk_size must be positive, got {chunk_size}")
    if method != "recurrent" and chunk_size & (chunk_size - 1):
        # The chunked forms' solves work on power-of-two blocks.
        raise ValueError(f"gated_delta_rule: chunk_size must be a power of two for method "
                         f"{method!r}, got {chunk_size}")


def gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    *,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = False,
    segment_ids: jax.Array | None = None,
    method: Method = "auto",
    chunk_size: int = 64,
) -> tuple[jax.Array, jax.Array | None]:
    """Gated delta rule over a sequence (layout as flash-linear-attention and transformers).

    Args:
      q, k: [B, T, Hk, Dk]. v: [B, T, Hv, Dv] with Hv a multiple of Hk; key head i serves the
        contiguous value heads [i * Hv/Hk, (i+1) * Hv/Hk).
      g: [B, T, Hv] log decay (<= 0). beta: [B, T, Hv] write strength (up to 2).
      scale: multiplies q; defaults to Dk ** -0.5.
      initial_state: [B, Hv, Dk, Dv], applied to each row's first segment (zeros if None).
      output_final_state: also return the state after the last position.
      use_qk_l2norm: normalise q and k as x / sqrt(sum x^2 + 1e-6) first.
      segment_ids: [B, T] ints; the state resets to zero wherever the id changes (packed docs).
      method: "recurrent" (lax.scan over time), "chunk" (WY/UT chunks, sequential over chunks),
        "assoc_scan" (associative scan over chunks' affine state maps), "pallas" (Pallas kernels
        for the per-chunk factors and for the state pass across chunks, forward and backward;
        interpret mode on CPU), or "auto": "pallas" on GPU and TPU, "chunk" on CPU.
      chunk_size: chunk length for the chunked methods.

    Returns:
      (o [B, T, Hv, Dv] in q's dtype, final state [B, Hv, Dk, Dv] float32 or None).
    """
    _check(q, k, v, g, beta, initial_state, segment_ids, method, chunk_size)
    method = resolve_method(method)
    b, t, hk, dk = q.shape
    hv, dv = v.shape[2:]
    out_dtype = q.dtype
    if scale is None:
        scale = dk ** -0.5
    if use_qk_l2norm:
        q, k = l2_normalize(q), l2_normalize(k)
    if hv != hk and method != "pallas":  # the Pallas path takes grouped q, k as they are
        q, k = (jnp.repeat(x, hv // hk, axis=2) for x in (q, k))
    g = g.astype(jnp.float32)
    beta = beta.astype(jnp.float32)
    if initial_state is None:
        initial_state = jnp.zeros((b, hv, dk, dv), jnp.float32)
    initial_state = initial_state.astype(jnp.float32)
    reset = None if segment_ids is None else segment_resets(segment_ids)

    if method == "recurrent":
        o, final = gdn_recurrent(q, k, v, g, beta, scale, initial_state, reset)
    elif method == "chunk":
        o, final = gdn_chunk(q, k, v, g, beta, scale, initial_state, reset, chunk_size)
    elif method == "pallas":
        o, final = gdn_pallas(q, k, v, g, beta, scale, initial_state, reset, chunk_size)
    else:
        o, final = gdn_assoc_scan(q, k, v, g, beta, scale, initial_state, reset, chunk_size)
    return o.astype(out_dtype), (final if output_final_state else None)
