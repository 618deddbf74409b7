"""A bf16 model's compiled programs hold no float32 copy of its weights, nor a second copy of
the stacked ones, on the CPU (XLA's own memory analysis of each compiled program).

XLA:CPU computes a bf16 dot with a bf16 result, a single-row product, and any slice or gather
of a bf16 array in float32, converting whole operands; inside a loop it hoists the conversion
of a loop-invariant weight out of the loop. Before the fixes, the forward's temporaries were
2.0-2.5x the stack's bf16 weights here (every stacked weight in float32) and the decode loop's
2.0x. The programs below are those ``HybridLM.__call__`` and ``generate`` run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hf_models import assert_close
from hybrid_jax import HybridLM, apply, generate, split
from hybrid_jax.config import ModelConfig, hybrid_layer_types
from hybrid_jax.inference.generate import decode, prefill
from hybrid_jax.model.cache import init_cache

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's memory")

BLOCKS = 4  # one block's weights are a quarter of the stack's


def _config(**overrides) -> ModelConfig:
    """Weights that dwarf the activations of a few tokens: 16 layers, hidden 256."""
    kw = dict(vocab_size=512, hidden_size=256, intermediate_size=768,
              num_hidden_layers=4 * BLOCKS, layer_types=hybrid_layer_types(4 * BLOCKS),
              num_attention_heads=4, num_key_value_heads=2, linear_num_key_heads=2,
              linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=64,
              dtype="bfloat16", param_dtype="bfloat16", gdn_chunk_size=8,
              pad_token_id=None, eos_token_id=None)
    kw.update(overrides)
    return ModelConfig(**kw)


def _abstract(cfg: ModelConfig):
    model = nnx.eval_shape(lambda: HybridLM(cfg, rngs=nnx.Rngs(0)))
    graphdef, params = split(model)
    stack = nnx.state(model.stack.blocks)
    stack_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(stack))
    views = tuple(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), stack)
                  for _ in range(BLOCKS))
    return graphdef, params, stack_bytes, views


def _temp(compiled) -> int:
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("tied", [False, True])
def test_forward_holds_one_block_of_weights_at_most(scan_layers, tied):
    cfg = _config(scan_layers=scan_layers, tie_word_embeddings=tied)
    graphdef, params, stack_bytes, _ = _abstract(cfg)
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    temp = _temp(jax.jit(apply, static_argnums=0).lower(graphdef, params, ids).compile())
    # One block's slice (a quarter of the stack) and the activations; the stack in float32 would
    # be 2.0, and the tied head's table in float32 another 0.13 of the stack.
    assert temp < 0.35 * stack_bytes, (temp, stack_bytes)


# One row (the single-row products XLA:CPU widens) in CI; two rows, the same programs over a
# batch, in the slow run.
@pytest.mark.parametrize("batch", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_prefill_and_decode_over_block_views_copy_no_weights(batch):
    cfg = _config()
    graphdef, params, stack_bytes, views = _abstract(cfg)
    cache = jax.eval_shape(lambda: init_cache(cfg, batch, 16))
    ids = jax.ShapeDtypeStruct((batch, 8), jnp.int32)
    mask = jax.ShapeDtypeStruct((batch, 8), jnp.bool_)
    temp = _temp(prefill.lower(graphdef, params, ids, cache, mask, block_params=views).compile())
    assert temp < 0.05 * stack_bytes, ("prefill", temp, stack_bytes)
    logits = jax.ShapeDtypeStruct((batch, cfg.vocab_size), jnp.float32)
    for once in (False, True):  # block_params take precedence over slice_weights_once
        compiled = decode.lower(graphdef, params, cache, logits, jax.random.key(0),
                                max_new_tokens=4, slice_weights_once=once,
                                block_params=views).compile()
        assert _temp(compiled) < 0.05 * stack_bytes, ("decode", once, _temp(compiled))


def test_decode_slicing_once_holds_one_bf16_copy():
    """Without views, slicing once before the loop is the documented second copy of the stack,
    in bf16: not float32 (2.0) and not per step on top of it."""
    cfg = _config()
    graphdef, params, stack_bytes, _ = _abstract(cfg)
    cache = jax.eval_shape(lambda: init_cache(cfg, 1, 16))
    logits = jax.ShapeDtypeStruct((1, cfg.vocab_size), jnp.float32)
    compiled = decode.lower(graphdef, params, cache, logits, jax.random.key(0),
                            max_new_tokens=4, slice_weights_once=True).compile()
    assert _temp(compiled) < 1.15 * stack_bytes, (_temp(compiled), stack_bytes)


def test_block_views_share_the_stacked_arrays_memory_and_generate_the_same_tokens():
    cfg = _config(num_hidden_layers=8, layer_types=hybrid_layer_types(8), vocab_size=128)
    model = HybridLM(cfg, rngs=nnx.Rngs(0))
    views = model.stack.block_views()
    assert views is not None and len(views) == 2
    stacked = jax.tree.leaves(nnx.state(model.stack.blocks))
    for j, view in enumerate(views):
        for a, v in zip(stacked, jax.tree.leaves(view)):
            np.testing.assert_array_equal(np.asarray(v), np.asarray(a[j]))
            row = a.nbytes // a.shape[0]
            if row % 64 == 0:  # aligned rows are aliased, not copied
                assert v.unsafe_buffer_pointer() == a.unsafe_buffer_pointer() + j * row

    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9))
    through_views = generate(model, ids, 6)  # the default on the CPU: block views
    sliced_once = generate(model, ids, 6, slice_weights_once=True)
    sliced_per_step = generate(model, ids, 6, slice_weights_once=False)
    np.testing.assert_array_equal(through_views, sliced_once)
    np.testing.assert_array_equal(through_views, sliced_per_step)


def test_block_views_are_none_for_arrays_they_cannot_view():
    cfg = _config(num_hidden_layers=4, layer_types=hybrid_layer_types(4))
    abstract = nnx.eval_shape(lambda: HybridLM(cfg, rngs=nnx.Rngs(0)))
    assert abstract.stack.block_views() is None  # shapes only: nothing to view
    if len(jax.devices()) > 1:  # a stack sharded over two CPU devices: no single host buffer
        model = HybridLM(cfg, rngs=nnx.Rngs(0))
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",))
        shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
        state = nnx.state(model.stack.blocks)
        nnx.update(model.stack.blocks, jax.tree.map(lambda a: jax.device_put(a, shard), state))
        assert model.stack.block_views() is None


# remat "full" in CI: the same loop with each block checkpointed in it; without remat, the
# slow run.
@pytest.mark.parametrize("remat", [pytest.param("none", marks=pytest.mark.slow), "full"])
def test_the_loop_over_blocks_computes_what_the_scan_does(remat, monkeypatch):
    """The path 16-bit weights take on the CPU (a loop slicing block j once its input is ready),
    forced on a float32 model, gives the scan's logits and parameter gradients."""
    cfg = _config(dtype="float32", param_dtype="float32", num_hidden_layers=8,
                  layer_types=hybrid_layer_types(8), vocab_size=128, remat=remat)
    model = HybridLM(cfg, rngs=nnx.Rngs(1))
    graphdef, params = split(model)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 12)))

    def value_and_grad():
        loss = lambda p: jnp.mean(jax.nn.log_softmax(apply(graphdef, p, ids))[..., 0])
        with jax.default_matmul_precision("highest"):
            return jax.jit(jax.value_and_grad(loss))(params)

    from hybrid_jax.model import widening

    scanned = value_and_grad()
    monkeypatch.setattr(widening, "has_16bit_floats", lambda tree: True)
    looped = value_and_grad()
    np.testing.assert_allclose(looped[0], scanned[0], rtol=1e-6)
    # float32 rounding apart (the loop sums each block's gradient into the stack; the scan
    # stacks them): a wrong block's weights would be off by the gradients' own size.
    for a, b in zip(jax.tree.leaves(looped[1]), jax.tree.leaves(scanned[1])):
        assert_close(a, np.asarray(b), rtol=1e-5)


