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


def test_7b_decode_loop_lowers_and_cache_sizes():
    """The 7B's decode loop traces and lowers from abstract inputs (bf16, a 64k cache), and its
    cache is what the architecture says: keys and values for 8 of 32 layers plus fixed GDN state."""
    from hybrid_jax.inference import decode, init_cache

    config = olmo_hybrid_7b(dtype="bfloat16", param_dtype="bfloat16")
    graphdef, params = _abstract(config)
    ctx = 65536
    cache = jax.eval_shape(lambda: init_cache(config, 1, ctx))
    kv_bytes = 8 * 2 * ctx * 30 * 128 * 2  # layers x (k, v) x slots x heads x head dim x bf16
    gdn_bytes = 24 * (30 * 96 * 192 * 4 + 3 * (2 * 2880 + 5760) * 2)  # f32 state + bf16 windows
    nbytes = cache.nbytes
    assert nbytes == kv_bytes + gdn_bytes + 4  # + lengths
    all_attention = config.replace(layer_types=("full_attention",) * 32)
    dense = jax.eval_shape(lambda: init_cache(all_attention, 1, ctx))
    dense_bytes = dense.nbytes
    print(f"\n7B bf16 cache at 64k, batch 1: hybrid {nbytes / 2**30:.2f} GiB, all-attention "
          f"{dense_bytes / 2**30:.2f} GiB ({nbytes / dense_bytes:.3f})")
    logits = jax.ShapeDtypeStruct((1, config.vocab_size), jnp.float32)
    lowered = decode.lower(graphdef, params, cache, logits, jax.random.key(0), max_new_tokens=4)
    tokens, out_cache = lowered.out_info
    assert tokens.shape == (1, 4) and tokens.dtype == jnp.int32
    assert jax.tree.map(lambda a: (a.shape, a.dtype), out_cache) == \
        jax.tree.map(lambda a: (a.shape, a.dtype), cache)
