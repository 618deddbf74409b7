"""``hybrid-jax convert``: hf -> orbax -> hf bit for bit, verify, overwrite refusal, bad input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_models import make_hf_model, save_release_layout
from safetensors_dirs import assert_same_tensors, read_all
from hybrid_jax.cli import main
from hybrid_jax.config import ModelConfig
from hybrid_jax.convert.orbax_io import config_from_json, config_to_json


TOKENIZER = {"tokenizer.json": '{"version": "1.0", "model": {"type": "WordLevel"}}\n',
             "tokenizer_config.json": '{"eos_token": "<eos>"}\n'}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A random transformers model saved in shards as the release lays them out, converted
    hf -> orbax -> hf by the CLI."""
    root = tmp_path_factory.mktemp("convert")
    hf = make_hf_model(seed=3, eos_token_id=5)
    save_release_layout(hf, root / "hf", max_shard_size="60KB")
    # A tokenizer saved beside the weights travels with them (its content is not parsed here).
    for name, text in TOKENIZER.items():
        (root / "hf" / name).write_text(text)
    assert main(["convert", "hf-to-orbax", str(root / "hf"), str(root / "orbax")]) == 0
    assert main(["convert", "orbax-to-hf", str(root / "orbax"), str(root / "back"),
                 "--max-shard-size", "60KB"]) == 0
    return root


def test_round_trip_is_bitwise(converted, capsys):
    root = converted
    assert_same_tensors(root / "back", root / "hf")
    assert (root / "back" / "model.safetensors.index.json").is_file()
    assert sorted(p.name for p in (root / "orbax").iterdir()) == sorted(
        ["model_config.json", "params", *TOKENIZER])
    for name, text in TOKENIZER.items():
        assert (root / "orbax" / name).read_text() == text
        assert (root / "back" / name).read_text() == text
    # No temporary directories left beside the outputs.
    assert sorted(p.name for p in root.iterdir()) == ["back", "hf", "orbax"]


def test_summary_line(tmp_path, converted, capsys):
    assert main(["convert", "orbax-to-hf", str(converted / "orbax"), str(tmp_path / "x")]) == 0
    out = capsys.readouterr().out
    n = len(read_all(converted / "hf"))
    params = sum(t.numel() for t in read_all(converted / "hf").values())
    assert f"{n} tensors, {params:,} parameters" in out, out
    assert "written" in out


