"""The chunked LM-head loss (ops.lm_head_loss) against full logits: values against float64
NumPy, gradients against autodiff of ``lm_loss_sums`` over the full logits, the train step
with either loss, its memory, and bad arguments."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_train import _recording_optimizer, _tiny

from hybrid_jax.ops.lm_head_loss import lm_head_loss_sums, resolve_loss
from hybrid_jax.train import (
    init_train_state,
    jit_train_step,
    lm_loss_sums,
    make_train_step,
    model_template,
)

B, T, D, V = 2, 37, 16, 50  # T prime: no chunk size but 1 and T divides it
Z = 1e-2


def _inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(B, T, D))
    w = rng.normal(size=(D, V)) * 0.7
    targets = rng.integers(0, V, (B, T))
    mask = (rng.random((B, T)) > 0.25).astype(np.float64)
    return h, w, targets, mask


def _numpy_sums(h, w, targets, mask, z):
    logits = h @ w
    top = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    ce = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return np.sum(ce * mask), z * np.sum(lse ** 2 * mask)


def _ours(h, w, targets, mask, chunk, z=Z, dtype=jnp.float32, unroll=False):
    return lm_head_loss_sums(h, w, jnp.asarray(targets), jnp.asarray(mask), compute_dtype=dtype,
                             z_loss_weight=z, chunk_size=chunk, unroll=unroll)


@pytest.mark.parametrize("chunk", [1, 5, 16, 37, 64])
def test_values_match_float64_numpy(chunk):
    h, w, targets, mask = _inputs()
    with jax.default_matmul_precision("highest"):
        got = _ours(jnp.asarray(h, jnp.float32), jnp.asarray(w, jnp.float32), targets, mask,
                    chunk)
    ce, z = _numpy_sums(h, w, targets, mask, Z)
    np.testing.assert_allclose(float(got["ce"]), ce, rtol=2e-6)
    np.testing.assert_allclose(float(got["z"]), z, rtol=2e-6)
    np.testing.assert_allclose(float(got["loss"]), ce + z, rtol=2e-6)
    assert float(got["tokens"]) == mask.sum()


@pytest.mark.parametrize("chunk,z", [(1, Z), (5, 0.0), (5, Z), (37, Z), (64, 0.0)])
def test_gradients_match_autodiff_of_full_logits(chunk, z):
    h, w, targets, mask = (jnp.asarray(x, jnp.float32) for x in _inputs(1))
    targets = targets.astype(jnp.int32)

    def full(h, w):
        sums = lm_loss_sums(jnp.dot(h, w), targets, mask, z)
        return sums["ce"] + sums["z"]

    with jax.default_matmul_precision("highest"):
        want = jax.grad(full, (0, 1))(h, w)
        got = jax.grad(lambda h, w: _ours(h, w, targets, mask, chunk, z)["loss"], (0, 1))(h, w)
    for g, r in zip(got, want):
        assert g.dtype == jnp.float32
        np.testing.assert_allclose(g, r, rtol=0, atol=2e-6 * float(jnp.max(jnp.abs(r))))
    # Masked positions get no gradient.
    assert float(jnp.max(jnp.abs(got[0][mask == 0]))) == 0.0


def test_only_the_total_is_differentiated_and_scaled_by_its_cotangent():
    h, w, targets, mask = (jnp.asarray(x, jnp.float32) for x in _inputs(2))
    targets = targets.astype(jnp.int32)
    f = lambda h: _ours(h, w, targets, mask, 8)
    one = jax.grad(lambda h: f(h)["loss"])(h)
    np.testing.assert_allclose(jax.grad(lambda h: 3.0 * f(h)["loss"])(h), 3.0 * one, rtol=1e-6)
    # ce and z are reported values: their gradients are zero (documented), not wrong.
    assert float(jnp.max(jnp.abs(jax.grad(lambda h: f(h)["ce"])(h)))) == 0.0


def test_bfloat16_agrees_with_the_model_heads_logits():
    """bf16 hidden states: the loss and gradients agree with full logits from the model's
    head (one [B*T, D] @ [D, V] product in bf16, upcast) to bf16 rounding; the gradients come
    back in the inputs' dtypes (the kernel's float32, summed over chunks in float32)."""
    h, w, targets, mask = _inputs(3)
    hb, wb = jnp.asarray(h, jnp.bfloat16), jnp.asarray(w, jnp.float32)
    targets, mask = jnp.asarray(targets, jnp.int32), jnp.asarray(mask, jnp.float32)

    def full(h, w):
        logits = jnp.dot(h.reshape(-1, D), w.astype(jnp.bfloat16)).reshape(B, T, V)
        sums = lm_loss_sums(logits.astype(jnp.float32), targets, mask, Z)
        return sums["ce"] + sums["z"]

    ours = lambda h, w: _ours(h, w, targets, mask, 8, dtype=jnp.bfloat16)["loss"]
    np.testing.assert_allclose(float(ours(hb, wb)), float(full(hb, wb)), rtol=1e-4)
    got, want = jax.grad(ours, (0, 1))(hb, wb), jax.grad(full, (0, 1))(hb, wb)
    assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.float32
    for g, r in zip(got, want):
        g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
        np.testing.assert_allclose(g, r, rtol=0, atol=2e-2 * np.max(np.abs(r)))


def test_unrolled_equals_looped_and_has_no_loop():
    h, w, targets, mask = (jnp.asarray(x, jnp.float32) for x in _inputs(4))
    targets = targets.astype(jnp.int32)

    def grads(unroll):
        fn = jax.jit(jax.grad(lambda h, w: _ours(h, w, targets, mask, 8, unroll=unroll)["loss"],
                              (0, 1)))
        return fn(h, w), fn.lower(h, w).compile().as_text()

    (looped, text_l), (unrolled, text_u) = grads(False), grads(True)
    assert " while(" in text_l and " while(" not in text_u
    for a, b in zip(looped, unrolled):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_memory_holds_one_chunk_of_logits():
    """XLA's temporaries for the gradient at V = 8192, T = 2048: full logits need several
    [T, V] float32 arrays (64 MiB each), chunks of 128 positions a few [128, V] ones."""
    t, d, v = 2048, 64, 8192
    h = jax.ShapeDtypeStruct((1, t, d), jnp.float32)
    w = jax.ShapeDtypeStruct((d, v), jnp.float32)
    targets = jnp.zeros((1, t), jnp.int32)
    mask = jnp.ones((1, t), jnp.float32)

    def full(h, w):
        sums = lm_loss_sums(jnp.dot(h, w), targets, mask, Z)
        return sums["ce"] + sums["z"]

    def chunked(h, w):
        return lm_head_loss_sums(h, w, targets, mask, compute_dtype=jnp.float32,
                                 z_loss_weight=Z, chunk_size=128)["loss"]

    temp = {name: jax.jit(jax.grad(fn, (0, 1))).lower(h, w).compile().memory_analysis()
            .temp_size_in_bytes for name, fn in (("full", full), ("chunked", chunked))}
    logits = t * v * 4
    assert temp["full"] >= 2 * logits, temp
    assert temp["chunked"] < logits / 4, temp


@pytest.mark.parametrize("tied", [False, True])
def test_train_step_chunked_equals_full_logits(tied):
    """The train step's loss, metrics and every parameter's gradient with the loss in strided
    chunks of 8 positions (T = 24: 3 chunks; tied and untied heads) equal full logits'."""
    rng = np.random.default_rng(5)
    tokens = jnp.asarray(rng.integers(1, 256, (1, 2, 24)), jnp.int32)
    seg = jnp.asarray(np.repeat([[[1] * 10 + [2] * 11 + [0] * 3]], 2, axis=1), jnp.int32)
    batch = {"tokens": tokens, "segment_ids": seg}
    record = _recording_optimizer()
    out = {}
    with jax.default_matmul_precision("highest"):
        for method in ("full", "chunked"):
            cfg = _tiny().replace(tie_word_embeddings=tied, loss_method=method,
                                  loss_chunk_size=8)
            step = jit_train_step(make_train_step(model_template(cfg), record,
                                                  z_loss_weight=1e-3))
            state, metrics = step(init_train_state(cfg, record, seed=0), batch)
            out[method] = (jax.tree.map(np.asarray, state.opt_state),
                           {k: float(v) for k, v in metrics.items()})
    (g_full, m_full), (g_chunk, m_chunk) = out["full"], out["chunked"]
    for key in ("loss", "ce", "z_loss", "grad_norm", "tokens"):
        np.testing.assert_allclose(m_chunk[key], m_full[key], rtol=2e-6, err_msg=key)
    leaves = jax.tree_util.tree_leaves_with_path(g_full)
    for (path, a), b in zip(leaves, jax.tree.leaves(g_chunk)):
        assert np.max(np.abs(a)) > 0, path
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.max(np.abs(a)),
                                   err_msg=jax.tree_util.keystr(path))


