"""Every gated delta rule method against a float64 NumPy recurrence (tests/gdn_reference.py)."""

from __future__ import annotations

import functools
import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_reference import reference_forward, reference_grads
from hybrid_jax.ops import FORMS, METHODS, gated_delta_rule, resolve_method


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def make_inputs(seed, b=2, t=37, hk=2, hv=2, dk=16, dv=24, g_range=(-1.0, 0.0), beta_range=(0.0, 2.0),
                n_segments=0, initial_state=True):
    rng = np.random.default_rng(seed)
    f32 = np.float32
    x = dict(
        q=rng.standard_normal((b, t, hk, dk)).astype(f32),
        k=rng.standard_normal((b, t, hk, dk)).astype(f32),
        v=rng.standard_normal((b, t, hv, dv)).astype(f32),
        g=rng.uniform(*g_range, (b, t, hv)).astype(f32),
        beta=rng.uniform(*beta_range, (b, t, hv)).astype(f32),
        initial_state=(rng.standard_normal((b, hv, dk, dv)).astype(f32) if initial_state else None),
        segment_ids=None,
    )
    if n_segments:
        starts = np.sort(rng.choice(np.arange(1, t), size=(b, n_segments), replace=True), axis=1)
        seg = np.zeros((b, t), np.int32)
        for r in range(b):
            for s in starts[r]:
                seg[r, s:] += 1
        x["segment_ids"] = seg
    return x


CASES = {
    "t1": dict(t=1),
    "t_not_multiple": dict(t=37),
    "two_chunks_and_a_bit": dict(t=70),
    "strong_decay": dict(t=70, g_range=(-30.0, 0.0)),
    "strong_decay_uniform": dict(t=70, g_range=(-30.0, -29.0)),
    "g_zero": dict(t=70, g_range=(0.0, 0.0)),
    "beta_0_to_2": dict(t=70, beta_range=(0.0, 2.0)),
    "grouped_value_heads": dict(t=45, hk=2, hv=6),
    "segments": dict(t=90, n_segments=4),
    "no_initial_state": dict(t=40, initial_state=False),
}
CHUNK = 32  # small chunks so short sequences still cross several chunk boundaries


def run(method, x, *, use_qk_l2norm=True, chunk_size=CHUNK, jit=False):
    fn = functools.partial(gated_delta_rule, output_final_state=True, use_qk_l2norm=use_qk_l2norm,
                           method=method, chunk_size=chunk_size)
    if jit:
        fn = jax.jit(fn)
    return fn(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["initial_state"],
              segment_ids=x["segment_ids"])


