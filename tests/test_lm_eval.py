"""The lm-eval model ``hybrid-jax`` against lm-eval's own Hugging Face model (``hf``, HFLM) on
one tiny random OLMo Hybrid checkpoint and tokenizer: each request's log-likelihood and greedy
flag, rolling log-likelihoods, generated text, and two local tasks (tests/lm_eval_tasks/:
multiple choice, and generation cut at stop strings) end to end; then ``hybrid-jax eval``, its
lm-eval pass-through, and bad input.

The tokenizer is a byte-level BPE whose post-processor adds a BOS token, so special-token
handling (added, or not when the text starts with BOS) is exercised. The model reads at most
MAX_LENGTH tokens (its config's max_position_embeddings, which both models default to), so
long contexts are cut and long documents are scored in several rolling windows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from hf_models import make_hf_model

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from hybrid_jax.cli import main  # noqa: E402
from hybrid_jax.eval.harness import HybridJaxLM  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TASKS = REPO / "tests" / "lm_eval_tasks"  # their data_files are relative to REPO
TASK_NAMES = ["hybrid_jax_choice", "hybrid_jax_answer"]
VOCAB = 512  # the model's; the tokenizer has 500
MAX_LENGTH = 64
BATCH = 4
TOL = 1e-4  # nats, per request


def _corpus() -> list[str]:
    lines = []
    for name in ("choice.jsonl", "answer.jsonl"):
        for line in (TASKS / name).read_text().splitlines():
            doc = json.loads(line)
            answer = doc["answer"] if isinstance(doc["answer"], str) else ""  # or an index
            lines.append(" ".join([doc["question"], *doc.get("choices", []), answer]))
    return lines


CORPUS = _corpus()
LONG = " ".join(CORPUS)  # hundreds of tokens: several windows of MAX_LENGTH


def _tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>", "<|bos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", tok.token_to_id("<|bos|>"))])
    return tok


@pytest.fixture(scope="module", autouse=True)
def _in_repo():
    """The task YAMLs name their data relative to the repository root."""
    before = os.getcwd()
    os.chdir(REPO)
    yield
    os.chdir(before)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A float32 transformers checkpoint with tokenizer.json and tokenizer_config.json."""
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("lm_eval") / "ckpt"
    make_hf_model(seed=5, vocab_size=VOCAB, eos_token_id=0, bos_token_id=1,
                  max_position_embeddings=MAX_LENGTH).save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=_tokenizer(), eos_token="<|endoftext|>",
                            bos_token="<|bos|>").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lms(ckpt) -> tuple:
    """(lm-eval's HFLM, ours), over the same directory."""
    from lm_eval.models.huggingface import HFLM

    ref = HFLM(pretrained=str(ckpt), device="cpu", dtype="float32", batch_size=BATCH)
    ours = HybridJaxLM(checkpoint=str(ckpt), batch_size=BATCH)
    assert (ours.max_length, ours.eot_token_id, ours.prefix_token_id) == (
        ref.max_length, ref.eot_token_id, ref.prefix_token_id) == (MAX_LENGTH, 0, 1)
    return ref, ours


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args]


def _assert_scores_match(ours: list, ref: list) -> None:
    for i, ((lp, greedy), (ref_lp, ref_greedy)) in enumerate(zip(ours, ref, strict=True)):
        assert abs(lp - ref_lp) <= TOL and greedy == ref_greedy, (i, (lp, greedy), (ref_lp,
                                                                                      ref_greedy))


# ----------------------------------------------------------------------------- requests
def test_loglikelihood_matches_hflm(lms):
    ref, ours = lms
    args = [("Question: What do cows eat?\nAnswer:", " grass"),
            ("Q: What is two plus ", "two"),           # context ending in a space
            ("", "hello there"),                        # empty context: the prefix token
            ("<|bos|>Question: What", " is it"),        # starts with BOS: none added
            (LONG, " the end of it")]                   # cut from the left
    _assert_scores_match(ours.loglikelihood(_requests("loglikelihood", args)),
                         ref.loglikelihood(_requests("loglikelihood", args)))


def test_greedy_continuation_is_greedy_in_both(lms):
    """Token-level requests whose continuation is the model's own greedy one (and one that is
    not): both models say greedy, with the same log-probability."""
    from hybrid_jax.eval import generate_tokens

    ref, ours = lms
    context = ours.tok_encode("Question: Which planet do we live on?\nAnswer:")
    (greedy,) = generate_tokens(ours.model, [context], max_new_tokens=4, eos_token_id=())
    requests = [(None, context, greedy), (None, context, greedy[:1]),
                (None, context, [(greedy[0] + 1) % 500])]
    scores = ours._loglikelihood_tokens(requests)
    assert [g for _, g in scores] == [True, True, False]
    _assert_scores_match(scores, ref._loglikelihood_tokens(requests))


