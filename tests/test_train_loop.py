"""The training loop: exact resume after kill -9 (the same batches and losses, bitwise),
fallback past a corrupt checkpoint, and stopping on non-finite losses."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from hybrid_jax import olmo_hybrid_tiny
from hybrid_jax.config import ATTENTION, GDN
from hybrid_jax.data.pipeline import PackedDataset, Source
from hybrid_jax.data.rows import TokenRows
from hybrid_jax.train import OptimizerConfig, init_train_state, make_optimizer
from hybrid_jax.train.checkpoint import TrainCheckpoints
from hybrid_jax.train.loop import LoopConfig, TrainingError, read_log, train
from hybrid_jax.train.state import abstract_train_state

STEPS = 8


def _setup(z_loss_weight: float = 1e-4, **loop):
    cfg = olmo_hybrid_tiny(num_hidden_layers=2, layer_types=(GDN, ATTENTION))  # fast compile
    rng = np.random.default_rng(0)
    web, code = (rng.integers(1, cfg.vocab_size, n) for n in (4000, 1500))
    web[::37], code[::23] = 0, 0  # documents end every 37 / 23 tokens
    # A two-source mixture, so that resuming is checked through grain's mix and shuffles.
    data = _Recorded((Source("web", TokenRows([web], ["web"], 32, cfg.vocab_size), 0.7),
                      Source("code", TokenRows([code], ["code"], 32, cfg.vocab_size), 0.3)),
                     global_batch=4, eos_id=0, seed=1)
    opt = OptimizerConfig(lr=3e-3, warmup_steps=2, total_steps=STEPS)
    return cfg, opt, data, LoopConfig(**{"steps": STEPS, "micro_batches": 2,
                                         "checkpoint_every": 2, "z_loss_weight": z_loss_weight,
                                         **loop})


@dataclasses.dataclass(frozen=True, eq=False)
class _Recorded(PackedDataset):
    """The dataset, with each batch the loop takes logged (step, sha256 of its tokens) to
    ``record_to`` when set."""

    record_to: str | None = None

    def iterator(self, first_step, *args, **kwargs):
        it = super().iterator(first_step, *args, **kwargs)
        if self.record_to is None:
            return it
        record_to = self.record_to

        class Logged:
            def get_state(self):
                return it.get_state()

            def __next__(self):
                step = it.get_state()["next_index"]
                batch = next(it)
                with open(record_to, "a") as f:
                    f.write(f"{step} {hashlib.sha256(batch['tokens'].tobytes()).hexdigest()}\n")
                return batch

            def close(self):
                it.close()

        return Logged()


def _batches(path: Path) -> dict[int, str]:
    """The batch digests a run logged, by step (a step taken again keeps its last)."""
    return {int(a): b for a, b in (line.split() for line in path.read_text().splitlines())}


def _run_child(ckpt: Path, log: Path, die_after: int | None = None) -> int:
    args = [sys.executable, __file__, str(ckpt), str(log)] + ([str(die_after)] if die_after
                                                               is not None else [])
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"),
                          cwd=Path(__file__).parent.parent)
    if die_after is None:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.returncode


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[int, dict]:
    d = tmp_path_factory.mktemp("whole")
    _run_child(d / "ckpt", d / "log.jsonl")
    log = read_log(d / "log.jsonl")
    assert sorted(log) == list(range(STEPS))
    log["batches"] = _batches(d / "log.jsonl.batches")
    return log


def test_resume_after_kill_9_repeats_the_losses_bitwise(uninterrupted, tmp_path):
    """A run killed with SIGKILL after step 5 (its step-4 checkpoint possibly still being
    written) resumes from its newest finished checkpoint and logs the same losses as a run never
    interrupted, to the last bit."""
    rc = _run_child(tmp_path / "ckpt", tmp_path / "log.jsonl", die_after=5)
    assert rc == -signal.SIGKILL
    killed = read_log(tmp_path / "log.jsonl")
    assert max(killed) == 5
    _run_child(tmp_path / "ckpt", tmp_path / "log.jsonl")
    resumed = read_log(tmp_path / "log.jsonl")
    assert [resumed[s]["loss"] for s in range(STEPS)] == \
        [uninterrupted[s]["loss"] for s in range(STEPS)]
    # The same batches, bitwise, before and after the kill.
    assert _batches(tmp_path / "log.jsonl.batches") == uninterrupted["batches"]
    # The second run started from a checkpoint (step 4's, or step 2's had 4's not finished).
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert json.loads(lines[6])["step"] in (2, 4)


def test_corrupt_latest_checkpoint_falls_back_with_a_warning(uninterrupted, tmp_path, caplog):
    cfg, opt, data, loop = _setup()
    ckpt = tmp_path / "ckpt"
    train(cfg, opt, data, LoopConfig(**{**loop.__dict__, "steps": 6}), checkpoint_dir=ckpt)
    with TrainCheckpoints(ckpt) as ckpts:
        assert ckpts.steps() == [2, 4, 6]
    for f in (ckpt / "6").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\0" * 7)  # every file of the newest checkpoint garbled
    log = tmp_path / "log.jsonl"
    with caplog.at_level(logging.WARNING):
        train(cfg, opt, data, loop, checkpoint_dir=ckpt, log_file=log)
    assert any("unreadable" in r.message and "6" in r.message for r in caplog.records)
    resumed = read_log(log)
    assert sorted(resumed) == [4, 5, 6, 7]  # resumed from step 4's checkpoint
    assert [resumed[s]["loss"] for s in (4, 5, 6, 7)] == \
        [uninterrupted[s]["loss"] for s in (4, 5, 6, 7)]


# One step per call in the slow run: test_train.py's test_non_finite_step_leaves_the_state_and_
# counts covers the single step in CI; two per call (the scanned path) here.
@pytest.mark.parametrize("steps_per_call", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_non_finite_losses_stop_training_without_touching_parameters(tmp_path, steps_per_call):
    cfg, opt, data, loop = _setup(z_loss_weight=float("inf"), max_bad_steps=3,
                                  steps_per_call=steps_per_call)
    log = tmp_path / "log.jsonl"
    with pytest.raises(TrainingError, match="3 non-finite losses or gradients in a row"):
        train(cfg, opt, data, loop, checkpoint_dir=tmp_path / "ckpt", log_file=log)
    records = read_log(log)
    assert sorted(records) == [0, 1, 2] and all(r["skipped"] == 1.0 for r in records.values())
    # No update was applied, so the schedule never advanced (warmup: step 1 would differ).
    assert len({r["lr"] for r in records.values()}) == 1
    with TrainCheckpoints(tmp_path / "ckpt") as ckpts:
        saved = ckpts.restore_latest(abstract_train_state(cfg, make_optimizer(opt)))
    # Step 2's checkpoint holds the initial parameters: no non-finite update was applied.
    fresh = init_train_state(cfg, make_optimizer(opt))
    for a, b in zip(jax.tree.leaves(saved.params), jax.tree.leaves(fresh.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_several_steps_per_call_match_single_steps_and_resume_exactly(uninterrupted, tmp_path):
    """Two steps per jitted call (``scan_steps``) with a checkpoint every 4. The losses are
    single steps' to float32 rounding (the scanned step compiles on its own); a run resumed from
    step 4's checkpoint repeats the last four bitwise. (Calls cut short at a checkpoint: the
    2-process test, 3 steps at 2 per call.)"""
    cfg, opt, data, loop = _setup(steps_per_call=2, checkpoint_every=4)
    ckpt, log = tmp_path / "ckpt", tmp_path / "log.jsonl"
    train(cfg, opt, data, loop, checkpoint_dir=ckpt, log_file=log)
    first = read_log(log)
    assert sorted(first) == list(range(STEPS))
    np.testing.assert_allclose([first[s]["loss"] for s in range(STEPS)],
                               [uninterrupted[s]["loss"] for s in range(STEPS)], rtol=1e-5)
    with TrainCheckpoints(ckpt) as ckpts:
        assert ckpts.steps() == [4, 8]
    shutil.rmtree(ckpt / "8")
    again = tmp_path / "again.jsonl"
    train(cfg, opt, data, loop, checkpoint_dir=ckpt, log_file=again)
    resumed = read_log(again)
    assert sorted(resumed) == [4, 5, 6, 7]
    assert [resumed[s]["loss"] for s in resumed] == [first[s]["loss"] for s in resumed]


def _child(ckpt: str, log: str, die_after: int | None) -> None:
    cfg, opt, data, loop = _setup()
    data = dataclasses.replace(data, record_to=log + ".batches")

    def on_step(step: int, record: dict) -> None:
        if die_after is not None and step == die_after:
            os.kill(os.getpid(), signal.SIGKILL)

    train(cfg, opt, data, loop, checkpoint_dir=ckpt, log_file=log, on_step=on_step)


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None)
