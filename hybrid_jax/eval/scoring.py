"""Scoring token sequences with a ``HybridLM``: what an evaluation harness asks of a model.

    loglikelihoods(model, [(context_ids, continuation_ids), ...], batch_size=8)
        -> [(summed log-probability of the continuation, whether it is the greedy one), ...]
    rolling_loglikelihoods(model, [document_ids, ...], prefix_token=eos, batch_size=8)
        -> [log-probability of each whole document, scored in windows of max_length]
    generate_until(model, [prompt_ids, ...], decode=tokenizer_decode, until=["\\n"],
                   max_new_tokens=32, batch_size=8) -> [text before the first stop, ...]

Everything here works on token ids; tokenising (and matching a harness's tokenisation) is the
caller's business (``hybrid_jax.eval.harness``). Scores follow lm-evaluation-harness's
Hugging Face causal model: a (context, continuation) pair longer than ``max_length + 1``
tokens loses tokens from the left; the log-softmax is taken in float32 over the model's whole
vocabulary; a continuation is greedy when each of its tokens is the argmax after the tokens
before it.

Compiled shapes stay few: rows are right-padded (scoring) or left-padded (generation) to a
length bucket, the next power of two of at least ``min_bucket`` tokens (at most the length
limit), and a batch short of ``batch_size`` rows is filled with dummy rows; requests are
sorted longest first so that a batch's rows have similar lengths. Right padding changes
nothing before it in a causal model, and left padding is masked (``generate``'s
``attention_mask``), so neither changes a score or a generated token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hybrid_jax.inference.generate import generate, token_ids
from hybrid_jax.model.hybrid_lm import HybridLM

MIN_BUCKET = 64
# Positions per application of the LM head when scoring: bounds the float32 logits held at once
# to [B, HEAD_PIECE, V] (a whole [B, T, V] of a 100k vocabulary is gigabytes at long T).
HEAD_PIECE = 1024


def length_bucket(n: int, *, minimum: int = MIN_BUCKET, cap: int | None = None) -> int:
    """The padded length for a longest row of ``n`` tokens: the smallest power of two that is
    at least ``max(n, minimum)``, lowered to ``cap`` (the length limit) where that is smaller,
    but never below ``n``."""
    bucket = 1 << (max(int(n), int(minimum), 1) - 1).bit_length()
    if cap is not None:
        bucket = min(bucket, max(int(cap), int(n)))
    return bucket


def default_max_length(model: HybridLM) -> int:
    """The model's context length, ``config.max_position_embeddings``: what the harness's
    Hugging Face model reads from the same config."""
    return int(model.config.max_position_embeddings)


def _longest_first(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices into ``lengths`` in batches of ``batch_size``, longest first (ties in order)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


# ----------------------------------------------------------------------------- log-likelihood
@partial(jax.jit, static_argnums=0)
def _score_rows(graphdef: nnx.GraphDef, params: nnx.State, inputs: jax.Array,
                targets: jax.Array, scored: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per row, the summed log-probability of ``targets`` where ``scored``, and whether every
    scored target is the argmax.

    inputs, targets: [B, T] int32 (targets[:, i] is the token after inputs[:, i]); scored:
    [B, T] bool. Returns ([B] float32, [B] bool). The LM head runs on ``HEAD_PIECE`` positions
    at a time, so the float32 logits held at once are [B, HEAD_PIECE, V], not [B, T, V]; the
    log-softmax is logits - logsumexp, in float32.
    """
    model = nnx.merge(graphdef, params)
    features = model.features(inputs)  # [B, T, D]
    piece = min(features.shape[1], HEAD_PIECE)

    def score(args):
        x, target, mask = args  # [B, piece, D], [B, piece], [B, piece]
        logits = model.logits(x).astype(jnp.float32)  # [B, piece, V]
        picked = jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
        logprob = picked - jax.nn.logsumexp(logits, axis=-1)
        greedy = jnp.argmax(logits, axis=-1) == target
        return (jnp.sum(jnp.where(mask, logprob, 0.0), axis=1),
                jnp.all(greedy | ~mask, axis=1))

    pieces = tuple(_pieces(x, piece) for x in (features, targets, scored))
    logprob, greedy = jax.lax.map(score, pieces)  # [n, B] each
    return jnp.sum(logprob, axis=0), jnp.all(greedy, axis=0)


