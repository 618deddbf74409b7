"""The small-scale experiments' building blocks (experiments/synthetic_tasks.py and
small_scale.py): each task's answers checked by a plain re-reading of its sequences, the
families' parameter match, and the trainer learning a trivial task."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
import synthetic_tasks as tasks  # noqa: E402
from data_efficiency import tokens_to_reach  # noqa: E402
from small_scale import (  # noqa: E402
    FAMILIES,
    TrainConfig,
    evaluator,
    family_config,
    parameter_count,
    train,
)


def test_mqar_scores_each_recalled_value_once():
    rng = np.random.default_rng(0)
    pairs = np.array([2, 5, 16, 9])
    b = tasks.mqar(rng, 4, pairs, 64)
    for row, n in enumerate(pairs):
        seq, tgt, mask = b["inputs"][row], b["targets"][row], b["mask"][row]
        bound = {}
        for i in range(n):  # the context: key, value, key, value, ...
            k, v = seq[2 * i], seq[2 * i + 1]
            assert k in tasks.KEYS and v in tasks.VALUES and k not in bound
            bound[k] = v
        scored = np.nonzero(mask)[0]
        assert len(scored) == n
        asked = []
        for t in scored:
            assert 2 * n <= t < 4 * n and seq[t] in bound
            assert tgt[t] == bound[seq[t]] == seq[t + 1]
            asked.append(seq[t])
        assert set(asked) <= set(bound)
        assert (seq[4 * n:] == tasks.PAD).all()
    # Queries drawn with replacement: some key is asked twice somewhere, so elimination fails.
    big = tasks.mqar(rng, 64, 16, 64)
    repeats = [len(set(r[32:64:2])) < 16 for r in big["inputs"]]
    assert any(repeats)


def test_mqar_rejects_too_many_pairs():
    with pytest.raises(ValueError, match="mqar"):
        tasks.mqar(np.random.default_rng(0), 1, 20, 64)


def test_parity_targets_are_running_xor():
    b = tasks.parity(np.random.default_rng(1), 3, 40)
    for row in range(3):
        acc = 0
        for t in range(40):
            bit = int(b["inputs"][row, t] - tasks.BITS[0])
            acc ^= bit
            assert b["targets"][row, t] == tasks.BITS[acc]
    assert b["mask"].all()
    last = tasks.parity(np.random.default_rng(1), 3, 40, score="last")["mask"]
    assert last[:, -1].all() and last.sum() == 3


def test_needles_answers_match_the_haystack():
    b = tasks.needles(np.random.default_rng(2), 8, 96, count=4)
    for row in range(8):
        seq, tgt, mask = b["inputs"][row], b["targets"][row], b["mask"][row]
        hay = 96 - 12
        needles = {seq[t + 1]: seq[t + 2] for t in range(hay - 2) if seq[t] == tasks.MARK}
        assert len(needles) == 4  # none overlaps another
        assert np.isin(np.delete(seq[:hay], [t + d for t in range(hay - 2)
                                             if seq[t] == tasks.MARK for d in range(3)]),
                       tasks.FILLER).all()
        scored = np.nonzero(mask)[0]
        assert len(scored) == 4 and (scored >= hay).all()
        for t in scored:
            assert seq[t - 1] == tasks.MARK and tgt[t] == needles[seq[t]]


def test_families_match_in_parameters():
    counts = {f: parameter_count(family_config(f, hidden=256, layers=4, heads=4,
                                               intermediate=768)) for f in FAMILIES}
    assert max(counts.values()) / min(counts.values()) < 1.005, counts
    small = {f: parameter_count(family_config(f, hidden=64, layers=4, heads=2)) for f in FAMILIES}
    assert max(small.values()) / min(small.values()) < 1.012, small
    kinds = family_config("hybrid", hidden=64, layers=8, heads=2).layer_types
    assert kinds.count("full_attention") == 2 and kinds[3] == kinds[7] == "full_attention"


def test_tokens_to_reach_interpolates():
    tokens = np.array([0, 100, 200, 300])
    losses = np.array([4.0, 3.0, 2.0, 1.0])
    assert tokens_to_reach(tokens, losses, 2.5) == pytest.approx(150)
    assert tokens_to_reach(tokens, losses, 0.5) is None
    assert tokens_to_reach(tokens, losses, 4.5) == 0  # reached at the first evaluation


def test_masked_loss_scores_only_marked_positions():
    """Loss and accuracy are means over the mask's positions, against a NumPy log-softmax of
    the same logits; targets under mask 0 change nothing."""
    import jax

    from hybrid_jax.train import init_train_state, make_optimizer, model_template
    from hybrid_jax.train import OptimizerConfig
    from small_scale import masked_loss

    cfg = family_config("hybrid", hidden=32, layers=4, heads=2, vocab=16)
    params = init_train_state(cfg, make_optimizer(OptimizerConfig(total_steps=100)), seed=0).params
    rng = np.random.default_rng(0)
    x = rng.integers(0, 16, (2, 10)).astype(np.int32)
    y = rng.integers(0, 16, (2, 10)).astype(np.int32)
    mask = (rng.random((2, 10)) < 0.4).astype(np.float32)
    loss, acc = jax.jit(masked_loss(cfg))(params, {"inputs": x, "targets": y, "mask": mask})
    logits = np.asarray(model_template(cfg).model(params)(x), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, y[..., None], -1)[..., 0]
    hit = logits.argmax(-1) == y
    assert float(loss) == pytest.approx((ce * mask).sum() / mask.sum(), rel=1e-5)
    assert float(acc) == pytest.approx((hit * mask).sum() / mask.sum())
    y2 = np.where(mask > 0, y, (y + 1) % 16)
    loss2, acc2 = jax.jit(masked_loss(cfg))(params, {"inputs": x, "targets": y2, "mask": mask})
    assert float(loss2) == float(loss) and float(acc2) == float(acc)


def test_trainer_learns_to_copy():
    """A one-layer transformer learns target = input within 60 steps."""
    cfg = family_config("transformer", hidden=32, layers=1, heads=2, vocab=16)

    def batch(step):
        x = np.random.default_rng(step).integers(0, 16, (8, 12)).astype(np.int32)
        return {"inputs": x, "targets": x, "mask": np.ones(x.shape, np.float32)}

    evaluate = evaluator(cfg, {"copy": batch(10_000)})
    r = train(cfg, TrainConfig(steps=60, lr=1e-2, warmup=5, steps_per_call=20),
              batch, evaluate=evaluate, eval_every=60, log=None)
    assert r.evals[0][1]["copy"] < 0.3 and r.evals[-1][1]["copy"] > 0.95, r.evals
    assert r.losses.shape == (60,) and r.losses[-1] < r.losses[0]


def test_value_guess_baseline():
    """Rows with 1, 2 and 4 distinct values seen before the questions."""
    rows = np.array([[2, 70, 3, 70, 2, 70],
                     [2, 70, 3, 71, 2, 70],
                     [2, 70, 3, 71, 4, 72]])
    rows = np.concatenate([rows, np.array([[5, 73, 2, 70]] * 3)], axis=1)  # 1 more, then a question
    mask = np.zeros(rows.shape, np.float32)
    mask[:, 8] = 1
    assert tasks.value_guess_baseline({"inputs": rows, "mask": mask}) == pytest.approx(
        (1 / 2 + 1 / 3 + 1 / 4) / 3)
