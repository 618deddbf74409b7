"""AdamW as OLMo trains: linear warmup then cosine or WSD decay, no weight decay on norms,
embeddings and the GDN gate parameters, global-norm gradient clipping."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax

from hybrid_jax.tree_paths import path_keys

SCHEDULES = ("cosine", "wsd", "constant")


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW and its learning-rate schedule.

    ``schedule``: "cosine" (warmup, then cosine from ``lr`` to ``lr * min_lr_ratio`` at
    ``total_steps``), "wsd" (warmup, stable at ``lr``, then linear decay to
    ``lr * min_lr_ratio`` over the last ``decay_fraction`` of the steps) or "constant" (after
    warmup). ``clip_norm`` None or 0 disables clipping.
    """

    lr: float = 3e-4
    warmup_steps: int = 100
    total_steps: int = 1000
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float | None = 1.0

    def __post_init__(self) -> None:
        def fail(field: str, why: str) -> None:
            raise ValueError(f"OptimizerConfig.{field}: {why}")

        if self.schedule not in SCHEDULES:
            fail("schedule", f"{self.schedule!r} is not one of {SCHEDULES}")
        if not self.lr > 0:
            fail("lr", f"must be positive, got {self.lr}")
        if self.warmup_steps < 0:
            fail("warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if self.total_steps < max(self.warmup_steps, 1):
            fail("total_steps", f"must be at least warmup_steps and 1, got {self.total_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            fail("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 < self.decay_fraction <= 1:
            fail("decay_fraction", f"must be in (0, 1], got {self.decay_fraction}")
        if self.weight_decay < 0:
            fail("weight_decay", f"must be >= 0, got {self.weight_decay}")
        if self.clip_norm is not None and self.clip_norm < 0:
            fail("clip_norm", f"must be >= 0 or None, got {self.clip_norm}")


def make_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Learning rate by step (0-based, the count of earlier updates): linear warmup reaching
    ``lr`` at step ``warmup_steps - 1`` (step 0 gets ``lr / warmup_steps``, not 0), then the
    configured decay from step ``warmup_steps`` to ``total_steps``."""
    final = cfg.lr * cfg.min_lr_ratio
    warm = max(cfg.warmup_steps, 1)
    rest = cfg.total_steps - cfg.warmup_steps

    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warmup = cfg.lr * jnp.minimum((step + 1) / warm, 1.0)
        after = jnp.clip(step - cfg.warmup_steps, 0, rest)
        if cfg.schedule == "constant" or rest == 0:
            decayed = jnp.asarray(cfg.lr, jnp.float32)
        elif cfg.schedule == "cosine":
            decayed = final + (cfg.lr - final) * 0.5 * (1 + jnp.cos(jnp.pi * after / rest))
        else:  # wsd
            decay_steps = max(int(round(rest * cfg.decay_fraction)), 1)
            into = jnp.clip(after - (rest - decay_steps), 0, decay_steps) / decay_steps
            decayed = cfg.lr + (final - cfg.lr) * into
        return jnp.where(step < cfg.warmup_steps, warmup, decayed)

    return schedule


# Parameters AdamW does not decay: norms, the embedding, and the GDN's per-head decay
# parameters (A_log, dt_bias), which act as biases (OLMo-core and FLA exempt them likewise).
NO_DECAY_NAMES = ("embed", "A_log", "dt_bias")


def decays(path: Sequence[str | int]) -> bool:
    """Whether the parameter at ``path`` (pure-dict keys) gets weight decay."""
    keys = [str(k) for k in path if k != "value"]
    return not any(k in NO_DECAY_NAMES or k.endswith("norm") for k in keys)


def weight_decay_mask(params) -> object:
    """A pytree of bools like ``params``: True where AdamW applies weight decay."""
    return jax.tree_util.tree_map_with_path(lambda path, _: decays(path_keys(path)), params)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW with the schedule and the weight-decay mask."""
    adamw = optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=weight_decay_mask)
    if cfg.clip_norm:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
    return adamw
