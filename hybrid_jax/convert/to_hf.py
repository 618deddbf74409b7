"""Write a ``HybridLM`` (or its parameters) as a transformers checkpoint of its family:
``OlmoHybridForCausalLM``, or Qwen3.5's, Qwen3.5-MoE's or Qwen3-Next's ``*ForCausalLM`` (named
and fused as ``qwen_names`` describes; ``layout`` applies to OLMo Hybrid only).

The output is a transformers checkpoint directory: ``config.json``, ``generation_config.json``
and safetensors weights (``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` shards
plus ``model.safetensors.index.json``), that ``OlmoHybridForCausalLM.from_pretrained`` loads with
no missing or unexpected keys and ``from_hf`` reads back bit for bit. Its tensors are named and
cut as AI2's released checkpoints hold them (``layout="release"``, the default: each GDN conv its
projection's own) or as transformers' ``save_pretrained`` writes them
(``layout="save_pretrained"``: the fused conv in equal thirds); see ``hybrid_jax.convert.hf_names``.

The parameters are checked against the config before anything is written. Tensors are converted
(sliced out of the stacked [n, ...] layer parameters, transposed, cast) and written one at a time,
each in row blocks of at most 64 MiB: a tensor's source (its layer slice, or the whole parameter
for the embeddings and head) is read to the host once, and each block is transposed/cast straight
from it and written, so no full-size converted copy is ever held beside the source (each shard's
header is computed from shapes beforehand). The output is assembled in a temporary directory beside ``out_dir`` and renamed into
place at the end.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hybrid_jax.convert.output_dir import check_extra_files, refuse_existing, writing
from hybrid_jax.config import GDN, MOE, ModelConfig, dtype_name
from hybrid_jax.convert.hf_names import (
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    LAYOUT_RELEASE,
    INDEX_FILE,
    SINGLE_FILE,
    conv_disk_split,
    conv_targets,
    check_layout,
    describe_problems,
    global_wants,
    Want,
    layer_prefix,
)
from hybrid_jax.convert import qwen_names
from hybrid_jax.convert.namings import QWEN, TRANSFORMERS
from hybrid_jax.hf_configs import check_family, config_to_hf
from hybrid_jax.convert.safetensors_file import DTYPES
from hybrid_jax.model.hybrid_lm import HybridLM
from hybrid_jax.tree_paths import flat_paths


# numpy dtype -> safetensors code, for the dtypes we write.
_CODES = {np.dtype(v): k for k, v in DTYPES.items() if k in ("F64", "F32", "F16", "BF16")}

Path_ = tuple[str | int, ...]


# ----------------------------------------------------------------------------- inputs
def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string like transformers' ``max_shard_size`` ("5GB" = 5e9,
    "500MB", "50KB", "2GiB" = 2 * 2**30, ...; a lowercase "b" means bits, as in transformers)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif isinstance(size, str):
        s = size.strip()
        units = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3}
        value = None
        for unit, mult in units.items():
            if s.upper().endswith(unit):
                try:
                    value = int(s[: -len(unit)]) * mult
                except ValueError:
                    break
                if len(unit) == 2 and s.endswith("b"):
                    value //= 8  # "Gb", "Mb", "Kb": bits
                break
        else:
            if s.isdigit():
                value = int(s)
        if value is None:
            raise ValueError(f"max_shard_size: cannot parse {size!r}; use bytes (an int) or a "
                             f"string like '5GB', '500MB', '2GiB'")
    else:
        raise ValueError(f"max_shard_size: expected an int or a string like '5GB', got {size!r}")
    if value <= 0:
        raise ValueError(f"max_shard_size: must be positive, got {size!r}")
    return value


def _resolve(model_or_params: Any, config: ModelConfig | None) -> tuple[ModelConfig, Any]:
    """(config, params pytree) from a HybridLM, (graphdef, params), an nnx.State or a pure dict."""
    if isinstance(model_or_params, HybridLM):
        params = nnx.state(model_or_params)
        return (config or model_or_params.config), params
    graphdef = None
    params = model_or_params
    if (isinstance(model_or_params, tuple) and len(model_or_params) == 2
            and isinstance(model_or_params[0], nnx.GraphDef)):
        graphdef, params = model_or_params
    if config is None and graphdef is not None and isinstance(params, nnx.State):
        try:
            model = nnx.merge(graphdef, params)
        except Exception as e:  # noqa: BLE001 - reported below as a missing config
            raise ValueError(f"to_hf: cannot rebuild the model from (graphdef, params) to read "
                             f"its config ({e}); pass config=") from None
        config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        raise ValueError("to_hf: config= (a ModelConfig) is required unless a HybridLM, or the "
                         "(graphdef, params) of one, is given")
    return config, params


def _flatten(params: Any) -> dict[Path_, Any]:
    """path tuple -> array (nnx.Variable leaves unwrapped)."""
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    flat = flat_paths(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return {path: leaf[...] if isinstance(leaf, nnx.Variable) else leaf
            for path, leaf in flat.items()}


def _fmt(path: Path_) -> str:
    return ".".join(str(k) for k in path)


def _check_params(cfg: ModelConfig, flat: dict[Path_, Any]) -> dict[Path_, Any]:
    """Every parameter a HybridLM(cfg) has, with its shape and a float dtype; nothing else.
    Returns ``flat`` keyed by the model's own paths."""
    abstract = nnx.eval_shape(lambda: HybridLM(cfg, rngs=nnx.Rngs(0)))
    expected = _flatten(nnx.state(abstract))
    problems = []
    # Integer and string keys are both accepted for list indices ("layers", 0 or "0").
    norm = {tuple(str(k) for k in p): p for p in flat}
    for path, want in expected.items():
        got_path = norm.get(tuple(str(k) for k in path))
        if got_path is None:
            problems.append(f"missing parameter {_fmt(path)} (shape {list(want.shape)})")
            continue
        got = flat[got_path]
        shape = tuple(getattr(got, "shape", ()))
        if shape != tuple(want.shape):
            problems.append(f"parameter {_fmt(path)} has shape {list(shape)}, expected "
                            f"{list(want.shape)} from the config")
        elif np.dtype(getattr(got, "dtype", np.float32)) not in _CODES:
            problems.append(f"parameter {_fmt(path)} has dtype {got.dtype}, expected float32, "
                            f"bfloat16, float16 or float64")
    want_keys = {tuple(str(k) for k in p) for p in expected}
    for key, path in norm.items():
        if key not in want_keys:
            problems.append(f"unexpected parameter {_fmt(path)} (not in a HybridLM with this "
                            f"config)")
    if problems:
        raise ValueError(describe_problems(problems, "to_hf: parameters do not match the config"))
    # Re-key with the expected paths (ints for list indices), as the plan uses them.
    return {p: flat[norm[tuple(str(k) for k in p)]] for p in expected}


