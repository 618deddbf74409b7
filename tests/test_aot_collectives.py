"""``aot.collectives.collective_bytes`` on programs whose traffic is known: an all-gather
inside a three-trip loop and a collective-permute after it, on 4 simulated CPU devices; and
TPU-style async starts, whose results are tuples of operands, results and contexts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from host_devices import run_child


def _child(out: Path) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, PartitionSpec as P

    from hybrid_jax.aot.collectives import collective_bytes

    mesh = Mesh(np.asarray(jax.devices()), ("i",))

    def program(x):  # x: [1, 8] float32 per device
        def body(_, carry):
            return carry + jnp.sum(jax.lax.all_gather(carry, "i"), axis=0)

        y = jax.lax.fori_loop(0, 3, body, x)
        return jax.lax.ppermute(y, "i", [(j, (j + 1) % 4) for j in range(4)])

    run = jax.jit(jax.shard_map(program, mesh=mesh, in_specs=P("i"), out_specs=P("i")))
    out.write_text(json.dumps(collective_bytes(run.lower(jnp.ones((4, 8))).compile().as_text())))


def test_collective_bytes_count_results_times_loop_trips(tmp_path):
    got = run_child(__file__, tmp_path / "bytes.json", n_devices=4)
    # all-gather: [4, 1, 8] float32 per device, 3 trips; permute: [1, 8] float32 once.
    assert got == {"all-gather": 3 * 4 * 8 * 4, "reduce-scatter": 0, "all-reduce": 0,
                   "collective-permute": 8 * 4, "all-to-all": 0}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    _child(Path(sys.argv[1]))


def test_async_starts_count_their_results_not_operands_or_contexts():
    from hybrid_jax.aot.collectives import collective_bytes

    hlo = """HloModule m

ENTRY %main (p: bf16[4,8]) -> bf16[4,8] {
  %p = bf16[4,8]{1,0} parameter(0)
  %cp = (bf16[4,8]{1,0}, bf16[4,8]{1,0}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%p), source_target_pairs={{0,1},{1,0}}
  %d = bf16[4,8]{1,0} collective-permute-done(%cp)
  %ag = ((bf16[4,8]{1,0}, bf16[2]{0}), (bf16[8,8]{1,0}, bf16[4]{0})) all-gather-start(%p, %q), replica_groups={{0,1}}, dimensions={0}
  ROOT %r = bf16[4,8]{1,0} copy(%d)
}
"""
    got = collective_bytes(hlo)
    assert got["collective-permute"] == 4 * 8 * 2  # one bf16[4, 8] result
    assert got["all-gather"] == (8 * 8 + 4) * 2  # the two results of a combined gather


def test_a_loop_bounded_by_a_constant_counts_its_trips():
    """XLA TPU writes no known_trip_count: the bound is the constant the condition compares
    the counter against."""
    from hybrid_jax.aot.collectives import collective_bytes

    hlo = """HloModule m

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[]{:T(128)} constant(5)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %ar = f32[8]{0} all-reduce(%x), replica_groups={{0,1}}, to_apply=%add
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %ar)
}

ENTRY %main (x: f32[8]) -> (s32[], f32[8]) {
  %x = f32[8]{0} parameter(0)
  %init = (s32[], f32[8]{0}) tuple(%zero, %x)
  ROOT %w = (s32[], f32[8]{0}) while(%init), condition=%cond, body=%body
}
"""
    assert collective_bytes(hlo)["all-reduce"] == 5 * 8 * 4
