"""Benchmark: one MoE layer of Qwen3.5-MoE / Qwen3-Next (router, routed experts, shared expert)
on this CPU, as tokens per second of the forward and of forward+backward, for

  - "jax ragged": ``hybrid_jax.ops.moe.expert_mlp`` (dropless: assignments sorted by expert;
    method "auto", which is "tiled" on CPU: one loop over tiles of one expert's rows), jitted;
  - "jax dense": ``dense_expert_mlp``, every token through every expert, one-hot combine;
  - "torch <impl>": transformers' ``Qwen3NextSparseMoeBlock`` built from a ``Qwen3NextConfig`` of
    the same sizes, float32, torch threads = usable cores, with the experts implementation
    ``eager`` (a Python loop over the experts hit) and ``grouped_mm`` (what transformers picks
    when it loads a model).

Same weights and inputs for all; forward+backward is the gradient of sum(out * a fixed random
cotangent) w.r.t. the input and every weight. Each contender runs in its own process, the
processes alternated over ``--rounds`` rounds of ``--runs`` calls (experiments/isolated_timing.py).
Once, outside the timing, the main process checks that all give the same output (the largest
difference relative to the largest output of torch eager).

    .venv/bin/python experiments/bench_moe.py   # 2048 tokens, hidden 512, E 64, k 8, I 128
    .venv/bin/python experiments/bench_moe.py --tokens 512 --shared 0 --torch-impls eager

The default is Qwen3.5-35B-A3B's layer (transformers' Qwen3_5MoeTextConfig defaults) scaled
down to a second or less a call here (hidden 2048 -> 512, 256 experts -> 64, moe_intermediate
512 -> 128, shared 512 -> 128; top-8 and the renormalised top-k weights kept). ``--shared 0``
leaves the shared expert out.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from hybrid_jax.ops import moe  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import isolated_timing  # noqa: E402

TORCH_IMPLS = ("eager", "grouped_mm")


def make_weights(tokens: int, hidden: int, experts: int, inter: int, shared: int,
                 seed: int = 0) -> dict[str, np.ndarray]:
    """float32 inputs and weights in torch's layouts (nn.Linear's [out, in])."""
    rng = np.random.default_rng(seed)
    n = lambda *shape, scale=1.0: (rng.standard_normal(shape) * scale).astype(np.float32)
    s = hidden ** -0.5
    return dict(x=n(tokens, hidden), cotangent=n(tokens, hidden),
                router=n(experts, hidden, scale=s), gate_up=n(experts, 2 * inter, hidden, scale=s),
                down=n(experts, hidden, inter, scale=inter ** -0.5),
                shared_gate=n(shared, hidden, scale=s), shared_up=n(shared, hidden, scale=s),
                shared_down=n(hidden, shared, scale=max(shared, 1) ** -0.5),
                shared_expert_gate=n(1, hidden, scale=s))


def jax_layer(dispatch: str, top_k: int, tile: int) -> Callable:
    """layer(params, x) -> [N, D]; params in our layouts (``jax_params``)."""
    mlp = (moe.dense_expert_mlp if dispatch == "dense"
           else lambda *a: moe.expert_mlp(*a, tile=tile))

    def layer(p, x):
        routing = moe.route_top_k(x @ p["router"], top_k, normalize=True)
        out = mlp(x, routing, p["gate_up"], p["down"])
        if "shared_gate" in p:
            h = jax.nn.silu(x @ p["shared_gate"]) * (x @ p["shared_up"])
            out = out + jax.nn.sigmoid(x @ p["shared_expert_gate"]) * (h @ p["shared_down"])
        return out

    return layer


def jax_params(w: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Torch's weights transposed to ours: [in, out] kernels, experts [E, in, out]."""
    p = dict(router=w["router"].T, gate_up=w["gate_up"].transpose(0, 2, 1),
             down=w["down"].transpose(0, 2, 1))
    if w["shared_gate"].shape[0]:
        p |= {k: w[k].T for k in ("shared_gate", "shared_up", "shared_down", "shared_expert_gate")}
    return {k: jnp.asarray(v) for k, v in p.items()}


def jax_contender(dispatch: str, top_k: int, tile: int, **sizes) -> dict[str, Callable]:
    """The jitted forward and gradient (w.r.t. x and every weight) of the JAX layer."""
    w = make_weights(**sizes)
    params, x, cot = jax_params(w), jnp.asarray(w["x"]), jnp.asarray(w["cotangent"])
    layer = jax_layer(dispatch, top_k, tile)
    fwd = jax.jit(layer)
    grad = jax.jit(jax.grad(lambda p, x: jnp.sum(layer(p, x) * cot), argnums=(0, 1)))
    return {"fwd": lambda: fwd(params, x).block_until_ready(),
            "fwd+bwd": lambda: jax.block_until_ready(grad(params, x))}


