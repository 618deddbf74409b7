"""Causal grouped-query attention with optional packed-sequence (segment) masking: the entry
point ``causal_attention`` (by default the platform's fused kernel where one applies, else
blockwise beyond one block, see ``blockwise_attention``), the dense XLA form that holds
[B, H, T, T] logits, and ``cached_attention`` against a decode cache."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax.ops.blockwise_attention import DEFAULT_BLOCK, blockwise_causal_attention
from hybrid_jax.ops.splash_attention import (SplashBlocks, splash_applies, splash_causal_attention,
                                             splash_cost_stand_in)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Position of each token inside its segment.

    Args:
      segment_ids: [B, T] integers; a segment is a maximal run of equal ids.
    Returns:
      [B, T] int32, restarting from 0 wherever the id changes.
    """
    t = segment_ids.shape[1]
    idx = jnp.arange(t, dtype=jnp.int32)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], dtype=bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
        axis=1,
    )
    # Index of the most recent segment start at or before each position.
    last_start = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return idx - last_start


def resolve_attention(implementation: str | None, seq_len: int, block_size: int, *,
                      head_dim: int | None = None, dtype: Any = None, packed: bool = False,
                      platform: str | None = None) -> str | None:
    """``implementation`` with "auto" resolved for ``platform`` (default: jax's default
    backend when traced):

    * TPU: "splash" (jax's Pallas kernel) where it applies (``splash_applies``: T and the
      head dim multiples of 128);
    * GPU: "cudnn" (``jax.nn.dot_product_attention``'s fused kernel) for bf16/fp16 rows
      without packed documents: its public API takes a segment mask only as a dense
      [B, 1, T, T] array, quadratic in T, so packed rows stay on the blockwise form;
    * otherwise "blockwise" when ``seq_len`` is longer than one block, else "dense" (one
      block holds the same logits, without the loops).

    The shape arguments (``head_dim``, ``dtype``, ``packed``: segment ids given) matter only
    to the kernels; left None, neither kernel is picked."""
    if implementation != "auto":
        return implementation
    platform = platform or jax.default_backend()
    if platform == "tpu" and head_dim is not None and splash_applies(seq_len, head_dim):
        return "splash"
    if (platform in ("gpu", "cuda") and not packed and head_dim is not None
            and head_dim <= 128 and head_dim % 8 == 0
            and dtype is not None and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)):
        return "cudnn"
    return "blockwise" if seq_len > block_size else "dense"


def causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    scale: float | None = None,
    implementation: str | None = None,
    block_size: int = DEFAULT_BLOCK,
    splash_blocks: SplashBlocks = SplashBlocks(),
) -> jax.Array:
    """Softmax attention where token t sees tokens s <= t of its own segment.

    Args:
      q: [B, T, H, D].
      k, v: [B, T, Hkv, D] with H a multiple of Hkv (query heads h*G .. h*G+G-1 share kv head h).
      segment_ids: optional [B, T] integers; tokens attend only to equal ids.
      scale: defaults to D**-0.5.
      implementation: "blockwise": ``blockwise_causal_attention`` in blocks of ``block_size``
        rows (memory linear in T; "blockwise_unrolled" leaves no XLA loop, for cost
        analysis); "splash": ``splash_causal_attention`` (Mosaic-compiled on TPU, interpreted
        elsewhere), tiled by ``splash_blocks`` ("splash_stand_in": its cost for XLA's cost
        analysis, not its values); "auto": ``resolve_attention``'s choice; None,
        "dense" or "xla" materialises the [B, H, T, T] float32 logits (our own XLA form, with
        ``jax.nn.dot_product_attention``'s numerics and head-major matmuls); anything else
        goes to ``jax.nn.dot_product_attention`` ("cudnn": the fused GPU kernel for
        bf16/fp16).
    Returns:
      [B, T, H, D] in q's dtype. Logits and softmax are float32 (``jax.nn.dot_product_attention``'s
      XLA path); transformers' eager attention rounds bf16 logits to bf16 before its float32
      softmax, so ours is the more exact of the two in bf16.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    implementation = resolve_attention(implementation, q.shape[1], block_size,
                                       head_dim=q.shape[-1], dtype=q.dtype,
                                       packed=segment_ids is not None)
    if implementation in ("blockwise", "blockwise_unrolled"):
        return blockwise_causal_attention(q, k, v, segment_ids=segment_ids, scale=scale,
                                          block_q=block_size, block_k=block_size,
                                          unroll=implementation == "blockwise_unrolled")
    if implementation == "splash":
        return _pallas_on_platform(
            lambda interpret: lambda q, k, v, *seg: splash_causal_attention(
                q, k, v, segment_ids=seg[0] if seg else None, scale=scale,
                blocks=splash_blocks, interpret=interpret),
            q, k, v, *(() if segment_ids is None else (segment_ids,)))
    if implementation == "splash_stand_in":  # cost analysis only: not attention's values
        return _pallas_on_platform(
            lambda interpret: functools.partial(splash_cost_stand_in, blocks=splash_blocks,
                                                interpret=interpret), q, k, v)
    mask = None
    if segment_ids is not None:
        # [B, 1, T, S]: broadcast over heads; the causal part comes from is_causal.
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    if implementation in (None, "dense", "xla"):
        return _xla_attention(q, k, v, mask, scale)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=True,
                                       implementation=implementation)


def _pallas_on_platform(kernel, *args: jax.Array) -> jax.Array:
    """``kernel(interpret)(*args)``: compiled by Mosaic where the program is lowered for TPU,
    in interpret mode elsewhere (decided at lowering: a program traced on a CPU host and
    compiled ahead of time for a TPU topology runs the kernel)."""
    return jax.lax.platform_dependent(*args, tpu=kernel(False), default=kernel(True))


def _grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array,
                       scale: float) -> jax.Array:
    """Softmax attention with float32 logits and an explicit boolean mask.

    q: [B, T, H, D]; k, v: [B, S, Hkv, D]; allowed: broadcastable to [B, Hkv, G, T, S] with
    G = H / Hkv. A query with no allowed key gets a uniform average (finite, never NaN).
    Returns [B, T, H, D] in v's dtype.
    """
    b, t, h, d = q.shape
    hkv = k.shape[2]
    g = h // hkv
    s = k.shape[1]
    # Plain batched matmuls over head-major operands, transposed once: q as [B, Hkv, G*T, D]
    # (query head j*G+g uses kv head j), k and v as [B, Hkv, S, D]: XLA:CPU runs these on its
    # fast batched matmul, and the same einsums over [B, T, H, D] on its slow generic dot.
    qg = jnp.transpose(q.reshape(b, t, hkv, g, d), (0, 2, 3, 1, 4)).reshape(b, hkv, g * t, d)
    kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    # The mask merged the same way, [., ., G*T, S]: XLA:CPU's softmax is slow on 5-D logits.
    allowed = jnp.asarray(allowed)
    allowed = allowed.reshape((1,) * (5 - allowed.ndim) + allowed.shape)
    allowed = jnp.broadcast_to(allowed, (*allowed.shape[:2], g, t, s))
    allowed = allowed.reshape(*allowed.shape[:2], g * t, s)
    o = _head_major_attention(qg, kh, vh, allowed, scale).reshape(b, hkv, g, t, d)
    return jnp.transpose(o, (0, 3, 1, 2, 4)).reshape(b, t, h, d)


def _masked_logits(qg: jax.Array, kh: jax.Array, allowed: jax.Array, scale: float) -> jax.Array:
    """[B, J, Q, S] float32 logits, masked to float32's lowest value where not allowed."""
    logits = jnp.einsum("bjqd,bjsd->bjqs", qg, kh, preferred_element_type=jnp.float32) * scale
    return jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _head_major_attention(qg: jax.Array, kh: jax.Array, vh: jax.Array, allowed: jax.Array,
                          scale: float) -> jax.Array:
    """softmax(mask(qg kh^T * scale)) vh over [B, J, Q, D] queries and [B, J, S, D] keys and
    values; allowed: bool broadcastable to [B, J, Q, S]. Returns [B, J, Q, D] in vh's dtype.

    Its VJP keeps only the output and each row's log-sum-exp, and recomputes the probabilities
    from the logits (one matmul) instead of keeping two [Q, S] float32 tensors per layer and
    differentiating softmax through its reductions: fewer passes over the largest tensors of the
    step, which bound XLA:CPU's time here."""
    return _attention_fwd(qg, kh, vh, allowed, scale)[0]


def _attention_fwd(qg, kh, vh, allowed, scale):
    logits = _masked_logits(qg, kh, allowed, scale)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    unnormalised = jnp.exp(logits - row_max)
    row_sum = jnp.sum(unnormalised, axis=-1, keepdims=True)
    probs = (unnormalised / row_sum).astype(vh.dtype)
    o = jnp.einsum("bjqs,bjsd->bjqd", probs, vh)
    return o, (qg, kh, vh, allowed, o, row_max + jnp.log(row_sum))


