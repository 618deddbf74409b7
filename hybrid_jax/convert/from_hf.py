"""Load an OLMo Hybrid checkpoint (transformers or OLMo-core naming) into a ``HybridLM``.

Accepted sources:
  * a directory with ``config.json`` and weights, looked for in this order (as transformers does):
    ``model.safetensors``; safetensors shards listed in ``model.safetensors.index.json``;
    ``pytorch_model.bin``; ``.bin`` shards listed in ``pytorch_model.bin.index.json`` (as older
    transformers wrote them); else the directory's only ``.pt``/``.pth``/``.bin`` file;
  * a single weights file (``.safetensors``, or a torch state dict ``.pt``/``.pth``/``.bin``),
    with ``config=`` (a ``ModelConfig`` or a config.json path) or a ``config.json`` beside it.
Torch files are read with ``torch.load(weights_only=True)`` (see ``torch_file``).

Accepted tensor names (detected from the names, see ``namings``; mixing namings is an error):
  * transformers, per layer ``model.layers.N.``: as transformers 5.23 writes them to disk (split
    ``linear_attn.{q,k,v}_conv1d.weight`` [C, 1, K]; GDN norms ``attention_layer_norm`` /
    ``feedforward_layer_norm``; and, because its save-time renaming also applies to attention
    layers, an attention layer's post-attention norm as ``feedforward_layer_norm``), or as a
    module ``state_dict()`` names them (fused ``linear_attn.conv1d.weight`` (q, k, v channels
    concatenated), ``input_layernorm`` / ``post_attention_layernorm``);
  * OLMo-core, both generations (``blocks.N.attention.*``, or ``blocks.N.fla.inner.*`` with
    ``blocks.N.fla_norm`` for GDN blocks).
Names transformers ignores on load (``mtp.*``) are ignored, as is the head when the embeddings
are tied.

Everything (config, index, every file's header, every expected name and shape) is checked before
the model is built; problems are reported together, each naming the tensor, field or file.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from hybrid_jax.config import (
    GDN,
    HF_SHAPE_FIELDS,
    ModelConfig,
    check_hf_dict,
    dtype_name,
    hf_dict_dtype,
)
from hybrid_jax.convert.hf_names import (
    CONFIG_FILE,
    INDEX_FILE,
    SINGLE_FILE,
    Want,
    conv_targets,
    describe_problems,
)
from hybrid_jax.convert.namings import Naming, NamingError, detect_naming
from hybrid_jax.convert.safetensors_file import (
    DTYPES,
    FLOAT_DTYPES,
    SafetensorsError,
    TensorInfo,
    load_tensor_slice,
    read_header,
)
from hybrid_jax.convert.torch_file import (
    TORCH_SUFFIXES,
    TorchFileError,
    TorchTensorInfo,
    load_torch_tensor,
    read_state_dict,
)
from hybrid_jax.model.host_views import aligned_empty
from hybrid_jax.model.hybrid_lm import HybridLM
from hybrid_jax.sharding import sharding_problem
from hybrid_jax.tree_paths import path_key

log = logging.getLogger(__name__)

TORCH_SINGLE_FILE = "pytorch_model.bin"
TORCH_INDEX_FILE = "pytorch_model.bin.index.json"
SAFETENSORS_SUFFIX = ".safetensors"

IGNORED_PREFIXES = ("mtp.",)  # multi-token-prediction heads; transformers drops them too


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the culprit."""


def _load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: invalid {what}: not valid JSON ({e})") from None


# ----------------------------------------------------------------------------- config
def _read_config(path: Path) -> dict[str, Any]:
    """A config.json's fields, type-checked (the errors name ``path`` and the field)."""
    raw = _load_json(path, "config.json")
    try:
        check_hf_dict(raw, required=HF_SHAPE_FIELDS)
    except ValueError as e:
        raise CheckpointError(f"{path}: invalid {e}") from None
    return raw


# ----------------------------------------------------------------------------- files
AnyTensorInfo = TensorInfo | TorchTensorInfo


