"""The programs ``hybrid-jax aot`` compiles, as (jitted function, abstract sharded arguments):
the train step, a prefill and one decode step, built from the library's own step, model and
sharding rules, so what compiles here is what runs on the pod.

Every builder checks that the mesh divides what it must (parameters, batch rows, positions)
and raises ``AOTError`` naming the dimension before anything is traced.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from hybrid_jax.aot.topology import AOTError
from hybrid_jax.config import ModelConfig
from hybrid_jax.model.cache import DecodeCache, cache_shardings, init_cache
from hybrid_jax.sharding import (
    LogicalRules,
    ShardingError,
    activation_sharding,
    batch_sharding,
    check_batch,
    micro_batches_sharding,
    param_shardings,
)
from hybrid_jax.train.optimizer import OptimizerConfig, make_optimizer, make_schedule
from hybrid_jax.train.state import (
    abstract_train_state,
    model_template,
    train_state_shardings,
    with_shardings,
)
from hybrid_jax.train.step import jit_train_step, make_train_step

PROGRAMS = ("train", "prefill", "decode")


@dataclass(frozen=True)
class Workload:
    """What one program call processes. ``batch``: rows (sequences) per call, global;
    ``seq_len``: positions per row (train, prefill) or the cache length a decode step reads;
    ``micro_batches``: gradient accumulation in the train step (rows split into this many
    micro-batches, run one after another)."""

    batch: int
    seq_len: int
    micro_batches: int = 1

    def __post_init__(self) -> None:
        for name in ("batch", "seq_len", "micro_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AOTError(f"{name} must be a positive int, got {value!r}")
        if self.batch % self.micro_batches:
            raise AOTError(f"micro_batches {self.micro_batches} does not divide the batch "
                           f"{self.batch}")


Built = tuple[Callable, tuple]  # (a jitted function, abstract arguments to lower it with)


def _checked(what: str, fn: Callable) -> Any:
    try:
        return fn()
    except ShardingError as e:
        raise AOTError(f"{what}: {e}") from None


def train_program(config: ModelConfig, mesh: Mesh, work: Workload,
                  optimizer: OptimizerConfig | None = None,
                  rules: LogicalRules | None = None) -> Built:
    """The train step (``train.step``: forward, backward, AdamW, the config's remat policy)
    over [micro_batches, batch / micro_batches, seq_len] tokens, state donated."""
    optimizer = optimizer or OptimizerConfig()
    opt = make_optimizer(optimizer)
    abstract = abstract_train_state(config, opt)
    shardings = _checked("parameters", lambda: train_state_shardings(abstract, mesh, rules))
    tokens_sharding = micro_batches_sharding(mesh, rules)
    shape = (work.micro_batches, work.batch // work.micro_batches, work.seq_len)
    _checked("batch [micro-batches, rows, positions]",
             lambda: check_batch(shape, tokens_sharding, "tokens"))
    step = make_train_step(model_template(config), opt, z_loss_weight=1e-4,
                           schedule=make_schedule(optimizer), mesh=mesh, rules=rules)
    batch = {"tokens": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=tokens_sharding)}
    return (jit_train_step(step, shardings, mesh, rules),
            (with_shardings(abstract, shardings), batch))


def _inference_params(config: ModelConfig, mesh: Mesh, rules: LogicalRules | None):
    template = model_template(config)
    shardings = _checked("parameters", lambda: param_shardings(template.abstract, mesh, rules))
    return template.graphdef, with_shardings(template.abstract, shardings)


def _cache(config: ModelConfig, mesh: Mesh, batch: int, length: int) -> DecodeCache:
    abstract = jax.eval_shape(lambda: init_cache(config, batch, length))
    shardings = cache_shardings(abstract, mesh, batch_axis=("data", "fsdp", "expert"))
    for leaf, sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
        _checked("decode cache", lambda: check_batch(leaf.shape, sharding, "cache entry"))
    return with_shardings(abstract, shardings)


def _extend(graphdef: nnx.GraphDef, params: nnx.State, cache: DecodeCache,
            input_ids: jax.Array, *, mesh: Mesh, rules: LogicalRules | None
            ) -> tuple[jax.Array, DecodeCache]:
    """``HybridLM.extend`` of [B, T] tokens under the mesh's activation sharding (so that the
    GDN kernels run per shard): (last-position logits [B, V] float32, the cache T longer).
    A prefill is ``inference.prefill``'s computation; T = 1 is one step of its decode loop."""
    with activation_sharding(mesh, rules):
        model = nnx.merge(graphdef, params)
        logits, cache = model.extend(input_ids, cache, last_only=True)
    return logits[:, 0], cache


def _jit_extend(mesh: Mesh, rules: LogicalRules | None) -> Callable:
    return jax.jit(functools.partial(_extend, mesh=mesh, rules=rules), static_argnums=0,
                   donate_argnums=2)


def prefill_program(config: ModelConfig, mesh: Mesh, work: Workload,
                    rules: LogicalRules | None = None) -> Built:
    """A prefill of a [batch, seq_len] prompt into an empty cache of seq_len positions (rows
    over data x fsdp, heads over tensor), the cache donated."""
    graphdef, params = _inference_params(config, mesh, rules)
    rows = batch_sharding(mesh, rules)
    shape = (work.batch, work.seq_len)
    _checked("prompt [rows, positions]", lambda: check_batch(shape, rows, "input_ids"))
    ids = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rows)
    cache = _cache(config, mesh, work.batch, work.seq_len)
    return _jit_extend(mesh, rules), (graphdef, params, cache, ids)


def decode_program(config: ModelConfig, mesh: Mesh, work: Workload,
                   rules: LogicalRules | None = None) -> Built:
    """One decode step for ``batch`` rows against a cache of ``seq_len`` positions (its
    attention layers read all of them), the cache donated."""
    graphdef, params = _inference_params(config, mesh, rules)
    rows = NamedSharding(mesh, (rules or LogicalRules()).spec(("batch", None)))
    _checked("decode tokens [rows, 1]", lambda: check_batch((work.batch, 1), rows, "tokens"))
    tokens = jax.ShapeDtypeStruct((work.batch, 1), jnp.int32, sharding=rows)
    cache = _cache(config, mesh, work.batch, work.seq_len)
    return _jit_extend(mesh, rules), (graphdef, params, cache, tokens)


BUILDERS: dict[str, Callable[..., Built]] = {
    "train": train_program, "prefill": prefill_program, "decode": decode_program}
