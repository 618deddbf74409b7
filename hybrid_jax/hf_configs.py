"""transformers ``config.json`` dicts <-> ``ModelConfig``, for each family we build.

One table per family (``FAMILIES``): its transformers model type and causal-LM class, the
defaults its config class fills in for fields a config.json may leave out, and the options of
``ModelConfig`` that are fixed for it (Qwen: zero-centred norms, per-head q/k norms, gated
attention, pre-norm attention layers, no negative GDN eigenvalues). OLMo Hybrid keeps its own
reader and writer (``ModelConfig.from_hf_dict`` / ``to_hf_dict``).

Vision-language checkpoints (``qwen3_5``, ``qwen3_5_moe``, as the released Qwen3.5 models are
saved) hold the language model's fields under ``text_config``; their text model is read and
the vision tower skipped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from hybrid_jax.config import (
    ATTENTION,
    DENSE_MLP,
    GDN,
    HF_SHAPE_FIELDS,
    MOE,
    ModelConfig,
    check_hf_dict,
    hf_dict_dtype,
)

log = logging.getLogger(__name__)

# Options of ModelConfig that every Qwen family fixes (transformers has no switch for them).
_QWEN_FIXED: dict[str, Any] = dict(
    zero_centered_norms=True, qk_norm="head", attention_output_gate=True,
    attention_post_norm=False, linear_allow_neg_eigval=False)
_OLMO_FIXED: dict[str, Any] = dict(
    zero_centered_norms=False, qk_norm="projection", attention_output_gate=False,
    attention_post_norm=True, partial_rotary_factor=1.0, attention_head_dim=None,
    linear_norm_eps=1e-5)

# transformers 5.23's config class defaults, for fields a config.json may omit.
_QWEN_COMMON: dict[str, Any] = dict(
    hidden_act="silu", max_position_embeddings=32768, initializer_range=0.02, rms_norm_eps=1e-6,
    tie_word_embeddings=False, head_dim=256, linear_conv_kernel_dim=4, linear_key_head_dim=128,
    linear_value_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=32,
    rope_theta=10000.0, partial_rotary_factor=0.25, full_attention_interval=4,
    pad_token_id=None, bos_token_id=None, eos_token_id=None)
_QWEN_MOE: dict[str, Any] = dict(
    moe_intermediate_size=512, shared_expert_intermediate_size=512,
    router_aux_loss_coef=0.001)


@dataclass(frozen=True)
class Family:
    """One model family's config.json conventions."""

    model_type: str  # the text model's transformers model_type
    architecture: str  # its causal-LM class
    description: str
    fixed: dict[str, Any]  # ModelConfig options the family fixes
    defaults: dict[str, Any] = field(default_factory=dict)
    vision_language: str | None = None  # model_type of the checkpoint class wrapping it
    vision_language_architecture: str | None = None  # that class


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("olmo_hybrid", "OlmoHybridForCausalLM", "OLMo Hybrid", _OLMO_FIXED),
    Family("qwen3_5_text", "Qwen3_5ForCausalLM", "Qwen3.5 (dense)", _QWEN_FIXED,
           dict(_QWEN_COMMON, vocab_size=248320, hidden_size=4096, intermediate_size=12288,
                num_hidden_layers=32, num_attention_heads=16, num_key_value_heads=4),
           vision_language="qwen3_5",
           vision_language_architecture="Qwen3_5ForConditionalGeneration"),
    Family("qwen3_5_moe_text", "Qwen3_5MoeForCausalLM", "Qwen3.5-MoE", _QWEN_FIXED,
           dict(_QWEN_COMMON, **_QWEN_MOE, vocab_size=248320, hidden_size=2048,
                num_hidden_layers=40, num_attention_heads=16, num_key_value_heads=2,
                num_experts=256, num_experts_per_tok=8),
           vision_language="qwen3_5_moe",
           vision_language_architecture="Qwen3_5MoeForConditionalGeneration"),
    Family("qwen3_next", "Qwen3NextForCausalLM", "Qwen3-Next", _QWEN_FIXED,
           dict(_QWEN_COMMON, **_QWEN_MOE, vocab_size=151936, hidden_size=2048,
                intermediate_size=5632, num_hidden_layers=48, num_attention_heads=16,
                num_key_value_heads=2, num_experts=512, num_experts_per_tok=10,
                decoder_sparse_step=1, norm_topk_prob=True, mlp_only_layers=[])),
)}
_VISION_LANGUAGE = {f.vision_language: f for f in FAMILIES.values() if f.vision_language}