@pytest.mark.parametrize("method", FORMS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_matches_float64(method, case):
    x = make_inputs(zlib.crc32(case.encode()) % 1000, **CASES[case])
    ref_o, ref_s = reference_forward(x["q"], x["k"], x["v"], x["g"], x["beta"],
                                     initial_state=x["initial_state"], segment_ids=x["segment_ids"],
                                     use_qk_l2norm=True)
    o, s = run(method, x, jit=True)
    chex.assert_shape(o, x["v"].shape)
    chex.assert_tree_all_finite((o, s))
    assert o.dtype == jnp.float32 and s.dtype == jnp.float32
    assert rel(o, ref_o) < 1e-5, rel(o, ref_o)
    assert rel(s, ref_s) < 1e-5, rel(s, ref_s)


def _segment_ids_around_a_chunk(b: int, t: int) -> np.ndarray:
    """[B, T] ids for T near one 64-token chunk: row 0 changes id at position 1 (T = 2: the
    last position), at the last position and, where T allows, at 63 and 64 (a segment of one
    token at the chunk's end, one starting the next chunk); row 1 keeps one id (its initial
    state stays live throughout)."""
    seg = np.full((b, t), 5, np.int32)
    seg[0] = 0
    for start in sorted({1, t - 1, 63, 64}):
        if 0 < start < t:
            seg[0, start:] += 1
    return seg


@pytest.mark.parametrize("t", [1, 2, 63, 64, 65])
@pytest.mark.parametrize("method", FORMS)
def test_sequence_lengths_around_a_chunk_with_segments_and_a_state(method, t):
    """T = 1, 2 and one chunk (64) less one, exactly and plus one, with segment ids and an
    initial state: output, final state and every gradient against the float64 reference."""
    x = make_inputs(40 + t, b=2, t=t, hk=1, hv=2, dk=16, dv=24, g_range=(-3.0, 0.0))
    x["segment_ids"] = _segment_ids_around_a_chunk(2, t)
    names = ("q", "k", "v", "g", "beta", "initial_state")
    rng = np.random.default_rng(t)
    do = rng.standard_normal(x["v"].shape)
    dfin = rng.standard_normal(x["initial_state"].shape)

    def loss(*args):
        o, s = run(method, {**x, **dict(zip(names, args))}, chunk_size=64)
        return jnp.sum(o * do) + jnp.sum(s * dfin), (o, s)

    (_, (o, s)), grads = jax.value_and_grad(loss, argnums=range(6), has_aux=True)(
        *(x[n] for n in names))
    ref_o, ref_s = reference_forward(x["q"], x["k"], x["v"], x["g"], x["beta"],
                                     initial_state=x["initial_state"],
                                     segment_ids=x["segment_ids"], use_qk_l2norm=True)
    ref = reference_grads(x["q"], x["k"], x["v"], x["g"], x["beta"], do, dfin,
                          initial_state=x["initial_state"], segment_ids=x["segment_ids"],
                          use_qk_l2norm=True)
    assert rel(o, ref_o) < 1e-5 and rel(s, ref_s) < 1e-5, (rel(o, ref_o), rel(s, ref_s))
    for name, got, want in zip(names, grads, ref):
        assert rel(got, want) < 1e-4, (name, rel(got, want))


class TestJitAndEager(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_methods_agree_jitted_and_not(self):
        x = make_inputs(1, t=50, hk=1, hv=2, n_segments=2)
        ref_o, ref_s = reference_forward(x["q"], x["k"], x["v"], x["g"], x["beta"],
                                         initial_state=x["initial_state"],
                                         segment_ids=x["segment_ids"])
        for method in FORMS:
            fn = self.variant(functools.partial(gated_delta_rule, output_final_state=True,
                                                method=method, chunk_size=16))
            o, s = fn(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["initial_state"],
                      segment_ids=x["segment_ids"])
            assert rel(o, ref_o) < 1e-5 and rel(s, ref_s) < 1e-5, method


def test_reference_backward_matches_finite_differences():
    """The hand-written float64 backward is itself checked before it judges anything."""
    x = make_inputs(3, b=1, t=9, hk=1, hv=2, dk=4, dv=3, n_segments=1)
    rng = np.random.default_rng(4)
    do = rng.standard_normal((1, 9, 2, 3))
    dfin = rng.standard_normal((1, 2, 4, 3))
    names = ("q", "k", "v", "g", "beta", "initial_state")
    args = {n: np.asarray(x[n], np.float64) for n in names}

    def loss(a):
        o, s = reference_forward(a["q"], a["k"], a["v"], a["g"], a["beta"],
                                 initial_state=a["initial_state"], segment_ids=x["segment_ids"],
                                 use_qk_l2norm=True)
        return (o * do).sum() + (s * dfin).sum()

    grads = reference_grads(args["q"], args["k"], args["v"], args["g"], args["beta"], do, dfin,
                            initial_state=args["initial_state"], segment_ids=x["segment_ids"],
                            use_qk_l2norm=True)
    for name, grad in zip(names, grads):
        for _ in range(4):
            idx = tuple(rng.integers(0, n) for n in args[name].shape)
            plus = {n: a.copy() for n, a in args.items()}
            minus = {n: a.copy() for n, a in args.items()}
            plus[name][idx] += 1e-6
            minus[name][idx] -= 1e-6
            fd = (loss(plus) - loss(minus)) / 2e-6
            assert abs(fd - grad[idx]) < 1e-6 * max(1.0, abs(fd)), (name, idx, fd, grad[idx])


GRAD_CASES = ["t_not_multiple", "strong_decay", "g_zero", "grouped_value_heads", "segments"]


@pytest.mark.parametrize("method", FORMS)
@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradients_match_float64(method, case):
    x = make_inputs(zlib.crc32(case.encode()) % 1000 + 7, **CASES[case])
    rng = np.random.default_rng(11)
    do = rng.standard_normal(x["v"].shape).astype(np.float32)
    dfin = rng.standard_normal(x["initial_state"].shape).astype(np.float32)

    def loss(q, k, v, g, beta, s0):
        o, s = gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True,
                                use_qk_l2norm=True, segment_ids=x["segment_ids"], method=method,
                                chunk_size=CHUNK)
        return jnp.sum(o * do) + jnp.sum(s * dfin)

    grads = jax.jit(jax.grad(loss, argnums=range(6)))(
        x["q"], x["k"], x["v"], x["g"], x["beta"], x["initial_state"])
    ref = reference_grads(x["q"], x["k"], x["v"], x["g"], x["beta"], do, dfin,
                          initial_state=x["initial_state"], segment_ids=x["segment_ids"],
                          use_qk_l2norm=True)
    for name, got, want in zip(("q", "k", "v", "g", "beta", "initial_state"), grads, ref):
        chex.assert_tree_all_finite(got)
        assert rel(got, want) < 1e-4, (name, rel(got, want))


@pytest.mark.parametrize("method", FORMS)
def test_state_carry_two_halves_equal_whole(method):
    x = make_inputs(5, t=100)
    o_all, s_all = run(method, x)
    first = {**x, **{n: x[n][:, :41] for n in ("q", "k", "v", "g", "beta")}}
    o1, s1 = run(method, first)
    second = {**x, **{n: x[n][:, 41:] for n in ("q", "k", "v", "g", "beta")}, "initial_state": s1}
    o2, s2 = run(method, second)
    assert rel(jnp.concatenate([o1, o2], axis=1), o_all) < 1e-5
    assert rel(s2, s_all) < 1e-5


@pytest.mark.parametrize("method", FORMS)
def test_bf16_inputs_close_to_float32(method):
    x = make_inputs(6, t=80, hk=2, hv=4)
    o32, s32 = run(method, x)
    xb = {**x, **{n: jnp.asarray(x[n], jnp.bfloat16) for n in ("q", "k", "v")}}
    ob, sb = run(method, xb)
    assert ob.dtype == jnp.bfloat16 and sb.dtype == jnp.float32
    assert rel(ob, o32) < 1e-2, rel(ob, o32)
    assert rel(sb, s32) < 1e-2, rel(sb, s32)


def test_segment_reset_equals_separate_sequences():
    """Packing two documents with segment ids equals running each alone (initial state on the first)."""
    x = make_inputs(8, b=1, t=60)
    seg = np.zeros((1, 60), np.int32)
    seg[:, 23:] = 1
    for method in FORMS:
        o, _ = gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"],
                                initial_state=x["initial_state"], segment_ids=seg, method=method,
                                chunk_size=16)
        sl = lambda n, a, b: x[n][:, a:b]
        o1, _ = gated_delta_rule(*(sl(n, 0, 23) for n in ("q", "k", "v", "g", "beta")),
                                 initial_state=x["initial_state"], method=method, chunk_size=16)
        o2, _ = gated_delta_rule(*(sl(n, 23, 60) for n in ("q", "k", "v", "g", "beta")),
                                 method=method, chunk_size=16)
        assert rel(o, jnp.concatenate([o1, o2], axis=1)) < 1e-5, method


