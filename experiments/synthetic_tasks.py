"""Synthetic tasks for the recall, state-tracking and long-context experiments.

Every batch is a pure function of (rng) and its shape arguments, and holds
"inputs" [B, T] int32, "targets" [B, T] int32 (what position t must predict) and "mask" [B, T]
float32 (1 where the task scores a prediction). Positions past a sequence's end hold PAD with
mask 0; the models are causal, so trailing padding changes nothing before it.

One vocabulary of 256 tokens serves all tasks:
    0 PAD, 1 MARK (needle marker), 2..65 keys, 66..129 values, 130..131 bits, 132..255 filler.
"""

from __future__ import annotations

import numpy as np

VOCAB = 256
PAD, MARK = 0, 1
KEYS = np.arange(2, 66)
VALUES = np.arange(66, 130)
BITS = np.arange(130, 132)
FILLER = np.arange(132, 256)


def _batch(seqs: np.ndarray, scored: np.ndarray) -> dict[str, np.ndarray]:
    """Next-token targets of ``seqs`` [B, T], scored where ``scored`` [B, T] says (the position
    whose *next* token is the answer)."""
    targets = np.concatenate([seqs[:, 1:], np.full_like(seqs[:, :1], PAD)], axis=1)
    return {"inputs": seqs.astype(np.int32), "targets": targets.astype(np.int32),
            "mask": scored.astype(np.float32)}


def mqar(rng: np.random.Generator, batch: int, pairs: int | np.ndarray, seq_len: int
         ) -> dict[str, np.ndarray]:
    """Multi-query associative recall: ``k1 v1 k2 v2 ... kN vN`` (distinct keys, random
    values), then N queries ``k v``, the model scored on each queried value (it must recall
    the value bound to the key it just read). Queried keys are drawn with replacement, so no
    answer follows from the ones already given (asking each key once would let the last
    query, and others in part, be answered by elimination). ``pairs``: N for the whole batch
    or one per row; a row takes 4N tokens, padded to ``seq_len``."""
    counts = np.broadcast_to(np.asarray(pairs), (batch,))
    if counts.max() > len(KEYS) or 4 * counts.max() > seq_len:
        raise ValueError(f"mqar: {counts.max()} pairs need {4 * counts.max()} tokens and at most "
                         f"{len(KEYS)} keys; seq_len is {seq_len}")
    seqs = np.full((batch, seq_len), PAD, np.int64)
    scored = np.zeros((batch, seq_len), bool)
    for row, n in enumerate(counts):
        keys = rng.choice(KEYS, n, replace=False)
        values = rng.choice(VALUES, n, replace=True)
        order = rng.integers(0, n, n)  # with replacement: see the docstring
        ctx = np.stack([keys, values], 1).reshape(-1)
        query = np.stack([keys[order], values[order]], 1).reshape(-1)
        seqs[row, :4 * n] = np.concatenate([ctx, query])
        scored[row, 2 * n:4 * n:2] = True  # the query keys: their next token is the value
    return _batch(seqs, scored)


def parity(rng: np.random.Generator, batch: int, length: int, *, score: str = "all"
           ) -> dict[str, np.ndarray]:
    """Running parity: inputs are random bits; at each position the model must output the XOR
    of all bits so far (as a bit token). ``score``: "all" positions or the "last" one only."""
    bits = rng.integers(0, 2, (batch, length))
    running = np.cumsum(bits, axis=1) % 2
    mask = np.ones((batch, length), bool) if score == "all" else np.zeros((batch, length), bool)
    if score == "last":
        mask[:, -1] = True
    elif score != "all":
        raise ValueError(f"parity: score must be 'all' or 'last', got {score!r}")
    return {"inputs": BITS[bits].astype(np.int32), "targets": BITS[running].astype(np.int32),
            "mask": mask.astype(np.float32)}


def needles(rng: np.random.Generator, batch: int, seq_len: int, count: int = 4
            ) -> dict[str, np.ndarray]:
    """Needles in a haystack: ``count`` needles ``MARK k v`` (distinct keys) at random places
    in random filler, then at the end ``count`` questions ``MARK k v``, keys drawn from the
    needles' with replacement (no answer by elimination), the model scored on each value.
    The haystack fills ``seq_len`` exactly."""
    tail = 3 * count
    hay = seq_len - tail
    if hay < 3 * count:
        raise ValueError(f"needles: seq_len {seq_len} is too short for {count} needles")
    seqs = rng.choice(FILLER, (batch, seq_len))
    scored = np.zeros((batch, seq_len), bool)
    for row in range(batch):
        keys = rng.choice(KEYS, count, replace=False)
        values = rng.choice(VALUES, count, replace=True)
        # Non-overlapping slots: sorted draws spaced by 3 leave room for each needle.
        starts = np.sort(rng.choice(hay - 3 * count + 1, count, replace=True)) + 3 * np.arange(count)
        for s, k, v in zip(starts, keys, values):
            seqs[row, s:s + 3] = (MARK, k, v)
        order = rng.integers(0, count, count)  # with replacement: see the docstring
        seqs[row, hay:] = np.stack([np.full(count, MARK), keys[order], values[order]], 1).reshape(-1)
        scored[row, hay + 1::3] = True  # the asked keys: their next token is the value
    return _batch(seqs, scored)


def value_guess_baseline(batch: dict[str, np.ndarray]) -> float:
    """Accuracy of a model that never binds keys to values but answers with a value seen
    before the question, uniformly: the mean over scored positions of 1 / (distinct values
    in that row before its first scored position)."""
    scores = []
    for seq, mask in zip(batch["inputs"], batch["mask"]):
        scored = np.nonzero(mask)[0]
        if len(scored):
            seen = np.unique(seq[:scored[0]][np.isin(seq[:scored[0]], VALUES)])
            scores += [1 / len(seen)] * len(scored)
    return float(np.mean(scores))
