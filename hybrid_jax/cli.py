"""``hybrid-jax`` command line.

    hybrid-jax main [--steps 300] [--resume] [any train option]
    hybrid-jax demo [--preset small] [--batch 2] [--seq-len 512] [--new-tokens 32]
    hybrid-jax convert hf-to-orbax SRC DST [--dtype D] [--overwrite]
    hybrid-jax convert orbax-to-hf SRC DST [--dtype D] [--max-shard-size 5GB] [--overwrite]
    hybrid-jax convert verify HF_DIR ORBAX_DIR [--seq-len 32] [--batch 2] [--tol T]
    hybrid-jax generate --checkpoint DIR --prompt TEXT [--tokenizer FILE] [--max-new-tokens 64]
        [--temperature 0] [--top-k K] [--top-p P] [--seed 0] [--max-length N]
        [--prefill-chunk-size N] [--dtype float32|bfloat16] [--eos-token-id [ID ...]]
    hybrid-jax train (--text FILE | --data TOKENS) [--preset tiny] [--config RUN.yaml]
        [--set SECTION.KEY=VALUE ...] [--mesh fsdp=8] [--checkpoint-dir DIR] [--export-hf DIR]
    hybrid-jax aot --topology v5p:4x4x4 --batch 512 --seq-len 8192 [--preset P] [--mesh ...]
        [--micro-batches A] [--programs train,prefill,decode] [--json OUT]

``main`` (the default) is the main job: it trains a small hybrid model on the embedded corpus
for a few minutes, then prints a sample of its text (see ``hybrid_jax.main_job``). ``demo``
builds an OLMo-Hybrid-shaped model, runs a batch through it with each form of the gated delta
rule, and prints the parameter count, the logits' shape, each form's compile and run time, and
how far the forms' logits are apart, then generates ``--new-tokens`` greedily after the first
half of the batch. ``convert`` moves weights between
transformers checkpoints and orbax checkpoints, and checks a pair against each other (see
``hybrid_jax.convert_cli``). ``generate`` loads either kind of checkpoint and streams the text it
generates after a prompt to stdout, encoded with a tokenizer.json (``--tokenizer``, else the
checkpoint's own) or as UTF-8 bytes, with a one-line timing summary on stderr (see
``hybrid_jax.generate_cli``). ``train`` trains (and resumes) a model on a token file or text
(see ``hybrid_jax.train_cli``). ``aot`` compiles the train, prefill and decode steps for a
TPU topology ahead of time, here, and reports per-device memory, cost and a roofline estimate
(see ``hybrid_jax.aot_cli``).
"""

from __future__ import annotations

import argparse
import sys
import time

from hybrid_jax.config import PRESETS


def _count_params(params) -> int:
    import jax

    return sum(int(x.size) for x in jax.tree.leaves(params))


