"""Training checkpoints: orbax ``CheckpointManager`` with asynchronous saves, the last N kept,
and a resume that falls back past a corrupt or partial latest checkpoint.

Each step directory holds the whole ``TrainState`` (step, parameters, optimizer state,
bad-step count). The data position is the state's ``step`` (batches are a pure function of the
step) and training draws no other randomness, so a restored state continues exactly. Restoring
takes an abstract state whose leaves carry the target shardings: a checkpoint saved on one
mesh restores onto another.
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
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=asynchronous))

    def steps(self) -> list[int]:
        """Finished checkpoints' steps, oldest first (a save still in flight or cut off by a
        crash is not listed: orbax finalises a step directory only when it is complete)."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def save(self, state: TrainState, *, force: bool = False) -> None:
        """Start saving ``state`` under its step (returns before the write finishes unless the
        manager is synchronous). Refuses parameters that are not all finite."""
        if not bool(_all_finite(state.params)):
            raise CheckpointError(f"step {int(state.step)}: parameters are not all finite; "
                                  f"not saving them")
        self._manager.save(int(state.step), args=ocp.args.StandardSave(state), force=force)

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
                state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
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

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> TrainCheckpoints:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
