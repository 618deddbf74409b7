"""Tensor-naming schemes ``from_hf`` reads, and their detection from a checkpoint's tensor names.

* ``transformers``: ``model.layers.N.*`` (see ``hf_names``), as ``save_pretrained`` writes them or
  as a module ``state_dict()`` names them (fused conv, ``input_layernorm``/``post_attention_layernorm``).
* OLMo-core, newer generation (the native ``olmo_core.nn.attention.recurrent.GatedDeltaNet``
  sequence mixer, stored under the block's ``attention`` attribute):
  ``blocks.N.attention.{w_q,w_k,w_v,w_a,w_b,w_g,w_out}.weight``,
  ``blocks.N.attention.{q,k,v}_conv1d.weight``, ``blocks.N.attention.{A_log,dt_bias}``,
  ``blocks.N.attention.o_norm.weight``; GDN blocks' ``attention_norm`` is the pre-GDN norm and
  ``feed_forward_norm`` the pre-MLP norm.
* OLMo-core, older generation (fla's ``GatedDeltaNet`` wrapped in ``olmo_core.nn.fla.layer.FLA``
  as the block's ``fla`` attribute): ``blocks.N.fla.inner.{q,k,v,a,b,g,o}_proj.weight``,
  ``blocks.N.fla.inner.{q,k,v}_conv1d.weight``, ``blocks.N.fla.inner.{A_log,dt_bias}``,
  ``blocks.N.fla.inner.o_norm.weight``; pre-GDN norm ``blocks.N.fla_norm``, pre-MLP norm
  ``blocks.N.feed_forward_norm``.
* Both OLMo-core generations: attention blocks ``blocks.N.attention.{w_q,w_k,w_v,w_out}.weight``,
  ``blocks.N.attention.{q_norm,k_norm}.weight``, with OLMo-core's "reordered norm" block:
  ``attention_norm`` applied to the attention output (our ``post_attn_norm``) and
  ``feed_forward_norm`` to the MLP output (``post_mlp_norm``); every block's MLP
  ``feed_forward.{w1,w2,w3}`` = gate, down, up; globals ``embeddings.weight``,
  ``lm_head.norm.weight`` (final norm), ``lm_head.w_out.weight`` (head).
  OLMo-core's conv weights are ``nn.Conv1d`` weights [C, 1, K] ([C, K] is accepted too); its Linear
  weights are [out, in] like torch's.

Sources: OLMo-core's ``src/olmo_core/nn/attention/recurrent.py`` (newer GDN attribute names),
``src/olmo_core/nn/fla/{layer,gated_deltanet}.py`` (older ``FLA.inner`` and fla's GDN names),
``src/olmo_core/nn/convolution.py`` (``CausalConv1d`` is an ``nn.Conv1d``), and the OLMo-core ->
transformers conversion scripts for OLMo Hybrid (norm roles: older ``fla_norm`` ->
``attention_layer_norm``, newer GDN ``attention_norm`` -> ``input_layernorm``; attention blocks'
``attention_norm`` -> ``post_attention_layernorm``, ``feed_forward_norm`` ->
``post_feedforward_layernorm``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from hybrid_jax.config import ATTENTION, GDN, ModelConfig
from hybrid_jax.convert import hf_names, qwen_names
from hybrid_jax.convert.hf_names import Want


class NamingError(ValueError):
    """Tensor names that mix namings; the message names example tensors of each."""


@dataclass(frozen=True)
class Naming:
    """How one checkpoint format names our parameters."""

    key: str  # "transformers", "olmo-core", "olmo-core-fla"
    description: str  # for messages: which naming was detected
    global_wants: Callable[[ModelConfig], list[Want]]
    layer_prefix: Callable[[int], str]
    layer_wants: Callable[[ModelConfig, str, str], list[Want]]  # (cfg, mixer, mlp kind)
    conv_names: tuple[str, ...]  # q, k, v convs, relative to the layer prefix (or none)
    fused_conv: str | None  # a fused q|k|v conv accepted instead (relative), if any
    exact_conv_split: bool  # convs must be exactly [Kd], [Kd], [Vd] channels
    embed_name: str
    head_name: str  # tolerated (ignored) when the embeddings are tied


TRANSFORMERS = Naming(
    key="transformers",
    description="transformers naming (model.layers.N.*)",
    global_wants=hf_names.global_wants,
    layer_prefix=hf_names.layer_prefix,
    layer_wants=hf_names.olmo_layer_wants,
    conv_names=hf_names.split_conv_names(),
    fused_conv=hf_names.FUSED_CONV,
    exact_conv_split=False,
    embed_name="model.embed_tokens.weight",
    head_name="lm_head.weight",
)

# ----------------------------------------------------------------------------- OLMo-core
# transformers state_dict / on-disk name (any of a Want's names) -> OLMo-core name.
_OC_GLOBALS = {
    "model.embed_tokens.weight": "embeddings.weight",
    "model.norm.weight": "lm_head.norm.weight",
    "lm_head.weight": "lm_head.w_out.weight",
}
_OC_MLP = {
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
}
_OC_ATTENTION = {
    "self_attn.q_proj.weight": "attention.w_q.weight",
    "self_attn.k_proj.weight": "attention.w_k.weight",
    "self_attn.v_proj.weight": "attention.w_v.weight",
    "self_attn.o_proj.weight": "attention.w_out.weight",
    "self_attn.q_norm.weight": "attention.q_norm.weight",
    "self_attn.k_norm.weight": "attention.k_norm.weight",
    "post_attention_layernorm.weight": "attention_norm.weight",  # applied to the attention output
    "post_feedforward_layernorm.weight": "feed_forward_norm.weight",  # applied to the MLP output
    **_OC_MLP,
}
_OC_GDN_NEW = {
    "linear_attn.q_proj.weight": "attention.w_q.weight",
    "linear_attn.k_proj.weight": "attention.w_k.weight",
    "linear_attn.v_proj.weight": "attention.w_v.weight",
    "linear_attn.a_proj.weight": "attention.w_a.weight",
    "linear_attn.b_proj.weight": "attention.w_b.weight",
    "linear_attn.g_proj.weight": "attention.w_g.weight",
    "linear_attn.o_proj.weight": "attention.w_out.weight",
    "linear_attn.A_log": "attention.A_log",
    "linear_attn.dt_bias": "attention.dt_bias",
    "linear_attn.o_norm.weight": "attention.o_norm.weight",
    "input_layernorm.weight": "attention_norm.weight",  # pre-GDN
    "post_attention_layernorm.weight": "feed_forward_norm.weight",  # pre-MLP
    **_OC_MLP,
}
_OC_GDN_OLD = {
    **{f"linear_attn.{p}_proj.weight": f"fla.inner.{p}_proj.weight" for p in "qkvabgo"},
    "linear_attn.A_log": "fla.inner.A_log",
    "linear_attn.dt_bias": "fla.inner.dt_bias",
    "linear_attn.o_norm.weight": "fla.inner.o_norm.weight",
    "input_layernorm.weight": "fla_norm.weight",  # pre-GDN
    "post_attention_layernorm.weight": "feed_forward_norm.weight",  # pre-MLP
    **_OC_MLP,
}


def _renamed(wants: list[Want], mapping: dict[str, str]) -> list[Want]:
    out = []
    for w in wants:
        name = next((mapping[n] for n in w.names if n in mapping), None)
        if name is None:
            raise AssertionError(f"internal: no OLMo-core name for {w.names}")
        out.append(Want(w.target, (name,), w.shape, w.transposed))
    return out


def _oc_global_wants(cfg: ModelConfig) -> list[Want]:
    return _renamed(hf_names.global_wants(cfg), _OC_GLOBALS)


def _oc_layer_wants(gdn_map: dict[str, str]) -> Callable[[ModelConfig, str, str], list[Want]]:
    def wants(cfg: ModelConfig, mixer: str, mlp: str) -> list[Want]:
        hf = hf_names.layer_wants(cfg)
        return {GDN: _renamed(hf[GDN], gdn_map),
                ATTENTION: _renamed(hf[ATTENTION], _OC_ATTENTION)}[mixer]

    return wants


def _oc_prefix(layer: int) -> str:
    return f"blocks.{layer}."


def _olmo_core(key: str, description: str, gdn_map: dict[str, str], conv_prefix: str) -> Naming:
    """An OLMo-core generation: the two differ only in their GDN block names."""
    return Naming(
        key=key,
        description=description,
        global_wants=_oc_global_wants,
        layer_prefix=_oc_prefix,
        layer_wants=_oc_layer_wants(gdn_map),
        conv_names=tuple(f"{conv_prefix}{c}_conv1d.weight" for c in "qkv"),
        fused_conv=None,
        exact_conv_split=True,
        embed_name="embeddings.weight",
        head_name="lm_head.w_out.weight",
    )


OLMO_CORE = _olmo_core(
    "olmo-core", "OLMo-core naming, newer generation (blocks.N.attention.* for GDN blocks)",
    _OC_GDN_NEW, "attention.")
OLMO_CORE_FLA = _olmo_core(
    "olmo-core-fla", "OLMo-core naming, older generation (blocks.N.fla.inner.* and "
    "blocks.N.fla_norm for GDN blocks)", _OC_GDN_OLD, "fla.inner.")

NAMINGS = (TRANSFORMERS, OLMO_CORE, OLMO_CORE_FLA)

# Qwen3.5 (dense, MoE) and Qwen3-Next: transformers names, one fused conv (``qwen_names``).
QWEN = dataclasses.replace(
    TRANSFORMERS, key="qwen",
    description="transformers naming of Qwen3.5 / Qwen3-Next (model.layers.N.*)",
    layer_wants=qwen_names.layer_wants, conv_names=(), fused_conv=qwen_names.FUSED_CONV)

# ----------------------------------------------------------------------------- detection
_HF_PREFIXES = ("model.",)
_OC_PREFIXES = ("blocks.", "embeddings.", "lm_head.norm.", "lm_head.w_out.")
_OC_OLD_GDN = re.compile(r"^blocks\.\d+\.(fla\.|fla_norm\.)")
_OC_NEW_GDN = re.compile(
    r"^blocks\.\d+\.attention\.(w_a|w_b|w_g|A_log|dt_bias|[qkv]_conv1d|o_norm)(\.|$)")
_EXAMPLES = 3


def _examples(names: list[str]) -> str:
    shown = ", ".join(names[:_EXAMPLES])
    return shown + (f", ... ({len(names)} tensors)" if len(names) > _EXAMPLES else "")


def detect_naming(names: Iterable[str]) -> Naming:
    """The naming a checkpoint's tensor names use (transformers when nothing else is recognised).

    Raises ``NamingError`` naming example tensors when transformers and OLMo-core names, or the two
    OLMo-core generations, are mixed.
    """
    names = sorted(names)
    hf = [n for n in names if n.startswith(_HF_PREFIXES) or n == "lm_head.weight"]
    oc = [n for n in names if n.startswith(_OC_PREFIXES)]
    if hf and oc:
        raise NamingError(f"mixed tensor namings: transformers names ({_examples(hf)}) and "
                          f"OLMo-core names ({_examples(oc)}); a checkpoint must use one naming")
    if not oc:
        return TRANSFORMERS
    old = [n for n in oc if _OC_OLD_GDN.match(n)]
    new = [n for n in oc if _OC_NEW_GDN.match(n)]
    if old and new:
        raise NamingError(
            f"mixed OLMo-core namings: older-generation GDN names ({_examples(old)}) and "
            f"newer-generation GDN names ({_examples(new)}); a checkpoint must use one naming")
    return OLMO_CORE_FLA if old else OLMO_CORE
