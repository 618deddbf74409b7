"""Time benchmark contenders so that one cannot disturb another's measurement.

Timing two implementations one after the other in one process lets the first disturb the
second: torch's OpenMP threads keep spinning for a while after a call and take the cores the
next measurement needs, XLA's thread pool does the same, and the allocator's state carries
over. So every contender here runs in a process of its own, and the processes take turns:

1. Each contender's process is started in turn, builds its work and warms it up (compiles)
   while the others wait, and reports that it is ready.
2. In each of ``rounds`` rounds every contender, in the same order (A, B, A, B, ...), times
   ``runs`` calls while every other process sits blocked on its input pipe. A pause of
   ``settle_s`` before each turn lets the previous process's threads stop spinning.
3. Each contender's times over all rounds give its minimum and median; ratios are of medians.

A bench script names its contenders as ``Contender(name, script, factory, kwargs)``: the
worker imports ``script`` as a module and calls ``factory(**kwargs)``, which returns either a
callable that runs one measured call (and blocks until it is done), or a dict of such callables
(one per task, e.g. "fwd" and "fwd+bwd", so that one process serves both), or a tuple of
either and a JSON-able dict of facts to report (sizes, memory, a loss value). A task may also
be a pair (prepare, run): ``prepare()`` runs untimed before each timed ``run()`` (a fresh
cache, say). A factory that returns no tasks (an empty dict) is reported as skipped, under
the task None, with its facts.

    python experiments/isolated_timing.py --selftest   # sleeps timed: checks the harness
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_READY, _TIMES = "ISOLATED_TIMING_READY ", "ISOLATED_TIMING_TIMES "
DEFAULT_TASK = "call"


# --------------------------------------------------------------------------- machine
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_header() -> str:
    """Date, CPU model, cores (and those this process may use), load, and package versions:
    the line every benchmark prints first, so a figure always travels with its machine."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    versions = ", ".join(f"{p} {v}" for p in ("jax", "jaxlib", "torch", "transformers")
                         if (v := _version(p)))
    return (f"# {datetime.datetime.now().isoformat(timespec='seconds')}; {cpu_model()}, "
            f"{os.cpu_count()} cores ({usable} usable), {platform.machine()}; load average "
            f"{load}; Python {platform.python_version()}, {versions}")


# --------------------------------------------------------------------------- results
@dataclass
class Contender:
    """One implementation to time: ``factory(**kwargs)`` from ``script``, in its own process."""

    name: str
    script: str
    factory: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    runs: int | None = None  # timed calls per round, if not compare's (e.g. for longer calls)


@dataclass
class Result:
    """A contender's times (seconds) for one task over every round, and its reported facts."""

    name: str
    task: str | None  # None: the contender was skipped (no tasks)
    times: list[float]
    info: dict[str, Any]

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def runs(self) -> int:
        return len(self.times)

    def summary(self, scale: float = 1e3, unit: str = "ms") -> str:
        """``median X ms, min Y ms (N runs)``."""
        return (f"median {self.median * scale:.3f} {unit}, min {self.min * scale:.3f} {unit} "
                f"({self.runs} runs)")


def ratio(numerator: Result, denominator: Result) -> float:
    """``numerator``'s median time over ``denominator``'s: above 1, the denominator is faster."""
    return numerator.median / denominator.median


def describe(rounds: int, runs: int, settle_s: float) -> str:
    """The method line a benchmark prints under its table."""
    return (f"each contender in its own process, alternated over {rounds} round(s) of {runs} "
            f"timed call(s) after a warm-up, {settle_s:g} s pause between turns; min and median "
            f"over all rounds, ratios of medians")


