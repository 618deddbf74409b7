"""Causal depthwise short convolution (the q/k/v convs of Gated DeltaNet)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
      [B, T, C] in x's dtype. Products are accumulated in float32 (K is small, so K shifted
      multiply-adds are cheaper and more exact than a general convolution), cast to the weight's
      dtype as transformers' conv output is, then activated.
    """
    if activation not in (None, "silu"):
        raise ValueError(f"causal_conv1d: unsupported activation {activation!r}")
    b, t, c = x.shape
    k = weight.shape[1]
    w32 = weight.astype(jnp.float32)
    x_pad = jnp.pad(x.astype(jnp.float32), ((0, 0), (k - 1, 0), (0, 0)))
    if segment_ids is not None:
        # Pad with the first id: padded inputs are zero anyway.
        seg_pad = jnp.pad(segment_ids, ((0, 0), (k - 1, 0)), mode="edge")
    out = jnp.zeros((b, t, c), jnp.float32)
    for j in range(k):
        shifted = x_pad[:, j : j + t]  # x[t - (K-1) + j]
        if segment_ids is not None and j < k - 1:
            same = seg_pad[:, j : j + t] == segment_ids
            shifted = jnp.where(same[..., None], shifted, 0.0)
        out = out + shifted * w32[:, j]
    out = out.astype(weight.dtype)
    if activation == "silu":
        out = jax.nn.silu(out.astype(jnp.float32)).astype(weight.dtype)
    return out.astype(x.dtype)