def test_verify_passes_then_fails_on_a_perturbed_tensor(converted, tmp_path, capsys):
    root = converted
    assert main(["convert", "verify", str(root / "hf"), str(root / "orbax"), "--seq-len", "16"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "max abs logit difference" in out

    # Perturb one tensor of the orbax checkpoint (through a transformers checkpoint copy).
    tensors = read_all(root / "hf")
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name] = tensors[name] + 0.01 * torch.randn_like(tensors[name])
    bad_hf = tmp_path / "bad_hf"
    bad_hf.mkdir()
    for f in ("config.json", "generation_config.json"):
        (bad_hf / f).write_text((root / "hf" / f).read_text())
    from safetensors.torch import save_file

    save_file(tensors, str(bad_hf / "model.safetensors"), metadata={"format": "pt"})
    assert main(["convert", "hf-to-orbax", str(bad_hf), str(tmp_path / "bad_orbax")]) == 0
    capsys.readouterr()
    assert main(["convert", "verify", str(root / "hf"), str(tmp_path / "bad_orbax"),
                 "--seq-len", "16"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_overwrite_is_refused_without_flag(converted, tmp_path, capsys):
    root = converted
    dst = tmp_path / "orbax"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert main(["convert", "hf-to-orbax", str(root / "hf"), str(dst)]) == 2
    err = capsys.readouterr().err
    assert str(dst) in err and "--overwrite" in err and "Traceback" not in err
    assert (dst / "keep.txt").read_text() == "mine"
    assert main(["convert", "orbax-to-hf", str(root / "orbax"), str(dst)]) == 2
    assert (dst / "keep.txt").read_text() == "mine"
    assert main(["convert", "orbax-to-hf", str(root / "orbax"), str(dst), "--overwrite"]) == 0
    assert not (dst / "keep.txt").exists()
    assert_same_tensors(dst, root / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["orbax"]


@pytest.mark.parametrize("command", ["hf-to-orbax", "orbax-to-hf", "verify"])
def test_missing_source_dir_exits_2(command, tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["convert", command, str(missing), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(missing) in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_corrupt_orbax_checkpoint_exits_2(converted, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(converted / "orbax", bad)
    (bad / "model_config.json").write_text("{not json")
    assert main(["convert", "orbax-to-hf", str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(bad / "model_config.json") in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_config_json_round_trips_exactly():
    cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, linear_num_key_heads=2,
                      linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=24,
                      layer_types=("linear_attention",) * 3 + ("full_attention",),
                      rope_theta=None, rms_norm_eps=1.2345678901234e-6, dtype="bfloat16",
                      param_dtype="float16", gdn_method="recurrent", remat="dots",
                      scan_layers=False, pad_token_id=None)
    data = json.loads(json.dumps(config_to_json(cfg)))
    back = config_from_json(data, Path("x"))
    assert back == cfg
    assert dataclasses.asdict(back) == dataclasses.asdict(cfg)


def test_bf16_round_trip_and_verify(tmp_path, capsys):
    hf = make_hf_model(seed=5).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf")  # its own layout, kept by --layout save_pretrained
    assert main(["convert", "hf-to-orbax", str(tmp_path / "hf"), str(tmp_path / "o")]) == 0
    assert main(["convert", "orbax-to-hf", str(tmp_path / "o"), str(tmp_path / "back"),
                 "--layout", "save_pretrained"]) == 0
    assert_same_tensors(tmp_path / "back", tmp_path / "hf")
    capsys.readouterr()
    # Default: both models in float32 (bf16 weights upcast exactly), the float32 tolerance.
    rc = main(["convert", "verify", str(tmp_path / "hf"), str(tmp_path / "o"), "--seq-len", "16"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "tolerance 1.0e-04" in out and "params bfloat16, compute float32" in out
    # Each in bf16: the looser default.
    rc = main(["convert", "verify", str(tmp_path / "hf"), str(tmp_path / "o"), "--seq-len", "16",
               "--compute-dtype", "native"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "tolerance 1.0e-01" in out and "compute bfloat16" in out


@pytest.mark.parametrize("dtype,compress", [(None, False), ("bfloat16", True)])
def test_hf_to_orbax_streams_one_parameter_at_a_time(converted, tmp_path, dtype, compress):
    """hf_to_orbax writes leaf by leaf (progress once per parameter, in the model's order) and
    the result restores, through load_orbax and plain orbax, to exactly from_hf's model."""
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    from hybrid_jax.convert.from_hf import from_hf
    from hybrid_jax.convert.orbax_io import PARAMS_DIR, hf_to_orbax, load_orbax

    names: list[str] = []
    out = hf_to_orbax(converted / "hf", tmp_path / "o", dtype=dtype, compress=compress,
                      progress=names.append)
    ref = from_hf(converted / "hf", dtype=dtype)
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(ref)))[0]
    assert names == [".".join(str(getattr(k, "key", k)) for k in p) for p, _ in flat]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no temporaries left
    got = load_orbax(out)
    assert got.config == ref.config
    for (p, want), have in zip(flat, jax.tree.leaves(nnx.to_pure_dict(nnx.state(got)))):
        assert want.dtype == have.dtype and np.array_equal(np.asarray(want), np.asarray(have)), p
    with ocp.StandardCheckpointer() as ckptr:  # the layout plain orbax restores
        plain = ckptr.restore(out / PARAMS_DIR)
    assert len(jax.tree.leaves(plain)) == len(flat)


# ----------------------------------------------------------------------------- bad input, end to end
def _edit_weights(ckpt: Path, edit) -> Path:
    from safetensors.numpy import load_file as load_np, save_file as save_np

    weights = ckpt / "model.safetensors"
    tensors = load_np(weights)
    edit(tensors)
    save_np(tensors, weights)
    return weights


def _edit_config(ckpt: Path, key: str, value) -> Path:
    path = ckpt / "config.json"
    config = json.loads(path.read_text())
    config[key] = value
    path.write_text(json.dumps(config))
    return path


def _truncate(ckpt: Path) -> Path:
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return weights


GDN_Q = "model.layers.0.linear_attn.q_proj.weight"
BAD_INPUTS = {
    # name: (how to break a good checkpoint -> the file at fault, words the message must hold)
    "missing_tensor": (lambda c: _edit_weights(c, lambda t: t.pop(GDN_Q)), [GDN_Q, "missing"]),
    "unexpected_tensor": (lambda c: _edit_weights(c, lambda t: t.update(
        {"model.layers.0.linear_attn.extra.weight": np.zeros(3, np.float32)})),
        ["model.layers.0.linear_attn.extra.weight", "unexpected"]),
    "wrong_shape": (lambda c: _edit_weights(c, lambda t: t.update({GDN_Q: t[GDN_Q][:-1]})),
                    [GDN_Q, "shape"]),
    "wrong_dtype": (lambda c: _edit_weights(c, lambda t: t.update({GDN_Q: t[GDN_Q].astype(np.int32)})),
                    [GDN_Q, "dtype"]),
    # The config is read as the truth, so the message names the tensors (and their file) that
    # disagree with it.
    "config_disagrees": (lambda c: (_edit_config(c, "intermediate_size", 80), c / "model.safetensors")[1],
                         ["model.layers.0.mlp.gate_proj.weight", "expected [80, 64]"]),
    "truncated_file": (_truncate, ["truncated"]),
    "unknown_model_type": (lambda c: _edit_config(c, "model_type", "llama"), ["model_type", "llama"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_named_and_nothing_is_written(case, tmp_path, capsys):
    good = tmp_path / "hf"
    make_hf_model(seed=4).save_pretrained(good)
    break_it, words = BAD_INPUTS[case]
    culprit_file = break_it(good)
    out = tmp_path / "out"
    assert main(["convert", "hf-to-orbax", str(good), str(out)]) == 2
    err = capsys.readouterr().err
    assert str(culprit_file) in err, err
    for word in words:
        assert word in err, (word, err)
    assert "Traceback" not in err
    # Nothing left behind: no output, no temporary directory beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