# --------------------------------------------------------------------------- worker side
def _load(script: str):
    """``script`` imported as a module (not as ``__main__``), its folder on sys.path."""
    path = Path(script).resolve()
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(f"_contender_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _tasks(made: Any) -> tuple[dict[str, Callable[[], Any]], dict[str, Any]]:
    """A factory's return value as ({task: callable}, info)."""
    info: dict[str, Any] = {}
    if isinstance(made, tuple):
        made, info = made
    tasks = made if isinstance(made, dict) else {DEFAULT_TASK: made}
    return tasks, info


def _say(tag: str, payload: Any) -> None:
    sys.stdout.write(tag + json.dumps(payload, default=str) + "\n")
    sys.stdout.flush()


def worker(script: str, factory: str, kwargs_json: str, warmup: int) -> None:
    """Build the contender, warm every task up, then time calls as the parent asks: each input
    line is ``TASK RUNS``; an empty line or end of input ends the process."""
    tasks, info = _tasks(getattr(_load(script), factory)(**json.loads(kwargs_json)))
    for task in tasks.values():
        for _ in range(warmup):
            for fn in task if isinstance(task, tuple) else (task,):
                fn()
    _say(_READY, {"tasks": list(tasks), "info": info})
    for line in sys.stdin:
        if not line.strip():
            break
        task, runs = line.rsplit(" ", 1)
        prepare, fn = tasks[task] if isinstance(tasks[task], tuple) else (None, tasks[task])
        times = []
        for _ in range(int(runs)):
            if prepare is not None:
                prepare()
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        _say(_TIMES, times)


# --------------------------------------------------------------------------- parent side
class _Process:
    """A running worker: started, waited on until ready, asked for times, closed."""

    def __init__(self, contender: Contender, warmup: int) -> None:
        self.contender = contender
        argv = [sys.executable, __file__, "--worker", contender.script, contender.factory,
                json.dumps(contender.kwargs), str(warmup)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        ready = self._expect(_READY)
        self.tasks, self.info = ready["tasks"], ready["info"]

    def _expect(self, tag: str) -> Any:
        """The next tagged line's payload; the worker's other output goes to stderr."""
        for line in self.proc.stdout:
            if line.startswith(tag):
                return json.loads(line[len(tag):])
            sys.stderr.write(line)
        code = self.proc.wait()
        raise RuntimeError(f"contender {self.contender.name!r} exited ({code}) before {tag.strip()}")

    def time(self, task: str, runs: int) -> list[float]:
        self.proc.stdin.write(f"{task} {runs}\n")
        self.proc.stdin.flush()
        return self._expect(_TIMES)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def compare(contenders: Sequence[Contender], *, rounds: int = 3, runs: int = 5,
            warmup: int = 1, settle_s: float = 0.5) -> dict[tuple[str, str | None], Result]:
    """Time every task of every contender, each in its own process, alternated over ``rounds``
    rounds of ``runs`` calls: {(contender name, task): Result}. Only one process computes at a
    time, but all stay alive, each holding its inputs, until the comparison ends. A contender
    whose process fails raises RuntimeError naming it."""
    processes: list[_Process] = []
    try:
        for c in contenders:
            processes.append(_Process(c, warmup))
        times: dict[tuple[str, str], list[float]] = {
            (p.contender.name, t): [] for p in processes for t in p.tasks}
        for _ in range(rounds):
            for p in processes:
                for task in p.tasks:
                    time.sleep(settle_s)
                    times[p.contender.name, task] += p.time(task, p.contender.runs or runs)
    finally:
        for p in processes:
            p.close()
    info = {p.contender.name: p.info for p in processes}
    skipped = {(p.contender.name, None): Result(p.contender.name, None, [], p.info)
               for p in processes if not p.tasks}
    return {(n, t): Result(n, t, ts, info[n]) for (n, t), ts in times.items()} | skipped


def measure_alone(contender: Contender, *, rounds: int = 1, runs: int = 5,
                  warmup: int = 1, settle_s: float = 0.0) -> dict[str, Result]:
    """One contender timed in its own process: {task: Result} (e.g. a machine's matmul rate)."""
    results = compare([contender], rounds=rounds, runs=runs, warmup=warmup, settle_s=settle_s)
    return {task: r for (_, task), r in results.items()}


def add_arguments(parser: argparse.ArgumentParser, *, rounds: int = 3, runs: int = 5) -> None:
    """The harness's options, the same in every bench script: --rounds, --runs, --settle."""
    parser.add_argument("--rounds", type=int, default=rounds,
                        help="rounds of alternation between the contenders' processes")
    parser.add_argument("--runs", "--repeats", dest="runs", type=int, default=runs,
                        help="timed calls per contender and task in each round")
    parser.add_argument("--settle", type=float, default=0.5,
                        help="seconds of pause before each contender's turn")


def options(args: argparse.Namespace) -> dict[str, Any]:
    """``compare``'s keyword arguments from the options ``add_arguments`` declared."""
    return {"rounds": args.rounds, "runs": args.runs, "settle_s": args.settle}


# --------------------------------------------------------------------------- self test
def sleeper(seconds: float, prepare_s: float = 0.0, skip: bool = False):
    """The self test's contender: a call that sleeps, after an untimed sleep of ``prepare_s``
    (as a (prepare, run) pair), or no tasks at all with ``skip``."""
    info = {"seconds": seconds, "pid": os.getpid()}
    if skip:
        return {}, dict(info, skipped="asked to")
    run = lambda: time.sleep(seconds)
    return ({DEFAULT_TASK: (lambda: time.sleep(prepare_s), run)} if prepare_s else run), info


def _selftest() -> None:
    a = Contender("sleep 10 ms", __file__, "sleeper", {"seconds": 0.01})
    b = Contender("sleep 20 ms", __file__, "sleeper", {"seconds": 0.02, "prepare_s": 0.05},
                  runs=2)
    skipped = Contender("skipped", __file__, "sleeper", {"seconds": 1.0, "skip": True})
    res = compare([a, b, skipped], rounds=2, runs=3, settle_s=0.05)
    ra, rb = res["sleep 10 ms", DEFAULT_TASK], res["sleep 20 ms", DEFAULT_TASK]
    print(machine_header())
    for r in (ra, rb):
        print(f"{r.name}: {r.summary()} in process {r.info['pid']}")
    print(f"ratio of medians: {ratio(rb, ra):.2f}x")
    assert ra.info["pid"] != rb.info["pid"] != os.getpid() and (ra.runs, rb.runs) == (6, 4)
    assert 1.5 < ratio(rb, ra) < 2.5, ratio(rb, ra)  # the untimed prepare left out
    assert res["skipped", None].info["skipped"] == "asked to" and not res["skipped", None].times


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(argv[1], argv[2], argv[3], int(argv[4]))
    elif argv[:1] == ["--selftest"]:
        _selftest()
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
