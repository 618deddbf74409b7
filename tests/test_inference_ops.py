"""The inference building blocks against NumPy float64 references: the cached short convolution,
attention over a key/value cache, and the sampling filters and sampler."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax.inference import SamplingConfig, filter_logits, sample_tokens
from hybrid_jax.ops.attention import cached_attention
from hybrid_jax.ops.conv import causal_conv1d, causal_conv1d_continue


# ----------------------------------------------------------------------------- short convolution
def _np_conv(x: np.ndarray, weight: np.ndarray, window: np.ndarray | None = None,
             activation: str | None = None) -> np.ndarray:
    """y[b, t, c] = sum_j w[c, j] * x_ext[b, t + j, c] over x_ext = window ++ x, a float64 loop."""
    x = np.asarray(x, np.float64)
    w = np.asarray(weight, np.float64)
    b, t, c = x.shape
    k = w.shape[1]
    if window is None:
        window = np.zeros((b, k - 1, c))
    ext = np.concatenate([np.asarray(window, np.float64), x], axis=1)
    y = np.zeros((b, t, c))
    for i in range(t):
        for j in range(k):
            y[:, i] += w[:, j] * ext[:, i + j]
    if activation == "silu":
        y = y / (1.0 + np.exp(-y))
    return y


@pytest.mark.parametrize("activation", [None, "silu"])
def test_conv_continue_in_pieces_equals_whole_and_numpy(activation):
    rng = np.random.default_rng(0)
    b, t, c, k = 2, 11, 6, 4
    x = rng.standard_normal((b, t, c)).astype(np.float32)
    w = rng.standard_normal((c, k)).astype(np.float32)
    ref = _np_conv(x, w, activation=activation)

    whole = causal_conv1d(jnp.asarray(x), jnp.asarray(w), activation=activation)
    np.testing.assert_allclose(np.asarray(whole), ref, rtol=1e-5, atol=1e-5)

    # Pieces shorter than, equal to and longer than the window (K - 1 = 3).
    window = jnp.zeros((b, k - 1, c), jnp.float32)
    outs = []
    for lo, hi in [(0, 1), (1, 3), (3, 6), (6, 11)]:
        y, window = causal_conv1d_continue(jnp.asarray(x[:, lo:hi]), window, jnp.asarray(w),
                                           activation=activation)
        assert y.shape == (b, hi - lo, c)
        # The window is always the last K-1 inputs seen (zeros before the start).
        seen = np.concatenate([np.zeros((b, k - 1, c), np.float32), x[:, :hi]], axis=1)
        np.testing.assert_array_equal(np.asarray(window), seen[:, -(k - 1):])
        outs.append(np.asarray(y))
    pieces = np.concatenate(outs, axis=1)
    np.testing.assert_allclose(pieces, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pieces, np.asarray(whole), rtol=1e-6, atol=1e-6)


def test_conv_continue_from_a_nonzero_window():
    rng = np.random.default_rng(1)
    b, t, c, k = 3, 2, 5, 4
    x = rng.standard_normal((b, t, c)).astype(np.float32)
    window = rng.standard_normal((b, k - 1, c)).astype(np.float32)
    w = rng.standard_normal((c, k)).astype(np.float32)
    y, new_window = causal_conv1d_continue(jnp.asarray(x), jnp.asarray(window), jnp.asarray(w))
    np.testing.assert_allclose(np.asarray(y), _np_conv(x, w, window), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(new_window),
                                  np.concatenate([window, x], axis=1)[:, -(k - 1):])
    # A wrong window shape is refused, naming the expected shape.
    with pytest.raises(ValueError, match=r"window must be \[B, K-1, C\]"):
        causal_conv1d_continue(jnp.asarray(x), jnp.zeros((b, k, c)), jnp.asarray(w))


def test_conv_continue_skips_left_padding_after_a_window():
    rng = np.random.default_rng(4)
    b, t, c, k = 3, 7, 5, 4
    w = rng.standard_normal((c, k)).astype(np.float32)
    window = rng.standard_normal((b, k - 1, c)).astype(np.float32)
    x = rng.standard_normal((b, t, c)).astype(np.float32)
    n_pad = np.array([0, 2, 5])
    valid = np.arange(t)[None, :] >= n_pad[:, None]
    y, new_window = causal_conv1d_continue(jnp.asarray(x), jnp.asarray(window), jnp.asarray(w),
                                           valid=jnp.asarray(valid))
    for row, p in enumerate(n_pad):
        # The row's real tokens continue the window directly, as if the padding were absent.
        ref = _np_conv(x[row:row + 1, p:], w, window[row:row + 1])[0]
        np.testing.assert_allclose(np.asarray(y)[row, p:], ref, rtol=1e-5, atol=1e-5)
        ext = np.concatenate([window[row], x[row, p:]])
        np.testing.assert_array_equal(np.asarray(new_window)[row], ext[-(k - 1):])
    # A row that is all padding keeps its window.
    _, kept = causal_conv1d_continue(jnp.asarray(x), jnp.asarray(window), jnp.asarray(w),
                                     valid=jnp.zeros((b, t), bool))
    np.testing.assert_array_equal(np.asarray(kept), window)


# ----------------------------------------------------------------------------- cached attention
def _np_cached_attention(q, k, v, slots, scale):
    """Softmax over cache slots s <= slots[b, i], float64; query head h uses kv head h // G."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, h, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    out = np.zeros((b, t, h, d))
    for bi in range(b):
        for i in range(t):
            allowed = np.arange(s) <= slots[bi, i]
            assert allowed.any()
            for hi in range(h):
                kv = hi // g
                logits = (k[bi, allowed, kv] @ q[bi, i, hi]) * scale
                p = np.exp(logits - logits.max())
                p /= p.sum()
                out[bi, i, hi] = p @ v[bi, allowed, kv]
    return out


