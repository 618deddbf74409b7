"""Mixture-of-experts pieces of Qwen3-Next / Qwen3.5-MoE as pure functions: top-k routing, the
router's load-balancing statistics and loss, a grouped matmul, and the experts' SwiGLU MLP,
dropless (every token reaches all k of its experts; no capacity, nothing dropped).

The experts' MLP sorts the N*k (token, expert) assignments by expert and multiplies each
expert's rows by that expert's weights only: a grouped matmul. On TPU ("megablox") jax's Pallas
grouped-matmul kernels run it, forward and backward: XLA:TPU lowers ``jax.lax.ragged_dot``
("ragged_dot") natively, but computes its gradient for the weights as G products over all rows;
XLA:CPU decomposes ragged_dot into a masked product over every group ([G, M, K]). Elsewhere ("tiled") the rows of every group are padded to a multiple of a tile, so
that each tile belongs to one group, and a loop takes tile after tile: ``grouped_matmul``
multiplies each by its group's matrix; ``expert_mlp`` runs each through its expert's whole MLP,
from gathering the tile's tokens to adding the weighted outputs into them, so the tile stays in
cache and no [N*k, .] intermediate is written. Both have VJPs of the same loop form.
``dense_expert_mlp`` is the slow, obviously-right baseline: every token through every expert,
combined with zero weights for the experts it did not pick.

Semantics follow transformers' Qwen3NextTopKRouter, Qwen3NextExperts and
load_balancing_loss_func. Our expert weights are torch's transposed on their last two axes:
``gate_up`` [E, D, 2I] (gate columns first, then up) is ``gate_up_proj`` [E, 2I, D]; ``down``
[E, I, D] is ``down_proj`` [E, D, I].
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

METHODS = ("auto", "tiled", "ragged_dot", "megablox")
MEGABLOX_TILE = 128  # megablox's row, contraction and column tiles
DEFAULT_TILE = 128


# --------------------------------------------------------------------------- routing
class Routing(NamedTuple):
    """Each token's experts and combine weights."""

    weights: jax.Array  # [N, k] combine weights, float32
    experts: jax.Array  # [N, k] int32 expert ids
    probs: jax.Array | None  # [N, E] float32 softmax of the router logits (None: not kept)


