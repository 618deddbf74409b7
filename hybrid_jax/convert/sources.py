"""Where a transformers / OLMo-core checkpoint's config and tensors are, and one box of a tensor.

Discovery, in transformers' order for a directory: ``model.safetensors``; safetensors shards
listed in ``model.safetensors.index.json``; ``pytorch_model.bin``; ``.bin`` shards listed in
``pytorch_model.bin.index.json``; else the directory's only ``.pt``/``.pth``/``.bin`` file. A
single weights file is read by its suffix (safetensors, else a torch state dict). Only headers
are read here (``read_slice`` reads data, one box at a time); every error is a
``CheckpointError`` naming the file, and an index's problems are reported together.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hybrid_jax.config import ModelConfig, check_hf_dict
from hybrid_jax.convert.hf_names import CONFIG_FILE, INDEX_FILE, SINGLE_FILE, describe_problems
from hybrid_jax.convert.safetensors_file import (
    SafetensorsError,
    TensorInfo,
    load_tensor_slice,
    read_header,
)
from hybrid_jax.hf_configs import shape_fields
from hybrid_jax.convert.torch_file import (
    TORCH_SUFFIXES,
    TorchFileError,
    TorchTensorInfo,
    load_torch_tensor,
    read_state_dict,
)

TORCH_SINGLE_FILE = "pytorch_model.bin"
TORCH_INDEX_FILE = "pytorch_model.bin.index.json"
SAFETENSORS_SUFFIX = ".safetensors"

AnyTensorInfo = TensorInfo | TorchTensorInfo
# A box of a tensor: one [start, stop) per axis.
Spans = tuple[tuple[int, int], ...]


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the culprit."""


@dataclass(frozen=True)
class Files:
    """A checkpoint's tensors (name -> header info, nothing read) and where they were looked
    for (for "missing" messages)."""

    tensors: dict[str, AnyTensorInfo]
    where: str


def raise_if(problems: list[str], title: str) -> None:
    """CheckpointError listing ``problems`` under ``title``, if there are any."""
    if problems:
        raise CheckpointError(describe_problems(problems, title))


def _load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: invalid {what}: not valid JSON ({e})") from None


# ----------------------------------------------------------------------------- config
def check_exists(ckpt: Path) -> None:
    """CheckpointError naming ``ckpt`` (as a weights file or a directory) if it is absent."""
    if not ckpt.exists():
        what = "weights file" if ckpt.suffix in (SAFETENSORS_SUFFIX, *TORCH_SUFFIXES) else \
            "checkpoint directory"
        raise CheckpointError(f"{ckpt}: {what} not found")


def config_source(path: Path, config: ModelConfig | str | Path | None) -> ModelConfig | Path:
    """The config to load ``path`` with: ``config`` itself (a ``ModelConfig`` or a config.json
    path), else the config.json in (or beside) ``path``."""
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


def read_config(path: Path) -> dict[str, Any]:
    """A config.json's fields, type-checked by ``config.check_hf_dict`` with the shape fields
    required (those of a vision-language config's ``text_config``; the errors name ``path``
    and the field)."""
    raw = _load_json(path, "config.json")
    text = raw
    try:
        text, required = shape_fields(raw)
        check_hf_dict(text, required=required)
    except ValueError as e:
        if text is not raw:  # a vision-language config's text_config
            e = str(e).replace("config.json field '", "config.json field 'text_config.")
        raise CheckpointError(f"{path}: invalid {e}") from None
    return raw


# ----------------------------------------------------------------------------- weights
def _read_one(path: Path) -> dict[str, AnyTensorInfo]:
    """One weights file's tensors: safetensors by its suffix, else a torch state dict."""
    try:
        if path.suffix == SAFETENSORS_SUFFIX:
            return dict(read_header(path))
        return dict(read_state_dict(path))
    except (SafetensorsError, TorchFileError) as e:
        raise CheckpointError(str(e)) from None


def read_weights_file(path: Path) -> Files:
    """The tensors of one weights file (``.safetensors``, or a torch ``.pt``/``.pth``/``.bin``)."""
    if path.suffix != SAFETENSORS_SUFFIX and path.suffix not in TORCH_SUFFIXES:
        raise CheckpointError(f"{path}: unsupported weights file: expected a {SAFETENSORS_SUFFIX} "
                              f"file or a PyTorch state dict ({', '.join(TORCH_SUFFIXES)})")
    return Files(_read_one(path), str(path))


def read_files(ckpt: Path) -> Files:
    """A checkpoint directory's weights, found as transformers looks for them (safetensors first)."""
    for single, index in ((SINGLE_FILE, INDEX_FILE), (TORCH_SINGLE_FILE, TORCH_INDEX_FILE)):
        if (ckpt / single).is_file():
            return read_weights_file(ckpt / single)
        if (ckpt / index).is_file():
            return _read_index(ckpt, ckpt / index)
    others = sorted(f for f in ckpt.iterdir() if f.is_file() and f.suffix in TORCH_SUFFIXES)
    if len(others) == 1:
        return read_weights_file(others[0])
    found = f"; several state-dict files ({', '.join(f.name for f in others)}) and no index " \
            f"saying which to use" if others else ""
    raise CheckpointError(f"{ckpt}: no weights found: expected {SINGLE_FILE} or {INDEX_FILE} "
                          f"(or {TORCH_SINGLE_FILE}, {TORCH_INDEX_FILE}, or a single "
                          f"{'/'.join(TORCH_SUFFIXES)} state dict){found}")


def _read_index(ckpt: Path, index: Path) -> Files:
    """The tensors of the shards ``index`` lists, checked against its weight map."""
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
    raise_if(problems, f"{index}: inconsistent sharded checkpoint")
    return Files(tensors, f"one of the shards listed in {index}")


# ----------------------------------------------------------------------------- data
def read_slice(info: AnyTensorInfo, index: Spans) -> np.ndarray:
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