def _random_qkv(seed: int, b: int, t: int, h: int, hkv: int, d: int, s: int):
    """q [b, t, h, d]; k, v [b, s, hkv, d] (sequence-major, as the NumPy reference reads them)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, h, d)).astype(np.float32)
    k = rng.standard_normal((b, s, hkv, d)).astype(np.float32)
    v = rng.standard_normal((b, s, hkv, d)).astype(np.float32)
    return q, k, v


def _head_major(x: np.ndarray) -> jax.Array:
    """[b, s, hkv, d] -> the cache's [b, hkv, s, d]."""
    return jnp.asarray(np.swapaxes(x, 1, 2))


def test_cached_attention_matches_numpy_gqa_per_row_slots():
    b, t, h, hkv, d, s = 3, 4, 6, 2, 8, 12
    q, k, v = _random_qkv(2, b, t, h, hkv, d, s)
    # Row 0: a prefill from slot 0; row 1: a piece continuing at slot 7; row 2: reaching the
    # last slot. Slots past each query's own are stale and must not count.
    slots = np.array([[0, 1, 2, 3], [7, 8, 9, 10], [8, 9, 10, 11]], np.int32)
    out = cached_attention(jnp.asarray(q), _head_major(k), _head_major(v), jnp.asarray(slots))
    ref = _np_cached_attention(q, k, v, slots, d ** -0.5)
    assert out.shape == (b, t, h, d) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)

    # An explicit scale is used as given.
    out2 = cached_attention(jnp.asarray(q), _head_major(k), _head_major(v), jnp.asarray(slots),
                            scale=0.3)
    np.testing.assert_allclose(np.asarray(out2), _np_cached_attention(q, k, v, slots, 0.3),
                               rtol=1e-5, atol=1e-5)

    # Stale slots really are invisible: overwrite everything past row 0's last query slot.
    k_stale, v_stale = k.copy(), v.copy()
    k_stale[0, 4:] = 100.0
    v_stale[0, 4:] = -100.0
    out3 = cached_attention(jnp.asarray(q), _head_major(k_stale), _head_major(v_stale),
                            jnp.asarray(slots))
    np.testing.assert_array_equal(np.asarray(out3)[0], np.asarray(out)[0])


