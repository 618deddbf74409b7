"""The pure-functional form: split/apply compose with jax.jit, jax.grad and jax.vmap."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hybrid_jax
from hybrid_jax import HybridLM, apply, split

VOCAB = 64


@pytest.fixture(scope="module")
def model() -> HybridLM:
    config = hybrid_jax.olmo_hybrid_tiny(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        layer_types=("linear_attention", "full_attention") * 2, num_attention_heads=2,
        num_key_value_heads=1, linear_num_key_heads=1, linear_num_value_heads=2,
        linear_key_head_dim=8, linear_value_head_dim=16, gdn_method="recurrent")
    return HybridLM(config, rngs=nnx.Rngs(0))


def _ids(seed: int, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), shape, 0, VOCAB)


def test_split_apply_matches_module(model):
    graphdef, params = split(model)
    ids = _ids(0, (2, 10))
    chex.assert_trees_all_equal(params, nnx.state(model))
    logits = jax.jit(apply)(graphdef, params, ids)
    chex.assert_shape(logits, (2, 10, VOCAB))
    chex.assert_type(logits, jnp.float32)
    np.testing.assert_allclose(logits, model(ids), rtol=1e-5, atol=1e-5)


def test_grad_is_finite_and_matches_finite_difference(model):
    graphdef, params = split(model)
    ids = _ids(1, (2, 12))

    def loss(p):
        logits = apply(graphdef, p, ids[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))

    loss_jit = jax.jit(loss)
    grads = jax.jit(jax.grad(loss))(params)
    chex.assert_trees_all_equal_shapes_and_dtypes(grads, params)
    chex.assert_tree_all_finite(grads)

    # Central difference on the largest-gradient coordinate of a GDN parameter deep in the stack
    # (float32 only, so a loose check).
    path = ("stack", "blocks", "layers", 0, "gdn", "v_proj", "kernel")
    pure_grads = nnx.to_pure_dict(grads)
    g = np.asarray(_get(pure_grads, path))
    coord = np.unravel_index(np.argmax(np.abs(g)), g.shape)
    eps = 1e-2

    def shifted(delta: float) -> float:
        pure = nnx.to_pure_dict(params)
        leaf = _get(pure, path)
        _set(pure, path, leaf.at[coord].add(delta))
        p = nnx.clone(params)
        nnx.replace_by_pure_dict(p, pure)
        return float(loss_jit(p))

    fd = (shifted(eps) - shifted(-eps)) / (2 * eps)
    assert abs(g[coord]) > 1e-3
    print(f"finite difference {fd:.6g} vs grad {g[coord]:.6g}")
    np.testing.assert_allclose(fd, g[coord], rtol=1e-2)


def test_vmap_over_batches(model):
    graphdef, params = split(model)
    ids = _ids(2, (3, 2, 8))  # 3 independent [B=2, T=8] batches
    batched = jax.jit(jax.vmap(apply, in_axes=(None, None, 0)))(graphdef, params, ids)
    chex.assert_shape(batched, (3, 2, 8, VOCAB))
    single = jax.jit(apply)
    for i in range(3):
        np.testing.assert_allclose(batched[i], single(graphdef, params, ids[i]), rtol=1e-5, atol=1e-5)


def test_jit_with_segments_and_positions(model):
    graphdef, params = split(model)
    ids = _ids(3, (1, 8))
    segment_ids = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1]])
    f = jax.jit(apply)
    explicit = f(graphdef, params, ids, segment_ids=segment_ids,
                 positions=jnp.array([[0, 1, 2, 0, 1, 2, 3, 4]]))
    implicit = f(graphdef, params, ids, segment_ids=segment_ids)
    np.testing.assert_allclose(explicit, implicit, rtol=1e-6, atol=1e-6)


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value
