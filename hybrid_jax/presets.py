"""Named model configurations: OLMo Hybrid's (``config``) and the released Qwen3.5 and
Qwen3-Next shapes.

The Qwen presets are written as the text model's config.json fields of each release, read by
``hf_configs.config_from_hf`` like a checkpoint's (so a preset and the checkpoint it names give
the same ``ModelConfig``); ``tests/test_presets.py`` checks their parameter counts against
transformers' models built on the meta device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hybrid_jax.config import (
    ModelConfig,
    olmo_hybrid_7b,
    olmo_hybrid_bytes,
    olmo_hybrid_small,
    olmo_hybrid_tiny,
)
from hybrid_jax.hf_configs import config_from_hf

# Fields every released Qwen3.5 text model shares (the hub's text_config).
_QWEN3_5 = dict(
    vocab_size=248320, head_dim=256, linear_key_head_dim=128, linear_value_head_dim=128,
    linear_num_key_heads=16, linear_conv_kernel_dim=4, full_attention_interval=4,
    rms_norm_eps=1e-6, max_position_embeddings=262144, hidden_act="silu", eos_token_id=248044,
    rope_parameters={"rope_type": "default", "rope_theta": 10000000.0,
                     "partial_rotary_factor": 0.25})
_QWEN3_5_MOE = dict(_QWEN3_5, model_type="qwen3_5_moe_text", router_aux_loss_coef=0.001,
                    tie_word_embeddings=False)


def _dense(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
           value_heads: int, tied: bool) -> dict[str, Any]:
    return dict(_QWEN3_5, model_type="qwen3_5_text", hidden_size=hidden,
                intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads,
                linear_num_value_heads=value_heads, tie_word_embeddings=tied)


def _moe(hidden: int, layers: int, heads: int, value_heads: int, experts: int, top_k: int,
         width: int) -> dict[str, Any]:
    return dict(_QWEN3_5_MOE, hidden_size=hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=2,
                linear_num_value_heads=value_heads, num_experts=experts,
                num_experts_per_tok=top_k, moe_intermediate_size=width,
                shared_expert_intermediate_size=width)


# Released text models: their config.json fields (HF hub Qwen/<name>, text_config); and tiny ones.
HF_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen3_5_0_8b": _dense(1024, 3584, 24, 8, 2, 16, tied=True),
    "qwen3_5_2b": _dense(2048, 6144, 24, 8, 2, 16, tied=True),
    "qwen3_5_4b": _dense(2560, 9216, 32, 16, 4, 32, tied=True),
    "qwen3_5_9b": _dense(4096, 12288, 32, 16, 4, 32, tied=False),
    "qwen3_5_27b": _dense(5120, 17408, 64, 24, 4, 48, tied=False),
    "qwen3_5_35b_a3b": _moe(2048, 40, 16, 32, experts=256, top_k=8, width=512),
    "qwen3_5_122b_a10b": _moe(3072, 48, 32, 64, experts=256, top_k=8, width=1024),
    "qwen3_5_397b_a17b": _moe(4096, 60, 32, 64, experts=512, top_k=10, width=1024),
    "qwen3_next_80b_a3b": dict(
        model_type="qwen3_next", vocab_size=151936, hidden_size=2048, intermediate_size=5120,
        num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=2, head_dim=256,
        linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
        linear_value_head_dim=128, linear_conv_kernel_dim=4, full_attention_interval=4,
        rope_theta=10000000.0, partial_rotary_factor=0.25, rms_norm_eps=1e-6,
        max_position_embeddings=262144, tie_word_embeddings=False, num_experts=512,
        num_experts_per_tok=10, moe_intermediate_size=512, shared_expert_intermediate_size=512,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        router_aux_loss_coef=0.001, bos_token_id=151643, eos_token_id=151645),
}


# Few-hundred-thousand-parameter models of each Qwen family with a 256-token vocabulary (the
# byte corpus), for tests and CPU runs.
_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2,
             linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
             max_position_embeddings=4096, eos_token_id=None,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                              "partial_rotary_factor": 0.25})
HF_CONFIGS.update({
    "qwen3_5_tiny": dict(_TINY, model_type="qwen3_5_text"),
    "qwen3_5_moe_tiny": dict(_TINY, model_type="qwen3_5_moe_text", num_experts=8,
                             num_experts_per_tok=2, moe_intermediate_size=32,
                             shared_expert_intermediate_size=32),
})


def _from_hf_config(name: str) -> Callable[..., ModelConfig]:
    def preset(**overrides: Any) -> ModelConfig:
        return config_from_hf(HF_CONFIGS[name], **overrides)

    preset.__name__ = name
    preset.__doc__ = f"The {name} text model's shapes (``HF_CONFIGS[{name!r}]``)."
    return preset


PRESETS: dict[str, Callable[..., ModelConfig]] = {
    "bytes": olmo_hybrid_bytes,
    "olmo_hybrid_7b": olmo_hybrid_7b,
    "small": olmo_hybrid_small,
    "tiny": olmo_hybrid_tiny,
    **{name: _from_hf_config(name) for name in HF_CONFIGS},
}
