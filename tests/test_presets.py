"""The Qwen presets have the released models' parameter counts: ours (abstract, nothing
allocated) against transformers' causal-LM class built on the meta device from the same
config.json fields."""

from __future__ import annotations

import math

import jax
import pytest
import torch
import transformers
from flax import nnx

from hybrid_jax import HybridLM
from hybrid_jax.hf_configs import FAMILIES
from hybrid_jax.presets import HF_CONFIGS, PRESETS

_CONFIG_CLASSES = {"qwen3_5_text": "Qwen3_5TextConfig", "qwen3_5_moe_text": "Qwen3_5MoeTextConfig",
                   "qwen3_next": "Qwen3NextConfig"}


def _ours(name: str) -> int:
    model = nnx.eval_shape(lambda: HybridLM(PRESETS[name](), rngs=nnx.Rngs(0)))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model)))


def _transformers(name: str) -> int:
    fields = dict(HF_CONFIGS[name])
    family = FAMILIES[fields.pop("model_type")]
    config = getattr(transformers, _CONFIG_CLASSES[family.model_type])(**fields)
    with torch.device("meta"):
        model = getattr(transformers, family.architecture)(config)
    return sum(p.numel() for p in model.parameters())  # tied embeddings counted once


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_parameter_count_matches_transformers(name):
    assert _ours(name) == _transformers(name)


def test_released_sizes():
    """The totals the model names promise (billions, as published)."""
    billions = {"qwen3_5_0_8b": 0.75, "qwen3_5_27b": 26.9, "qwen3_5_35b_a3b": 34.7,
                "qwen3_next_80b_a3b": 79.7}
    for name, total in billions.items():
        assert round(_ours(name) / 1e9, 2 if total < 1 else 1) == total, name


def test_model_flops_count_the_experts_a_token_uses():
    """The roofline's matmul parameters of Qwen3.5-35B-A3B (the "A3B"): transformers' model with
    only top-k = 8 experts per layer, its routers given back their 256 rows, less the
    embedding table (a lookup)."""
    from hybrid_jax.aot.roofline import matmul_params

    cfg = PRESETS["qwen3_5_35b_a3b"]()
    fields = dict(HF_CONFIGS["qwen3_5_35b_a3b"], num_experts=cfg.num_experts_per_tok)
    fields.pop("model_type")
    with torch.device("meta"):
        model = transformers.Qwen3_5MoeForCausalLM(transformers.Qwen3_5MoeTextConfig(**fields))
    routers = (cfg.num_experts - cfg.num_experts_per_tok) * cfg.hidden_size * cfg.num_hidden_layers
    one_d = sum(p.numel() for p in model.parameters() if p.dim() == 1)
    active = (sum(p.numel() for p in model.parameters()) + routers - one_d
              - cfg.vocab_size * cfg.hidden_size)
    assert matmul_params(cfg) == active