@pytest.mark.parametrize("method", ["chunk", "assoc_scan"])
def test_long_sequence_finite_and_memory_linear(method):
    """T = 16384 stays finite; compiled temporary memory grows linearly in T."""
    def fwd(q, k, v, g, beta):
        return gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True, method=method)[0]

    def temp_bytes(t):
        spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
        args = (spec(1, t, 2, 32), spec(1, t, 2, 32), spec(1, t, 2, 32), spec(1, t, 2), spec(1, t, 2))
        mem = jax.jit(fwd).lower(*args).compile().memory_analysis()
        return mem.temp_size_in_bytes + mem.output_size_in_bytes

    sizes = {t: temp_bytes(t) for t in (4096, 8192, 16384)}
    # Doubling T at most doubles memory (plus slack); quadratic growth would give 4x. The lower
    # bound is loose because XLA:GPU's buffer assignment has fixed parts (seen on an H200).
    assert 1.2 < sizes[8192] / sizes[4096] < 2.4, sizes
    assert 1.2 < sizes[16384] / sizes[8192] < 2.4, sizes

    x = make_inputs(9, b=1, t=16384, hk=2, hv=2, dk=32, dv=32, g_range=(-5.0, 0.0),
                    initial_state=False)
    o = jax.jit(fwd)(x["q"], x["k"], x["v"], x["g"], x["beta"])
    assert bool(jnp.all(jnp.isfinite(o)))
    # The tail of a long sequence still matches the reference (float64 over the last 64 steps,
    # started from the state the recurrent form reaches there).
    _, s_mid = gated_delta_rule(*(x[n][:, :16320] for n in ("q", "k", "v", "g", "beta")),
                                use_qk_l2norm=True, output_final_state=True, method="recurrent")
    ref_tail, _ = reference_forward(*(x[n][:, 16320:] for n in ("q", "k", "v", "g", "beta")),
                                    initial_state=np.asarray(s_mid), use_qk_l2norm=True)
    assert rel(o[:, 16320:], ref_tail) < 1e-4


