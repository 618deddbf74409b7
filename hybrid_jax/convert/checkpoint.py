"""Which kind of checkpoint a directory holds, and loading either kind as a ``HybridLM``.

    checkpoint_format("path")   # "orbax" (model_config.json, from save_orbax / hf-to-orbax)
                                # or "transformers" (config.json + weights, from save_pretrained)
    model = load_checkpoint("path", dtype="bfloat16")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hybrid_jax.config import dtype_name
from hybrid_jax.convert.from_hf import CheckpointError, from_hf
from hybrid_jax.convert.hf_names import CONFIG_FILE as HF_CONFIG_FILE
from hybrid_jax.convert.orbax_io import CONFIG_FILE as ORBAX_CONFIG_FILE, load_orbax
from hybrid_jax.model.hybrid_lm import HybridLM

TRANSFORMERS = "transformers"
ORBAX = "orbax"


def checkpoint_format(path: str | os.PathLike) -> str:
    """``ORBAX`` or ``TRANSFORMERS``; CheckpointError naming ``path`` if it is neither."""
    ckpt = Path(path)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: checkpoint directory not found")
    if (ckpt / ORBAX_CONFIG_FILE).is_file():
        return ORBAX
    if (ckpt / HF_CONFIG_FILE).is_file():
        return TRANSFORMERS
    raise CheckpointError(f"{ckpt}: not a checkpoint directory: found neither {HF_CONFIG_FILE} "
                          f"(transformers save_pretrained) nor {ORBAX_CONFIG_FILE} (hybrid-jax "
                          f"orbax checkpoint)")


def load_checkpoint(path: str | os.PathLike, *, dtype: Any = None) -> HybridLM:
    """A ``HybridLM`` from either kind of checkpoint directory.

    ``dtype`` sets both the parameters' and the compute dtype (default: the checkpoint's).
    Raises CheckpointError or OrbaxCheckpointError (both ValueErrors) naming the file at fault.
    """
    if checkpoint_format(path) == ORBAX:
        if dtype is None:
            return load_orbax(path)
        name = dtype_name(dtype)
        return load_orbax(path, dtype=name, param_dtype=name)  # orbax's restore casts
    return from_hf(path, dtype=dtype)


__all__ = ["ORBAX", "TRANSFORMERS", "checkpoint_format", "load_checkpoint"]