@dataclass(frozen=True)
class _Files:
    tensors: dict[str, AnyTensorInfo]
    where: str  # where tensors were expected, for "missing" messages


def _read_one(path: Path) -> dict[str, AnyTensorInfo]:
    """One weights file's tensors: safetensors by its suffix, else a torch state dict."""
    try:
        if path.suffix == SAFETENSORS_SUFFIX:
            return dict(read_header(path))
        return dict(read_state_dict(path))
    except (SafetensorsError, TorchFileError) as e:
        raise CheckpointError(str(e)) from None


def _read_weights_file(path: Path) -> _Files:
    if path.suffix != SAFETENSORS_SUFFIX and path.suffix not in TORCH_SUFFIXES:
        raise CheckpointError(f"{path}: unsupported weights file: expected a {SAFETENSORS_SUFFIX} "
                              f"file or a PyTorch state dict ({', '.join(TORCH_SUFFIXES)})")
    return _Files(_read_one(path), str(path))


def _read_files(ckpt: Path) -> _Files:
    """A checkpoint directory's weights, found as transformers looks for them (safetensors first)."""
    for single, index in ((SINGLE_FILE, INDEX_FILE), (TORCH_SINGLE_FILE, TORCH_INDEX_FILE)):
        if (ckpt / single).is_file():
            return _read_weights_file(ckpt / single)
        if (ckpt / index).is_file():
            return _read_index(ckpt, ckpt / index)
    others = sorted(f for f in ckpt.iterdir() if f.is_file() and f.suffix in TORCH_SUFFIXES)
    if len(others) == 1:
        return _read_weights_file(others[0])
    found = f"; several state-dict files ({', '.join(f.name for f in others)}) and no index " \
            f"saying which to use" if others else ""
    raise CheckpointError(f"{ckpt}: no weights found: expected {SINGLE_FILE} or {INDEX_FILE} "
                          f"(or {TORCH_SINGLE_FILE}, {TORCH_INDEX_FILE}, or a single "
                          f"{'/'.join(TORCH_SUFFIXES)} state dict){found}")


def _read_index(ckpt: Path, index: Path) -> _Files:
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

    tensors: dict[str, AnyTensorInfo] = {}
    problems: list[str] = []
    for shard in shards:
        for name, info in _read_one(ckpt / shard).items():
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
# A box of a tensor: one [start, stop) per axis.
Spans = tuple[tuple[int, int], ...]


def _read_slice(info: AnyTensorInfo, index: Spans) -> np.ndarray:
    """A copy of the box ``index`` of checkpoint tensor ``info`` (in its own, torch, layout).

    safetensors: read through a memory map, so only the bytes of that box are read. Torch files
    cannot be byte-range read in general: the tensor is the one ``torch.load`` gave (memory-mapped
    for zip-format files, so in practice only the touched pages are read; for legacy-format files
    it was loaded whole when the file was opened) and is sliced here.
    """
    sl = tuple(slice(a, b) for a, b in index)
    if isinstance(info, TorchTensorInfo):
        return np.array(load_torch_tensor(info)[sl])
    return load_tensor_slice(info, sl)


def _direct_reader(info: AnyTensorInfo, transposed: bool) -> Callable[[Spans], np.ndarray]:
    """Box of our parameter -> the same elements of a tensor ours is (the transpose of)."""
    if transposed:  # ours [in, out] = torch [out, in].T
        return lambda index: _read_slice(info, index[::-1]).T
    return lambda index: _read_slice(info, index)


@dataclass(frozen=True)
class _Choice:
    """A resolved source: checkpoint tensor(s) ``infos`` -> our parameter at ``target``."""

    target: tuple[str | int, ...]
    infos: tuple[AnyTensorInfo, ...]
    transposed: bool  # ours is the transpose of the one tensor in ``infos``
    read: Callable[[Spans], np.ndarray]  # a box of our array, reading only the tensors' parts in it