def route_top_k(logits: jax.Array, k: int, *, normalize: bool) -> Routing:
    """Top-k routing of router ``logits`` [N, E] (any float dtype).

    Softmax in float32, the k largest probabilities (``jax.lax.top_k``: ties go to the lower
    expert index; torch.topk's order among ties is unspecified), renormalised to sum to 1 if ``normalize``
    (``norm_topk_prob``; Qwen3.5-MoE always)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(weights, experts.astype(jnp.int32), probs)


class RouterStats(NamedTuple):
    """What the load-balancing loss needs of one or more MoE layers (summed over layers)."""

    counts: jax.Array  # [E] float32: top-k assignments per expert
    prob_sums: jax.Array  # [E] float32: router probabilities summed over tokens
    tokens: jax.Array  # [] float32: tokens counted


def router_stats(routing: Routing, mask: jax.Array | None = None) -> RouterStats:
    """One layer's statistics; ``routing.probs`` [N, E], ``routing.experts`` [N, k]; ``mask``
    [N] (optional, 1 for tokens to count, 0 for padding, as transformers' attention mask)."""
    n, e = routing.probs.shape
    m = jnp.ones((n,), jnp.float32) if mask is None else mask.astype(jnp.float32)
    k = routing.experts.shape[1]
    counts = jnp.zeros((e,), jnp.float32).at[routing.experts.reshape(-1)].add(jnp.repeat(m, k))
    return RouterStats(counts, jnp.sum(routing.probs * m[:, None], axis=0), jnp.sum(m))


def zero_stats(num_experts: int) -> RouterStats:
    """Router statistics of no tokens (a sum's start)."""
    zeros = jnp.zeros((num_experts,), jnp.float32)
    return RouterStats(counts=zeros, prob_sums=zeros, tokens=jnp.zeros((), jnp.float32))


def add_stats(a: RouterStats, b: RouterStats) -> RouterStats:
    """Two layers' (or two sums') statistics summed."""
    return RouterStats(*(x + y for x, y in zip(a, b)))


def load_balancing_loss(stats: RouterStats) -> jax.Array:
    """Switch Transformer's auxiliary loss as transformers computes it over all layers at once:
    ``E * sum_e (counts_e / tokens) * (prob_sums_e / tokens)`` (unscaled by the aux-loss
    coefficient; a float32 scalar)."""
    e = stats.counts.shape[0]
    return e * jnp.sum((stats.counts / stats.tokens) * (stats.prob_sums / stats.tokens))


# --------------------------------------------------------------------------- tiles
class _Tiles(NamedTuple):
    """Rows sorted by group, each group padded to a multiple of ``tile`` rows, so that each
    tile of the P = T * tile padded rows belongs to one group (T: a static bound on the tiles
    the groups can need). A loop over the used tiles gathers each tile's rows from the
    unpadded array and scatters its results back, so the padded rows are never stored (only
    the experts' VJP saves its [P, 2I] gate/up products)."""

    rows: jax.Array  # [P] int32: the row each padded row reads and writes; out of range for padding
    groups: jax.Array  # [T] int32: each tile's group (the last group after ``used``)
    used: jax.Array  # [] int32: tiles holding rows; the rest are all padding


def _tile_rows(tile: int, rows: int, groups: int) -> int:
    """Rows per tile: ``tile``, or fewer (a power of two, at least 8) when the groups average
    fewer rows, as in decoding, where a full tile per group would be mostly padding."""
    mean = -(-rows // groups)
    return min(tile, max(8, 1 << (mean - 1).bit_length()))


def _tiles(group_sizes: jax.Array, rows: int, tile: int) -> _Tiles:
    """The tiles of ``rows`` sorted rows in groups of ``group_sizes`` [G]; ``_Tiles.rows``
    indexes the sorted rows (``rows`` for padding)."""
    g = group_sizes.shape[0]
    num_tiles = max(1, min((rows + g * (tile - 1)) // tile, rows))  # >= sum_g ceil(s_g / tile)
    sizes = group_sizes.astype(jnp.int32)
    tiles_per_group = (sizes + tile - 1) // tile
    tile_ends = jnp.cumsum(tiles_per_group)
    starts, padded_starts = jnp.cumsum(sizes) - sizes, (tile_ends - tiles_per_group) * tile
    groups = jnp.searchsorted(tile_ends, jnp.arange(num_tiles), side="right")
    groups = jnp.minimum(groups, g - 1).astype(jnp.int32)
    # Padded row p: its tile's group, and its offset within that group's padded rows.
    p = jnp.arange(num_tiles * tile)
    pg = jnp.repeat(groups, tile, total_repeat_length=num_tiles * tile)
    offset = p - padded_starts[pg]
    valid = (offset < sizes[pg]) & (p < tile_ends[-1] * tile)
    src = jnp.where(valid, starts[pg] + offset, rows).astype(jnp.int32)
    return _Tiles(src, groups, tile_ends[-1])


def _tile_dot(a: jax.Array, w: jax.Array, contract: int) -> jax.Array:
    """a [rows, K] times the matrix w, contracting w's axis ``contract`` (0: a @ w; 1: a @ w^T),
    float32."""
    return jax.lax.dot_general(a, w, (((1,), (contract,)), ((), ())),
                               preferred_element_type=jnp.float32)


def _tile(tiles: _Tiles, tile: int, t: jax.Array, x: jax.Array):
    """Tile t's rows [tile] (out of range for padding), x's rows there (0 for padding) and the
    tile's group."""
    rows = jax.lax.dynamic_slice_in_dim(tiles.rows, t * tile, tile)
    return rows, x.at[rows].get(mode="fill", fill_value=0), tiles.groups[t]


# --------------------------------------------------------------------------- grouped matmul
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tiled_matmul(lhs: jax.Array, rhs: jax.Array, tiles: _Tiles, tile: int) -> jax.Array:
    """lhs [M, K] @ rhs[group] [G, K, N] -> [M, N] in lhs's dtype, tile by tile; rows in no
    tile stay 0."""
    def body(t, out):
        rows, a, g = _tile(tiles, tile, t, lhs)
        return out.at[rows].set(_tile_dot(a, rhs[g], 0).astype(out.dtype), mode="drop")

    out = jnp.zeros((lhs.shape[0], rhs.shape[2]), lhs.dtype)
    return jax.lax.fori_loop(0, tiles.used, body, out)


def _tiled_fwd(lhs, rhs, tiles, tile):
    return _tiled_matmul(lhs, rhs, tiles, tile), (lhs, rhs, tiles)


def _tiled_bwd(tile, res, d_out):
    """The same loop: d_lhs rows = d_out rows @ w^T, and d_rhs[g] += lhs rows^T @ d_out rows,
    accumulated in float32 in place (autodiff of the loop would add a whole [G, K, N]
    cotangent per tile)."""
    lhs, rhs, tiles = res

    def body(t, carry):
        d_lhs, d_rhs = carry
        rows, a, g = _tile(tiles, tile, t, lhs)
        d = d_out.at[rows].get(mode="fill", fill_value=0)
        d_a = _tile_dot(d, rhs[g], 1).astype(d_lhs.dtype)
        return d_lhs.at[rows].set(d_a, mode="drop"), d_rhs.at[g].add(_tile_dot(a.T, d, 0))

    init = (jnp.zeros_like(lhs), jnp.zeros(rhs.shape, jnp.float32))
    d_lhs, d_rhs = jax.lax.fori_loop(0, tiles.used, body, init)
    return d_lhs, d_rhs.astype(rhs.dtype), None


_tiled_matmul.defvjp(_tiled_fwd, _tiled_bwd)


def _ragged(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    out = jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32),
                             preferred_element_type=jnp.float32)
    return out.astype(lhs.dtype)


def _megablox(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array,
              interpret: bool = False) -> jax.Array:
    """jax's Pallas TPU grouped matmul (megablox ``gmm``, whose VJP takes the weights'
    gradient group by group with ``tgmm``; XLA:TPU's ragged_dot computes that gradient as a
    product over every group for every row). Rows are padded to whole tiles; widths that are
    not multiples of the tile fall back to ragged_dot. [M, K] x [G, K, N] -> [M, N]."""
    m, k = lhs.shape
    t = MEGABLOX_TILE
    if k % t or rhs.shape[2] % t:
        return _ragged(lhs, rhs, group_sizes)
    sizes = group_sizes.astype(jnp.int32)
    # The kernels leave rows past the groups unwritten, in the product and in lhs's gradient:
    # masking both sides makes them zero (and their cotangents too).
    rows = (jnp.arange(m + (-m % t)) < jnp.sum(sizes))[:, None]
    padded = jnp.where(rows, jnp.pad(lhs, ((0, -m % t), (0, 0))), 0)
    out = megablox.gmm(padded, rhs, sizes, jnp.float32, (t, t, t), interpret=interpret)
    return jnp.where(rows, out, 0)[:m].astype(lhs.dtype)


def _tiled(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, tile: int) -> jax.Array:
    tile = _tile_rows(tile, lhs.shape[0], rhs.shape[0])
    return _tiled_matmul(lhs, rhs, _tiles(group_sizes, lhs.shape[0], tile), tile)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method {method!r}: expected one of {METHODS}")


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                   method: str = "auto", tile: int = DEFAULT_TILE,
                   interpret: bool = False) -> jax.Array:
    """Row groups of ``lhs`` times their own matrices: [M, K] x [G, K, N] -> [M, N].

    Args:
      lhs: [M, K] rows sorted by group: group g's ``group_sizes[g]`` rows follow group g-1's.
      rhs: [G, K, N] one matrix per group.
      group_sizes: [G] int, summing to at most M; rows past the sum are padding and give 0.
      method: "ragged_dot" (``jax.lax.ragged_dot``, native on TPU, but its gradient for rhs
        costs G products over all M rows there; XLA:CPU computes it as a masked product over
        all G groups, so not for CPU), "megablox" (jax's Pallas TPU kernels, forward and VJP;
        ragged_dot where K or N is not a multiple of 128), "tiled" (groups padded to multiples
        of ``tile`` rows, a loop over tiles; for CPU), or "auto": "megablox" on TPU, "tiled"
        elsewhere, chosen when the program is lowered (``jax.lax.platform_dependent``: an AOT
        compile for a TPU takes the TPU form).
      tile: the most rows per tile of "tiled" (fewer, down to 8, when the groups average
        fewer rows). The padding adds up to ``tile - 1`` rows of work per group.
      interpret: run "megablox" in Pallas interpret mode (tests off TPU).
    Returns:
      [M, N] in lhs's dtype, accumulated in float32. Differentiable in lhs and rhs.
    """
    _check_method(method)
    tiled = functools.partial(_tiled, tile=tile)
    if method == "ragged_dot":
        return _ragged(lhs, rhs, group_sizes)
    if method == "megablox":
        return _megablox(lhs, rhs, group_sizes, interpret)
    if method == "tiled":
        return tiled(lhs, rhs, group_sizes)
    return jax.lax.platform_dependent(lhs, rhs, group_sizes, tpu=_megablox, default=tiled)


# --------------------------------------------------------------------------- experts' MLP
def _swiglu(h: jax.Array) -> jax.Array:
    """[., 2I] gate and up halves -> silu(gate) * up [., I]."""
    gate, up = jnp.split(h, 2, axis=-1)
    return jax.nn.silu(gate) * up


def _sort_assignments(experts: jax.Array, num_experts: int):
    """The N*k assignments sorted by expert (stable): (order [N*k], group sizes [E]).
    ``order[i]`` is the flat (token * k + slot) index of the i-th sorted assignment."""
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    return order, jnp.bincount(flat, length=num_experts).astype(jnp.int32)


def _experts_ragged(x, routing, gate_up, down, matmul=_ragged):
    """Two grouped products (``matmul``) over the sorted assignments, un-sorted, weighted,
    summed."""
    n, k = routing.experts.shape
    order, sizes = _sort_assignments(routing.experts, gate_up.shape[0])
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(n * k, dtype=order.dtype))
    h = matmul(x[order // k], gate_up, sizes)  # [N*k, 2I] sorted by expert
    y = matmul(_swiglu(h), down, sizes)[inverse]  # [N*k, D] in (token, slot) order
    # Ids past the last expert (another device's, ``moe_parallel``) are rows past the groups:
    # zero, not whatever ragged_dot leaves there.
    valid = (routing.experts < gate_up.shape[0]).reshape(-1, 1)
    y = jnp.where(valid, y, 0).reshape(n, k, -1) * routing.weights.astype(x.dtype)[..., None]
    return jnp.sum(y.astype(jnp.float32), axis=1).astype(x.dtype)


def _fused_loop(x, w_p, gate_up, down, tiles: _Tiles, tile: int, keep_h: bool):
    """Tile by tile: token rows -> gate/up product -> SwiGLU -> down product -> times the
    weights, added into the tokens in float32. Returns (out [N, D] float32, the gate/up
    products [P, 2I] for the VJP if ``keep_h``, else None)."""
    def body(t, carry):
        out, h_p = carry
        rows, a, g = _tile(tiles, tile, t, x)
        w = jax.lax.dynamic_slice_in_dim(w_p, t * tile, tile)[:, None]
        h = _tile_dot(a, gate_up[g], 0).astype(x.dtype)
        y = _tile_dot(_swiglu(h), down[g], 0).astype(x.dtype) * w
        out = out.at[rows].add(y.astype(jnp.float32), mode="drop")
        if keep_h:
            h_p = jax.lax.dynamic_update_slice_in_dim(h_p, h, t * tile, 0)
        return out, h_p

    h_p = jnp.zeros((w_p.shape[0], gate_up.shape[2]), x.dtype) if keep_h else None
    return jax.lax.fori_loop(0, tiles.used, body, (jnp.zeros(x.shape, jnp.float32), h_p))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _fused_experts(x: jax.Array, w_p: jax.Array, gate_up: jax.Array, down: jax.Array,
                   tiles: _Tiles, tile: int) -> jax.Array:
    """Sum over padded rows p of w_p[p] * MLP of p's expert (x[tiles.rows[p]]), into row
    tiles.rows[p]: x [N, D], w_p [P] -> [N, D] in x's dtype. One loop over the tiles: a
    tile's rows stay in cache from gather to scatter, where two grouped products would write
    and read back [N*k, 2I] and [N*k, D] arrays."""
    return _fused_loop(x, w_p, gate_up, down, tiles, tile, keep_h=False)[0].astype(x.dtype)


def _fused_fwd(x, w_p, gate_up, down, tiles, tile):
    out, h_p = _fused_loop(x, w_p, gate_up, down, tiles, tile, keep_h=True)
    return out.astype(x.dtype), (x, w_p, gate_up, down, tiles, h_p)


def _fused_bwd(tile, res, d_out):
    """The same loop from the saved gate/up products: per tile, u = d_out rows @ down^T gives
    the weights' cotangent sum(swiglu(h) * u) and the SwiGLU's (w * u); the experts'
    cotangents accumulate in float32 in place, x's by scatter-add into its tokens."""
    x, w_p, gate_up, down, tiles, h_p = res
    f32 = jnp.float32

    def body(t, carry):
        d_x, d_w_p, d_gate_up, d_down = carry
        rows, a, g = _tile(tiles, tile, t, x)
        w = jax.lax.dynamic_slice_in_dim(w_p, t * tile, tile)[:, None]
        s, swiglu_vjp = jax.vjp(_swiglu, jax.lax.dynamic_slice_in_dim(h_p, t * tile, tile))
        do = d_out.at[rows].get(mode="fill", fill_value=0)  # [tile, D]
        u = _tile_dot(do, down[g], 1)  # [tile, I] float32
        d_w = jnp.sum(s.astype(f32) * u, axis=-1)
        (d_h,) = swiglu_vjp((u * w).astype(s.dtype))
        d_x = d_x.at[rows].add(_tile_dot(d_h, gate_up[g], 1), mode="drop")
        return (d_x, jax.lax.dynamic_update_slice_in_dim(d_w_p, d_w, t * tile, 0),
                d_gate_up.at[g].add(_tile_dot(a.T, d_h, 0)),
                d_down.at[g].add(_tile_dot(s.T, do * w, 0)))

    init = (jnp.zeros(x.shape, f32), jnp.zeros(w_p.shape, f32), jnp.zeros(gate_up.shape, f32),
            jnp.zeros(down.shape, f32))
    d_x, d_w_p, d_gate_up, d_down = jax.lax.fori_loop(0, tiles.used, body, init)
    return (d_x.astype(x.dtype), d_w_p.astype(w_p.dtype), d_gate_up.astype(gate_up.dtype),
            d_down.astype(down.dtype), None)


_fused_experts.defvjp(_fused_fwd, _fused_bwd)


def _experts_tiled(x, routing, gate_up, down, tile):
    """The sorted assignments in tiles, each tile through its expert's whole MLP; a padded
    row reads no token (x's rows out of range) and has weight 0."""
    n, k = routing.experts.shape
    order, sizes = _sort_assignments(routing.experts, gate_up.shape[0])
    tile = _tile_rows(tile, n * k, gate_up.shape[0])
    tiles = _tiles(sizes, n * k, tile)
    slots = order.astype(jnp.int32).at[tiles.rows].get(mode="fill", fill_value=n * k)  # [P]
    w_p = routing.weights.reshape(-1).at[slots].get(mode="fill", fill_value=0).astype(x.dtype)
    tiles = tiles._replace(rows=slots // k)  # padding: (n * k) // k = n, out of range
    return _fused_experts(x, w_p, gate_up, down, tiles, tile)


def expert_mlp(x: jax.Array, routing: Routing, gate_up: jax.Array, down: jax.Array, *,
               method: str = "auto", tile: int = DEFAULT_TILE) -> jax.Array:
    """The routed experts' SwiGLU MLP, dropless, each token through its k experts only.

    Args:
      x: [N, D] tokens.
      routing: ``route_top_k``'s result for x ([N, k] weights and experts).
      gate_up: [E, D, 2I] each expert's gate (first I columns) and up projections.
      down: [E, I, D] each expert's down projection.
      method: "ragged_dot" or "megablox" (two ``grouped_matmul`` products of that method over
        the sorted assignments), "tiled" (one loop over tiles of sorted, padded assignments,
        each tile through its expert's whole MLP), or "auto": megablox on TPU, tiled
        elsewhere, chosen when the program is lowered.
      tile: the most rows per tile of "tiled" (``grouped_matmul``'s).
    Returns:
      [N, D] in x's dtype: sum over slots j of weights[:, j] (cast to x's dtype, as
      transformers does) * down(silu(gate) * up) of expert experts[:, j], summed in float32.
    """
    _check_method(method)
    tiled = functools.partial(_experts_tiled, tile=tile)
    megablox_mlp = functools.partial(_experts_ragged, matmul=_megablox)
    if method == "ragged_dot":
        return _experts_ragged(x, routing, gate_up, down)
    if method == "megablox":
        return megablox_mlp(x, routing, gate_up, down)
    if method == "tiled":
        return tiled(x, routing, gate_up, down)
    return jax.lax.platform_dependent(x, routing, gate_up, down, tpu=megablox_mlp,
                                      default=tiled)


def dense_expert_mlp(x: jax.Array, routing: Routing, gate_up: jax.Array,
                     down: jax.Array) -> jax.Array:
    """``expert_mlp``'s result the dense way: every token through every expert ([E, N, 2I]
    intermediates), combined with a one-hot weight matrix [N, E] (0 for experts a token did not
    pick). E / k times the FLOPs; the baseline to compare with."""
    e = gate_up.shape[0]
    h = jnp.einsum("nd,edf->enf", x, gate_up, preferred_element_type=jnp.float32)
    y = jnp.einsum("enf,efd->end", _swiglu(h.astype(x.dtype)), down,
                   preferred_element_type=jnp.float32).astype(x.dtype)  # [E, N, D]
    one_hot = jax.nn.one_hot(routing.experts, e, dtype=jnp.float32)  # [N, k, E]
    combine = jnp.einsum("nk,nke->ne", routing.weights, one_hot).astype(x.dtype)
    return jnp.einsum("ne,end->nd", combine, y, preferred_element_type=jnp.float32).astype(x.dtype)