def supported_model_types() -> list[str]:
    """Every config.json ``model_type`` ``config_from_hf`` reads."""
    return sorted([*FAMILIES, *_VISION_LANGUAGE])


def family_of(cfg: ModelConfig) -> Family:
    return FAMILIES[cfg.model_type]


def architecture_of(d: dict[str, Any]) -> str:
    """The transformers class that loads a checkpoint whose config.json is ``d`` (a supported
    family's; a vision-language config's wrapping class)."""
    model_type = d.get("model_type", "olmo_hybrid")
    if model_type in _VISION_LANGUAGE:
        return _VISION_LANGUAGE[model_type].vision_language_architecture
    return FAMILIES[model_type].architecture


def check_family(cfg: ModelConfig) -> None:
    """ValueError naming the field where ``cfg`` sets an option its family's transformers class
    cannot express (and so no transformers checkpoint could hold)."""
    fam = family_of(cfg)
    fixed = dict(fam.fixed)
    if fam.model_type != "olmo_hybrid":
        fixed["linear_norm_eps"] = cfg.rms_norm_eps
    for name, value in fixed.items():
        if getattr(cfg, name) != value:
            raise ValueError(f"ModelConfig.{name}: {fam.description} ({fam.architecture}) has "
                             f"{name}={value!r}, got {getattr(cfg, name)!r}")
    if fam.model_type == "olmo_hybrid" and cfg.has_moe:
        raise ValueError("ModelConfig.mlp_layer_types: OLMo Hybrid has no MoE layers")
    if fam.model_type == "qwen3_5_text" and cfg.has_moe:
        raise ValueError("ModelConfig.mlp_layer_types: Qwen3.5 (dense) has no MoE layers; "
                         "use model_type 'qwen3_5_moe_text'")
    if fam.model_type == "qwen3_5_moe_text" and DENSE_MLP in cfg.mlp_kinds:
        raise ValueError("ModelConfig.mlp_layer_types: Qwen3.5-MoE has an MoE in every layer")
    if fam.model_type == "qwen3_5_moe_text" and not cfg.norm_topk_prob:
        raise ValueError("ModelConfig.norm_topk_prob: Qwen3.5-MoE always renormalises the "
                         "top-k router probabilities")
    if fam.model_type != "olmo_hybrid" and cfg.has_moe and not cfg.shared_expert_intermediate_size:
        raise ValueError(f"ModelConfig.shared_expert_intermediate_size: {fam.description} "
                         f"always has a shared expert")
    if fam.model_type != "olmo_hybrid" and cfg.rope_theta is None:
        raise ValueError(f"ModelConfig.rope_theta: {fam.description} has RoPE (None is NoPE)")


# ----------------------------------------------------------------------------- reading
def text_fields(d: Any) -> tuple[Any, str | None]:
    """(the dict holding a config.json's model fields, the text model type it names): a
    vision-language config's ``text_config`` (its model type the family's where it names none);
    the dict itself otherwise."""
    model_type = d.get("model_type") if isinstance(d, dict) else None
    if model_type in _VISION_LANGUAGE:
        text = d.get("text_config")
        d = text if isinstance(text, dict) else {}
        model_type = d.get("model_type", _VISION_LANGUAGE[model_type].model_type)
    return d, model_type


def shape_fields(d: Any) -> tuple[Any, tuple[str, ...]]:
    """(``text_fields``' dict, the fields it must have to know the tensor shapes):
    Qwen3.5-MoE has no dense MLP width."""
    d, model_type = text_fields(d)
    if model_type == "qwen3_5_moe_text":
        return d, tuple(f for f in HF_SHAPE_FIELDS if f != "intermediate_size")
    return d, HF_SHAPE_FIELDS



def config_from_hf(d: Any, **overrides: Any) -> ModelConfig:
    """The ``ModelConfig`` of a transformers config.json dict of any supported family
    (``supported_model_types``); ``overrides`` replace fields (e.g. ``dtype``).

    Raises ValueError naming the field: an unsupported ``model_type`` (naming the supported
    ones), a wrongly typed field, a RoPE type other than the default."""
    if not isinstance(d, dict):
        raise ValueError(f"config: expected a dict, got {type(d).__name__}")
    model_type = d.get("model_type", "olmo_hybrid")
    if model_type in _VISION_LANGUAGE:
        d = _text_config(d, _VISION_LANGUAGE[model_type])
        model_type = d["model_type"]
    if model_type not in FAMILIES:
        raise ValueError(f"config.model_type: {model_type!r} is not supported; supported: "
                         f"{', '.join(supported_model_types())}")
    scaling = d.get("rope_scaling")
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) != "default":
        raise ValueError(f"config.rope_scaling: only default RoPE is supported, got "
                         f"{scaling.get('rope_type', scaling.get('type'))!r} (transformers "
                         f"would apply it)")
    if model_type == "olmo_hybrid":
        return ModelConfig.from_hf_dict(d, **overrides)
    return _qwen_from_dict(d, FAMILIES[model_type], overrides)


