"""generate() against transformers' OlmoHybridForCausalLM.generate on the same random weights:
greedy decoding of a left-padded batch token for token, EOS handling, prefill in pieces,
sampling determinism, and input checks that fail before anything is compiled.

Compiles dominate on CPU: every test reuses the two module-scoped models and the prompt shapes
below, so each distinct (shapes, sampling, eos) combination compiles once.
"""

from __future__ import annotations

import importlib
import logging

import jax
import numpy as np
import pytest
import torch

from hf_models import NOPE, make_hf_model
from hybrid_jax import generate
from hybrid_jax.convert import from_hf

gen_module = importlib.import_module("hybrid_jax.inference.generate")

LENS = (7, 19, 12)  # left-padded to T
T = max(LENS)
MAX_NEW = 10
PAD_IN_PROMPT = 0

CASES = {
    # RoPE, GQA, two value heads per key head, 8 layers: two scanned blocks of 3 GDN + 1 attention.
    "rope": dict(seed=3, num_hidden_layers=8),
    # NoPE, MHA, one value head per key head, beta in (0, 1).
    "nope": dict(seed=2, rope_parameters=NOPE, num_key_value_heads=4, linear_num_value_heads=2,
                 linear_allow_neg_eigval=False),
}


def _prompts(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = np.full((len(LENS), T), PAD_IN_PROMPT, np.int64)
    mask = np.zeros((len(LENS), T), np.int64)
    for row, n in enumerate(LENS):
        ids[row, T - n:] = rng.integers(1, 128, n)
        mask[row, T - n:] = 1
    return ids, mask


IDS, MASK = _prompts()


def _ours(model, ids=IDS, mask=MASK, max_new=MAX_NEW, **kw) -> np.ndarray:
    with jax.default_matmul_precision("highest"):  # also inside module-scoped fixtures
        out = generate(model, ids, max_new, attention_mask=mask, **kw)
    return np.asarray(out)


def _hf(hf, ids=IDS, mask=MASK, max_new=MAX_NEW, pad=0, **kw) -> np.ndarray:
    """transformers' greedy tokens, padded with ``pad`` to [B, T + max_new] (it stops early when
    every row has ended)."""
    with torch.no_grad():
        out = hf.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                          max_new_tokens=max_new, do_sample=False, pad_token_id=pad, **kw).numpy()
    width = ids.shape[1] + max_new
    assert out.shape[1] <= width
    return np.pad(out, ((0, 0), (0, width - out.shape[1])), constant_values=pad)


def _load(name: str, tmp_path_factory) -> dict:
    hf = make_hf_model(**CASES[name])
    path = tmp_path_factory.mktemp(f"gen_{name}")
    hf.save_pretrained(path)
    model = from_hf(path, gdn_chunk_size=16)
    return dict(name=name, hf=hf, model=model, greedy=_ours(model))


@pytest.fixture(scope="module")
def rope(tmp_path_factory) -> dict:
    case = _load("rope", tmp_path_factory)
    assert case["model"].stack.scanned and case["model"].stack.num_blocks == 2
    return case


@pytest.fixture(scope="module")
def nope(tmp_path_factory) -> dict:
    case = _load("nope", tmp_path_factory)
    assert case["model"].config.rope_theta is None
    return case


@pytest.fixture(params=list(CASES))
def case(request) -> dict:
    return request.getfixturevalue(request.param)


# ----------------------------------------------------------------------------- greedy
def test_greedy_matches_transformers(case):
    ours = case["greedy"]
    assert ours.shape == (len(LENS), T + MAX_NEW) and ours.dtype == np.int32
    np.testing.assert_array_equal(ours[:, :T], IDS)  # the prompt comes back as given
    ref = _hf(case["hf"])
    mismatch = np.argwhere(ours != ref)
    assert not mismatch.size, (f"first mismatch (row, col) {mismatch[0]}:\n"
                               f"{ours[:, T:]}\n{ref[:, T:]}")
    # Not a degenerate run: the rows differ and do not repeat one token.
    assert len({tuple(r) for r in ours[:, T:]}) == len(LENS)
    assert all(len(set(r)) > 2 for r in ours[:, T:])