def test_auto_chunks_only_beyond_one_chunk():
    assert resolve_loss("auto", 1024, 1024) == "full"
    assert resolve_loss("auto", 1025, 1024) == "chunked"
    assert resolve_loss("full", 1 << 20, 1024) == "full"
    with pytest.raises(ValueError, match="loss_method"):
        _tiny().replace(loss_method="fused")
    with pytest.raises(ValueError, match="loss_chunk_size"):
        _tiny().replace(loss_chunk_size=0)


@pytest.mark.parametrize("change,match", [
    (dict(hidden=jnp.zeros((2, 3))), "hidden must be"),
    (dict(head=jnp.zeros((5, 7))), "head must be"),
    (dict(targets=jnp.zeros((2, 4), jnp.int32)), "targets must be"),
    (dict(mask=jnp.zeros((3,))), "mask must be"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(z_loss_weight=-1.0), "z_loss_weight"),
])
def test_bad_arguments_name_the_culprit(change, match):
    args = dict(hidden=jnp.zeros((2, 3, 4)), head=jnp.zeros((4, 7)),
                targets=jnp.zeros((2, 3), jnp.int32), mask=jnp.ones((2, 3)),
                compute_dtype=jnp.float32, chunk_size=2, z_loss_weight=0.0)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        lm_head_loss_sums(args.pop("hidden"), args.pop("head"), args.pop("targets"),
                          args.pop("mask"), **args)