# The dense XLA form, and the blockwise form in blocks of 4 (T = 10: three blocks, padded).
IMPLEMENTATIONS = [("dense", 512), ("blockwise", 4)]


@pytest.mark.parametrize("implementation,block", IMPLEMENTATIONS)
@pytest.mark.parametrize("h,hkv", [(4, 4), (6, 2)])
def test_causal_attention_matches_numpy_with_segments(h, hkv, implementation, block):
    """The training/prefill attention (both forms) against float64 NumPy: causal, within
    segments (two documents per row, different boundaries), GQA; and in bf16 against
    ``jax.nn.dot_product_attention``'s XLA path, whose numerics they keep."""
    from hybrid_jax.ops.attention import causal_attention

    b, t, d = 2, 10, 8
    q, k, v = _random_qkv(3, b, t, h, hkv, d, t)
    segments = np.array([[0] * 4 + [1] * 6, [5] * 7 + [6] * 3])
    ref = np.zeros((b, t, h, d))
    for bi in range(b):
        for i in range(t):
            allowed = (np.arange(t) <= i) & (segments[bi] == segments[bi, i])
            last = np.array([[allowed.sum() - 1]])  # the allowed keys, as slots 0..last
            ref[bi, i] = _np_cached_attention(q[bi:bi + 1, i:i + 1], k[bi:bi + 1, allowed],
                                              v[bi:bi + 1, allowed], last, d ** -0.5)[0, 0]
    out = causal_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                           segment_ids=jnp.asarray(segments), implementation=implementation,
                           block_size=block)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)

    bf = lambda x: jnp.asarray(x, jnp.bfloat16)
    mask = jnp.asarray(segments[:, :, None] == segments[:, None, :])[:, None]
    want = jax.nn.dot_product_attention(bf(q), bf(k), bf(v), mask=mask, is_causal=True)
    got = causal_attention(bf(q), bf(k), bf(v), segment_ids=jnp.asarray(segments),
                           implementation=implementation, block_size=block)
    # One bf16 step (2^-8 relative) apart at most: the blockwise form rounds each block's
    # probabilities to bf16 against its own running max, the dense form against the row's.
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=1e-2, rtol=2 ** -7)


@pytest.mark.parametrize("implementation,block", IMPLEMENTATIONS)
@pytest.mark.parametrize("h,hkv", [(4, 4), (6, 2)])
def test_causal_attention_gradient_matches_jax_reference(h, hkv, implementation, block):
    """Both forms' own VJPs (probabilities recomputed from the log-sum-exp) against autodiff of ``jax.nn.dot_product_attention``'s XLA path: causal, two segments per
    row, GQA; float32 to rounding, bf16 to bf16 rounding."""
    from hybrid_jax.ops.attention import causal_attention

    b, t, d = 2, 12, 8
    q, k, v = _random_qkv(4, b, t, h, hkv, d, t)
    segments = jnp.asarray([[0] * 5 + [1] * 7, [3] * 9 + [4] * 3])
    mask = (segments[:, :, None] == segments[:, None, :])[:, None]
    weights = jnp.asarray(np.random.default_rng(5).standard_normal((b, t, h, d)), jnp.float32)

    def grads(attend, dtype):
        loss = lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32) * weights)
        args = [jnp.asarray(x, dtype) for x in (q, k, v)]
        return jax.grad(loss, argnums=(0, 1, 2))(*args)

    ours = lambda q, k, v: causal_attention(q, k, v, segment_ids=segments,
                                            implementation=implementation, block_size=block)
    ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                                       implementation="xla")
    for dtype, tol in ((jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)):
        for name, got, want in zip("qkv", grads(ours, dtype), grads(ref, dtype)):
            assert got.dtype == dtype, name
            np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                       rtol=tol, atol=tol, err_msg=f"d{name} {dtype}")


