"""Splash attention (jax's Pallas TPU kernel, run here in interpret mode) through
``ops.splash_attention``: outputs against a float64 NumPy softmax, gradients against autodiff
of the dense XLA form, with GQA and packed documents; the model with ``attention_method``
"splash" against "dense"; and what "auto" picks on each platform."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrid_jax.config import ATTENTION, GDN, olmo_hybrid_tiny
from hybrid_jax.model import HybridLM
from hybrid_jax.ops.attention import causal_attention, resolve_attention
from hybrid_jax.ops.splash_attention import SplashBlocks, splash_causal_attention

B, T, H, HKV, D = 2, 256, 4, 2, 128
BLOCKS = SplashBlocks(128, 128, 128, 128)  # two tiles each way: one skipped, one masked


def _inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    q, k, v, do = (rng.standard_normal(s) for s in [(B, T, H, D), (B, T, HKV, D),
                                                    (B, T, HKV, D), (B, T, H, D)])
    seg = np.zeros((B, T), np.int32)
    seg[0, 100:] = 1  # a document boundary inside a tile, another at a tile edge
    seg[0, 128:] = 2
    return q, k, v, do, seg  # row 1: one document


def _numpy_attention(q, k, v, seg):
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    allowed = np.tril(np.ones((T, T), bool))[None] & (seg[:, :, None] == seg[:, None, :])
    logits = np.where(allowed[:, None], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bhts,bshd->bthd", p / p.sum(-1, keepdims=True), v)


def _splash(q, k, v, seg):
    return splash_causal_attention(q, k, v, segment_ids=seg, blocks=BLOCKS, interpret=True)


def test_splash_matches_float64_softmax_and_the_dense_gradients():
    q, k, v, do, seg = _inputs()
    args = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
    seg_j = jnp.asarray(seg)
    out, vjp = jax.vjp(lambda *a: _splash(*a, seg_j), *args)
    want = _numpy_attention(q, k, v, seg)
    assert np.abs(np.asarray(out, np.float64) - want).max() < 2e-5
    dense = lambda *a: causal_attention(*a, segment_ids=seg_j, implementation="dense")
    want_grads = jax.vjp(dense, *args)[1](jnp.asarray(do, jnp.float32))
    for name, got, ref in zip("qkv", vjp(jnp.asarray(do, jnp.float32)), want_grads):
        err = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
        assert err < 1e-5, (name, err)


def test_splash_in_bfloat16_stays_close_to_float64():
    q, k, v, _, seg = _inputs(1)
    out = _splash(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), jnp.asarray(seg))
    assert out.dtype == jnp.bfloat16
    want = _numpy_attention(*(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
                              for x in (q, k, v)), seg)
    rel = np.linalg.norm(np.asarray(out, np.float64) - want) / np.linalg.norm(want)
    assert rel < 1e-2, rel


def test_a_sequence_splash_does_not_tile_is_an_error():
    x = jnp.zeros((1, 100, 2, 128))
    with pytest.raises(ValueError, match="100 is not a multiple of 128"):
        splash_causal_attention(x, x, x, interpret=True)


def test_the_model_with_splash_equals_dense():
    cfg = olmo_hybrid_tiny(num_hidden_layers=2, layer_types=(GDN, ATTENTION),
                           num_attention_heads=2, num_key_value_heads=1, hidden_size=256)
    # The same seed gives the same parameters: the method is not a parameter.
    dense, splash = (HybridLM(cfg.replace(attention_method=m), rngs=nnx.Rngs(0))
                     for m in ("dense", "splash"))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 128)), jnp.int32)
    seg = jnp.asarray(np.repeat([[1, 2]], [50, 78], axis=1).repeat(2, 0))
    np.testing.assert_allclose(splash(ids, segment_ids=seg), dense(ids, segment_ids=seg),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("platform,dtype,packed,want", [
    ("tpu", jnp.bfloat16, True, "splash"),
    ("tpu", jnp.float32, False, "splash"),
    ("gpu", jnp.bfloat16, False, "cudnn"),
    ("gpu", jnp.bfloat16, True, "blockwise"),  # packed rows: no dense mask to cuDNN
    ("gpu", jnp.float32, False, "blockwise"),
    ("cpu", jnp.bfloat16, False, "blockwise"),
])
def test_auto_picks_the_platforms_kernel(platform, dtype, packed, want):
    assert resolve_attention("auto", 4096, 1024, head_dim=128, dtype=dtype, packed=packed,
                             platform=platform) == want
    # Splash needs whole 128-token tiles; within one block, dense.
    assert resolve_attention("auto", 1000, 1024, head_dim=128, dtype=dtype,
                             platform="tpu") == "dense"
