"""Shared test set-up."""

from __future__ import annotations

import jax

# Full float32 matmuls everywhere, module-scoped fixtures included: accelerators' default (TF32 /
# bf16 passes) is ~1e-3 off the float64 and transformers references. Set for the whole session
# (not per test) so that a fixture's compile is reused by its tests rather than redone.
jax.config.update("jax_default_matmul_precision", "highest")
