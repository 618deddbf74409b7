"""The LM head's cross-entropy without [B, T, V] logits: chunked over positions, with the
gradient formed chunk by chunk in the forward pass.

At a 100k vocabulary the logits are the largest tensor of a training step (float32 [B, T, V],
4 V bytes per position, plus the softmax and its gradient of the same size), and they
bound the trainable sequence length long before the layers do. This computes the summed loss
from the final hidden states and the head kernel, ``chunk_size`` positions of every row at a
time, so only [B, chunk, V] logits exist at once. Because the loss is a scalar, the logits'
cotangent is known in the forward pass up to one scale factor; each chunk's contribution to
the hidden states' and the kernel's gradients is formed there (as Liger-Kernel's fused linear
cross-entropy does) and the backward only scales them: the head's FLOPs are autodiff's, with
no recomputation. Its slow, obviously-right twin is ``train.loss.lm_loss_sums`` over full
logits (the tests compare the two, values and gradients).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

DEFAULT_CHUNK = 1024


def resolve_loss(method: str, seq_len: int, chunk_size: int) -> str:
    """``method`` with "auto" resolved: "chunked" when ``seq_len`` is longer than one chunk,
    else "full" (one chunk holds the same logits)."""
    if method != "auto":
        return method
    return "chunked" if seq_len > chunk_size else "full"


def lm_head_loss_sums(hidden: jax.Array, head: jax.Array, targets: jax.Array, mask: jax.Array,
                      *, compute_dtype: jnp.dtype, z_loss_weight: float = 0.0,
                      chunk_size: int = DEFAULT_CHUNK, unroll: bool = False,
                      row_groups: int = 1, position_groups: int = 1) -> dict[str, jax.Array]:
    """Summed next-token losses of ``logits = hidden @ head`` over masked positions.

    Args:
      hidden: [B, T, D] final hidden states (after the final norm).
      head: [D, V] the LM head's kernel (for tied embeddings, the table transposed).
      targets: [B, T] int target ids.
      mask: [B, T] 0 or 1, which positions count.
      compute_dtype: the products' input and output dtype (hidden and head are cast to it, as
        the model's head does); logits are upcast to float32 for the softmax.
      z_loss_weight: weight of PaLM's z-loss, summed ``logsumexp^2``.
      chunk_size: positions of each row whose logits exist at once. Chunk i holds positions
        i, i + n, i + 2n, ... (n chunks): strided, so a sequence sharded over devices in
        contiguous pieces stays sharded within every chunk. T is padded to a multiple of it.
      unroll: no loop over the chunks (for XLA's cost analysis, which counts a loop body once).
      row_groups, position_groups: how many pieces the rows and a chunk's positions are split
        into across devices (``sharding.shard_count``; 1 and 1 on one device). The kernel's
        gradient is summed over chunks per piece, [row_groups, position_groups, D, V], and over
        the pieces once after the last chunk: a sum over rows split across devices inside the
        loop would make XLA all-reduce a whole [D, V] gradient for every chunk.
    Returns:
      float32 scalars: "loss" = ce + z, the one to differentiate; "ce" (summed cross-entropy)
      and "z" (summed z_loss_weight * logsumexp^2), reported without gradients; "tokens" (the
      mask's sum). The gradients of ``hidden`` and ``head`` come back in their own dtypes, the
      kernel's accumulated in float32 across chunks.
    Raises:
      ValueError naming the argument whose shape or value does not fit.
    """
    if hidden.ndim != 3:
        raise ValueError(f"lm_head_loss_sums: hidden must be [B, T, D], got {hidden.shape}")
    if head.ndim != 2 or head.shape[0] != hidden.shape[2]:
        raise ValueError(f"lm_head_loss_sums: head must be [D, V] with D = {hidden.shape[2]}, "
                         f"got {head.shape}")
    for name, value in (("targets", targets), ("mask", mask)):
        if value.shape != hidden.shape[:2]:
            raise ValueError(f"lm_head_loss_sums: {name} must be [B, T] = {hidden.shape[:2]}, "
                             f"got {value.shape}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"lm_head_loss_sums: chunk_size must be a positive int, got "
                         f"{chunk_size!r}")
    size = min(chunk_size, hidden.shape[1])
    for name, groups, dim in (("row_groups", row_groups, hidden.shape[0]),
                              ("position_groups", position_groups, size)):
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or dim % groups:
            raise ValueError(f"lm_head_loss_sums: {name} must be a positive int dividing "
                             f"{dim}, got {groups!r}")
    if not z_loss_weight >= 0:
        raise ValueError(f"lm_head_loss_sums: z_loss_weight must be >= 0, got {z_loss_weight!r}")
    mask = mask.astype(jnp.float32)
    loss, ce, z = _loss_sums(hidden, head, targets.astype(jnp.int32), mask,
                             jnp.dtype(compute_dtype), float(z_loss_weight),
                             size, bool(unroll), (row_groups, position_groups))
    return {"loss": loss, "ce": jax.lax.stop_gradient(ce), "z": jax.lax.stop_gradient(z),
            "tokens": jnp.sum(mask)}


def _chunks(x: jax.Array, size: int, fill) -> jax.Array:
    """[B, T, ...] -> [n, B, size, ...]: chunk i holds positions i, i + n, ... (T padded)."""
    b, t = x.shape[:2]
    n = -(-t // size)
    x = jnp.pad(x, [(0, 0), (0, n * size - t)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return jnp.moveaxis(x.reshape(b, size, n, *x.shape[2:]), 2, 0)


def _unchunk(x: jax.Array, t: int) -> jax.Array:
    """The inverse of ``_chunks``: [n, B, size, ...] -> [B, T, ...]."""
    n, b, size = x.shape[:3]
    return jnp.moveaxis(x, 0, 2).reshape(b, n * size, *x.shape[3:])[:, :t]


def _dot(a: jax.Array, b: jax.Array, contract: tuple, out=None) -> jax.Array:
    return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=out)


def _chunk_logits(h: jax.Array, head: jax.Array) -> jax.Array:
    """[B, S, D] x [D, V] -> [B, S, V] float32: a product in the compute dtype, upcast (the
    model's head returns compute-dtype logits, upcast for the loss). Rows and positions stay
    separate dimensions: merged, a chunk split over devices along both could not stay split."""
    return _dot(h, head, ((2,), (0,))).astype(jnp.float32)


def _chunk_sums(logits: jax.Array, t: jax.Array, m: jax.Array):
    """logsumexp [B, S], and the chunk's summed cross-entropy and logsumexp^2 over its mask."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
    return lse, jnp.sum((lse - picked) * m), jnp.sum(lse * lse * m)


def _prepare(hidden, head, targets, mask, dtype, size):
    return (_chunks(hidden.astype(dtype), size, 0), head.astype(dtype),
            _chunks(targets, size, 0), _chunks(mask, size, 0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _loss_sums(hidden, head, targets, mask, dtype, z_weight, size, unroll, groups):
    """(ce + z, ce, z), float32 scalars, without gradient work (``groups`` is for the
    gradient's sum)."""
    hs, w, ts, ms = _prepare(hidden, head, targets, mask, dtype, size)

    def body(carry, chunk):
        h, t, m = chunk
        _, ce, zz = _chunk_sums(_chunk_logits(h, w), t, m)
        return (carry[0] + ce, carry[1] + zz), None

    zero = jnp.zeros((), jnp.float32)
    (ce, zz), _ = jax.lax.scan(body, (zero, zero), (hs, ts, ms), unroll=unroll)
    z = z_weight * zz
    return ce + z, ce, z


def _loss_sums_fwd(hidden, head, targets, mask, dtype, z_weight, size, unroll, groups):
    hs, w, ts, ms = _prepare(hidden, head, targets, mask, dtype, size)
    vocab = w.shape[1]

    def body(carry, chunk):
        ce_sum, z_sum, d_head = carry
        h, t, m = chunk
        logits = _chunk_logits(h, w)
        lse, ce, zz = _chunk_sums(logits, t, m)
        # d(ce + z_weight lse^2) / d logits = softmax (1 + 2 z_weight lse) - onehot(target),
        # times the mask; formed in float32, rounded to the compute dtype for the products
        # (as autodiff's cotangent of the upcast logits would be).
        scale = m * (1.0 + 2.0 * z_weight * lse)
        d_logits = (jnp.exp(logits - lse[..., None]) * scale[..., None]
                    - jnp.where(jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2)
                                == t[..., None], m[..., None], 0.0)).astype(dtype)
        d_h = _dot(d_logits, w, ((2,), (1,)), jnp.float32).astype(hidden.dtype)
        b, s, d = h.shape
        if groups == (1, 1):  # one device: a plain [B*S, D]^T [B*S, V] product
            part = _dot(h.reshape(b * s, d), d_logits.reshape(b * s, vocab), ((0,), (0,)),
                        jnp.float32)[None, None]
        else:  # summed within each (row piece, position piece), local to a device
            split = lambda x: x.reshape(gb, b // gb, gc, s // gc, x.shape[-1])
            part = jnp.einsum("gbcsd,gbcsv->gcdv", split(h), split(d_logits),
                              preferred_element_type=jnp.float32)
        return (ce_sum + ce, z_sum + zz, d_head + part), d_h

    gb, gc = groups
    zero = jnp.zeros((), jnp.float32)
    init = (zero, zero, jnp.zeros((gb, gc, w.shape[0], vocab), jnp.float32))
    (ce, zz, d_head), d_hs = jax.lax.scan(body, init, (hs, ts, ms), unroll=unroll)
    d_head = jnp.sum(d_head, axis=(0, 1))
    z = z_weight * zz
    d_hidden = _unchunk(d_hs, hidden.shape[1])
    return (ce + z, ce, z), (d_hidden, d_head.astype(head.dtype))


def _loss_sums_bwd(dtype, z_weight, size, unroll, groups, residuals, cotangents):
    # Only the total is differentiated: lm_head_loss_sums stops the gradients of ce and z.
    d_hidden, d_head = residuals
    g = cotangents[0]
    return ((g * d_hidden).astype(d_hidden.dtype), (g * d_head).astype(d_head.dtype), None,
            None)


_loss_sums.defvjp(_loss_sums_fwd, _loss_sums_bwd)


__all__ = ["DEFAULT_CHUNK", "lm_head_loss_sums", "resolve_loss"]