def test_extreme_gates_stay_finite_with_gradients():
    x = make_inputs(10, t=64, g_range=(-1e4, 0.0))
    x["g"][:, ::3] = 0.0
    for method in FORMS:
        grads = jax.grad(lambda q, k, v, g, beta: jnp.sum(gated_delta_rule(
            q, k, v, g, beta, use_qk_l2norm=True, method=method, chunk_size=CHUNK)[0]),
            argnums=range(5))(x["q"], x["k"], x["v"], x["g"], x["beta"])
        chex.assert_tree_all_finite(grads)


@pytest.mark.parametrize("bad, match", [
    (dict(k=np.zeros((2, 5, 2, 7), np.float32)), "q and k"),
    (dict(v=np.zeros((2, 5, 3, 8), np.float32)), "multiple of key heads"),
    (dict(g=np.zeros((2, 5, 3), np.float32)), "g must be"),
    (dict(beta=np.zeros((2, 4, 2), np.float32)), "beta must be"),
    (dict(initial_state=np.zeros((2, 2, 8, 7), np.float32)), "initial_state"),
    (dict(segment_ids=np.zeros((2, 6), np.int32)), "segment_ids"),
    (dict(method="power_series"), "method"),
    (dict(method="chunk", chunk_size=48), "chunk_size must be a power of two"),
    (dict(method="pallas", chunk_size=0), "chunk_size must be positive"),
])
def test_bad_inputs_are_named(bad, match):
    args = dict(q=np.zeros((2, 5, 2, 8), np.float32), k=np.zeros((2, 5, 2, 8), np.float32),
                v=np.zeros((2, 5, 2, 8), np.float32), g=np.zeros((2, 5, 2), np.float32),
                beta=np.zeros((2, 5, 2), np.float32))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        gated_delta_rule(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("g"),
                         args.pop("beta"), **args)


