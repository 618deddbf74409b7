"""Reading a plan's parameters from the checkpoint, one bounded box at a time.

A parameter of the stacked decoder blocks ([n, ...], see ``hybrid_jax.model.stack``) is filled
one layer at a time (HF layer ``j * p + i`` is row j of position i's parameters), and each
tensor in boxes of at most ``READ_BLOCK_BYTES`` that are contiguous in the checkpoint, so that
at most one box of a file is mapped or copied at a time beside the result. The destination
buffers come from ``alloc`` (``host_views.aligned_empty`` when the CPU backend is to use them in
place).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
from flax import nnx

from hybrid_jax.config import ModelConfig
from hybrid_jax.convert.plan import Choice, Plan
from hybrid_jax.model.hybrid_lm import HybridLM
from hybrid_jax.tree_paths import flat_paths

ParamPath = tuple[str | int, ...]
Reader = Callable[[], np.ndarray]
Alloc = Callable[[tuple[int, ...], np.dtype], np.ndarray]

READ_BLOCK_BYTES = 32 * 2**20


def param_shapes(cfg: ModelConfig) -> dict[ParamPath, tuple[int, ...]]:
    """Every parameter of ``HybridLM(cfg)`` (pure-dict paths, in the model's order): its shape.
    Nothing is allocated."""
    abstract = nnx.eval_shape(lambda: HybridLM(cfg, rngs=nnx.Rngs(0)))
    return {path: tuple(leaf.shape)
            for path, leaf in flat_paths(nnx.to_pure_dict(nnx.state(abstract))).items()}


def stacked_slots(cfg: ModelConfig, plan: Plan) -> Iterator[tuple[ParamPath, list[Choice]]]:
    """Per stacked parameter of the decoder blocks: its model path, and per block copy j the
    choice that fills its row j."""
    period = cfg.layer_period
    n_blocks = cfg.num_hidden_layers // period
    for i in range(period):
        per_copy = [plan.layers[j * period + i] for j in range(n_blocks)]
        for slot, first in enumerate(per_copy[0]):
            yield (("stack", "blocks", "layers", i) + first.target,
                   [choices[slot] for choices in per_copy])


def check_covered(sources: dict[ParamPath, object], expected: dict[ParamPath, object]) -> None:
    """Internal check: the plan gives every parameter of the model exactly one source."""
    if set(sources) != set(expected):
        raise AssertionError(f"internal: parameters without a source: "
                             f"{sorted(set(expected) ^ set(sources))}")


def read_blocked(choice: Choice, out: np.ndarray) -> np.ndarray:
    """Fill ``out`` (our parameter's shape, any float dtype: values are cast) from ``choice``,
    reading boxes of at most ``READ_BLOCK_BYTES`` that are contiguous in the checkpoint (torch's
    leading axis: our last axis for a transposed kernel, else our first), so that no more than
    one box of the file is mapped or copied at a time beside the result. Returns ``out``."""
    shape = out.shape
    if not out.size:
        return out
    axis = 1 if choice.transposed and len(shape) == 2 else 0
    other = math.prod(shape) // shape[axis]
    step = max(1, READ_BLOCK_BYTES // max(1, other * out.dtype.itemsize))
    full = tuple((0, n) for n in shape)
    for a in range(0, shape[axis], step):
        b = min(shape[axis], a + step)
        spans = full[:axis] + ((a, b),) + full[axis + 1:]
        box = choice.read(spans)
        if axis == 0:
            out[a:b] = box
        else:
            out[:, a:b] = box
        del box
    return out


def param_readers(cfg: ModelConfig, plan: Plan, alloc: Alloc = np.empty
                  ) -> dict[ParamPath, tuple[tuple[int, ...], Reader]]:
    """For every parameter of ``HybridLM(cfg)``, in the model's order: its shape, and ``read()``,
    which reads it from the checkpoint into ``alloc(shape, cfg.params_dtype)`` (a stacked
    [n, ...] parameter one layer at a time, each tensor in boxes of <= ``READ_BLOCK_BYTES``) and
    returns it."""
    expected = param_shapes(cfg)
    pdtype = np.dtype(cfg.params_dtype)
    readers: dict[ParamPath, Reader] = {}
    for c in plan.global_choices:
        shape = expected[c.target]
        readers[c.target] = lambda c=c, shape=shape: read_blocked(c, alloc(shape, pdtype))
    for target, per_copy in stacked_slots(cfg, plan):
        shape = expected[target]

        def read(per_copy=per_copy, shape=shape) -> np.ndarray:
            out = alloc(shape, pdtype)
            for j, choice in enumerate(per_copy):
                read_blocked(choice, out[j])
            return out

        readers[target] = read
    check_covered(readers, expected)
    return {p: (shape, readers[p]) for p, shape in expected.items()}
