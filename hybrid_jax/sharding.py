"""Device meshes, logical axes and shardings for parameters, optimizer state and batches.

A mesh has five named axes (any of size 1):

    data     pure data parallelism: batch rows split, parameters replicated
    fsdp     data parallelism with parameters, gradients and optimizer state sharded (ZeRO-3)
    expert   expert parallelism: the MoE experts split (each device holds E / size of them),
             batch rows split too; an MoE layer exchanges its tokens across the axis
             (``ops.moe_parallel``), every other weight is replicated over it
    tensor   tensor parallelism: heads, MLP width and vocabulary split
    context  sequence parallelism: positions split (the GDN rule and attention pass state
             and keys between devices), and parameters split with fsdp's (ZeRO over the
             context group too: the train state per device shrinks as context grows)

Every parameter dimension has a logical name (``param_logical_axes``: "embed", "mlp", "heads",
"kv_heads", "gdn_heads", "gdn_key_heads", "vocab", "layers", ...) and ``LogicalRules`` map
logical names to mesh axes. Shardings are checked against the shapes before anything compiles:
a dimension a mesh axis does not divide is an error naming the parameter.

The logical axes are tables keyed by parameter path here, not ``nnx.with_partitioning``
metadata on each ``nnx.Param`` where it is created, because:
  * the decoder blocks' parameters are made by ``jax.vmap`` over one block's init
    (``model.stack``), so their leading [n] "layers" axis is added by the stacking code, not by
    the module that declares the parameter: metadata would still need that axis prepended there;
  * the callers hold plain pytrees, not Variables: ``param_shardings`` and
    ``train_state_shardings`` take pure dicts and ``ShapeDtypeStruct``s (optimizer moments,
    orbax restore targets), and ``from_hf(shardings=...)`` takes a (path, shape) -> sharding
    callable; all are keyed by path, where metadata would first need a model built;
  * a parameter missing from the tables is an error (``param_logical_axes``), while one
    missing its metadata would silently be replicated.

Activations get logical names too ("batch", "length", "act_embed", "mlp", "heads", ...): inside
``activation_sharding(mesh, rules)`` (entered while a step is traced), the model's
``constrain`` calls pin them with sharding constraints, so GSPMD gathers weights for FSDP
instead of resharding the residual stream, keeps heads and MLP columns on their tensor shard,
and splits positions over "context". Outside that context ``constrain`` does nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hybrid_jax.tree_paths import path_keys

MESH_AXES = ("data", "fsdp", "expert", "tensor", "context")

MeshAxes = str | tuple[str, ...] | None


class ShardingError(ValueError):
    """A mesh that does not match the devices, or a sharding that does not fit a shape."""


@dataclass(frozen=True)
class MeshShape:
    """Sizes of the mesh axes; their product must be the number of devices."""

    data: int = 1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1
    context: int = 1

    def __post_init__(self) -> None:
        for name in MESH_AXES:
            size = getattr(self, name)
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ShardingError(f"mesh axis {name!r} must be a positive int, got {size!r}")

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(getattr(self, name) for name in MESH_AXES)

    @property
    def num_devices(self) -> int:
        return math.prod(self.sizes)

    def __str__(self) -> str:
        # expert=1 left out: meshes without experts read as they always have.
        return " x ".join(f"{name}={getattr(self, name)}" for name in MESH_AXES
                          if name != "expert" or self.expert > 1)


def parse_mesh_sizes(text: str) -> dict[str, int]:
    """"fsdp=4,tensor=2" -> {"fsdp": 4, "tensor": 2}; raises ShardingError naming the part
    that is not AXIS=SIZE with an axis of ``MESH_AXES``."""
    sizes = {}
    for part in text.split(","):
        name, _, size = part.partition("=")
        name = name.strip()
        if name not in MESH_AXES or not size.strip().isdigit():
            raise ShardingError(f"mesh: expected AXIS=SIZE with AXIS one of {list(MESH_AXES)}, "
                                f"got {part!r}")
        sizes[name] = int(size)
    return sizes


def make_mesh(shape: MeshShape | None = None, devices: Sequence[jax.Device] | None = None
              ) -> Mesh:
    """A ``Mesh`` with axes ``MESH_AXES`` over ``devices`` (default: all of them, across
    processes); ``shape`` None puts every device on ``fsdp``.

    TPU devices are laid out by their coordinates in the slice (``mesh_utils``): each mesh
    axis runs along ICI links, the innermost (tensor, context) over neighbouring chips. Over
    several slices, ``data`` spans them (the slow links between slices carry only its
    gradient all-reduce) and must be a multiple of their number. Other devices keep their
    order (processes in turn)."""
    devices = list(jax.devices() if devices is None else devices)
    if shape is None:
        shape = MeshShape(fsdp=len(devices))
    if shape.num_devices != len(devices):
        raise ShardingError(f"mesh {shape} needs {shape.num_devices} devices, but there are "
                            f"{len(devices)}")
    return Mesh(_device_grid(shape, devices), MESH_AXES)


def _device_grid(shape: MeshShape, devices: list[jax.Device]) -> np.ndarray:
    sizes = shape.sizes
    if devices[0].platform != "tpu":
        return np.asarray(devices, dtype=object).reshape(sizes)
    from jax.experimental import mesh_utils

    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices == 1:
        # Splitting a physical axis (tensor=2 along a ring of 4) is allowed: without it most
        # meshes with a tensor axis have no layout at all.
        return mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
    if shape.data % slices:
        raise ShardingError(f"mesh {shape} spans {slices} TPU slices: data={shape.data} must be "
                            f"a multiple of {slices} (data parallelism runs across slices)")
    per_slice = (shape.data // slices, *sizes[1:])
    return mesh_utils.create_hybrid_device_mesh(per_slice, (slices,) + (1,) * (len(sizes) - 1),
                                                devices,
                                                allow_split_physical_axes=True)


@dataclass(frozen=True)
class LogicalRules:
    """Logical axis name -> mesh axis (or axes, or None: replicated). Logical names not listed
    are replicated."""

    rules: Mapping[str, MeshAxes] = dataclasses.field(default_factory=lambda: {
        "batch": ("data", "fsdp", "expert"),
        "length": "context",
        "embed": ("fsdp", "context"),
        "vocab": "tensor",
        "mlp": "tensor",
        "heads": "tensor",
        "kv_heads": "tensor",
        "gdn_heads": "tensor",
        "gdn_key_heads": "tensor",
        "layers": None,
        "experts": "expert",
        "norm": None,
        "conv": None,
        "act_embed": None,  # the residual stream's features stay whole on every device
    })

    def spec(self, logical: Sequence[str | None]) -> PartitionSpec:
        """The PartitionSpec of dimensions with these logical names; a mesh axis already used
        by an earlier dimension is not used again."""
        used: set[str] = set()
        out = []
        for name in logical:
            axes = self.rules.get(name) if name is not None else None
            axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            axes = tuple(a for a in axes if a not in used)
            used.update(axes)
            out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        return PartitionSpec(*out)


# Logical axes of activations: the residual stream between layers, and each layer's inputs.
RESIDUAL = ("batch", "length", "act_embed")

_ACTIVATIONS: contextvars.ContextVar[tuple[Mesh, LogicalRules] | None] = contextvars.ContextVar(
    "hybrid_jax_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules: LogicalRules | None = None) -> Iterator[None]:
    """Make ``constrain`` pin activations to ``mesh`` by ``rules`` while this context is open.
    Enter it inside the function being traced (the train step does); ``mesh`` None turns the
    constraints off."""
    token = _ACTIVATIONS.set(None if mesh is None else (mesh, rules or LogicalRules()))
    try:
        yield
    finally:
        _ACTIVATIONS.reset(token)


def _fitted_spec(mesh: Mesh, rules: LogicalRules, shape: tuple[int, ...],
                 logical: Sequence[str | None], what: str) -> PartitionSpec:
    """The rules' spec for ``logical``, less any mesh axis that the mesh lacks or that does not
    divide its dimension."""
    if len(logical) != len(shape):
        raise ValueError(f"{what}: {len(logical)} logical names {tuple(logical)} for an "
                         f"array of shape {shape}")
    dims = []
    for size, axes in zip(shape, rules.spec(logical)):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        axes = tuple(a for a in axes if a in mesh.shape)
        while axes and size % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]
        dims.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*dims)


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """``x`` with a sharding constraint by the logical names of its dimensions, under the
    current ``activation_sharding``; unchanged outside one. A mesh axis that does not divide its
    dimension is dropped from it (a constraint is a layout hint, not a requirement)."""
    current = _ACTIVATIONS.get()
    if current is None:
        return x
    mesh, rules = current
    spec = _fitted_spec(mesh, rules, x.shape, logical, "constrain")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _splitting_axes(logical: str, size: int) -> tuple[tuple[str, ...], int]:
    """(the mesh axes over which the current ``activation_sharding`` splits a dimension of
    ``size`` named ``logical``, into how many pieces): ((), 1) outside one."""
    current = _ACTIVATIONS.get()
    if current is None:
        return (), 1
    mesh, rules = current
    axes = _fitted_spec(mesh, rules, (size,), (logical,), "shard_count")[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return axes, math.prod(mesh.shape[a] for a in axes)


def shard_count(logical: str, size: int) -> int:
    """Into how many pieces the current ``activation_sharding`` splits a dimension of ``size``
    named ``logical`` (1 outside one)."""
    return _splitting_axes(logical, size)[1]


def split_axes(logical: str, size: int) -> str | tuple[str, ...] | None:
    """The mesh axis (or axes) over which the current ``activation_sharding`` splits a
    dimension of ``size`` named ``logical``, as collectives inside ``per_shard`` name it; None
    outside one or when the dimension stays whole."""
    axes, pieces = _splitting_axes(logical, size)
    if pieces == 1:
        return None
    return axes[0] if len(axes) == 1 else axes


def splits(logical: str, size: int) -> bool:
    """Whether the current ``activation_sharding`` splits a dimension of ``size`` named
    ``logical`` (False outside one)."""
    return shard_count(logical, size) > 1


def split_together(*dims: tuple[str, int]) -> tuple[str | None, ...]:
    """The logical names of ``dims`` ((name, size) pairs) where the current
    ``activation_sharding`` splits every one of them, else None for each: for dimensions
    that must split together or not at all, such as a group's query and key heads."""
    if all(splits(name, size) for name, size in dims):
        return tuple(name for name, _ in dims)
    return (None,) * len(dims)


