"""Causal depthwise short convolution (the q/k/v convs of Gated DeltaNet)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check_activation(activation: str | None) -> None:
    if activation not in (None, "silu"):
        raise ValueError(f"causal_conv1d: unsupported activation {activation!r}")


def _taps(x_ext: jax.Array, weight: jax.Array, t: int, same_segment=None) -> jax.Array:
    """``out[t] = sum_j weight[:, j] * x_ext[t + j]`` for t < T, accumulated in float32.

    x_ext: [B, K-1+T, C] float32 (the K-1 inputs before the first output, then the T inputs).
    same_segment: optional callable j -> [B, T] bool, False where tap j reads another segment.
    K is small, so K shifted multiply-adds are cheaper and more exact than a general convolution.
    """
    k = weight.shape[1]
    w32 = weight.astype(jnp.float32)
    out = jnp.zeros(x_ext.shape[:1] + (t,) + x_ext.shape[2:], jnp.float32)
    for j in range(k):
        shifted = x_ext[:, j : j + t]  # x[t - (K-1) + j]
        if same_segment is not None and j < k - 1:
            shifted = jnp.where(same_segment(j)[..., None], shifted, 0.0)
        out = out + shifted * w32[:, j]
    return out


def _finish(out: jax.Array, weight: jax.Array, activation: str | None, dtype) -> jax.Array:
    """Cast to the weight's dtype as transformers' conv output is, then activate."""
    out = out.astype(weight.dtype)
    if activation == "silu":
        out = jax.nn.silu(out.astype(jnp.float32)).astype(weight.dtype)
    return out.astype(dtype)


def _conv_after(x: jax.Array, weight: jax.Array, before: jax.Array,
                segment_ids: jax.Array | None, before_ids: jax.Array | None,
                activation: str | None) -> jax.Array:
    """The conv of x [B, T, C] whose K-1 preceding inputs are ``before`` [B, K-1, C];
    ``before_ids`` [B, K-1] are their segment ids (with ``segment_ids`` [B, T], or both None)."""
    t = x.shape[1]
    x_ext = jnp.concatenate([before.astype(jnp.float32), x.astype(jnp.float32)], axis=1)
    same = None
    if segment_ids is not None:
        ids_ext = jnp.concatenate([before_ids, segment_ids], axis=1)
        same = lambda j: ids_ext[:, j : j + t] == segment_ids
    return _finish(_taps(x_ext, weight, t, same), weight, activation, x.dtype)


def causal_conv1d(
    x: jax.Array,
    weight: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    activation: str | None = None,
) -> jax.Array:
    """Depthwise causal convolution: ``y[t, c] = sum_j weight[c, j] * x[t - (K-1) + j, c]``.

    The last tap (j = K-1) multiplies the current token, as in torch's ``conv1d`` with K-1 left
    padding. Positions before the sequence start, or in an earlier segment, read as zeros.

    Args:
      x: [B, T, C].
      weight: [C, K].
      segment_ids: optional [B, T]; a token never sees inputs from a different segment.
      activation: None or "silu".
    Returns:
      [B, T, C] in x's dtype (products accumulated in float32).
    """
    _check_activation(activation)
    b, _, c = x.shape
    k = weight.shape[1]
    before = jnp.zeros((b, k - 1, c), jnp.float32)
    # The inputs before the start are zero, so their ids only need a shape: the first id's.
    before_ids = (None if segment_ids is None
                  else jnp.repeat(segment_ids[:, :1], k - 1, axis=1))
    return _conv_after(x, weight, before, segment_ids, before_ids, activation)


def causal_conv1d_context_parallel(
    x: jax.Array,
    weight: jax.Array,
    *,
    axis_name: str | tuple[str, ...],
    segment_ids: jax.Array | None = None,
    activation: str | None = None,
) -> jax.Array:
    """``causal_conv1d`` of a sequence split along ``axis_name``, called inside
    ``jax.shard_map``: device i holds positions [i T_local, (i + 1) T_local) of every row.

    Each device receives the K-1 inputs before its piece, and their segment ids, from the
    previous device (one ``ppermute`` of [B, K-1, C]; the first device receives zeros, the
    sequence start). Taps that reach into another document read zero, as in
    ``causal_conv1d``, so a document may start anywhere, on a piece boundary or inside a halo.
    The gradient of the halo goes back to the previous device by the ``ppermute``'s transpose.

    Args:
      x: [B, T_local, C], this device's piece; T_local >= K-1.
      weight: [C_local, K] (the channels as x holds them).
      segment_ids: optional [B, T_local], this device's piece.
      activation: None or "silu".
    Returns:
      [B, T_local, C] in x's dtype: this device's piece of ``causal_conv1d`` of the whole.
    """
    _check_activation(activation)
    t, k = x.shape[1], weight.shape[1]
    if t < k - 1:
        raise ValueError(f"causal_conv1d_context_parallel: each device's piece has {t} "
                         f"positions, fewer than the K-1 = {k - 1} the conv reaches back")
    forward = [(i, i + 1) for i in range(jax.lax.axis_size(axis_name) - 1)]
    before = jax.lax.ppermute(x[:, t - (k - 1):], axis_name, forward)
    before_ids = (None if segment_ids is None
                  else jax.lax.ppermute(segment_ids[:, t - (k - 1):], axis_name, forward))
    return _conv_after(x, weight, before, segment_ids, before_ids, activation)


def causal_conv1d_continue(
    x: jax.Array,
    window: jax.Array,
    weight: jax.Array,
    *,
    activation: str | None = None,
    valid: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``causal_conv1d`` of x continuing a sequence whose last K-1 inputs were ``window``.

    This is the cached form used by prefill and decode: with ``window`` all zeros it equals
    ``causal_conv1d(x)``, and feeding a sequence in pieces, each with the window the previous
    piece returned, equals feeding it at once.

    Args:
      x: [B, T, C] (T >= 1).
      window: [B, K-1, C], the inputs just before x (zeros at a sequence start).
      weight: [C, K].
      activation: None or "silu".
      valid: optional [B, T] bool, False on left padding (padding before a row's first real
        token of this piece). Padding is skipped: the window continues straight into the row's
        first real token, and the new window is as if the padding were not there.
    Returns:
      (y [B, T, C] in x's dtype, meaningless at padding; new window [B, K-1, C] in window's
      dtype: the last K-1 inputs of window followed by x's real tokens).
    """
    _check_activation(activation)
    b, t, c = x.shape
    k = weight.shape[1]
    if window.shape != (b, k - 1, c):
        raise ValueError(f"causal_conv1d_continue: window must be [B, K-1, C] = "
                         f"{(b, k - 1, c)}, got {window.shape}")
    ext = jnp.concatenate([window.astype(x.dtype), x], axis=1)  # [B, K-1+T, C]
    if valid is not None:
        # Move row b's n_pad padding positions in front of the window: position e of the
        # re-ordered row reads 0 (e < n_pad), the window (e < n_pad + K-1), else x as it was.
        n_pad = (t - jnp.sum(valid, axis=1, dtype=jnp.int32))[:, None]  # [B, 1]
        e = jnp.arange(k - 1 + t, dtype=jnp.int32)[None, :]
        src = jnp.where(e < n_pad + k - 1, e - n_pad, e)
        ext = jnp.take_along_axis(ext, jnp.maximum(src, 0)[..., None], axis=1)
        ext = jnp.where((src >= 0)[..., None], ext, jnp.zeros((), ext.dtype))
    y = _finish(_taps(ext.astype(jnp.float32), weight, t), weight, activation, x.dtype)
    return y, ext[:, t:].astype(window.dtype)
