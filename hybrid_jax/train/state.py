"""The training state (step, parameters, optimizer state) and its sharded initialisation."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hybrid_jax.config import ModelConfig
from hybrid_jax.model.hybrid_lm import HybridLM
from hybrid_jax.sharding import LogicalRules, param_shardings
from hybrid_jax.tree_paths import path_keys


class TrainState(NamedTuple):
    """Everything a step changes. ``params`` is the model's ``nnx.to_pure_dict`` (float32
    master weights when the config's param dtype is float32); ``step`` counts batches consumed
    (skipped ones too); ``bad_steps`` counts consecutive steps skipped for a non-finite loss or
    gradient."""

    step: jax.Array
    params: dict
    opt_state: Any
    bad_steps: jax.Array


class ModelTemplate(NamedTuple):
    """What rebuilds a ``HybridLM`` from pure parameters: its graph and abstract state."""

    graphdef: nnx.GraphDef
    abstract: nnx.State

    def model(self, params: dict) -> HybridLM:
        state = jax.tree.map(lambda x: x, self.abstract)  # a fresh copy to fill
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)

    @property
    def config(self) -> ModelConfig:
        return nnx.merge(self.graphdef, self.abstract).config


def model_template(config: ModelConfig) -> ModelTemplate:
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: HybridLM(config, rngs=nnx.Rngs(0))))
    return ModelTemplate(graphdef, abstract)


def _init_fn(config: ModelConfig, optimizer: optax.GradientTransformation, seed: int):
    def init() -> TrainState:
        params = nnx.to_pure_dict(nnx.state(HybridLM(config, rngs=nnx.Rngs(seed))))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=optimizer.init(params), bad_steps=jnp.zeros((), jnp.int32))
    return init


def train_state_shardings(abstract: TrainState, mesh: Mesh, rules: LogicalRules | None = None
                          ) -> TrainState:
    """Shardings for a ``TrainState`` (abstract or concrete): parameters by their logical axes;
    each optimizer-state leaf that mirrors a parameter (Adam's moments) like that parameter;
    everything else (counts, scalars) replicated."""
    params = param_shardings(abstract.params, mesh, rules)
    by_path = {path_keys(p): (s, leaf.shape) for (p, s), leaf in zip(
        jax.tree_util.tree_flatten_with_path(params)[0],
        jax.tree_util.tree_leaves(abstract.params))}
    replicated = NamedSharding(mesh, PartitionSpec())

    def opt_leaf(path, leaf):
        keys = path_keys(path)
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None and tuple(hit[1]) == tuple(leaf.shape):
                return hit[0]
        return replicated

    opt = jax.tree_util.tree_map_with_path(opt_leaf, abstract.opt_state)
    return TrainState(step=replicated, params=params, opt_state=opt, bad_steps=replicated)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """Abstract arrays that carry where each leaf goes (a ``TrainState``, or any pytree with
    its shardings): targets for restoring a checkpoint or for lowering a step without
    allocating anything."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, shardings)


def _sharded_init(config: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                  rules: LogicalRules | None, seed: int):
    init = _init_fn(config, optimizer, seed)
    return jax.jit(init, out_shardings=train_state_shardings(jax.eval_shape(init), mesh, rules))


def abstract_train_state(config: ModelConfig, optimizer: optax.GradientTransformation,
                         seed: int = 0) -> TrainState:
    """The ``TrainState``'s shapes and dtypes, computing nothing."""
    return jax.eval_shape(_init_fn(config, optimizer, seed))


def init_train_state(config: ModelConfig, optimizer: optax.GradientTransformation, *,
                     mesh: Mesh | None = None, rules: LogicalRules | None = None,
                     seed: int = 0) -> TrainState:
    """A fresh ``TrainState``. With ``mesh``, initialised under jit straight into its shards:
    no device (or host) ever holds a whole parameter that the mesh splits. Shardings that do
    not divide a parameter raise ``ShardingError`` before anything compiles."""
    if mesh is None:
        return jax.jit(_init_fn(config, optimizer, seed))()
    return _sharded_init(config, optimizer, mesh, rules, seed)()


def lower_sharded_init(config: ModelConfig, optimizer: optax.GradientTransformation,
                       mesh: Mesh, rules: LogicalRules | None = None, seed: int = 0):
    """The sharded initialisation lowered for ``mesh`` without running it (for memory checks
    of large presets: ``.compile().memory_analysis()``)."""
    return _sharded_init(config, optimizer, mesh, rules, seed).lower()
