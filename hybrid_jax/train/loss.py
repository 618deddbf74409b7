"""The language-modelling loss on packed sequences: next-token cross-entropy that never crosses
a document boundary, plus z-loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def next_token_targets(tokens: jax.Array, segment_ids: jax.Array | None = None,
                       pad_segment: int | None = 0) -> tuple[jax.Array, jax.Array]:
    """Targets and loss mask for ``tokens`` [B, T].

    targets[:, t] = tokens[:, t + 1]; the mask is 0 at the last position, where the next token
    belongs to another document (a different segment id), and on positions whose segment is
    ``pad_segment`` (padding). Returns (targets [B, T] int32, mask [B, T] float32).
    """
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    mask = jnp.ones(tokens.shape, bool).at[:, -1].set(False)
    if segment_ids is not None:
        same = segment_ids[:, 1:] == segment_ids[:, :-1]
        mask = mask & jnp.concatenate([same, jnp.zeros_like(same[:, :1])], axis=1)
        if pad_segment is not None:
            mask = mask & (segment_ids != pad_segment)
    return targets.astype(jnp.int32), mask.astype(jnp.float32)


def lm_loss_sums(logits: jax.Array, targets: jax.Array, mask: jax.Array,
                 z_loss_weight: float = 0.0) -> dict[str, jax.Array]:
    """Summed (not averaged) losses over masked positions, so micro-batches add up exactly.

    Args: logits [B, T, V] (upcast to float32), targets [B, T] int, mask [B, T] (0 or 1).
    Returns float32 scalars: "ce" (summed cross-entropy), "z" (summed z_loss_weight *
    logsumexp^2, PaLM's z-loss), "tokens" (the mask's sum).
    """
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    return {"ce": jnp.sum((lse - picked) * mask),
            "z": z_loss_weight * jnp.sum(lse ** 2 * mask),
            "tokens": jnp.sum(mask)}
