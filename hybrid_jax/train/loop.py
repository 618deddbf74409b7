"""The training loop: resume from the newest readable checkpoint, step through the dataset,
log every step, evaluate held-out sets and checkpoint every few steps, stop on repeated
non-finite losses."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from hybrid_jax.config import ModelConfig
from hybrid_jax.convert.orbax_io import config_to_json
from hybrid_jax.data.pipeline import PackedDataset, ReadConfig, data_state, resume_changes
from hybrid_jax.sharding import (
    LogicalRules,
    check_batch,
    micro_batches_sharding,
)
from hybrid_jax.train.checkpoint import DATA_ITEM, TrainCheckpoints
from hybrid_jax.train.optimizer import OptimizerConfig, make_optimizer, make_schedule
from hybrid_jax.train.state import (
    TrainState,
    abstract_train_state,
    init_train_state,
    model_template,
    train_state_shardings,
    with_shardings,
)
from hybrid_jax.train.step import jit_train_step, make_train_step


log = logging.getLogger(__name__)


class Evaluator(Protocol):
    """What evaluates during training: ``every`` steps between evaluations, and
    ``evaluator(params) -> {set or task name: {metric: value}}`` (``hybrid_jax.eval``'s
    ``TrainingEvaluator``)."""

    every: int

    def __call__(self, params: dict) -> dict[str, dict[str, float]]: ...


class TrainingError(RuntimeError):
    """Training stopped: too many non-finite steps in a row."""


@dataclass(frozen=True)
class LoopConfig:
    """``steps``: total steps (a resumed run stops there too); ``micro_batches``: gradient
    accumulation, splitting each process's rows into this many micro-batches;
    ``checkpoint_every``: steps between checkpoints (and one at the end);
    ``max_bad_steps``: consecutive non-finite steps tolerated before stopping;
    ``steps_per_call``: steps per jitted call (``step.scan_steps``), cut short where a
    checkpoint or the end falls inside a call. On CPU 8 made the small preset's steps 5-9%
    faster at the median and 14-27% on average (experiments/RESULTS.md, Training); each call's
    metrics are logged step by step when it returns."""

    steps: int
    micro_batches: int = 1
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    max_bad_steps: int = 5
    steps_per_call: int = 1
    z_loss_weight: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "micro_batches", "checkpoint_every", "keep_checkpoints",
                     "max_bad_steps", "steps_per_call"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LoopConfig.{name}: must be a positive int, got {value!r}")


def _targets(abstract: TrainState, shardings: TrainState | None) -> TrainState:
    """Abstract arrays carrying where each restored leaf goes (one device without a mesh)."""
    if shardings is None:
        one = SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: one, abstract)
    return with_shardings(abstract, shardings)


def train(model_config: ModelConfig, optimizer_config: OptimizerConfig,
          dataset: PackedDataset, loop: LoopConfig, *,
          checkpoint_dir: str | Path | None = None, mesh: Mesh | None = None,
          rules: LogicalRules | None = None, log_file: str | Path | None = None,
          tensorboard_dir: str | Path | None = None, read: ReadConfig = ReadConfig(),
          evaluate: Evaluator | None = None,
          on_step: Callable[[int, dict], None] | None = None,
          on_eval: Callable[[int, dict], None] | None = None) -> TrainState:
    """Train to ``loop.steps``, resuming from ``checkpoint_dir``'s newest readable checkpoint.

    Every step appends {"step", "loss", "ce", "z_loss", "grad_norm", "lr", "tokens",
    "skipped", "tokens_per_s"} as a JSON line to ``log_file`` (process 0 only) and passes it to
    ``on_step``, and, given ``tensorboard_dir``, writes each as a TensorBoard scalar
    (tensorboardX event files, process 0 only). With ``evaluate``, the parameters after every
    ``evaluate.every`` steps (and after the last) are evaluated, once that step's checkpoint
    is saved; the metrics go to the same sinks as {"step": the last step taken,
    "eval/<set>/<metric>": ...} (``read_log`` merges them into that step's record: the
    parameters of the checkpoint named step + 1) and to ``on_eval``.

    Batches stream from ``dataset``'s grain iterator (``read``: threads and prefetch); each
    checkpoint keeps the iterator's state and the model config beside the train state, and a
    resume says which data settings changed since (the batches then follow the new data).
    With several processes (``hybrid_jax.distributed.initialize_distributed``), each reads
    only its slice of every global batch.
    Raises ``TrainingError`` after ``loop.max_bad_steps`` non-finite steps in a row (their
    parameters are never applied, and never saved).
    """
    optimizer = make_optimizer(optimizer_config)
    template = model_template(model_config)
    abstract = abstract_train_state(model_config, optimizer, loop.seed)
    shardings = train_state_shardings(abstract, mesh, rules) if mesh is not None else None
    checkpoints = (TrainCheckpoints(checkpoint_dir, keep=loop.keep_checkpoints)
                   if checkpoint_dir is not None else None)
    batches = sinks = None
    try:
        state = (checkpoints.restore_latest(_targets(abstract, shardings))
                 if checkpoints else None)
        if state is None:
            state = init_train_state(model_config, optimizer, mesh=mesh, rules=rules,
                                     seed=loop.seed)
        elif checkpoints is not None:
            _check_resume(checkpoints, dataset, int(state.step))
        step_fn = jit_train_step(
            make_train_step(template, optimizer, z_loss_weight=loop.z_loss_weight,
                            schedule=make_schedule(optimizer_config), mesh=mesh, rules=rules),
            shardings, mesh, rules, steps_per_call=loop.steps_per_call)
        count = jax.process_count()
        batches = dataset.iterator(int(state.step), jax.process_index(), count, read)
        call_batch = _call_batches(dataset, batches, loop, mesh, rules)
        # One log for the run: process 0 writes it (all processes see the same metrics).
        sinks = _MetricSinks(log_file, tensorboard_dir, on_step, jax.process_index() == 0)
        saved_config = config_to_json(model_config)
        every = evaluate.every if evaluate is not None else loop.steps
        step = int(state.step)
        bad_run = int(state.bad_steps)
        while step < loop.steps:
            # A call never runs past the next checkpoint, evaluation or the end, so every run
            # (resumed or not, with the same settings) cuts its steps into the same calls.
            boundary = min(loop.steps, _next_multiple(step, loop.checkpoint_every),
                           _next_multiple(step, every))
            k = min(loop.steps_per_call, boundary - step)
            start = time.perf_counter()
            state, metrics = step_fn(state, call_batch(step, k))
            metrics = jax.device_get(metrics)
            seconds = (time.perf_counter() - start) / k
            for i in range(k):
                record = {"step": step + i,
                          **{name: float(v if loop.steps_per_call == 1 else v[i])
                             for name, v in metrics.items()}}
                record["tokens_per_s"] = record["tokens"] / seconds
                sinks.write(record)
                bad_run = bad_run + 1 if record["skipped"] else 0
                if bad_run >= loop.max_bad_steps:
                    raise TrainingError(f"step {step + i}: {bad_run} non-finite losses or "
                                        f"gradients in a row; stopping (parameters of step "
                                        f"{step + i + 1 - bad_run} kept)")
            step += k
            if checkpoints is not None and (step % loop.checkpoint_every == 0
                                            or step == loop.steps):
                checkpoints.save(state, data=data_state(dataset, step, count),
                                 model_config=saved_config)
            if evaluate is not None and (step % every == 0 or step == loop.steps):
                sinks.write_eval(step - 1, evaluate(state.params), on_eval)
    finally:
        for resource in (sinks, batches, checkpoints):
            if resource is not None:
                resource.close()
    return state


def _next_multiple(step: int, every: int) -> int:
    return (step // every + 1) * every


def _check_resume(checkpoints: TrainCheckpoints, dataset: PackedDataset, step: int) -> None:
    """Say (log, process 0) how the data differs from what checkpoint ``step`` was trained
    on, and when the process count changed (the batches do not: each is a function of its
    step)."""
    saved = checkpoints.json_item(step, DATA_ITEM)  # every process: orbax may synchronise
    if jax.process_index() != 0:
        return
    where = checkpoints.directory / str(step)
    if saved is None:  # written before checkpoints kept the data state
        log.warning("%s keeps no data state: the data cannot be checked against it; batches "
                    "continue from step %d of the data as configured now", where, step)
        return
    for change in resume_changes(saved, dataset, step):
        log.warning("%s: the data changed since this checkpoint (%s); batches from step %d "
                    "follow the new data", where, change, step)
    before, now = int(saved.get("process_count", 1)), jax.process_count()
    if before != now:
        log.warning("%s was written by %d processes, resumed by %d: each reads its slice of "
                    "the same global batches", where, before, now)


def _call_batches(dataset: PackedDataset, batches, loop: LoopConfig, mesh: Mesh | None,
                  rules: LogicalRules | None) -> Callable[[int, int], dict]:
    """``call_batch(first, k)``: steps first .. first+k-1 of this process's data, the next k
    of the ``batches`` iterator, as the jitted call takes them ([A, B/A, T] per step, stacked
    to [K, A, B/A, T] when a call runs several steps), made global arrays over ``mesh``.
    Checks the batch against the mesh first."""
    per_call, a = loop.steps_per_call, loop.micro_batches
    if dataset.global_batch % a:
        raise ValueError(f"LoopConfig.micro_batches: {a} does not divide the global batch "
                         f"{dataset.global_batch}")
    stacked = micro_batches_sharding(mesh, rules) if mesh is not None else None
    if stacked is not None:  # before anything compiles
        check_batch((a, dataset.global_batch // a, dataset.seq_len), stacked,
                    "batch [micro-batches, rows, positions]")
        if per_call > 1:  # calls take [K, A, B, T]
            stacked = NamedSharding(mesh, PartitionSpec(None, *stacked.spec))

    def call_batch(first: int, k: int) -> dict:
        position = batches.get_state()["next_index"]
        if position != first:  # the loop and the iterator disagree: never train on the wrong rows
            raise RuntimeError(f"data iterator at step {position}, training at step {first}")
        hosts = [next(batches) for _ in range(k)]
        local = {key: np.stack([h[key].reshape(a, h[key].shape[0] // a, *h[key].shape[1:])
                                for h in hosts]) for key in hosts[0]}
        if per_call == 1:
            local = {key: v[0] for key, v in local.items()}
        if stacked is None:
            return jax.tree.map(jnp.asarray, local)
        return {key: jax.make_array_from_process_local_data(stacked, v)
                for key, v in local.items()}

    return call_batch


class _MetricSinks:
    """Where each step's record goes: a JSON line in ``log_file`` and a TensorBoard scalar
    per metric in ``tensorboard_dir`` (both only where ``writer``, process 0), and
    ``on_step`` (every process)."""

    def __init__(self, log_file: str | Path | None, tensorboard_dir: str | Path | None,
                 on_step: Callable[[int, dict], None] | None, writer: bool) -> None:
        self.on_step = on_step
        self.log = open(log_file, "a") if log_file is not None and writer else None  # noqa: SIM115
        self.board = None
        if tensorboard_dir is not None and writer:
            from tensorboardX import SummaryWriter

            self.board = SummaryWriter(str(tensorboard_dir))

    def write(self, record: dict) -> None:
        step = record["step"]
        if self.log is not None:
            self.log.write(json.dumps(record) + "\n")
            self.log.flush()
        if self.board is not None:
            for name, value in record.items():
                if name != "step":
                    tag = name if "/" in name else f"train/{name}"
                    self.board.add_scalar(tag, value, global_step=step)
        if self.on_step is not None:
            self.on_step(step, record)

    def write_eval(self, step: int, results: dict[str, dict[str, float]],
                   on_eval: Callable[[int, dict], None] | None) -> None:
        """Held-out ``results`` (set -> metric -> value) of the parameters after ``step``, as
        one record of "eval/<set>/<metric>" values."""
        record = {"step": step, **{f"eval/{name}/{metric}": value
                                   for name, metrics in results.items()
                                   for metric, value in metrics.items()}}
        on_step, self.on_step = self.on_step, None
        try:
            self.write(record)
        finally:
            self.on_step = on_step
        if on_eval is not None:
            on_eval(step, record)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        if self.board is not None:
            self.board.close()


def read_log(path: str | Path) -> dict[int, dict]:
    """A JSONL training log by step, a step's records (training, evaluation) merged; a value
    logged twice (a step re-run after a resume) keeps its last."""
    out: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            out.setdefault(int(record["step"]), {}).update(record)
    return out

