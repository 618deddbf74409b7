"""Float64 NumPy reference for the gated delta rule: forward and hand-written backward.

Written step by step from the definition, independent of hybrid_jax:
    S = exp(g_t) S  (or 0 at a segment start);  S = S + k_t (beta_t (v_t - S^T k_t))^T;
    o_t = scale * S^T q_t
"""

from __future__ import annotations

import numpy as np

EPS = 1e-6


def _l2norm(x):
    n = np.sqrt((x * x).sum(-1, keepdims=True) + EPS)
    return x / n, n


def _l2norm_backward(x, n, dy):
    # y = x / n, n = sqrt(|x|^2 + eps)  =>  dx = dy / n - x (x . dy) / n^3
    return dy / n - x * (x * dy).sum(-1, keepdims=True) / n**3


def _prepare(q, k, v, segment_ids, use_qk_l2norm):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    hk, hv = q.shape[2], v.shape[2]
    qn = kn = None
    if use_qk_l2norm:
        q, qn = _l2norm(q)
        k, kn = _l2norm(k)
    rep = hv // hk
    q_rep, k_rep = np.repeat(q, rep, axis=2), np.repeat(k, rep, axis=2)
    b, t = q.shape[:2]
    reset = np.zeros((b, t), bool)
    if segment_ids is not None:
        seg = np.asarray(segment_ids)
        reset[:, 1:] = seg[:, 1:] != seg[:, :-1]
    return q, k, qn, kn, q_rep, k_rep, v, reset


def reference_forward(q, k, v, g, beta, *, scale=None, initial_state=None, segment_ids=None,
                      use_qk_l2norm=False):
    """Returns (o [B, T, Hv, Dv], final state [B, Hv, Dk, Dv]) in float64."""
    _, _, _, _, qr, kr, v, reset = _prepare(q, k, v, segment_ids, use_qk_l2norm)
    g, beta = np.asarray(g, np.float64), np.asarray(beta, np.float64)
    b, t, h, dk = qr.shape
    dv = v.shape[-1]
    scale = dk ** -0.5 if scale is None else scale
    s = np.zeros((b, h, dk, dv)) if initial_state is None else np.array(initial_state, np.float64)
    o = np.zeros((b, t, h, dv))
    for i in range(t):
        s = s * np.exp(g[:, i])[..., None, None]
        s[reset[:, i]] = 0.0
        pred = np.einsum("bhkv,bhk->bhv", s, kr[:, i])
        delta = beta[:, i, :, None] * (v[:, i] - pred)
        s = s + kr[:, i, :, :, None] * delta[:, :, None, :]
        o[:, i] = scale * np.einsum("bhkv,bhk->bhv", s, qr[:, i])
    return o, s


def reference_grads(q, k, v, g, beta, do, dfinal, *, scale=None, initial_state=None,
                    segment_ids=None, use_qk_l2norm=False):
    """Gradients of sum(o * do) + sum(final * dfinal) with respect to
    (q, k, v, g, beta, initial_state), by reverse-mode through the recurrence in float64."""
    q64, k64, qn, kn, qr, kr, v, reset = _prepare(q, k, v, segment_ids, use_qk_l2norm)
    g, beta = np.asarray(g, np.float64), np.asarray(beta, np.float64)
    do, dfinal = np.asarray(do, np.float64), np.asarray(dfinal, np.float64)
    b, t, h, dk = qr.shape
    dv = v.shape[-1]
    scale = dk ** -0.5 if scale is None else scale
    s0 = np.zeros((b, h, dk, dv)) if initial_state is None else np.array(initial_state, np.float64)

    # Forward, keeping the state before each step's decay.
    states = [s0]
    s = s0
    for i in range(t):
        sd = s * np.exp(g[:, i])[..., None, None]
        sd[reset[:, i]] = 0.0
        pred = np.einsum("bhkv,bhk->bhv", sd, kr[:, i])
        s = sd + kr[:, i, :, :, None] * (beta[:, i, :, None] * (v[:, i] - pred))[:, :, None, :]
        states.append(s)

    dq, dk_, dv_ = np.zeros_like(qr), np.zeros_like(kr), np.zeros_like(v)
    dg, dbeta = np.zeros_like(g), np.zeros_like(beta)
    ds = dfinal.copy()
    for i in reversed(range(t)):
        s_prev, s_cur = states[i], states[i + 1]
        a = np.exp(g[:, i])
        sd = s_prev * a[..., None, None]
        sd[reset[:, i]] = 0.0
        kt, qt, vt, bt = kr[:, i], qr[:, i], v[:, i], beta[:, i]
        # o = scale * S^T q
        ds = ds + scale * qt[..., :, None] * do[:, i][..., None, :]
        dq[:, i] = scale * np.einsum("bhkv,bhv->bhk", s_cur, do[:, i])
        # S = sd + k d^T, d = beta (v - sd^T k)
        pred = np.einsum("bhkv,bhk->bhv", sd, kt)
        d = bt[..., None] * (vt - pred)
        dd = np.einsum("bhkv,bhk->bhv", ds, kt)
        dk_[:, i] += np.einsum("bhkv,bhv->bhk", ds, d)
        dbeta[:, i] = (dd * (vt - pred)).sum(-1)
        dv_[:, i] = bt[..., None] * dd
        dpred = -bt[..., None] * dd
        dsd = ds + kt[..., :, None] * dpred[..., None, :]
        dk_[:, i] += np.einsum("bhkv,bhv->bhk", sd, dpred)
        # sd = exp(g) S_prev, or 0 at a reset
        keep = ~reset[:, i]
        dg[:, i] = np.where(keep[:, None], (dsd * s_prev).sum((-1, -2)) * a, 0.0)
        ds = np.where(keep[:, None, None, None], dsd * a[..., None, None], 0.0)

    # Undo the head repetition and the normalisation.
    hk = q64.shape[2]
    dq = dq.reshape(b, t, hk, -1, dk).sum(3)
    dk_ = dk_.reshape(b, t, hk, -1, dk).sum(3)
    if use_qk_l2norm:
        q_in, k_in = (np.asarray(x, np.float64) for x in (q, k))
        dq = _l2norm_backward(q_in, qn, dq)
        dk_ = _l2norm_backward(k_in, kn, dk_)
    return dq, dk_, dv_, dg, dbeta, ds
