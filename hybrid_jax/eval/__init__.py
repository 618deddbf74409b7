"""Evaluation: loading any checkpoint to evaluate (``checkpoints``), held-out loss, perplexity
and bits per byte (``heldout``), scoring token sequences with a ``HybridLM`` (``scoring``),
multiple-choice tasks from JSON lines (``choice``), both every few steps of training
(``in_training``), and the lm-evaluation-harness model
``hybrid-jax`` (``harness``, imported on its own: it needs the ``eval`` extra, lm-eval)."""

from hybrid_jax.eval.checkpoints import is_train_run, load_model, load_train_run
from hybrid_jax.eval.choice import ChoiceTask, read_choice_task, score_choice_task
from hybrid_jax.eval.heldout import HeldoutEvaluator, HeldoutSet, heldout_set
from hybrid_jax.eval.in_training import TrainingEvaluator
from hybrid_jax.eval.scoring import (
    cut_at_stops,
    generate_tokens,
    generate_until,
    length_bucket,
    loglikelihoods,
    rolling_loglikelihoods,
    rolling_windows,
)

__all__ = [
    "ChoiceTask",
    "HeldoutEvaluator",
    "HeldoutSet",
    "TrainingEvaluator",
    "cut_at_stops",
    "generate_tokens",
    "generate_until",
    "heldout_set",
    "is_train_run",
    "length_bucket",
    "load_model",
    "load_train_run",
    "loglikelihoods",
    "read_choice_task",
    "rolling_loglikelihoods",
    "rolling_windows",
    "score_choice_task",
]
