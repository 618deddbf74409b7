"""Qwen3.5 (dense and MoE) and Qwen3-Next against transformers on torch CPU: checkpoints written
by transformers' save_pretrained are loaded by ``from_hf`` and give the same logits (float32),
greedy tokens and load-balancing loss; ``to_hf`` writes them back tensor for tensor; a
vision-language checkpoint loads text-only; bad checkpoints name the culprit.

Tiny random models with odd widths, three value heads per key head, partial RoPE and, for the
MoE families, a mixed dense/MoE pattern, top-k equal to the expert count, and decode steps in
which most experts receive no token.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from safetensors import safe_open
from transformers import (
    Qwen3_5Config,
    Qwen3_5ForCausalLM,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeForCausalLM,
    Qwen3_5MoeTextConfig,
    Qwen3_5TextConfig,
    Qwen3NextConfig,
    Qwen3NextForCausalLM,
)

from hf_models import assert_close
from hybrid_jax import apply, generate, split
from hybrid_jax.convert import from_hf, to_hf
from hybrid_jax.convert.sources import CheckpointError
from hybrid_jax.ops.moe import load_balancing_loss
from hybrid_jax.train import make_train_step, model_template
from hybrid_jax.train.state import TrainState

VOCAB = 256  # raw UTF-8 bytes: hybrid-jax generate needs no tokenizer
COMMON = dict(
    vocab_size=VOCAB, hidden_size=48, intermediate_size=72, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=24, linear_num_key_heads=2,
    linear_num_value_heads=6, linear_key_head_dim=12, linear_value_head_dim=10,
    initializer_range=0.05, pad_token_id=None, eos_token_id=None,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})
MOE = dict(moe_intermediate_size=14, shared_expert_intermediate_size=18)
CASES = {
    # Dense, tied embeddings.
    "qwen3_5": (Qwen3_5TextConfig, Qwen3_5ForCausalLM, dict(tie_word_embeddings=True)),
    # Layer 1 dense (mlp_only_layers), top-k = all 4 experts, no renormalisation.
    "qwen3_next": (Qwen3NextConfig, Qwen3NextForCausalLM,
                   dict(MOE, num_experts=4, num_experts_per_tok=4, mlp_only_layers=[1],
                        norm_topk_prob=False)),
    # Every layer MoE, 2 of 7 experts, renormalised.
    "qwen3_5_moe": (Qwen3_5MoeTextConfig, Qwen3_5MoeForCausalLM,
                    dict(MOE, num_experts=7, num_experts_per_tok=2)),
}


def _perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Norms, decays, convs and gates moved off their init, so a misplaced one shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "A_log" in name or "dt_bias" in name or "conv1d" in name:
                p.copy_(0.3 * torch.randn_like(p))
    return model.eval()


def _hf_model(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    config_cls, model_cls, extra = CASES[name]
    cfg = config_cls(**{**COMMON, **extra, **overrides})
    cfg._experts_implementation = "eager"  # the grouped_mm default needs 16-byte strides
    torch.manual_seed(seed)
    return _perturb(model_cls(cfg))


@pytest.fixture(scope="module", params=list(CASES))
def family(request, tmp_path_factory):
    hf = _hf_model(request.param)
    ckpt = tmp_path_factory.mktemp(request.param) / "hf"
    hf.save_pretrained(ckpt)
    ours = from_hf(ckpt, gdn_method="chunk")
    return {"name": request.param, "hf": hf, "ckpt": ckpt, "ours": ours}


def _logits(model, ids) -> np.ndarray:
    graphdef, params = split(model)
    return np.asarray(jax.jit(apply)(graphdef, params, jnp.asarray(ids)))


def _hf_logits(hf, ids) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()


def test_config_and_logits_match_transformers(family):
    cfg = family["ours"].config
    assert cfg.model_type == family["hf"].config.model_type
    assert cfg.rotary_dim == 6 and cfg.head_dim == 24
    ids = np.random.default_rng(1).integers(0, VOCAB, (2, 37))
    assert_close(_logits(family["ours"], ids), _hf_logits(family["hf"], ids), rtol=1e-4)


def test_greedy_generation_matches_transformers(family):
    ids = np.random.default_rng(2).integers(0, VOCAB, (2, 9))
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(generate(family["ours"], ids, 8))
    with torch.no_grad():
        ref = family["hf"].generate(torch.as_tensor(ids), max_new_tokens=8, do_sample=False,
                                    attention_mask=torch.ones_like(torch.as_tensor(ids)),
                                    pad_token_id=0).numpy()
    np.testing.assert_array_equal(ours, ref)


def _tensors(directory: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(f, "np") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def test_export_round_trip(family, tmp_path):
    out = to_hf(family["ours"], tmp_path / "out")
    written, original = _tensors(out), _tensors(family["ckpt"])
    assert sorted(written) == sorted(original)
    for name, ref in original.items():
        np.testing.assert_array_equal(written[name], ref, err_msg=name)  # float32: exact
    config = json.loads((out / "config.json").read_text())
    _, model_cls, _ = CASES[family["name"]]
    assert config["model_type"] == family["hf"].config.model_type
    back = model_cls.from_pretrained(out, experts_implementation="eager").eval()
    ids = np.random.default_rng(3).integers(0, VOCAB, (1, 11))
    assert_close(_hf_logits(back, ids), _hf_logits(family["hf"], ids), rtol=1e-5)


def test_tied_router_scores_match_transformers(tmp_path):
    """Experts in pairs with equal router rows: every token's scores tie within each pair, and
    the top-2 is always one whole pair, so the chosen set does not depend on how ties break
    (at the k-th place we take the lower index, ``jax.lax.top_k``; torch.topk's order among
    ties is unspecified)."""
    hf = _hf_model("qwen3_5_moe", seed=4, num_experts=6)
    with torch.no_grad():
        for layer in hf.model.layers:
            w = layer.mlp.gate.weight  # [6, D]: pairs (0, 1), (2, 3), (4, 5)
            w[1::2] = w[0::2]
    hf.save_pretrained(tmp_path)
    ids = np.random.default_rng(5).integers(0, VOCAB, (1, 13))
    assert_close(_logits(from_hf(tmp_path, gdn_method="chunk"), ids), _hf_logits(hf, ids))


def test_load_balancing_loss_and_train_step_match_transformers(tmp_path):
    hf = _hf_model("qwen3_next", seed=6)
    hf.save_pretrained(tmp_path)
    model = from_hf(tmp_path, gdn_method="chunk")
    ids = np.random.default_rng(7).integers(0, VOCAB, (2, 16))
    with torch.no_grad():
        out = hf(torch.as_tensor(ids), labels=torch.as_tensor(ids), output_router_logits=True)
    _, stats = model.features_and_router_stats(jnp.asarray(ids))
    np.testing.assert_allclose(float(load_balancing_loss(stats)), float(out.aux_loss),
                               rtol=1e-5)
    # One train step's metrics: transformers' loss is ce + coef * aux.
    cfg = model.config
    template = model_template(cfg)
    step = jax.jit(make_train_step(template, optax.sgd(0.0)))
    params = nnx.to_pure_dict(split(model)[1])
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       opt_state=optax.sgd(0.0).init(params),
                       bad_steps=jnp.zeros((), jnp.int32))
    _, metrics = step(state, {"tokens": jnp.asarray(ids)[None]})
    np.testing.assert_allclose(float(metrics["aux_loss"]),
                               cfg.router_aux_loss_coef * float(out.aux_loss), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss"]), float(out.loss), rtol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_vision_language_checkpoint_loads_its_text_model(tmp_path, caplog, tied):
    """The head tied or not by the top-level tie_word_embeddings, as the vision-language class
    ties it (its text_config keeps the default)."""
    text = {k: v for k, v in COMMON.items() if k not in ("pad_token_id", "eos_token_id")}
    vision = dict(depth=1, hidden_size=32, intermediate_size=40, num_heads=2,
                  out_hidden_size=48)
    torch.manual_seed(8)
    vl = _perturb(Qwen3_5ForConditionalGeneration(
        Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=tied)))
    vl.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        model = from_hf(tmp_path, gdn_method="chunk")
    skipped = [r.getMessage() for r in caplog.records if "vision tower" in r.getMessage()]
    assert len(skipped) == 1 and "model.visual." in skipped[0]
    assert model.config.model_type == "qwen3_5_text"
    assert model.config.tie_word_embeddings == tied
    ids = np.random.default_rng(9).integers(0, VOCAB, (1, 21))
    assert_close(_logits(model, ids), _hf_logits(vl, ids))


def test_unsupported_model_type_names_itself_and_the_supported_ones(tmp_path):
    hf = _hf_model("qwen3_5")
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "kimi_linear"}))
    with pytest.raises(CheckpointError) as e:
        from_hf(tmp_path)
    msg = str(e.value)
    assert "'kimi_linear' is not supported" in msg
    for supported in ("olmo_hybrid", "qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_next"):
        assert supported in msg


def test_missing_expert_tensor_is_named_and_nothing_is_written(family, tmp_path):
    if family["name"] == "qwen3_5":
        pytest.skip("dense")
    from safetensors.numpy import save_file

    tensors = _tensors(family["ckpt"])
    gone = "model.layers.2.mlp.experts.1.up_proj.weight"
    del tensors[gone]
    src = tmp_path / "src"
    src.mkdir()
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    (src / "config.json").write_text((family["ckpt"] / "config.json").read_text())
    from hybrid_jax.convert.orbax_io import hf_to_orbax

    with pytest.raises(CheckpointError, match=f"missing tensor {gone.replace('.', '[.]')}"):
        hf_to_orbax(src, tmp_path / "orbax")
    assert not (tmp_path / "orbax").exists()


def test_convert_and_generate_commands(family, tmp_path, capsys):
    """hybrid-jax convert (both ways, then verify against transformers) and generate."""
    from hybrid_jax.cli import main

    if family["name"] != "qwen3_next":
        pytest.skip("one family through the commands")
    orbax, back = tmp_path / "orbax", tmp_path / "back"
    assert main(["convert", "hf-to-orbax", str(family["ckpt"]), str(orbax)]) == 0
    assert main(["convert", "orbax-to-hf", str(orbax), str(back)]) == 0
    original = _tensors(family["ckpt"])
    assert sorted(_tensors(back)) == sorted(original)
    assert main(["convert", "verify", str(family["ckpt"]), str(orbax), "--seq-len", "16"]) == 0
    assert "PASS" in capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(orbax), "--prompt", "AB",
                 "--max-new-tokens", "3"]) == 0