class _Planner:
    """Resolves every parameter to a checkpoint tensor, collecting all problems."""

    def __init__(self, files: _Files, naming: Naming) -> None:
        self.tensors = files.tensors
        self.where = files.where
        self.naming = naming
        self.used: set[str] = set()
        self.problems: list[str] = []

    def _check_dtype(self, info: AnyTensorInfo) -> bool:
        if info.dtype not in FLOAT_DTYPES:
            self.problems.append(f"tensor {info.name} in {info.path} has dtype {info.dtype}, "
                                 f"expected a floating-point dtype")
            return False
        return True

    def _check(self, info: AnyTensorInfo, shape: tuple[int, ...]) -> bool:
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
        if not self._check(info, want.shape):
            return None
        return _Choice(target, (info,), want.transposed, _direct_reader(info, want.transposed))

    def pick_convs(self, prefix: str, cfg: ModelConfig, target: tuple) -> list[_Choice]:
        """q/k/v convs: split or fused, all read as the concatenation of the q, k and v channels
        [2 Kd + Vd, 1, K].

        transformers 5.23's ``save_pretrained`` splits the fused conv into three *equal* thirds
        under the q/k/v names (only its concatenation is meaningful when Vd != Kd), while
        checkpoints converted from OLMo-core hold [Kd], [Kd], [Vd] channels; under transformers
        naming any split whose concatenation has the right size is accepted and re-cut at Kd, Kd,
        Vd. OLMo-core's own convs must be exactly [Kd, 1, K], [Kd, 1, K], [Vd, 1, K] (or [C, K]).
        """
        kd, vd, k = cfg.linear_key_dim, cfg.linear_value_dim, cfg.linear_conv_kernel_dim
        naming = self.naming
        split_names = [prefix + n for n in naming.conv_names]
        fused_name = prefix + naming.fused_conv if naming.fused_conv else None
        have_split = [n for n in split_names if n in self.tensors]
        have_fused = fused_name is not None and fused_name in self.tensors
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
            also = f"; a fused {fused_name} is also accepted" if fused_name else ""
            for name in missing:
                self.problems.append(f"missing tensor {name} (expected in {self.where}{also})")
            if missing:
                return []
            infos = tuple(self.tensors[n] for n in split_names)
            if naming.exact_conv_split:
                ok = True
                for info, c in zip(infos, (kd, kd, vd)):
                    if info.shape not in ((c, 1, k), (c, k)):
                        self.problems.append(
                            f"tensor {info.name} in {info.path} has shape {list(info.shape)}, "
                            f"expected {[c, 1, k]} (or {[c, k]}) from the config")
                        ok = False
                if not ok:
                    return []
            else:
                total = sum(i.shape[0] for i in infos if len(i.shape) == 3)
                if (any(len(i.shape) != 3 or i.shape[1:] != (1, k) for i in infos)
                        or total != 2 * kd + vd):
                    got = ", ".join(f"{i.name} {list(i.shape)}" for i in infos)
                    self.problems.append(
                        f"tensors {got} in {infos[0].path} have the wrong shapes: expected "
                        f"{[kd, 1, k]}, {[kd, 1, k]}, {[vd, 1, k]} (or any split of "
                        f"{2 * kd + vd} channels) from the config")
                    return []
            if not all(self._check_dtype(i) for i in infos):
                return []

        def read_cut(start: int) -> Callable[[Spans], np.ndarray]:
            def read(index: Spans) -> np.ndarray:
                # Rows [lo, hi) of the concatenated channels, from the parts that hold them.
                (lo, hi), taps = index
                lo, hi = lo + start, hi + start
                pieces, offset = [], 0
                for info in infos:
                    a, b = max(lo, offset), min(hi, offset + info.shape[0])
                    if a < b:
                        box = ((a - offset, b - offset),) + ((0, 1),) * (len(info.shape) == 3)
                        pieces.append(_read_slice(info, box + (taps,)).reshape(b - a, -1))
                    offset += info.shape[0]
                if not pieces:
                    return np.zeros((0, taps[1] - taps[0]), DTYPES[infos[0].dtype])
                return np.concatenate(pieces)
            return read

        return [_Choice(target + path, infos, False, read_cut(start))
                for path, start, _ in conv_targets(cfg).values()]

    def unexpected(self, cfg: ModelConfig) -> None:
        for name, info in self.tensors.items():
            if name in self.used or name.startswith(IGNORED_PREFIXES):
                continue
            if name == self.naming.head_name and cfg.tie_word_embeddings:
                continue  # the tied head reuses the embeddings, as in transformers
            self.problems.append(f"unexpected tensor {name} in {info.path}")