def per_shard(fn: Any, in_logical: Sequence[Sequence[str | None]],
              out_logical: Sequence[str | None] | Sequence[Sequence[str | None]],
              out_shape: tuple[int, ...] | tuple[tuple[int, ...], ...]) -> Any:
    """``fn`` (arrays -> one array of global shape ``out_shape``, given so that ``fn`` is not
    traced an extra time; or a tuple of arrays, with ``out_logical`` and ``out_shape`` tuples
    of theirs) run on each device's shards with ``jax.shard_map`` under the current
    ``activation_sharding``: for computations XLA cannot partition itself, such as Pallas
    kernels, which it would otherwise run whole on every device. Dimensions are split by the
    rules as in ``constrain`` (a logical name of None keeps one whole, gathering it if it was
    split). Outside an ``activation_sharding``, ``fn`` itself."""
    current = _ACTIVATIONS.get()
    if current is None:
        return fn
    mesh, rules = current
    # A dimension split on the way in but whole on the way out would be a partial result;
    # the callers' names never ask for that.
    several = bool(out_shape) and isinstance(out_shape[0], tuple)
    shapes, names = (out_shape, out_logical) if several else ((out_shape,), (out_logical,))
    specs = tuple(_fitted_spec(mesh, rules, shape, logical, "per_shard")
                  for shape, logical in zip(shapes, names, strict=True))
    out_spec = specs if several else specs[0]

    def sharded(*args: jax.Array) -> jax.Array:
        in_specs = tuple(_fitted_spec(mesh, rules, a.shape, names, "per_shard")
                         for a, names in zip(args, in_logical, strict=True))
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_spec,
                             check_vma=False)(*args)

    return sharded


