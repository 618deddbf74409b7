"""to_hf writes what transformers' save_pretrained writes: same names, dtypes and bytes, loadable by
OlmoHybridForCausalLM.from_pretrained with no missing/unexpected keys and the same logits."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open
from transformers import OlmoHybridForCausalLM

from hf_models import NOPE, assert_close, hf_logits, make_hf_model, random_ids, save_release_layout
from safetensors_dirs import assert_same_tensors, read_all
from hybrid_jax import HybridLM, apply, olmo_hybrid_tiny, split
from hybrid_jax.convert import from_hf, to_hf
from hybrid_jax.convert.to_hf import parse_size

T = 24


def _header(path: Path) -> dict:
    """The safetensors header's tensor entries, parsed by hand."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0  # data 8-byte aligned, as the safetensors library writes it
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__")
    return header


def _json(path: Path) -> dict:
    data = json.loads(path.read_text())
    data.pop("transformers_version", None)
    return data


def _logits(model: HybridLM, ids) -> np.ndarray:
    graphdef, params = split(model)
    return np.asarray(jax.jit(apply)(graphdef, params, jnp.asarray(ids)))


def _load_hf(path: Path) -> OlmoHybridForCausalLM:
    hf, info = OlmoHybridForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    assert not info.get("error_msgs"), info
    return hf.eval()


