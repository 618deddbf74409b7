"""Rows of a stacked array on the CPU as arrays that share its memory.

The decoder stack stores each block's parameters stacked [n, ...]. A program that slices out
block j copies it on XLA:CPU, which has no views: a decode loop does that every step, or once
up front at the price of a second copy of the weights. On the CPU a ``jax.Array`` lives in host
memory, which NumPy can view without copying (``np.asarray``), and ``jax.device_put(...,
may_alias=True)`` turns a row of that view back into a ``jax.Array`` over the same bytes when
the row starts on a 64-byte boundary. The rows are then separate arguments that programs read in
place. Both steps are checked by buffer address: nothing here ever copies a large array silently.
"""

from __future__ import annotations

import math

import jax
import numpy as np

_ALIGN = 64  # XLA:CPU aliases host memory that starts on this boundary; other rows are copied


def row_views(a: jax.Array) -> list[jax.Array] | None:
    """``[a[0], ..., a[n-1]]`` sharing ``a``'s memory, or None where that is not possible.

    ``a``: a concrete [n, ...] array on a single CPU device (None for a tracer, an array on an
    accelerator or over several devices). Rows whose start is not 64-byte aligned (rows of a
    few dozen bytes: the stacked per-head vectors) cannot be aliased and come back as copies;
    for any larger row a copy means the runtime would not alias, and the answer is None.
    """
    try:
        devices = a.sharding.device_set
        base = a.unsafe_buffer_pointer()
    except Exception:  # noqa: BLE001 - a tracer, a deleted array, a multi-device array
        return None
    if len(devices) != 1 or next(iter(devices)).platform != "cpu" or a.ndim == 0:
        return None
    device = next(iter(devices))
    host = np.asarray(a)
    if host.ctypes.data != base:  # NumPy made a copy instead of viewing the buffer
        return None
    # On the backend's default device the rows stay uncommitted, as a model's own arrays are,
    # so that a program may still place them beside arrays on other devices (a sharded cache).
    target = None if device == jax.devices(device.platform)[0] else device
    rows = []
    for j in range(a.shape[0]):
        row = jax.device_put(host[j], target, may_alias=True)
        start = base + j * host.strides[0]
        if row.unsafe_buffer_pointer() != start and start % _ALIGN == 0 and row.nbytes >= _ALIGN:
            return None
        rows.append(row)
    return rows


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised NumPy array whose data starts on a 64-byte boundary, so that
    ``jax.device_put(a, may_alias=True)`` on the CPU uses its memory in place (NumPy's own
    allocations start 16 bytes into a block, which XLA:CPU copies instead)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)