def test_aligned_host_buffers_become_device_arrays_in_place():
    """from_hf reads each parameter into such a buffer: on the CPU the device array is the
    buffer itself, so loading holds no second copy of any parameter."""
    from hybrid_jax.model.host_views import aligned_empty

    for shape, dtype in (((3, 100), np.float32), ((7, 33, 5), jnp.bfloat16), ((0,), np.float32)):
        a = aligned_empty(shape, dtype)
        assert a.shape == shape and a.dtype == np.dtype(dtype)
        a[...] = np.arange(a.size).reshape(shape)
        x = jax.device_put(a, may_alias=True)
        np.testing.assert_array_equal(np.asarray(x), a)
        if a.size:  # (an empty array has no data to align or alias)
            assert a.ctypes.data % 64 == 0 and x.unsafe_buffer_pointer() == a.ctypes.data


def test_accelerator_programs_keep_the_stack_and_products_as_they_were():
    """The CPU forms are chosen when a program is lowered: the same bf16 forward lowered for a
    TPU or a GPU (as an AOT compile on this host does) scans the stack with no barrier, and its
    products give bf16 results; lowered for the CPU it loops with the barrier."""
    cfg = _config(num_hidden_layers=8, layer_types=hybrid_layer_types(8))
    graphdef, params, _, _ = _abstract(cfg)
    traced = jax.jit(apply, static_argnums=0).trace(graphdef, params,
                                                     jax.ShapeDtypeStruct((1, 8), jnp.int32))
    text = {p: traced.lower(lowering_platforms=(p,)).as_text() for p in ("cpu", "tpu", "cuda")}
    assert "optimization_barrier" in text["cpu"]
    for platform in ("tpu", "cuda"):
        assert "optimization_barrier" not in text[platform], platform
        assert "xbf16>) -> tensor<8x768xbf16>" in text[platform], platform  # an MLP product
    assert "xbf16>) -> tensor<8x768xf32>" in text["cpu"]
