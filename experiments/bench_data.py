"""Benchmark: the grain input pipeline (``hybrid_jax.data.PackedDataset``) against the in-memory
reader it replaced and against the train step it feeds, and its host memory (issue 27).

    python experiments/bench_data.py                 # seq 1024, batch 8, a 10 GB token file
    python experiments/bench_data.py --seq-len 128 --batch 4 --batches 20 --repeats 1 \\
        --big-gb 0.05 --preset tiny                  # the smoke test

Data: synthetic OLMo-core token files (headerless uint16, ids uniform in [1, VOCAB), EOS id 0
sprinkled so that documents average DOC_TOKENS tokens) written to ``--workdir`` (a temporary
folder under /tmp by default, deleted at the end unless ``--keep``): two small files A
(``--small-mb``) and B (half of A) and a big one (``--big-gb``). An existing file of the exact
size is reused. Free disk is checked before anything is written. The smoke test's time is
mostly the tiny train step's compilation.

1. Throughput, rows/s; each contender in its own process, the processes alternated over
   ``--repeats`` rounds (experiments/isolated_timing.py), min and median over the rounds:
   - "grain": ``PackedDataset`` over A (weight 0.7) and B (0.3), memory-mapped, read with
     ``ReadConfig(--threads, --prefetch)``; a call streams ``--batches`` global batches from a
     fresh iterator (at steps never read before) after ``--warmup-batches`` untimed ones;
   - "grain big": the same over the big file (0.7) and A (0.3): rows mostly not in the page
     cache (the big file's pages are dropped from the cache as it is written);
   - "in-memory": the reader before grain, written here as the peer: A and B read whole into
     RAM with ``np.fromfile``, each epoch a seeded ``np.random`` permutation of all rows, a
     batch the next ``--batch`` rows of it gathered by fancy indexing, the vocabulary checked
     and segment ids from ``hybrid_jax.data.segment_ids``; a call is ``--batches`` batches;
   - "train-step": the ``--preset`` model's jitted train step (``bench_train.jax_train_step``:
     ``hybrid_jax.train``'s step, AdamW with clipping) on one micro-batch [1, batch, seq_len]
     of tokens and segment ids, after compilation and one warm-up step; ``--train-steps``
     steps a round.
   Target: grain delivers rows at least ``--target``x as fast as the train step consumes them
   (checked with the slower of "grain" and "grain big", ratio of medians).
2. Host memory, each case in a fresh process: /proc/self/status's RssAnon (private memory: what
   the reader holds), RssFile (mapped file pages, here the memmap's page cache, which the kernel
   may drop) and VmHWM (peak resident), after the imports and after streaming ``--mem-batches``
   batches with the reader still alive: grain over A alone and over the big file alone at
   prefetch 2, ``--prefetch`` and 16, and the in-memory reader over A. Target: RssAnon after
   streaming the big file exceeds that after streaming A by at most 64 MiB + prefetch * (bytes
   of a batch: batch * seq_len * 4 bytes * 2 arrays).

Neither target's outcome changes the exit status: this is a measurement. Processes run as
``hybrid-jax train`` runs them, with glibc's huge-page tunable where it helps
(``hybrid_jax.host_memory``; ``--no-hugepages`` keeps glibc's defaults). ``--json OUT`` writes
every number.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import isolated_timing  # noqa: E402

EOS = 0
VOCAB = 50304  # OLMo's padded vocabulary; the files' ids lie below it
DOC_TOKENS = 512  # mean document length of the synthetic files
WEIGHTS = (0.7, 0.3)
MEM_SLACK = 64 * 2 ** 20  # the memory target's allowance beyond the prefetched batches
MIB = 2 ** 20
_MEMORY_TAG = "BENCH_DATA_MEMORY "


# --------------------------------------------------------------------------- token files
def synthetic_tokens(rng: np.random.Generator, n: int, vocab: int = VOCAB) -> np.ndarray:
    """``n`` uint16 ids uniform in [1, vocab) with EOS (0) at about one in DOC_TOKENS places."""
    ids = rng.integers(1, vocab, n, dtype=np.uint16)
    ids[rng.integers(0, n, max(1, n // DOC_TOKENS))] = EOS
    return ids


def write_token_file(path: Path, n_bytes: int, seed: int, chunk_tokens: int = 1 << 25) -> bool:
    """Write ``n_bytes`` (rounded down to whole tokens) of synthetic tokens to ``path`` in chunks,
    dropping what is written from the page cache as it goes. False: a file of that size was
    there already and is reused."""
    n_tokens = n_bytes // 2
    if path.is_file() and path.stat().st_size == 2 * n_tokens:
        return False
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(path.suffix + ".part")
    with open(tmp, "wb") as f:
        written = 0
        while written < n_tokens:
            n = min(chunk_tokens, n_tokens - written)
            synthetic_tokens(rng, n).tofile(f)
            written += n
            f.flush()
            os.fsync(f.fileno())
            if hasattr(os, "posix_fadvise"):  # keep the page cache for others (and cold)
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    tmp.replace(path)
    return True


def plan_files(workdir: Path, small_mb: float, big_gb: float) -> dict[str, tuple[Path, int]]:
    """{role: (path, bytes)} of the files the run uses."""
    a, b, big = int(small_mb * 1e6), int(small_mb * 1e6 / 2), int(big_gb * 1e9)
    return {"a": (workdir / f"small_a_{a}.u16", a), "b": (workdir / f"small_b_{b}.u16", b),
            "big": (workdir / f"big_{big}.u16", big)}


def check_disk(workdir: Path, files: dict[str, tuple[Path, int]], margin: int = 2 ** 30) -> None:
    """Exit with a message when ``workdir``'s file system cannot take the files still to write
    plus ``margin``."""
    need = sum(n for p, n in files.values() if not (p.is_file() and p.stat().st_size == n // 2 * 2))
    free = shutil.disk_usage(workdir).free
    if need + margin > free:
        sys.exit(f"bench_data: not enough free disk in {workdir}: the token files need "
                 f"{need / 1e9:.2f} GB (+ {margin / 1e9:.1f} GB margin), {free / 1e9:.2f} GB "
                 f"free. Pass a smaller --big-gb or a --workdir on a larger disk.")


# --------------------------------------------------------------------------- readers
def grain_dataset(files: list[str], weights: list[float], seq_len: int, batch: int,
                  seed: int = 0):
    """The training pipeline's ``PackedDataset`` over memory-mapped ``files``."""
    from hybrid_jax.data import PackedDataset, Source, TokenRows, token_file

    sources = tuple(Source(Path(f).stem, TokenRows([token_file(f, "uint16")], [Path(f).stem],
                                                   seq_len, VOCAB), w)
                    for f, w in zip(files, weights))
    return PackedDataset(sources, batch, EOS, seed=seed)


