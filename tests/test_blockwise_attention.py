"""Blockwise (flash) attention: what the dense form cannot show. Its values and gradients
against float64 NumPy and autodiff of ``jax.nn.dot_product_attention`` are in
test_inference_ops.py; here, uneven blocks and padding against the dense form, the unrolled
program against the looped one, memory that grows linearly in T where the dense form's grows
quadratically, the blocks above the diagonal skipped, and bad arguments."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax.ops.attention import causal_attention
from hybrid_jax.ops.blockwise_attention import blockwise_causal_attention


def _qkv(seed: int, b: int, t: int, h: int, hkv: int, d: int, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape), dtype)
                 for shape in ((b, t, h, d), (b, t, hkv, d), (b, t, hkv, d)))


def _loss_grads(attend, q, k, v, weights):
    loss = lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32) * weights)
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("block_q,block_k", [(8, 8), (8, 16), (16, 4), (64, 64)])
def test_uneven_blocks_and_padding_match_dense(block_q, block_k):
    """T = 37 (never a multiple of a block), query and key blocks of different sizes, segments
    that start inside blocks (a one-token document included), GQA: output and gradients equal
    the dense form's to float32 rounding."""
    b, t, h, hkv, d = 2, 37, 6, 2, 8
    q, k, v = _qkv(0, b, t, h, hkv, d)
    segments = jnp.asarray([[0] * 9 + [1] + [2] * 27, [4] * 20 + [5] * 17])
    weights = jnp.asarray(np.random.default_rng(1).standard_normal((b, t, h, d)), jnp.float32)
    dense = lambda q, k, v: causal_attention(q, k, v, segment_ids=segments, implementation="dense")
    blocks = lambda q, k, v: blockwise_causal_attention(q, k, v, segment_ids=segments,
                                                        block_q=block_q, block_k=block_k)
    (want, want_grads), (got, got_grads) = (_loss_grads(f, q, k, v, weights)
                                            for f in (dense, blocks))
    np.testing.assert_allclose(got, want, atol=1e-4)  # a sum of 4,440 terms of either sign
    np.testing.assert_allclose(blocks(q, k, v), dense(q, k, v), rtol=1e-5, atol=1e-6)
    for name, g_got, g_want in zip("qkv", got_grads, want_grads):
        np.testing.assert_allclose(g_got, g_want, rtol=1e-5, atol=1e-5, err_msg=f"d{name}")


def test_unrolled_program_has_no_loops_and_same_values():
    """``unroll`` leaves no XLA while loop (what the AOT cost compiles need) and computes the
    same values and gradients as the looped program."""
    q, k, v = _qkv(2, 1, 40, 4, 2, 8)
    weights = jnp.ones((1, 40, 4, 8), jnp.float32)

    def program(unroll):
        attend = lambda q, k, v: blockwise_causal_attention(q, k, v, block_q=16, block_k=8,
                                                            unroll=unroll)
        return jax.jit(lambda q, k, v: _loss_grads(attend, q, k, v, weights))

    texts = {u: program(u).lower(q, k, v).compile().as_text() for u in (False, True)}
    assert " while(" in texts[False]
    assert " while(" not in texts[True]
    looped, unrolled = program(False)(q, k, v), program(True)(q, k, v)
    for got, want in zip(jax.tree.leaves(unrolled), jax.tree.leaves(looped)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def _temp_bytes(attend, t: int) -> int:
    q, k, v = _qkv(3, 1, t, 4, 4, 32)
    grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) ** 2), argnums=(0, 1, 2)))
    return grads.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes


def test_memory_grows_linearly_not_quadratically():
    """XLA's temporaries for forward + backward as T doubles from 1024 to 4096: the dense form
    holds [H, T, T] logits (about 4x per doubling), the blockwise form [block, block] tiles
    and [T, D] accumulators (about 2x)."""
    dense = lambda q, k, v: causal_attention(q, k, v, implementation="dense")
    blocks = lambda q, k, v: blockwise_causal_attention(q, k, v, block_q=128, block_k=128)
    sizes = {name: [_temp_bytes(f, t) for t in (1024, 2048, 4096)]
             for name, f in (("dense", dense), ("blockwise", blocks))}
    for small, large in zip(sizes["dense"], sizes["dense"][1:]):
        assert large > 3.5 * small, sizes
    for small, large in zip(sizes["blockwise"], sizes["blockwise"][1:]):
        assert large < 2.5 * small, sizes
    # At 4096 tokens: 4 heads x 4096^2 float32 logits are 256 MiB; the blocks need far less.
    assert sizes["blockwise"][-1] * 10 < sizes["dense"][-1], sizes


def test_blocks_above_the_diagonal_are_skipped():
    """XLA's FLOP count of the unrolled program: with 8 blocks a side, the forward computes
    the 36 blocks at or below the diagonal of 64, so its matmuls cost 36/64 of the dense
    form's (which computes every logit and masks half)."""
    q, k, v = _qkv(4, 1, 256, 4, 4, 32)

    def flops(attend):
        return jax.jit(attend).lower(q, k, v).compile().cost_analysis()["flops"]

    dense = flops(lambda q, k, v: causal_attention(q, k, v, implementation="dense"))
    blocks = flops(lambda q, k, v: blockwise_causal_attention(q, k, v, block_q=32, block_k=32,
                                                              unroll=True))
    matmuls = 2 * 2 * 4 * 256 * 256 * 32  # q k^T and p v over all pairs
    assert dense >= matmuls
    assert 0.5 < blocks / dense < 0.66, (blocks, dense)


@pytest.mark.parametrize("kwargs,culprit", [
    (dict(block_q=0), "block_q"),
    (dict(block_k=2.5), "block_k"),
    (dict(segment_ids=jnp.zeros((1, 5), jnp.int32)), "segment_ids"),
])
def test_bad_arguments_name_the_culprit(kwargs, culprit):
    q, k, v = _qkv(5, 1, 6, 2, 1, 4)
    with pytest.raises(ValueError, match=culprit):
        blockwise_causal_attention(q, k, v, **kwargs)
    with pytest.raises(ValueError, match="Hkv"):
        blockwise_causal_attention(q, k[:, :, :1, :2], v)


def test_auto_is_dense_within_one_block_and_blockwise_beyond():
    """"auto" runs the dense form while one block covers T (the same logits, no loops) and the
    blockwise form beyond; both give the dense values."""
    q, k, v = _qkv(6, 1, 24, 2, 2, 8)
    for block, looped in ((32, False), (24, False), (8, True)):
        attend = lambda q, k, v, block=block: causal_attention(q, k, v, implementation="auto",
                                                               block_size=block)
        text = jax.jit(attend).lower(q, k, v).compile().as_text()
        assert (" while(" in text) == looped, block
        np.testing.assert_allclose(attend(q, k, v),
                                   causal_attention(q, k, v, implementation="dense"),
                                   rtol=1e-5, atol=1e-6)
