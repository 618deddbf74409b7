"""Model FLOPs and a roofline estimate of a step's time from XLA's per-device cost.

Model FLOPs count what the architecture needs per token (no recomputation from remat), the
numerator of MFU; XLA's FLOPs count what the compiled program does (recomputation
included). The roofline time is the larger of compute at peak and HBM traffic at full
bandwidth: a lower bound that leaves out collectives and any overlap lost, so the MFU it
gives is an upper bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hybrid_jax.aot.chips import ChipSpec
from hybrid_jax.config import ATTENTION, GDN, ModelConfig
from hybrid_jax.tree_paths import flat_paths


_EXPERTS = ("experts_gate_up", "experts_down")


def matmul_params(config: ModelConfig) -> float:
    """Parameters that multiply each token's activations: every weight of two or more
    dimensions except the embedding table (a lookup), which counts when it is tied to the
    output layer; of the MoE experts, the num_experts_per_tok / num_experts a token uses."""
    from hybrid_jax.train.state import model_template

    total = 0.0
    active = config.num_experts_per_tok / config.num_experts if config.has_moe else 1.0
    for keys, leaf in flat_paths(model_template(config).abstract).items():
        # A decoder parameter's own dimensions: the stack adds a leading [n] to each.
        ndim = len(leaf.shape) - (keys[:2] == ("stack", "blocks"))
        if ndim >= 2 and (keys[0] != "embed" or config.tie_word_embeddings):
            expert = any(k in _EXPERTS for k in keys)
            total += math.prod(leaf.shape) * (active if expert else 1.0)
    return total


def forward_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of a [.., seq_len] sequence: 2 per matmul parameter; causal
    attention's scores and values, 2 * seq_len * heads * head_dim per layer (each query sees
    seq_len / 2 keys on average); each GDN head's chunked form, three [Dk, Dv] state products
    and the chunk-wide (C = gdn_chunk_size) products q k^T, k k^T, T k (Dk) and T v, intra v
    (Dv)."""
    c, dk, dv = config.gdn_chunk_size, config.linear_key_head_dim, config.linear_value_head_dim
    attention = 2 * seq_len * config.num_attention_heads * config.head_dim
    gdn = config.linear_num_value_heads * (6 * dk * dv + 2 * c * (3 * dk + 2 * dv))
    layers = config.layer_types
    return (2 * matmul_params(config) + attention * layers.count(ATTENTION)
            + gdn * layers.count(GDN))


def train_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of training on one token of a [.., seq_len] sequence: 3x the forward's
    (``model_flops``' train program per token; the numerator of a training run's MFU)."""
    return 3 * forward_flops_per_token(config, seq_len)


def model_flops(config: ModelConfig, program: str, batch: int, seq_len: int) -> float:
    """Model FLOPs of one call of ``program`` over ``batch`` rows: training 3x the forward
    (forward, and backward's two products per forward one); prefill the forward of seq_len
    positions; a decode step one position against seq_len cached ones."""
    if program == "train":
        return 3 * batch * seq_len * forward_flops_per_token(config, seq_len)
    if program == "prefill":
        return batch * seq_len * forward_flops_per_token(config, seq_len)
    if program == "decode":  # one query against seq_len keys: twice the causal average
        return batch * forward_flops_per_token(config, 2 * seq_len)
    raise ValueError(f"model_flops: unknown program {program!r}")


@dataclass(frozen=True)
class Roofline:
    """Per-device roofline of one call: seconds at peak compute and at full HBM bandwidth,
    the estimate (their max), what bounds it, and the MFU that time gives."""

    compute_s: float
    memory_s: float
    mfu: float

    @property
    def seconds(self) -> float:
        return max(self.compute_s, self.memory_s)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"


def roofline(xla_flops: float, xla_bytes: float, model_flops_total: float, n_devices: int,
             device: ChipSpec) -> Roofline:
    """From XLA's per-device FLOPs and bytes of one call, and the call's model FLOPs (all
    devices together)."""
    compute_s = xla_flops / device.peak_bf16_flops
    memory_s = xla_bytes / device.hbm_bytes_per_s
    seconds = max(compute_s, memory_s)
    mfu = model_flops_total / (n_devices * device.peak_bf16_flops * seconds) if seconds else 0.0
    return Roofline(compute_s, memory_s, mfu)