class InMemoryReader:
    """The reader before grain, as the peer: every file read whole into RAM (``np.fromfile``),
    cut into rows of ``seq_len`` (a row never spans two files), each epoch a seeded permutation
    of all rows, batch ``s`` the permutation's next ``global_batch`` rows."""

    def __init__(self, files: list[str], seq_len: int, global_batch: int, eos_id: int = EOS,
                 vocab_size: int = VOCAB, seed: int = 0) -> None:
        arrays = [np.fromfile(f, dtype=np.uint16) for f in files]
        self.rows = np.concatenate([a[:len(a) // seq_len * seq_len].reshape(-1, seq_len)
                                    for a in arrays])
        del arrays
        self.global_batch, self.eos_id, self.vocab_size, self.seed = (
            global_batch, eos_id, vocab_size, seed)
        self.steps_per_epoch = len(self.rows) // global_batch
        self._epoch, self._order = -1, None

    def batch(self, step: int) -> dict[str, np.ndarray]:
        from hybrid_jax.data import segment_ids

        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
        picked = self._order[index * self.global_batch:(index + 1) * self.global_batch]
        tokens = self.rows[picked].astype(np.int32)
        if int(tokens.max()) >= self.vocab_size:
            raise ValueError(f"token id {int(tokens.max())} is outside the vocabulary")
        return {"tokens": tokens, "segment_ids": segment_ids(tokens, self.eos_id)}


def _check_batch(b: dict, batch: int, seq_len: int) -> dict:
    """Checks a batch's shapes (and that the tokens are int32); returns its dtypes and bytes."""
    for key in ("tokens", "segment_ids"):
        if b[key].shape != (batch, seq_len) or not np.issubdtype(b[key].dtype, np.integer):
            raise AssertionError(f"{key}: {b[key].shape} {b[key].dtype}")
    if b["tokens"].dtype != np.int32:
        raise AssertionError(f"tokens: {b['tokens'].dtype}")
    return {"dtypes": {k: str(v.dtype) for k, v in b.items()},
            "nbytes": int(sum(v.nbytes for v in b.values()))}


# --------------------------------------------------------------------------- contenders
def grain_contender(files: list[str], weights: list[float], seq_len: int, batch: int,
                    batches: int, threads: int, prefetch: int, warmup_batches: int):
    """(prepare, run): prepare opens an iterator at steps never read before and reads
    ``warmup_batches``; run reads ``batches`` batches from it."""
    from hybrid_jax.data import ReadConfig

    ds = grain_dataset(files, weights, seq_len, batch)
    read = ReadConfig(threads=threads, prefetch=prefetch)
    held: dict = {"it": None, "next": 0}

    def prepare():
        if held["it"] is not None:
            held["it"].close()
        held["it"] = ds.iterator(held["next"], 0, 1, read)
        held["next"] += warmup_batches + batches
        for _ in range(warmup_batches):
            next(held["it"])

    def run():
        it = held["it"]
        for _ in range(batches):
            b = next(it)
        held["last"] = b

    prepare()
    run()
    return {"call": (prepare, run)}, {"rows": ds.num_rows, "rows_per_call": batches * batch,
                                      **_check_batch(held["last"], batch, seq_len)}


def in_memory_contender(files: list[str], seq_len: int, batch: int, batches: int):
    """A call reads the next ``batches`` batches."""
    t = time.perf_counter()
    reader = InMemoryReader(files, seq_len, batch)
    load_s = time.perf_counter() - t
    held = {"step": 0}

    def run():
        for _ in range(batches):
            b = reader.batch(held["step"])
            held["step"] += 1
        held["last"] = b

    run()
    return run, {"rows": len(reader.rows), "rows_per_call": batches * batch, "load_s": load_s,
                 **_check_batch(held["last"], batch, seq_len)}


def train_step_contender(preset: str, seq_len: int, batch: int):
    """(prepare, run): prepare makes a fresh batch [1, batch, seq_len] on the device, run takes
    one train step on it (the state donated and carried). Compiled here."""
    import jax
    from bench_train import jax_train_step  # the step bench_train.py times, one per call

    from hybrid_jax import PRESETS
    from hybrid_jax.data import segment_ids

    cfg = PRESETS[preset]()
    state, step = jax_train_step(cfg)
    held = {"state": state}
    rng = np.random.default_rng(0)

    def prepare():
        tokens = synthetic_tokens(rng, batch * seq_len, cfg.vocab_size).astype(np.int32)
        tokens = tokens.reshape(1, batch, seq_len)
        held["batch"] = jax.device_put({"tokens": tokens,
                                        "segment_ids": segment_ids(tokens, EOS)})

    def run():
        held["state"], metrics = step(held["state"], held["batch"])
        held["loss"] = float(jax.block_until_ready(metrics["loss"]))

    t = time.perf_counter()
    prepare()
    run()
    params = sum(x.size for x in jax.tree_util.tree_leaves(held["state"].params))
    return {"call": (prepare, run)}, {"rows_per_call": batch, "compile_s":
                                      time.perf_counter() - t, "params": int(params),
                                      "loss": held["loss"]}


# --------------------------------------------------------------------------- memory
def proc_status() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile and VmHWM of this process, bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def memory_worker(reader: str, files: list[str], seq_len: int, batch: int, batches: int,
                  threads: int, prefetch: int) -> dict:
    """/proc/self/status before building ``reader`` and after streaming ``batches`` batches
    from it (the reader, its iterator and the last batch still alive)."""
    from hybrid_jax.data import ReadConfig  # the imports, as a trainer has them, before "before"

    gc.collect()
    before = proc_status()
    if reader == "grain":
        # Another seed than the timed readers': their rows of the big file stay uncached.
        ds = grain_dataset(files, [1.0] * len(files), seq_len, batch, seed=1)
        it = ds.iterator(0, 0, 1, ReadConfig(threads=threads, prefetch=prefetch))
        for _ in range(batches):
            b = next(it)
    else:
        mem = InMemoryReader(files, seq_len, batch)
        for s in range(batches):
            b = mem.batch(s)
    gc.collect()
    after = proc_status()
    return {"before": before, "after": after, **_check_batch(b, batch, seq_len)}


def run_memory_cases(cases: list[dict], parallel: int) -> list[dict]:
    """Each case in a fresh process of this script, ``parallel`` at a time."""
    results: list[dict | None] = [None] * len(cases)
    pending = list(enumerate(cases))
    running: list[tuple[int, subprocess.Popen]] = []
    while pending or running:
        while pending and len(running) < parallel:
            i, case = pending.pop(0)
            kwargs = {k: v for k, v in case.items() if k != "name"}
            argv = [sys.executable, __file__, "--memory-worker", json.dumps(kwargs)]
            running.append((i, subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)))
        i, proc = running.pop(0)
        out, _ = proc.communicate()
        lines = [ln for ln in out.splitlines() if ln.startswith(_MEMORY_TAG)]
        if proc.returncode or not lines:
            raise RuntimeError(f"memory case {cases[i]['name']!r} failed ({proc.returncode})")
        results[i] = dict(cases[i], **json.loads(lines[-1][len(_MEMORY_TAG):]))
    return results  # type: ignore[return-value]


