"""``hybrid-jax generate``: streamed text equals the decode of ``generate``'s tokens, with a
tokenizer.json, as UTF-8 bytes and from an orbax checkpoint; EOS; bad input named, exit 2."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from hf_models import make_hf_model
from hybrid_jax.cli import main
from hybrid_jax.inference.text import ByteCodec, TokenizerCodec

VOCAB = 320  # the model's; the tokenizer has 300, as a real model's vocabulary is padded
NEW = 12
TOK_PROMPT = "hello café 日本"   # 9 tokens
BYTES_PROMPT = "héllo wörld"    # 13 bytes
# One prefill shape and one cache size for the tokenizer-mode runs, so that they share compiles
# (the bytes run keeps generate's defaults).
SHAPES = {"prefill_chunk_size": 16, "max_length": 32}
SHAPE_ARGS = ["--prefill-chunk-size", "16", "--max-length", "32"]


def _make_tokenizer() -> Tokenizer:
    """Byte-level BPE (multi-byte characters split across tokens), whitespace stripped."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Strip()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog",
                             "café naïve 日本語 über straße", "hello world, hello there"], trainer)
    return tok


def _bytes_decode(ids) -> str:
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """hf/ (no tokenizer: bytes), hf_tok/ (with tokenizer.json), orbax/ (from hf-to-orbax), and
    the greedy tokens plain ``generate`` gives for each prompt."""
    import jax

    from hybrid_jax.convert import from_hf
    from hybrid_jax.inference import generate

    root = tmp_path_factory.mktemp("generate")
    make_hf_model(seed=7, vocab_size=VOCAB).save_pretrained(root / "hf")
    tok = _make_tokenizer()
    tok.save(str(root / "tokenizer.json"))
    shutil.copytree(root / "hf", root / "hf_tok")
    shutil.copy(root / "tokenizer.json", root / "hf_tok" / "tokenizer.json")
    assert main(["convert", "hf-to-orbax", str(root / "hf"), str(root / "orbax")]) == 0

    model = from_hf(root / "hf")
    ref = {}
    # The tests' precision (conftest), which module fixtures run outside of: same numerics, and
    # the CLI's runs reuse this prefill's compile.
    with jax.default_matmul_precision("highest"):
        for mode, ids, kw in [("tok", tok.encode(TOK_PROMPT).ids, SHAPES),
                              ("bytes", list(BYTES_PROMPT.encode("utf-8")), {})]:
            out = generate(model, np.asarray([ids]), NEW, eos_token_id=(), **kw)
            ref[mode] = (ids, np.asarray(out)[0, len(ids):].tolist())
    return root, tok, ref


