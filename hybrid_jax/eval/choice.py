"""Multiple-choice tasks from local JSON-lines files, scored by log-likelihood as
HellaSwag-style tasks are: each choice's summed log-probability as the continuation of the
context; the item is right when its label's choice scores highest ("acc") or highest per
character of the choice ("acc_norm", the harness's length normalisation).

A task file holds one JSON object per line: {"context": str, "choices": [str, ...],
"label": int}. A choice is the text that follows the context as written (include a leading
space where the text has one). As lm-evaluation-harness does, the context's trailing whitespace
moves to the start of each choice, the pair is encoded whole (``codec.encode``: a tokenizer.json's
post-processor applied, as lm-eval's Hugging Face model encodes), and the continuation is what
follows the context's own tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hybrid_jax.data.token_files import DataError
from hybrid_jax.eval.scoring import loglikelihoods
from hybrid_jax.model.hybrid_lm import HybridLM


@dataclass(frozen=True)
class ChoiceItem:
    context: str
    choices: tuple[str, ...]
    label: int


@dataclass(frozen=True, eq=False)
class ChoiceTask:
    """A named list of items."""

    name: str
    items: tuple[ChoiceItem, ...]


def _item(record: Any, where: str) -> ChoiceItem:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    context, choices, label = (record.get(k) for k in ("context", "choices", "label"))
    if not isinstance(context, str):
        raise DataError(f"{where}: \"context\" must be a string")
    if (not isinstance(choices, list) or len(choices) < 2
            or not all(isinstance(c, str) and c for c in choices)):
        raise DataError(f"{where}: \"choices\" must be a list of at least two non-empty strings")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise DataError(f"{where}: \"label\" must be an index into the {len(choices)} choices, "
                        f"got {label!r}")
    return ChoiceItem(context, tuple(choices), label)


def read_choice_task(path: str | Path, name: str | None = None,
                     limit: int | None = None) -> ChoiceTask:
    """The task in JSON-lines file ``path`` (named ``name``, default the file's stem), its
    first ``limit`` items when given. DataError naming the file and line for a bad line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: multiple-choice task file not found")
    items = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if limit is not None and len(items) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            items.append(_item(record, where))
    if not items:
        raise DataError(f"{path}: no item")
    return ChoiceTask(name or path.stem, tuple(items))


def pair_ids(codec: Any, context: str, continuation: str, prefix_token: int
             ) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of one pair, split as the module docstring says; an
    empty context is ``prefix_token`` alone."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        return [prefix_token], list(codec.encode(continuation))
    whole = list(codec.encode(context + continuation))
    n = len(codec.encode(context))
    return whole[:n], whole[n:]


def score_choice_task(model: HybridLM, task: ChoiceTask, codec: Any, *, prefix_token: int,
                      batch_size: int = 8) -> dict[str, float]:
    """{"acc", "acc_norm", "items"} of ``model`` on ``task`` (see the module docstring)."""
    requests = []
    for item in task.items:
        for choice in item.choices:
            requests.append(pair_ids(codec, item.context, choice, prefix_token))
    scores = np.asarray([s for s, _ in loglikelihoods(model, requests, batch_size=batch_size)])
    right = right_norm = 0
    start = 0
    for item in task.items:
        k = len(item.choices)
        s = scores[start:start + k]
        lengths = np.asarray([len(c) for c in item.choices], np.float64)
        right += int(np.argmax(s) == item.label)
        right_norm += int(np.argmax(s / lengths) == item.label)
        start += k
    n = len(task.items)
    return {"acc": right / n, "acc_norm": right_norm / n, "items": float(n)}


__all__ = ["ChoiceItem", "ChoiceTask", "pair_ids", "read_choice_task",
           "score_choice_task"]
