"""Loading a model to evaluate from any of the three kinds of checkpoint directory: a
transformers one (``save_pretrained``), a hybrid-jax orbax one (``hybrid-jax convert
hf-to-orbax``), or a training run's (``hybrid-jax train --checkpoint-dir``: the newest step, or
a chosen one, whose parameters alone are read)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from hybrid_jax.config import dtype_name
from hybrid_jax.convert.checkpoint import load_checkpoint
from hybrid_jax.convert.from_hf import CheckpointError
from hybrid_jax.convert.orbax_io import config_from_json
from hybrid_jax.model.hybrid_lm import HybridLM
from hybrid_jax.train.checkpoint import CONFIG_ITEM, TrainCheckpoints
from hybrid_jax.train.state import model_template


def is_train_run(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a training run's checkpoints (step directories)."""
    path = Path(path)
    return path.is_dir() and any(p.name.isdigit() and (p / "default").is_dir()
                                 for p in path.iterdir())


def load_train_run(path: str | os.PathLike, *, dtype: Any = None,
                   step: int | None = None) -> tuple[HybridLM, int]:
    """(the model of training run ``path`` at ``step``, default its newest finished
    checkpoint; that step). ``dtype`` sets the parameters' and compute dtype (default: the
    run's). Raises CheckpointError naming the directory and step."""
    path = Path(path)
    with TrainCheckpoints(path) as checkpoints:
        steps = checkpoints.steps()
        if not steps:
            raise CheckpointError(f"{path}: no finished training checkpoint")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise CheckpointError(f"{path}: no checkpoint of step {step} (steps: {steps})")
        saved = checkpoints.json_item(step, CONFIG_ITEM)
        if saved is None:
            raise CheckpointError(f"{path / str(step)}: this checkpoint keeps no model config "
                                  f"(written by an older hybrid-jax); export it with a newer "
                                  f"run or evaluate its exported model")
        config = config_from_json(saved, path / str(step) / CONFIG_ITEM)
        if dtype is not None:
            name = dtype_name(dtype)
            config = dataclasses.replace(config, dtype=name, param_dtype=name)
        template = model_template(config)
        # Restored onto the default device (without a sharding orbax gives host arrays,
        # which every jitted call would copy to the device again).
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                nnx.to_pure_dict(template.abstract))
        params = checkpoints.restore_params(step, abstract)
    return template.model(params), step


def load_model(path: str | os.PathLike, *, dtype: Any = None, step: int | None = None
               ) -> HybridLM:
    """A ``HybridLM`` from a transformers, orbax or training-run checkpoint directory
    (``step`` only for a training run). Raises CheckpointError / OrbaxCheckpointError
    (ValueErrors) naming the file at fault."""
    if is_train_run(path):
        return load_train_run(path, dtype=dtype, step=step)[0]
    if step is not None:
        raise CheckpointError(f"{path}: a step is chosen only in a training run's directory")
    return load_checkpoint(path, dtype=dtype)


__all__ = ["is_train_run", "load_model", "load_train_run"]
