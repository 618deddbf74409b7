"""The data workflow end to end: `hybrid-jax tokenize` text into token files, train on a
mixture of them with held-out and multiple-choice evaluation in the loop, then `hybrid-jax
eval` the run's checkpoint: its held-out loss, perplexity and bits per byte equal the ones
logged during training."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hybrid_jax.cli import main
from hybrid_jax.eval.choice import pair_ids, read_choice_task
from hybrid_jax.inference.text import ByteCodec
from hybrid_jax.train.loop import read_log

EOS = 256
MODEL = ["--preset", "tiny", "--set", "model.num_hidden_layers=2",
         "--set", "model.layer_types=[linear_attention, full_attention]",
         "--set", "model.vocab_size=260", "--set", f"model.eos_token_id={EOS}"]


def _write_corpus(path, seed: int, docs: int) -> None:
    rng = np.random.default_rng(seed)
    words = ["fox", "dog", "cat", "the", "a", "runs", "sleeps", "over", "under", "quick"]
    path.write_text("\n\n".join(" ".join(rng.choice(words, 12)) for _ in range(docs)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("workflow")
    for name, seed, docs in (("web", 0, 80), ("books", 1, 40), ("held", 2, 20)):
        _write_corpus(d / f"{name}.txt", seed, docs)
    tok = d / "tokens"
    for name in ("web", "books", "held"):
        assert main(["tokenize", str(d / f"{name}.txt"), "--out", str(tok), "--tokenizer",
                     "bytes", "--eos-id", str(EOS), "--doc-separator", "\\n\\n",
                     "--no-progress"]) == 0
    task = d / "choice.jsonl"
    task.write_text("\n".join(json.dumps(item) for item in [
        {"context": "the quick", "choices": [" fox", " zebra"], "label": 0},
        {"context": "a dog ", "choices": ["runs", "flies", "sleeps"], "label": 2},
        {"context": "", "choices": ["the", "xq"], "label": 0}]))
    config = d / "run.yaml"
    config.write_text(f"""
data:
  sources:
    - {{name: web, paths: "{tok}/web.npy", weight: 0.75}}
    - {{name: books, paths: ["{tok}/books.npy"], weight: 0.25}}
  dtype: uint16
  tokenizer: bytes
  seq_len: 32
  global_batch: 4
eval:
  every: 2
  heldout: "{tok}/held.npy"
  choice: "{task}"
loop: {{checkpoint_every: 2}}
""")
    ckpt = d / "ckpt"
    assert main(["train", *MODEL, "--config", str(config), "--steps", "4",
                 "--checkpoint-dir", str(ckpt), "--no-progress"]) == 0
    return {"dir": d, "tokens": tok, "ckpt": ckpt, "log": read_log(ckpt / "log.jsonl")}


def test_training_logs_held_out_and_choice_metrics_after_every_two_steps(run):
    log = run["log"]
    assert sorted(log) == [0, 1, 2, 3]
    for step in (1, 3):
        record = log[step]
        assert record["eval/heldout/tokens"] > 0
        assert np.isfinite(record["eval/heldout/loss"])
        np.testing.assert_allclose(record["eval/heldout/perplexity"],
                                   np.exp(record["eval/heldout/loss"]), rtol=1e-9)
        assert 0 <= record["eval/choice/acc"] <= 1 and record["eval/choice/items"] == 3
    assert "eval/heldout/loss" not in log[0] and "eval/heldout/loss" not in log[2]


def test_hybrid_jax_eval_of_the_checkpoint_equals_the_in_loop_evaluation(run, capsys):
    out = run["dir"] / "eval.json"
    assert main(["eval", "--checkpoint", str(run["ckpt"]), "--heldout",
                 str(run["tokens"] / "held.npy"), "--seq-len", "32", "--batch-size", "4",
                 "--tokenizer", "bytes", "--output", str(out)]) == 0
    assert "heldout: loss" in capsys.readouterr().out
    got = json.loads(out.read_text())["heldout"]["heldout"]
    logged = run["log"][3]  # the last step's evaluation: the newest checkpoint's parameters
    for metric in ("loss", "perplexity", "bits_per_byte", "tokens"):
        np.testing.assert_allclose(got[metric], logged[f"eval/heldout/{metric}"], rtol=1e-6,
                                   err_msg=metric)
    # An earlier checkpoint gives step 1's numbers.
    assert main(["eval", "--checkpoint", str(run["ckpt"]), "--heldout",
                 str(run["tokens"] / "held.npy"), "--seq-len", "32", "--batch-size", "4",
                 "--tokenizer", "bytes", "--step", "2", "--output", str(out)]) == 0
    got = json.loads(out.read_text())["heldout"]["heldout"]
    np.testing.assert_allclose(got["loss"], run["log"][1]["eval/heldout/loss"], rtol=1e-6)


def test_eval_errors_name_the_culprit(run, capsys):
    assert main(["eval", "--checkpoint", str(run["ckpt"]), "--heldout",
                 str(run["tokens"] / "nothing*.npy"), "--seq-len", "32"]) == 2
    assert "matches no file" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(run["ckpt"]), "--heldout",
                 str(run["tokens"] / "held.npy"), "--step", "3", "--seq-len", "32"]) == 2
    assert "no checkpoint of step 3 (steps: [2, 4])" in capsys.readouterr().err


def test_choice_pairs_split_like_the_harness(tmp_path):
    codec = ByteCodec()
    assert pair_ids(codec, "a dog ", "runs", EOS) == (list(b"a dog"), list(b" runs"))
    assert pair_ids(codec, "Q: 2+2?\nA:\n", "4", EOS) == (list(b"Q: 2+2?\nA:"), list(b"\n4"))
    assert pair_ids(codec, "", "the", EOS) == ([EOS], list(b"the"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "x", "choices": ["a", "b"], "label": 0}\n'
                   '{"context": "x", "choices": ["a"], "label": 0}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: \"choices\" must be a list"):
        read_choice_task(bad)
    assert len(read_choice_task(bad, limit=1).items) == 1


def test_a_training_run_loads_its_parameters_onto_the_device(run):
    import jax
    from flax import nnx

    from hybrid_jax.eval.checkpoints import load_train_run

    model, step = load_train_run(run["ckpt"], dtype="bfloat16")
    leaves = jax.tree.leaves(nnx.state(model))
    assert step == 4 and model.config.dtype == "bfloat16"
    assert all(isinstance(x, jax.Array) and x.dtype == jax.numpy.bfloat16 for x in leaves)
