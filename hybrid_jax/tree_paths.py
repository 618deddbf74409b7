"""Pytree paths as plain keys: ``("stack", "blocks", "layers", 0, ...)``.

A generic helper below every other module (it imports only jax): the model's parameter
paths are read by sharding, training, AOT accounting and the converters alike.
"""

from __future__ import annotations

from typing import Any

import jax


def path_key(entry: Any) -> str | int:
    """The plain key of one pytree path entry (DictKey, SequenceKey, GetAttrKey, ...)."""
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return str(entry)


def path_keys(path: Any) -> tuple[str | int, ...]:
    """A whole pytree path (a sequence of entries) as a tuple of plain keys."""
    return tuple(path_key(k) for k in path)


def flat_paths(tree: Any, **flatten_kwargs: Any) -> dict[tuple[str | int, ...], Any]:
    """Plain-key path -> leaf of every leaf of ``tree``, in flattening order
    (``flatten_kwargs``, e.g. ``is_leaf``, go to ``tree_flatten_with_path``)."""
    return {path_keys(path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree, **flatten_kwargs)[0]}


def set_path(tree: Any, path: tuple[str | int, ...], value: Any) -> None:
    """Replace, in place, the leaf at plain-key ``path`` of nested dicts/lists ``tree``."""
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value
