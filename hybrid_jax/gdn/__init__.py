"""The gated delta rule, in one place.

``gated_delta_rule`` (``rule.py``) is the one public entry: it checks and prepares the inputs
and runs one of four forms, which agree to float32 rounding:

    recurrent.py      token by token (``lax.scan``): the readable reference; ``gdn_step`` is
                      the decode step
    chunk_factors.py  what is local to a chunk (gates, the WY/UT solve, intra-chunk
                      attention), in XLA
    chunk.py          chunk by chunk: ``chunk_state_step`` carries the state across chunks
    assoc_scan.py     all chunks' states from an associative scan of their affine maps
    context_parallel.py  the rule on a sequence split over a mesh axis (inside shard_map)
    pallas/           the chunk form as Pallas kernels, forward and backward

Each Pallas stage mirrors an XLA twin: ``pallas/chunk_factors.py`` (and its VJP,
``pallas/chunk_factors_vjp.py``) matches ``chunk_factors.py``; ``pallas/state_pass.py`` and
``pallas/state_pass_tpu.py`` match ``chunk.chunk_state_step``; ``pallas/step_cotangents.py``
matches that step's autodiff.
"""

from hybrid_jax.gdn.chunk import chunk_state_step, gdn_chunk
from hybrid_jax.gdn.chunk_factors import ChunkFactors, chunk_factors
from hybrid_jax.gdn.context_parallel import gated_delta_rule_context_parallel
from hybrid_jax.gdn.recurrent import gdn_recurrent, gdn_step
from hybrid_jax.gdn.rule import (
    FORMS,
    METHODS,
    gated_delta_rule,
    l2_normalize,
    resolve_method,
    segment_resets,
)

__all__ = [
    "FORMS",
    "METHODS",
    "ChunkFactors",
    "chunk_factors",
    "chunk_state_step",
    "gated_delta_rule",
    "gated_delta_rule_context_parallel",
    "gdn_chunk",
    "gdn_recurrent",
    "gdn_step",
    "l2_normalize",
    "resolve_method",
    "segment_resets",
]
