"""Token files and token streams: OLMo-core's numpy format, paths and globs, text encoded into a
stream, and the segment ids of packed rows.

A token file is a headerless little-endian array of uint16 or uint32 ids (memory-mapped, never
read whole) in which every document ends with the EOS id.
"""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# Little-endian whatever the host: OLMo-core's files are.
TOKEN_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


class DataError(ValueError):
    """Unusable training data, naming the file or setting."""


def token_file(path: str | Path, dtype: str = "uint16") -> np.ndarray:
    """A memory-mapped token file (OLMo-core's numpy format: a headerless array of ``dtype``)."""
    path = Path(path)
    if dtype not in TOKEN_DTYPES:
        raise DataError(f"{path}: token dtype {dtype!r} is not one of {list(TOKEN_DTYPES)}")
    if not path.is_file():
        raise DataError(f"{path}: token file not found")
    itemsize = TOKEN_DTYPES[dtype].itemsize
    size = path.stat().st_size
    if size == 0 or size % itemsize:
        raise DataError(f"{path}: {size} bytes is not a whole, non-empty number of {dtype} "
                        f"tokens")
    return np.memmap(path, dtype=TOKEN_DTYPES[dtype], mode="r")


def expand_paths(patterns: str | Sequence[str], what: str = "data") -> list[str]:
    """Files named by ``patterns`` (paths or globs, in the order given; each glob's matches
    sorted), without repeats. DataError naming ``what`` and the pattern when one matches no
    file."""
    if isinstance(patterns, str | Path):
        patterns = [patterns]
    out: dict[str, None] = {}  # insertion-ordered, without repeats
    for pattern in patterns:
        pattern = str(pattern)
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if Path(m).is_file()]
        if not matches:
            raise DataError(f"{what}: {pattern!r} matches no file")
        out.update(dict.fromkeys(matches))
    return list(out)


def tokenize_text(text: str, codec, eos_id: int, doc_separator: str | None = "\n\n"
                  ) -> np.ndarray:
    """Token stream of ``text``: split into documents at ``doc_separator`` (None: one
    document), each encoded with ``codec`` (``hybrid_jax.inference.text``'s tokenizer.json or
    bytes codec) and ended with ``eos_id``. Returns uint32 ids."""
    docs = [text] if doc_separator is None else text.split(doc_separator)
    ids: list[int] = []
    for doc in docs:
        if doc.strip():
            ids.extend(codec.encode(doc))
            ids.append(eos_id)
    if not ids:
        raise DataError("tokenize_text: the text holds no document")
    return np.asarray(ids, np.uint32)


def segment_ids(row: np.ndarray, eos_id: int) -> np.ndarray:
    """[..., T] token rows -> int32 document numbers from 1; the EOS ending a document is part
    of it, so the token after it starts the next number."""
    ends = (row == eos_id).astype(np.int32)
    before = np.cumsum(ends, axis=-1, dtype=np.int32) - ends  # EOS strictly before each position
    return before + 1


__all__ = ["DataError", "TOKEN_DTYPES", "expand_paths", "segment_ids", "token_file",
           "tokenize_text"]
