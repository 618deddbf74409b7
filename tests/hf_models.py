"""Helpers for tests against transformers' OLMo Hybrid: small random torch models and comparisons."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from transformers import OlmoHybridConfig, OlmoHybridForCausalLM
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()  # the "falling back to the reference implementation" notices
logging.getLogger("transformers").setLevel(logging.ERROR)

# Small but with every size distinct where it can be (heads, head dims, value heads), so that a
# mixed-up axis shows up as a shape error rather than a silent transpose.
SMALL = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=24,
    initializer_range=0.05,
    pad_token_id=None,
    eos_token_id=None,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)
NOPE = {"rope_type": "default", "rope_theta": None}


def hf_config(**overrides: Any) -> OlmoHybridConfig:
    kwargs = dict(SMALL)
    kwargs.update(overrides)
    return OlmoHybridConfig(**kwargs)


def make_hf_model(seed: int = 0, **overrides: Any) -> OlmoHybridForCausalLM:
    """A float32 random model whose norms, decays and convs are moved away from their init, so
    that a wrong norm weight, gate or conv tap changes the logits."""
    torch.manual_seed(seed)
    model = OlmoHybridForCausalLM(hf_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name or "layer_norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("A_log"):
                p.copy_(0.7 * torch.randn_like(p))  # decays from weak to strong
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn_like(p) - 1.0)
            elif "conv1d" in name:
                p.copy_(0.5 * torch.randn_like(p))
            elif name.endswith("b_proj.weight"):
                p.copy_(0.3 * torch.randn_like(p))  # beta spread over (0, 1) or (0, 2)
    return model


def hf_logits(model: OlmoHybridForCausalLM, input_ids: np.ndarray,
              position_ids: np.ndarray | None = None) -> np.ndarray:
    kw = {} if position_ids is None else {"position_ids": torch.as_tensor(position_ids, dtype=torch.long)}
    with torch.no_grad():
        ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
        return model(ids, **kw).logits.float().numpy()


def random_ids(seed: int, batch: int, length: int, vocab: int = SMALL["vocab_size"]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, length), dtype=np.int32)


def assert_close(ours: Any, ref: np.ndarray, rtol: float = 1e-4) -> None:
    """Relative error of the whole tensor and of its largest entry, both within rtol."""
    ours = np.asarray(ours, np.float32)
    ref = np.asarray(ref, np.float32)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert np.all(np.isfinite(ours)), "non-finite values"
    rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    max_abs = np.max(np.abs(ours - ref))
    scale = np.max(np.abs(ref))
    assert rel <= rtol, f"relative error {rel:.3e} > {rtol:.1e}"
    assert max_abs <= rtol * scale, f"max abs error {max_abs:.3e} > {rtol:.1e} * {scale:.3e}"


def save_release_layout(model: OlmoHybridForCausalLM, path: Any, **save_kwargs: Any) -> None:
    """Save ``model`` as AI2's released checkpoints hold the weights (transformers'
    ``convert_olmo_hybrid_weights_to_hf.py`` writes them from OLMo-core's):
    ``linear_attn.{q,k,v}_conv1d.weight`` are the q, k and v convolutions themselves, [Kd, 1, K],
    [Kd, 1, K] and [Vd, 1, K], cut here from the fused conv the torch module holds, and an
    attention layer's post-attention norm is ``post_attention_layernorm.weight``. Everything else
    is what ``save_pretrained`` writes (which stores equal thirds under the conv names and renames
    that norm ``feedforward_layer_norm``)."""
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    cfg = model.config
    kd = cfg.linear_num_key_heads * cfg.linear_key_head_dim
    vd = cfg.linear_num_value_heads * cfg.linear_value_head_dim
    state = model.state_dict()
    model.save_pretrained(path, **save_kwargs)
    index_path = Path(path) / "model.safetensors.index.json"
    renamed = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        tensors = load_file(str(f))
        for name in list(tensors):
            layer = ".".join(name.split(".")[:3]) + "."  # model.layers.N.
            if name.endswith("linear_attn.q_conv1d.weight"):
                fused = state[layer + "linear_attn.conv1d.weight"]
                assert fused.shape[0] == 2 * kd + vd
                cuts = ((0, kd), (kd, 2 * kd), (2 * kd, 2 * kd + vd))
                for part, (a, b) in zip("qkv", cuts):
                    tensors[f"{layer}linear_attn.{part}_conv1d.weight"] = fused[a:b].clone()
            elif (name.endswith("feedforward_layer_norm.weight")
                  and cfg.layer_types[int(name.split(".")[2])] == "full_attention"):
                new = layer + "post_attention_layernorm.weight"
                tensors[new] = tensors.pop(name)
                renamed[name] = new
        save_file(tensors, str(f), metadata={"format": "pt"})
    if index_path.is_file():
        import json

        index = json.loads(index_path.read_text())
        index["weight_map"] = {renamed.get(k, k): v for k, v in index["weight_map"].items()}
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