def _plan(cfg: ModelConfig, files: _Files, ckpt: Path | str, naming: Naming | None = None
          ) -> tuple[list[_Choice], dict[int, list[_Choice]]]:
    """Globals, and per HF layer index the choices for that layer (targets relative to it)."""
    naming = naming or _detect(files, ckpt)
    planner = _Planner(files, naming)
    global_choices = [c for w in naming.global_wants(cfg) if (c := planner.pick("", w, w.target))]

    layers: dict[int, list[_Choice]] = {}
    wants = naming.layer_wants(cfg)
    for layer, kind in enumerate(cfg.layer_types):
        prefix = naming.layer_prefix(layer)
        choices = [c for w in wants[kind] if (c := planner.pick(prefix, w, w.target))]
        if kind == GDN:
            choices += planner.pick_convs(prefix, cfg, ())
        layers[layer] = choices
    planner.unexpected(cfg)
    _raise_if(planner.problems, f"{ckpt}: checkpoint does not match its config "
                                f"(read with {naming.description})")
    return global_choices, layers


def _detect(files: _Files, ckpt: Path | str) -> Naming:
    try:
        naming = detect_naming(files.tensors)
    except NamingError as e:
        raise CheckpointError(f"{ckpt}: {e}") from None
    log.info("%s: %s", ckpt, naming.description)
    return naming