# Logical axes of each parameter, by the names inside its module (leading "layers" axis added
# for the scanned stack).
_GDN = {
    "q_proj": ("embed", "gdn_key_heads"), "k_proj": ("embed", "gdn_key_heads"),
    "v_proj": ("embed", "gdn_heads"), "g_proj": ("embed", "gdn_heads"),
    "a_proj": ("embed", "gdn_heads"), "b_proj": ("embed", "gdn_heads"),
    "o_proj": ("gdn_heads", "embed"),
    "A_log": ("gdn_heads",), "dt_bias": ("gdn_heads",),
    "q_conv": ("gdn_key_heads", "conv"), "k_conv": ("gdn_key_heads", "conv"),
    "v_conv": ("gdn_heads", "conv"), "o_norm": ("norm",),
}
_ATTENTION = {
    "q_proj": ("embed", "heads"), "k_proj": ("embed", "kv_heads"),
    "v_proj": ("embed", "kv_heads"), "o_proj": ("heads", "embed"),
    "q_norm": ("heads",), "k_norm": ("kv_heads",),
    "q_head_norm": ("norm",), "k_head_norm": ("norm",),  # per head, shared by all heads
}
_MLP = {"gate_proj": ("embed", "mlp"), "up_proj": ("embed", "mlp"), "down_proj": ("mlp", "embed"),
        # Mixture of experts (model.mlp.MoE); its shared expert is a SwiGLU (the names above).
        "router": ("embed", "experts"), "experts_gate_up": ("experts", "embed", "mlp"),
        "experts_down": ("experts", "mlp", "embed"), "shared_expert_gate": ("embed", None)}
