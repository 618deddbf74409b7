"""from_hf rejects bad checkpoints with errors that name the tensor, field or file at fault."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from hf_models import make_hf_model
from hybrid_jax.convert import CheckpointError, from_hf

WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """A good single-file checkpoint and a good sharded one (4 layers, 3 GDN + 1 attention)."""
    root = tmp_path_factory.mktemp("ckpt")
    model = make_hf_model(seed=0)
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="50KB")
    return {"single": root / "single", "sharded": root / "sharded"}


@pytest.fixture
def ckpt(saved, tmp_path) -> Path:
    path = tmp_path / "single"
    shutil.copytree(saved["single"], path)
    return path


@pytest.fixture
def sharded(saved, tmp_path) -> Path:
    path = tmp_path / "sharded"
    shutil.copytree(saved["sharded"], path)
    return path


def _edit_tensors(ckpt: Path, edit) -> Path:
    tensors = load_file(ckpt / WEIGHTS)
    edit(tensors)
    save_file(tensors, ckpt / WEIGHTS)
    return ckpt / WEIGHTS


def _edit_config(ckpt: Path, edit) -> Path:
    path = ckpt / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    return path


def _error(path: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        from_hf(path)
    return str(info.value)


def test_good_checkpoints_load(saved):
    for path in saved.values():
        assert from_hf(path).config.num_hidden_layers == 4


# ----------------------------------------------------------------------------- tensors
def test_missing_tensor(ckpt):
    name = "model.layers.3.self_attn.q_norm.weight"
    weights = _edit_tensors(ckpt, lambda t: t.pop(name))
    msg = _error(ckpt)
    assert f"missing tensor {name}" in msg and str(weights) in msg


def test_missing_tensor_with_alternative_names(ckpt):
    _edit_tensors(ckpt, lambda t: t.pop("model.layers.0.attention_layer_norm.weight"))
    msg = _error(ckpt)
    assert ("missing tensor model.layers.0.attention_layer_norm.weight or "
            "model.layers.0.input_layernorm.weight") in msg


def test_missing_conv(ckpt):
    name = "model.layers.2.linear_attn.k_conv1d.weight"
    _edit_tensors(ckpt, lambda t: t.pop(name))
    msg = _error(ckpt)
    assert f"missing tensor {name}" in msg and "linear_attn.conv1d.weight" in msg


def test_missing_lm_head_when_untied(ckpt):
    _edit_tensors(ckpt, lambda t: t.pop("lm_head.weight"))
    assert "missing tensor lm_head.weight" in _error(ckpt)


def test_unexpected_tensor(ckpt):
    name = "model.layers.0.linear_attn.extra.weight"
    weights = _edit_tensors(ckpt, lambda t: t.update({name: np.zeros(3, np.float32)}))
    msg = _error(ckpt)
    assert f"unexpected tensor {name} in {weights}" in msg


def test_mtp_tensors_are_ignored_like_transformers(ckpt):
    _edit_tensors(ckpt, lambda t: t.update({"mtp.0.weight": np.zeros(3, np.float32)}))
    from_hf(ckpt)


def test_wrong_shape(ckpt):
    name = "model.layers.1.linear_attn.A_log"
    weights = _edit_tensors(ckpt, lambda t: t.update({name: np.zeros(5, np.float32)}))
    msg = _error(ckpt)
    assert f"tensor {name} in {weights} has shape [5], expected [4]" in msg


def test_wrong_shape_transposed_linear(ckpt):
    name = "model.layers.3.self_attn.o_proj.weight"
    _edit_tensors(ckpt, lambda t: t.update({name: np.ascontiguousarray(t[name].T[:, :40])}))
    assert f"tensor {name}" in _error(ckpt) and "expected [64, 64]" in _error(ckpt)


def test_wrong_conv_split(ckpt):
    name = "model.layers.0.linear_attn.v_conv1d.weight"
    _edit_tensors(ckpt, lambda t: t.update({name: np.zeros((7, 1, 4), np.float32)}))
    msg = _error(ckpt)
    assert name in msg and "wrong shapes" in msg


def test_integer_tensor(ckpt):
    name = "model.norm.weight"
    _edit_tensors(ckpt, lambda t: t.update({name: np.ones(64, np.int32)}))
    assert f"tensor {name}" in _error(ckpt) and "dtype I32" in _error(ckpt)


def test_ambiguous_names(ckpt):
    def add_fused(t):
        t["model.layers.0.linear_attn.conv1d.weight"] = np.zeros((2 * 32 + 96, 1, 4), np.float32)

    _edit_tensors(ckpt, add_fused)
    msg = _error(ckpt)
    assert "ambiguous" in msg and "model.layers.0.linear_attn.conv1d.weight" in msg


def test_all_problems_reported_together(ckpt):
    def edit(t):
        t.pop("model.norm.weight")
        t["stray"] = np.zeros(1, np.float32)

    _edit_tensors(ckpt, edit)
    msg = _error(ckpt)
    assert "missing tensor model.norm.weight" in msg and "unexpected tensor stray" in msg
    assert "2 problems" in msg


# ----------------------------------------------------------------------------- config
def test_config_missing(ckpt):
    (ckpt / "config.json").unlink()
    msg = _error(ckpt)
    assert str(ckpt / "config.json") in msg and "not found" in msg


def test_config_not_json(ckpt):
    (ckpt / "config.json").write_text("{not json")
    msg = _error(ckpt)
    assert str(ckpt / "config.json") in msg and "not valid JSON" in msg


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("hidden_size", "64", "'hidden_size': expected a positive integer"),
        ("num_hidden_layers", 0, "'num_hidden_layers': expected a positive integer"),
        ("rms_norm_eps", "small", "'rms_norm_eps': expected a number"),
        ("tie_word_embeddings", "no", "'tie_word_embeddings': expected true or false"),
        ("layer_types", "hybrid", "'layer_types': expected a list of strings"),
        ("dtype", "int8", "'dtype': unsupported dtype"),
        ("rope_parameters", {"rope_type": "default", "rope_theta": "big"},
         "'rope_parameters.rope_theta'"),
        # Consistency checks by ModelConfig name the field too.
        ("num_attention_heads", 5, "ModelConfig.num_attention_heads"),
        ("layer_types", ["linear_attention"] * 3, "ModelConfig.layer_types"),
        ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4}, "rope_type"),
        ("model_type", "llama", "config.model_type"),
    ],
)
def test_config_invalid_field(ckpt, field, value, expected):
    config_path = _edit_config(ckpt, lambda c: c.update({field: value}))
    msg = _error(ckpt)
    assert str(config_path) in msg and expected in msg


def test_config_missing_required_field(ckpt):
    config_path = _edit_config(ckpt, lambda c: c.pop("vocab_size"))
    msg = _error(ckpt)
    assert str(config_path) in msg and "'vocab_size': missing" in msg


def test_config_shapes_disagree_with_tensors(ckpt):
    _edit_config(ckpt, lambda c: c.update({"intermediate_size": 80}))
    msg = _error(ckpt)
    assert "model.layers.0.mlp.gate_proj.weight" in msg and "expected [80, 64]" in msg


# ----------------------------------------------------------------------------- files
def test_no_weights(ckpt):
    (ckpt / WEIGHTS).unlink()
    msg = _error(ckpt)
    assert str(ckpt) in msg and "model.safetensors.index.json" in msg


def test_not_a_directory(tmp_path):
    assert "checkpoint directory not found" in _error(tmp_path / "nowhere")


def test_truncated_safetensors(ckpt):
    weights = ckpt / WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    msg = _error(ckpt)
    assert str(weights) in msg and "truncated" in msg


def test_corrupt_safetensors_header(ckpt):
    weights = ckpt / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[8:16] = b"\xff" * 8  # inside the JSON header
    weights.write_bytes(bytes(data))
    msg = _error(ckpt)
    assert str(weights) in msg and "corrupt" in msg


def test_tiny_file(ckpt):
    (ckpt / WEIGHTS).write_bytes(b"\x01\x02")
    assert str(ckpt / WEIGHTS) in _error(ckpt)


def test_shard_listed_but_absent(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (sharded / shard).unlink()
    msg = _error(sharded)
    assert shard in msg and "absent" in msg and "model.safetensors.index.json" in msg


def test_index_lists_tensor_missing_from_shard(sharded):
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name, shard = next(iter(index["weight_map"].items()))
    tensors = load_file(sharded / shard)
    tensors.pop(name)
    save_file(tensors, sharded / shard)
    msg = _error(sharded)
    assert name in msg and shard in msg


def test_index_not_json(sharded):
    (sharded / "model.safetensors.index.json").write_text("[")
    msg = _error(sharded)
    assert "model.safetensors.index.json" in msg and "not valid JSON" in msg


def test_corrupt_shard(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    path = sharded / shard
    path.write_bytes(path.read_bytes()[:-4])
    msg = _error(sharded)
    assert str(path) in msg and "truncated" in msg
