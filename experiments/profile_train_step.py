"""Where a CPU train step's time goes: per model part, forward and backward, and the kernel's share.

    python experiments/profile_train_step.py                     # small preset, 4 x 512
    python experiments/profile_train_step.py --steps-per-call 8 --top 8

Runs the jitted train step (as ``bench_train.py`` does, started the same way), then:
  - per call: wall time, minor page faults and kernel (system) CPU time (``getrusage``);
  - one profiled call (``jax.profiler``, whose trace records every XLA:CPU thunk): each thunk's
    time shared among the thunks running at the same moment, grouped by the model's
    ``jax.named_scope`` names (gdn_rule, gdn, attention, mlp, loss; "other" is the embedding,
    head, optimizer and glue), forward or backward (``transpose(`` in the op's name), with
    the largest ops of each group by output shape ("mm" marks matmuls).
The profiled step runs slower than an unprofiled one; read shares, not milliseconds. XLA:CPU's
generic dots (HLO ``dot`` thunks, not YNNPACK fusions) run asynchronously, and their spans
undercount them.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import resource
import sys
import tempfile
import time

SCOPES = ("gdn_rule", "gdn", "attention", "mlp", "loss")


def _thunk_times(trace_dir: str) -> tuple[dict[str, float], float]:
    """{thunk name: ms per call, shared among concurrent thunks}, and ms with none running."""
    path = sorted(glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True))[-1]
    with gzip.open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    skip = ("Thunk", "$", "Slinky", "Threadpool", "end:", "Pjit", "Common", "Wait", "Parse",
            "Handle", "Allocate", "Python")
    thunks = [e for e in events if e.get("ph") == "X" and not e["name"].startswith(skip)]
    edges = sorted([(e["ts"], 1, i) for i, e in enumerate(thunks)] +
                   [(e["ts"] + e["dur"], -1, i) for i, e in enumerate(thunks)])
    shares: collections.Counter = collections.Counter()
    active: set[int] = set()
    idle, last = 0.0, None
    for t, kind, i in edges:
        if last is not None:
            for j in active:
                shares[thunks[j]["name"]] += (t - last) / len(active) / 1e3
            if not active:
                idle += (t - last) / 1e3
        (active.add if kind > 0 else active.discard)(i)
        last = t
    return dict(shares), idle


def _hlo_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
    """{instruction name: (output shape, op_name metadata)} from compiled HLO text."""
    ops = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ", line)
        if m:
            op = re.search(r'op_name="([^"]*)"', line)
            ops[m.group(1)] = (m.group(2).split("{")[0], op.group(1) if op else "")
    return ops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps-per-call", type=int, default=1)
    p.add_argument("--calls", type=int, default=6, help="timed calls before the profiled one")
    p.add_argument("--top", type=int, default=5, help="largest ops listed per group")
    p.add_argument("--no-hugepages", action="store_true")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench_train import jax_train_step  # this script's directory is on sys.path

    from hybrid_jax import PRESETS

    cfg = PRESETS[args.preset]()
    k = args.steps_per_call
    state, step = jax_train_step(cfg, k)
    shape = (1, args.batch, args.seq_len) if k == 1 else (k, 1, args.batch, args.seq_len)
    batch = {"tokens": jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, shape),
                                   jnp.int32)}
    compiled = step.lower(state, batch).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
    print(f"{args.preset}, batch {args.batch} x {args.seq_len}, {k} step(s) per call, "
          f"temporaries {temp:.0f} MiB, GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES')}")
    for i in range(args.calls + 1):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics["loss"])
        after = resource.getrusage(resource.RUSAGE_SELF)
        if i:  # the first call compiled
            print(f"  call {i}: {(time.perf_counter() - start) * 1e3 / k:7.1f} ms/step, "
                  f"{(after.ru_minflt - before.ru_minflt) // k:7d} page faults/step, kernel "
                  f"{(after.ru_stime - before.ru_stime) * 1e3 / k:5.0f} ms/step")

    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics["loss"])
        jax.profiler.stop_trace()
        shares, idle = _thunk_times(trace_dir)
    ops = _hlo_ops(compiled.as_text())
    groups: collections.Counter = collections.Counter()
    tops: dict = collections.defaultdict(collections.Counter)
    for name, ms in shares.items():
        shape_, op = ops.get(name, ("?", ""))
        parts = op.split("/")
        scope = next((s for s in SCOPES if s in parts or any(p.endswith(f"({s})") or
                                                             f"({s})" in p for p in parts)),
                     "other")
        key = (scope, "backward" if "transpose(" in op else "forward")
        groups[key] += ms / k
        matmul = "dot_general" in op and name.startswith(("ynn", "dot"))
        tops[key][("mm " if matmul else "") + f"{shape_} {parts[-1][:28]}"] += ms / k
    total = sum(groups.values())
    print(f"\nprofiled call: {total:.0f} ms/step in thunks, {idle / k:.0f} ms/step with none "
          f"running\n\n| part | direction | ms/step | share |\n|---|---|---:|---:|")
    for (scope, direction), ms in groups.most_common():
        print(f"| {scope} | {direction} | {ms:.1f} | {ms / total:.0%} |")
    if args.top:
        for key, _ in groups.most_common():
            print(f"\n{key[0]} {key[1]}:")
            for label, ms in tops[key].most_common(args.top):
                print(f"  {ms:7.1f}  {label}")


if __name__ == "__main__":
    if "--no-hugepages" not in sys.argv:
        from hybrid_jax.host_memory import restart_with_hugepages

        restart_with_hugepages()
    main()