# ----------------------------------------------------------------------------- building
def _tensor_dtype(files: _Files, naming: Naming | None = None) -> str:
    """The checkpoint's dtype from its tensors: the embeddings', else the most common float."""
    embed_names = [naming.embed_name] if naming else ["model.embed_tokens.weight",
                                                      "embeddings.weight"]
    embed = next((files.tensors[n] for n in embed_names if n in files.tensors), None)
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
           layers: dict[int, list[_Choice]], shardings: Any = None) -> HybridLM:
    abstract = nnx.eval_shape(lambda: HybridLM(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    if shardings is not None:
        expected = {tuple(path_key(k) for k in path): leaf
                    for path, leaf in jax.tree_util.tree_flatten_with_path(pure)[0]}
        resolved = _resolve_shardings(shardings, {p: tuple(v.shape) for p, v in expected.items()})
        _build_sharded(cfg, global_choices, layers, pure, expected, resolved)
    else:
        # Each parameter is read into a 64-byte-aligned host buffer that the CPU backend then
        # uses in place (``device_put(may_alias=True)``): no second copy of any parameter, so
        # loading peaks at the model's bytes plus one read box.
        for path, (_, read) in _param_readers(cfg, global_choices, layers, aligned_empty).items():
            _set(pure, path, jax.device_put(read(), may_alias=True))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------- sharded building
ParamPath = tuple[str | int, ...]


def _param_name(path: ParamPath) -> str:
    return ".".join(str(k) for k in path)


def _resolve_shardings(shardings: Any, shapes: dict[ParamPath, tuple[int, ...]]
                       ) -> dict[ParamPath, jax.sharding.Sharding]:
    """Per parameter path its Sharding, checked against the parameter's shape.

    Raises ValueError naming every parameter whose sharding is missing, unexpected, not a Sharding
    or does not divide its shape.
    """
    problems: list[str] = []
    if isinstance(shardings, jax.sharding.Sharding):  # one sharding for every parameter
        given = dict.fromkeys(shapes, shardings)
    elif not isinstance(shardings, (Mapping, nnx.State)) and callable(shardings):
        given = {path: shardings(path, shape) for path, shape in shapes.items()}
    else:
        tree = nnx.to_pure_dict(shardings) if isinstance(shardings, nnx.State) else shardings
        flat = jax.tree_util.tree_flatten_with_path(
            tree, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))[0]
        given = {}
        for path, leaf in flat:
            key = tuple(path_key(k) for k in path)
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


def _normalize(index: tuple[slice, ...], shape: tuple[int, ...]) -> Spans:
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    spans = []
    for sl, size in zip(index, shape):
        start, stop, step = sl.indices(size)
        if step != 1:
            raise AssertionError(f"internal: strided shard index {index}")
        spans.append((start, max(start, stop)))
    return tuple(spans)


def _build_sharded(cfg: ModelConfig, global_choices: list[_Choice],
                   layers: dict[int, list[_Choice]], pure: dict,
                   expected: dict[ParamPath, Any],
                   shardings: dict[ParamPath, jax.sharding.Sharding]) -> None:
    """Fill ``pure`` with arrays made by ``jax.make_array_from_callback``: each device's callback
    reads only its box of the checkpoint tensors (on the stacked [n, ...] parameters, the box's
    first axis picks which layers' tensors are read at all)."""
    readers: dict[ParamPath, Callable[[Spans], np.ndarray]] = {c.target: c.read
                                                               for c in global_choices}
    period = cfg.layer_period
    n_blocks = cfg.num_hidden_layers // period
    for i in range(period):
        per_copy = [layers[j * period + i] for j in range(n_blocks)]
        for slot, first in enumerate(per_copy[0]):
            reads = [choices[slot].read for choices in per_copy]

            def read(index: Spans, reads=reads) -> np.ndarray:
                (a, b), rest = index[0], index[1:]
                return np.stack([reads[j](rest) for j in range(a, b)])

            readers[("stack", "blocks", "layers", i) + first.target] = read
    if set(readers) != set(expected):
        raise AssertionError(f"internal: parameters without a source: "
                             f"{sorted(set(expected) ^ set(readers))}")

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

        _set(pure, path, jax.make_array_from_callback(shape, shardings[path], callback))


def _config_source(path: Path, config: ModelConfig | str | Path | None) -> ModelConfig | Path:
    if isinstance(config, ModelConfig):
        return config
    if config is not None:
        if not isinstance(config, (str, Path)):
            raise CheckpointError(f"config: expected a ModelConfig or a config.json path, got "
                                  f"{type(config).__name__}")
        config_path = Path(config)
        if not config_path.is_file():
            raise CheckpointError(f"{config_path}: config.json not found")
        return config_path
    config_path = (path if path.is_dir() else path.parent) / CONFIG_FILE
    if not config_path.is_file():
        if path.is_dir():
            raise CheckpointError(f"{config_path}: config.json not found in checkpoint directory "
                                  f"{path}")
        raise CheckpointError(f"{path}: a weights file needs its model config: pass config= (a "
                              f"ModelConfig or a config.json path); no {CONFIG_FILE} beside it")
    return config_path


def from_hf(path: str | Path, *, dtype: Any = None,
            config: ModelConfig | str | Path | None = None, shardings: Any = None,
            **config_overrides: Any) -> HybridLM:
    """Load an OLMo Hybrid checkpoint (transformers or OLMo-core tensor naming).

    Args:
      path: a checkpoint directory with ``config.json`` and weights (``model.safetensors``,
        safetensors shards with ``model.safetensors.index.json``, ``pytorch_model.bin``, ``.bin``
        shards with ``pytorch_model.bin.index.json``, or a single ``.pt``/``.pth``/``.bin`` state
        dict), or a single weights file (``.safetensors``/``.pt``/``.pth``/``.bin``).
      dtype: params and compute dtype; default: the config's (config.json's ``dtype``/
        ``torch_dtype``, else the tensors' dtype; a ``ModelConfig``'s own ``dtype``/``param_dtype``).
      config: a ``ModelConfig`` or a config.json path to use instead of the checkpoint's
        config.json (needed for a weights file without a config.json beside it).
      **config_overrides: ``ModelConfig`` fields to replace (e.g. ``gdn_method``, ``remat``,
        ``scan_layers``, or ``param_dtype`` to store params in a different dtype than ``dtype``).
      shardings: load straight onto devices. Either a pytree of ``jax.sharding.Sharding``s matching
        the model's params (the ``nnx.State`` that
        ``hybrid_jax.split(nnx.eval_shape(lambda: HybridLM(cfg, rngs=nnx.Rngs(0))))[1]`` gives, mapped
        to shardings, or its ``nnx.to_pure_dict``), or a callable ``(path, shape) -> Sharding`` with
        ``path`` a tuple of keys such as ``("stack", "blocks", "layers", 0, "gdn", "q_proj",
        "kernel")``, or one ``Sharding`` for every parameter. Each parameter is made with
        ``jax.make_array_from_callback``, each device's callback reading only its own box of the
        checkpoint: safetensors files are memory-mapped and only those byte ranges are read
        (kernels map back to the transposed torch box; on the stacked ``stack.blocks`` parameters
        the box's first axis picks which layers' tensors are read at all; a conv's box is cut from
        the q/k/v conv tensors that hold it). Devices holding the same box share one read. Torch
        ``.pt``/``.bin`` sources cannot be byte-range read in general: they are sliced after
        ``torch.load`` (memory-mapped for zip-format files, whole in memory for legacy ones). The
        checkpoint and the shardings are fully validated before any array is made. Default:
        unsharded arrays on the default device.
    Returns:
      A ``HybridLM`` holding the checkpoint's weights.
    Raises:
      CheckpointError (a ValueError) naming the missing/unexpected/misshapen tensor and its file,
      the invalid config field, an absent shard, a corrupt safetensors file, a torch file that is
      not a state dict (or torch not installed), or tensors mixing namings. ValueError naming
      the parameter when ``shardings`` misses or adds a parameter or does not divide its shape.
    """
    cfg, global_choices, layers = _resolve(path, dtype, config, config_overrides)
    return _build(cfg, global_choices, layers, shardings)


def _resolve(path: str | Path, dtype: Any, config: ModelConfig | str | Path | None,
             config_overrides: dict[str, Any]
             ) -> tuple[ModelConfig, list[_Choice], dict[int, list[_Choice]]]:
    """from_hf's validation: the config and, per parameter, where it comes from (nothing read
    but headers)."""
    ckpt = Path(path)
    if not ckpt.exists():
        what = "weights file" if ckpt.suffix in (SAFETENSORS_SUFFIX, *TORCH_SUFFIXES) else \
            "checkpoint directory"
        raise CheckpointError(f"{ckpt}: {what} not found")
    source = _config_source(ckpt, config)
    raw = _read_config(source) if isinstance(source, Path) else None
    files = _read_files(ckpt) if ckpt.is_dir() else _read_weights_file(ckpt)
    naming = _detect(files, ckpt)

    if isinstance(source, ModelConfig):
        overrides = dict(config_overrides)
        if dtype is not None:
            overrides["dtype"] = dtype_name(dtype)
            overrides.setdefault("param_dtype", overrides["dtype"])
        try:
            cfg = source.replace(**overrides)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"config: invalid config: {e}") from None
    else:
        if dtype is not None:
            compute = dtype_name(dtype)
        else:
            compute = hf_dict_dtype(raw) or _tensor_dtype(files, naming)
        config_overrides.setdefault("param_dtype", compute)
        try:
            cfg = ModelConfig.from_hf_dict(raw, dtype=compute, **config_overrides)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: invalid config: {e}") from None

    global_choices, layers = _plan(cfg, files, ckpt, naming)
    return cfg, global_choices, layers


