"""ModelConfig: validation names the field; transformers config.json round trips."""

from __future__ import annotations

import dataclasses

import pytest

from hybrid_jax.config import ATTENTION, GDN, ModelConfig, hybrid_layer_types, olmo_hybrid_7b, olmo_hybrid_tiny


@pytest.mark.parametrize("changes, field", [
    (dict(num_attention_heads=7), "num_attention_heads"),  # 64 % 7
    (dict(num_key_value_heads=3), "num_key_value_heads"),  # 4 % 3
    (dict(linear_num_value_heads=3), "linear_num_value_heads"),  # not a multiple of 2 key heads
    (dict(layer_types=hybrid_layer_types(7)), "layer_types"),  # wrong length
    (dict(layer_types=(GDN,) * 7 + ("sliding_attention",)), "layer_types"),  # unknown kind
    (dict(hidden_size=0), "hidden_size"),
    (dict(vocab_size=-1), "vocab_size"),
    (dict(intermediate_size=1.5), "intermediate_size"),
    (dict(linear_key_head_dim=0), "linear_key_head_dim"),
    (dict(gdn_chunk_size=0), "gdn_chunk_size"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps"),
    (dict(rope_theta=-1.0), "rope_theta"),
    (dict(gdn_method="power_series"), "gdn_method"),
    (dict(remat="everything"), "remat"),
    (dict(dtype="int8"), "dtype"),
    (dict(hidden_act="gelu"), "hidden_act"),
])
def test_invalid_config_names_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}\b"):
        olmo_hybrid_tiny(**changes)


def test_pure_baselines_are_allowed():
    """Unlike transformers, all-attention and all-GDN stacks are valid (the experiments' baselines)."""
    assert olmo_hybrid_tiny(layer_types=(ATTENTION,) * 8).layer_period == 1
    assert olmo_hybrid_tiny(layer_types=(GDN,) * 8).layer_period == 1


def test_layer_period():
    assert olmo_hybrid_7b().layer_period == 4
    irregular = (ATTENTION, GDN, GDN, GDN, GDN, ATTENTION, GDN, GDN)
    assert olmo_hybrid_tiny(layer_types=irregular).layer_period == 8
    assert olmo_hybrid_tiny(layer_types=(GDN, ATTENTION) * 4).layer_period == 2


def test_7b_preset_matches_transformers_defaults():
    """transformers' OlmoHybridConfig defaults describe the released 7B model."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.OlmoHybridConfig().to_dict()
    ours = ModelConfig.from_hf_dict(hf)
    preset = olmo_hybrid_7b()
    for f in dataclasses.fields(ModelConfig):
        if f.name in ("rope_theta",):  # transformers defaults to theta 1e4; pretraining used 5e5
            continue
        assert getattr(ours, f.name) == getattr(preset, f.name), f.name


@pytest.mark.parametrize("rope_theta", [500000.0, None])
def test_hf_dict_round_trip_through_transformers(rope_theta):
    transformers = pytest.importorskip("transformers")
    cfg = olmo_hybrid_tiny(rope_theta=rope_theta, layer_types=(ATTENTION, GDN) * 4,
                           linear_allow_neg_eigval=False, tie_word_embeddings=True)
    hf = transformers.OlmoHybridConfig(**cfg.to_hf_dict())
    assert hf.rope_parameters["rope_theta"] == rope_theta
    assert hf.layer_types == list(cfg.layer_types)
    back = ModelConfig.from_hf_dict(hf.to_dict())
    assert back == cfg


def test_from_hf_dict_fills_defaults_like_transformers():
    d = dict(model_type="olmo_hybrid", vocab_size=128, hidden_size=64, intermediate_size=96,
             num_hidden_layers=4, num_attention_heads=4)
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg.layer_types == (GDN, GDN, GDN, ATTENTION)
    assert (cfg.num_key_value_heads, cfg.linear_num_key_heads, cfg.linear_num_value_heads) == (4, 4, 4)
    assert (cfg.linear_key_head_dim, cfg.linear_value_head_dim) == (12, 24)  # 0.75*64/4, 2x
    assert cfg.rope_theta == 10000.0  # no rope_parameters: transformers' default theta
    assert ModelConfig.from_hf_dict({**d, "rope_parameters": {"rope_type": "default",
                                                               "rope_theta": None}}).rope_theta is None


def test_from_hf_dict_rejects_other_models():
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig.from_hf_dict({"model_type": "llama"})
    with pytest.raises(ValueError, match="rope_type"):
        ModelConfig.from_hf_dict({"model_type": "olmo_hybrid", "rope_parameters": {"rope_type": "yarn"}})


@pytest.mark.parametrize("field, value, expected", [
    ("hidden_size", "64", "'hidden_size': expected a positive integer"),
    ("num_attention_heads", 0, "'num_attention_heads': expected a positive integer"),
    ("rms_norm_eps", "small", "'rms_norm_eps': expected a number"),
    ("tie_word_embeddings", "no", "'tie_word_embeddings': expected true or false"),
    ("torch_dtype", "int8", "'torch_dtype': unsupported dtype"),
])
def test_from_hf_dict_names_the_config_json_field(field, value, expected):
    """config.json's types are checked in one place (``check_hf_dict``), before any default is
    derived from them; from_hf uses the same checks."""
    d = dict(model_type="olmo_hybrid", vocab_size=128, hidden_size=64, intermediate_size=96,
             num_hidden_layers=4, num_attention_heads=4)
    with pytest.raises(ValueError, match=expected):
        ModelConfig.from_hf_dict({**d, field: value})


def test_from_hf_dict_reads_torch_prefixed_dtypes():
    d = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
             num_attention_heads=4, torch_dtype="torch.bfloat16")
    assert ModelConfig.from_hf_dict(d).param_dtype == "bfloat16"
