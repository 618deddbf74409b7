"""HybridLM against transformers' OlmoHybridForCausalLM: same weights, same logits (float32)."""

from __future__ import annotations

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file
from transformers import OlmoHybridForCausalLM

from hf_models import NOPE, assert_close, hf_logits, make_hf_model, random_ids
from hybrid_jax import HybridLM, ModelConfig, apply, olmo_hybrid_tiny, split
from hybrid_jax.convert import from_hf

T = 40  # with gdn_chunk_size=16: three chunks, the last one partial


def _logits(model: HybridLM, ids, **kw) -> jax.Array:
    """Logits through the jitted functional form (one compile beats eager op-by-op on CPU)."""
    graphdef, params = split(model)
    return jax.jit(apply)(graphdef, params, jnp.asarray(ids), **kw)


CASES = {
    # RoPE, GQA attention, two value heads per key head, eigenvalues in [-1, 1], 2 blocks scanned.
    "rope_gqa_grouped_v_negeig": dict(num_hidden_layers=8),
    # NoPE (the released long-context model), MHA, one value head per key head, beta in (0, 1).
    "nope_mha_no_negeig": dict(
        rope_parameters=NOPE, num_key_value_heads=4, linear_num_value_heads=2,
        linear_allow_neg_eigval=False),
    # Attention first and an irregular pattern: period 5 = depth, so the stack is unrolled.
    "irregular_attention_first": dict(
        num_hidden_layers=5,
        layer_types=["full_attention", "linear_attention", "linear_attention", "full_attention",
                     "linear_attention"]),
    # Tied embeddings (no lm_head.weight on disk), period 2 scanned twice.
    "tied_period2": dict(
        tie_word_embeddings=True,
        layer_types=["linear_attention", "full_attention"] * 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path):
    hf = make_hf_model(seed=len(case), **CASES[case])
    hf.save_pretrained(tmp_path)
    ids = random_ids(1, 2, T)
    model = from_hf(tmp_path, gdn_chunk_size=16)
    if case == "tied_period2":
        assert model.lm_head is None
        with open(tmp_path / "config.json") as f:
            assert json.load(f)["tie_word_embeddings"] is True
    assert_close(_logits(model, ids), hf_logits(hf, ids))


def test_explicit_positions_match_transformers_position_ids(tmp_path):
    """RoPE at arbitrary positions (offset, strided) equals transformers given the same position_ids."""
    hf = make_hf_model(seed=5, num_hidden_layers=4)
    hf.save_pretrained(tmp_path)
    ids = random_ids(3, 2, T)
    positions = np.stack([1000 + np.arange(T), 3 * np.arange(T) + 5]).astype(np.int32)
    model = from_hf(tmp_path, gdn_chunk_size=16)
    ours = _logits(model, ids, positions=jnp.asarray(positions))
    assert_close(ours, hf_logits(hf, ids, position_ids=positions))
    # And the positions matter: the default 0..T-1 gives different logits.
    assert not np.allclose(np.asarray(ours), np.asarray(_logits(model, ids)), atol=1e-3)


@pytest.mark.parametrize("method", ["recurrent", "assoc_scan"])
def test_other_gdn_methods_match_transformers(method, tmp_path):
    hf = make_hf_model(seed=3, num_hidden_layers=4)
    hf.save_pretrained(tmp_path)
    ids = random_ids(2, 1, T)
    model = from_hf(tmp_path, gdn_method=method, gdn_chunk_size=16)
    assert_close(_logits(model, ids), hf_logits(hf, ids))


@pytest.mark.parametrize("attention", [dict(attention_method="dense"),
                                       dict(attention_method="blockwise", attention_block_size=16)])
def test_attention_methods_match_transformers(attention, tmp_path):
    """The dense attention, and the blockwise one in blocks of 16 (T = 40: three blocks, the
    last padded), give transformers' logits."""
    hf = make_hf_model(seed=6, num_hidden_layers=4)
    hf.save_pretrained(tmp_path)
    ids = random_ids(4, 2, T)
    model = from_hf(tmp_path, gdn_chunk_size=16, **attention)
    assert_close(_logits(model, ids), hf_logits(hf, ids))


def test_sharded_checkpoint(tmp_path):
    hf = make_hf_model(seed=4)
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    ids = random_ids(3, 2, 24)
    assert_close(_logits(from_hf(tmp_path), ids), hf_logits(hf, ids))


def test_state_dict_names_fused_conv(tmp_path):
    """A module state_dict (fused conv1d, input_layernorm/post_attention_layernorm) loads too."""
    hf = make_hf_model(seed=5)
    state = {k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("linear_attn.conv1d.weight") for k in state)
    assert any(k.endswith("input_layernorm.weight") for k in state)
    save_file(state, str(tmp_path / "model.safetensors"))
    hf.config.to_json_file(str(tmp_path / "config.json"))
    ids = random_ids(4, 2, 24)
    assert_close(_logits(from_hf(tmp_path), ids), hf_logits(hf, ids))


def test_bf16_checkpoint_loads_as_bf16(tmp_path):
    make_hf_model(seed=6).to(torch.bfloat16).save_pretrained(tmp_path)
    model = from_hf(tmp_path)
    assert model.config.param_dtype == "bfloat16" and model.config.dtype == "bfloat16"
    for leaf in jax.tree.leaves(nnx.state(model)):
        assert leaf.dtype == jnp.bfloat16
    # Reload in torch (not .to(bfloat16), which would also round RoPE's inv_freq buffer).
    hf_bf16 = OlmoHybridForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    hf_f32 = OlmoHybridForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    # Bit-exact weights (the embeddings and a transposed, stacked kernel).
    embed = hf_bf16.model.embed_tokens.weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(model.embed.embedding[...], np.float32), embed)
    q_proj = hf_bf16.model.layers[1].linear_attn.q_proj.weight.detach().float().numpy().T
    ours = model.stack.blocks.layers[1].gdn.q_proj.kernel[...][0]
    np.testing.assert_array_equal(np.asarray(ours, np.float32), q_proj)
    # bf16 logits: no further from the float32 logits than transformers' own bf16 run is (this
    # perturbed random model is sensitive: both are several percent off).
    ids = random_ids(5, 1, 24)
    ref = hf_logits(hf_f32, ids)
    rel = lambda x: np.linalg.norm(np.asarray(x, np.float32) - ref) / np.linalg.norm(ref)
    assert rel(_logits(model, ids)) <= 1.5 * rel(hf_logits(hf_bf16, ids)) + 1e-3
    # dtype= overrides the checkpoint's dtype, and float32 then matches transformers in float32.
    model_f32 = from_hf(tmp_path, dtype="float32")
    assert model_f32.embed.embedding[...].dtype == jnp.float32
    assert_close(_logits(model_f32, ids), ref)