# --------------------------------------------------------------------------- harness
class _Worker(isolated_timing._Process):
    """isolated_timing's worker process, started without waiting for it to be ready, so that
    every contender starts (imports, compiles, warms up) at once: none of that is timed."""

    def __init__(self, contender: isolated_timing.Contender, warmup: int) -> None:
        self.contender = contender
        argv = [sys.executable, isolated_timing.__file__, "--worker", contender.script,
                contender.factory, json.dumps(contender.kwargs), str(warmup)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)

    def wait_ready(self) -> None:
        ready = self._expect(isolated_timing._READY)
        self.tasks, self.info = ready["tasks"], ready["info"]


def compare_with_memory(contenders: list, cases: list[dict], *, rounds: int, settle_s: float,
                        mem_parallel: int, warmup: int = 1):
    """isolated_timing.compare's alternation (one call per contender a round, or its
    ``runs``), with every process started at once and the memory ``cases`` run meanwhile;
    the first round starts when all are ready and the cases are done. Returns
    ({name: Result}, memory results)."""
    import threading

    mem: dict = {}
    thread = threading.Thread(target=lambda: mem.update(
        cases=run_memory_cases(cases, mem_parallel)))
    workers: list[_Worker] = []
    try:
        thread.start()
        workers = [_Worker(con, warmup) for con in contenders]
        for w in workers:
            w.wait_ready()
        thread.join()
        if "cases" not in mem:
            raise RuntimeError("the memory cases failed (see above)")
        times: dict[str, list[float]] = {w.contender.name: [] for w in workers}
        for _ in range(rounds):
            for w in workers:
                time.sleep(settle_s)
                times[w.contender.name] += w.time(isolated_timing.DEFAULT_TASK,
                                                  w.contender.runs or 1)
    finally:
        for w in workers:
            w.close()
        thread.join()
    return ({w.contender.name: isolated_timing.Result(w.contender.name,
                                                     isolated_timing.DEFAULT_TASK,
                                                     times[w.contender.name], w.info)
             for w in workers}, mem["cases"])