def test_greedy_without_mask_matches_transformers(rope):
    """No attention_mask: every token is real (the padding ids of IDS become prompt tokens)."""
    ids = np.where(MASK == 1, IDS, 5)
    ours = _ours(rope["model"], ids, None)
    np.testing.assert_array_equal(ours, _hf(rope["hf"], ids, np.ones_like(ids)))


def test_padding_ids_do_not_matter(rope):
    for fill in (PAD_IN_PROMPT + 1, -5, 10**6):
        ids = np.where(MASK == 1, IDS, fill)
        ours = _ours(rope["model"], ids)
        np.testing.assert_array_equal(ours[:, T:], rope["greedy"][:, T:], err_msg=f"fill {fill}")


def test_prefill_in_pieces_gives_the_same_tokens(rope):
    # 19 tokens in pieces of 5: left-padded to 20, four pieces; the first is all padding for
    # the 7- and 12-token rows.
    np.testing.assert_array_equal(_ours(rope["model"], prefill_chunk_size=5), rope["greedy"])


def test_default_pieces_follow_the_logits_budget(rope, monkeypatch, caplog):
    # A budget of 6 query rows of logits per piece: the 19-token prompt goes in 4 equal pieces
    # of 5 (one extra padding token), and the tokens do not change.
    per_token = 4 * len(LENS) * rope["model"].config.num_attention_heads * (T + MAX_NEW - 1)
    monkeypatch.setattr(gen_module, "PREFILL_LOGITS_BYTES", 6 * per_token)
    monkeypatch.setattr(gen_module, "MIN_PREFILL_PIECE", 1)
    shapes = []
    real = gen_module.prefill
    monkeypatch.setattr(gen_module, "prefill",
                        lambda g, p, ids, *a, **kw: shapes.append(ids.shape)
                        or real(g, p, ids, *a, **kw))
    np.testing.assert_array_equal(_ours(rope["model"]), rope["greedy"])
    assert shapes == [(len(LENS), 5)] * 4


def test_max_length_is_prompt_plus_new_minus_one(nope):
    # The last new token is never fed back, so it needs no slot.
    ours = _ours(nope["model"], max_length=T + MAX_NEW - 1)
    np.testing.assert_array_equal(ours, nope["greedy"])


def _pick_eos(new: np.ndarray) -> tuple[int, int, int]:
    """A token that greedy decoding emits mid-way in some row (first time there), while some
    other row never emits it: (token, row, step)."""
    for step in range(2, new.shape[1] - 2):
        for row in range(new.shape[0]):
            tok = int(new[row, step])
            if tok in new[row, :step]:
                continue
            if any(tok not in new[r] for r in range(new.shape[0]) if r != row):
                return tok, row, step
    raise AssertionError(f"no usable EOS token in\n{new}")


def test_eos_stops_rows_and_pads_like_transformers(rope):
    greedy_new = rope["greedy"][:, T:]
    eos, row, step = _pick_eos(greedy_new)
    never = next(t for t in range(127, 0, -1) if t not in greedy_new)  # a second, unused EOS id
    pad = 1
    streamed = []
    on_tokens = lambda i, tokens, finished: streamed.append((i, tokens.copy(), finished.copy()))
    ours = _ours(rope["model"], eos_token_id=[eos, never], pad_token_id=pad, on_tokens=on_tokens)

    # Expected: the greedy tokens up to and including each row's first EOS, then pads.
    expected = rope["greedy"].copy()
    stops = {}
    for r in range(len(LENS)):
        hits = np.nonzero(greedy_new[r] == eos)[0]
        if hits.size:
            stops[r] = int(hits[0])
            expected[r, T + stops[r] + 1:] = pad
    assert stops[row] == step and len(stops) < len(LENS)
    np.testing.assert_array_equal(ours, expected)
    np.testing.assert_array_equal(ours, _hf(rope["hf"], eos_token_id=[eos, never], pad=pad))

    # Streaming: one callback per step, in order, with the returned tokens; a row is reported
    # finished from the step after its EOS.
    assert [i for i, _, _ in streamed] == list(range(MAX_NEW))
    for i, tokens, finished in streamed:
        np.testing.assert_array_equal(tokens, ours[:, T + i])
        np.testing.assert_array_equal(finished, [r in stops and i > stops[r]
                                                 for r in range(len(LENS))])