def test_dense_attention_gradient_takes_the_cpu_layout_only_on_cpu():
    """The keys' cotangents read their small operand through a transposed copy behind an
    optimization barrier on CPU only: a program lowered for a TPU or a GPU from this host (an
    AOT compile) gets the plain product."""
    from hybrid_jax.ops.attention import causal_attention

    q = jnp.ones((1, 16, 2, 8), jnp.bfloat16)
    loss = lambda q: jnp.sum(causal_attention(q, q, q, implementation="dense")
                             .astype(jnp.float32))
    traced = jax.jit(jax.grad(loss)).trace(q)
    for platform in ("cpu", "tpu", "cuda"):
        text = traced.lower(lowering_platforms=(platform,)).as_text()
        assert ("optimization_barrier" in text) == (platform == "cpu"), platform


def test_cached_attention_negative_slot_is_finite():
    b, t, h, hkv, d, s = 2, 3, 4, 4, 8, 6
    q, k, v = _random_qkv(3, b, t, h, hkv, d, s)
    # Left padding: slot -1 sees nothing; the real tokens after it are unaffected.
    slots = np.array([[-1, -1, 0], [-1, 0, 1]], np.int32)
    out = np.asarray(cached_attention(jnp.asarray(q), _head_major(k), _head_major(v),
                                      jnp.asarray(slots)))
    assert np.all(np.isfinite(out))
    real = slots >= 0
    ref = _np_cached_attention(q, k, v, np.maximum(slots, 0), d ** -0.5)
    np.testing.assert_allclose(out[real], ref[real], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- sampling filters
def _np_keep(logits: np.ndarray, top_k=None, top_p=None) -> np.ndarray:
    """The kept set [B, V] bool: top-k keeps every logit >= the k-th largest (ties kept); top-p
    then keeps, in descending order, each token whose predecessors hold < top_p of the
    probability renormalised over the top-k set (so the first is always kept)."""
    logits = np.asarray(logits, np.float64)
    keep = np.ones(logits.shape, bool)
    if top_k is not None and top_k < logits.shape[1]:
        kth = -np.sort(-logits, axis=1)[:, top_k - 1:top_k]
        keep &= logits >= kth
    if top_p is not None and top_p < 1.0:
        for b in range(logits.shape[0]):
            z = np.where(keep[b], logits[b], -np.inf)
            p = np.exp(z - z.max())
            p /= p.sum()
            order = np.argsort(-z, kind="stable")
            before = np.cumsum(p[order]) - p[order]
            row = np.zeros(logits.shape[1], bool)
            row[order[before < top_p]] = True
            keep[b] &= row
    return keep


def _kept(filtered) -> np.ndarray:
    filtered = np.asarray(filtered)
    assert not np.any(np.isnan(filtered))
    return np.isfinite(filtered)


@pytest.mark.parametrize("top_k,top_p", [(1, None), (3, None), (40, None), (64, None),
                                         (None, 0.3), (None, 0.9), (None, 1.0), (5, 0.5)])
def test_filter_logits_matches_numpy_kept_set(top_k, top_p):
    logits = np.random.default_rng(4).standard_normal((6, 40)).astype(np.float32) * 2.0
    filtered = filter_logits(jnp.asarray(logits), top_k=top_k, top_p=top_p)
    keep = _np_keep(logits, top_k, top_p)
    np.testing.assert_array_equal(_kept(filtered), keep)
    # Kept logits are unchanged; the rest are -inf.
    np.testing.assert_array_equal(np.asarray(filtered)[keep], logits[keep])
    assert np.all(np.asarray(filtered)[~keep] == -np.inf)
    if top_k is None and top_p in (None, 1.0):
        assert keep.all()


def test_filter_top_k_keeps_ties():
    logits = np.array([[3.0, 1.0, 2.0, 2.0, 2.0, 0.0],
                       [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]], np.float32)
    kept = _kept(filter_logits(jnp.asarray(logits), top_k=2))
    # Row 0: 3.0 and every 2.0 tied for second place; row 1: all tied.
    np.testing.assert_array_equal(kept, [[True, False, True, True, True, False], [True] * 6])
    np.testing.assert_array_equal(kept, _np_keep(logits, top_k=2))


def test_filter_top_p_smallest_set_and_first_always_kept():
    probs = np.array([[0.1, 0.4, 0.2, 0.3],     # sorted: .4 .3 .2 .1
                      [0.97, 0.01, 0.01, 0.01],  # one token above any top_p < .97
                      [0.25, 0.25, 0.25, 0.25]])  # all tied
    logits = np.log(probs).astype(np.float32)

    def kept(top_p):
        return _kept(filter_logits(jnp.asarray(logits), top_p=top_p))

    # .4 + .3 = .7 reaches .65: exactly two; .71 needs the third; .4 alone reaches .35.
    np.testing.assert_array_equal(kept(0.65)[0], [False, True, False, True])
    np.testing.assert_array_equal(kept(0.71)[0], [False, True, True, True])
    np.testing.assert_array_equal(kept(0.35)[0], [False, True, False, False])
    # The most likely token is kept even when it alone exceeds top_p, and for a tiny top_p.
    for top_p in (0.5, 1e-6):
        np.testing.assert_array_equal(kept(top_p)[1], [True, False, False, False])
        assert kept(top_p)[0].sum() >= 1 and kept(top_p)[2].sum() >= 1
    # Ties: the kept count is that of the smallest set reaching top_p (which of equal tokens
    # fill it is an implementation choice).
    for top_p, n in ((0.2, 1), (0.3, 2), (0.45, 2), (0.6, 3), (1.0, 4)):
        assert kept(top_p)[2].sum() == n, (top_p, kept(top_p)[2])
        assert kept(top_p)[2].sum() == _np_keep(logits, top_p=top_p)[2].sum()


def test_filter_top_p_random_rows_against_numpy():
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal((64, 16)) * 1.5).astype(np.float32)
    for top_p in (0.1, 0.5, 0.8, 0.95):
        keep = _np_keep(logits, top_p=top_p)
        # Skip rows where float32 vs float64 cumsums could land on different sides of top_p.
        z = logits.astype(np.float64)
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        before = np.cumsum(-np.sort(-p, axis=1), axis=1) - (-np.sort(-p, axis=1))
        clear = np.all(np.abs(before - top_p) > 1e-5, axis=1)
        assert clear.sum() > 50
        kept = _kept(filter_logits(jnp.asarray(logits), top_p=top_p))
        np.testing.assert_array_equal(kept[clear], keep[clear])