# ----------------------------------------------------------------------------- plan
_BLOCK_BYTES = 64 * 2**20  # most bytes of converted output made at a time


@dataclass(frozen=True)
class _Tensor:
    """One checkpoint tensor, produced on demand: ``produce()`` gives an array of the tensor's
    shape, possibly a strided view (a transposed kernel) and of the source's dtype; the writer
    casts and copies it to C order in row blocks."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _host(x: Any) -> np.ndarray:
    return np.asarray(jax.device_get(x))


class _TransposedRows:
    """The transpose of a 2-D parameter, read a row block at a time: ``rows[a:b]`` reads only
    the parameter's columns a:b (a lazily stored parameter reads just that box)."""

    def __init__(self, arr: Any) -> None:
        self._arr = arr
        self.shape = tuple(arr.shape)[::-1]
        self.ndim = 2
        self.size = math.prod(self.shape)

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])  # clipped: tensorstore does not clip
        return _host(self._arr[:, start:max(start, stop)]).T


def _plan(cfg: ModelConfig, flat: dict[Path_, Any], out_dtype: np.dtype | None,
          layout: str = LAYOUT_RELEASE) -> list[_Tensor]:
    """All tensors in checkpoint order: embeddings, layers 0..L-1, final norm, lm head, named and
    cut as ``layout`` holds them (``hf_names.LAYOUTS``)."""
    def dt(array: Any) -> np.dtype:
        return out_dtype if out_dtype is not None else np.dtype(array.dtype)

    tensors: list[_Tensor] = []
    globals_ = {w.target[0]: w for w in global_wants(cfg)}

    def add_global(key: str) -> None:
        w = globals_.get(key)
        if w is None:
            return
        arr = flat[w.target]
        d = dt(arr)
        if w.transposed and (isinstance(arr, (np.ndarray, jax.Array))
                             or getattr(arr, "box_reads", False)):
            # The head's kernel: its transpose's row blocks are read as column blocks of it.
            tensors.append(_Tensor(w.name_in(layout), w.shape, d,
                                   lambda arr=arr: _TransposedRows(arr)))
            return
        tensors.append(_Tensor(w.name_in(layout), w.shape, d,
                               lambda w=w, arr=arr: w.transform(_host(arr))))

    add_global("embed")
    period = cfg.layer_period
    naming = QWEN if cfg.model_type != "olmo_hybrid" else TRANSFORMERS
    kinds = zip(cfg.layer_types, cfg.mlp_kinds)
    for layer, (kind, mlp) in enumerate(kinds):
        j, i = divmod(layer, period)
        base = ("stack", "blocks", "layers", i)
        prefix = layer_prefix(layer)
        for name, parts in _grouped(naming.layer_wants(cfg, kind, mlp), layout).items():
            arrays = [flat[base + w.target] for w in parts]
            tensors.append(_Tensor(prefix + name, parts[0].shape, dt(arrays[0]),
                                   lambda parts=parts, arrays=arrays, j=j:
                                   _assemble(parts, [a[j] for a in arrays])))
        if kind == GDN:
            parts = [flat[base + path] for path, _, _ in conv_targets(cfg).values()]
            d = dt(parts[0])
            k = cfg.linear_conv_kernel_dim

            def chunk(start: int, count: int, parts=parts, j=j) -> np.ndarray:
                # The fused torch conv [2 Kd + Vd, 1, K]: q, k, v channels concatenated.
                fused = np.concatenate([_host(p[j]) for p in parts], axis=0)
                return fused[start:start + count, None, :]

            split = (conv_disk_split(cfg, layout) if naming is TRANSFORMERS else
                     [(qwen_names.FUSED_CONV, 0, 2 * cfg.linear_key_dim + cfg.linear_value_dim)])
            for name, start, count in split:
                tensors.append(_Tensor(prefix + name, (count, 1, k), d,
                                       lambda s=start, c=count, f=chunk: f(s, c)))
        if mlp == MOE:
            tensors += _expert_tensors(cfg, flat, base, j, prefix, dt)
    add_global("final_norm")
    add_global("lm_head")
    return tensors


