"""Choosing the next token from logits: greedy, temperature, top-k and nucleus (top-p)."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax.inference.errors import InputError


def is_int(x) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def is_real(x) -> bool:
    """A Python or NumPy int or float, not a bool."""
    return is_int(x) or isinstance(x, (float, np.floating))


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens. ``temperature == 0`` is greedy (argmax; the other fields are unused).

    top_k: keep the k most likely tokens (None: all).
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p
      (None or 1.0: all); the most likely token is always kept.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        # Normalised to Python scalars (NumPy ones welcome): the config is a jit static argument.
        t, k, p = self.temperature, self.top_k, self.top_p
        if not is_real(t) or not t >= 0:
            raise InputError(f"temperature must be a number >= 0, got {t!r}")
        object.__setattr__(self, "temperature", float(t))
        if k is not None:
            if not is_int(k) or k <= 0:
                raise InputError(f"top_k must be a positive int or None, got {k!r}")
            object.__setattr__(self, "top_k", int(k))
        if p is not None:
            if not is_real(p) or not 0.0 < p <= 1.0:
                raise InputError(f"top_p must be a number in (0, 1], got {p!r}")
            object.__setattr__(self, "top_p", float(p))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: jax.Array, *, top_k: int | None = None,
                  top_p: float | None = None) -> jax.Array:
    """Set the logits of tokens outside the top-k / top-p set to -inf.

    Args:
      logits: [B, V] float32 (already divided by the temperature).
    Returns:
      [B, V] float32. Ties at the k-th largest logit are all kept.
    """
    neg_inf = jnp.asarray(-jnp.inf, logits.dtype)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if top_p is not None and top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep a token if the tokens ranked above it hold less than top_p: the smallest set
        # reaching top_p, and always the first.
        before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = before < top_p
        keep = jnp.zeros_like(keep_sorted).at[
            jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, neg_inf)
    return logits


def sample_tokens(logits: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """One token per row.

    Args:
      logits: [B, V] float32.
      key: a PRNG key (unused when greedy).
    Returns:
      [B] int32.
    """
    logits = logits.astype(jnp.float32)
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / sampling.temperature, top_k=sampling.top_k,
                           top_p=sampling.top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