CASES = {
    # GQA attention, two value heads per key head (conv channels 160: thirds 54/54/52 on disk),
    # written in shards by transformers.
    "gqa_grouped_v_sharded": dict(overrides=dict(eos_token_id=5, pad_token_id=6), shard="60KB"),
    # NoPE and tied embeddings (no lm_head.weight).
    "nope_tied": dict(overrides=dict(rope_parameters=NOPE, tie_word_embeddings=True)),
    # Attention first, irregular pattern (period 5 = depth: an unrolled stack).
    "irregular": dict(overrides=dict(
        num_hidden_layers=5,
        layer_types=["full_attention", "linear_attention", "linear_attention", "full_attention",
                     "linear_attention"])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_is_bitwise_and_loads_in_transformers(case, tmp_path):
    """Against save_pretrained's own files: layout="save_pretrained" writes them byte for byte."""
    spec = CASES[case]
    hf = make_hf_model(seed=len(case), **spec["overrides"])
    ref = tmp_path / "ref"
    hf.save_pretrained(ref, **({"max_shard_size": spec["shard"]} if "shard" in spec else {}))
    model = from_hf(ref, gdn_chunk_size=8)
    out = to_hf(model, tmp_path / "out", max_shard_size=spec.get("shard", "5GB"),
                layout="save_pretrained")
    assert out == tmp_path / "out"

    assert_same_tensors(out, ref)
    assert _json(out / "config.json") == _json(ref / "config.json")
    assert _json(out / "generation_config.json") == _json(ref / "generation_config.json")
    if "shard" in spec:
        ours_index = json.loads((out / "model.safetensors.index.json").read_text())
        ref_index = json.loads((ref / "model.safetensors.index.json").read_text())
        assert ours_index["metadata"] == ref_index["metadata"]
        assert sorted(ours_index["weight_map"]) == sorted(ref_index["weight_map"])
        assert not (out / "model.safetensors").exists()
    else:
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())
    if case == "nope_tied":
        assert "lm_head.weight" not in read_all(out)

    ids = random_ids(1, 2, T)
    reloaded = _load_hf(out)
    assert_close(_logits(model, ids), hf_logits(reloaded, ids), rtol=1e-5)


def test_bfloat16_bitwise_and_cast_like_torch(tmp_path):
    """A bf16 checkpoint round-trips bit for bit; a float32 model written with dtype=bfloat16
    equals transformers' own .to(bfloat16) save (same rounding)."""
    hf = make_hf_model(seed=7)
    hf.save_pretrained(tmp_path / "f32")
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")

    out = to_hf(from_hf(tmp_path / "bf16"), tmp_path / "out_bf16", layout="save_pretrained")
    assert_same_tensors(out, tmp_path / "bf16")
    assert _json(out / "config.json") == _json(tmp_path / "bf16" / "config.json")
    assert {v["dtype"] for v in _header(out / "model.safetensors").values()} == {"BF16"}

    cast = to_hf(from_hf(tmp_path / "f32"), tmp_path / "out_cast", dtype=jnp.bfloat16,
                 layout="save_pretrained")
    assert_same_tensors(cast, tmp_path / "bf16")
    assert json.loads((cast / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_release_layout_round_trip_is_bitwise(dtype, tmp_path):
    """A checkpoint laid out as the release holds it (the q, k and v convolutions themselves,
    Kd = 32 != Vd = 96 channels, as OLMo-core holds them; an attention layer's
    post_attention_layernorm) comes back tensor for tensor by default: the same names, shapes,
    dtypes and bytes, each conv its own projection's."""
    hf = make_hf_model(seed=11).to(dtype)
    ref = tmp_path / "release"
    save_release_layout(hf, ref, max_shard_size="60KB")
    out = to_hf(from_hf(ref), tmp_path / "out", max_shard_size="60KB")
    assert_same_tensors(out, ref)
    assert _json(out / "config.json") == _json(ref / "config.json")

    kd, vd = 2 * 16, 4 * 24
    tensors = read_all(out)
    fused = hf.state_dict()["model.layers.0.linear_attn.conv1d.weight"]
    for part, (a, b) in zip("qkv", ((0, kd), (kd, 2 * kd), (2 * kd, 2 * kd + vd))):
        conv = tensors[f"model.layers.0.linear_attn.{part}_conv1d.weight"]
        assert conv.shape == (b - a, 1, 4)
        assert torch.equal(conv, fused[a:b])

    assert "model.layers.3.post_attention_layernorm.weight" in tensors  # an attention layer

    # save_pretrained's thirds are another cut of the same fused conv (and its norm name another
    # name): both load the same model in transformers, and from_hf reads either.
    thirds = to_hf(from_hf(ref), tmp_path / "thirds", layout="save_pretrained")
    written = read_all(thirds)
    assert written["model.layers.0.linear_attn.q_conv1d.weight"].shape == (54, 1, 4)
    assert "model.layers.3.feedforward_layer_norm.weight" in written
    ids = random_ids(3, 2, T)
    want = hf_logits(_load_hf(ref), ids)
    for path in (out, thirds):
        np.testing.assert_array_equal(hf_logits(_load_hf(path), ids), want)
    with pytest.raises(ValueError, match="layout must be one of 'release', 'save_pretrained'"):
        to_hf(from_hf(ref), tmp_path / "bad", layout="thirds")
    assert not (tmp_path / "bad").exists()


def test_jax_model_sharded_export_loads_in_transformers(tmp_path):
    cfg = olmo_hybrid_tiny(gdn_chunk_size=8, eos_token_id=3)
    model = HybridLM(cfg, rngs=nnx.Rngs(0))
    # Move norms, decays and convs away from their init (as make_hf_model does) so that a
    # misplaced one changes the logits.
    graphdef, params = split(model)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(1), len(flat))
    moved = []
    for (path, leaf), k in zip(flat, keys):
        name = jax.tree_util.keystr(path)
        scale = 0.3 if any(s in name for s in ("norm", "A_log", "dt_bias", "conv")) else 0.0
        moved.append(leaf + scale * jax.random.normal(k, leaf.shape, leaf.dtype))
    params = jax.tree.unflatten(treedef, moved)
    model = nnx.merge(graphdef, params)

    out = to_hf(model, tmp_path / "sharded", max_shard_size="500KB")
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) >= 3
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                      for i in range(1, len(shards) + 1)]
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = read_all(out)
    assert sorted(index["weight_map"]) == sorted(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for shard in shards:  # each shard within the limit (no single tensor here exceeds it)
        offsets = [v["data_offsets"] for v in _header(out / shard).values()]
        assert sum(end - begin for begin, end in offsets) <= 500_000
    for name, shard in index["weight_map"].items():
        with safe_open(str(out / shard), "pt") as f:
            assert name in f.keys()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 3

    ids = random_ids(2, 2, T, vocab=cfg.vocab_size)
    hf = _load_hf(out)
    assert_close(_logits(model, ids), hf_logits(hf, ids), rtol=1e-5)

    # (graphdef, params) and a params State with config= write the same tensors; from_hf reads
    # back the same parameters.
    by_split = to_hf((graphdef, params), tmp_path / "by_split")
    by_state = to_hf(params, tmp_path / "by_state", config=cfg, max_shard_size=10**9)
    assert_same_tensors(by_split, out)
    assert_same_tensors(by_state, out)
    back = nnx.state(from_hf(by_state))
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def tiny():
    cfg = olmo_hybrid_tiny(num_hidden_layers=4, layer_types=olmo_hybrid_tiny().layer_types[:4])
    return cfg, HybridLM(cfg, rngs=nnx.Rngs(0))


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_existing_out_dir_is_protected(tiny, tmp_path):
    cfg, model = tiny
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    before = _listing(tmp_path)
    with pytest.raises(FileExistsError, match=str(out)):
        to_hf(model, out)
    assert _listing(tmp_path) == before and (out / "keep.txt").read_text() == "precious"

    # An empty directory is fine; overwrite=True replaces a non-empty one once the new one is done.
    (tmp_path / "empty").mkdir()
    to_hf(model, tmp_path / "empty")
    assert (tmp_path / "empty" / "model.safetensors").is_file()
    to_hf(model, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out"]  # no temp dirs left


def test_extra_files_are_copied_and_checked(tiny, tmp_path):
    cfg, model = tiny
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text('{"x": 1}')
    (src / "config.json").write_text("{}")
    to_hf(model, tmp_path / "ok", extra_files=[src / "tokenizer.json"])
    assert (tmp_path / "ok" / "tokenizer.json").read_text() == '{"x": 1}'
    # Nothing is written when an extra file would clobber the checkpoint's own or is missing.
    with pytest.raises(ValueError, match="may not be named 'config.json'"):
        to_hf(model, tmp_path / "bad", extra_files=[src / "config.json"])
    with pytest.raises(ValueError, match="missing.json: extra file not found"):
        to_hf(model, tmp_path / "bad", extra_files=[src / "missing.json"])
    assert not (tmp_path / "bad").exists()


def test_failure_while_writing_leaves_nothing(tiny, tmp_path, monkeypatch):
    # (the package's ``to_hf`` attribute is the function; the module is in sys.modules)
    mod = importlib.import_module("hybrid_jax.convert.to_hf")
    cfg, model = tiny
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    real = mod._write_safetensors

    def failing(path, tensors):
        real(path, tensors[:1])  # a partial file, then an error
        raise OSError("disk full")

    monkeypatch.setattr(mod, "_write_safetensors", failing)
    with pytest.raises(OSError, match="disk full"):
        to_hf(model, out, overwrite=True, max_shard_size="100KB")
    assert _listing(tmp_path) == ["out", "out/keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"


def test_mismatched_params_name_the_parameter(tiny, tmp_path):
    cfg, model = tiny
    pure = nnx.to_pure_dict(nnx.state(model))

    def check(params, *patterns, config=cfg):
        with pytest.raises(ValueError) as info:
            to_hf(params, tmp_path / "out", config=config)
        for p in patterns:
            assert p in str(info.value), str(info.value)
        assert list(tmp_path.iterdir()) == []

    missing = nnx.to_pure_dict(nnx.state(model))
    del missing["final_norm"]["weight"]
    check(missing, "missing parameter final_norm.weight")

    wrong = nnx.to_pure_dict(nnx.state(model))
    wrong["stack"]["blocks"]["layers"][1]["gdn"]["q_proj"]["kernel"] = jnp.zeros((1, 64, 33))
    check(wrong, "stack.blocks.layers.1.gdn.q_proj.kernel", "[1, 64, 33]", "[1, 64, 32]")

    extra = nnx.to_pure_dict(nnx.state(model))
    extra["lm_head"]["bias"] = jnp.zeros((cfg.vocab_size,))
    check(extra, "unexpected parameter lm_head.bias")

    # A model whose config does not match its parameters: tied config, untied params.
    check(pure, "unexpected parameter lm_head.kernel", config=cfg.replace(tie_word_embeddings=True))

    with pytest.raises(ValueError, match="config="):
        to_hf(pure, tmp_path / "out")
    with pytest.raises(ValueError, match="max_shard_size"):
        to_hf(model, tmp_path / "out", max_shard_size="5 parsecs")
    assert list(tmp_path.iterdir()) == []


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("50KB") == 50_000
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1mib") == 2**20
    assert parse_size(1234) == 1234
    for bad in ("", "GB", "-1GB", 0, 1.5, True):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_large_tensors_are_written_in_row_blocks(tmp_path, monkeypatch):
    """With tiny blocks (every tensor split into many row blocks, including the transposed head
    read as column blocks) the file is byte for byte the one written whole."""
    from hybrid_jax import HybridLM, ModelConfig
    from hybrid_jax.convert import to_hf

    cfg = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=2, num_key_value_heads=2, linear_num_key_heads=2,
                      linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=16,
                      pad_token_id=None, eos_token_id=None, tie_word_embeddings=False,
                      layer_types=("linear_attention",) * 3 + ("full_attention",))
    mod = importlib.import_module("hybrid_jax.convert.to_hf")
    model = HybridLM(cfg, rngs=nnx.Rngs(1))
    to_hf(model, tmp_path / "whole", dtype="bfloat16")
    monkeypatch.setattr(mod, "_BLOCK_BYTES", 100)
    to_hf(model, tmp_path / "blocks", dtype="bfloat16")
    a = (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "blocks" / "model.safetensors").read_bytes()