# ----------------------------------------------------------------------------- sampler
def test_sampling_config_validation():
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-0.5)
    with pytest.raises(ValueError, match="top_k"):
        SamplingConfig(temperature=1.0, top_k=0)
    for top_p in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="top_p"):
            SamplingConfig(temperature=1.0, top_p=top_p)
    assert SamplingConfig().greedy and not SamplingConfig(temperature=0.5).greedy


def test_greedy_sample_is_argmax():
    logits = np.random.default_rng(6).standard_normal((5, 33)).astype(np.float32)
    tokens = sample_tokens(jnp.asarray(logits), jax.random.key(0), SamplingConfig())
    assert tokens.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(tokens), logits.argmax(1))


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.7, 3, None),
                                                     (1.5, None, 0.8), (2.0, 4, 0.9)])
def test_sample_frequencies_match_filtered_softmax(temperature, top_k, top_p):
    n = 20000
    row = np.array([2.0, 1.2, 0.9, 0.0, -1.0], np.float32)
    # One key, n identical rows: n independent draws from one distribution.
    logits = jnp.broadcast_to(jnp.asarray(row), (n, row.size))
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    tokens = np.asarray(jax.jit(sample_tokens, static_argnums=2)(logits, jax.random.key(7),
                                                                  sampling))
    assert tokens.shape == (n,) and tokens.min() >= 0 and tokens.max() < row.size
    freq = np.bincount(tokens, minlength=row.size) / n

    z = row.astype(np.float64) / temperature
    keep = _np_keep(z[None], top_k, top_p)[0]
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    assert np.all(freq[~keep] == 0), (freq, keep)
    se = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(freq - p) <= 5 * se + 1e-12), (freq, p, se)
    # And the filters matter in these cases (the test would notice them being ignored).
    if top_k is not None or top_p is not None:
        assert not keep.all()
