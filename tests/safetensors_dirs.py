"""Reading whole safetensors checkpoint directories in tests, and comparing two bit for bit."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file


def read_all(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, read with the safetensors library; each file
    carries transformers' {"format": "pt"} metadata and no name appears twice."""
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(Path(ckpt).glob("*.safetensors")):
        with safe_open(str(f), "pt") as handle:
            assert handle.metadata() == {"format": "pt"}, f
        part = load_file(str(f))
        assert not set(part) & set(tensors)
        tensors.update(part)
    return tensors


def assert_same_tensors(ours: Path, ref: Path) -> None:
    """Same tensor names, dtypes, shapes and bytes in both directories."""
    a, b = read_all(ours), read_all(ref)
    assert sorted(a) == sorted(b), (set(a) ^ set(b))
    for name in b:
        assert a[name].dtype == b[name].dtype, (name, a[name].dtype, b[name].dtype)
        assert a[name].shape == b[name].shape, (name, a[name].shape, b[name].shape)
        same = torch.equal(a[name].contiguous().view(torch.uint8),
                           b[name].contiguous().view(torch.uint8))
        assert same, f"{name}: data differs"
