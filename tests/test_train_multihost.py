"""Two processes of 4 simulated CPU devices each (jax.distributed on localhost) train like one
process of 8 devices, and save checkpoints together."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from host_devices import child_env

STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _spawn(args: list[str], devices: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, *args], env=child_env(devices), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            cwd=Path(__file__).parent.parent)


def _wait(procs: list[subprocess.Popen]) -> None:
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("multihost")
    port = str(_free_port())
    two = [_spawn(["2", str(i), port, str(d / "two")], 4) for i in range(2)]
    _wait(two)
    _wait([_spawn(["1", "0", "0", str(d / "one")], 8)])
    return {name: json.loads((d / name / "losses.json").read_text()) | {"dir": str(d / name)}
            for name in ("one", "two")}


def test_two_processes_give_the_losses_of_one(runs):
    assert runs["two"]["processes"] == 2 and runs["one"]["processes"] == 1
    np.testing.assert_allclose(runs["two"]["losses"], runs["one"]["losses"], rtol=1e-5)


def test_two_processes_checkpoint_together(runs):
    steps = sorted(int(p.name) for p in (Path(runs["two"]["dir"]) / "ckpt").iterdir()
                   if p.name.isdigit())
    assert steps == [2, STEPS]
    log = [json.loads(line) for line in (Path(runs["two"]["dir"]) / "log.jsonl").read_text()
           .splitlines()]
    assert [r["step"] for r in log] == list(range(STEPS))  # written once, by process 0


@pytest.mark.parametrize("args,match", [
    (("localhost:1234", 2, 2), "process_id must be in"),
    (("localhost:1234", 0, 0), "num_processes must be a positive int"),
    (("localhost", 2, 0), "host:port")])
def test_initialize_distributed_checks_its_arguments(args, match):
    from hybrid_jax.distributed import initialize_distributed

    with pytest.raises(ValueError, match=match):
        initialize_distributed(*args)


def _child(num_processes: int, process_id: int, port: str, out: str) -> None:
    if num_processes > 1:
        from hybrid_jax.distributed import initialize_distributed

        initialize_distributed(f"localhost:{port}", num_processes, process_id)
    import jax

    from hybrid_jax import olmo_hybrid_tiny
    from hybrid_jax.config import ATTENTION, GDN
    from hybrid_jax.sharding import MeshShape, make_mesh
    from hybrid_jax.train import OptimizerConfig, PackedDataset
    from hybrid_jax.train.loop import LoopConfig, train

    jax.config.update("jax_default_matmul_precision", "highest")
    cfg = olmo_hybrid_tiny(num_hidden_layers=2, layer_types=(GDN, ATTENTION))
    tokens = np.random.default_rng(0).integers(1, cfg.vocab_size, 4000)
    tokens[::37] = 0
    data = PackedDataset(tokens, seq_len=32, global_batch=8, eos_id=0,
                         vocab_size=cfg.vocab_size, seed=1)
    losses: list[float] = []
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    train(cfg, OptimizerConfig(lr=3e-3, warmup_steps=1, total_steps=STEPS), data,
          LoopConfig(steps=STEPS, micro_batches=2, checkpoint_every=2,
                     steps_per_call=2),  # calls of 2 and 1 steps: [K, A, B, T] batches
          mesh=make_mesh(MeshShape(fsdp=4, tensor=2)), checkpoint_dir=out_dir / "ckpt",
          log_file=out_dir / "log.jsonl", on_step=lambda s, r: losses.append(r["loss"]))
    if jax.process_index() == 0:
        (out_dir / "losses.json").write_text(json.dumps(
            {"losses": losses, "processes": jax.process_count()}))


if __name__ == "__main__":
    _child(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
