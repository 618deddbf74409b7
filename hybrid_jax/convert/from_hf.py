"""Load a transformers ``OlmoHybridForCausalLM`` checkpoint directory into a ``HybridLM``.

Accepted layouts (a directory written by ``save_pretrained``): ``config.json`` plus either
``model.safetensors`` or shards listed in ``model.safetensors.index.json``.

Accepted tensor names, per layer ``model.layers.N.``:
  * as transformers 5.23 writes them to disk: split ``linear_attn.{q,k,v}_conv1d.weight``
    [C, 1, K]; GDN norms ``attention_layer_norm`` / ``feedforward_layer_norm``; and, because its
    save-time renaming also applies to attention layers, an attention layer's post-attention norm
    as ``feedforward_layer_norm``;
  * as a module ``state_dict()`` names them: fused ``linear_attn.conv1d.weight`` (q, k, v channels
    concatenated), ``input_layernorm`` / ``post_attention_layernorm``.
Names transformers ignores on load (``mtp.*``) are ignored, as is ``lm_head.weight`` when the
embeddings are tied.

Everything (config, index, every file's header, every expected name and shape) is checked before
the model is built; problems are reported together, each naming the tensor, field or file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hybrid_jax.config import GDN, ModelConfig, dtype_name
from hybrid_jax.convert.hf_names import (
    CONFIG_FILE,
    FUSED_CONV,
    INDEX_FILE,
    SINGLE_FILE,
    Want,
    conv_targets,
    describe_problems,
    global_wants,
    layer_prefix,
    layer_wants,
    split_conv_names,
)
from hybrid_jax.convert.safetensors_file import (
    DTYPES,
    FLOAT_DTYPES,
    SafetensorsError,
    TensorInfo,
    load_tensor,
    read_header,
)
from hybrid_jax.model.hybrid_lm import HybridLM

IGNORED_PREFIXES = ("mtp.",)  # multi-token-prediction heads; transformers drops them too

# config.json fields whose type we check before ModelConfig sees them (so that the error names the
# field), and the fields without which shapes cannot be known.
_INT_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
    "linear_value_head_dim", "linear_conv_kernel_dim", "max_position_embeddings",
)
_FLOAT_FIELDS = (
    "rms_norm_eps", "initializer_range", "linear_a_log_min", "linear_a_log_max", "linear_dt_min",
    "linear_dt_max", "linear_dt_init_floor", "rope_theta",
)
_BOOL_FIELDS = ("tie_word_embeddings", "linear_allow_neg_eigval", "attention_bias")
_REQUIRED_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
)


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the culprit."""


def _load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: invalid {what}: not valid JSON ({e})") from None


# ----------------------------------------------------------------------------- config
def _read_config(ckpt: Path) -> tuple[Path, dict[str, Any]]:
    path = ckpt / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: config.json not found in checkpoint directory {ckpt}")
    raw = _load_json(path, "config.json")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: invalid config.json: expected a JSON object, "
                              f"got {type(raw).__name__}")
    _check_config_fields(raw, path)
    return path, raw


def _check_config_fields(raw: dict[str, Any], path: Path) -> None:
    def fail(field: str, msg: str) -> None:
        raise CheckpointError(f"{path}: invalid config.json field {field!r}: {msg}")

    for name in _REQUIRED_FIELDS:
        if raw.get(name) is None:
            fail(name, "missing (needed to know the tensor shapes)")
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    for name in _INT_FIELDS:
        v = raw.get(name)
        if v is not None and not (is_int(v) and v > 0):
            fail(name, f"expected a positive integer, got {v!r}")
    for name in _FLOAT_FIELDS:
        v = raw.get(name)
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool)):
            fail(name, f"expected a number, got {v!r}")
    for name in _BOOL_FIELDS:
        v = raw.get(name)
        if v is not None and not isinstance(v, bool):
            fail(name, f"expected true or false, got {v!r}")
    layer_types = raw.get("layer_types")
    if layer_types is not None and not (
            isinstance(layer_types, list) and all(isinstance(t, str) for t in layer_types)):
        fail("layer_types", f"expected a list of strings, got {layer_types!r}")
    rope = raw.get("rope_parameters")
    if rope is not None:
        if not isinstance(rope, dict):
            fail("rope_parameters", f"expected an object or null, got {rope!r}")
        theta = rope.get("rope_theta")
        if theta is not None and not (isinstance(theta, (int, float)) and not isinstance(theta, bool)):
            fail("rope_parameters.rope_theta", f"expected a number or null, got {theta!r}")
    for name in ("dtype", "torch_dtype"):
        v = raw.get(name)
        if v is not None:
            try:
                dtype_name(str(v).removeprefix("torch."))
            except (TypeError, ValueError):
                fail(name, f"unsupported dtype {v!r}; expected float32, bfloat16 or float16")


