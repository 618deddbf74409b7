"""The training input pipeline on grain: a weighted mixture of token sources, packed rows with
segment ids, each process reading only its own rows, with prefetch.

Global batch ``s`` is a pure function of (sources, weights, seed, s): every source's rows are
shuffled by grain's index shuffle (a fresh permutation each epoch, computed per index, never
materialised), sources are interleaved in proportion to their weights (``MapDataset.mix``: a
fixed pattern, the smallest weight scaled to 100 and the others rounded down, so weights
0.3 / 0.7 give shares 100 / 233), and the mixed stream is cut into global batches of
``global_batch`` rows. Process ``p`` of ``P``
reads rows ``[p * G/P, (p + 1) * G/P)`` of each global batch, so the processes' rows are
disjoint and stacked in process order make the one-process batch. The iterator's state is the
next step alone, so a run resumes at exactly the next batch on any process count that divides
the global batch.

Segment ids number the documents inside a row from 1 (a document's EOS belongs to it), so the
model's attention, convolutions and GDN state restart at every document and the loss never
predicts across one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import grain
import numpy as np

from hybrid_jax.data.rows import TokenRows
from hybrid_jax.data.token_files import DataError, segment_ids

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class ReadConfig:
    """How a process reads: ``threads`` reading rows in parallel, ``prefetch`` batches read
    ahead of the one consumed (host memory holds at most that many batches)."""

    threads: int = 2
    prefetch: int = 4

    def __post_init__(self) -> None:
        for name in ("threads", "prefetch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise DataError(f"data.{name}: expected an int >= 0, got {value!r}")


@dataclass(frozen=True, eq=False)
class Source:
    """A named source of rows and its mixture weight (relative; weights need not sum to 1)."""

    name: str
    rows: TokenRows
    weight: float = 1.0

    def __post_init__(self) -> None:
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w <= 0:
            raise DataError(f"data source {self.name!r}: weight must be a positive number, "
                            f"got {w!r}")
        if len(self.rows) == 0:
            raise DataError(f"data source {self.name!r}: no row of {self.rows.seq_len} tokens")


def _source_seed(seed: int, index: int) -> int:
    """A 32-bit shuffle seed for source ``index`` of a run seeded ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


@dataclass(frozen=True, eq=False)
class PackedDataset:
    """Rows of ``seq_len`` tokens from a weighted mixture of ``sources``, ``global_batch`` a
    step, in an order set by ``seed`` (see the module docstring).

    ``batch(step, p, P)`` reads one batch at random; ``iterator(first_step, p, P, read)``
    streams them with prefetch. Both give "tokens" and "segment_ids" [G/P, seq_len] int32.
    """

    sources: tuple[Source, ...]
    global_batch: int
    eos_id: int
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.sources:
            raise DataError("data: no source")
        lengths = {s.rows.seq_len for s in self.sources}
        if len(lengths) > 1:
            raise DataError(f"data sources cut rows of different lengths {sorted(lengths)}")
        names = [s.name for s in self.sources]
        if len(set(names)) < len(names):
            raise DataError(f"data sources: names repeat in {names}")
        if self.global_batch < 1:
            raise DataError(f"global_batch must be positive, got {self.global_batch}")
        if self.num_rows < self.global_batch:
            raise DataError(f"{self.num_rows} rows of {self.seq_len} tokens in all are fewer "
                            f"than one global batch of {self.global_batch}")

    @classmethod
    def from_tokens(cls, tokens: np.ndarray, seq_len: int, global_batch: int, eos_id: int,
                    vocab_size: int, seed: int = 0, name: str = "tokens") -> PackedDataset:
        """One source: a single token stream (a memmapped file, a tokenized text)."""
        rows = TokenRows([tokens], [name], seq_len, vocab_size)
        return cls((Source(name, rows),), global_batch, eos_id, seed)

    @property
    def seq_len(self) -> int:
        return self.sources[0].rows.seq_len

    @property
    def num_rows(self) -> int:
        """Rows over all sources (one pass over each)."""
        return sum(len(s.rows) for s in self.sources)

    def rows(self) -> grain.MapDataset:
        """The endless mixed stream of rows, [seq_len] int32 each."""
        streams = [grain.MapDataset.source(s.rows).shuffle(seed=_source_seed(self.seed, i))
                   .repeat() for i, s in enumerate(self.sources)]
        if len(streams) == 1:
            return streams[0]
        return grain.MapDataset.mix(streams, [s.weight for s in self.sources])

    def local_batches(self, process_index: int = 0, process_count: int = 1
                      ) -> grain.MapDataset:
        """Element ``s``: this process's rows of global batch ``s``, packed."""
        if not 0 <= process_index < process_count:
            raise DataError(f"process {process_index} of {process_count}")
        if self.global_batch % process_count:
            raise DataError(f"global_batch {self.global_batch} does not split over "
                            f"{process_count} processes")
        per = self.global_batch // process_count
        eos = self.eos_id
        local = self.rows().batch(per, drop_remainder=True)[process_index::process_count]
        return local.map(lambda rows: {"tokens": rows, "segment_ids": segment_ids(rows, eos)})

    def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> Batch:
        """This process's rows of global batch ``step``."""
        if step < 0:
            raise DataError(f"step must be >= 0, got {step}")
        return self.local_batches(process_index, process_count)[step]

    def iterator(self, first_step: int, process_index: int = 0, process_count: int = 1,
                 read: ReadConfig = ReadConfig()) -> grain.DatasetIterator:
        """This process's batches from ``first_step`` on, read ahead by ``read``'s threads;
        its ``get_state()`` is ``{"next_index": the next step}``."""
        options = grain.ReadOptions(num_threads=read.threads,
                                    prefetch_buffer_size=read.prefetch)
        it = iter(self.local_batches(process_index, process_count).to_iter_dataset(options))
        it.set_state({"next_index": int(first_step)})
        return it

    def fingerprint(self) -> dict:
        """What fixes the batches: sources (name, weight, arrays, rows), batch, EOS, seed."""
        return {"sources": [{"name": s.name, "weight": float(s.weight), **s.rows.fingerprint()}
                            for s in self.sources],
                "global_batch": self.global_batch, "eos_id": self.eos_id, "seed": self.seed}


def data_state(dataset: PackedDataset, next_step: int, process_count: int) -> dict:
    """What a checkpoint keeps of the input pipeline: the next step (every process's
    iterator position), the process count that wrote it, and the data's fingerprint."""
    return {"next_step": int(next_step), "process_count": int(process_count),
            "data": dataset.fingerprint()}


def resume_changes(saved: dict, dataset: PackedDataset, step: int) -> list[str]:
    """How ``dataset`` at ``step`` differs from a checkpoint's ``data_state``: each entry
    names a changed setting (empty: the run continues with exactly the next batch)."""
    changes = []
    if int(saved.get("next_step", -1)) != step:
        changes.append(f"the data state is at step {saved.get('next_step')}, the model at "
                       f"step {step}")
    before, now = saved.get("data", {}), dataset.fingerprint()
    for key in sorted(set(before) | set(now)):
        if before.get(key) != now.get(key):
            changes.append(f"{key}: {_short(before.get(key))} -> {_short(now.get(key))}")
    return changes


def _short(value: object, limit: int = 160) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + " ..."


__all__ = ["Batch", "PackedDataset", "ReadConfig", "Source", "data_state", "resume_changes"]