def torch_block(impl: str, top_k: int, w: dict[str, np.ndarray]):
    """transformers' Qwen3NextSparseMoeBlock holding ``w``, experts implementation ``impl``."""
    import logging
    import warnings

    import torch
    from transformers.models.qwen3_next.configuration_qwen3_next import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextSparseMoeBlock

    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                          else os.cpu_count() or 1)
    e, two_i, d = w["gate_up"].shape
    cfg = Qwen3NextConfig(hidden_size=d, num_experts=e, num_experts_per_tok=top_k,
                          moe_intermediate_size=two_i // 2, norm_topk_prob=True,
                          shared_expert_intermediate_size=w["shared_gate"].shape[0])
    cfg._experts_implementation = impl
    with warnings.catch_warnings():  # --shared 0: torch warns of its zero-size Linears
        warnings.simplefilter("ignore", UserWarning)
        block = Qwen3NextSparseMoeBlock(cfg).float()
    t = lambda k: torch.from_numpy(w[k])
    with torch.no_grad():
        block.gate.weight.copy_(t("router"))
        block.experts.gate_up_proj.copy_(t("gate_up"))
        block.experts.down_proj.copy_(t("down"))
        block.shared_expert.gate_proj.weight.copy_(t("shared_gate"))
        block.shared_expert.up_proj.weight.copy_(t("shared_up"))
        block.shared_expert.down_proj.weight.copy_(t("shared_down"))
        block.shared_expert_gate.weight.copy_(t("shared_expert_gate"))
    return block


def torch_contender(impl: str, top_k: int, **sizes) -> dict[str, Callable]:
    """The torch block's forward (no_grad) and forward+backward (every weight and x)."""
    import torch

    w = make_weights(**sizes)
    block = torch_block(impl, top_k, w)
    x, cot = torch.from_numpy(w["x"])[None], torch.from_numpy(w["cotangent"])[None]

    def fwd():
        with torch.no_grad():
            block(x)

    def fwd_bwd():
        block.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_(True)
        (block(leaf) * cot).sum().backward()

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def check_outputs(args: argparse.Namespace, sizes: dict) -> str:
    """Every contender's forward output against torch eager's: the largest difference relative
    to the largest output, one line."""
    import torch

    w = make_weights(**sizes)
    with torch.no_grad():
        want = torch_block("eager", args.top_k, w)(torch.from_numpy(w["x"])[None])[0].numpy()
    outs = {f"jax {d}": np.asarray(jax.jit(jax_layer(d, args.top_k, args.tile))(
        jax_params(w), jnp.asarray(w["x"]))) for d in ("ragged", "dense")}
    for impl in args.torch_impls:
        with torch.no_grad():
            outs[f"torch {impl}"] = torch_block(impl, args.top_k, w)(
                torch.from_numpy(w["x"])[None])[0].numpy()
    scale = np.abs(want).max()
    return ", ".join(f"{name} {np.abs(out - want).max() / scale:.1e}" for name, out in outs.items())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--moe-intermediate", type=int, default=128)
    p.add_argument("--shared", type=int, default=128, help="shared expert's intermediate size")
    p.add_argument("--tile", type=int, default=moe.DEFAULT_TILE, help="rows per tile (jax ragged)")
    p.add_argument("--torch-impls", default=",".join(TORCH_IMPLS),
                   help="transformers experts implementations to time (comma separated; '' none)")
    p.add_argument("--no-dense", action="store_true", help="leave the dense one-hot form out")
    isolated_timing.add_arguments(p, rounds=3, runs=3)
    args = p.parse_args()
    args.torch_impls = [s for s in args.torch_impls.split(",") if s]
    sizes = dict(tokens=args.tokens, hidden=args.hidden, experts=args.experts,
                 inter=args.moe_intermediate, shared=args.shared)

    print(isolated_timing.machine_header())
    print(f"# tokens {args.tokens}, hidden {args.hidden}, {args.experts} experts, top-{args.top_k} "
          f"(renormalised), moe_intermediate {args.moe_intermediate}, shared expert "
          f"{args.shared or 'none'}, float32; jax ragged: method auto, tile {args.tile}",
          flush=True)
    c, jax_kw = isolated_timing.Contender, dict(top_k=args.top_k, tile=args.tile, **sizes)
    contenders = [c("jax ragged", __file__, "jax_contender", dict(dispatch="ragged", **jax_kw))]
    if not args.no_dense:
        contenders.append(c("jax dense", __file__, "jax_contender",
                            dict(dispatch="dense", **jax_kw)))
    contenders += [c(f"torch {impl}", __file__, "torch_contender",
                     dict(impl=impl, top_k=args.top_k, **sizes)) for impl in args.torch_impls]
    res = isolated_timing.compare(contenders, **isolated_timing.options(args))

    print("| contender | task | tokens/s (at min time) | tokens/s (at median time) "
          "| speed vs jax ragged (medians) |")
    print("|---|---|---:|---:|---:|")
    for task in ("fwd", "fwd+bwd"):
        base = res["jax ragged", task]
        for con in contenders:
            r = res[con.name, task]
            print(f"| {con.name} | {task} | {args.tokens / r.min:,.0f} | "
                  f"{args.tokens / r.median:,.0f} | {isolated_timing.ratio(base, r):.2f}x |")
    runs = res["jax ragged", "fwd"].runs
    print(f"({runs} runs each: " + isolated_timing.describe(args.rounds, args.runs, args.settle)
          + ")")
    print("max |out - torch eager| / max |torch eager|: " + check_outputs(args, sizes), flush=True)


if __name__ == "__main__":
    main()