_TOP = {"embed": ("vocab", "embed"), "lm_head": ("embed", "vocab"), "final_norm": ("norm",)}


def param_logical_axes(path: Sequence[str | int], ndim: int) -> tuple[str | None, ...]:
    """Logical axis names of the parameter at ``path`` (keys as in ``nnx.to_pure_dict``, e.g.
    ("stack", "blocks", "layers", 0, "gdn", "q_proj", "kernel")) with ``ndim`` dimensions.
    Raises ShardingError for a parameter it does not know, so none goes unsharded silently."""
    keys = [k for k in path if k != "value"]
    axes: tuple[str | None, ...] | None = None
    if keys and keys[0] in _TOP:
        axes = _TOP[keys[0]]
    elif keys[:3] == ["stack", "blocks", "layers"] and len(keys) >= 6:
        module, name = keys[4], keys[5]
        if module == "mlp" and name == "shared_expert" and len(keys) >= 7:
            name = keys[6]  # the shared expert's SwiGLU
        if module.endswith("norm"):  # pre_gdn_norm, pre_mlp_norm, ... [n, D]
            table = {name: ("norm",)}
        else:
            table = {"gdn": _GDN, "attn": _ATTENTION, "mlp": _MLP}.get(module, {})
        if name in table:
            axes = ("layers", *table[name])
    if axes is None or len(axes) != ndim:
        raise ShardingError(f"no logical axes known for parameter {'.'.join(map(str, keys))} "
                            f"with {ndim} dimensions")
    return axes


