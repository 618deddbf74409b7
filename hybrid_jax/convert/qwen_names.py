"""Our parameter paths <-> the tensor names and layouts of Qwen3.5 (dense and MoE) and
Qwen3-Next checkpoints, as transformers 5.23 names them (``model.layers.N.``).

GDN layers (``linear_attn.``): one fused ``conv1d.weight`` [2 Kd + Vd, 1, K] over the q, k
and v channels in that order (cut into our three convs), ``A_log``, ``dt_bias`` [Hv],
``norm.weight`` [Dv] (our ``o_norm``), ``out_proj`` (our ``o_proj``), and fused input
projections, [out, in] each:

* Qwen3.5: ``in_proj_qkv`` [2 Kd + Vd, D] (q, k, v rows in order), ``in_proj_z`` [Vd, D]
  (our ``g_proj``), ``in_proj_b`` and ``in_proj_a`` [Hv, D].
* Qwen3-Next: ``in_proj_qkvz`` [2 Kd + 2 Vd, D], in groups of G = 2 dk + 2 r dv rows per key
  head g (r = Hv / Hk value heads per key head): q[g, :] at rows gG + [0, dk), k at
  gG + dk + [0, dk), then for j < r the values of value head h = g r + j at
  gG + 2 dk + j dv + [0, dv), then their z at gG + 2 dk + r dv + j dv + [0, dv).
  ``in_proj_ba`` [2 Hv, D] in groups of 2r rows per key head: b[g r + j] at row 2rg + j, a at
  2rg + r + j.

Attention layers (``self_attn.``): ``q_proj`` [H * 2 Dh, D] (each head's query rows, then its
output gate's), ``k_proj``, ``v_proj``, ``o_proj``, per-head ``q_norm`` / ``k_norm`` [Dh] (our
``q_head_norm`` / ``k_head_norm``).

Every layer: ``input_layernorm`` (before the mixer) and ``post_attention_layernorm`` (before
the MLP). MoE layers (``mlp.``): ``gate.weight`` [E, D] (our ``router``),
``experts.gate_up_proj`` [E, 2I, D] and ``experts.down_proj`` [E, D, I] (ours are the
transposes of each expert's matrix), ``shared_expert.{gate,up,down}_proj.weight``,
``shared_expert_gate.weight`` [1, D]. Dense layers: ``mlp.{gate,up,down}_proj.weight``.
"""

from __future__ import annotations

import numpy as np

from hybrid_jax.config import ATTENTION, GDN, MOE, ModelConfig
from hybrid_jax.convert.hf_names import Want, mlp_wants

FUSED_CONV = "linear_attn.conv1d.weight"
# The released Qwen3.5 checkpoints are vision-language models: the language model's tensors
# under this prefix (read as ``model.``), the vision tower's under ``VISION_PREFIX``.
LANGUAGE_MODEL_PREFIX = "model.language_model."
VISION_PREFIX = "model.visual."


def next_qkvz_rows(cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Qwen3-Next's ``in_proj_qkvz`` rows of our q, k (columns g dk + d), v and z (columns
    h dv + d, h = g r + j) projections, in our column order."""
    hk, hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    dk, dv, r = cfg.linear_key_head_dim, cfg.linear_value_head_dim, hv // hk
    group = 2 * dk + 2 * r * dv
    g = np.arange(hk)[:, None] * group
    q = g + np.arange(dk)
    values = g[:, :, None] + 2 * dk + np.arange(r)[:, None] * dv + np.arange(dv)  # [Hk, r, dv]
    return {"q": q.ravel(), "k": (q + dk).ravel(), "v": values.ravel(),
            "z": (values + r * dv).ravel()}


def next_ba_rows(cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Qwen3-Next's ``in_proj_ba`` rows of our b and a projections (column h = g r + j)."""
    hk, r = cfg.linear_num_key_heads, cfg.linear_num_value_heads // cfg.linear_num_key_heads
    b = (np.arange(hk)[:, None] * 2 * r + np.arange(r)).ravel()
    return {"b": b, "a": b + r}


def _proj(ours: str, name: str, shape: tuple[int, int], rows: np.ndarray | None = None) -> Want:
    return Want(("gdn", f"{ours}_proj", "kernel"), (f"linear_attn.{name}.weight",), shape, True,
                rows=None if rows is None else tuple(int(i) for i in rows))


