"""Our parameter paths <-> transformers ``OlmoHybridForCausalLM`` tensor names and shapes.

Shared by ``from_hf`` (reading) and ``to_hf`` (writing). Two on-disk layouts use these names,
per HF layer N (prefix ``model.layers.N.``); ``from_hf`` reads both, ``to_hf`` writes either:

* ``"release"`` (``LAYOUT_RELEASE``), as AI2's released checkpoints hold the weights (written
  from OLMo-core's by transformers' ``convert_olmo_hybrid_weights_to_hf.py``): a GDN layer's
  norms are ``attention_layer_norm`` and ``feedforward_layer_norm``, an attention layer's
  ``post_attention_layernorm`` and ``post_feedforward_layernorm``, and
  ``linear_attn.{q,k,v}_conv1d.weight`` are the q, k and v convolutions themselves, [Kd, 1, K],
  [Kd, 1, K] and [Vd, 1, K], as OLMo-core's modules hold them.
* ``"save_pretrained"`` (``LAYOUT_SAVE_PRETRAINED``), what transformers 5.23's
  ``save_pretrained`` writes from the module, whose ``state_dict()`` names differ: it renames
  every layer's ``input_layernorm`` to ``attention_layer_norm`` and ``post_attention_layernorm``
  to ``feedforward_layer_norm`` (attention layers included), and cuts the module's fused
  ``linear_attn.conv1d.weight`` [2 Kd + Vd, 1, K] with ``torch.chunk(3)`` into three equal
  thirds (the last one smaller when the channel count is not a multiple of 3, whatever the
  q/k/v widths are) stored under the q, k and v names.

transformers loads either: on load it renames the norms back and concatenates the three convs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from hybrid_jax.config import ATTENTION, GDN, ModelConfig

Transform = Callable[[np.ndarray], np.ndarray]
CONV_NAMES = ("q", "k", "v")

# File names of a transformers checkpoint directory.
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# A tokenizer saved beside the weights (save_pretrained of a tokenizer); conversions carry these
# along so that a converted checkpoint still generates text (hybrid-jax generate reads
# tokenizer.json).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model")


def tokenizer_files(directory) -> list:
    """The ``TOKENIZER_FILES`` present in ``directory`` (none if it is not a directory)."""
    from pathlib import Path

    d = Path(directory)
    return [d / name for name in TOKENIZER_FILES if (d / name).is_file()]

_MAX_REPORTED = 30


def describe_problems(problems: list[str], title: str) -> str:
    """One message listing every problem found (the first 30), so a user fixes them in one go."""
    shown = problems[:_MAX_REPORTED]
    more = len(problems) - len(shown)
    lines = "\n".join(f"  - {p}" for p in shown) + (f"\n  ... and {more} more" if more else "")
    return f"{title} ({len(problems)} problem{'s' * (len(problems) > 1)}):\n{lines}"


def _identity(a: np.ndarray) -> np.ndarray:
    return a


def _transpose(a: np.ndarray) -> np.ndarray:
    """torch Linear [..., out, in] <-> kernel [..., in, out] (its own inverse)."""
    return np.swapaxes(np.asarray(a), -1, -2)


LAYOUT_RELEASE = "release"  # AI2's released checkpoints (and OLMo-core's convs)
LAYOUT_SAVE_PRETRAINED = "save_pretrained"  # transformers' save_pretrained of the module
LAYOUTS = (LAYOUT_RELEASE, LAYOUT_SAVE_PRETRAINED)


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")


@dataclass(frozen=True)
class Want:
    """One of our parameters and the checkpoint tensor(s) it may come from."""

    target: tuple[str | int, ...]  # path under the layer (or the model, for globals)
    names: tuple[str, ...]  # accepted names (relative to the layer prefix), on-disk name first
    shape: tuple[int, ...]  # checkpoint (torch) shape
    transposed: bool = False  # a Linear weight: torch [..., out, in], ours [..., in, out]
    release_name: str | None = None  # the release's name, where it is not ``names[0]``
    # Ours is these rows (torch's first axis) of the tensor, in this order: one part of a
    # fused tensor several of our parameters share (Qwen's GDN input projections).
    rows: tuple[int, ...] | None = None

    @property
    def disk_name(self) -> str:
        """The name transformers' ``save_pretrained`` writes."""
        return self.names[0]

    def name_in(self, layout: str) -> str:
        """The name this tensor has in ``layout`` (``LAYOUTS``)."""
        return (self.release_name or self.disk_name) if layout == LAYOUT_RELEASE else self.disk_name

    @property
    def transform(self) -> Transform:
        """Checkpoint array (its ``rows``) -> our array (and, being an involution, ours ->
        checkpoint rows)."""
        return _transpose if self.transposed else _identity

    @property
    def our_shape(self) -> tuple[int, ...]:
        shape = self.shape if self.rows is None else (len(self.rows), *self.shape[1:])
        return shape[:-2] + shape[-2:][::-1] if self.transposed else shape


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def global_wants(cfg: ModelConfig) -> list[Want]:
    d, v = cfg.hidden_size, cfg.vocab_size
    wants = [
        Want(("embed", "embedding"), ("model.embed_tokens.weight",), (v, d)),
        Want(("final_norm", "weight"), ("model.norm.weight",), (d,)),
    ]
    if not cfg.tie_word_embeddings:
        wants.append(Want(("lm_head", "kernel"), ("lm_head.weight",), (v, d), transposed=True))
    return wants


