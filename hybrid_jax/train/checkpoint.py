"""Training checkpoints: orbax ``CheckpointManager`` with asynchronous saves, the last N kept,
and a resume that falls back past a corrupt or partial latest checkpoint.

Each step directory holds three items: ``default``, the whole ``TrainState`` (step,
parameters, optimizer state, bad-step count); ``data``, the input pipeline's state (JSON: the
next step, the process count, the data's fingerprint; batches are a pure function of the step);
``model_config``, the model's configuration (JSON), so that a run directory alone can be
evaluated. Training draws no other randomness, so a restored state continues exactly.
Restoring takes an abstract state whose leaves carry the target shardings: a checkpoint saved on
one mesh restores onto another. Checkpoints written before the last two items existed still
restore (their data position is their step).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from hybrid_jax.train.state import TrainState

log = logging.getLogger(__name__)

DATA_ITEM = "data"  # the input pipeline's state beside the train state
CONFIG_ITEM = "model_config"  # the model's configuration, for evaluating a run directory


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was required, or a state that must not be saved."""


@jax.jit
def _all_finite(params) -> jax.Array:
    """One device-side reduction (no parameter leaves its devices, on any number of hosts)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))


class TrainCheckpoints:
    """Save and restore ``TrainState``s under ``directory`` (one subdirectory per step)."""

    def __init__(self, directory: str | Path, *, keep: int = 3, asynchronous: bool = True):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory, item_names=("default", DATA_ITEM, CONFIG_ITEM),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=asynchronous))

    def steps(self) -> list[int]:
        """Finished checkpoints' steps, oldest first (a save still in flight or cut off by a
        crash is not listed: orbax finalises a step directory only when it is complete)."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def save(self, state: TrainState, *, data: dict | None = None,
             model_config: dict | None = None, force: bool = False) -> None:
        """Start saving ``state`` under its step, with the input pipeline's ``data`` state and
        the ``model_config`` (JSON-able dicts, optional); returns before the write finishes
        unless the manager is synchronous. Refuses parameters that are not all finite."""
        if not bool(_all_finite(state.params)):
            raise CheckpointError(f"step {int(state.step)}: parameters are not all finite; "
                                  f"not saving them")
        items = {"default": ocp.args.StandardSave(state)}
        for name, value in ((DATA_ITEM, data), (CONFIG_ITEM, model_config)):
            if value is not None:
                items[name] = ocp.args.JsonSave(value)
        self._manager.save(int(state.step), args=ocp.args.Composite(**items), force=force)

    def wait(self) -> None:
        """Block until every started save is on disk."""
        self._manager.wait_until_finished()

    def restore_latest(self, abstract: TrainState) -> TrainState | None:
        """The newest checkpoint that restores, as ``abstract`` describes it (shapes, dtypes
        and shardings); one that fails to restore is skipped with a warning naming it. None
        when there is no checkpoint at all."""
        steps = self.steps()
        for step in reversed(steps):
            try:
                state = self._manager.restore(step, args=ocp.args.Composite(
                    default=ocp.args.StandardRestore(abstract)))["default"]
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped
                log.warning("checkpoint %s is unreadable (%s: %s); trying the one before",
                            self.directory / str(step), type(e).__name__, str(e)[:300])
                continue
            if int(state.step) != step:
                log.warning("checkpoint %s holds step %d; skipping it",
                            self.directory / str(step), int(state.step))
                continue
            return state
        if steps:
            raise CheckpointError(f"{self.directory}: none of the checkpoints {steps} could be "
                                  f"restored")
        return None

    def json_item(self, step: int, name: str) -> dict | None:
        """Checkpoint ``step``'s JSON item ``name`` (``DATA_ITEM``, ``CONFIG_ITEM``); None
        where that checkpoint has none (written before it existed)."""
        if not (self.directory / str(step) / name).is_dir():
            return None
        return self._manager.restore(step, args=ocp.args.Composite(
            **{name: ocp.args.JsonRestore()}))[name]

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the parameters of checkpoint ``step`` (no optimizer state is read), as
        ``abstract_params`` describes them (shapes, dtypes, shardings)."""
        # Each leaf as its abstract twin says: shape, dtype (cast on read), sharding.
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_params)
        with ocp.PyTreeCheckpointer() as reader:
            restored = reader.restore(self.directory / str(step) / "default",
                                      args=ocp.args.PyTreeRestore(
                                          item={"params": abstract_params},
                                          restore_args={"params": restore_args},
                                          partial_restore=True))
        return restored["params"]

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> TrainCheckpoints:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