def _expert_tensors(cfg: ModelConfig, flat: dict[Path_, Any], base: Path_, j: int, prefix: str,
                    dt: Callable[[Any], np.dtype]) -> list[_Tensor]:
    """An MoE layer's experts as transformers' save_pretrained writes them: per expert e,
    ``gate_proj`` and ``up_proj`` [I, D] (our gate_up's two column halves, transposed) and
    ``down_proj`` [D, I]."""
    gate_up, down = flat[base + ("mlp", "experts_gate_up")], flat[base + ("mlp", "experts_down")]
    f, d = cfg.moe_intermediate_size, cfg.hidden_size
    halves = {"gate_proj": (0, f), "up_proj": (f, 2 * f)}
    out = []
    for e in range(cfg.num_experts):
        for part, name in qwen_names.expert_names(e).items():
            if part in halves:
                a, b = halves[part]
                produce = lambda e=e, a=a, b=b: _host(gate_up[j, e, :, a:b]).T
                shape = (f, d)
            else:
                produce, shape = (lambda e=e: _host(down[j, e]).T), (d, f)
            out.append(_Tensor(prefix + name, shape, dt(gate_up), produce))
    return out


def _grouped(wants: list[Want], layout: str) -> dict[str, list[Want]]:
    """Per tensor name (as ``layout`` names it), the wants it holds: one, or the parts of a
    fused tensor (``Want.rows``)."""
    groups: dict[str, list[Want]] = {}
    for w in wants:
        groups.setdefault(w.name_in(layout), []).append(w)
    return groups