def mlp_wants(cfg: ModelConfig) -> list[Want]:
    d, f = cfg.hidden_size, cfg.intermediate_size
    return [
        Want(("mlp", "gate_proj", "kernel"), ("mlp.gate_proj.weight",), (f, d), True),
        Want(("mlp", "up_proj", "kernel"), ("mlp.up_proj.weight",), (f, d), True),
        Want(("mlp", "down_proj", "kernel"), ("mlp.down_proj.weight",), (d, f), True),
    ]


def gdn_wants(cfg: ModelConfig) -> list[Want]:
    """A GDN layer's tensors except the convs (see ``conv_targets`` / ``conv_disk_split``)."""
    d, hv, dv = cfg.hidden_size, cfg.linear_num_value_heads, cfg.linear_value_head_dim
    kd, vd = cfg.linear_key_dim, cfg.linear_value_dim
    proj = lambda n, out, inp: Want(("gdn", f"{n}_proj", "kernel"),
                                    (f"linear_attn.{n}_proj.weight",), (out, inp), True)
    return [
        Want(("pre_gdn_norm", "weight"),
             ("attention_layer_norm.weight", "input_layernorm.weight"), (d,)),
        Want(("pre_mlp_norm", "weight"),
             ("feedforward_layer_norm.weight", "post_attention_layernorm.weight"), (d,)),
        proj("q", kd, d), proj("k", kd, d), proj("v", vd, d), proj("a", hv, d), proj("b", hv, d),
        proj("g", vd, d), proj("o", d, vd),
        Want(("gdn", "A_log"), ("linear_attn.A_log",), (hv,)),
        Want(("gdn", "dt_bias"), ("linear_attn.dt_bias",), (hv,)),
        Want(("gdn", "o_norm", "weight"), ("linear_attn.o_norm.weight",), (dv,)),
        *mlp_wants(cfg),
    ]


def attention_wants(cfg: ModelConfig) -> list[Want]:
    d = cfg.hidden_size
    q_dim = cfg.num_attention_heads * cfg.head_dim
    kv_dim = cfg.num_key_value_heads * cfg.head_dim
    proj = lambda n, out, inp: Want(("attn", f"{n}_proj", "kernel"),
                                    (f"self_attn.{n}_proj.weight",), (out, inp), True)
    return [
        proj("q", q_dim, d), proj("k", kv_dim, d), proj("v", kv_dim, d), proj("o", d, q_dim),
        Want(("attn", "q_norm", "weight"), ("self_attn.q_norm.weight",), (q_dim,)),
        Want(("attn", "k_norm", "weight"), ("self_attn.k_norm.weight",), (kv_dim,)),
        Want(("post_attn_norm", "weight"),
             ("feedforward_layer_norm.weight", "post_attention_layernorm.weight"), (d,),
             release_name="post_attention_layernorm.weight"),
        Want(("post_mlp_norm", "weight"), ("post_feedforward_layernorm.weight",), (d,)),
        *mlp_wants(cfg),
    ]


def layer_wants(cfg: ModelConfig) -> dict[str, list[Want]]:
    """Per layer kind, its tensors (GDN convs excluded)."""
    return {GDN: gdn_wants(cfg), ATTENTION: attention_wants(cfg)}


def olmo_layer_wants(cfg: ModelConfig, mixer: str, mlp: str) -> list[Want]:
    """A layer's tensors (GDN convs excluded); OLMo Hybrid's MLPs are all dense."""
    return layer_wants(cfg)[mixer]


# ----------------------------------------------------------------------------- GDN convs
FUSED_CONV = "linear_attn.conv1d.weight"


def split_conv_names() -> tuple[str, ...]:
    return tuple(f"linear_attn.{n}_conv1d.weight" for n in CONV_NAMES)


def conv_targets(cfg: ModelConfig) -> dict[str, tuple[tuple[str, ...], int, int]]:
    """q/k/v -> (our path under the layer, first channel in the fused conv, channel count).

    Our conv weights are [C, K]; the fused torch conv is [2 Kd + Vd, 1, K] (q, k, v channels).
    """
    kd, vd = cfg.linear_key_dim, cfg.linear_value_dim
    return {"q": (("gdn", "q_conv", "weight"), 0, kd),
            "k": (("gdn", "k_conv", "weight"), kd, kd),
            "v": (("gdn", "v_conv", "weight"), 2 * kd, vd)}


def conv_disk_split(cfg: ModelConfig, layout: str = LAYOUT_RELEASE) -> list[tuple[str, int, int]]:
    """(name, first channel, channel count) in the fused [2 Kd + Vd] conv of each of
    ``linear_attn.{q,k,v}_conv1d.weight`` as ``layout`` writes them.

    ``"release"``: the q, k and v convolutions themselves (Kd, Kd and Vd channels).
    ``"save_pretrained"``: what ``torch.chunk(fused, 3, dim=0)`` cuts: chunks of ceil(C / 3)
    channels, the last one holding the remainder (and fewer than three chunks for tiny C; the
    missing ones are written with 0 channels).
    """
    check_layout(layout)
    if layout == LAYOUT_RELEASE:
        return [(name, start, count) for name, (_, start, count)
                in zip(split_conv_names(), conv_targets(cfg).values())]
    total = 2 * cfg.linear_key_dim + cfg.linear_value_dim
    step = -(-total // 3)
    out = []
    for i, name in enumerate(split_conv_names()):
        start = min(i * step, total)
        out.append((name, start, min(step, total - start)))
    return out