def test_all_rows_stopping_ends_early(nope):
    """When every row has hit EOS the rest is pad ids (and the loop stops)."""
    new = nope["greedy"][:, T:]
    # Each row's first token as EOS: every row stops at step 0.
    eos = sorted({int(t) for t in new[:, 0]})
    pad = 3
    ours = _ours(nope["model"], eos_token_id=eos, pad_token_id=pad)
    np.testing.assert_array_equal(ours[:, T], new[:, 0])
    assert np.all(ours[:, T + 1:] == pad)
    np.testing.assert_array_equal(ours, _hf(nope["hf"], eos_token_id=eos, pad=pad))


def _compiled(caplog, fn) -> list[str]:
    """Names of the jitted functions compiled while running fn()."""
    caplog.clear()
    with caplog.at_level(logging.WARNING), jax.log_compiles():
        fn()
    return [m.split()[1] for m in caplog.messages if m.startswith("Compiling ")]


def test_compiles_once_per_shape(nope, caplog):
    model = nope["model"]
    _ours(model)  # compiled for these shapes already (or now)
    other = np.where(MASK == 1, (IDS + 1) % model.config.vocab_size, 0)
    assert not _compiled(caplog, lambda: _ours(model, ids=other))
    # A new prompt shape compiles one prefill and one decode loop, whatever max_new_tokens says
    # about the number of steps (the loop is one lax.while_loop, not a Python loop per token).
    names = _compiled(caplog, lambda: _ours(model, ids=IDS[:, 1:], mask=MASK[:, 1:], max_new=7))
    assert names.count("jit(prefill)") == 1 and names.count("jit(decode)") == 1, names


# ----------------------------------------------------------------------------- sampling
def test_sampling_is_seeded(nope):
    model = nope["model"]
    a = _ours(model, temperature=1.0, seed=0)
    b = _ours(model, temperature=1.0, seed=0)
    c = _ours(model, temperature=1.0, seed=1)
    np.testing.assert_array_equal(a, b)
    assert np.any(a[:, T:] != c[:, T:])
    for out in (a, c):
        np.testing.assert_array_equal(out[:, :T], IDS)
        assert out[:, T:].min() >= 0 and out[:, T:].max() < model.config.vocab_size
    # Sampling at temperature 1 from this model is not greedy decoding.
    assert np.any(a[:, T:] != nope["greedy"][:, T:])


def test_top_k_1_sampling_is_greedy(nope):
    ours = _ours(nope["model"], temperature=0.7, top_k=1, seed=4)
    np.testing.assert_array_equal(ours, nope["greedy"])
    # NumPy scalars are as good as Python ones.
    ours = _ours(nope["model"], max_new=np.int64(MAX_NEW), temperature=np.float32(0.7),
                 top_k=np.int32(1), seed=4)
    np.testing.assert_array_equal(ours, nope["greedy"])


def test_each_step_draws_fresh_randomness(nope):
    # At a high temperature the next-token distribution is nearly uniform over the vocabulary,
    # so tokens drawn with fresh noise at every step are nearly all distinct. Reusing one key
    # at every step would repeat the same Gumbel noise and mostly the same token.
    new = _ours(nope["model"], temperature=100.0, seed=5)[:, T:]
    for row in new:
        assert len(set(row.tolist())) >= MAX_NEW - 3, row


