"""Held-out evaluation: loss, perplexity and bits per byte against a float64 NumPy computation
from the model's own logits, row by row, document by document."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrid_jax import olmo_hybrid_tiny
from hybrid_jax.config import ATTENTION, GDN
from hybrid_jax.data import DataError, TokenRows
from hybrid_jax.eval.heldout import HeldoutEvaluator, heldout_set, local_batches
from hybrid_jax.inference.text import ByteCodec
from hybrid_jax.model.hybrid_lm import HybridLM
from hybrid_jax.train.state import model_template

EOS = 256  # outside the bytes, as a bytes model's EOS is


def _reference(model: HybridLM, rows: np.ndarray) -> tuple[float, int, int]:
    """(summed cross-entropy in float64, scored tokens, their UTF-8 bytes): every position
    whose next token is in its document, without segment ids: each document cut out of its
    row and run on its own (right-padded to the row's length, which a causal model never
    reads), the log-softmax in float64."""
    docs = []
    for row in rows:
        ends = np.flatnonzero(row == EOS)
        for a, b in zip(np.concatenate([[0], ends + 1]), np.concatenate([ends + 1, [len(row)]])):
            if b - a >= 2:
                docs.append(row[a:b])
    padded = np.stack([np.pad(d, (0, rows.shape[1] - len(d)), constant_values=1) for d in docs])
    logits = np.asarray(model(jnp.asarray(padded, jnp.int32)), np.float64)
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    ce = -sum(logp[i, np.arange(len(d) - 1), d[1:]].sum() for i, d in enumerate(docs))
    tokens = sum(len(d) - 1 for d in docs)
    nbytes = sum(int(np.sum(d[1:] < 256)) for d in docs)
    return ce, tokens, nbytes


def test_heldout_metrics_match_a_float64_reference():
    cfg = olmo_hybrid_tiny(num_hidden_layers=2, layer_types=(GDN, ATTENTION), vocab_size=260)
    model = HybridLM(cfg, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(0)
    stream = rng.integers(32, 127, 5 * 24 + 7).astype(np.uint32)
    stream[rng.choice(len(stream), 9, replace=False)] = EOS
    rows = TokenRows([stream], ["held.npy"], 24, cfg.vocab_size)
    held = heldout_set("held", rows, EOS, ByteCodec())
    assert len(held.rows) == 5
    # Batches of 2: the third is one row and a padding row (segment 0), never scored.
    batches = list(local_batches(held, 2))
    assert len(batches) == 3 and not batches[2]["segment_ids"][1].any()
    evaluator = HeldoutEvaluator(model_template(cfg), [held], batch=2)
    got = evaluator(nnx.to_pure_dict(nnx.state(model)))["held"]
    ce, tokens, nbytes = _reference(model, np.stack([rows[i] for i in range(5)]))
    assert got["tokens"] == tokens
    np.testing.assert_allclose(got["loss"], ce / tokens, rtol=2e-6)
    np.testing.assert_allclose(got["perplexity"], math.exp(ce / tokens), rtol=2e-6)
    np.testing.assert_allclose(got["bits_per_byte"], ce / math.log(2) / nbytes, rtol=2e-6)
    # max_rows keeps the first rows; no codec, no bits per byte.
    first = heldout_set("first", rows, EOS, None, max_rows=2)
    got = HeldoutEvaluator(model_template(cfg), [first], batch=2)(
        nnx.to_pure_dict(nnx.state(model)))["first"]
    ce2, tokens2, _ = _reference(model, np.stack([rows[0], rows[1]]))
    assert "bits_per_byte" not in got and got["tokens"] == tokens2
    np.testing.assert_allclose(got["loss"], ce2 / tokens2, rtol=2e-6)


def test_heldout_batches_split_over_processes():
    rows = TokenRows([np.arange(5 * 8, dtype=np.uint32) % 50 + 1], ["h"], 8, 64)
    held = heldout_set("h", rows, 0)
    whole = list(local_batches(held, 4))
    parts = [list(local_batches(held, 4, p, 2)) for p in range(2)]
    for k, batch in enumerate(whole):
        np.testing.assert_array_equal(
            np.concatenate([parts[0][k]["tokens"], parts[1][k]["tokens"]]), batch["tokens"])
    with pytest.raises(DataError, match="does not split over 3 processes"):
        next(local_batches(held, 4, 0, 3))