def _config_dtype(raw: dict[str, Any]) -> str | None:
    v = raw.get("dtype") or raw.get("torch_dtype")
    return None if v is None else dtype_name(str(v).removeprefix("torch."))


# ----------------------------------------------------------------------------- files
@dataclass(frozen=True)
class _Files:
    tensors: dict[str, TensorInfo]
    where: str  # where tensors were expected, for "missing" messages


def _read_files(ckpt: Path) -> _Files:
    single, index = ckpt / SINGLE_FILE, ckpt / INDEX_FILE
    if single.is_file():  # transformers looks for the single file first too
        try:
            return _Files(read_header(single), str(single))
        except SafetensorsError as e:
            raise CheckpointError(str(e)) from None
    if not index.is_file():
        raise CheckpointError(f"{ckpt}: no weights found: expected {SINGLE_FILE} or {INDEX_FILE}")

    index_data = _load_json(index, "index")
    weight_map = index_data.get("weight_map") if isinstance(index_data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise CheckpointError(f"{index}: invalid index: expected a 'weight_map' object mapping "
                              f"tensor names to shard file names")
    shards = sorted(set(weight_map.values()))
    absent = [s for s in shards if not (ckpt / s).is_file()]
    if absent:
        raise CheckpointError(f"{index}: shard(s) listed in the index but absent from {ckpt}: "
                              f"{', '.join(absent)}")

    tensors: dict[str, TensorInfo] = {}
    problems: list[str] = []
    for shard in shards:
        try:
            header = read_header(ckpt / shard)
        except SafetensorsError as e:
            raise CheckpointError(str(e)) from None
        for name, info in header.items():
            if name in tensors:
                problems.append(f"tensor {name} appears in both {tensors[name].path} and {info.path}")
            tensors[name] = info
    for name, shard in weight_map.items():
        info = tensors.get(name)
        if info is None or info.path.name != shard:
            problems.append(f"tensor {name} is listed in {index} under {shard} but is not in that "
                            f"shard ({ckpt / shard})")
    _raise_if(problems, f"{index}: inconsistent sharded checkpoint")
    return _Files(tensors, f"one of the shards listed in {index}")


def _raise_if(problems: list[str], title: str) -> None:
    if problems:
        raise CheckpointError(describe_problems(problems, title))


# ----------------------------------------------------------------------------- name mapping
@dataclass(frozen=True)
class _Choice:
    """A resolved source: checkpoint tensor(s) ``infos`` -> our parameter at ``target``."""

    target: tuple[str | int, ...]
    infos: tuple[TensorInfo, ...]
    transform: Callable[..., np.ndarray]  # one array per info -> our array

    def load(self) -> np.ndarray:
        return np.asarray(self.transform(*(load_tensor(i) for i in self.infos)))


class _Planner:
    """Resolves every parameter to a checkpoint tensor, collecting all problems."""

    def __init__(self, files: _Files) -> None:
        self.tensors = files.tensors
        self.where = files.where
        self.used: set[str] = set()
        self.problems: list[str] = []

    def _check_dtype(self, info: TensorInfo) -> bool:
        if info.dtype not in FLOAT_DTYPES:
            self.problems.append(f"tensor {info.name} in {info.path} has dtype {info.dtype}, "
                                 f"expected a floating-point dtype")
            return False
        return True

    def _check(self, info: TensorInfo, shape: tuple[int, ...]) -> bool:
        if info.shape != shape:
            self.problems.append(f"tensor {info.name} in {info.path} has shape {list(info.shape)}, "
                                 f"expected {list(shape)} from the config")
            return False
        return self._check_dtype(info)

    def pick(self, prefix: str, want: Want, target: tuple) -> _Choice | None:
        present = [prefix + n for n in want.names if prefix + n in self.tensors]
        self.used.update(present)
        if not present:
            alts = " or ".join(prefix + n for n in want.names)
            self.problems.append(f"missing tensor {alts} (expected in {self.where})")
            return None
        if len(present) > 1:
            self.problems.append(f"ambiguous tensors {' and '.join(present)}: both name the same "
                                 f"parameter")
            return None
        info = self.tensors[present[0]]
        return _Choice(target, (info,), want.transform) if self._check(info, want.shape) else None

    def pick_convs(self, prefix: str, cfg: ModelConfig, target: tuple) -> list[_Choice]:
        """q/k/v convs: split (on disk) or fused (state_dict), both read as the concatenation of
        the q, k and v channels [2 Kd + Vd, 1, K].

        transformers 5.23's ``save_pretrained`` splits the fused conv into three *equal* thirds
        under the q/k/v names (only its concatenation is meaningful when Vd != Kd), while
        checkpoints converted from OLMo-core hold [Kd], [Kd], [Vd] channels; any split whose
        concatenation has the right size is accepted and re-cut at Kd, Kd, Vd.
        """
        kd, vd, k = cfg.linear_key_dim, cfg.linear_value_dim, cfg.linear_conv_kernel_dim
        split_names = [prefix + n for n in split_conv_names()]
        fused_name = prefix + FUSED_CONV
        have_split = [n for n in split_names if n in self.tensors]
        have_fused = fused_name in self.tensors
        self.used.update(have_split + [fused_name] * have_fused)
        if have_fused and have_split:
            self.problems.append(f"ambiguous tensors {fused_name} and {have_split[0]}: both name "
                                 f"the same parameter")
            return []
        if have_fused:
            infos = (self.tensors[fused_name],)
            if not self._check(infos[0], (2 * kd + vd, 1, k)):
                return []
        else:
            missing = [n for n in split_names if n not in self.tensors]
            for name in missing:
                self.problems.append(f"missing tensor {name} (expected in {self.where}; a fused "
                                     f"{fused_name} is also accepted)")
            if missing:
                return []
            infos = tuple(self.tensors[n] for n in split_names)
            total = sum(i.shape[0] for i in infos if len(i.shape) == 3)
            if any(len(i.shape) != 3 or i.shape[1:] != (1, k) for i in infos) or total != 2 * kd + vd:
                got = ", ".join(f"{i.name} {list(i.shape)}" for i in infos)
                self.problems.append(
                    f"tensors {got} in {infos[0].path} have the wrong shapes: expected "
                    f"{[kd, 1, k]}, {[kd, 1, k]}, {[vd, 1, k]} (or any split of "
                    f"{2 * kd + vd} channels) from the config")
                return []
            if not all(self._check_dtype(i) for i in infos):
                return []

        def cut(start: int, size: int) -> Callable[..., np.ndarray]:
            return lambda *parts: np.concatenate([np.asarray(p) for p in parts])[start:start + size, 0, :]

        return [_Choice(target + path, infos, cut(start, size))
                for path, start, size in conv_targets(cfg).values()]

    def unexpected(self, cfg: ModelConfig) -> None:
        for name, info in self.tensors.items():
            if name in self.used or name.startswith(IGNORED_PREFIXES):
                continue
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # the tied head reuses the embeddings, as in transformers
            self.problems.append(f"unexpected tensor {name} in {info.path}")


def _plan(cfg: ModelConfig, files: _Files, ckpt: Path) -> tuple[list[_Choice], dict[int, list[_Choice]]]:
    """Globals, and per HF layer index the choices for that layer (targets relative to it)."""
    planner = _Planner(files)
    global_choices = [c for w in global_wants(cfg) if (c := planner.pick("", w, w.target))]

    layers: dict[int, list[_Choice]] = {}
    wants = layer_wants(cfg)
    for layer, kind in enumerate(cfg.layer_types):
        prefix = layer_prefix(layer)
        choices = [c for w in wants[kind] if (c := planner.pick(prefix, w, w.target))]
        if kind == GDN:
            choices += planner.pick_convs(prefix, cfg, ())
        layers[layer] = choices
    planner.unexpected(cfg)
    _raise_if(planner.problems, f"{ckpt}: checkpoint does not match its config")
    return global_choices, layers


# ----------------------------------------------------------------------------- building
def _tensor_dtype(files: _Files) -> str:
    """The checkpoint's dtype from its tensors: the embeddings', else the most common float."""
    embed = files.tensors.get("model.embed_tokens.weight")
    if embed is not None and embed.dtype in FLOAT_DTYPES:
        code = embed.dtype
    else:
        counts: dict[str, int] = {}
        for info in files.tensors.values():
            if info.dtype in FLOAT_DTYPES:
                counts[info.dtype] = counts.get(info.dtype, 0) + 1
        code = max(counts, key=counts.get) if counts else "F32"
    return dtype_name(DTYPES[code]) if code in ("F32", "F16", "BF16") else "float32"


def _set(tree: dict, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def _build(cfg: ModelConfig, global_choices: list[_Choice],
           layers: dict[int, list[_Choice]]) -> HybridLM:
    abstract = nnx.eval_shape(lambda: HybridLM(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    expected = {
        tuple(k.key for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(pure)[0]
    }
    dtype = cfg.params_dtype
    filled: set[tuple] = set()

    def put(path: tuple, array: np.ndarray) -> None:
        want = expected.get(path)
        if want is None or tuple(want.shape) != array.shape:
            raise AssertionError(f"internal: conversion produced {path} {array.shape}, model "
                                 f"expects {None if want is None else want.shape}")
        _set(pure, path, jnp.asarray(np.asarray(array).astype(dtype, copy=False)))
        filled.add(path)

    for c in global_choices:
        put(c.target, c.load())

    # Stack layer j * p + i of every block copy j into [n, ...] at block position i.
    period = cfg.layer_period
    n_blocks = cfg.num_hidden_layers // period
    for i in range(period):
        per_copy = [layers[j * period + i] for j in range(n_blocks)]
        for slot, first in enumerate(per_copy[0]):
            arrays = [choices[slot].load() for choices in per_copy]
            put(("stack", "blocks", "layers", i) + first.target, np.stack(arrays))
    if filled != set(expected):
        raise AssertionError(f"internal: parameters left unfilled: {sorted(set(expected) - filled)}")
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def from_hf(path: str | Path, *, dtype: Any = None, **config_overrides: Any) -> HybridLM:
    """Load a transformers OLMo Hybrid checkpoint directory.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` (or sharded safetensors
        with ``model.safetensors.index.json``).
      dtype: params and compute dtype; default: config.json's ``dtype``/``torch_dtype``, else
        the tensors' dtype.
      **config_overrides: ``ModelConfig`` fields to replace (e.g. ``gdn_method``, ``remat``,
        ``scan_layers``, or ``param_dtype`` to store params in a different dtype than ``dtype``).
    Returns:
      A ``HybridLM`` holding the checkpoint's weights.
    Raises:
      CheckpointError (a ValueError) naming the missing/unexpected/misshapen tensor and its file,
      the invalid config field, an absent shard, or a corrupt safetensors file.
    """
    ckpt = Path(path)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: checkpoint directory not found")
    config_path, raw = _read_config(ckpt)
    files = _read_files(ckpt)

    if dtype is not None:
        compute = dtype_name(dtype)
    else:
        compute = _config_dtype(raw) or _tensor_dtype(files)
    config_overrides.setdefault("param_dtype", compute)
    try:
        cfg = ModelConfig.from_hf_dict(raw, dtype=compute, **config_overrides)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path}: invalid config: {e}") from None

    global_choices, layers = _plan(cfg, files, ckpt)
    return _build(cfg, global_choices, layers)