# ----------------------------------------------------------------------------- input checks
BAD_INPUTS = {
    "prompt_longer_than_max_length": (dict(max_length=10), ValueError,
                                      r"prompt has 19 tokens, longer than max_length 10"),
    "prompt_plus_new_over_max_length": (dict(max_length=25), ValueError,
                                        r"max_new_tokens \(10\) needs 28 cache slots .* more "
                                        r"than max_length 25"),
    "empty_prompt": (dict(ids=np.zeros((1, 0), np.int64), mask=None), ValueError,
                     r"prompt is empty"),
    "empty_row": (dict(mask=MASK * np.array([[1], [0], [1]])), ValueError,
                  r"prompt row 1 is empty"),
    "max_new_tokens_zero": (dict(max_new=0), ValueError, r"max_new_tokens must be a positive"),
    "max_new_tokens_negative": (dict(max_new=-3), ValueError, r"max_new_tokens"),
    "max_new_tokens_float": (dict(max_new=2.0), ValueError, r"max_new_tokens"),
    "max_new_tokens_bool": (dict(max_new=True), ValueError, r"max_new_tokens"),
    "max_length_float": (dict(max_length=40.5), ValueError, r"max_length must be a positive int"),
    "top_k_bool": (dict(temperature=1.0, top_k=True), ValueError, r"top_k"),
    "temperature_string": (dict(temperature="hot"), ValueError, r"temperature"),
    "negative_temperature": (dict(temperature=-0.5), ValueError, r"temperature"),
    "top_p_zero": (dict(temperature=1.0, top_p=0.0), ValueError, r"top_p"),
    "top_p_above_one": (dict(temperature=1.0, top_p=1.5), ValueError, r"top_p"),
    "top_k_zero": (dict(temperature=1.0, top_k=0), ValueError, r"top_k"),
    "top_k_negative": (dict(temperature=1.0, top_k=-2), ValueError, r"top_k"),
    "mask_shape": (dict(mask=MASK[:, 1:]), ValueError,
                   r"attention_mask shape \(3, 18\) does not match input_ids shape \(3, 19\)"),
    "mask_not_binary": (dict(mask=MASK * 2), ValueError, r"attention_mask must hold only 0 and 1"),
    "right_padding": (dict(mask=MASK[:, ::-1].copy()), ValueError,
                      r"attention_mask row 0 has padding after a real token"),
    "padding_in_the_middle": (dict(mask=np.where(np.arange(T) == 15, 0, MASK)), ValueError,
                              r"attention_mask row 0 has padding after a real token"),
    "token_id_at_vocab_size": (dict(ids=np.where(np.arange(T) == T - 1, 128, IDS)), ValueError,
                               r"token id 128, outside the vocabulary \[0, 128\)"),
    "negative_token_id": (dict(ids=np.where(np.arange(T) == T - 2, -1, IDS)), ValueError,
                          r"token id -1, outside the vocabulary"),
    "ids_not_2d": (dict(ids=IDS[0], mask=None), ValueError, r"input_ids must be \[batch, length\]"),
    "ids_not_integers": (dict(ids=IDS.astype(np.float32)), TypeError,
                         r"input_ids must hold integers"),
    "prefill_chunk_size_zero": (dict(prefill_chunk_size=0), ValueError, r"prefill_chunk_size"),
    "eos_not_int": (dict(eos_token_id=[2, 1.5]), TypeError, r"eos_token_id"),
    "eos_outside_vocab": (dict(eos_token_id=[10**12]), ValueError,
                          r"eos_token_id 1000000000000 is outside the vocabulary"),
    "pad_not_int": (dict(pad_token_id=1.7), TypeError, r"pad_token_id"),
    "pad_outside_vocab": (dict(pad_token_id=-1), ValueError, r"pad_token_id -1 is outside"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_inputs_fail_before_compiling(nope, name, monkeypatch):
    kw, error, match = BAD_INPUTS[name]
    kw = dict(kw)
    ids, mask, max_new = kw.pop("ids", IDS), kw.pop("mask", MASK), kw.pop("max_new", MAX_NEW)

    def must_not_run(*args, **kwargs):
        raise AssertionError("reached a compiled step before the input check")

    monkeypatch.setattr(gen_module, "prefill", must_not_run)
    monkeypatch.setattr(gen_module, "decode", must_not_run)
    with pytest.raises(error, match=match):
        generate(nope["model"], ids, max_new, attention_mask=mask, **kw)
