"""The decoder layer: a token mixer (Gated DeltaNet or attention), then an MLP (SwiGLU or a
mixture of experts), each in a residual branch with an RMSNorm.

The norms sit before each branch (pre-norm), except in OLMo Hybrid's attention layers
(``config.attention_post_norm``, OLMo 2's "reordered norm"), which norm each branch's output:
``h = x + post_attn_norm(attn(x)); out = h + post_mlp_norm(mlp(h))``.
"""

from __future__ import annotations

import jax
from flax import nnx

from hybrid_jax.config import ATTENTION, GDN, MOE, ModelConfig
from hybrid_jax.model.attention import Attention
from hybrid_jax.model.cache import LayerCache
from hybrid_jax.model.gated_deltanet import GatedDeltaNet
from hybrid_jax.model.mlp import MoE, SwiGLU
from hybrid_jax.model.norms import RMSNorm
from hybrid_jax.ops.moe import RouterStats

Rope = tuple[jax.Array, jax.Array] | None


def _hidden_norm(config: ModelConfig) -> RMSNorm:
    """An RMSNorm over the residual stream [.., hidden_size]."""
    return RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=config.params_dtype,
                   zero_centered=config.zero_centered_norms)


class DecoderLayer(nnx.Module):
    """One layer of kind ``mixer`` ("linear_attention": GDN; "full_attention") and ``mlp``
    ("dense"; "moe").

    Parameters: GDN layers ``pre_gdn_norm``, ``gdn``; attention layers ``attn`` with
    ``post_attn_norm`` (post-norm) or ``pre_attn_norm``; then ``mlp`` with ``post_mlp_norm``
    (post-norm) or ``pre_mlp_norm``.
    """

    def __init__(self, config: ModelConfig, mixer: str, mlp: str, *, rngs: nnx.Rngs) -> None:
        self.mixer_kind = mixer
        self.post_norm = mixer == ATTENTION and config.attention_post_norm
        make_mlp = (lambda: MoE(config, rngs=rngs)) if mlp == MOE else (
            lambda: SwiGLU(config, rngs=rngs))
        if mixer == GDN:
            self.pre_gdn_norm = _hidden_norm(config)
            self.gdn = GatedDeltaNet(config, rngs=rngs)
        elif self.post_norm:
            self.attn = Attention(config, rngs=rngs)
            self.post_attn_norm = _hidden_norm(config)
        else:
            self.pre_attn_norm = _hidden_norm(config)
            self.attn = Attention(config, rngs=rngs)
        if self.post_norm:
            self.mlp = make_mlp()
            self.post_mlp_norm = _hidden_norm(config)
        else:
            self.pre_mlp_norm = _hidden_norm(config)
            self.mlp = make_mlp()

    def __call__(self, x: jax.Array, *, rope: Rope = None,
                 segment_ids: jax.Array | None = None
                 ) -> tuple[jax.Array, RouterStats | None]:
        """x: [B, T, D] -> ([B, T, D], the MoE router's statistics or None for a dense MLP).
        ``rope`` is (cos, sin) or None (NoPE, and unused by GDN layers)."""
        if self.mixer_kind == GDN:
            with jax.named_scope("gdn"):  # names in profiles (experiments/profile_train_step.py)
                mixed = self.gdn(self.pre_gdn_norm(x), segment_ids=segment_ids)
        else:
            with jax.named_scope("attention"):
                mixed = self.attn(x if self.post_norm else self.pre_attn_norm(x), rope=rope,
                                  segment_ids=segment_ids)
        return self._finish(x, mixed, segment_ids)

    def extend(self, x: jax.Array, cache: LayerCache, *, valid: jax.Array | None,
               slots: jax.Array, rope: Rope = None) -> tuple[jax.Array, LayerCache]:
        """Cached form of ``__call__`` (``GatedDeltaNet.extend``, ``Attention.extend``)."""
        if self.mixer_kind == GDN:
            mixed, cache = self.gdn.extend(self.pre_gdn_norm(x), cache, valid=valid)
        else:
            mixed, cache = self.attn.extend(x if self.post_norm else self.pre_attn_norm(x),
                                            cache, valid=valid, slots=slots, rope=rope)
        return self._finish(x, mixed)[0], cache

    def _finish(self, x: jax.Array, mixed: jax.Array, segment_ids: jax.Array | None = None
                ) -> tuple[jax.Array, RouterStats | None]:
        """The mixer's residual, then the MLP branch."""
        if self.post_norm:
            h = x + self.post_attn_norm(mixed)
            with jax.named_scope("mlp"):
                out, stats = self._mlp(h, segment_ids)
                return h + self.post_mlp_norm(out), stats
        h = x + mixed
        with jax.named_scope("mlp"):
            out, stats = self._mlp(self.pre_mlp_norm(h), segment_ids)
            return h + out, stats

    def _mlp(self, x: jax.Array, segment_ids: jax.Array | None
             ) -> tuple[jax.Array, RouterStats | None]:
        """The MLP, and an MoE's router statistics over the tokens outside padding (segment
        0, as the train step's loss mask has it)."""
        if isinstance(self.mlp, MoE):
            return self.mlp(x, None if segment_ids is None else segment_ids != 0)
        return self.mlp(x), None


def make_layer(mixer: str, mlp: str, config: ModelConfig, *, rngs: nnx.Rngs) -> DecoderLayer:
    """A decoder layer of the given kinds (``config.LAYER_KINDS``, ``config.MLP_KINDS``)."""
    return DecoderLayer(config, mixer, mlp, rngs=rngs)