def test_fp16_checkpoint_matches_transformers(tmp_path):
    """float16 compute runs under jit on every backend (jax.nn.dot_product_attention's XLA path
    asks for the F16_F16_F32 dot algorithm, which XLA:CPU rejects) and is as close to float32 as
    transformers' own float16 run."""
    make_hf_model(seed=7).to(torch.float16).save_pretrained(tmp_path)
    model = from_hf(tmp_path)
    assert model.config.dtype == "float16"
    hf_f16 = OlmoHybridForCausalLM.from_pretrained(tmp_path, dtype=torch.float16).eval()
    hf_f32 = OlmoHybridForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = random_ids(10, 2, 24)
    ref = hf_logits(hf_f32, ids)
    rel = lambda x: np.linalg.norm(np.asarray(x, np.float32) - ref) / np.linalg.norm(ref)
    assert rel(_logits(model, ids)) <= 1.5 * rel(hf_logits(hf_f16, ids)) + 1e-3

# ---------------------------------------------------------------------------- stack execution
# JAX-only checks run on a micro model (compiles dominate on CPU): period 2 (GDN, attention), two
# scanned blocks, chunk size 8 so that sequences span several chunks.
def _micro(**overrides) -> ModelConfig:
    kwargs = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        layer_types=("linear_attention", "full_attention") * 2, num_attention_heads=2,
        num_key_value_heads=1, linear_num_key_heads=1, linear_num_value_heads=2,
        linear_key_head_dim=8, linear_value_head_dim=16, gdn_chunk_size=8)
    kwargs.update(overrides)
    return olmo_hybrid_tiny(**kwargs)


