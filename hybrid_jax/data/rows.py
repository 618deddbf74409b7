"""Fixed-length rows cut from token arrays: a random-access source for grain.

Each array (a token file, or a tokenized text) is cut into ``seq_len``-token rows on its own: a
row never spans two files, whose boundary need not fall at a document's end, and an array's
last partial row is left out. Rows are numbered across the arrays in order; a ``TokenRows``
may cover a contiguous range of them (a held-out tail, say).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from hybrid_jax.data.token_files import DataError, expand_paths, token_file


class TokenRows:
    """Rows ``start .. stop - 1`` of ``arrays`` cut into ``seq_len`` tokens; ``rows[i]`` is
    [seq_len] int32, checked against ``vocab_size`` (a DataError names the array and the
    token's position in it). ``names`` name the arrays in errors and fingerprints."""

    def __init__(self, arrays: Sequence[np.ndarray], names: Sequence[str], seq_len: int,
                 vocab_size: int, start: int = 0, stop: int | None = None) -> None:
        if len(arrays) != len(names) or not arrays:
            raise DataError(f"TokenRows: {len(arrays)} arrays and {len(names)} names")
        if seq_len < 2:
            raise DataError(f"seq_len must be at least 2, got {seq_len}")
        self.arrays, self.names = tuple(arrays), tuple(str(n) for n in names)
        self.seq_len, self.vocab_size = int(seq_len), int(vocab_size)
        # First row number of each array, and the total as the last entry.
        counts = [len(a) // seq_len for a in self.arrays]
        self._first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        total = int(self._first[-1])
        stop = total if stop is None else stop
        if not 0 <= start <= stop <= total:
            raise DataError(f"TokenRows: rows [{start}, {stop}) are not within the "
                            f"{total} rows of {list(self.names)[:3]}")
        self.start, self.stop = int(start), int(stop)

    @classmethod
    def from_files(cls, patterns: Any, dtype: str, seq_len: int, vocab_size: int,
                   what: str = "data") -> TokenRows:
        """The rows of the token files ``patterns`` names (paths or globs, ``expand_paths``;
        DataError naming ``what``), each named by its absolute path (a checkpoint's data
        fingerprint does not change with the working directory)."""
        paths = [os.path.abspath(p) for p in expand_paths(patterns, what)]
        return cls([token_file(p, dtype) for p in paths], paths, seq_len, vocab_size)

    def __len__(self) -> int:
        return self.stop - self.start

    def locate(self, index: int) -> tuple[int, int]:
        """Row ``index`` (of this range) as (array number, first token's offset in it)."""
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        row = self.start + index
        array = int(np.searchsorted(self._first, row, side="right")) - 1
        return array, (row - int(self._first[array])) * self.seq_len

    def __getitem__(self, index: int) -> np.ndarray:
        array, offset = self.locate(int(index))
        row = np.asarray(self.arrays[array][offset:offset + self.seq_len]).astype(np.int32)
        if int(row.max()) >= self.vocab_size:
            t = int(np.argmax(row >= self.vocab_size))
            raise DataError(f"{self.names[array]}: token id {int(row[t])} at token "
                            f"{offset + t} is outside the vocabulary ({self.vocab_size})")
        return row

    def first(self, n: int) -> TokenRows:
        """The first ``n`` of these rows (all of them when there are fewer)."""
        return self._range(self.start, min(self.stop, self.start + n))

    def split(self, tail: float) -> tuple[TokenRows, TokenRows]:
        """(the rows before the last ``tail`` fraction, those last rows): a held-out tail
        kept out of training, the same rows whatever the seed."""
        if not 0.0 < tail < 1.0:
            raise DataError(f"held-out fraction must be in (0, 1), got {tail}")
        cut = self.stop - max(1, round(len(self) * tail))
        if cut <= self.start:
            raise DataError(f"{list(self.names)[:3]}: {len(self)} rows of {self.seq_len} "
                            f"tokens leave none for training after holding out {tail:.0%}")
        return self._range(self.start, cut), self._range(cut, self.stop)

    def _range(self, start: int, stop: int) -> TokenRows:
        return TokenRows(self.arrays, self.names, self.seq_len, self.vocab_size, start, stop)

    def fingerprint(self) -> dict:
        """What identifies these rows: arrays (name, tokens), seq_len, the row range."""
        return {"arrays": [[n, int(len(a))] for n, a in zip(self.names, self.arrays)],
                "seq_len": self.seq_len, "rows": [self.start, self.stop]}


__all__ = ["TokenRows"]
