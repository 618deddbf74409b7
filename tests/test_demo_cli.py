"""``hybrid-jax demo``, the main job, end to end on the tiny preset."""

from __future__ import annotations

import pytest

from hybrid_jax.cli import main


def test_demo_runs_forms_and_generates(capsys):
    assert main(["demo", "--preset", "tiny", "--batch", "1", "--seq-len", "32",
                 "--methods", "chunk,recurrent", "--new-tokens", "4", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "logits recurrent vs chunk: relative difference" in out
    assert "logits finite: True" in out
    assert "1 x 16 prompt tokens + 4 new (greedy)" in out
    assert "first new token = forward argmax: True" in out


@pytest.mark.parametrize("argv", [["--new-tokens", "-1"], ["--seq-len", "1"]])
def test_demo_rejects_bad_generation_options(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--preset", "tiny", *argv])
    assert e.value.code == 2
    assert "--new-tokens" in capsys.readouterr().err
