"""experiments/check_7b.py at its small size: every step of the 7B check runs (a release-layout
checkpoint built from the published structure, transformers' reference, both CLI conversions,
the bitwise comparison, forward, generate and the CLI) and its correctness checks pass."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load_script():
    spec = importlib.util.spec_from_file_location("check_7b", ROOT / "experiments" / "check_7b.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_check_7b_runs_end_to_end_at_small_size(tmp_path, capsys):
    check = _load_script()
    assert check.main(["--size", "tiny", "--work", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for line in ("PASS: round trip bitwise", "PASS: float32 compute: logits within 1e-4",
                 "PASS: float32 compute: greedy tokens equal transformers'",
                 "PASS: bf16: forward's top token equals transformers'",
                 "PASS: bf16: generate's first token equals transformers'"):
        assert line in out, out[-3000:]
    assert "all equal: names, dtypes, shapes, bytes, config.json" in out
    # Only the 7B writes the results file; the checkpoints are removed without --keep.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["compare.json", "forward.npz", "forward_f32.npz", "generate.npz", "transformers.npz",
         "transformers_f32.npz"])
    assert json.loads((tmp_path / "compare.json").read_text())["bitwise"] is True


def test_the_built_checkpoint_has_the_release_names_and_shapes():
    """The 7B's tensor table, from the published architecture: 523 tensors, 7,430,870,688
    parameters (the release's count), each GDN conv its projection's own."""
    check = _load_script()
    tensors = check.release_tensors(check.hf_config("7b"))
    assert len(tensors) == 523
    assert sum(int(__import__("math").prod(s)) for _, s, _ in tensors) == 7_430_870_688
    shapes = dict((n, s) for n, s, _ in tensors)
    assert shapes["model.layers.0.linear_attn.q_conv1d.weight"] == (2880, 1, 4)
    assert shapes["model.layers.0.linear_attn.v_conv1d.weight"] == (5760, 1, 4)
    assert shapes["model.layers.3.post_attention_layernorm.weight"] == (3840,)
