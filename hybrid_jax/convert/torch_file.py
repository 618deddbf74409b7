"""Reading plain PyTorch state-dict files (``.pt`` / ``.pth`` / ``.bin``, as ``torch.save`` writes them).

``torch.load(path, map_location="cpu", weights_only=True)`` (no arbitrary unpickling), memory-mapped
when the file is in torch's zip format so that a tensor's bytes are only read when it is converted.
torch is imported lazily: without it, only these files are unreadable, with an error naming the file.

Tensors are described by ``TorchTensorInfo``, which carries the same ``name``/``path``/``dtype``
(safetensors dtype code)/``shape`` fields as ``safetensors_file.TensorInfo``, so one planner checks
both. ``load_torch_tensor`` converts without changing a bit: bfloat16 and float8 tensors (which
``torch.Tensor.numpy()`` refuses) are reinterpreted through a same-width integer view as ml_dtypes
arrays, never rounded through float32.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hybrid_jax.convert.safetensors_file import DTYPES

TORCH_SUFFIXES = (".pt", ".pth", ".bin")

# Single wrapper keys that training code commonly puts around a state dict ({"model": sd}, as
# OLMo-core's distributed checkpoints hold it; {"state_dict": sd}, as Lightning saves it).
_WRAPPER_KEYS = ("model", "state_dict", "module")

_MAX_LISTED = 5


class TorchFileError(ValueError):
    """A file that cannot be read as a state dict of tensors; the message names the file."""


@dataclass(frozen=True)
class TorchTensorInfo:
    """One tensor of a torch state dict (``dtype`` is a safetensors code, or ``str(torch dtype)``
    for dtypes safetensors has no code for)."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    tensor: Any = field(compare=False, repr=False)


def _codes(torch: Any) -> dict[Any, str]:
    codes = {
        torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
        torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
        torch.uint8: "U8", torch.bool: "BOOL",
    }
    for attr, code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
        if hasattr(torch, attr):
            codes[getattr(torch, attr)] = code
    return codes


def _import_torch(path: Path) -> Any:
    try:
        import torch
    except ImportError:
        raise TorchFileError(
            f"{path}: reading a PyTorch state-dict file needs torch, which is not installed "
            f"(pip install torch, or convert the file to safetensors first)") from None
    return torch


def read_state_dict(path: Path) -> dict[str, TorchTensorInfo]:
    """Load ``path`` with ``torch.load(weights_only=True)``; returns name -> TorchTensorInfo.

    Raises ``TorchFileError`` naming ``path`` when torch is missing, the file cannot be loaded, or
    it does not hold a dict of tensor names to (dense, CPU) tensors.
    """
    path = Path(path)
    torch = _import_torch(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True,
                         mmap=zipfile.is_zipfile(path))
    except Exception as e:  # noqa: BLE001 - torch raises many kinds; all mean "unreadable"
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise TorchFileError(
            f"{path}: cannot be loaded with torch.load(weights_only=True) as a PyTorch state "
            f"dict: {type(e).__name__}: {first}") from None

    if (isinstance(obj, Mapping) and len(obj) == 1 and next(iter(obj)) in _WRAPPER_KEYS
            and isinstance(next(iter(obj.values())), Mapping)):
        obj = next(iter(obj.values()))
    if not isinstance(obj, Mapping):
        raise TorchFileError(f"{path}: not a state dict: torch.load returned a "
                             f"{type(obj).__name__}, expected a dict of tensor names to tensors")
    bad = [(k, v) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        listed = ", ".join(f"{k!r} ({type(v).__name__})" for k, v in bad[:_MAX_LISTED])
        more = f" and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
        raise TorchFileError(f"{path}: not a state dict of tensors: entries that are not "
                             f"name -> tensor: {listed}{more}")

    codes = _codes(torch)
    tensors: dict[str, TorchTensorInfo] = {}
    for name, t in obj.items():
        if t.layout != torch.strided or t.is_quantized or t.device.type != "cpu":
            raise TorchFileError(f"{path}: tensor {name} is not a dense CPU tensor "
                                 f"(layout {t.layout}, device {t.device})")
        tensors[name] = TorchTensorInfo(name, path, codes.get(t.dtype, str(t.dtype)),
                                        tuple(int(d) for d in t.shape), t.detach())
    return tensors


def load_torch_tensor(info: TorchTensorInfo) -> np.ndarray:
    """The tensor as a numpy array of the same dtype and bits (shares memory where it can)."""
    t = info.tensor
    dtype = DTYPES.get(info.dtype)
    if dtype is None:
        raise TypeError(f"{info.path}: tensor {info.name} has dtype {info.dtype}, which has no "
                        f"numpy equivalent")
    if info.dtype in ("BF16", "F8_E4M3", "F8_E5M2"):
        import torch

        as_int = torch.int16 if dtype.itemsize == 2 else torch.uint8
        return t.view(as_int).numpy().view(dtype)
    return t.numpy()
