"""Peak resident memory of ``hybrid-jax convert`` in both directions, on a >= 1 GB checkpoint.

    .venv/bin/python experiments/bench_convert.py [--workdir /tmp/hybrid_jax_bench_convert]
    .venv/bin/python experiments/bench_convert.py --smoke   # a tiny checkpoint, for CI

1. Builds (or reuses, in --workdir) a random transformers-format OLMo Hybrid checkpoint of about
   1.6 GB in float32 (~400M parameters). It is written by ``to_hf`` from a pure dict of *lazy*
   parameters that produce their random values only when ``to_hf`` asks for them (one layer
   slice at a time), so building it holds about one tensor in memory, not the model.
2. Runs, each in a fresh child process, ``hybrid-jax convert hf-to-orbax`` and ``orbax-to-hf``.
   The child imports everything, records its RSS (the baseline), resets the kernel's peak-RSS
   counter (``/proc/self/clear_refs``), converts, and reports its peak RSS (``VmHWM``); the
   import-time transient is thus not mistaken for headroom.
3. Prints peak minus baseline, the output's size, the largest tensor, and the ratio
   (peak - baseline - output's resident size) / largest tensor against the target 2.

"Output's resident size": both directions now stream to files (hf-to-orbax one parameter at a
time, ``orbax_io.hf_to_orbax``; orbax-to-hf one layer slice at a time), so nothing is subtracted
(the stricter reading). ``--compress`` also measures ``hf-to-orbax --compress``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))
import isolated_timing  # noqa: E402

# ~400M parameters: float32 ~1.6 GB.
BENCH_CONFIG = dict(
    vocab_size=50304, hidden_size=1024, intermediate_size=4096, num_hidden_layers=16,
    num_attention_heads=8, num_key_value_heads=8, linear_num_key_heads=8,
    linear_num_value_heads=8, linear_key_head_dim=96, linear_value_head_dim=192,
    pad_token_id=None, eos_token_id=None, max_position_embeddings=4096,
)
# --smoke: the same layout at a few hundred thousand parameters.
SMOKE_CONFIG = dict(BENCH_CONFIG, vocab_size=256, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2,
                    linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=16,
                    linear_value_head_dim=32)


class _RandomParam:
    """A parameter whose values are generated on demand (``p[j]`` or ``np.asarray(p)``)."""

    def __init__(self, seed: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.seed, self.shape, self.dtype = seed, tuple(shape), np.dtype(dtype)
        self.ndim = len(self.shape)
        self.size = math.prod(self.shape)

    def _gen(self, seed: int, shape: tuple[int, ...]) -> np.ndarray:
        rng = np.random.default_rng(seed)
        return (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(self.dtype, copy=False)

    def __getitem__(self, j: int) -> np.ndarray:
        assert isinstance(j, int)
        return self._gen(self.seed * 1000 + j, self.shape[1:])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        a = self._gen(self.seed, self.shape)
        return a if dtype is None else a.astype(dtype, copy=False)


def build_checkpoint(out: Path, config: dict = BENCH_CONFIG) -> None:
    import jax
    from flax import nnx

    from hybrid_jax import HybridLM, ModelConfig
    from hybrid_jax.convert import to_hf

    n = config["num_hidden_layers"]
    cfg = ModelConfig(**config, layer_types=tuple(
        "full_attention" if i % 4 == 3 else "linear_attention" for i in range(n)))
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: HybridLM(cfg, rngs=nnx.Rngs(0)))))
    leaves, treedef = jax.tree_util.tree_flatten(abstract)
    lazy = [_RandomParam(i + 1, leaf.shape, leaf.dtype) for i, leaf in enumerate(leaves)]
    params = jax.tree_util.tree_unflatten(treedef, lazy)
    to_hf(params, out, config=cfg, max_shard_size="5GB")


def _tensors(ckpt: Path) -> dict[str, int]:
    """name -> bytes of every tensor in the safetensors files of ``ckpt``."""
    from hybrid_jax.convert.safetensors_file import read_header

    return {name: info.end - info.begin
            for f in sorted(ckpt.glob("*.safetensors")) for name, info in read_header(f).items()}


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


_PRELUDE = """
import json, re, sys
import jax, flax, orbax.checkpoint, tensorstore, tqdm
import hybrid_jax.cli, hybrid_jax.cli.convert, hybrid_jax.convert, hybrid_jax.convert.orbax_io
def _kb(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))
base = _kb("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
rc = hybrid_jax.cli.main(ARGV)
print("RSS_JSON", json.dumps({"base": base * 1024, "peak": _kb("VmHWM") * 1024}))
sys.exit(rc)
"""


def peak_rss(argv: list[str]) -> tuple[int, int, float]:
    """(baseline RSS after imports, peak RSS during the conversion, seconds) of a fresh child."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _PRELUDE.replace("ARGV", repr(argv))], env=env,
                          cwd=ROOT, stdout=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    print(proc.stdout, end="")
    if proc.returncode != 0:
        raise SystemExit(f"child failed (exit {proc.returncode}): {argv}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RSS_JSON ")][-1]
    data = json.loads(line.split(" ", 1)[1])
    return data["base"], data["peak"], seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=None,
                    help="default /tmp/hybrid_jax_bench_convert; with --smoke a fresh temporary one")
    ap.add_argument("--compress", action="store_true",
                    help="also measure hf-to-orbax --compress (zstd chunks)")
    ap.add_argument("--smoke", action="store_true", help="a tiny checkpoint (CI's check that it runs)")
    args = ap.parse_args()
    print(isolated_timing.machine_header())
    work = Path(args.workdir or (tempfile.mkdtemp(prefix="bench_convert_") if args.smoke
                                 else "/tmp/hybrid_jax_bench_convert"))
    hf = work / "hf"
    if not (hf / "config.json").is_file():
        print(f"building a random float32 checkpoint in {hf} ...", flush=True)
        start = time.perf_counter()
        build_checkpoint(hf, SMOKE_CONFIG if args.smoke else BENCH_CONFIG)
        print(f"  built in {time.perf_counter() - start:.1f} s", flush=True)
    else:
        print(f"reusing {hf}")
    tensors = _tensors(hf)
    ckpt_bytes = sum(tensors.values())
    largest_name = max(tensors, key=tensors.get)
    largest = tensors[largest_name]
    print(f"checkpoint: {len(tensors)} tensors, {ckpt_bytes / 1e9:.3f} GB; largest tensor "
          f"{largest_name} {largest / 1e6:.1f} MB")

    orbax, back, zorbax = work / "orbax", work / "back", work / "orbax_zstd"
    for p in (orbax, back, zorbax):
        shutil.rmtree(p, ignore_errors=True)
    runs = {
        "hf-to-orbax": peak_rss(["convert", "hf-to-orbax", str(hf), str(orbax)]),
        "orbax-to-hf": peak_rss(["convert", "orbax-to-hf", str(orbax), str(back)]),
    }
    if args.compress:
        runs["hf-to-orbax --compress"] = peak_rss(["convert", "hf-to-orbax", "--compress",
                                                   str(hf), str(zorbax)])
    same = _tensors(back) == tensors and all(
        (hf / f.name).read_bytes() == f.read_bytes() for f in sorted(back.glob("*.safetensors")))

    mb = lambda n: f"{n / 1e6:,.0f}"
    print("\n| direction | time s | baseline RSS MB | peak RSS MB | peak - baseline MB | output on disk MB | "
          "output resident MB | largest tensor MB | (peak - baseline - resident output) / largest "
          "| target < 2 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, (base, peak, secs) in runs.items():
        out_dir = {"hf-to-orbax": orbax, "orbax-to-hf": back}.get(name, zorbax)
        resident = 0  # both directions stream: the output is not resident
        ratio = (peak - base - resident) / largest
        print(f"| {name} | {secs:.1f} | {mb(base)} | {mb(peak)} | {mb(peak - base)} | {mb(_dir_bytes(out_dir))} | "
              f"{mb(resident)} | {mb(largest)} | {ratio:.2f} | {'met' if ratio < 2 else 'NOT met'} |")
    print(f"\nround trip hf -> orbax -> hf bitwise identical: {same}")
    if args.smoke and not args.workdir:
        shutil.rmtree(work)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