def _run(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["generate", *args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_tokenizer_json_in_checkpoint_dir(ckpts, capsys):
    root, tok, ref = ckpts
    ids, new = ref["tok"]
    rc, out, err = _run(capsys, "--checkpoint", str(root / "hf_tok"), "--prompt", TOK_PROMPT,
                        "--max-new-tokens", str(NEW), "--eos-token-id", *SHAPE_ARGS)
    assert rc == 0, err
    assert out == tok.decode(new) + "\n"
    assert f"{len(ids)} prompt tokens, {NEW} new tokens;" in err and "tokens/s" in err


def test_bytes_without_tokenizer(ckpts, capsys):
    root, _, ref = ckpts
    ids, new = ref["bytes"]
    rc, out, err = _run(capsys, "--checkpoint", str(root / "hf"), "--prompt", BYTES_PROMPT,
                        "--max-new-tokens", str(NEW), "--eos-token-id")
    assert rc == 0, err
    assert out == _bytes_decode(new) + "\n"
    assert f"{len(ids)} prompt tokens, {NEW} new tokens;" in err


def test_orbax_checkpoint_with_tokenizer_flag(ckpts, capsys):
    root, tok, ref = ckpts
    _, new = ref["tok"]
    rc, out, err = _run(capsys, "--checkpoint", str(root / "orbax"), "--prompt", TOK_PROMPT,
                        "--tokenizer", str(root / "tokenizer.json"), "--max-new-tokens", str(NEW),
                        "--eos-token-id", *SHAPE_ARGS)
    assert rc == 0, err
    assert out == tok.decode(new) + "\n"
    assert "orbax checkpoint" in err


def test_stops_at_the_configs_eos_unless_overridden(ckpts, tmp_path, capsys):
    root, tok, ref = ckpts
    _, new = ref["tok"]
    # The first token after the first that has not come before: generation stops there.
    k = next(i for i in range(1, NEW) if new[i] not in new[:i])
    ckpt = shutil.copytree(root / "hf_tok", tmp_path / "hf_eos")
    config = json.loads((ckpt / "config.json").read_text())
    config["eos_token_id"] = new[k]
    (ckpt / "config.json").write_text(json.dumps(config))
    rc, out, err = _run(capsys, "--checkpoint", str(ckpt), "--prompt", TOK_PROMPT,
                        "--max-new-tokens", str(NEW), *SHAPE_ARGS)
    assert rc == 0, err
    assert out == tok.decode(new[:k]) + "\n"  # the EOS itself is not printed
    assert f"{k + 1} new tokens (ended by EOS {new[k]})" in err
    # --eos-token-id with another id replaces the config's.
    rc, out, err = _run(capsys, "--checkpoint", str(ckpt), "--prompt", TOK_PROMPT,
                        "--max-new-tokens", str(NEW), "--eos-token-id", str(VOCAB - 1),
                        *SHAPE_ARGS)
    assert rc == 0, err
    assert out == tok.decode(new) + "\n"


def test_streams_hold_back_half_characters(ckpts):
    """Token by token, no stream emits a U+FFFD that a later token completes, and the pieces
    join to decode's text."""
    _, tok, _ = ckpts
    text = "naïve 日本語 straße"
    for codec, ids in [(TokenizerCodec(tok), tok.encode(text).ids),
                       (ByteCodec(), list(text.encode("utf-8")))]:
        stream = codec.stream()
        pieces = [stream.push([i]) for i in ids] + [stream.flush()]
        assert "".join(pieces) == codec.decode(ids) == text
        assert not any("\ufffd" in p for p in pieces)
    # Invalid UTF-8 comes out as U+FFFD in both, and ids >= 256 are not bytes.
    codec = ByteCodec()
    ids = [0xE6, 0x97, 65, 300, 0xE6]
    stream = codec.stream()
    assert "".join([stream.push([i]) for i in ids] + [stream.flush()]) == codec.decode(ids) \
        == "\ufffdA\ufffd"


# ----------------------------------------------------------------------------- bad input
# name: root -> (arguments, words the error must hold). hf/ has no tokenizer (bytes), hf_tok/ has.
BAD_INPUTS = {
    "missing_checkpoint": lambda r: (["--checkpoint", f"{r}/nope", "--prompt", "hi"],
                                     [f"{r}/nope", "not found"]),
    "unrecognised_checkpoint": lambda r: (["--checkpoint", f"{r}/empty_dir", "--prompt", "hi"],
                                          [f"{r}/empty_dir", "config.json", "model_config.json"]),
    "empty_prompt": lambda r: (["--checkpoint", f"{r}/hf", "--prompt", ""], ["--prompt", "empty"]),
    "prompt_without_tokens": lambda r: (["--checkpoint", f"{r}/hf_tok", "--prompt", "   "],
                                        ["--prompt", "no tokens", "tokenizer.json"]),
    "max_new_tokens": lambda r: (["--checkpoint", f"{r}/hf", "--prompt", "hi",
                                  "--max-new-tokens", "0"], ["--max-new-tokens", "0"]),
    "temperature": lambda r: (["--checkpoint", f"{r}/hf", "--prompt", "hi", "--temperature", "-1"],
                              ["temperature", "-1"]),
    "top_p_zero": lambda r: (["--checkpoint", f"{r}/hf", "--prompt", "hi", "--top-p", "0"],
                             ["top_p", "0"]),
    "top_p_above_one": lambda r: (["--checkpoint", f"{r}/hf", "--prompt", "hi", "--top-p", "1.5"],
                                  ["top_p", "1.5"]),
    "top_k": lambda r: (["--checkpoint", f"{r}/hf", "--prompt", "hi", "--top-k", "0"],
                        ["top_k", "0"]),
    "missing_tokenizer": lambda r: (["--checkpoint", f"{r}/hf", "--prompt", "hi", "--tokenizer",
                                     f"{r}/nope.json"], [f"{r}/nope.json", "not found"]),
    "tokenizer_not_json": lambda r: (["--checkpoint", f"{r}/hf", "--prompt", "hi", "--tokenizer",
                                      f"{r}/garbage.json"], [f"{r}/garbage.json", "tokenizer"]),
    "tokenizer_bad_fields": lambda r: (["--checkpoint", f"{r}/hf", "--prompt", "hi",
                                        "--tokenizer", f"{r}/bad_fields.json"],
                                       [f"{r}/bad_fields.json", "tokenizer"]),
    "prompt_longer_than_max_length": lambda r: (["--checkpoint", f"{r}/hf", "--prompt", "hello",
                                                 "--max-length", "3"],
                                                ["5 tokens", "max_length 3"]),
    "no_room_for_new_tokens": lambda r: (["--checkpoint", f"{r}/hf", "--prompt", "hello",
                                          "--max-length", "5", "--max-new-tokens", "2"],
                                         ["needs 6 cache slots", "max_length 5"]),
    "prefill_chunk_size": lambda r: (["--checkpoint", f"{r}/hf", "--prompt", "hi",
                                      "--prefill-chunk-size", "0"], ["prefill_chunk_size", "0"]),
    "prompt_outside_vocab": lambda r: (["--checkpoint", f"{r}/hf", "--prompt", "hi",
                                        "--tokenizer", f"{r}/big_ids.json"],
                                       ["token id 400", f"[0, {VOCAB})"]),
}


@pytest.fixture(scope="module")
def bad_root(ckpts):
    root = ckpts[0]
    (root / "empty_dir").mkdir()
    (root / "garbage.json").write_text("not json at all")
    (root / "bad_fields.json").write_text('{"version": "1.0", "model": 3}')
    big = Tokenizer(models.WordLevel({"[UNK]": 0, "hi": 400}, unk_token="[UNK]"))
    big.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    big.save(str(root / "big_ids.json"))
    return root


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_named_exit_2(case, bad_root, capsys):
    args, words = BAD_INPUTS[case](bad_root)
    rc, out, err = _run(capsys, *args)
    assert rc == 2, (out, err)
    assert out == ""  # nothing generated
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)


def test_a_failure_inside_the_library_is_not_reported_as_bad_input(ckpts, monkeypatch, capsys):
    import hybrid_jax.inference

    def broken(*args, **kwargs):
        raise ValueError("internal: something inside went wrong")

    monkeypatch.setattr(hybrid_jax.inference, "generate", broken)
    root = ckpts[0]
    with pytest.raises(ValueError, match="internal"):
        main(["generate", "--checkpoint", str(root / "hf"), "--prompt", "hi"])


def test_bytes_need_a_vocabulary_of_256(tmp_path, capsys):
    make_hf_model(seed=1).save_pretrained(tmp_path / "small_vocab")  # vocab 128
    rc, out, err = _run(capsys, "--checkpoint", str(tmp_path / "small_vocab"), "--prompt", "hi")
    assert rc == 2 and out == ""
    assert "128" in err and "256" in err and "--tokenizer" in err and err.count("\n") == 1, err


def _metaspace_tokenizer() -> Tokenizer:
    """SentencePiece-style BPE: a leading-space marker whose text depends on the token before."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<eos>"])
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog",
                             "hello world, hello there", "café naïve"], trainer)
    return tok


@pytest.mark.parametrize("make", [_make_tokenizer, _metaspace_tokenizer])
def test_token_stream_joins_to_the_full_decode(make):
    """Streaming decodes only recent tokens; joined up it must equal decoding all at once, for
    random token sequences (byte-level pieces of multi-byte characters included)."""
    from hybrid_jax.inference.text import TokenizerCodec

    codec = TokenizerCodec(make())
    rng = np.random.default_rng(0)
    vocab = codec.tokenizer.get_vocab_size()
    for _ in range(20):
        ids = rng.integers(0, vocab, 40).tolist()
        stream = codec.stream()
        pieces = [stream.push([i]) for i in ids]
        assert "".join(pieces) + stream.flush() == codec.decode(ids), ids
