"""hybrid_jax.ops.moe against an independent float64 NumPy reference (a loop over every token's
top-k experts), torch.topk for ties, and transformers' own load-balancing loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hybrid_jax.ops import moe

TOL = 1e-5  # float32 against float64, relative to the largest magnitude


def _max_rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


# --------------------------------------------------------------------------- references
def ref_route(logits: np.ndarray, k: int, normalize: bool):
    """(weights [N, k], experts [N, k], probs [N, E]) in float64: a stable sort of the negated
    probabilities puts ties at the lower expert index first."""
    z = np.asarray(logits, np.float64)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    experts = np.argsort(-p, axis=-1, kind="stable")[:, :k]
    weights = np.take_along_axis(p, experts, axis=-1)
    if normalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return weights, experts, p


def ref_experts(x, weights, experts, gate_up, down) -> np.ndarray:
    """Each token through its own experts, one at a time (float64)."""
    x, gate_up, down = (np.asarray(a, np.float64) for a in (x, gate_up, down))
    inter = down.shape[1]
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        for w, e in zip(np.asarray(weights, np.float64)[n], np.asarray(experts)[n]):
            h = x[n] @ gate_up[e]
            gate, up = h[:inter], h[inter:]
            out[n] += w * ((gate / (1 + np.exp(-gate)) * up) @ down[e])
    return out


def ref_grouped(lhs, rhs, sizes) -> np.ndarray:
    lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
    out, start = np.zeros((lhs.shape[0], rhs.shape[2])), 0
    for g, s in enumerate(np.asarray(sizes)):
        out[start:start + s] = lhs[start:start + s] @ rhs[g]
        start += s
    return out


def _weights(n, d, inter, e, *, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    router = rng.normal(size=(d, e))
    gate_up = rng.normal(size=(e, d, 2 * inter)) / np.sqrt(d)
    down = rng.normal(size=(e, inter, d)) / np.sqrt(inter)
    return tuple(jnp.asarray(a, dtype) for a in (x, router, gate_up, down))


MLPS = {
    "tiled": lambda *a: moe.expert_mlp(*a, method="tiled"),
    "tiled4": lambda *a: moe.expert_mlp(*a, method="tiled", tile=4),  # several tiles a group
    "ragged_dot": lambda *a: moe.expert_mlp(*a, method="ragged_dot"),
    "auto": moe.expert_mlp,
    "dense": moe.dense_expert_mlp,
}


# --------------------------------------------------------------------------- experts' MLP
@pytest.mark.parametrize("name", list(MLPS))
@pytest.mark.parametrize("n,d,inter,e,k", [(37, 24, 20, 6, 2), (1, 8, 4, 5, 3)])
def test_expert_mlp_matches_the_per_token_reference(name, n, d, inter, e, k):
    x, router, gate_up, down = _weights(n, d, inter, e)
    logits = x @ router
    routing = moe.route_top_k(logits, k, normalize=True)
    weights, experts, probs = ref_route(logits, k, normalize=True)
    np.testing.assert_array_equal(routing.experts, experts)
    out = jax.jit(MLPS[name])(x, routing, gate_up, down)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert _max_rel(out, ref_experts(x, weights, experts, gate_up, down)) < TOL


@pytest.mark.parametrize("normalize", [True, False])
def test_routing_matches_the_reference(normalize):
    x, router, _, _ = _weights(29, 16, 4, 7, seed=1)
    routing = moe.route_top_k((x @ router).astype(jnp.bfloat16), 3, normalize=normalize)
    weights, experts, probs = ref_route((x @ router).astype(jnp.bfloat16).astype(np.float32), 3,
                                        normalize)
    assert routing.weights.dtype == routing.probs.dtype == jnp.float32
    assert routing.experts.dtype == jnp.int32
    np.testing.assert_array_equal(routing.experts, experts)
    np.testing.assert_allclose(routing.weights, weights, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(routing.probs, probs, rtol=1e-6, atol=1e-7)
    sums = np.asarray(routing.weights).sum(-1)
    assert np.allclose(sums, 1, atol=1e-6) == normalize


def test_ties_go_to_the_lower_expert_and_values_match_torch_topk():
    """Equal scores: jax.lax.top_k picks the lower expert index first. torch.topk on CPU does
    not (its order among equal values depends on k and E: all-equal scores, k=1 of 8, give
    expert 6), so only its values, and its expert sets where no tie straddles the k-th place,
    are compared with it."""
    rng = np.random.default_rng(2)
    logits = rng.integers(0, 3, size=(64, 8)).astype(np.float32)  # many equal scores
    logits[0] = 0.0  # all equal
    logits[1] = [1, 2, 2, 0, 2, 1, 2, 2]
    for k in (1, 3, 8):
        routing = moe.route_top_k(jnp.asarray(logits), k, normalize=False)
        weights, experts, _ = ref_route(logits, k, normalize=False)
        np.testing.assert_array_equal(routing.experts, experts)
        np.testing.assert_array_equal(routing.experts[:2, :1], [[0], [1]])
        probs = torch.softmax(torch.from_numpy(logits), dim=-1, dtype=torch.float)
        values, indices = torch.topk(probs, k, dim=-1)
        np.testing.assert_allclose(routing.weights, values.numpy(), rtol=1e-6)
        ordered = np.sort(probs.numpy(), axis=-1)[:, ::-1]
        clean = ordered[:, k - 1] > ordered[:, k] if k < 8 else np.ones(64, bool)
        assert clean.sum() > 5
        np.testing.assert_array_equal(np.sort(routing.experts, -1)[clean],
                                      np.sort(indices.numpy(), -1)[clean])


@pytest.mark.parametrize("name", ["tiled", "tiled4", "ragged_dot"])
def test_an_expert_without_tokens_and_top_k_of_all_experts(name):
    x, router, gate_up, down = _weights(19, 12, 8, 5, seed=3)
    logits = (x @ router).at[:, 2].set(-30.0)  # expert 2 is nobody's choice at k=2
    for k in (2, 5):
        routing = moe.route_top_k(logits, k, normalize=k == 2)
        weights, experts, _ = ref_route(logits, k, normalize=k == 2)
        assert (k == 2) == (not np.any(experts == 2))
        out = jax.jit(MLPS[name])(x, routing, gate_up, down)
        assert _max_rel(out, ref_experts(x, weights, experts, gate_up, down)) < TOL


def test_gradients_match_the_dense_baseline():
    x, router, gate_up, down = _weights(37, 24, 20, 6, seed=4)
    logits = (x @ router).at[:, 5].set(-30.0)  # an expert with no tokens: a zero gradient
    cotangent = jnp.asarray(np.random.default_rng(5).normal(size=x.shape), jnp.float32)

    def loss(mlp):
        def f(x, gate_up, down):
            routing = moe.route_top_k(logits + x @ router, 2, normalize=True)
            return jnp.sum(mlp(x, routing, gate_up, down) * cotangent)
        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))

    want = loss(moe.dense_expert_mlp)(x, gate_up, down)
    assert not np.any(want[2][5])
    for name in ("tiled", "tiled4", "ragged_dot"):
        got = loss(MLPS[name])(x, gate_up, down)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and _max_rel(g, w) < TOL, name


@pytest.mark.parametrize("name", ["tiled", "ragged_dot", "dense"])
def test_bfloat16_runs_close_to_float32(name):
    args = _weights(37, 24, 20, 6, seed=6)
    routing = moe.route_top_k(args[0] @ args[1], 2, normalize=True)

    def f(x, gate_up, down):
        return MLPS[name](x, routing, gate_up, down)

    def grads(*a):
        return jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32) ** 2), argnums=(0, 1, 2))(*a)

    f32 = (args[0], *args[2:])
    bf16 = tuple(a.astype(jnp.bfloat16) for a in f32)
    got = jax.jit(f)(*bf16)
    assert got.dtype == jnp.bfloat16 and _max_rel(got, f(*f32)) < 3e-2
    for g, w in zip(jax.jit(grads)(*bf16), grads(*f32)):
        assert g.dtype == jnp.bfloat16 and _max_rel(g, w) < 5e-2


# --------------------------------------------------------------------------- grouped matmul
@pytest.mark.parametrize("method,tile", [("tiled", 128), ("tiled", 4), ("ragged_dot", 128)])
def test_grouped_matmul_padding_rows_and_an_empty_group(method, tile):
    rng = np.random.default_rng(7)
    sizes = np.array([5, 0, 9, 1], np.int32)  # 15 rows of 20: 5 rows of padding
    lhs = jnp.asarray(rng.normal(size=(20, 6)), jnp.float32)
    rhs = jnp.asarray(rng.normal(size=(4, 6, 3)), jnp.float32)
    d_out = jnp.asarray(rng.normal(size=(20, 3)), jnp.float32)

    def f(lhs, rhs):
        return moe.grouped_matmul(lhs, rhs, jnp.asarray(sizes), method=method, tile=tile)

    out, vjp = jax.vjp(jax.jit(f), lhs, rhs)
    assert out.dtype == jnp.float32 and not np.any(out[15:])
    assert _max_rel(out, ref_grouped(lhs, rhs, sizes)) < TOL
    d_lhs, d_rhs = vjp(d_out)
    # The VJP of a grouped product is a grouped product: d_lhs = d_out rhs^T, d_rhs = lhs^T d_out.
    assert _max_rel(d_lhs, ref_grouped(d_out, np.swapaxes(rhs, 1, 2), sizes)) < TOL
    want = np.stack([np.asarray(lhs[a:b], np.float64).T @ np.asarray(d_out[a:b], np.float64)
                     for a, b in zip(np.cumsum(sizes) - sizes, np.cumsum(sizes))])
    assert not np.any(d_rhs[1]) and _max_rel(d_rhs, want) < TOL


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="method"):
        moe.grouped_matmul(jnp.ones((2, 2)), jnp.ones((1, 2, 2)), jnp.array([2]), method="dense")


def _layer_grad_text(d: int, inter: int) -> dict[str, str]:
    """The lowered gradient of an MoE layer with hidden d and expert width inter, per platform."""
    s = jax.ShapeDtypeStruct
    args = (s((16, d), jnp.float32), s((d, 4), jnp.float32), s((4, d, 2 * inter), jnp.float32),
            s((4, inter, d), jnp.float32))

    def layer(x, router, gate_up, down):
        return moe.expert_mlp(x, moe.route_top_k(x @ router, 2, normalize=True), gate_up, down)

    traced = jax.jit(jax.grad(lambda *a: jnp.sum(layer(*a)), argnums=(0, 2, 3))).trace(*args)
    return {p: traced.lower(lowering_platforms=(p,)).as_text() for p in ("tpu", "cpu")}


def test_lowering_for_tpu_takes_megablox_where_the_widths_tile():
    """Widths of 128: megablox's Mosaic kernels (no ragged_dot, whose weight gradient XLA:TPU
    computes over every group); widths that do not tile: ragged_dot; CPU: the tiled loop."""
    text = _layer_grad_text(128, 128)
    assert "tpu_custom_call" in text["tpu"] and "ragged_dot" not in text["tpu"]
    text = _layer_grad_text(8, 3)
    assert "ragged_dot" in text["tpu"] and "while" not in text["tpu"]
    assert "ragged_dot" not in text["cpu"] and "while" in text["cpu"]


def test_megablox_matches_the_reference_in_interpret_mode():
    """Rows padded to whole tiles (200 of 256), an empty group, and the VJP (megablox's tgmm
    for the weights), in Pallas interpret mode."""
    rng = np.random.default_rng(11)
    sizes = np.array([70, 0, 90, 30])  # 190 of 200 rows; the last 10 are padding (zero)
    lhs = rng.normal(size=(200, 128)).astype(np.float32)
    rhs = rng.normal(size=(4, 128, 128)).astype(np.float32) / 10
    cot = rng.normal(size=(200, 128)).astype(np.float32)

    def f(a, b):
        out = moe.grouped_matmul(a, b, jnp.asarray(sizes), method="megablox", interpret=True)
        return jnp.sum(out * cot), out

    (_, out), (d_lhs, d_rhs) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(lhs, rhs)
    ref = ref_grouped(lhs, rhs, sizes)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    d_ref_rhs, start = np.zeros(rhs.shape), 0
    for g, n in enumerate(sizes):
        d_ref_rhs[g] = lhs[start:start + n].T.astype(np.float64) @ cot[start:start + n]
        start += n
    np.testing.assert_allclose(d_rhs, d_ref_rhs, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(d_lhs, ref_grouped(cot, np.swapaxes(rhs, 1, 2), sizes),
                               rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- aux loss
def test_load_balancing_loss_matches_transformers():
    from transformers.models.qwen3_next.modeling_qwen3_next import load_balancing_loss_func

    rng = np.random.default_rng(8)
    e, k = 10, 3
    layers = [rng.normal(size=(n, e)).astype(np.float32) for n in (23, 23)]
    stats = [moe.router_stats(moe.route_top_k(jnp.asarray(z), k, normalize=True)) for z in layers]
    total = moe.add_stats(*stats)
    assert float(total.tokens) == 46 and float(total.counts.sum()) == 46 * k
    want = load_balancing_loss_func(tuple(torch.from_numpy(z) for z in layers), e, k)
    got = moe.load_balancing_loss(total)
    assert got.dtype == jnp.float32 and abs(float(got) - float(want)) < 1e-6
