"""Building a ``HybridLM`` from a plan: on the default device, or sharded over devices.

Plain: each parameter is read into a 64-byte-aligned host buffer that the CPU backend then uses
in place (``device_put(may_alias=True)``): no second copy of any parameter, so loading peaks at
the model's bytes plus one read box.

Sharded: each parameter is made with ``jax.make_array_from_callback``; each device's callback
reads only its own box of the checkpoint (on the stacked [n, ...] parameters, the box's first
axis picks which layers' tensors are read at all), and devices holding the same box share one
read. The shardings are checked against every parameter's shape before any array is made.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from hybrid_jax.config import ModelConfig
from hybrid_jax.convert.hf_names import describe_problems
from hybrid_jax.convert.plan import Plan
from hybrid_jax.convert.reading import ParamPath, check_covered, param_readers, stacked_slots
from hybrid_jax.convert.sources import Spans
from hybrid_jax.model.host_views import aligned_empty
from hybrid_jax.model.hybrid_lm import HybridLM
from hybrid_jax.sharding import sharding_problem
from hybrid_jax.tree_paths import flat_paths, set_path


def build(cfg: ModelConfig, plan: Plan, shardings: Any = None) -> HybridLM:
    """``HybridLM(cfg)`` holding the checkpoint's weights as ``plan`` reads them; ``shardings``
    as ``from_hf``'s (None: unsharded arrays on the default device)."""
    abstract = nnx.eval_shape(lambda: HybridLM(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    if shardings is not None:
        expected = flat_paths(pure)
        resolved = resolve_shardings(shardings, {p: tuple(v.shape) for p, v in expected.items()})
        _build_sharded(cfg, plan, pure, expected, resolved)
    else:
        for path, (_, read) in param_readers(cfg, plan, aligned_empty).items():
            set_path(pure, path, jax.device_put(read(), may_alias=True))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------- shardings
def _param_name(path: ParamPath) -> str:
    return ".".join(str(k) for k in path)


def _given_shardings(shardings: Any, shapes: dict[ParamPath, tuple[int, ...]],
                     problems: list[str]) -> dict[ParamPath, Any]:
    """Per parameter path what ``shardings`` gives it (one Sharding for all, a callable, or a
    pytree), appending to ``problems`` the paths a pytree misses or adds."""
    if isinstance(shardings, jax.sharding.Sharding):  # one sharding for every parameter
        return dict.fromkeys(shapes, shardings)
    if not isinstance(shardings, (Mapping, nnx.State)) and callable(shardings):
        return {path: shardings(path, shape) for path, shape in shapes.items()}
    tree = nnx.to_pure_dict(shardings) if isinstance(shardings, nnx.State) else shardings
    flat = flat_paths(tree, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    given = {}
    for key, leaf in flat.items():
        if key not in shapes and key[-1:] == ("value",):  # a Variable's value attribute
            key = key[:-1]
        given[key] = leaf
    for path in shapes:
        if path not in given:
            problems.append(f"parameter {_param_name(path)} has no sharding (the shardings "
                            f"pytree must match the model's parameters)")
    for path in given:
        if path not in shapes:
            problems.append(f"sharding given for {_param_name(path)}, which is not a "
                            f"parameter of this model")
    return given


def resolve_shardings(shardings: Any, shapes: dict[ParamPath, tuple[int, ...]]
                      ) -> dict[ParamPath, jax.sharding.Sharding]:
    """Per parameter path its Sharding, checked against the parameter's shape.

    Raises ValueError naming every parameter whose sharding is missing, unexpected, not a Sharding
    or does not divide its shape.
    """
    problems: list[str] = []
    given = _given_shardings(shardings, shapes, problems)
    out: dict[ParamPath, jax.sharding.Sharding] = {}
    for path, shape in shapes.items():
        if path not in given:
            continue
        s, name = given[path], _param_name(path)
        if not isinstance(s, jax.sharding.Sharding):
            problems.append(f"parameter {name}: expected a jax.sharding.Sharding, got "
                            f"{type(s).__name__}")
            continue
        problem = sharding_problem(s, shape)
        if problem:
            problems.append(f"parameter {name} {list(shape)}: {problem}")
            continue
        out[path] = s
    if problems:
        raise ValueError(describe_problems(problems, "shardings do not fit the model's parameters"))
    return out


# ----------------------------------------------------------------------------- sharded build
def _normalize(index: tuple[slice, ...], shape: tuple[int, ...]) -> Spans:
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    spans = []
    for sl, size in zip(index, shape):
        start, stop, step = sl.indices(size)
        if step != 1:
            raise AssertionError(f"internal: strided shard index {index}")
        spans.append((start, max(start, stop)))
    return tuple(spans)


def _box_readers(cfg: ModelConfig, plan: Plan) -> dict[ParamPath, Callable[[Spans], np.ndarray]]:
    """Per model parameter: a box of it -> its values, read from the checkpoint."""
    readers = {c.target: c.read for c in plan.global_choices}
    for target, per_copy in stacked_slots(cfg, plan):
        reads = [choice.read for choice in per_copy]

        def read(index: Spans, reads=reads) -> np.ndarray:
            (a, b), rest = index[0], index[1:]
            return np.stack([reads[j](rest) for j in range(a, b)])

        readers[target] = read
    return readers


def _build_sharded(cfg: ModelConfig, plan: Plan, pure: dict, expected: dict[ParamPath, Any],
                   shardings: dict[ParamPath, jax.sharding.Sharding]) -> None:
    """Fill ``pure`` with arrays made by ``jax.make_array_from_callback``: each device's callback
    reads only its box of the checkpoint tensors (on the stacked [n, ...] parameters, the box's
    first axis picks which layers' tensors are read at all)."""
    readers = _box_readers(cfg, plan)
    check_covered(readers, expected)
    dtype = cfg.params_dtype
    for path, want in expected.items():
        shape, read = tuple(want.shape), readers[path]
        cache: dict[Spans, np.ndarray] = {}  # devices holding the same box share one read

        def callback(index: tuple[slice, ...], shape=shape, read=read, cache=cache,
                     path=path) -> np.ndarray:
            spans = _normalize(index, shape)
            if spans not in cache:
                box = np.asarray(read(spans)).astype(dtype, copy=False)
                want_shape = tuple(b - a for a, b in spans)
                if box.shape != want_shape:
                    raise AssertionError(f"internal: read {box.shape} for {path} {spans}")
                cache[spans] = box
            return cache[spans]

        set_path(pure, path, jax.make_array_from_callback(shape, shardings[path], callback))
