"""Benchmark: training throughput against PyTorch, and the 7B sharded train step's compile time.

    python experiments/bench_train.py                # the small preset: JAX vs torch, tokens/s
    python experiments/bench_train.py --compile-7b   # 7B train step on 8 simulated devices

Throughput: the same model (the config converted to transformers' OlmoHybridConfig), the same
batch shape, AdamW with the same settings, float32, on this machine's CPU, in one run:
  - jax: ``hybrid_jax.train``'s jitted step (loss, backward, clipping, AdamW), donated state;
  - torch: transformers' ``OlmoHybridForCausalLM`` (its pure-torch GDN fallback on CPU) with
    ``torch.optim.AdamW`` and ``clip_grad_norm_``.
jax runs one step per call and ``--steps-per-call`` steps per call (``scan_steps``, as
``hybrid-jax train`` does with ``loop.steps_per_call``). Each of the three runs in its own
process after ``--warmup`` calls (compilation excluded), the processes alternated over
``--rounds`` rounds (experiments/isolated_timing.py) until each has timed about ``--steps``
steps (at least ``--runs`` calls a round): median and min per step, ratios of medians. The
processes start as ``hybrid-jax train`` starts: with glibc's huge-page tunable where it helps
(``hybrid_jax.host_memory``; this script restarts itself with it and its workers inherit it);
``--no-hugepages`` keeps glibc's defaults.
GFLOP/s are model FLOPs (``hybrid_jax.aot.roofline.train_flops_per_token``: the matmul
parameters, causal attention and the GDN chunk products), as ``hybrid-jax train`` reports them.

Compile: lowers and compiles the full train step (forward, backward, AdamW) of the 7B preset
for a global batch of ``--batch`` x ``--seq-len`` on a simulated fsdp x tensor mesh of 8 CPU
devices from abstract inputs (nothing is allocated), and reports the compile time and XLA's
per-device memory estimate.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import isolated_timing  # noqa: E402


def jax_train_step(cfg, steps_per_call=1):
    """(initial train state, jitted step taking ``steps_per_call`` steps per call): AdamW with
    the settings the torch side uses (also experiments/profile_train_step.py's step)."""
    from hybrid_jax.train import (
        OptimizerConfig,
        init_train_state,
        jit_train_step,
        make_optimizer,
        make_train_step,
        model_template,
    )

    opt = make_optimizer(OptimizerConfig(lr=1e-4, warmup_steps=1, total_steps=10_000,
                                         weight_decay=0.1, clip_norm=1.0))
    return (init_train_state(cfg, opt, seed=0),
            jit_train_step(make_train_step(model_template(cfg), opt),
                           steps_per_call=steps_per_call))


def _tokens(vocab: int, shape: tuple[int, ...], framework: str):
    """A batch-making task half: fresh random tokens per call, made outside the timed step."""
    import numpy as np

    rng = np.random.default_rng(0)
    if framework == "torch":
        import torch

        return lambda: torch.as_tensor(rng.integers(0, vocab, shape))
    import jax.numpy as jnp

    return lambda: jnp.asarray(rng.integers(0, vocab, shape), jnp.int32)


def jax_contender(preset: str, gdn_method: str, batch: int, seq_len: int,
                  steps_per_call: int) -> tuple[dict, dict]:
    """The jitted train step on ``steps_per_call`` steps per call (``scan_steps``): one task,
    (new tokens, one call), the state carried (donated) from call to call."""
    import jax

    from hybrid_jax import PRESETS

    k, cfg = steps_per_call, PRESETS[preset](gdn_method=gdn_method)
    state, step = jax_train_step(cfg, k)
    held = {"state": state}
    make = _tokens(cfg.vocab_size, (1, batch, seq_len) if k == 1 else (k, 1, batch, seq_len), "jax")

    def prepare():
        held["tokens"] = make().block_until_ready()

    def run():
        held["state"], metrics = step(held["state"], {"tokens": held["tokens"]})
        jax.block_until_ready(metrics["loss"])

    return {"step": (prepare, run)}, {"steps_per_call": k}


def torch_contender(preset: str, gdn_method: str, batch: int, seq_len: int) -> tuple[dict, dict]:
    """transformers' model of the same config with torch's AdamW and clipping: one step a call."""
    import torch
    from transformers import OlmoHybridConfig, OlmoHybridForCausalLM

    from hybrid_jax import PRESETS

    cfg = PRESETS[preset](gdn_method=gdn_method)
    torch.manual_seed(0)
    model = OlmoHybridForCausalLM(OlmoHybridConfig(**cfg.to_hf_dict())).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=0.1)
    make, held = _tokens(cfg.vocab_size, (batch, seq_len), "torch"), {}

    def prepare():
        held["tokens"] = make()

    def run():
        model(held["tokens"], labels=held["tokens"]).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return {"step": (prepare, run)}, {"steps_per_call": 1, "threads": torch.get_num_threads(),
                                      "torch": torch.__version__}


