"""Shared test set-up."""

from __future__ import annotations

import jax
import pytest


@pytest.fixture(autouse=True)
def _exact_float32_matmuls():
    """Full float32 matmuls everywhere: accelerators' default (TF32 / bf16 passes) is ~1e-3 off
    the float64 and transformers references."""
    with jax.default_matmul_precision("highest"):
        yield
