"""Benchmark: training throughput against PyTorch, and the 7B sharded train step's compile time.

    python experiments/bench_train.py                # the small preset: JAX vs torch, tokens/s
    python experiments/bench_train.py --compile-7b   # 7B train step on 8 simulated devices

Throughput: the same model (the config converted to transformers' OlmoHybridConfig), the same
batch shape, AdamW with the same settings, float32, on this machine's CPU, in one run:
  - jax: ``hybrid_jax.train``'s jitted step (loss, backward, clipping, AdamW), donated state;
  - torch: transformers' ``OlmoHybridForCausalLM`` (its pure-torch GDN fallback on CPU) with
    ``torch.optim.AdamW`` and ``clip_grad_norm_``.
Each is timed over ``--steps`` steps after ``--warmup`` (compilation excluded): median and mean
per step. jax runs one step per call and ``--steps-per-call`` steps per call (``scan_steps``,
as ``hybrid-jax train`` does with ``loop.steps_per_call``).
Both run in one process, started as ``hybrid-jax train`` starts: with glibc's huge-page tunable
where it helps (``hybrid_jax.host_memory``); ``--no-hugepages`` keeps glibc's defaults.
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
import statistics
import sys
import time


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


def _jax_throughput(cfg, batch, seq_len, steps, warmup, steps_per_call=1):
    """Seconds per step (median and mean over ``steps`` steps after ``warmup``) and the last
    loss, the jitted step called on ``steps_per_call`` steps at a time (``scan_steps``)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    k = steps_per_call
    state, step = jax_train_step(cfg, k)
    rng = np.random.default_rng(0)
    shape = (1, batch, seq_len) if k == 1 else (k, 1, batch, seq_len)
    times = []
    calls = -(-warmup // k) + -(-steps // k)
    for i in range(calls):
        tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, shape), jnp.int32)
        start = time.perf_counter()
        state, metrics = step(state, {"tokens": tokens})
        jax.block_until_ready(metrics["loss"])
        if i >= -(-warmup // k):
            times += [(time.perf_counter() - start) / k] * k
    loss = float(np.asarray(metrics["loss"]).reshape(-1)[-1])
    return statistics.median(times), statistics.mean(times), loss


def _torch_throughput(cfg, batch, seq_len, steps, warmup):
    import numpy as np
    import torch
    from transformers import OlmoHybridConfig, OlmoHybridForCausalLM

    torch.manual_seed(0)
    model = OlmoHybridForCausalLM(OlmoHybridConfig(**cfg.to_hf_dict())).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=0.1)
    rng = np.random.default_rng(0)
    times = []
    for i in range(warmup + steps):
        tokens = torch.as_tensor(rng.integers(0, cfg.vocab_size, (batch, seq_len)))
        start = time.perf_counter()
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), statistics.mean(times), float(loss)


def _matmul_rates(m: int, k: int, n: int, repeats: int = 7) -> dict[str, float]:
    """Each framework's float32 GFLOP/s on one [m, k] x [k, n] matmul (best of ``repeats``):
    the ceiling its train step's matmuls can reach on this machine."""
    import jax
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    ja, jb = jax.numpy.asarray(a), jax.numpy.asarray(b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    dot = jax.jit(jax.numpy.dot)
    runs = {"jax": lambda: dot(ja, jb).block_until_ready(), "torch": lambda: ta @ tb}
    rates = {}
    for name, fn in runs.items():
        fn()
        best = min(_seconds(fn) for _ in range(repeats))
        rates[name] = 2 * m * k * n / best / 1e9
    return rates


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


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
    print(f"{args.preset}: {n_params / 1e6:.2f}M parameters, batch {args.batch} x "
          f"{args.seq_len}, float32, CPU ({os.cpu_count()} cores), jax {jax.__version__}, "
          f"gdn_method={args.gdn_method}, GLIBC_TUNABLES="
          f"{os.environ.get('GLIBC_TUNABLES', '(unset)')}", flush=True)
    rows = {}
    for k in sorted({1, args.steps_per_call}):
        name = "jax" if k == 1 else f"jax, {k} steps per call"
        rows[name] = _jax_throughput(cfg, args.batch, args.seq_len, args.steps, args.warmup, k)
        print(f"  {name:26s} {rows[name][0] * 1e3:9.1f} ms/step (mean {rows[name][1] * 1e3:.1f})",
              flush=True)
    if not args.no_torch:
        import torch

        rows["torch"] = _torch_throughput(cfg, args.batch, args.seq_len, args.steps,
                                          args.warmup)
        print(f"  {'torch':26s} {rows['torch'][0] * 1e3:9.1f} ms/step (mean "
              f"{rows['torch'][1] * 1e3:.1f}; torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads)", flush=True)
    # The MLP's matmul shape: what each framework's matmuls reach on this machine alone.
    shape = (tokens, cfg.hidden_size, cfg.intermediate_size)
    peaks = _matmul_rates(*shape) if not args.no_torch else {}
    print(f"\nfloat32 matmul {'x'.join(map(str, shape))}: " +
          ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()))
    print(f"\nMedian (and mean) over {args.steps} steps after {args.warmup}:\n")
    print("| framework | ms/step | tokens/s | GFLOP/s (model FLOPs) | of its matmul rate "
          "| vs torch |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (sec, mean, _) in rows.items():
        ratio = rows["torch"][0] / sec if "torch" in rows else float("nan")
        mean_ratio = rows["torch"][1] / mean if "torch" in rows else float("nan")
        rate = tokens * flops / sec / 1e9
        peak = peaks.get(name.split(",")[0], float("nan"))
        print(f"| {name} | {sec * 1e3:.1f} ({mean * 1e3:.1f}) | {tokens / sec:,.0f} | "
              f"{rate:.1f} | {rate / peak:.0%} | {ratio:.2f}x ({mean_ratio:.2f}x) |")


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
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--steps-per-call", type=int, default=8,
                   help="also time the jax step scanned over this many steps per call")
    p.add_argument("--warmup", type=int, default=2)
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