def gdn_wants(cfg: ModelConfig) -> list[Want]:
    """A GDN mixer's tensors, convs excepted (``FUSED_CONV``, read as OLMo's fused conv)."""
    d, hv, dv = cfg.hidden_size, cfg.linear_num_value_heads, cfg.linear_value_head_dim
    kd, vd = cfg.linear_key_dim, cfg.linear_value_dim
    if cfg.model_type == "qwen3_next":
        qkvz, ba = next_qkvz_rows(cfg), next_ba_rows(cfg)
        projections = [_proj(n, "in_proj_qkvz", (2 * kd + 2 * vd, d), qkvz[m])
                       for n, m in (("q", "q"), ("k", "k"), ("v", "v"), ("g", "z"))]
        projections += [_proj(n, "in_proj_ba", (2 * hv, d), ba[n]) for n in "ba"]
    else:
        qkv = np.arange(2 * kd + vd)
        projections = [_proj("q", "in_proj_qkv", (2 * kd + vd, d), qkv[:kd]),
                       _proj("k", "in_proj_qkv", (2 * kd + vd, d), qkv[kd:2 * kd]),
                       _proj("v", "in_proj_qkv", (2 * kd + vd, d), qkv[2 * kd:]),
                       _proj("g", "in_proj_z", (vd, d)), _proj("b", "in_proj_b", (hv, d)),
                       _proj("a", "in_proj_a", (hv, d))]
    return [
        Want(("pre_gdn_norm", "weight"), ("input_layernorm.weight",), (d,)),
        *projections,
        _proj("o", "out_proj", (d, vd)),
        Want(("gdn", "A_log"), ("linear_attn.A_log",), (hv,)),
        Want(("gdn", "dt_bias"), ("linear_attn.dt_bias",), (hv,)),
        Want(("gdn", "o_norm", "weight"), ("linear_attn.norm.weight",), (dv,)),
    ]


def attention_wants(cfg: ModelConfig) -> list[Want]:
    d, hd = cfg.hidden_size, cfg.head_dim
    q_dim, kv_dim = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    proj = lambda n, out, inp: Want(("attn", f"{n}_proj", "kernel"),
                                    (f"self_attn.{n}_proj.weight",), (out, inp), True)
    return [
        Want(("pre_attn_norm", "weight"), ("input_layernorm.weight",), (d,)),
        proj("q", 2 * q_dim, d), proj("k", kv_dim, d), proj("v", kv_dim, d),
        proj("o", d, q_dim),
        Want(("attn", "q_head_norm", "weight"), ("self_attn.q_norm.weight",), (hd,)),
        Want(("attn", "k_head_norm", "weight"), ("self_attn.k_norm.weight",), (hd,)),
    ]


# The experts, fused (transformers 5's modules) or one tensor per expert and projection (what
# its save_pretrained writes, and the hub's Qwen3-Next checkpoints): both are read, the
# per-expert layout is written. Our path -> fused name.
FUSED_EXPERTS = {("mlp", "experts_gate_up"): "mlp.experts.gate_up_proj",
                 ("mlp", "experts_down"): "mlp.experts.down_proj"}


def expert_names(e: int) -> dict[str, str]:
    """Expert ``e``'s per-expert tensors: gate_proj, up_proj [I, D], down_proj [D, I]."""
    return {p: f"mlp.experts.{e}.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}


def moe_wants(cfg: ModelConfig) -> list[Want]:
    """An MoE block's tensors, the experts excepted (``FUSED_EXPERTS``, ``expert_names``)."""
    d, e = cfg.hidden_size, cfg.num_experts
    wants = [Want(("mlp", "router", "kernel"), ("mlp.gate.weight",), (e, d), True)]
    s = cfg.shared_expert_intermediate_size
    if s:
        wants += [Want(("mlp", "shared_expert") + w.target[1:],
                       (w.disk_name.replace("mlp.", "mlp.shared_expert."),), w.shape, True)
                  for w in mlp_wants(cfg.replace(intermediate_size=s))]
        wants.append(Want(("mlp", "shared_expert_gate", "kernel"),
                          ("mlp.shared_expert_gate.weight",), (1, d), True))
    return wants


def layer_wants(cfg: ModelConfig, mixer: str, mlp: str) -> list[Want]:
    """A layer's tensors (GDN convs excepted): its mixer's, its MLP's and their norms."""
    assert mixer in (GDN, ATTENTION), mixer
    mixed = gdn_wants(cfg) if mixer == GDN else attention_wants(cfg)
    norm = Want(("pre_mlp_norm", "weight"), ("post_attention_layernorm.weight",),
                (cfg.hidden_size,))
    return mixed + [norm] + (moe_wants(cfg) if mlp == MOE else mlp_wants(cfg))


def language_model_names(names: list[str]) -> tuple[dict[str, str], list[str]]:
    """For a vision-language checkpoint's tensor names: {text model name: stored name} (the
    ``LANGUAGE_MODEL_PREFIX`` read as ``model.``) and the vision tower's names (skipped)."""
    text, vision = {}, []
    for name in names:
        if name.startswith(VISION_PREFIX):
            vision.append(name)
        elif name.startswith(LANGUAGE_MODEL_PREFIX):
            text["model." + name[len(LANGUAGE_MODEL_PREFIX):]] = name
        else:
            text[name] = name
    return text, vision