@pytest.mark.parametrize("factors_in_scan", [True, False])
def test_chunk_factor_placements_match_float64(factors_in_scan, monkeypatch):
    """gdn_chunk computes chunk factors inside its scan on CPU and before it on accelerators;
    both placements are checked here, on CPU, forward and backward."""
    import importlib

    from hybrid_jax.gdn import gdn_chunk

    gdr = importlib.import_module("hybrid_jax.gdn.rule")  # the module, not the function

    monkeypatch.setattr(gdr, "gdn_chunk", functools.partial(gdn_chunk, factors_in_scan=factors_in_scan))
    x = make_inputs(12, t=75, hk=1, hv=3, n_segments=3, g_range=(-8.0, 0.0))
    o, s = run("chunk", x)
    ref_o, ref_s = reference_forward(x["q"], x["k"], x["v"], x["g"], x["beta"],
                                     initial_state=x["initial_state"], segment_ids=x["segment_ids"],
                                     use_qk_l2norm=True)
    assert rel(o, ref_o) < 1e-5 and rel(s, ref_s) < 1e-5
    do = np.random.default_rng(13).standard_normal(x["v"].shape)
    grads = jax.grad(lambda v, g, beta: jnp.sum(run("chunk", {**x, "v": v, "g": g, "beta": beta})[0] * do),
                     argnums=(0, 1, 2))(x["v"], x["g"], x["beta"])
    ref = reference_grads(x["q"], x["k"], x["v"], x["g"], x["beta"], do, np.zeros_like(ref_s),
                          initial_state=x["initial_state"], segment_ids=x["segment_ids"],
                          use_qk_l2norm=True)
    for got, want in zip(grads, ref[2:5]):
        assert rel(got, want) < 1e-4


def test_auto_is_the_kernel_on_accelerators_and_chunk_on_cpu(monkeypatch):
    """"auto" (the model's default) resolves by backend, and the config accepts what the op
    does."""
    from hybrid_jax.config import GDN_METHODS, ModelConfig

    assert GDN_METHODS == METHODS and ModelConfig().gdn_method == "auto"
    assert resolve_method("auto") == "chunk"  # this CPU machine
    for backend, want in (("gpu", "pallas"), ("tpu", "pallas"), ("cpu", "chunk")):
        monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
        assert resolve_method("auto") == want
    assert resolve_method("recurrent") == "recurrent"


@pytest.mark.parametrize("c", [16, 64])
def test_unit_lower_inverse_vjp_matches_autodiff_of_substitution(c):
    """The solve's VJP (dA = -T^T dT T^T on the strictly lower part) against jax's autodiff
    through the forward substitution it replaces, on unit keys with beta up to 2. Only the
    strictly lower part is A's (the callers mask the rest before the solve); autodiff of the
    substitution also reports the zero entries it multiplies, which the VJP leaves at 0."""
    from hybrid_jax.gdn.chunk_factors import substitution_inverse, unit_lower_inverse

    rng = np.random.default_rng(9)
    k = rng.standard_normal((3, c, 8))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    a = jnp.asarray(np.tril(rng.uniform(0, 2, (3, c, 1)) * (k @ np.swapaxes(k, 1, 2)), -1),
                    jnp.float32)
    d_inv = jnp.asarray(rng.standard_normal((3, c, c)), jnp.float32)
    got_inv, vjp = jax.vjp(unit_lower_inverse, a)
    want_inv, want_vjp = jax.vjp(substitution_inverse, a)
    np.testing.assert_array_equal(np.asarray(got_inv), np.asarray(want_inv))
    (got,), (want,) = vjp(d_inv), want_vjp(d_inv)
    want = np.tril(np.asarray(want), -1)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4,
                               atol=1e-5 * float(np.abs(want).max()))
    assert not np.any(np.triu(np.asarray(got)))  # nothing on or above the diagonal
