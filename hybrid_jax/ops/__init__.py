"""Pure functions: attention, convolution, norms, rope, projections and the LM head's chunked
loss; the gated delta rule's public names, re-exported from ``hybrid_jax.gdn``."""

from hybrid_jax.ops.attention import cached_attention, causal_attention, segment_positions
from hybrid_jax.ops.blockwise_attention import blockwise_causal_attention
from hybrid_jax.ops.conv import (causal_conv1d, causal_conv1d_context_parallel,
                                 causal_conv1d_continue)
from hybrid_jax.gdn import (
    FORMS,
    METHODS,
    gated_delta_rule,
    gdn_step,
    l2_normalize,
    resolve_method,
    segment_resets,
)
from hybrid_jax.ops.lm_head_loss import lm_head_loss_sums
from hybrid_jax.ops.norms import gated_rms_norm, rms_norm
from hybrid_jax.ops.rope import apply_rope, rope_cos_sin, rope_inv_freq

__all__ = [
    "FORMS",
    "METHODS",
    "apply_rope",
    "blockwise_causal_attention",
    "cached_attention",
    "causal_attention",
    "causal_conv1d",
    "causal_conv1d_context_parallel",
    "causal_conv1d_continue",
    "gated_delta_rule",
    "gated_rms_norm",
    "gdn_step",
    "l2_normalize",
    "lm_head_loss_sums",
    "resolve_method",
    "rms_norm",
    "rope_cos_sin",
    "rope_inv_freq",
    "segment_positions",
    "segment_resets",
]