def _with_config(model: HybridLM, **changes) -> HybridLM:
    """The same parameters under a config with execution options changed."""
    graphdef, params = split(model)
    other = nnx.eval_shape(lambda: HybridLM(model.config.replace(**changes), rngs=nnx.Rngs(0)))
    other_graphdef, other_params = split(other)
    chex.assert_trees_all_equal_shapes_and_dtypes(params, other_params)
    return nnx.merge(other_graphdef, params)


def test_scanned_and_unrolled_stacks_agree():
    model = HybridLM(_micro(), rngs=nnx.Rngs(0))
    assert model.stack.scanned and model.stack.num_blocks == 2
    unrolled = _with_config(model, scan_layers=False)
    assert not unrolled.stack.scanned
    ids = jnp.asarray(random_ids(6, 2, 20, vocab=64))
    np.testing.assert_allclose(_logits(unrolled, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer_types", [("full_attention",) * 3, ("linear_attention",) * 3])
def test_pure_attention_and_pure_gdn_stacks(layer_types):
    model = HybridLM(_micro(num_hidden_layers=3, layer_types=layer_types), rngs=nnx.Rngs(1))
    assert model.config.layer_period == 1 and model.stack.num_blocks == 3
    ids = jnp.asarray(random_ids(7, 1, 12, vocab=64))
    logits = _logits(model, ids)
    chex.assert_shape(logits, (1, 12, 64))
    chex.assert_tree_all_finite(logits)
    np.testing.assert_allclose(_logits(_with_config(model, scan_layers=False), ids), logits,
                               rtol=1e-5, atol=1e-5)


def _assert_trees_close_per_leaf(actual, expected, rtol: float) -> None:
    """Each leaf within rtol of that leaf's largest magnitude."""
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.all(np.isfinite(a)), jax.tree_util.keystr(path)
        err, scale = np.max(np.abs(a - b)), np.max(np.abs(b))
        assert err <= rtol * scale + 1e-12, f"{jax.tree_util.keystr(path)}: {err:.2e} vs {scale:.2e}"


def test_remat_same_logits_and_grads():
    # The recurrent rule keeps these compiles cheap; remat wraps whole blocks, whatever the rule.
    model = HybridLM(_micro(gdn_method="recurrent"), rngs=nnx.Rngs(2))
    graphdef, params = split(model)
    ids = jnp.asarray(random_ids(8, 2, 13, vocab=64))

    def loss(gd, p):
        logits = apply(gd, p, ids[:, :-1])
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1)
        return jnp.mean(nll), logits

    grad_fn = jax.jit(jax.value_and_grad(loss, argnums=1, has_aux=True), static_argnums=0)
    (value, logits), grads = grad_fn(graphdef, params)
    for remat in ("full", "layers", "dots", "dots_no_batch"):
        remat_graphdef, _ = split(_with_config(model, remat=remat))
        assert "remat" in str(jax.make_jaxpr(lambda p: loss(remat_graphdef, p))(params))
        (r_value, r_logits), r_grads = grad_fn(remat_graphdef, params)
        np.testing.assert_allclose(r_logits, logits, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(r_value, value, rtol=1e-6)
        _assert_trees_close_per_leaf(r_grads, grads, rtol=1e-5)


@pytest.mark.parametrize("rope_theta", [10000.0, None])
def test_packed_documents_match_separate_runs(rope_theta):
    """Two documents packed in one row give each document's own logits: attention, convs and the
    GDN state must all reset at the boundary (inside a chunk here), and RoPE positions restart."""
    # Attention in blocks of 8: the boundary (12) falls inside the second of three.
    model = HybridLM(_micro(rope_theta=rope_theta, attention_block_size=8), rngs=nnx.Rngs(3))
    docs = jnp.asarray(random_ids(9, 2, 12, vocab=64))  # two documents, run as a batch
    packed = docs.reshape(1, 24)
    segment_ids = jnp.repeat(jnp.array([[1, 2]]), 12, axis=1)
    alone = _logits(model, docs)
    logits = _logits(model, packed, segment_ids=segment_ids)
    np.testing.assert_allclose(logits[0, :12], alone[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[0, 12:], alone[1], rtol=1e-5, atol=1e-5)
    # As one segment, the second document does see the first.
    one_segment = _logits(model, packed, segment_ids=jnp.ones_like(segment_ids))
    assert not np.allclose(one_segment[0, 12:], alone[1], atol=1e-3)