# --------------------------------------------------------------------------- main
def _mib(n: float) -> str:
    return f"{n / MIB:,.1f}"


def _rate(x: float) -> str:
    """A rate: whole numbers from 100 up, three significant digits below."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8, help="global batch (one process)")
    p.add_argument("--batches", type=int, default=200, help="batches per timed call (readers)")
    p.add_argument("--warmup-batches", type=int, default=5,
                   help="untimed batches read from each fresh grain iterator")
    p.add_argument("--repeats", type=int, default=3, help="rounds of alternation")
    p.add_argument("--settle", type=float, default=0.5,
                   help="seconds of pause before each contender's turn")
    p.add_argument("--threads", type=int, default=2, help="grain ReadConfig.threads")
    p.add_argument("--prefetch", type=int, default=4, help="grain ReadConfig.prefetch")
    p.add_argument("--preset", default="small", help="the train step's model preset")
    p.add_argument("--train-steps", type=int, default=2, help="timed train steps per round")
    p.add_argument("--skip-train-step", action="store_true")
    p.add_argument("--target", type=float, default=20.0,
                   help="grain rows/s over train-step rows/s to reach")
    p.add_argument("--big-gb", type=float, default=10.0, help="size of the big token file")
    p.add_argument("--small-mb", type=float,
                   help="size of small file A (B is half of it); default min(100, big/4)")
    p.add_argument("--mem-batches", type=int, default=300,
                   help="batches streamed in each memory case")
    p.add_argument("--mem-parallel", type=int, default=2,
                   help="memory cases run at a time (untimed; each its own process)")
    p.add_argument("--workdir", help="folder for the token files (default: a temporary folder "
                   "under /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the token files (and the folder)")
    p.add_argument("--json", help="write every number to this file")
    p.add_argument("--no-hugepages", action="store_true",
                   help="do not restart with glibc.malloc.hugetlb=1 (see hybrid_jax.host_memory)")
    args = p.parse_args()
    if args.small_mb is None:
        args.small_mb = min(100.0, args.big_gb * 1e3 / 4)
    started = time.perf_counter()

    made_dir = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_data_", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    files = plan_files(workdir, args.small_mb, args.big_gb)
    written: list[Path] = []
    try:
        check_disk(workdir, files)
        print(isolated_timing.machine_header())
        print(f"# other processes share this machine (load average above); GLIBC_TUNABLES="
              f"{os.environ.get('GLIBC_TUNABLES', '')!r}", flush=True)
        t = time.perf_counter()
        for seed, (role, (path, n)) in enumerate(files.items(), 1):
            if write_token_file(path, n, seed):
                written.append(path)
        print(f"# token files in {workdir} (written {len(written)} in "
              f"{time.perf_counter() - t:.1f} s): "
              + ", ".join(f"{r} {n / 1e9:.3g} GB" for r, (_, n) in files.items()), flush=True)
        results = measure(args, {r: str(path) for r, (path, _) in files.items()})
    finally:
        if not args.keep:
            for path, _ in files.values():
                path.unlink(missing_ok=True)
                path.with_suffix(path.suffix + ".part").unlink(missing_ok=True)
            if made_dir:
                shutil.rmtree(workdir, ignore_errors=True)
    results["wall_s"] = time.perf_counter() - started
    print(f"# wall time {results['wall_s']:.1f} s")
    print(results["summary"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str) + "\n")


def measure(args: argparse.Namespace, path: dict[str, str]) -> dict:
    """Both parts; prints as it goes and returns every number."""
    b, t = args.batch, args.seq_len
    batch_bytes = b * t * 4 * 2
    print(f"# rows of {t} tokens, global batch {b} (one process): a batch is {batch_bytes:,} "
          f"bytes ({b} x {t} x 4 bytes x 2 arrays, tokens and segment_ids); grain "
          f"ReadConfig(threads={args.threads}, prefetch={args.prefetch}); mixture weights "
          f"{WEIGHTS}")
    out: dict = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                 "machine": isolated_timing.machine_header(), "args": vars(args),
                 "batch_bytes": batch_bytes}

    # ---- the contenders' processes start (and compile) while the memory cases run; the
    # rounds begin when all are ready and the memory cases are done
    c = isolated_timing.Contender
    reader = dict(seq_len=t, batch=b, batches=args.batches)
    g = dict(reader, threads=args.threads, prefetch=args.prefetch,
             warmup_batches=args.warmup_batches, weights=list(WEIGHTS))
    contenders = [c("grain", __file__, "grain_contender", dict(g, files=[path["a"], path["b"]])),
                  c("grain big", __file__, "grain_contender",
                    dict(g, files=[path["big"], path["a"]])),
                  c("in-memory", __file__, "in_memory_contender",
                    dict(reader, files=[path["a"], path["b"]]))]
    if not args.skip_train_step:
        contenders.append(c("train-step", __file__, "train_step_contender",
                            dict(preset=args.preset, seq_len=t, batch=b), runs=args.train_steps))
    common = dict(seq_len=t, batch=b, batches=args.mem_batches, threads=args.threads)
    prefetches = sorted({2, args.prefetch, 16})
    cases = [dict(name=f"grain, A, prefetch {args.prefetch}", reader="grain", files=[path["a"]],
                  prefetch=args.prefetch, **common)]
    cases += [dict(name=f"grain, big, prefetch {q}", reader="grain", files=[path["big"]],
                   prefetch=q, **common) for q in prefetches]
    cases.append(dict(name="in-memory, A", reader="in-memory", files=[path["a"]], prefetch=0,
                      **common))
    res, mem = compare_with_memory(contenders, cases, rounds=args.repeats,
                                   settle_s=args.settle, mem_parallel=args.mem_parallel)

    # ---- memory
    sizes = {f: os.path.getsize(f) for f in path.values()}
    print(f"\n## Host memory after streaming {args.mem_batches} batches (MiB; each case in a "
          f"fresh process; 'before' is after the imports)")
    print("| reader | file (MiB) | prefetch | RssAnon before | RssAnon after | RssAnon growth "
          "| RssFile before | RssFile after | VmHWM |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for m in mem:
        bf, af = m["before"], m["after"]
        m["anon_growth"] = af["RssAnon"] - bf["RssAnon"]
        print(f"| {m['name']} | {_mib(sizes[m['files'][0]])} | {m['prefetch']} | "
              f"{_mib(bf['RssAnon'])} | {_mib(af['RssAnon'])} | {_mib(m['anon_growth'])} | "
              f"{_mib(bf['RssFile'])} | {_mib(af['RssFile'])} | {_mib(af['VmHWM'])} |")
    small = mem[0]
    big = {m["prefetch"]: m for m in mem if m["reader"] == "grain" and m["files"] == [path["big"]]}
    lo, hi = big[min(big)], big[max(big)]
    per_batch = (hi["anon_growth"] - lo["anon_growth"]) / (hi["prefetch"] - lo["prefetch"])
    print(f"a batch as the readers return it: {small['nbytes']:,} bytes ({small['dtypes']}); "
          f"expected {batch_bytes:,} (int32 both)")
    print(f"RssAnon growth per extra prefetched batch (big file, prefetch {lo['prefetch']} -> "
          f"{hi['prefetch']}): {per_batch / 1e3:,.0f} kB (a batch: {small['nbytes'] / 1e3:,.0f} kB "
          f"as returned, {batch_bytes / 1e3:,.0f} kB expected)")
    excess = big[args.prefetch]["after"]["RssAnon"] - small["after"]["RssAnon"]
    bound = MEM_SLACK + args.prefetch * batch_bytes
    mem_pass = excess <= bound
    print(f"{'PASS' if mem_pass else 'FAIL'} memory: RssAnon after streaming the big file "
          f"({sizes[path['big']] / 1e9:.3g} GB) minus after the small one "
          f"({sizes[path['a']] / 1e9:.3g} GB), prefetch {args.prefetch}: {_mib(excess)} MiB "
          f"(bound {_mib(bound)} MiB = 64 MiB + {args.prefetch} x {batch_bytes:,} bytes)",
          flush=True)
    out["memory"] = {"cases": mem, "excess_bytes": excess, "bound_bytes": bound,
                     "growth_per_prefetched_batch_bytes": per_batch, "pass": mem_pass}

    # ---- throughput
    print(f"\n## Throughput (rows/s; train-step: the {args.preset!r} preset)", flush=True)
    rate = {}
    print("| contender | rows/s (at min time) | rows/s (at median time) | timed calls "
          "| rows a call |")
    print("|---|---:|---:|---:|---:|")
    for con in contenders:
        r = res[con.name]
        rows = r.info["rows_per_call"]
        rate[con.name] = {"min_time": rows / r.min, "median_time": rows / r.median,
                          "times_s": r.times, "info": r.info}
        print(f"| {con.name} | {_rate(rows / r.min)} | {_rate(rows / r.median)} | {r.runs} | "
              f"{rows} |")
    print(f"(each contender in its own process, all started at once (untimed), then alternated "
          f"over {args.repeats} round(s) after a warm-up call, {args.settle:g} s pause between "
          f"turns; a call: {args.batches} batches (readers), one step (train-step, "
          f"{args.train_steps} a round); min and median over all calls, ratios of medians)")
    med = {k: v["median_time"] for k, v in rate.items()}
    print(f"grain / in-memory: {med['grain'] / med['in-memory']:.2f}x, grain big / in-memory: "
          f"{med['grain big'] / med['in-memory']:.2f}x (medians)")
    out["throughput"] = rate
    slower = min(("grain", "grain big"), key=med.get)
    summary_train = "train step skipped"
    if "train-step" in med:
        info = rate["train-step"]["info"]
        over = med[slower] / med["train-step"]
        train_pass = over >= args.target
        print(f"train-step: {info['params']:,} parameters, compiled and first step in "
              f"{info['compile_s']:.1f} s, {b / med['train-step']:.2f} s a step (median)")
        print(f"grain / train-step: {_rate(med['grain'] / med['train-step'])}x, grain big / "
              f"train-step: {_rate(med['grain big'] / med['train-step'])}x (medians)")
        print(f"{'PASS' if train_pass else 'FAIL'} throughput: {slower} delivers "
              f"{_rate(over)}x the rows the {args.preset} train step consumes (target >= "
              f"{args.target:g}x)")
        out["throughput_pass"] = train_pass
        summary_train = (f"train-step {_rate(med['train-step'])} rows/s, {slower}/train-step "
                         f"{_rate(over)}x ({'PASS' if train_pass else 'FAIL'} >= {args.target:g}x)")
    else:
        print("throughput target not checked (--skip-train-step)")
    out["summary"] = (f"bench_data: grain {_rate(med['grain'])} rows/s, grain big "
                      f"{_rate(med['grain big'])}, in-memory {_rate(med['in-memory'])} (medians); "
                      f"{summary_train}; RssAnon big - small {_mib(excess)} MiB "
                      f"({'PASS' if mem_pass else 'FAIL'} <= {_mib(bound)} MiB)")
    return out


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--memory-worker":
        result = memory_worker(**json.loads(sys.argv[2]))
        sys.stdout.write(_MEMORY_TAG + json.dumps(result) + "\n")
    else:
        if "--no-hugepages" not in sys.argv:
            from hybrid_jax.host_memory import restart_with_hugepages

            restart_with_hugepages()
        main()