# --------------------------------------------------------------------- 8 simulated devices
@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> dict:
    from host_devices import run_child

    return run_child(__file__, tmp_path_factory.mktemp("lm_head_loss") / "result.json", 8)


def test_sharded_gradient_is_summed_across_devices_once(sharded):
    """On fsdp=8 and on fsdp=2 x tensor=2 x context=2, the chunk loop exchanges no [D, V]
    gradient: only the tensor split's per-position statistics and hidden-state gradients (the
    ones full logits exchange too); summing the kernel's gradient over devices inside the loop
    (groups 1, 1 on fsdp=8) would all-reduce all of it every chunk. Values and gradients equal
    one device's."""
    d_v = sharded["d_v"]
    for name, case in sharded["cases"].items():
        assert all(size < d_v // 2 for size in case["loop_collectives"]), (name, case)
        np.testing.assert_allclose(case["loss"], sharded["loss"], rtol=1e-6, err_msg=name)
        for got, want in zip(case["grads"], sharded["grads"]):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.max(np.abs(want)),
                                       err_msg=name)
    assert max(sharded["cases"]["fsdp8"]["loop_collectives"], default=0) == 1  # ce, z sums
    assert max(sharded["ungrouped_loop_collectives"]) == d_v


def _loop_collectives(text: str) -> list[int]:
    """Element counts of the arrays that collectives exchange inside the compiled program's
    loop bodies (a combined collective's tuple counted array by array)."""
    import re

    ops = re.compile(r"^\s*%\S+ = (.*?) (?:all-reduce|reduce-scatter|all-gather|all-to-all|"
                     r"collective-permute)(?:-start)?\(", re.MULTILINE)
    sizes = []
    for comp in re.split(r"\n(?=\S.*\{\n)", text):
        if comp.startswith("ENTRY"):
            continue
        for types in ops.findall(comp):
            for dims in re.findall(r"\w+\[([\d,]*)\]", types):
                sizes.append(int(np.prod([int(d) for d in dims.split(",") if d])))
    return sizes


def _child(out: str) -> None:
    import json

    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    jax.config.update("jax_default_matmul_precision", "highest")
    b, t, d, v = 8, 64, 32, 256
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)) * 0.3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
    mask = jnp.asarray(rng.random((b, t)) > 0.2, jnp.float32)

    def loss(h, w, groups=(1, 1)):
        return lm_head_loss_sums(h, w, targets, mask, compute_dtype=jnp.float32,
                                 z_loss_weight=Z, chunk_size=16, row_groups=groups[0],
                                 position_groups=groups[1])["loss"]

    value_and_grad = lambda fn: jax.value_and_grad(fn, (0, 1))
    one, grads = value_and_grad(loss)(h, w)
    result = {"d_v": d * v, "loss": float(one), "grads": [np.asarray(g).tolist() for g in grads],
              "cases": {}}
    setups = {"fsdp8": ((8,), ("fsdp",), P("fsdp"), P("fsdp", None), (8, 1)),
              "fsdp2_tensor2_context2": ((2, 2, 2), ("fsdp", "tensor", "context"),
                                         P("fsdp", "context"), P("fsdp", "tensor"), (2, 2))}
    for name, (shape, axes, h_spec, w_spec, groups) in setups.items():
        mesh = jax.make_mesh(shape, axes)
        fn = jax.jit(value_and_grad(lambda h, w, g=groups: loss(h, w, g)),
                     in_shardings=(NamedSharding(mesh, h_spec), NamedSharding(mesh, w_spec)))
        value, (d_h, d_w) = fn(h, w)
        result["cases"][name] = {
            "loss": float(value), "grads": [np.asarray(d_h).tolist(), np.asarray(d_w).tolist()],
            "loop_collectives": _loop_collectives(fn.lower(h, w).compile().as_text())}
        if name == "fsdp8":
            ungrouped = jax.jit(value_and_grad(loss), in_shardings=(
                NamedSharding(mesh, h_spec), NamedSharding(mesh, w_spec)))
            result["ungrouped_loop_collectives"] = _loop_collectives(
                ungrouped.lower(h, w).compile().as_text())
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    import sys

    _child(sys.argv[1])
