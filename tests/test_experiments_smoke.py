"""Every script under experiments/ runs in its smallest mode, each in a fresh process, so that a
broken import or a renamed API fails CI rather than the next person who runs the script.

The table below maps each script to its smoke arguments; a test checks that it covers exactly
what experiments/ holds, so a new script needs a smoke mode (and a row) to pass. A run must
exit 0, print no traceback or caught failure, and write nothing into experiments/ (results and
plots go to a temporary folder: ``{tmp}`` in the arguments).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "experiments"
TIMING = ["--rounds", "2", "--runs", "1", "--settle", "0"]  # isolated_timing, the least

# script -> smoke arguments; a string instead names the test that runs it end to end.
SMOKE: dict[str, list[str] | str] = {
    "aot_tpu_7b.py": ["report"],  # the compile parts take minutes a case; tests/test_aot.py
    "bench_attention.py": ["--T", "256", "--H", "2", "--Hkv", "2", "--D", "32", "--block", "128",
                           *TIMING],
    "bench_convert.py": ["--smoke"],
    # The train-step contender (bench_train.py's smoke compiles the same step) left out.
    "bench_data.py": ["--no-hugepages", "--seq-len", "64", "--batch", "2", "--batches", "10",
                      "--repeats", "1", "--big-gb", "0.02", "--skip-train-step",
                      "--workdir", "{tmp}/data", "--json", "{tmp}/data.json"],
    "bench_decode.py": ["--contexts", "64", "--batches", "1", "--steps", "2", "--hidden", "64",
                        "--layers", "4", "--vocab", "256", "--prefill-lengths", "32",
                        "--plot", "{tmp}/decode.png", "--json", "{tmp}/decode.json", *TIMING],
    "bench_gdn.py": ["--T", "128", "--H", "2", "--Dk", "32", "--Dv", "32", "--methods", "chunk",
                     "--matmul-n", "64", *TIMING],
    "bench_kernels_gpu.py": ["--smoke", "--no-fla", "--repeats", "1", "--shapes", "0"],
    "bench_loss.py": ["--T", "256", "--D", "32", "--V", "1024", "--chunk", "128", *TIMING],
    # Two contenders' processes of four: the jax dense form and torch eager (the reference)
    # still run, once, in the output check.
    "bench_moe.py": ["--tokens", "64", "--hidden", "32", "--experts", "8", "--top-k", "2",
                     "--moe-intermediate", "16", "--shared", "16", "--torch-impls",
                     "grouped_mm", "--no-dense", *TIMING],
    "bench_train.py": ["--no-hugepages", "--preset", "tiny", "--batch", "1", "--seq-len", "32",
                       "--steps", "2", "--steps-per-call", "2", "--warmup", "1", *TIMING],
    "check_7b.py": "tests/test_check_7b.py",
    "data_efficiency.py": ["--smoke"],
    "isolated_timing.py": ["--selftest"],
    "kernel_registers.py": ["--shape", "1,64,2,32,64", "--lower-only"],  # no triton needed
    "long_context.py": ["--smoke"],
    "profile_train_step.py": ["--preset", "tiny", "--batch", "1", "--seq-len", "32", "--calls",
                              "1", "--no-hugepages"],
    "recall_and_state.py": ["--smoke"],
    "small_scale.py": [],  # a library of the three experiments: importing it is the check
    "synthetic_tasks.py": [],
    # For a lent GPU: parsed (bash -n), and the Python they call imported, below.
    "gpu_check.sh": "test_gpu_scripts_parse_and_their_python_imports",
    "gpu_kernels_call.sh": "test_gpu_scripts_parse_and_their_python_imports",
}
PYTHON_CASES = [name for name, args in SMOKE.items() if isinstance(args, list)]


# The runs are compile-bound and mostly single-threaded: up to this many at a time.
JOBS = int(os.environ.get("HYBRID_JAX_SMOKE_JOBS", min(2, os.cpu_count() or 1)))


def _env() -> dict[str, str]:
    """The test session's environment (XLA's fast-compile flags, CPU), importing this tree."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, JAX_PLATFORMS="cpu", MPLBACKEND="Agg",
                HYBRID_JAX_HUGEPAGES="0")


def _snapshot() -> dict[str, float]:
    """experiments/'s files and their modification times (bytecode caches left out)."""
    return {str(p.relative_to(EXPERIMENTS)): p.stat().st_mtime_ns for p in EXPERIMENTS.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


def _run(script: str, tmp: Path) -> tuple[int, str, float]:
    """(exit code, output, seconds) of one script's smoke run, in ``tmp``."""
    args = [a.replace("{tmp}", str(tmp)) for a in SMOKE[script]]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(EXPERIMENTS / script), *args], cwd=tmp,
                          env=_env(), capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start


@pytest.fixture(scope="module")
def smoke_runs(request, tmp_path_factory):
    """Every selected script's run, started at once, ``JOBS`` at a time: {script: future}; and
    experiments/ as it was before them."""
    selected = [item.callspec.params["script"] for item in request.session.items
                if item.originalname == "test_script_runs_in_its_smallest_mode"]
    before = _snapshot()
    with ThreadPoolExecutor(JOBS) as pool:
        futures = {s: pool.submit(_run, s, tmp_path_factory.mktemp(s.replace(".", "_")))
                   for s in selected}
        yield futures, before
        for f in futures.values():
            f.cancel()


def test_the_table_covers_every_script():
    found = {p.name for p in EXPERIMENTS.iterdir() if p.suffix in (".py", ".sh")}
    assert found == set(SMOKE), (f"scripts without a smoke row: {sorted(found - set(SMOKE))}; "
                                 f"rows without a script: {sorted(set(SMOKE) - found)}")


@pytest.mark.parametrize("script", PYTHON_CASES)
def test_script_runs_in_its_smallest_mode(script, smoke_runs):
    code, out, seconds = smoke_runs[0][script].result()
    print(f"{script}: {seconds:.1f} s")
    assert code == 0, out[-4000:]
    assert "Traceback" not in out and "FAILED" not in out, out[-4000:]


def test_no_smoke_run_wrote_into_experiments(smoke_runs):
    futures, before = smoke_runs
    for f in futures.values():
        f.exception()  # waits; a failed run is its own test's failure
    assert _snapshot() == before, "a smoke run wrote into experiments/"


def test_scripts_run_elsewhere_are_run_there():
    for script, where in SMOKE.items():
        if isinstance(where, str) and where.startswith("tests/"):
            assert script in (ROOT / where).read_text(), f"{where} does not run {script}"


def _called_python(shell: str) -> set[str]:
    """The repository's Python files a shell script names (experiments/*.py, tests/*.py)."""
    return set(re.findall(r"\b((?:experiments|tests)/[\w/]+\.py)\b", shell))


def test_gpu_scripts_parse_and_their_python_imports():
    for name in ("gpu_check.sh", "gpu_kernels_call.sh"):
        path = EXPERIMENTS / name
        subprocess.run(["bash", "-n", str(path)], check=True)
        called = _called_python(path.read_text())
        assert called, f"{name} names no Python file"
        missing = [f for f in called if not (ROOT / f).is_file()]
        assert not missing, f"{name} calls files that do not exist: {missing}"
        imports = "; ".join(
            f"s = u.spec_from_file_location('m{i}', {str(ROOT / f)!r}); "
            f"s.loader.exec_module(u.module_from_spec(s))" for i, f in enumerate(sorted(called)))
        proc = subprocess.run([sys.executable, "-c", f"import importlib.util as u; {imports}"],
                              cwd=ROOT / "tests", env=_env(), capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-4000:]}"