def _text_config(d: dict[str, Any], fam: Family) -> dict[str, Any]:
    """A vision-language config's text model config (its ``text_config``, with the top-level
    ``tie_word_embeddings`` and dtype where the text config has none)."""
    text = d.get("text_config")
    if not isinstance(text, dict):
        raise ValueError(f"config.text_config: a {d['model_type']!r} config needs the language "
                         f"model's fields as an object, got {text!r}")
    text = dict(text)
    text.setdefault("model_type", fam.model_type)
    if text["model_type"] != fam.model_type:
        raise ValueError(f"config.text_config.model_type: expected {fam.model_type!r} inside a "
                         f"{d['model_type']!r} config, got {text['model_type']!r}")
    for name in ("dtype", "torch_dtype"):
        if d.get(name) is not None:
            text.setdefault(name, d[name])
    # The vision-language class ties its head by the top-level value (transformers'
    # save_pretrained writes the text config's default beside it).
    if d.get("tie_word_embeddings") is not None:
        text["tie_word_embeddings"] = d["tie_word_embeddings"]
    log.debug("%s config: reading its text model (%s)", d["model_type"], fam.model_type)
    return text


_QWEN_INT = ("head_dim", "decoder_sparse_step", "full_attention_interval")
_QWEN_COUNT = ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
               "shared_expert_intermediate_size")
_QWEN_FLOAT = ("router_aux_loss_coef", "partial_rotary_factor")


def _check_qwen_dict(d: dict[str, Any]) -> None:
    """Type checks of the Qwen-only fields, naming the field (``check_hf_dict`` does the rest)."""
    def fail(name: str, msg: str) -> None:
        raise ValueError(f"config.json field {name!r}: {msg}")

    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    for name in _QWEN_INT + _QWEN_COUNT:
        v = d.get(name)
        if v is not None and not (is_int(v) and (v > 0 or name in _QWEN_COUNT and v == 0)):
            fail(name, f"expected a {'non-negative' if name in _QWEN_COUNT else 'positive'} "
                       f"integer, got {v!r}")
    for name in _QWEN_FLOAT:
        v = d.get(name)
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool)):
            fail(name, f"expected a number, got {v!r}")
    v = d.get("norm_topk_prob")
    if v is not None and not isinstance(v, bool):
        fail("norm_topk_prob", f"expected true or false, got {v!r}")
    v = d.get("mlp_only_layers")
    if v is not None and not (isinstance(v, list) and all(is_int(i) for i in v)):
        fail("mlp_only_layers", f"expected a list of layer indices, got {v!r}")


def _qwen_rope(d: dict[str, Any], fam: Family) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor) from ``rope_parameters`` or the older top-level
    fields. The mrope sections of Qwen3.5 reduce to plain RoPE for text positions."""
    rope = d.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"config.rope_parameters.rope_type: only 'default' RoPE is supported, "
                         f"got {rope.get('rope_type')!r}")
    pick = lambda name: next((v for v in (rope.get(name), d.get(name)) if v is not None),
                             fam.defaults[name])
    return float(pick("rope_theta")), float(pick("partial_rotary_factor"))


def _getter(d: dict[str, Any], fam: Family) -> Any:
    """name -> config.json's value, or the family's default where it is absent or null."""
    return lambda name: d[name] if d.get(name) is not None else fam.defaults.get(name)


def _qwen_layer_kinds(d: dict[str, Any], fam: Family, n: int
                      ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(layer_types, mlp_layer_types) as transformers builds them."""
    get = _getter(d, fam)
    layer_types = d.get("layer_types")
    if layer_types is None:
        interval = get("full_attention_interval")
        layer_types = [ATTENTION if (i + 1) % interval == 0 else GDN for i in range(n)]
    if fam.model_type == "qwen3_5_text":
        mlp = [DENSE_MLP] * n
    elif fam.model_type == "qwen3_5_moe_text":
        mlp = [MOE] * n
    else:  # Qwen3-Next: MoE where num_experts > 0, off mlp_only_layers, every sparse_step-th
        only, step = set(get("mlp_only_layers")), get("decoder_sparse_step")
        mlp = [MOE if get("num_experts") > 0 and i not in only and (i + 1) % step == 0
               else DENSE_MLP for i in range(n)]
    return tuple(layer_types), tuple(mlp)


