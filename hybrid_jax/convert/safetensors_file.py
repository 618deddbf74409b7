"""Validated, memory-mapped reading of ``.safetensors`` files.

The format: an 8-byte little-endian header length N, N bytes of JSON mapping each tensor name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the data that follows
the header), an optional ``"__metadata__"`` entry, then the raw little-endian tensor bytes.

Parsing the header ourselves lets every structural problem (truncation, bad JSON, offsets past the
end, sizes that disagree with shapes) be reported with the file's path before any data is read,
and ``np.memmap`` then reads bfloat16 as cheaply as float32 (through ml_dtypes).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

# safetensors dtype codes -> numpy dtypes (little-endian).
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")

# Far above any real header; guards against reading gigabytes of garbage as JSON.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A file that is not a well-formed safetensors file."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives. ``begin``/``end`` are absolute byte offsets in ``path``."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate the header of ``path``; returns name -> TensorInfo.

    Raises ``SafetensorsError`` naming ``path`` when the file is truncated or corrupt.
    """
    path = Path(path)
    size = path.stat().st_size

    def fail(msg: str) -> None:
        raise SafetensorsError(f"{path}: corrupt or truncated safetensors file: {msg}")

    if size < 8:
        fail(f"the file is {size} bytes, shorter than the 8-byte header length")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
            fail(f"header length {header_len} does not fit in the file's {size} bytes")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        fail(f"header is not valid JSON ({e})")
    if not isinstance(header, dict):
        fail("header is not a JSON object")

    data_start = 8 + header_len
    data_size = size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            fail(f"entry for tensor {name!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPES:
            fail(f"tensor {name!r} has unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            fail(f"tensor {name!r} has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
            fail(f"tensor {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if end > data_size:
            fail(f"tensor {name!r} ends at byte {end} of the data but only {data_size} bytes are "
                 f"present")
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != expected:
            fail(f"tensor {name!r} occupies {end - begin} bytes but {dtype} {shape} needs {expected}")
        tensors[name] = TensorInfo(name, path, dtype, tuple(shape), data_start + begin,
                                   data_start + end)
    return tensors


def load_tensor(info: TensorInfo) -> np.ndarray:
    """The tensor's data as a read-only, memory-mapped numpy array of its own dtype."""
    dtype = DTYPES[info.dtype]
    if info.end == info.begin:
        return np.zeros(info.shape, dtype)
    data = np.memmap(info.path, dtype=np.uint8, mode="r", offset=info.begin,
                     shape=(info.end - info.begin,))
    return data.view(dtype).reshape(info.shape)


def load_tensor_slice(info: TensorInfo, index: tuple[slice, ...]) -> np.ndarray:
    """A copy of ``tensor[index]``, read through the memory map: only the pages holding the
    selected elements are read from the file (all of a row-major run of leading-axis rows is one
    contiguous byte range)."""
    return np.array(load_tensor(info)[index])
