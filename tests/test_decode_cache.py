"""The decode cache: prefill (at once, in pieces, left-padded) then one-token decode steps give
the logits of a full forward over the same tokens, and the cache holds the same contents
whichever way the tokens arrived.

References: ``HybridLM.__call__`` (the full, uncached forward: chunked GDN, causal attention) and,
where a reference would need a compile per row length, transformers' forward on torch. The mesh
checks run in a subprocess with 8 simulated CPU devices.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from hf_models import assert_close, hf_logits, make_hf_model, random_ids
from host_devices import run_child
from hybrid_jax import HybridLM, ModelConfig, init_cache, olmo_hybrid_tiny, split
from hybrid_jax.config import ATTENTION, GDN, hybrid_layer_types
from hybrid_jax.convert import from_hf
from hybrid_jax.inference import (
    DecodeCache,
    GDNCache,
    KVCache,
    cache_partition_specs,
    cache_shardings,
)


class Runner:
    """A model's full forward and ``extend``, each jitted once per shape, always with float32
    matmuls (module-scoped fixtures run outside conftest's function-scoped precision context,
    and a different precision would also be a different compile)."""

    def __init__(self, model: HybridLM) -> None:
        self.model = model
        self.config = model.config
        graphdef, self.params = split(model)
        self._full = jax.jit(lambda p, ids: nnx.merge(graphdef, p)(ids))
        self._extend = jax.jit(
            lambda p, ids, cache, mask: nnx.merge(graphdef, p).extend(ids, cache, mask))

    def full(self, ids) -> np.ndarray:
        with jax.default_matmul_precision("highest"):
            return np.asarray(self._full(self.params, jnp.asarray(ids, jnp.int32)))

    def extend(self, ids, cache: DecodeCache, mask=None) -> tuple[np.ndarray, DecodeCache]:
        ids = jnp.asarray(ids, jnp.int32)
        mask = jnp.ones(ids.shape, bool) if mask is None else jnp.asarray(mask, bool)
        with jax.default_matmul_precision("highest"):
            logits, cache = self._extend(self.params, ids, cache, mask)
        return np.asarray(logits), cache

    def prefill_decode(self, ids, prefill: int, max_length: int) -> tuple[np.ndarray, DecodeCache]:
        """Logits [B, T, V]: ``prefill`` tokens at once, then the rest one at a time."""
        cache = init_cache(self.config, ids.shape[0], max_length)
        logits, cache = self.extend(ids[:, :prefill], cache)
        out = [logits]
        for t in range(prefill, ids.shape[1]):
            logits, cache = self.extend(ids[:, t:t + 1], cache)
            out.append(logits)
        return np.concatenate(out, axis=1), cache


def _assert_close_leaf(actual, expected, rtol: float, what: str) -> None:
    a, b = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    assert np.all(np.isfinite(a)), what
    err, scale = float(np.max(np.abs(a - b), initial=0.0)), float(np.max(np.abs(b), initial=0.0))
    assert err <= rtol * scale + 1e-30, f"{what}: max abs error {err:.2e}, scale {scale:.2e}"


def assert_caches_match(got: DecodeCache, got_row: int, want: DecodeCache, want_row: int,
                        rtol: float = 1e-5) -> None:
    """Row ``got_row`` of ``got`` holds what row ``want_row`` of ``want`` does: the same length,
    the same keys/values in the valid slots, conv windows and GDN state."""
    n = int(want.lengths[want_row])
    assert int(got.lengths[got_row]) == n
    assert len(got.layers) == len(want.layers)
    for i, (g, w) in enumerate(zip(got.layers, want.layers)):
        assert type(g) is type(w), i
        if isinstance(w, KVCache):
            for name in ("k", "v"):
                _assert_close_leaf(getattr(g, name)[got_row, :, :n],
                                   getattr(w, name)[want_row, :, :n], rtol, f"layer {i} {name}")
        else:
            for name in ("conv_q", "conv_k", "conv_v", "state"):
                _assert_close_leaf(getattr(g, name)[got_row], getattr(w, name)[want_row],
                                   rtol, f"layer {i} {name}")


# ----------------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> tuple:
    """A small random transformers model: (GDN, RoPE GQA attention) x 2, scanned as 2 blocks."""
    path = tmp_path_factory.mktemp("decode_cache_hf")
    hf = make_hf_model(seed=11, layer_types=[GDN, ATTENTION] * 2)
    hf.save_pretrained(path)
    return hf, path


@pytest.fixture(scope="module")
def hybrid(hf_dir) -> Runner:
    runner = Runner(from_hf(hf_dir[1], gdn_chunk_size=16))
    assert runner.model.stack.scanned and runner.model.stack.num_blocks == 2
    return runner


def _micro(layer_types: tuple[str, ...]) -> ModelConfig:
    return olmo_hybrid_tiny(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=len(layer_types),
        layer_types=layer_types, num_attention_heads=4, num_key_value_heads=2,
        linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=8,
        linear_value_head_dim=12, gdn_chunk_size=8, initializer_range=0.2)


# Every hybrid-model test uses batch 3, MAX cache slots (room for the longest row plus a 13-token
# piece) and the shapes [3, 34] (prefill), [3, 13] and [3, 20] (pieces), [3, 1] (decode) and
# [3, 38] (full forward): one compile each.
B, T0, MAX = 3, 34, 48
IDS = random_ids(1, B, T0 + 4)


@pytest.fixture(scope="module")
def token_by_token(hybrid) -> dict:
    """IDS[:, :T0] fed 13 at once then one token at a time: logits [B, T0, V] and the cache
    after each number of tokens n >= 13."""
    cache = init_cache(hybrid.config, B, MAX)
    logits, cache = hybrid.extend(IDS[:, :13], cache)
    out, caches = [logits], {13: cache}
    for t in range(13, T0):
        logits, cache = hybrid.extend(IDS[:, t:t + 1], cache)
        out.append(logits)
        caches[t + 1] = cache
    return dict(logits=np.concatenate(out, axis=1), caches=caches)


# ----------------------------------------------------------------------------- prefill + decode
def test_prefill_then_decode_matches_full_forward(hybrid):
    cfg = hybrid.config
    assert GDN in cfg.layer_types and ATTENTION in cfg.layer_types and cfg.rope_theta
    logits, cache = hybrid.prefill_decode(IDS, prefill=T0, max_length=MAX)
    assert logits.shape == (B, T0 + 4, cfg.vocab_size) and logits.dtype == np.float32
    assert_close(logits, hybrid.full(IDS), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [T0 + 4] * B)


def test_prefill_in_pieces_equals_prefill_at_once(hybrid):
    ids = IDS[:, :T0]
    once_logits, once = hybrid.extend(ids, init_cache(hybrid.config, B, MAX))
    cache = init_cache(hybrid.config, B, MAX)
    pieces = []
    for lo, hi in ((0, 13), (13, 14), (14, T0)):  # across GDN chunk boundaries (chunk 16)
        logits, cache = hybrid.extend(ids[:, lo:hi], cache)
        pieces.append(logits)
    assert_close(np.concatenate(pieces, axis=1), once_logits, rtol=1e-5)
    for row in range(B):
        assert_caches_match(cache, row, once, row)
    # The slots past the prompt were never written.
    for layer in cache.layers:
        if isinstance(layer, KVCache):
            assert not np.any(np.asarray(layer.k)[:, :, T0:])
            assert not np.any(np.asarray(layer.v)[:, :, T0:])


def test_one_token_at_a_time_equals_prefill_at_once(hybrid, token_by_token):
    once_logits, once = hybrid.extend(IDS[:, :T0], init_cache(hybrid.config, B, MAX))
    assert_close(token_by_token["logits"], once_logits, rtol=1e-5)
    for row in range(B):
        assert_caches_match(token_by_token["caches"][T0], row, once, row)


@pytest.mark.parametrize("kind", [ATTENTION, GDN])
def test_pure_stacks_prefill_then_decode_match_full_forward(kind):
    runner = Runner(HybridLM(_micro((kind,) * 2), rngs=nnx.Rngs(3)))
    ids = random_ids(4, 2, 17, vocab=64)
    logits, cache = runner.prefill_decode(ids, prefill=13, max_length=20)
    assert_close(logits, runner.full(ids), rtol=1e-5)
    assert all(isinstance(layer, KVCache if kind == ATTENTION else GDNCache)
               for layer in cache.layers)
    assert cache.max_length == (20 if kind == ATTENTION else 0)


# ----------------------------------------------------------------------------- left padding
LENS = (T0, 21, 13)  # row r's prompt is IDS[r, :LENS[r]], left-padded to T0


@pytest.fixture(scope="module")
def padded(hybrid) -> dict:
    """The left-padded batch of the prompts IDS[r, :LENS[r]], prefilled at once."""
    ids = np.full((B, T0), 7, np.int32)  # the padding's ids must not matter
    mask = np.zeros((B, T0), bool)
    for row, n in enumerate(LENS):
        ids[row, T0 - n:] = IDS[row, :n]
        mask[row, T0 - n:] = True
    logits, cache = hybrid.extend(ids, init_cache(hybrid.config, B, MAX), mask)
    return dict(ids=ids, mask=mask, logits=logits, cache=cache)


@pytest.mark.parametrize("row", [1, 2])
def test_left_padded_row_equals_prompt_alone(padded, token_by_token, row):
    """Row ``row`` of the padded batch against its prompt fed alone, unpadded (token by token)."""
    n = LENS[row]
    # Same logits at the real positions: RoPE positions start at the row's first real token.
    assert_close(padded["logits"][row, T0 - n:], token_by_token["logits"][row, :n], rtol=1e-5)
    assert_caches_match(padded["cache"], row, token_by_token["caches"][n], row)
    # Padding is never written: the row's slots from its length on are still zero.
    for layer in padded["cache"].layers:
        if isinstance(layer, KVCache):
            assert not np.any(np.asarray(layer.k)[row, :, n:])


def test_left_padded_piece_continues_a_filled_cache_exactly(hybrid):
    """Padding in a later piece (a continued, left-padded batch) leaves the cache as it was: the
    conv windows run straight into each row's first real token and the GDN state passes
    through, so each row matches its continuation without padding."""
    _, cache = hybrid.extend(IDS[:, :6], init_cache(hybrid.config, B, MAX))
    want_logits, want = hybrid.extend(IDS[:, 6:10], cache)
    ids = np.concatenate([np.full((B, 2), 5, np.int32), IDS[:, 6:10]], axis=1)
    mask = np.concatenate([np.zeros((B, 2), bool), np.ones((B, 4), bool)], axis=1)
    got_logits, got = hybrid.extend(ids, cache, mask)
    for row in range(B):
        assert_close(got_logits[row, 2:], want_logits[row], rtol=1e-5)
        assert_caches_match(got, row, want, row)


def test_left_padding_ids_do_not_matter(hybrid, padded):
    ids = np.where(padded["mask"], padded["ids"], 3)
    logits, cache = hybrid.extend(ids, init_cache(hybrid.config, B, MAX), padded["mask"])
    np.testing.assert_allclose(logits[padded["mask"]], padded["logits"][padded["mask"]],
                               rtol=1e-6, atol=1e-6)
    for row in range(B):
        assert_caches_match(cache, row, padded["cache"], row, rtol=1e-6)


def test_rows_at_different_lengths_decode_at_their_own_positions(hybrid, hf_dir, padded):
    hf = hf_dir[0]
    np.testing.assert_array_equal(np.asarray(padded["cache"].lengths), LENS)
    steps = random_ids(6, B, 3)
    cache, out = padded["cache"], []
    for i in range(steps.shape[1]):
        logits, cache = hybrid.extend(steps[:, i:i + 1], cache)
        out.append(logits[:, 0])
    np.testing.assert_array_equal(np.asarray(cache.lengths), np.array(LENS) + steps.shape[1])
    out = np.stack(out, axis=1)  # [B, steps, V]
    for row, n in enumerate(LENS):
        # Each row's own sequence through transformers' uncached forward (positions 0..n+2).
        ref = hf_logits(hf, np.concatenate([IDS[row, :n], steps[row]])[None])[0]
        assert_close(out[row], ref[n:], rtol=3e-5)


def test_rows_at_different_lengths_continue_a_prefill_piece(hybrid, hf_dir, padded):
    """A multi-token piece (a second prompt turn) after rows of different lengths."""
    piece = random_ids(10, B, 13)
    logits, cache = hybrid.extend(piece, padded["cache"])
    np.testing.assert_array_equal(np.asarray(cache.lengths), np.array(LENS) + 13)
    for row, n in enumerate(LENS):
        ref = hf_logits(hf_dir[0], np.concatenate([IDS[row, :n], piece[row]])[None])[0]
        assert_close(logits[row], ref[n:], rtol=3e-5)


@pytest.mark.parametrize("method", ["recurrent", "assoc_scan"])
def test_other_gdn_methods_continue_from_the_cache(hf_dir, method):
    """Prefill pieces run the config's GDN method from the cached state (decode steps always run
    the recurrent step)."""
    runner = Runner(from_hf(hf_dir[1], gdn_method=method, gdn_chunk_size=16))
    cache = init_cache(runner.config, B, MAX)
    first, cache = runner.extend(IDS[:, :13], cache)
    second, cache = runner.extend(IDS[:, 13:T0], cache)
    assert_close(np.concatenate([first, second], axis=1), hf_logits(hf_dir[0], IDS[:, :T0]),
                 rtol=3e-5)


# ----------------------------------------------------------------------------- sizes
def _tiny8() -> ModelConfig:
    return olmo_hybrid_tiny()  # 8 layers, period 4: 6 GDN + 2 attention


def test_init_cache_shapes_and_dtypes():
    cfg = _tiny8().replace(dtype="bfloat16")
    b, s = 3, 50
    cache = init_cache(cfg, b, s)
    assert cache.batch_size == b and cache.max_length == s
    assert cache.lengths.shape == (b,) and cache.lengths.dtype == jnp.int32
    assert not np.any(np.asarray(cache.lengths))
    assert len(cache.layers) == cfg.num_hidden_layers
    w = cfg.linear_conv_kernel_dim - 1
    expected = 4 * b  # lengths
    for kind, layer in zip(cfg.layer_types, cache.layers):
        if kind == ATTENTION:
            assert isinstance(layer, KVCache)
            for x in (layer.k, layer.v):
                assert x.shape == (b, cfg.num_key_value_heads, s, cfg.head_dim)
                assert x.dtype == jnp.bfloat16
                expected += x.size * 2
        else:
            assert isinstance(layer, GDNCache)
            assert layer.conv_q.shape == (b, w, cfg.linear_key_dim)
            assert layer.conv_k.shape == (b, w, cfg.linear_key_dim)
            assert layer.conv_v.shape == (b, w, cfg.linear_value_dim)
            for x in (layer.conv_q, layer.conv_k, layer.conv_v):
                assert x.dtype == jnp.bfloat16
                expected += x.size * 2
            assert layer.state.shape == (b, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                                         cfg.linear_value_head_dim)
            assert layer.state.dtype == jnp.float32  # the state stays float32 in any compute dtype
            expected += layer.state.size * 4
    assert cache.nbytes == expected
    # Sizing without allocating gives the same answer.
    assert jax.eval_shape(lambda: init_cache(cfg, b, s)).nbytes == expected
    for bad in (dict(batch_size=0, max_length=4), dict(batch_size=2, max_length=0)):
        with pytest.raises(ValueError, match=next(iter(k for k, v in bad.items() if v == 0))):
            init_cache(cfg, **bad)


def test_hybrid_cache_is_about_a_quarter_of_attention_cache():
    hybrid_cfg = _tiny8()
    attn_cfg = hybrid_cfg.replace(layer_types=(ATTENTION,) * 8)
    assert hybrid_cfg.layer_types == hybrid_layer_types(8)
    b, s = 2, 65536
    hybrid = jax.eval_shape(lambda: init_cache(hybrid_cfg, b, s)).nbytes
    attn = jax.eval_shape(lambda: init_cache(attn_cfg, b, s)).nbytes
    # By hand: per attention layer 2 (k, v) * B * S * Hkv * Dh float32; per GDN layer three
    # windows of K-1 inputs and the [Hv, Dk, Dv] float32 state, whatever S.
    c = hybrid_cfg
    kv_layer = 2 * b * s * c.num_key_value_heads * c.head_dim * 4
    windows = (c.linear_conv_kernel_dim - 1) * (2 * c.linear_key_dim + c.linear_value_dim)
    state = c.linear_num_value_heads * c.linear_key_head_dim * c.linear_value_head_dim
    gdn_layer = b * (windows + state) * 4
    assert attn == 8 * kv_layer + 4 * b
    assert hybrid == 2 * kv_layer + 6 * gdn_layer + 4 * b
    assert 0.25 <= hybrid / attn < 0.26, hybrid / attn
    # The GDN part does not grow with the context.
    short = jax.eval_shape(lambda: init_cache(hybrid_cfg, b, 16)).nbytes
    assert hybrid - short == 2 * 2 * b * (s - 16) * c.num_key_value_heads * c.head_dim * 4


# ----------------------------------------------------------------------------- bfloat16
def test_bf16_decode_close_to_bf16_full_forward(hf_dir):
    runner = Runner(from_hf(hf_dir[1], dtype="bfloat16", gdn_chunk_size=16))
    assert runner.config.compute_dtype == jnp.bfloat16
    ids = random_ids(7, 2, 24)
    logits, cache = runner.prefill_decode(ids, prefill=20, max_length=24)
    for layer in cache.layers:
        for name, x in vars(layer).items():
            assert x.dtype == (jnp.float32 if name == "state" else jnp.bfloat16), name
    assert np.all(np.isfinite(logits))
    assert_close(logits, runner.full(ids), rtol=2e-2)


# ----------------------------------------------------------------------------- sharding specs
def test_a_cache_that_does_not_fit_is_named_before_tracing():
    cfg = _tiny8()
    model = HybridLM(cfg, rngs=nnx.Rngs(0))
    ids = jnp.zeros((2, 3), jnp.int32)
    cases = {
        "rows": (init_cache(cfg, 3, 8), r"lengths has shape \(3,\), expected \(2,\)"),
        "layers": (init_cache(cfg.replace(num_hidden_layers=4, layer_types=cfg.layer_types[:4]),
                              2, 8), r"4 layers, the model has 8"),
        "kind": (init_cache(cfg.replace(layer_types=("full_attention",) * 8), 2, 8),
                 r"layer 0 holds a KVCache, the model's layer 0 is linear_attention"),
        "heads": (init_cache(cfg.replace(num_key_value_heads=1, num_attention_heads=1), 2, 8),
                  r"layer 3 k has shape"),
    }
    for name, (cache, match) in cases.items():
        with pytest.raises(ValueError, match=match):
            model.extend(ids, cache)


def test_cache_partition_specs():
    cache = jax.eval_shape(lambda: init_cache(_tiny8(), 2, 8))
    specs = cache_partition_specs(cache)
    assert specs.lengths == PartitionSpec("data")
    for layer in specs.layers:
        if isinstance(layer, KVCache):
            assert layer.k == layer.v == PartitionSpec("data", "tensor", None, None)
        else:
            conv = PartitionSpec("data", None, "tensor")
            assert layer.conv_q == layer.conv_k == layer.conv_v == conv
            assert layer.state == PartitionSpec("data", "tensor", None, None)
    # Axes the mesh lacks are replicated.
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    shardings = cache_shardings(cache, mesh)
    assert shardings.layers[3].k.spec == PartitionSpec("data", None, None, None)
    assert shardings.layers[0].state.spec == PartitionSpec("data", None, None, None)
    none = cache_partition_specs(cache, batch_axis=None, head_axis=None)
    assert none.layers[3].k == PartitionSpec(None, None, None, None)


# ----------------------------------------------------------------------------- on a mesh
N_DEVICES = 8


def _child(out: Path) -> None:
    """Runs with 8 simulated CPU devices; writes its findings as JSON. References come from
    transformers (torch), which costs no compile here."""
    import torch

    from hybrid_jax import generate

    assert jax.device_count() == N_DEVICES, jax.devices()
    root = out.parent
    # MHA (4 kv heads) so that the 4-way tensor axis divides every cache's heads.
    hf = make_hf_model(seed=12, num_key_value_heads=4, layer_types=[GDN, ATTENTION] * 2)
    hf.save_pretrained(root / "hf")
    model = from_hf(root / "hf", gdn_chunk_size=16)
    cfg = model.config
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "tensor"))
    b, t, n = 4, 10, 5
    ids = random_ids(8, b, t)
    mask = np.ones((b, t), np.int32)
    mask[1, :3] = 0
    mask[3, :6] = 0
    shardings = cache_shardings(jax.eval_shape(lambda: init_cache(cfg, b, t + n)), mesh)
    result: dict = {}

    cache = jax.device_put(init_cache(cfg, b, t + n), shardings)
    result["placed"] = [
        ([None if a is None else str(a) for a in x.sharding.spec], x.sharding == s,
         len(x.sharding.device_set), x.addressable_shards[0].data.shape, x.shape)
        for x, s in zip(jax.tree.leaves(cache), jax.tree.leaves(shardings))]

    # Jitted extend on the sharded cache: a left-padded prefill, then one decode step.
    runner = Runner(model)
    logits, cache = runner.extend(ids, cache, mask)
    step = random_ids(9, b, 1)
    step_logits, cache = runner.extend(step, cache)
    result["kept_sharding"] = [x.sharding.is_equivalent_to(s, x.ndim)
                               for x, s in zip(jax.tree.leaves(cache), jax.tree.leaves(shardings))]
    errs = []
    for row in range(b):
        real = ids[row][mask[row] == 1]
        ref = hf_logits(hf, np.concatenate([real, step[row]])[None])[0]
        got = np.concatenate([logits[row][mask[row] == 1], step_logits[row]])
        errs.append(float(np.abs(got - ref).max() / np.abs(ref).max()))
    result["extend_errs"] = errs

    # The same under the model's activation sharding: the GDN rule then runs per shard
    # (shard_map, as the Pallas kernels need), its final state a second sharded output.
    from flax import nnx

    from hybrid_jax.sharding import MeshShape, activation_sharding, make_mesh

    graphdef, params = nnx.split(model)

    def activation_sharded_errs(shape: MeshShape) -> list[float]:
        full_mesh = make_mesh(shape)

        @jax.jit
        def sharded_extend(params, cache, ids, mask):
            with activation_sharding(full_mesh):
                return nnx.merge(graphdef, params).extend(ids, cache, mask)

        cache = jax.device_put(init_cache(cfg, b, t + n),
                               cache_shardings(jax.eval_shape(lambda: init_cache(cfg, b, t + n)),
                                               full_mesh, batch_axis=("data", "fsdp")))
        logits, cache = sharded_extend(params, cache, ids, mask)
        step_logits, cache = sharded_extend(params, cache, step, np.ones((b, 1), np.int32))
        errs = []
        for row in range(b):
            real = ids[row][mask[row] == 1]
            ref = hf_logits(hf, np.concatenate([real, step[row]])[None])[0]
            got = np.concatenate([np.asarray(logits)[row][mask[row] == 1],
                                  np.asarray(step_logits)[row]])
            errs.append(float(np.abs(got - ref).max() / np.abs(ref).max()))
        return errs

    result["activation_sharded_errs"] = activation_sharded_errs(MeshShape(data=2, tensor=4))
    # The prefill's positions split over context (the GDN state passed between devices,
    # left padding included); the decode step's one position stays whole.
    result["context_prefill_errs"] = activation_sharded_errs(
        MeshShape(data=2, tensor=2, context=2))

    sharded = np.asarray(generate(model, ids, n, attention_mask=mask, eos_token_id=(),
                                  max_length=t + n, cache_sharding=shardings))
    with torch.no_grad():
        ref = hf.generate(torch.as_tensor(ids, dtype=torch.long),
                          attention_mask=torch.as_tensor(mask, dtype=torch.long),
                          max_new_tokens=n, do_sample=False, pad_token_id=0).numpy()
    result["generate_sharded"] = sharded.tolist()
    result["generate_reference"] = ref.tolist()
    out.write_text(json.dumps(result))


@pytest.fixture(scope="module")
def mesh_child(tmp_path_factory) -> dict:
    return run_child(__file__, tmp_path_factory.mktemp("decode_mesh") / "result.json", N_DEVICES)


def test_cache_shardings_place_a_cache_on_a_mesh(mesh_child):
    placed = mesh_child["placed"]
    assert all(ok for _, ok, _, _, _ in placed)
    assert all(n == N_DEVICES for _, _, n, _, _ in placed)
    specs = {tuple(spec) for spec, *_ in placed}
    assert ("data", "tensor", None, None) in specs  # keys/values and GDN states
    assert ("data", None, "tensor") in specs  # conv windows
    for spec, _, _, shard, shape in placed:
        # Rows split 2 ways; heads (and head-major conv channels) 4 ways; the rest whole.
        want = [d // {"data": 2, "tensor": 4, None: 1}[a] for d, a in
                zip(shape, spec + [None] * (len(shape) - len(spec)))]
        assert shard == want and shape[0] == 4, (spec, shard, shape)


def test_extend_with_a_sharded_cache(mesh_child):
    # Logits at every real position and after a decode step, against transformers.
    assert max(mesh_child["extend_errs"]) <= 3e-5, mesh_child["extend_errs"]
    assert all(mesh_child["kept_sharding"])


def test_extend_under_activation_sharding(mesh_child):
    # Prefill and a decode step with the GDN rule per shard (as `hybrid-jax aot` compiles
    # them), against transformers.
    errs = mesh_child["activation_sharded_errs"]
    assert max(errs) <= 3e-5, errs


def test_prefill_with_positions_split_over_context(mesh_child):
    # data=2 x tensor=2 x context=2: a left-padded prefill of 10 positions, 5 per device.
    errs = mesh_child["context_prefill_errs"]
    assert max(errs) <= 3e-5, errs


def test_generate_with_cache_sharding_gives_the_same_tokens(mesh_child):
    # The unsharded generate equals transformers' greedy tokens (test_generate); so must this.
    assert mesh_child["generate_sharded"] == mesh_child["generate_reference"]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    _child(Path(sys.argv[1]))
