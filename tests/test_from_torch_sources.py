"""from_hf reads plain PyTorch state dicts (.pt / .bin, single or sharded) and OLMo-core-named
checkpoints into exactly (bitwise) the parameters it reads from the transformers save_pretrained
directory of the same model; bad torch files, missing OLMo-core tensors and mixed namings get
errors that name the culprit."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from hf_models import make_hf_model
from hybrid_jax import ModelConfig
from hybrid_jax.convert import CheckpointError, from_hf
from hybrid_jax.convert.namings import OLMO_CORE, OLMO_CORE_FLA, TRANSFORMERS, detect_naming

# 5 layers with attention first and last, so that both block kinds sit at several positions.
LAYERS = ["full_attention", "linear_attention", "linear_attention", "full_attention",
          "linear_attention"]


def _params(model) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model)))[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


def _assert_same(model, ref: dict[str, np.ndarray]) -> None:
    ours = _params(model)
    assert sorted(ours) == sorted(ref)
    for name, want in ref.items():
        got = ours[name]
        assert got.dtype == want.dtype and got.shape == want.shape, (name, got.dtype, want.dtype)
        width = f"u{want.dtype.itemsize}"
        assert np.array_equal(got.view(width), want.view(width)), f"{name}: bits differ"


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def case(request, tmp_path_factory):
    """A random transformers model, its save_pretrained directory and the parameters from_hf
    reads from that directory (the reference)."""
    root = tmp_path_factory.mktemp(request.param)
    hf = make_hf_model(seed=3, num_hidden_layers=len(LAYERS), layer_types=LAYERS)
    if request.param == "bfloat16":
        hf = hf.to(torch.bfloat16)
    hf.save_pretrained(root / "hf")
    ref = _params(from_hf(root / "hf"))
    assert next(iter(ref.values())).dtype == np.dtype(jax.numpy.dtype(request.param))
    sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    return dict(root=root, hf_dir=root / "hf", config=root / "hf" / "config.json", ref=ref,
                sd=sd, hf_config=hf.config)


# ----------------------------------------------------------------------------- .pt / .bin
def test_state_dict_pt_file_with_config_path(case, tmp_path):
    assert any(k.endswith("linear_attn.conv1d.weight") for k in case["sd"])  # fused names
    assert any(k.endswith("input_layernorm.weight") for k in case["sd"])
    torch.save(case["sd"], tmp_path / "model.pt")
    _assert_same(from_hf(tmp_path / "model.pt", config=case["config"]), case["ref"])


def test_state_dict_with_model_config(case, tmp_path):
    """A ModelConfig instead of a config.json; its dtype is the one used."""
    raw = json.loads(case["config"].read_text())
    cfg = ModelConfig.from_hf_dict(raw)
    torch.save(case["sd"], tmp_path / "weights.pth")
    _assert_same(from_hf(tmp_path / "weights.pth", config=cfg), case["ref"])


def test_directory_with_pytorch_model_bin(case, tmp_path):
    shutil.copy(case["config"], tmp_path / "config.json")
    torch.save(case["sd"], tmp_path / "pytorch_model.bin")
    _assert_same(from_hf(tmp_path), case["ref"])


def test_directory_with_single_pt_file(case, tmp_path):
    shutil.copy(case["config"], tmp_path / "config.json")
    torch.save({"model": case["sd"]}, tmp_path / "checkpoint.pt")  # a wrapped state dict
    _assert_same(from_hf(tmp_path), case["ref"])


def test_sharded_bin(case, tmp_path):
    """pytorch_model-0000i-of-0000N.bin + pytorch_model.bin.index.json, as older transformers wrote."""
    shutil.copy(case["config"], tmp_path / "config.json")
    names = list(case["sd"])
    n = 3
    weight_map = {}
    for i in range(n):
        shard = f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin"
        part = {k: case["sd"][k] for k in names[i::n]}
        torch.save(part, tmp_path / shard)
        weight_map.update({k: shard for k in part})
    (tmp_path / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    _assert_same(from_hf(tmp_path), case["ref"])


# ----------------------------------------------------------------------------- OLMo-core
def _olmo_core(sd: dict[str, torch.Tensor], hf_config, generation: str,
               conv_2d: bool = False) -> dict[str, torch.Tensor]:
    """Rename a transformers state_dict to OLMo-core's names (written here from the reference
    notes, independently of hybrid_jax.convert.namings)."""
    kd = hf_config.linear_num_key_heads * hf_config.linear_key_head_dim
    out = {
        "embeddings.weight": sd["model.embed_tokens.weight"],
        "lm_head.norm.weight": sd["model.norm.weight"],
        "lm_head.w_out.weight": sd["lm_head.weight"],
    }
    mlp = {"mlp.gate_proj.weight": "feed_forward.w1.weight",
           "mlp.down_proj.weight": "feed_forward.w2.weight",
           "mlp.up_proj.weight": "feed_forward.w3.weight"}
    for i, kind in enumerate(hf_config.layer_types):
        hf, oc = f"model.layers.{i}.", f"blocks.{i}."
        if kind == "full_attention":
            names = {**mlp,
                     "self_attn.q_proj.weight": "attention.w_q.weight",
                     "self_attn.k_proj.weight": "attention.w_k.weight",
                     "self_attn.v_proj.weight": "attention.w_v.weight",
                     "self_attn.o_proj.weight": "attention.w_out.weight",
                     "self_attn.q_norm.weight": "attention.q_norm.weight",
                     "self_attn.k_norm.weight": "attention.k_norm.weight",
                     "post_attention_layernorm.weight": "attention_norm.weight",
                     "post_feedforward_layernorm.weight": "feed_forward_norm.weight"}
        elif generation == "newer":
            names = {**mlp, **{f"linear_attn.{p}_proj.weight": f"attention.w_{p}.weight"
                               for p in "qkvabg"},
                     "linear_attn.o_proj.weight": "attention.w_out.weight",
                     "linear_attn.A_log": "attention.A_log",
                     "linear_attn.dt_bias": "attention.dt_bias",
                     "linear_attn.o_norm.weight": "attention.o_norm.weight",
                     "input_layernorm.weight": "attention_norm.weight",
                     "post_attention_layernorm.weight": "feed_forward_norm.weight"}
        else:
            names = {**mlp, **{f"linear_attn.{p}_proj.weight": f"fla.inner.{p}_proj.weight"
                               for p in "qkvabgo"},
                     "linear_attn.A_log": "fla.inner.A_log",
                     "linear_attn.dt_bias": "fla.inner.dt_bias",
                     "linear_attn.o_norm.weight": "fla.inner.o_norm.weight",
                     "input_layernorm.weight": "fla_norm.weight",
                     "post_attention_layernorm.weight": "feed_forward_norm.weight"}
        for src, dst in names.items():
            out[oc + dst] = sd[hf + src]
        if kind == "linear_attention":
            conv = sd[hf + "linear_attn.conv1d.weight"]
            inner = "attention." if generation == "newer" else "fla.inner."
            for name, part in zip("qkv", (conv[:kd], conv[kd:2 * kd], conv[2 * kd:])):
                out[f"{oc}{inner}{name}_conv1d.weight"] = part[:, 0, :] if conv_2d else part
    n_gdn = list(hf_config.layer_types).count("linear_attention")
    assert len(out) == len(sd) + 2 * n_gdn  # one fused conv -> three
    return out


@pytest.mark.parametrize("generation, conv_2d", [("newer", False), ("older", False),
                                                 ("newer", True)])
def test_olmo_core_naming(case, tmp_path, generation, conv_2d):
    oc = _olmo_core(case["sd"], case["hf_config"], generation, conv_2d)
    assert detect_naming(oc) is (OLMO_CORE if generation == "newer" else OLMO_CORE_FLA)
    torch.save(oc, tmp_path / "olmo_core.pt")
    _assert_same(from_hf(tmp_path / "olmo_core.pt", config=case["config"]), case["ref"])


def test_detect_transformers_naming(case):
    assert detect_naming(case["sd"]) is TRANSFORMERS


# ----------------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    hf = make_hf_model(seed=1, num_hidden_layers=len(LAYERS), layer_types=LAYERS)
    hf.save_pretrained(root)
    return dict(config=root / "config.json",
                sd={k: v.detach().clone() for k, v in hf.state_dict().items()},
                hf_config=hf.config)


def _error(path: Path, **kw) -> str:
    with pytest.raises(CheckpointError) as info:
        from_hf(path, **kw)
    return str(info.value)


@pytest.mark.parametrize("obj, expected", [
    ([1, 2, 3], "not a state dict: torch.load returned a list"),
    ({"model.norm.weight": torch.ones(64), "step": 7}, "'step' (int)"),
    (torch.ones(3), "not a state dict: torch.load returned a Tensor"),
])
def test_pt_not_a_state_dict(small, tmp_path, obj, expected):
    path = tmp_path / "bad.pt"
    torch.save(obj, path)
    msg = _error(path, config=small["config"])
    assert str(path) in msg and expected in msg


def test_pt_garbage(small, tmp_path):
    path = tmp_path / "garbage.bin"
    path.write_bytes(b"\x00not a torch file" * 10)
    msg = _error(path, config=small["config"])
    assert str(path) in msg and "torch.load(weights_only=True)" in msg


def test_pt_with_arbitrary_objects_is_refused(small, tmp_path):
    path = tmp_path / "pickle.pt"
    torch.save({"model.norm.weight": torch.ones(64), "obj": Path("x")}, path)
    assert str(path) in _error(path, config=small["config"])


def test_torch_not_installed(small, tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    torch.save(small["sd"], path)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    msg = _error(path, config=small["config"])
    assert str(path) in msg and "needs torch" in msg


def test_weights_file_without_config(small, tmp_path):
    path = tmp_path / "model.pt"
    torch.save(small["sd"], path)
    assert "pass config=" in _error(path)


def test_integer_tensor_in_pt(small, tmp_path):
    sd = dict(small["sd"])
    sd["model.norm.weight"] = torch.ones(64, dtype=torch.int32)
    torch.save(sd, tmp_path / "model.pt")
    msg = _error(tmp_path / "model.pt", config=small["config"])
    assert "tensor model.norm.weight" in msg and "dtype I32" in msg


@pytest.mark.parametrize("generation, name", [
    ("newer", "blocks.3.attention.q_norm.weight"),
    ("newer", "blocks.1.attention.w_a.weight"),
    ("newer", "blocks.2.attention.v_conv1d.weight"),
    ("older", "blocks.1.fla_norm.weight"),
    ("older", "blocks.4.fla.inner.dt_bias"),
    ("older", "lm_head.w_out.weight"),
])
def test_missing_olmo_core_tensor(small, tmp_path, generation, name):
    oc = _olmo_core(small["sd"], small["hf_config"], generation)
    oc.pop(name)
    path = tmp_path / "olmo_core.pt"
    torch.save(oc, path)
    msg = _error(path, config=small["config"])
    assert f"missing tensor {name} (expected in {path}" in msg and "OLMo-core naming" in msg
    assert "model.layers" not in msg


def test_wrong_olmo_core_conv_shape(small, tmp_path):
    oc = _olmo_core(small["sd"], small["hf_config"], "newer")
    name = "blocks.1.attention.k_conv1d.weight"
    oc[name] = oc[name][:5]
    torch.save(oc, tmp_path / "oc.pt")
    msg = _error(tmp_path / "oc.pt", config=small["config"])
    assert f"tensor {name}" in msg and "has shape [5, 1, 4], expected [32, 1, 4]" in msg


def test_mixed_transformers_and_olmo_core(small, tmp_path):
    oc = _olmo_core(small["sd"], small["hf_config"], "newer")
    oc["model.layers.0.mlp.up_proj.weight"] = oc.pop("blocks.0.feed_forward.w3.weight")
    torch.save(oc, tmp_path / "mixed.pt")
    msg = _error(tmp_path / "mixed.pt", config=small["config"])
    assert "mixed tensor namings" in msg and "model.layers.0.mlp.up_proj.weight" in msg
    assert "blocks.0." in msg and str(tmp_path / "mixed.pt") in msg


def test_mixed_olmo_core_generations(small, tmp_path):
    new = _olmo_core(small["sd"], small["hf_config"], "newer")
    old = _olmo_core(small["sd"], small["hf_config"], "older")
    mixed = {k: v for k, v in new.items() if not k.startswith("blocks.1.")}
    mixed.update({k: v for k, v in old.items() if k.startswith("blocks.1.")})
    torch.save(mixed, tmp_path / "mixed.pt")
    msg = _error(tmp_path / "mixed.pt", config=small["config"])
    assert "mixed OLMo-core namings" in msg
    assert "blocks.1.fla" in msg and "blocks.2.attention." in msg


def test_several_state_dicts_without_index(small, tmp_path):
    shutil.copy(small["config"], tmp_path / "config.json")
    torch.save(small["sd"], tmp_path / "a.pt")
    torch.save(small["sd"], tmp_path / "b.pt")
    msg = _error(tmp_path)
    assert "a.pt" in msg and "b.pt" in msg and "no weights found" in msg


def test_sharded_bin_shard_not_a_state_dict(small, tmp_path):
    shutil.copy(small["config"], tmp_path / "config.json")
    names = list(small["sd"])
    torch.save({k: small["sd"][k] for k in names[:10]}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save(["oops"], tmp_path / "pytorch_model-00002-of-00002.bin")
    weight_map = {k: f"pytorch_model-0000{1 + (i >= 10)}-of-00002.bin" for i, k in enumerate(names)}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    msg = _error(tmp_path)
    assert str(tmp_path / "pytorch_model-00002-of-00002.bin") in msg and "not a state dict" in msg
