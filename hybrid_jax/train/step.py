"""One training step: gradient accumulation over micro-batches, AdamW, and skipping of
non-finite steps, as a pure function to jit with shardings."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hybrid_jax.ops.lm_head_loss import lm_head_loss_sums, resolve_loss
from hybrid_jax.ops.moe import load_balancing_loss
from hybrid_jax.sharding import (
    LogicalRules,
    activation_sharding,
    batch_sharding,
    constrain,
    micro_batches_sharding,
    shard_count,
)
from hybrid_jax.train.loss import lm_loss_sums, next_token_targets
from hybrid_jax.train.state import ModelTemplate, TrainState

Batch = dict[str, jax.Array]


def make_loss_fn(template: ModelTemplate, *, z_loss_weight: float = 0.0,
                 mesh: Mesh | None = None, rules: LogicalRules | None = None
                 ) -> Callable[[dict, Batch], tuple[jax.Array, dict]]:
    """``loss_fn(params, micro) -> (loss, sums)``: one micro-batch's summed loss (cross-entropy
    + z-loss + the MoE balancing loss) and its float32 sums "ce", "z", "tokens" (and "aux"),
    as ``make_train_step`` differentiates it and held-out evaluation reads it. ``micro``:
    "tokens" [B, T] int and optionally "segment_ids" [B, T] (0: padding, never scored)."""
    rows = batch_sharding(mesh, rules) if mesh is not None else None

    def loss_fn(params: dict, micro: Batch):
        tokens = micro["tokens"]
        segment_ids = micro.get("segment_ids")
        if rows is not None:
            tokens = jax.lax.with_sharding_constraint(tokens, rows)
        targets, mask = next_token_targets(tokens, segment_ids)
        model = template.model(params)
        cfg = model.config
        method = resolve_loss(cfg.loss_method, tokens.shape[-1], cfg.loss_chunk_size)
        with activation_sharding(mesh, rules):
            hidden, stats = model.features_and_router_stats(tokens, segment_ids=segment_ids)
        if method == "full":
            with activation_sharding(mesh, rules):
                logits = model.logits(hidden)
            with jax.named_scope("loss"):
                sums = lm_loss_sums(logits, targets, mask, z_loss_weight)
            sums["loss"] = sums["ce"] + sums["z"]
        else:
            sums = _chunked_loss(model, hidden, tokens, targets, mask, z_loss_weight, method,
                                 mesh, rules)
        if stats is not None:
            # The load-balancing loss of this micro-batch's router statistics, weighted by
            # its tokens: over micro-batches, the token-weighted mean of each one's loss.
            sums["aux"] = (cfg.router_aux_loss_coef * load_balancing_loss(stats)
                           * sums["tokens"])
            sums["loss"] = sums["loss"] + sums["aux"]
        loss = sums.pop("loss")
        return loss, sums

    return loss_fn


def make_train_step(template: ModelTemplate, optimizer: optax.GradientTransformation, *,
                    z_loss_weight: float = 0.0, schedule: optax.Schedule | None = None,
                    mesh: Mesh | None = None, rules: LogicalRules | None = None
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """``step(state, batch) -> (state, metrics)``, pure.

    ``batch``: "tokens" [A, B, T] int and optionally "segment_ids" [A, B, T] (packed documents;
    segment 0 is padding), A micro-batches accumulated into one update. The loss is summed over
    every micro-batch's unmasked tokens and divided by their total, so A micro-batches of B rows
    give the same update as one batch of A*B rows.

    The model's ``loss_method`` picks the loss: "chunked" takes it ``loss_chunk_size``
    positions of each row at a time (``ops.lm_head_loss``, no [B, T, V] logits; with positions
    split over the context axis, that many of each device's piece), "full" from the model's
    logits, "auto" chunked when T is longer than ``loss_chunk_size``.

    A step whose loss or gradient norm is not finite leaves parameters and optimizer state as
    they were and counts in ``bad_steps``; a good step resets that count.
    Metrics: loss (cross-entropy + z-loss), ce, z_loss, tokens, grad_norm, skipped, and lr
    when ``schedule`` is given.

    With ``mesh``, each micro-batch's rows and positions and the model's activations are
    pinned by ``rules`` (``sharding.activation_sharding``): batch over data x fsdp, positions
    over context, heads / MLP columns / vocabulary over tensor.
    """
    has_moe = template.config.has_moe
    grad_fn = jax.grad(make_loss_fn(template, z_loss_weight=z_loss_weight, mesh=mesh,
                                    rules=rules), has_aux=True)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        names = ("ce", "z", "tokens") + (("aux",) if has_moe else ())
        zero_sums = {k: jnp.zeros((), jnp.float32) for k in names}
        zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)

        def micro_step(carry, micro):
            grads, sums = carry
            g, s = grad_fn(state.params, micro)
            return (jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g),
                    jax.tree.map(jnp.add, sums, s)), None

        (grads, sums), _ = jax.lax.scan(micro_step, (zero_grads, zero_sums), batch)
        n = jnp.maximum(sums["tokens"], 1.0)
        grads = jax.tree.map(lambda g: g / n, grads)
        loss = (sums["ce"] + sums["z"] + sums.get("aux", 0.0)) / n
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                               opt_state=keep(opt_state, state.opt_state),
                               bad_steps=jnp.where(ok, 0, state.bad_steps + 1))
        metrics = {"loss": loss, "ce": sums["ce"] / n, "z_loss": sums["z"] / n,
                   "tokens": sums["tokens"], "grad_norm": grad_norm, "skipped": ~ok}
        if "aux" in sums:
            metrics["aux_loss"] = sums["aux"] / n
        if schedule is not None:
            # The optimizer's own update count (skipped steps do not advance it), as its
            # schedule sees it; the step count without one.
            counts = optax.tree_utils.tree_get_all_with_path(state.opt_state, "count")
            metrics["lr"] = schedule(counts[-1][1] if counts else state.step)
        return new_state, metrics

    return step


def _chunked_loss(model, hidden: jax.Array, tokens: jax.Array, targets: jax.Array,
                  mask: jax.Array, z_loss_weight: float, method: str, mesh: Mesh | None,
                  rules: LogicalRules | None) -> dict[str, jax.Array]:
    """``ops.lm_head_loss``'s sums from the final features [B, T, D], ``loss_chunk_size``
    positions of each row at a time (see ``make_train_step``)."""
    cfg = model.config
    with activation_sharding(mesh, rules):
        # loss_chunk_size positions of each device's piece of a row at a time: with
        # positions split over the context axis, a chunk spans every piece (and, being
        # a multiple of their count or the whole row, splits into them too).
        pieces = shard_count("length", tokens.shape[1])
        chunk = min(cfg.loss_chunk_size * pieces, tokens.shape[1])
        # The devices' pieces of rows and of each chunk's positions, for the head's
        # gradient to be summed per device inside the chunk loop, across devices once.
        groups = shard_count("batch", tokens.shape[0]), pieces
        # The head in the compute dtype, gathered over its fsdp split once per
        # micro-batch, here: inside the chunk loop GSPMD would gather it for every
        # chunk. Its gradient, summed over chunks in float32, comes back in the compute
        # dtype, as every projection kernel's does.
        head = constrain(model.head_kernel.astype(cfg.compute_dtype), (None, "vocab"))
        with jax.named_scope("loss"):
            return lm_head_loss_sums(hidden, head, targets, mask,
                                     compute_dtype=cfg.compute_dtype,
                                     z_loss_weight=z_loss_weight, chunk_size=chunk,
                                     unroll=method == "chunked_unrolled",
                                     row_groups=groups[0], position_groups=groups[1])


def scan_steps(step: Callable) -> Callable:
    """``steps(state, batches) -> (state, metrics)``: ``step`` applied to each of K batches in
    turn (``jax.lax.scan``), batches with a leading K axis ([K, A, B, T]) and metrics stacked
    as [K]. One dispatch and one allocation of the step's temporaries serve K steps: on CPU
    XLA frees and re-maps a step's temporaries at the end of each call, which costs a large
    share of a step's time every few steps."""

    def steps(state: TrainState, batches: Batch) -> tuple[TrainState, dict]:
        return jax.lax.scan(step, state, batches)

    return steps


def jit_train_step(step: Callable, state_shardings: TrainState | None = None,
                   mesh: Mesh | None = None, rules: LogicalRules | None = None, *,
                   steps_per_call: int = 1):
    """``jax.jit`` of a train step: the state donated (updated in place), and with
    ``state_shardings`` and ``mesh`` the state and the [A, B, T] batch pinned to their
    shardings (batch rows over "batch", positions over "length") and metrics replicated.

    ``steps_per_call`` > 1 jits ``scan_steps(step)`` instead: batches [K, A, B, T] with any
    K (each K compiles once), metrics [K]."""
    if steps_per_call < 1:
        raise ValueError(f"jit_train_step: steps_per_call must be >= 1, got {steps_per_call}")
    fn = step if steps_per_call == 1 else scan_steps(step)
    if state_shardings is None or mesh is None:
        return jax.jit(fn, donate_argnums=0)
    batch = micro_batches_sharding(mesh, rules)
    if steps_per_call > 1:
        batch = NamedSharding(mesh, PartitionSpec(None, *batch.spec))
    return jax.jit(fn, in_shardings=(state_shardings, batch),
                   out_shardings=(state_shardings, NamedSharding(mesh, PartitionSpec())),
                   donate_argnums=0)
