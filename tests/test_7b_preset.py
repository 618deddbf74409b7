"""The 7B preset, abstractly: exact parameter count and a compiled forward, without allocating."""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
from flax import nnx

from hybrid_jax import HybridLM, apply, olmo_hybrid_7b, split

SEQ = 256


def _abstract(config):
    """(graphdef, params) of a HybridLM whose parameters are ShapeDtypeStructs."""
    return split(nnx.eval_shape(lambda: HybridLM(config, rngs=nnx.Rngs(0))))


def _compile_seconds(config) -> float:
    graphdef, params = _abstract(config)
    ids = jax.ShapeDtypeStruct((1, SEQ), jnp.int32)
    start = time.perf_counter()
    compiled = jax.jit(apply).lower(graphdef, params, ids).compile()
    seconds = time.perf_counter() - start
    out = compiled.out_info
    assert out.shape == (1, SEQ, config.vocab_size) and out.dtype == jnp.float32
    return seconds


def test_7b_parameter_count_without_allocating():
    config = olmo_hybrid_7b()
    _, params = _abstract(config)
    leaves = jax.tree.leaves(params)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert sum(math.prod(x.shape) for x in leaves) == 7_430_870_688
    # 8 scanned copies of a 3 GDN + 1 attention block.
    q_proj = params["stack"]["blocks"]["layers"][0]["gdn"]["q_proj"]["kernel"]
    assert q_proj.shape == (8, 3840, 30 * 96)
    bf16 = _abstract(olmo_hybrid_7b(param_dtype="bfloat16"))[1]
    assert sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(bf16)) == 14_861_741_376


def test_7b_forward_compiles_scanned():
    """All 32 layers lower and compile from abstract inputs; the scan keeps this fast."""
    seconds = _compile_seconds(olmo_hybrid_7b())
    # Reported, not asserted: timings belong to benchmarks, not tests.
    print(f"\n7B (32 layers, scanned) forward compile, batch 1 x {SEQ}: {seconds:.1f} s")


def test_scanned_and_unrolled_7b_width_stacks_compile():
    """At 7B widths and 8 layers, scanning compiles one block where unrolling compiles eight."""
    config = olmo_hybrid_7b(num_hidden_layers=8, layer_types=olmo_hybrid_7b().layer_types[:8])
    scanned = _compile_seconds(config)
    unrolled = _compile_seconds(config.replace(scan_layers=False))
    print(f"\n7B widths, 8 layers, forward compile: scanned {scanned:.1f} s, unrolled {unrolled:.1f} s")
