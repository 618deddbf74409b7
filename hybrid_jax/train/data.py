"""Training data: token streams packed into fixed-length rows with segment ids, in a
deterministic, resumable, per-host order.

Sources give one flat stream of token ids in which every document ends with the EOS id:
``token_file`` reads OLMo-core's format (a raw little-endian uint16 or uint32 array, memory
mapped), ``tokenize_text`` tokenizes raw text (a Hugging Face tokenizer.json or UTF-8 bytes).

``PackedDataset`` cuts the stream into rows of ``seq_len`` tokens. Segment ids number the
documents inside a row from 1 (a document's EOS belongs to it), so the model's attention,
convolutions and GDN state restart at every document, and the loss never predicts across one.
Batch ``i`` is a pure function of (seed, i): an epoch's rows are a seeded permutation, the global
batch takes the next ``global_batch`` rows of it, and each process takes its contiguous slice.
Resuming at step i needs nothing but i.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


class DataError(ValueError):
    """Unusable training data, naming the file or setting."""


def token_file(path: str | Path, dtype: str = "uint16") -> np.ndarray:
    """A memory-mapped token file (OLMo-core's numpy format: a headerless array of ``dtype``)."""
    path = Path(path)
    if dtype not in TOKEN_DTYPES:
        raise DataError(f"{path}: token dtype {dtype!r} is not one of {list(TOKEN_DTYPES)}")
    if not path.is_file():
        raise DataError(f"{path}: token file not found")
    itemsize = np.dtype(TOKEN_DTYPES[dtype]).itemsize
    size = path.stat().st_size
    if size == 0 or size % itemsize:
        raise DataError(f"{path}: {size} bytes is not a whole, non-empty number of {dtype} "
                        f"tokens")
    return np.memmap(path, dtype=TOKEN_DTYPES[dtype], mode="r")


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
    before = np.cumsum(ends, axis=-1) - ends  # EOS tokens strictly before each position
    return before + 1


@dataclass(frozen=True)
class PackedDataset:
    """Fixed-length rows of a token stream, batched deterministically.

    Args:
      tokens: the stream (any integer array, e.g. a memmap from ``token_file``).
      seq_len: tokens per row.
      global_batch: rows per step across all processes.
      eos_id: the document separator.
      vocab_size: ids must be below it (checked on each batch).
      seed: permutation seed; epoch e uses (seed, e).
    """

    tokens: np.ndarray
    seq_len: int
    global_batch: int
    eos_id: int
    vocab_size: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise DataError(f"seq_len must be at least 2, got {self.seq_len}")
        if self.global_batch < 1:
            raise DataError(f"global_batch must be positive, got {self.global_batch}")
        if self.num_rows < self.global_batch:
            raise DataError(f"{len(self.tokens)} tokens make {self.num_rows} rows of "
                            f"{self.seq_len}, fewer than one global batch of "
                            f"{self.global_batch}")

    @property
    def num_rows(self) -> int:
        return len(self.tokens) // self.seq_len

    @property
    def steps_per_epoch(self) -> int:
        return self.num_rows // self.global_batch

    def _rows(self, step: int) -> np.ndarray:
        epoch, index = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
        return order[index * self.global_batch:(index + 1) * self.global_batch]

    def batch(self, step: int, process_index: int = 0, process_count: int = 1
              ) -> dict[str, np.ndarray]:
        """This process's rows of global batch ``step``: "tokens" and "segment_ids"
        [global_batch / process_count, seq_len] int32."""
        if step < 0:
            raise DataError(f"step must be >= 0, got {step}")
        if self.global_batch % process_count:
            raise DataError(f"global_batch {self.global_batch} is not divisible by "
                            f"{process_count} processes")
        per = self.global_batch // process_count
        rows = self._rows(step)[process_index * per:(process_index + 1) * per]
        tokens = np.stack([np.asarray(self.tokens[r * self.seq_len:(r + 1) * self.seq_len])
                           for r in rows]).astype(np.int64)
        bad = (tokens < 0) | (tokens >= self.vocab_size)
        if bad.any():
            r, t = np.argwhere(bad)[0]
            raise DataError(f"token id {tokens[r, t]} at stream position "
                            f"{rows[r] * self.seq_len + t} is outside the vocabulary "
                            f"({self.vocab_size})")
        return {"tokens": tokens.astype(np.int32),
                "segment_ids": segment_ids(tokens, self.eos_id)}