def _pieces(x: jax.Array, piece: int) -> jax.Array:
    """[B, T, ...] -> [ceil(T / piece), B, piece, ...], zero-padded at the end (padding
    positions are not scored: their mask pads with False)."""
    b, t = x.shape[:2]
    n = -(-t // piece)
    x = jnp.pad(x, [(0, 0), (0, n * piece - t)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(b, n, piece, *x.shape[2:]), 1, 0)


def _scored_row(context: Sequence[int], continuation: Sequence[int],
                max_length: int) -> tuple[list[int], int]:
    """The tokens of one request as the model reads them, and how many are scored: the last
    ``max_length + 1`` tokens of context + continuation (the first of them only as input)."""
    if len(context) == 0:
        raise ValueError("loglikelihoods: a context must hold at least one token (an empty "
                         "text's context is a prefix token such as BOS or EOS)")
    if len(continuation) == 0:
        raise ValueError("loglikelihoods: a continuation must hold at least one token")
    if len(continuation) > max_length:
        raise ValueError(f"loglikelihoods: a continuation of {len(continuation)} tokens is "
                         f"longer than max_length {max_length}")
    tokens = [int(t) for t in (*context, *continuation)][-(max_length + 1):]
    return tokens, len(continuation)


def loglikelihoods(
    model: HybridLM,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    min_bucket: int = MIN_BUCKET,
    on_batch: Callable[[int], object] | None = None,
) -> list[tuple[float, bool]]:
    """Score each (context ids, continuation ids): the summed float32 log-probability of the
    continuation after the context, and whether greedy decoding would produce it.

    A pair longer than ``max_length + 1`` tokens (default: ``default_max_length``) is cut from
    the left, so the model reads at most ``max_length`` tokens. Rows are scored
    ``batch_size`` at a time, right-padded to ``length_bucket`` of the batch's longest row.
    Results come in the order of ``requests``; ``on_batch(n)`` is told as each batch of ``n``
    requests is done (a progress bar's ``update``).
    """
    max_length = default_max_length(model) if max_length is None else int(max_length)
    rows = [_scored_row(c, k, max_length) for c, k in requests]
    graphdef, params = nnx.split(model)
    results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    for batch in _longest_first([len(r[0]) for r in rows], batch_size):
        t = length_bucket(len(rows[batch[0]][0]) - 1, minimum=min_bucket, cap=max_length)
        inputs = np.zeros((batch_size, t), np.int32)
        targets = np.zeros((batch_size, t), np.int32)
        scored = np.zeros((batch_size, t), bool)
        for row, i in enumerate(batch):
            tokens, n_scored = rows[i]
            n = len(tokens) - 1
            inputs[row, :n] = tokens[:-1]
            targets[row, :n] = tokens[1:]
            scored[row, n - n_scored:n] = True
        logprob, greedy = _score_rows(graphdef, params, jnp.asarray(inputs),
                                      jnp.asarray(targets), jnp.asarray(scored))
        logprob, greedy = np.asarray(logprob), np.asarray(greedy)
        for row, i in enumerate(batch):
            results[i] = (float(logprob[row]), bool(greedy[row]))
        if on_batch is not None:
            on_batch(len(batch))
    return results


# ----------------------------------------------------------------------------- rolling
def rolling_windows(tokens: Sequence[int], *, prefix_token: int,
                    max_length: int) -> list[tuple[list[int], list[int]]]:
    """Cut a document into disjoint (context, continuation) windows that together score every
    token once, each window read in at most ``max_length`` tokens.

    The continuations are consecutive runs of ``max_length`` tokens (the last one shorter);
    the first run's context is ``prefix_token`` alone, and each later run's context is as many
    tokens before it as fit (``max_length + 1`` tokens in all, the last one only predicted).
    These are lm-evaluation-harness's disjoint rolling windows with one token of context.
    """
    if max_length <= 0:
        raise ValueError(f"rolling_windows: max_length must be positive, got {max_length}")
    padded = [int(prefix_token), *(int(t) for t in tokens)]  # padded[i + 1] is tokens[i]
    windows = []
    for start in range(0, len(tokens), max_length):
        end = min(start + max_length, len(tokens))
        windows.append((padded[max(0, end - max_length):start + 1], padded[start + 1:end + 1]))
    return windows


def rolling_loglikelihoods(
    model: HybridLM,
    documents: Sequence[Sequence[int]],
    *,
    prefix_token: int,
    batch_size: int = 8,
    max_length: int | None = None,
    min_bucket: int = MIN_BUCKET,
) -> list[float]:
    """The log-probability of each whole document, from ``prefix_token`` on: the sum over its
    ``rolling_windows``, all documents' windows scored together (``loglikelihoods``). An empty
    document scores 0."""
    max_length = default_max_length(model) if max_length is None else int(max_length)
    windows, owner = [], []
    for doc, tokens in enumerate(documents):
        for window in rolling_windows(tokens, prefix_token=prefix_token, max_length=max_length):
            windows.append(window)
            owner.append(doc)
    scores = loglikelihoods(model, windows, batch_size=batch_size, max_length=max_length,
                            min_bucket=min_bucket)
    totals = [0.0] * len(documents)
    for doc, (logprob, _) in zip(owner, scores, strict=True):
        totals[doc] += logprob
    return totals


# ----------------------------------------------------------------------------- generation
def generate_tokens(
    model: HybridLM,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    eos_token_id: int | Sequence[int] | None = None,
    max_prompt_length: int | None = None,
    min_bucket: int = MIN_BUCKET,
    on_batch: Callable[[int], object] | None = None,
    **sampling,
) -> list[list[int]]:
    """The tokens ``generate`` adds after each prompt, up to (not including) the row's first
    EOS: greedy unless ``sampling`` (``temperature``, ``top_k``, ``top_p``, ``seed``) says
    otherwise.

    Prompts longer than ``max_prompt_length`` lose tokens from the left; every prompt needs at
    least one token. A batch is left-padded to ``length_bucket`` of its longest prompt (capped
    at ``max_prompt_length``) with ``attention_mask`` 0 on the padding, and its cache holds
    that length + ``max_new_tokens`` - 1 slots, so shapes depend on the bucket alone.
    ``eos_token_id``: as for ``generate`` (None: the model config's). ``on_batch(n)``: as for
    ``loglikelihoods``.
    """
    eos = token_ids(model.config.eos_token_id if eos_token_id is None else eos_token_id,
                    "eos_token_id", model.config.vocab_size)
    cut = [list(p)[-max_prompt_length:] if max_prompt_length else list(p) for p in prompts]
    if any(len(p) == 0 for p in cut):
        raise ValueError("generate_tokens: every prompt needs at least one token")
    results: list[list[int]] = [[] for _ in cut]
    for batch in _longest_first([len(p) for p in cut], batch_size):
        t = length_bucket(len(cut[batch[0]]), minimum=min_bucket, cap=max_prompt_length)
        ids = np.zeros((batch_size, t), np.int32)
        mask = np.zeros((batch_size, t), np.int32)
        for row in range(batch_size):  # rows past the batch repeat its first prompt
            prompt = cut[batch[row] if row < len(batch) else batch[0]]
            ids[row, t - len(prompt):] = prompt
            mask[row, t - len(prompt):] = 1
        out = generate(model, ids, max_new_tokens, attention_mask=mask, eos_token_id=eos,
                       max_length=t + max_new_tokens - 1, **sampling)
        new = np.asarray(out)[:, t:]
        for row, i in enumerate(batch):
            tokens = new[row].tolist()
            stop = next((j for j, tok in enumerate(tokens) if tok in eos), len(tokens))
            results[i] = tokens[:stop]
        if on_batch is not None:
            on_batch(len(batch))
    return results


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any non-empty stop string. Applied one stop after
    another, each keeping the text before it, which is the text before the earliest of them."""
    for stop in stops:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def generate_until(
    model: HybridLM,
    prompts: Sequence[Sequence[int]],
    *,
    decode: Callable[[list[int]], str],
    until: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 8,
    **kwargs,
) -> list[str]:
    """The text generated after each prompt (``generate_tokens``, same keyword arguments),
    decoded with ``decode`` and cut before the first of the ``until`` strings. Generation runs
    for ``max_new_tokens`` (or to EOS) and the stop strings are applied to the decoded text,
    so a stop split across tokens, or inside one, still ends it."""
    tokens = generate_tokens(model, prompts, max_new_tokens=max_new_tokens,
                             batch_size=batch_size, **kwargs)
    return [cut_at_stops(decode(t), until) for t in tokens]


__all__ = ["HEAD_PIECE", "MIN_BUCKET", "cut_at_stops", "default_max_length", "generate_tokens",
           "generate_until", "length_bucket", "loglikelihoods", "rolling_loglikelihoods",
           "rolling_windows"]