_READ_BLOCK_BYTES = 32 * 2**20


def _read_blocked(choice: _Choice, out: np.ndarray) -> np.ndarray:
    """Fill ``out`` (our parameter's shape, any float dtype: values are cast) from ``choice``,
    reading boxes of at most ~32 MiB that are contiguous in the checkpoint (torch's leading axis:
    our last axis for a transposed kernel, else our first), so that no more than one box of the
    file is mapped or copied at a time beside the result. Returns ``out``."""
    shape = out.shape
    if not out.size:
        return out
    axis = 1 if choice.transposed and len(shape) == 2 else 0
    other = math.prod(shape) // shape[axis]
    step = max(1, _READ_BLOCK_BYTES // max(1, other * out.dtype.itemsize))
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


Reader = Callable[[], np.ndarray]


def _param_readers(cfg: ModelConfig, global_choices: list[_Choice],
                   layers: dict[int, list[_Choice]],
                   alloc: Callable[[tuple[int, ...], np.dtype], np.ndarray] = np.empty,
                   ) -> dict[ParamPath, tuple[tuple[int, ...], Reader]]:
    """For every parameter of ``HybridLM(cfg)``, in the model's order: its shape, and ``read()``,
    which reads it from the checkpoint into ``alloc(shape, cfg.params_dtype)`` (a stacked
    [n, ...] parameter one layer at a time, each tensor in boxes of <= 32 MiB) and returns it."""
    abstract = nnx.eval_shape(lambda: HybridLM(cfg, rngs=nnx.Rngs(0)))
    pure = nnx.to_pure_dict(nnx.state(abstract))
    expected = {tuple(path_key(k) for k in p): tuple(leaf.shape)
                for p, leaf in jax.tree_util.tree_flatten_with_path(pure)[0]}
    pdtype = np.dtype(cfg.params_dtype)
    readers: dict[ParamPath, Reader] = {}
    for c in global_choices:
        shape = expected[c.target]
        readers[c.target] = lambda c=c, shape=shape: _read_blocked(c, alloc(shape, pdtype))
    period = cfg.layer_period
    n_blocks = cfg.num_hidden_layers // period
    for i in range(period):
        per_copy = [layers[j * period + i] for j in range(n_blocks)]
        for slot, first in enumerate(per_copy[0]):
            target = ("stack", "blocks", "layers", i) + first.target
            shape = expected[target]

            def read(per_copy=per_copy, slot=slot, shape=shape) -> np.ndarray:
                out = alloc(shape, pdtype)
                for j, choices in enumerate(per_copy):
                    _read_blocked(choices[slot], out[j])
                return out

            readers[target] = read
    if set(readers) != set(expected):
        raise AssertionError(f"internal: parameters without a source: "
                             f"{sorted(set(expected) ^ set(readers))}")
    return {p: (shape, readers[p]) for p, shape in expected.items()}


def stream_params(path: str | Path, *, dtype: Any = None,
                  config: ModelConfig | str | Path | None = None, **config_overrides: Any
                  ) -> tuple[ModelConfig, list[tuple[tuple[str | int, ...], tuple[int, ...],
                                                     Callable[[], np.ndarray]]]]:
    """The checkpoint's config and, for every parameter of ``HybridLM(config)`` (the model's own
    paths, in its order), ``(path, shape, read)``: ``read()`` returns that parameter as a host
    numpy array of ``config.param_dtype``, read from the checkpoint only then (a stacked
    [n, ...] parameter is filled one layer at a time, each tensor in boxes of <= 32 MiB). Takes
    the same arguments, and validates the checkpoint as fully, as ``from_hf``; nothing but
    headers is read before a ``read()``. Lets a writer convert a checkpoint one parameter at a
    time (see ``hybrid_jax.convert.orbax_io.hf_to_orbax``)."""
    cfg, global_choices, layers = _resolve(path, dtype, config, config_overrides)
    readers = _param_readers(cfg, global_choices, layers)
    return cfg, [(p, shape, read) for p, (shape, read) in readers.items()]
