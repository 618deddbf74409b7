"""Evaluation during training: held-out sets and multiple-choice tasks, every few steps.

    evaluate = TrainingEvaluator.build(model_config, every=500, batch=64, heldout=sets,
                                       mesh=mesh)
    train(..., evaluate=evaluate)   # hybrid_jax.train.loop calls evaluate(params)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
from jax.sharding import Mesh

from hybrid_jax.config import ModelConfig
from hybrid_jax.data.token_files import DataError
from hybrid_jax.eval.choice import ChoiceTask, score_choice_task
from hybrid_jax.eval.heldout import HeldoutEvaluator, HeldoutSet
from hybrid_jax.sharding import LogicalRules
from hybrid_jax.train.state import ModelTemplate, model_template


@dataclass(frozen=True, eq=False)
class TrainingEvaluator:
    """After every ``every`` steps: the ``heldout`` evaluator's sets, ``batch`` rows at a
    time, and the multiple-choice ``choice`` tasks (encoded with ``codec``, an empty context
    as ``prefix_token``; single-process runs). ``evaluator(params) -> {name: metrics}``."""

    every: int
    template: ModelTemplate
    heldout: HeldoutEvaluator | None
    batch: int
    choice: tuple[ChoiceTask, ...] = ()
    codec: Any = None
    prefix_token: int = 0

    @classmethod
    def build(cls, config: ModelConfig, *, every: int, batch: int,
              heldout: Sequence[HeldoutSet] = (), choice: Sequence[ChoiceTask] = (),
              codec: Any = None, prefix_token: int = 0, mesh: Mesh | None = None,
              rules: LogicalRules | None = None) -> TrainingEvaluator:
        """Checks the names (unique over sets and tasks), the batch against the mesh and the
        process count; DataError / ShardingError naming the culprit."""
        for name, value in (("every", every), ("batch", batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DataError(f"eval.{name}: must be a positive int, got {value!r}")
        names = [h.name for h in heldout] + [t.name for t in choice]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise DataError(f"eval: held-out sets and tasks share the name(s) {repeated}")
        if choice and jax.process_count() > 1:
            raise DataError("eval.choice: multiple-choice tasks run in single-process runs "
                            "only")
        template = model_template(config)
        evaluator = (HeldoutEvaluator(template, list(heldout), batch, mesh=mesh, rules=rules)
                     if heldout else None)
        return cls(every, template, evaluator, batch, tuple(choice), codec, prefix_token)

    def __call__(self, params: dict) -> dict[str, dict[str, float]]:
        results = self.heldout(params) if self.heldout is not None else {}
        if self.choice:
            model = self.template.model(params)
            for task in self.choice:
                results[task.name] = score_choice_task(model, task, self.codec,
                                                       prefix_token=self.prefix_token,
                                                       batch_size=self.batch)
        return results


__all__ = ["TrainingEvaluator"]
