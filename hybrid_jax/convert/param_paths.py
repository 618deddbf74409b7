"""Pytree paths as plain keys: ``("stack", "blocks", "layers", 0, ...)``."""

from __future__ import annotations

from typing import Any


def path_key(entry: Any) -> str | int:
    """The plain key of one pytree path entry (DictKey, SequenceKey, GetAttrKey, ...)."""
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return str(entry)
