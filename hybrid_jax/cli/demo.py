"""``hybrid-jax demo``: build an OLMo-Hybrid-shaped model, run a batch through it with each form
of the gated delta rule, and print the parameter count, the logits' shape, each form's compile
and run time, and how far the forms' logits are apart; then generate ``--new-tokens`` greedily
after the first half of the batch.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from hybrid_jax.cli.common import UsageError, error
from hybrid_jax.presets import PRESETS


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``demo`` parser to ``subparsers``."""
    p = subparsers.add_parser("demo", help="build a small model, run a batch, time each GDN form")
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--methods", default="recurrent,chunk,assoc_scan")
    p.add_argument("--new-tokens", type=int, default=32,
                   help="then generate this many tokens after half the batch (0: skip)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    return p


def run(args: argparse.Namespace) -> int:
    """Check the options (UsageError), then run the demo: 0 when every form's logits are
    finite and generation agrees with the forward, else 1."""
    if args.preset == "olmo_hybrid_7b":
        raise UsageError("--preset olmo_hybrid_7b does not fit a demo on this machine; use "
                         "small or tiny")
    if args.batch <= 0 or args.seq_len <= 0:
        raise UsageError("--batch and --seq-len must be positive")
    if args.new_tokens < 0 or (args.new_tokens > 0 and args.seq_len < 2):
        raise UsageError("--new-tokens must be >= 0, and generating needs --seq-len >= 2 (the "
                         "prompt is the first half)")
    return demo(args)


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
        return error(f"--methods: unknown GDN form(s) {unknown}; expected some of "
                     f"{list(METHODS)}")
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


__all__ = ["demo", "register", "run"]