def _attention_bwd(scale, res, d_o):
    qg, kh, vh, allowed, o, lse = res
    probs = jnp.exp(_masked_logits(qg, kh, allowed, scale) - lse)  # float32
    d_o32 = d_o.astype(jnp.float32)
    d_probs = jnp.einsum("bjqd,bjsd->bjqs", d_o, vh, preferred_element_type=jnp.float32)
    # softmax's VJP, with sum_s p * dp = sum_d o * do (a [Q, D] product, not a [Q, S] pass).
    delta = jnp.sum(o.astype(jnp.float32) * d_o32, axis=-1, keepdims=True)
    d_logits = probs * (d_probs - delta) * scale
    d_q = jnp.einsum("bjqs,bjsd->bjqd", d_logits, kh, preferred_element_type=jnp.float32)
    d_k = _keys_cotangent(d_logits, qg)
    d_v = _keys_cotangent(probs.astype(vh.dtype), d_o)
    return (d_q.astype(qg.dtype), d_k.astype(kh.dtype), d_v.astype(vh.dtype),
            np.zeros(allowed.shape, jax.dtypes.float0))


def _keys_cotangent(weights: jax.Array, x: jax.Array) -> jax.Array:
    """weights [B, J, Q, S], x [B, J, Q, D] -> sum over q of weights[q, s] x[q, d]: [B, J, S, D]
    float32. On CPU as (x^T weights)^T with the small x transposed behind an optimization
    barrier: contracting the rows of both operands sends XLA:CPU to its generic dot instead of
    the YNNPACK matmul that the plain product gets. Chosen when the program is lowered (an AOT
    compile for a TPU takes the plain form)."""
    def plain(weights, x):
        return jnp.einsum("bjqs,bjqd->bjsd", weights, x, preferred_element_type=jnp.float32)

    def on_cpu(weights, x):
        x_t = jax.lax.optimization_barrier(jnp.swapaxes(x, 2, 3))  # [B, J, D, Q]
        return jnp.swapaxes(jnp.einsum("bjdq,bjqs->bjds", x_t, weights,
                                       preferred_element_type=jnp.float32), 2, 3)

    return jax.lax.platform_dependent(weights, x, cpu=on_cpu, default=plain)


_head_major_attention.defvjp(_attention_fwd, _attention_bwd)


def _xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                   scale: float) -> jax.Array:
    """The same numerics as ``jax.nn.dot_product_attention``'s XLA path, with head-major
    matmuls (its [B, T, H, D] einsums take XLA:CPU's generic dot) and without its explicit
    ``F16_F16_F32`` dot algorithm, which XLA:CPU rejects under jit. Shapes as
    ``causal_attention``; mask [B, 1, T, S] or None."""
    allowed = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
    if mask is not None:
        allowed = allowed & mask[:, :, None]  # [B, 1, 1, T, S]
    return _grouped_attention(q, k, v, allowed, scale)


def cached_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    q_slots: jax.Array,
    *,
    scale: float | None = None,
) -> jax.Array:
    """Attention of new queries against a key/value cache (prefill pieces and decode steps).

    Query i of row b sits at cache slot ``q_slots[b, i]`` (its position) and sees the slots
    ``s <= q_slots[b, i]``: its own key, already written there, and every earlier one. Slots past
    a row's length hold stale values that no query can see.

    Args:
      q: [B, T, H, D].
      k_cache, v_cache: [B, Hkv, S, D] (head-major) with H a multiple of Hkv.
      q_slots: [B, T] int; a negative slot sees nothing (left padding) and gets a finite average.
      scale: defaults to D**-0.5.
    Returns:
      [B, T, H, D] in v_cache's dtype; logits and softmax in float32.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    b, t, h, d = q.shape
    hkv, s = k_cache.shape[1], k_cache.shape[2]
    qg = q.reshape(b, t, hkv, h // hkv, d)  # query head j * G + g uses kv head j
    # The cache is the dots' left operand, laid out as they want it ([B, Hkv] batch, then S), so
    # a decode step reads it in place instead of transposing it first.
    logits = jnp.einsum("bjsd,btjgd->bjsgt", k_cache, qg,
                        preferred_element_type=jnp.float32) * scale
    allowed = jnp.arange(s, dtype=jnp.int32)[:, None] <= q_slots[:, None, :]  # [B, S, T]
    logits = jnp.where(allowed[:, None, :, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=2).astype(v_cache.dtype)
    return jnp.einsum("bjsgt,bjsd->btjgd", probs, v_cache).reshape(b, t, h, d)