def matmul_contender(framework: str, m: int, k: int, n: int):
    """One float32 [m, k] x [k, n] matmul in ``framework``: the ceiling its train step's
    matmuls can reach on this machine."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    if framework == "torch":
        import torch

        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        return lambda: ta @ tb
    import jax

    dot, ja, jb = jax.jit(jax.numpy.dot), jax.numpy.asarray(a), jax.numpy.asarray(b)
    return lambda: dot(ja, jb).block_until_ready()


def _matmul_rates(m: int, k: int, n: int, frameworks: list[str], runs: int = 7) -> dict[str, float]:
    """Each framework's float32 GFLOP/s on one matmul (best of ``runs``), in its own process."""
    rates = {}
    for f in frameworks:
        c = isolated_timing.Contender(f"{f} matmul", __file__, "matmul_contender",
                                      dict(framework=f, m=m, k=k, n=n))
        best = isolated_timing.measure_alone(c, runs=runs)[isolated_timing.DEFAULT_TASK].min
        rates[f] = 2 * m * k * n / best / 1e9
    return rates


def contenders(args) -> list:
    """jax at one step per call and at --steps-per-call, and torch (unless --no-torch), each
    timing about --steps steps over the rounds."""
    c = isolated_timing.Contender
    common = dict(preset=args.preset, gdn_method=args.gdn_method, batch=args.batch,
                  seq_len=args.seq_len)
    calls = lambda k: max(args.runs, -(-args.steps // (args.rounds * k)))  # per round
    out = [c("jax" if k == 1 else f"jax, {k} steps per call", __file__, "jax_contender",
             dict(common, steps_per_call=k), runs=calls(k))
           for k in sorted({1, args.steps_per_call})]
    if not args.no_torch:
        out.append(c("torch", __file__, "torch_contender", common, runs=calls(1)))
    return out


def per_step(result) -> tuple[float, float, int]:
    """(median, min) seconds per step of a contender's calls, and the steps timed."""
    k = result.info["steps_per_call"]
    return result.median / k, result.min / k, result.runs * k


def throughput(args) -> None:
    import jax

    from hybrid_jax import PRESETS

    from hybrid_jax.aot.roofline import train_flops_per_token
    from hybrid_jax.train import OptimizerConfig, abstract_train_state, make_optimizer

    cfg = PRESETS[args.preset](gdn_method=args.gdn_method)
    n_params = sum(x.size for x in jax.tree.leaves(
        abstract_train_state(cfg, make_optimizer(OptimizerConfig())).params))

    flops = train_flops_per_token(cfg, args.seq_len)
    tokens = args.batch * args.seq_len
    print(isolated_timing.machine_header())
    print(f"{args.preset}: {n_params / 1e6:.2f}M parameters, batch {args.batch} x "
          f"{args.seq_len}, float32, CPU ({os.cpu_count()} cores), jax {jax.__version__}, "
          f"gdn_method={args.gdn_method}, GLIBC_TUNABLES="
          f"{os.environ.get('GLIBC_TUNABLES', '(unset)')}", flush=True)
    res = isolated_timing.compare(contenders(args), warmup=args.warmup,
                                  **isolated_timing.options(args))
    rows = {name: per_step(r) for (name, _), r in res.items()}
    # The MLP's matmul shape: what each framework's matmuls reach on this machine alone.
    shape = (tokens, cfg.hidden_size, cfg.intermediate_size)
    peaks = _matmul_rates(*shape, ["jax"] + ([] if args.no_torch else ["torch"]))
    print(f"\nfloat32 matmul {'x'.join(map(str, shape))}, own process, best of 7: " +
          ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()))
    print_table(rows, peaks, tokens * flops, tokens)
    print(isolated_timing.describe(args.rounds, args.runs, args.settle)
          + f"; {args.warmup} warm-up call(s); about {args.steps} steps each")


def print_table(rows: dict, peaks: dict, flops_per_step: float, tokens: int) -> None:
    """Median ms per step (min), tokens/s and GFLOP/s from the median, ratio of medians."""
    print("\n| framework | ms/step median (min) | steps | tokens/s | GFLOP/s (model FLOPs) "
          "| of its matmul rate | vs torch |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (sec, best, n) in rows.items():
        ratio = rows["torch"][0] / sec if "torch" in rows else float("nan")
        rate = flops_per_step / sec / 1e9
        peak = peaks.get(name.split(",")[0], float("nan"))
        print(f"| {name} | {sec * 1e3:.1f} ({best * 1e3:.1f}) | {n} | {tokens / sec:,.0f} | "
              f"{rate:.1f} | {rate / peak:.0%} | {ratio:.2f}x |")


def compile_7b(args) -> None:
    import jax
    import jax.numpy as jnp

    from hybrid_jax import olmo_hybrid_7b
    from hybrid_jax.sharding import MeshShape, make_mesh, micro_batches_sharding
    from hybrid_jax.train import (
        OptimizerConfig,
        abstract_train_state,
        jit_train_step,
        make_optimizer,
        make_train_step,
        model_template,
        train_state_shardings,
        with_shardings,
    )

    cfg = olmo_hybrid_7b(dtype="bfloat16", param_dtype="float32", remat=args.remat)
    mesh = make_mesh(MeshShape(fsdp=args.fsdp, tensor=8 // args.fsdp))
    opt = make_optimizer(OptimizerConfig())
    abstract = abstract_train_state(cfg, opt)
    shardings = train_state_shardings(abstract, mesh)
    step = jit_train_step(make_train_step(model_template(cfg), opt, mesh=mesh), shardings, mesh)
    state = with_shardings(abstract, shardings)
    batch = {"tokens": jax.ShapeDtypeStruct((1, args.batch, args.seq_len), jnp.int32,
                                            sharding=micro_batches_sharding(mesh))}
    start = time.perf_counter()
    lowered = step.lower(state, batch)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    gib = 1 << 30
    print(f"7B train step, global batch {args.batch} x {args.seq_len}, bf16 compute / float32 "
          f"master, remat={args.remat}, mesh fsdp={args.fsdp} x tensor={8 // args.fsdp} "
          f"(8 simulated CPU devices), jax {jax.__version__}")
    print(f"  lower {lower_s:.1f} s, compile {compile_s:.1f} s")
    print(f"  per device: arguments {mem.argument_size_in_bytes / gib:.2f} GiB, outputs "
          f"{mem.output_size_in_bytes / gib:.2f} GiB (aliased {mem.alias_size_in_bytes / gib:.2f}),"
          f" temporaries {mem.temp_size_in_bytes / gib:.2f} GiB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, help="default 4 (throughput), 8 (--compile-7b)")
    p.add_argument("--seq-len", type=int, help="default 512 (throughput), 4096 (--compile-7b)")
    p.add_argument("--steps", type=int, default=16,
                   help="steps to time per contender, over all rounds (at least a call a round)")
    p.add_argument("--steps-per-call", type=int, default=8,
                   help="also time the jax step scanned over this many steps per call")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls after compiling")
    isolated_timing.add_arguments(p, rounds=4, runs=1)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--no-hugepages", action="store_true",
                   help="do not restart with glibc.malloc.hugetlb=1 (see hybrid_jax.host_memory)")
    p.add_argument("--gdn-method", default="auto", help="the JAX model's GDN form")
    p.add_argument("--compile-7b", action="store_true")
    p.add_argument("--fsdp", type=int, default=8, choices=[1, 2, 4, 8])
    p.add_argument("--remat", default="full")
    args = p.parse_args()
    args.batch = args.batch or (8 if args.compile_7b else 4)
    args.seq_len = args.seq_len or (4096 if args.compile_7b else 512)
    if args.compile_7b:
        compile_7b(args)
    else:
        throughput(args)


if __name__ == "__main__":
    if "--no-hugepages" not in sys.argv:
        from hybrid_jax.host_memory import restart_with_hugepages

        restart_with_hugepages()
    if "--compile-7b" in sys.argv and "xla_force_host_platform_device_count" not in \
            os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_force_host_platform_device_count=8")
    main()
