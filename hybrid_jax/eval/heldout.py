"""Held-out evaluation: loss, perplexity and bits per byte of token rows the model never
trained on, sharded like training.

A held-out set is rows of token files (or a training source's held-out tail) evaluated in
order, all of them, in batches of ``batch`` rows (the last one filled with padding rows of
segment 0, which are never scored). Each row is scored like a training row: the next-token
cross-entropy of every position whose next token is in the same document. Over a set:

    loss = sum of cross-entropies / scored tokens          (nats per token)
    perplexity = exp(loss)
    bits_per_byte = sum of cross-entropies / ln 2 / UTF-8 bytes of the scored tokens

The scored tokens' bytes come from the codec (each row's documents decoded on their own, so a
multi-byte character cut by a row's start is counted as the codec decodes the piece; exact for
UTF-8 byte codecs); without a codec there is no bits per byte.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hybrid_jax.data.rows import TokenRows
from hybrid_jax.data.token_files import DataError, segment_ids
from hybrid_jax.sharding import LogicalRules, batch_sharding, check_batch
from hybrid_jax.train.state import ModelTemplate
from hybrid_jax.train.step import make_loss_fn


@dataclass(frozen=True, eq=False)
class HeldoutSet:
    """``rows`` evaluated in order; ``byte_counts`` [rows] int64: UTF-8 bytes of each row's
    scored tokens (None: no codec, no bits per byte)."""

    name: str
    rows: TokenRows
    eos_id: int
    byte_counts: np.ndarray | None = None


def scored_pieces(row: np.ndarray, eos_id: int) -> list[np.ndarray]:
    """[T] ids -> the tokens the loss scores (every token whose predecessor is in its
    document: not a row's first token, nor a document's first), one array per document."""
    seg = segment_ids(row, eos_id)
    scored = np.concatenate([[False], seg[1:] == seg[:-1]])
    return [row[scored & (seg == s)] for s in np.unique(seg)]


def heldout_set(name: str, rows: TokenRows, eos_id: int, codec=None,
                max_rows: int | None = None) -> HeldoutSet:
    """A held-out set of ``rows`` (the first ``max_rows`` of them when given), with each
    row's scored bytes when ``codec`` (``hybrid_jax.inference.text``) is given."""
    if len(rows) == 0:
        raise DataError(f"held-out set {name!r}: no row of {rows.seq_len} tokens")
    if max_rows is not None:
        rows = rows.first(max_rows)
    counts = None
    if codec is not None:
        counts = np.asarray([sum(codec.byte_length(p[p != eos_id].tolist())
                                 for p in scored_pieces(rows[i], eos_id))
                             for i in range(len(rows))], np.int64)
    return HeldoutSet(name, rows, eos_id, counts)


def local_batches(held: HeldoutSet, batch: int, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of each evaluation batch ("tokens", "segment_ids" [batch / P, T]
    int32), the last batch padded with segment-0 rows."""
    if batch < 1 or batch % process_count:
        raise DataError(f"held-out batch {batch} does not split over {process_count} "
                        f"processes")
    per = batch // process_count
    n, seq_len = len(held.rows), held.rows.seq_len
    for first in range(0, n, batch):
        start = first + process_index * per
        tokens = np.zeros((per, seq_len), np.int32)
        segments = np.zeros((per, seq_len), np.int32)
        for j, r in enumerate(range(start, min(start + per, n))):
            tokens[j] = held.rows[r]
            segments[j] = segment_ids(tokens[j], held.eos_id)
        yield {"tokens": tokens, "segment_ids": segments}


class HeldoutEvaluator:
    """``evaluator(params) -> {set name: metrics}`` over ``sets``, ``batch`` rows at a time,
    on ``mesh`` (rows over data x fsdp, as training) or one device. Metrics: loss, perplexity,
    bits_per_byte (when the set has byte counts), tokens (scored)."""

    def __init__(self, template: ModelTemplate, sets: list[HeldoutSet], batch: int, *,
                 mesh: Mesh | None = None, rules: LogicalRules | None = None) -> None:
        names = [s.name for s in sets]
        if len(set(names)) < len(names):
            raise DataError(f"held-out sets: names repeat in {names}")
        self.sets, self.batch = list(sets), int(batch)
        self.sharding = batch_sharding(mesh, rules) if mesh is not None else None
        if self.sharding is not None:
            for held in self.sets:
                check_batch((self.batch, held.rows.seq_len), self.sharding,
                            f"held-out batch of {held.name!r} [rows, positions]")
        loss_fn = make_loss_fn(template, mesh=mesh, rules=rules)

        def sums(params: dict, batch: dict) -> dict:
            out = loss_fn(params, batch)[1]
            return {"ce": out["ce"], "tokens": out["tokens"]}

        replicated = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
        self._sums = jax.jit(sums, out_shardings=replicated)

    def _global(self, local: dict[str, np.ndarray]) -> dict:
        if self.sharding is None:
            return {k: jnp.asarray(v) for k, v in local.items()}
        return {k: jax.make_array_from_process_local_data(self.sharding, v)
                for k, v in local.items()}

    def evaluate(self, params: dict, held: HeldoutSet) -> dict[str, float]:
        """One set's metrics (see the module docstring)."""
        index, count = jax.process_index(), jax.process_count()
        # Each batch's sums stay on the device until the set is done: the host never waits
        # for a batch before dispatching the next. Added up in float64 on the host.
        sums = [self._sums(params, self._global(local))
                for local in local_batches(held, self.batch, index, count)]
        sums = jax.device_get(sums)
        ce = float(np.sum([float(s["ce"]) for s in sums], dtype=np.float64))
        tokens = float(np.sum([float(s["tokens"]) for s in sums], dtype=np.float64))
        if tokens == 0:
            raise DataError(f"held-out set {held.name!r}: no token to score")
        loss = ce / tokens
        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens}
        if held.byte_counts is not None and held.byte_counts.sum() > 0:
            metrics["bits_per_byte"] = ce / math.log(2) / float(held.byte_counts.sum())
        return metrics

    def __call__(self, params: dict) -> dict[str, dict[str, float]]:
        return {held.name: self.evaluate(params, held) for held in self.sets}


__all__ = ["HeldoutEvaluator", "HeldoutSet", "heldout_set", "local_batches", "scored_pieces"]