def _assemble(parts: list[Want], arrays: list[Any]) -> np.ndarray:
    """The checkpoint tensor of ``parts`` from our arrays (one layer's each): a plain tensor,
    or a fused one whose rows each part fills."""
    hosts = [_host(a) for a in arrays]
    if parts[0].rows is None:
        return parts[0].transform(hosts[0])
    out = np.empty(parts[0].shape, hosts[0].dtype)
    filled = 0
    for w, a in zip(parts, hosts):
        out[list(w.rows)] = w.transform(a)
        filled += len(w.rows)
    if filled != out.shape[0]:
        raise AssertionError(f"internal: {parts[0].disk_name} has {out.shape[0]} rows, "
                             f"its parts fill {filled}")
    return out


def _shards(tensors: list[_Tensor], limit: int) -> list[list[_Tensor]]:
    """Greedy, in order: a new shard when the next tensor would push this one past ``limit``
    (a tensor larger than ``limit`` gets a shard of its own), as transformers does."""
    shards: list[list[_Tensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


# ----------------------------------------------------------------------------- writing
def _write_safetensors(path: Path, tensors: list[_Tensor]) -> None:
    """A safetensors file, streamed: header from the plan, then each tensor converted and written
    in turn (names sorted, as the safetensors library orders them)."""
    tensors = sorted(tensors, key=lambda t: t.name)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": _CODES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the safetensors library pads
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors:
            a = t.produce()
            if tuple(a.shape) != t.shape:
                raise AssertionError(f"internal: {t.name} came out {a.shape}, planned {t.shape}")
            _write_blocks(f, a, t.dtype.newbyteorder("<"))
            del a


def _write_blocks(f: Any, a: np.ndarray, dtype: np.dtype) -> None:
    """Write ``a`` cast to ``dtype`` in C order, converting at most ``_BLOCK_BYTES`` of output (a
    run of leading-axis rows, at least one) at a time: the bytes are those of the whole converted
    array, without ever holding a full-size converted copy."""
    if not a.size:
        return
    if a.ndim == 0:
        a = a.reshape(1)
    row_bytes = max(1, math.prod(a.shape[1:]) * dtype.itemsize)
    step = max(1, _BLOCK_BYTES // row_bytes)
    for r in range(0, a.shape[0], step):
        block = np.ascontiguousarray(a[r:r + step], dtype=dtype)
        f.write(block.reshape(-1).view(np.uint8).data)
        del block


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _generation_config(cfg: ModelConfig) -> dict[str, Any]:
    """As transformers derives it from the model config (``GenerationConfig.from_model_config``)."""
    out: dict[str, Any] = {"_from_model_config": True}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(cfg, name)
        if value is not None:
            out[name] = value
    out.update(output_attentions=False, output_hidden_states=False, use_cache=True)
    return out


def _write_all(tmp: Path, cfg: ModelConfig, tensors: list[_Tensor], limit: int,
               dtype_label: str) -> None:
    hf = config_to_hf(cfg)
    hf["dtype"] = dtype_label
    _write_json(tmp / CONFIG_FILE, hf)
    _write_json(tmp / GENERATION_CONFIG_FILE, _generation_config(cfg))
    shards = _shards(tensors, limit)
    if len(shards) == 1:
        _write_safetensors(tmp / SINGLE_FILE, shards[0])
        return
    n = len(shards)
    weight_map: dict[str, str] = {}
    for k, shard in enumerate(shards, start=1):
        name = f"model-{k:05d}-of-{n:05d}.safetensors"
        _write_safetensors(tmp / name, shard)
        weight_map.update({t.name: name for t in shard})
    index = {
        "metadata": {"total_parameters": sum(math.prod(t.shape) for t in tensors),
                     "total_size": sum(t.nbytes for t in tensors)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    _write_json(tmp / INDEX_FILE, index)


def to_hf(
    model_or_params: Any,
    out_dir: str | os.PathLike,
    *,
    config: ModelConfig | None = None,
    dtype: Any = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    extra_files: Sequence[str | os.PathLike] = (),
    layout: str = LAYOUT_RELEASE,
) -> Path:
    """Write a transformers ``OlmoHybridForCausalLM`` checkpoint directory.

    Args:
      model_or_params: a ``HybridLM``; or ``(graphdef, params)`` from ``split``; or a params
        ``nnx.State`` / pure dict (then ``config`` is required).
      out_dir: the directory to create (its parent is created if needed).
      config: the model's ``ModelConfig`` (default: the model's own).
      dtype: dtype of the written tensors (float32, bfloat16 or float16); default: the
        parameters' own.
      max_shard_size: bytes per safetensors file (an int, or "5GB", "500MB", "2GiB", ...): one
        ``model.safetensors`` when everything fits, else numbered shards plus an index.
      overwrite: replace an existing non-empty ``out_dir`` (only once the new one is complete).
      extra_files: files copied into ``out_dir`` by name (e.g. the tokenizer's).
      layout: ``"release"`` (default): as AI2's released checkpoints hold the weights: each of
        ``linear_attn.{q,k,v}_conv1d.weight`` is its projection's own convolution, [Kd, 1, K],
        [Kd, 1, K] and [Vd, 1, K] (as OLMo-core holds them), an attention layer's first norm is
        ``post_attention_layernorm``. ``"save_pretrained"``: byte for byte what transformers'
        ``save_pretrained`` writes: the fused [2 Kd + Vd, 1, K] conv in three equal thirds under
        those names (only their concatenation means anything when Kd != Vd), that norm named
        ``feedforward_layer_norm``. transformers and ``from_hf`` load either.
    Returns:
      ``Path(out_dir)``.
    Raises:
      ValueError naming the parameter when the params do not match the config (nothing written);
      FileExistsError when ``out_dir`` exists, is not empty and ``overwrite`` is false.
    """
    cfg, params = _resolve(model_or_params, config)
    try:
        check_layout(layout)
    except ValueError as e:
        raise ValueError(f"to_hf: {e}") from None
    limit = parse_size(max_shard_size)
    out_dtype = None if dtype is None else np.dtype(jnp.dtype(dtype_name(dtype)))
    flat = _check_params(cfg, _flatten(params))
    try:
        check_family(cfg)
    except ValueError as e:
        raise ValueError(f"to_hf: {e}") from None
    embed_dtype = np.dtype(flat[("embed", "embedding")].dtype)
    try:
        dtype_label = dtype_name(out_dtype if out_dtype is not None else embed_dtype)
    except ValueError:
        raise ValueError(f"to_hf: parameters are {embed_dtype}, which transformers' config cannot "
                         f"name; pass dtype= (float32, bfloat16 or float16)") from None

    out = Path(out_dir)
    refuse_existing(out, overwrite)
    check_extra_files(extra_files, (CONFIG_FILE, GENERATION_CONFIG_FILE, INDEX_FILE, ".safetensors"))
    tensors = _plan(cfg, flat, out_dtype, layout)
    with writing(out, overwrite) as tmp:
        for f in extra_files:
            shutil.copyfile(f, tmp / Path(f).name)
        _write_all(tmp, cfg, tensors, limit, dtype_label)
    return out


__all__ = ["parse_size", "to_hf"]