def test_loglikelihood_rolling_matches_hflm(lms):
    ref, ours = lms
    texts = [LONG[:1200], "short text here", LONG[1500:1600]]
    assert len(ours.tok_encode(texts[0])) > 3 * MAX_LENGTH  # several windows
    got = ours.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts]))
    want = ref.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts]))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=TOL)


def test_generate_until_matches_hflm(lms):
    ref, ours = lms
    stops = {"until": ["\n", ".", "e"], "max_gen_toks": 12, "do_sample": False}
    other = {"until": "\n\n", "max_gen_toks": 12}  # a second batch group, the same shapes
    args = [("Q: What is the capital of France?\nA:", stops), ("Question: What", stops),
            (LONG[:600], stops),  # longer than MAX_LENGTH - 12: cut from the left
            ("", stops), ("Q: What color is snow?\nA:", other), ("hello", other)]
    got = ours.generate_until(_requests("generate_until", args))
    want = ref.generate_until(_requests("generate_until", args))
    assert got == want
    assert any(len(g) >= 5 for g in got)  # not all cut at once


# ----------------------------------------------------------------------------- tasks
@pytest.fixture(scope="module")
def task_results(lms) -> tuple[dict, dict]:
    """simple_evaluate's results for both models on both local tasks, samples included."""
    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    runs = [lm_eval.simple_evaluate(model=lm, tasks=TASK_NAMES, task_manager=manager,
                                    log_samples=True, bootstrap_iters=0) for lm in lms]
    return runs[0], runs[1]


def test_tasks_match_hflm(task_results):
    ref, ours = task_results
    for task, metrics in (("hybrid_jax_choice", ("acc,none", "acc_norm,none")),
                          ("hybrid_jax_answer", ("exact_match,none",))):
        for metric in metrics:
            assert ours["results"][task][metric] == ref["results"][task][metric], (task, metric)
        assert len(ours["samples"][task]) == len(ref["samples"][task]) >= 14
        for mine, theirs in zip(ours["samples"][task], ref["samples"][task], strict=True):
            assert mine["doc_id"] == theirs["doc_id"]
            if task == "hybrid_jax_choice":  # per choice: [(log-likelihood, greedy)]
                _assert_scores_match([r[0] for r in mine["resps"]],
                                     [r[0] for r in theirs["resps"]])
            else:
                assert mine["resps"] == theirs["resps"]
    assert lm_eval.utils.make_table(ours).count("hybrid_jax_") == 2


# ----------------------------------------------------------------------------- the command
@pytest.fixture
def no_builtin_tasks(monkeypatch):
    """TaskManagers without lm-eval's own task collection, whose indexing dominates a run."""
    class LocalOnly(TaskManager):
        def __init__(self, *args, **kwargs):
            kwargs["include_defaults"] = False
            super().__init__(*args, **kwargs)

    monkeypatch.setattr("lm_eval.tasks.TaskManager", LocalOnly)


def test_cli_eval(ckpt, task_results, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert main(["eval", "--checkpoint", str(ckpt), "--tasks", ",".join(TASK_NAMES),
                 "--include-path", str(TASKS), "--batch-size", str(BATCH), "--limit", "5",
                 "--output", str(out)]) == 0
    table = capsys.readouterr().out
    assert "hybrid_jax_choice" in table and "exact_match" in table
    report = json.loads(out.read_text())
    _, full = task_results
    for task, metric in (("hybrid_jax_choice", "acc"), ("hybrid_jax_answer", "exact_match")):
        first5 = [s[metric] for s in full["samples"][task][:5]]  # the same five documents
        assert report["results"][task][f"{metric},none"] == pytest.approx(np.mean(first5))
    assert report["config"]["checkpoint"] == str(ckpt) and "samples" not in report


def test_cli_lm_eval_passthrough(ckpt, no_builtin_tasks, capsys):
    assert main(["eval", "lm-eval", "--model_args", f"checkpoint={ckpt}", "--batch_size",
                 str(BATCH), "--tasks", "hybrid_jax_choice", "--include_path", str(TASKS),
                 "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert "hybrid-jax (" in out and "hybrid_jax_choice" in out and "acc_norm" in out


def test_cli_bad_input(ckpt, tmp_path, no_builtin_tasks, capsys):
    cases = [(["--checkpoint", str(tmp_path / "missing"), "--tasks", "hybrid_jax_choice"],
              "missing: checkpoint directory not found"),
             (["--checkpoint", str(ckpt), "--tokenizer", str(tmp_path / "tok.json"),
               "--tasks", "hybrid_jax_choice"], "tok.json: tokenizer file not found"),
             (["--checkpoint", str(ckpt), "--tasks", "hybrid_jax_choice,no_such_task",
               "--include-path", str(TASKS)], "unknown task(s) no_such_task")]
    for argv, message in cases:
        assert main(["eval", *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and message in err[-1], err