def sharding_problem(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> str | None:
    """Why ``sharding`` cannot hold an array of ``shape`` (unknown mesh axis, too many
    entries, a dimension the mesh axes do not divide), or None."""
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec)
        if len(spec) > len(shape):
            return f"partition spec {sharding.spec} has {len(spec)} entries for {len(shape)} dimensions"
        for dim, (size, entry) in enumerate(zip(shape, spec)):
            axes = () if entry is None else entry if isinstance(entry, tuple) else (entry,)
            unknown = [a for a in axes if a not in sharding.mesh.shape]
            if unknown:
                return f"mesh has no axis {unknown[0]!r} (axes: {list(sharding.mesh.shape)})"
            ways = math.prod(sharding.mesh.shape[a] for a in axes)
            if size % ways:
                named = f"axis {axes[0]!r}" if len(axes) == 1 else f"axes {axes!r}"
                return (f"dimension {dim} ({size}) is not divisible by mesh {named} "
                        f"({ways} ways)")
        return None
    try:
        sharding.shard_shape(shape)
    except Exception as e:  # noqa: BLE001 - any failure means the sharding does not fit
        return f"sharding {sharding} does not fit the shape: {e}"
    return None


def _flat_with_paths(tree: Any) -> tuple[list[tuple[tuple, Any]], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [(path_keys(path), leaf) for path, leaf in flat], treedef


def _without_unit_axes(mesh: Mesh, spec: PartitionSpec) -> PartitionSpec:
    """``spec`` less the mesh axes of size 1 in dimensions split over several axes (the same
    sharding, written as a mesh without them would: ("fsdp", "context") is "fsdp" at
    context=1)."""
    def fit(axes):
        if axes is None or isinstance(axes, str):
            return axes
        kept = tuple(a for a in axes if mesh.shape.get(a, 1) > 1) or axes[:1]
        return kept[0] if len(kept) == 1 else kept

    return PartitionSpec(*(fit(axes) for axes in spec))


def param_shardings(params: Any, mesh: Mesh, rules: LogicalRules | None = None) -> Any:
    """``NamedSharding``s for a parameter pytree (an ``nnx.State``, its pure dict, or abstract
    ``ShapeDtypeStruct``s of either), the same structure. Raises ShardingError naming every
    parameter whose dimension a mesh axis does not divide."""
    rules = rules or LogicalRules()
    flat, treedef = _flat_with_paths(params)
    out, problems = [], []
    for path, leaf in flat:
        spec = _without_unit_axes(mesh, rules.spec(param_logical_axes(path, len(leaf.shape))))
        sharding = NamedSharding(mesh, spec)
        problem = sharding_problem(sharding, tuple(leaf.shape))
        if problem:
            keys = [k for k in path if k != "value"]
            problems.append(f"{'.'.join(map(str, keys))} {list(leaf.shape)}: {problem}")
        out.append(sharding)
    if problems:
        raise ShardingError(f"the mesh ({dict(mesh.shape)}) does not divide "
                            f"{len(problems)} parameter(s):\n  " + "\n  ".join(problems))
    return jax.tree_util.tree_unflatten(treedef, out)


def batch_sharding(mesh: Mesh, rules: LogicalRules | None = None, ndim: int = 2
                   ) -> NamedSharding:
    """Sharding of [B, T, ...] batch arrays: rows over "batch", positions over "length"."""
    rules = rules or LogicalRules()
    spec = rules.spec(("batch", "length") + (None,) * (ndim - 2))
    return NamedSharding(mesh, _without_unit_axes(mesh, spec))


def micro_batches_sharding(mesh: Mesh, rules: LogicalRules | None = None) -> NamedSharding:
    """Sharding of [A, B, T] stacked micro-batches: the A axis whole on every device, rows and
    positions as ``batch_sharding``."""
    return NamedSharding(mesh, PartitionSpec(None, *batch_sharding(mesh, rules).spec))


def check_batch(shape: tuple[int, ...], sharding: NamedSharding, name: str = "batch") -> None:
    """Raise ShardingError when ``sharding`` does not divide a batch array of ``shape``."""
    problem = sharding_problem(sharding, shape)
    if problem:
        raise ShardingError(f"{name} {list(shape)}: {problem}")
