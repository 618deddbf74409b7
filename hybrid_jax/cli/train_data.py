"""``hybrid-jax train``'s data from its configuration: the training mixture, the held-out
sets it is evaluated on, and the EOS id that ends its documents."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hybrid_jax.cli.common import ConfigError
from hybrid_jax.cli.train_config import TrainConfig
from hybrid_jax.data import PackedDataset, ReadConfig, Source, TokenRows
from hybrid_jax.data import tokenize_text
from hybrid_jax.eval.choice import ChoiceTask, read_choice_task
from hybrid_jax.eval.heldout import HeldoutSet, heldout_set


@dataclass(frozen=True, eq=False)
class TrainData:
    """The training batches, the held-out sets, the EOS id, the read settings, the first
    tokens of the first source (where --sample's default prompt comes from), and the
    multiple-choice tasks evaluated during training."""

    dataset: PackedDataset
    heldout: tuple[HeldoutSet, ...]
    eos: int
    read: ReadConfig
    head: np.ndarray
    choice: tuple[ChoiceTask, ...] = ()


def _eos(cfg: TrainConfig) -> int:
    """Token files need the model's EOS id; text takes it, else 0."""
    eos = cfg.model.eos_token_id
    if eos is None and not cfg.data.text:
        raise ConfigError("model.eos_token_id: needed to split documents in token files")
    return 0 if eos is None else int(eos)


def _sources(cfg: TrainConfig, codec: Any, eos: int) -> list[Source]:
    """The configured sources, whole (before any held-out tail is cut)."""
    data = cfg.data
    if data.text:
        codec.check_vocab(cfg.model.vocab_size)
        tokens = tokenize_text(Path(data.text).read_text(encoding="utf-8"), codec, eos,
                               data.doc_separator)
        return [Source("text", TokenRows([tokens], [data.text], data.seq_len,
                                         cfg.model.vocab_size))]
    if data.path:
        return [Source("data", TokenRows.from_files(data.path, data.dtype, data.seq_len,
                                                    cfg.model.vocab_size, "data.path"))]
    out = []
    for i, spec in enumerate(data.sources):
        name = str(spec.get("name", f"source{i}"))
        rows = TokenRows.from_files(spec["paths"], spec.get("dtype", data.dtype),
                                    data.seq_len, cfg.model.vocab_size,
                                    f"data.sources[{i}] ({name})")
        out.append(Source(name, rows, spec.get("weight", 1.0)))
    return out


def _split_holdout(sources: list[Source], fraction: float
                   ) -> tuple[list[Source], list[tuple[str, TokenRows]]]:
    """Each source without its held-out tail, and the tails by set name."""
    kept, tails = [], []
    for s in sources:
        train_rows, tail = s.rows.split(fraction)
        kept.append(Source(s.name, train_rows, s.weight))
        tails.append(("holdout" if len(sources) == 1 else f"holdout.{s.name}", tail))
    return kept, tails


def build_data(cfg: TrainConfig, codec: Any, bytes_codec: Any | None) -> TrainData:
    """The run's data. ``codec`` encodes text; ``bytes_codec`` (None: none) counts the
    held-out sets' bytes for bits per byte. Raises ConfigError / DataError naming the
    setting or file."""
    data, ev = cfg.data, cfg.eval
    eos = _eos(cfg)
    sources = _sources(cfg, codec, eos)
    head = np.asarray(sources[0].rows.arrays[0][:256])
    named: list[tuple[str, TokenRows]] = []
    if data.holdout:
        if ev.every is None:
            raise ConfigError("data.holdout: set eval.every, the steps between evaluations "
                              "of the held-out rows")
        sources, named = _split_holdout(sources, data.holdout)
    for name, patterns in ev.heldout_paths().items():
        named.append((str(name), TokenRows.from_files(patterns, ev.dtype or data.dtype,
                                                      data.seq_len, cfg.model.vocab_size,
                                                      f"eval.heldout ({name})")))
    choice = tuple(read_choice_task(path, name, ev.choice_limit)
                   for name, path in ev.choice_paths().items())
    if choice and not (data.tokenizer or data.text):
        raise ConfigError("eval.choice: token files need data.tokenizer to encode the tasks' "
                          "text")
    if ev.every is not None and not named and not choice:
        raise ConfigError("eval.every: nothing to evaluate (set eval.heldout, data.holdout or "
                          "eval.choice)")
    heldout = tuple(heldout_set(name, rows, eos, bytes_codec, ev.max_rows)
                    for name, rows in named)
    dataset = PackedDataset(tuple(sources), data.global_batch, eos, data.seed)
    return TrainData(dataset, heldout, eos, ReadConfig(data.threads, data.prefetch), head,
                     choice)


__all__ = ["TrainData", "build_data"]