def demo(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from hybrid_jax.model import HybridLM, apply, split
    from hybrid_jax.ops import METHODS

    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        print(f"error: --methods: unknown GDN form(s) {unknown}; expected some of {list(METHODS)}",
              file=sys.stderr)
        return 2
    base = PRESETS[args.preset]()
    cfg = base.replace(dtype=args.dtype, param_dtype="float32")
    print(f"hybrid-jax demo on {jax.devices()[0].platform} (jax {jax.__version__})")
    print(f"preset {args.preset!r}: {cfg.num_hidden_layers} layers "
          f"({cfg.layer_types.count('linear_attention')} GDN, "
          f"{cfg.layer_types.count('full_attention')} attention, scanned in blocks of "
          f"{cfg.layer_period}), hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, "
          f"rope_theta {cfg.rope_theta}, compute {cfg.dtype}")

    tokens = np.random.default_rng(args.seed).integers(0, cfg.vocab_size, (args.batch, args.seq_len))
    tokens = jnp.asarray(tokens, jnp.int32)
    logits_by_method = {}
    for i, method in enumerate(methods):
        # Same seed for every form: identical weights, only the GDN algorithm changes.
        model = HybridLM(cfg.replace(gdn_method=method), rngs=nnx.Rngs(args.seed))
        graphdef, params = split(model)
        if i == 0:
            print(f"parameters: {_count_params(params):,}")
        forward = jax.jit(apply, static_argnums=0)
        start = time.perf_counter()
        compiled = forward.lower(graphdef, params, tokens).compile()
        compile_s = time.perf_counter() - start
        logits = compiled(params, tokens)
        logits.block_until_ready()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            compiled(params, tokens).block_until_ready()
            times.append(time.perf_counter() - start)
        if i == 0:
            print(f"input_ids: {tuple(tokens.shape)} -> logits: {tuple(logits.shape)} {logits.dtype}")
        tok_s = tokens.size / min(times)
        print(f"  gdn_method={method:<11} compile {compile_s:6.2f} s   forward {1e3 * min(times):8.1f} ms"
              f"   ({tok_s:,.0f} tokens/s)")
        logits_by_method[method] = np.asarray(logits, np.float64)
    if len(logits_by_method) > 1:
        ref_name, ref = next(iter(logits_by_method.items()))
        for name, other in list(logits_by_method.items())[1:]:
            err = np.linalg.norm(other - ref) / np.linalg.norm(ref)
            print(f"  logits {name} vs {ref_name}: relative difference {err:.2e}")
    finite = all(np.isfinite(x).all() for x in logits_by_method.values())
    print("logits finite:", finite)
    if args.new_tokens > 0:
        finite = _demo_generate(model, tokens, args.new_tokens) and finite
    return 0 if finite else 1


def _demo_generate(model, tokens, new_tokens: int) -> bool:
    """Greedy generation after the batch's first half; True when its first new token is the
    full forward's argmax there (prefill and forward agree)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from hybrid_jax.inference import generate

    prompt = tokens[:, : tokens.shape[1] // 2]
    start = time.perf_counter()
    out = np.asarray(generate(model, prompt, new_tokens, eos_token_id=()))
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    out = np.asarray(generate(model, prompt, new_tokens, eos_token_id=()))
    run_s = time.perf_counter() - start
    expected = np.asarray(jnp.argmax(jax.jit(model)(prompt)[:, -1], axis=-1))
    agree = bool(np.all(out[:, prompt.shape[1]] == expected))
    print(f"generate: {prompt.shape[0]} x {prompt.shape[1]} prompt tokens + {new_tokens} new "
          f"(greedy): {first_s:.2f} s with compiling, {run_s:.2f} s after "
          f"({out.shape[0] * new_tokens / run_s:,.0f} new tokens/s incl. prefill); first new "
          f"token = forward argmax: {agree}")
    return agree


def main(argv: list[str] | None = None) -> int:
    """Run a command; ``argv`` None means this process's command line, and then the process
    first restarts itself with transparent huge pages where that helps (``host_memory``)."""
    if argv is None:
        from hybrid_jax.host_memory import restart_with_hugepages

        restart_with_hugepages()
    parser = argparse.ArgumentParser(prog="hybrid-jax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("demo", help="build a small model, run a batch, time each GDN form")
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--methods", default="recurrent,chunk,assoc_scan")
    p.add_argument("--new-tokens", type=int, default=32,
                   help="then generate this many tokens after half the batch (0: skip)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    from hybrid_jax.convert_cli import add_convert_parser

    add_convert_parser(sub)
    from hybrid_jax.generate_cli import add_generate_parser

    add_generate_parser(sub)
    from hybrid_jax.train_cli import add_train_parser

    add_train_parser(sub)
    from hybrid_jax.aot_cli import add_aot_parser

    add_aot_parser(sub)
    from hybrid_jax.main_job import add_main_parser

    add_main_parser(sub)
    argv = sys.argv[1:] if argv is None else argv
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["main", *argv]
    args = parser.parse_args(argv)
    if args.command == "convert":
        from hybrid_jax.convert_cli import run_convert

        return run_convert(args, parser)
    if args.command == "generate":
        from hybrid_jax.generate_cli import run_generate

        return run_generate(args)
    if args.command == "train":
        from hybrid_jax.train_cli import run_train

        return run_train(args)
    if args.command == "aot":
        from hybrid_jax.aot_cli import run_aot

        return run_aot(args)
    if args.command == "main":
        from hybrid_jax.main_job import run_main

        return run_main(args)
    if args.preset == "olmo_hybrid_7b":
        parser.error("--preset olmo_hybrid_7b does not fit a demo on this machine; use small or tiny")
    if args.batch <= 0 or args.seq_len <= 0:
        parser.error("--batch and --seq-len must be positive")
    if args.new_tokens < 0 or (args.new_tokens > 0 and args.seq_len < 2):
        parser.error("--new-tokens must be >= 0, and generating needs --seq-len >= 2 (the prompt "
                     "is the first half)")
    return demo(args)


if __name__ == "__main__":
    sys.exit(main())