def _qwen_from_dict(d: dict[str, Any], fam: Family, overrides: dict[str, Any]) -> ModelConfig:
    check_hf_dict(d)
    _check_qwen_dict(d)
    get = _getter(d, fam)
    n = get("num_hidden_layers")
    layer_types, mlp_types = _qwen_layer_kinds(d, fam, n)
    theta, factor = _qwen_rope(d, fam)
    eos = get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    dtype = hf_dict_dtype(d) or "float32"
    moe = MOE in mlp_types
    kwargs: dict[str, Any] = dict(
        model_type=fam.model_type,
        vocab_size=get("vocab_size"), hidden_size=get("hidden_size"),
        # Qwen3.5-MoE has no dense MLP; its unused intermediate_size is kept positive.
        intermediate_size=get("intermediate_size") or get("moe_intermediate_size"),
        num_hidden_layers=n, num_attention_heads=get("num_attention_heads"),
        num_key_value_heads=get("num_key_value_heads"), attention_head_dim=get("head_dim"),
        rms_norm_eps=float(get("rms_norm_eps")), linear_norm_eps=float(get("rms_norm_eps")),
        layer_types=layer_types, mlp_layer_types=mlp_types,
        linear_num_key_heads=get("linear_num_key_heads"),
        linear_num_value_heads=get("linear_num_value_heads"),
        linear_key_head_dim=get("linear_key_head_dim"),
        linear_value_head_dim=get("linear_value_head_dim"),
        linear_conv_kernel_dim=get("linear_conv_kernel_dim"),
        rope_theta=theta, partial_rotary_factor=factor,
        max_position_embeddings=get("max_position_embeddings"),
        tie_word_embeddings=bool(get("tie_word_embeddings")), hidden_act=get("hidden_act"),
        attention_bias=bool(d.get("attention_bias", False)),
        initializer_range=float(get("initializer_range")),
        pad_token_id=get("pad_token_id"), bos_token_id=get("bos_token_id"), eos_token_id=eos,
        dtype=dtype, param_dtype=dtype, **fam.fixed)
    if moe:
        kwargs.update(
            num_experts=get("num_experts"), num_experts_per_tok=get("num_experts_per_tok"),
            moe_intermediate_size=get("moe_intermediate_size"),
            shared_expert_intermediate_size=get("shared_expert_intermediate_size"),
            norm_topk_prob=(bool(get("norm_topk_prob"))
                            if fam.model_type == "qwen3_next" else True),
            router_aux_loss_coef=float(get("router_aux_loss_coef")))
    kwargs.update(overrides)
    return ModelConfig(**kwargs)


# ----------------------------------------------------------------------------- writing
def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The transformers config.json dict of ``cfg``'s family (checked by ``check_family``)."""
    check_family(cfg)
    fam = family_of(cfg)
    if fam.model_type == "olmo_hybrid":
        return cfg.to_hf_dict()
    d: dict[str, Any] = {
        "architectures": [fam.architecture], "model_type": fam.model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
        "hidden_act": cfg.hidden_act, "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.initializer_range, "rms_norm_eps": cfg.rms_norm_eps,
        "use_cache": True, "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                            "partial_rotary_factor": cfg.partial_rotary_factor},
        "attention_bias": False, "attention_dropout": 0.0,
        "layer_types": list(cfg.layer_types),
        "linear_conv_kernel_dim": cfg.linear_conv_kernel_dim,
        "linear_key_head_dim": cfg.linear_key_head_dim,
        "linear_value_head_dim": cfg.linear_value_head_dim,
        "linear_num_key_heads": cfg.linear_num_key_heads,
        "linear_num_value_heads": cfg.linear_num_value_heads,
        "pad_token_id": cfg.pad_token_id, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id, "dtype": cfg.param_dtype,
    }
    if fam.model_type != "qwen3_5_moe_text":
        d["intermediate_size"] = cfg.intermediate_size
    if fam.model_type != "qwen3_5_text":
        d.update(num_experts=cfg.num_experts if cfg.has_moe else 0,
                 num_experts_per_tok=cfg.num_experts_per_tok,
                 moe_intermediate_size=cfg.moe_intermediate_size,
                 shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
                 router_aux_loss_coef=cfg.router_aux_loss_coef, output_router_logits=False)
    if fam.model_type == "qwen3_next":
        d.update(decoder_sparse_step=1, norm_topk_prob=cfg.norm_topk_prob,
                 mlp_only_layers=[i for i, k in enumerate(cfg.mlp_kinds)
                                  if k == DENSE_MLP])
    return d
