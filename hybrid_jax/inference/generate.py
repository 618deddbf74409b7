"""Text generation: a jitted prefill (whole or in pieces), then a decode loop inside
``lax.while_loop``: one compile per shape, no Python loop per token.

    tokens = generate(model, input_ids, max_new_tokens=32, attention_mask=mask)

Batches are left-padded, as transformers expects: ``attention_mask`` is 0 on the padding at the
start of a row. Each row stops at its first EOS and is filled with the pad id after it; the loop
ends when every row has stopped or ``max_new_tokens`` are out.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback
from jax.sharding import Mesh

from hybrid_jax.inference.errors import InputError, InputTypeError
from hybrid_jax.inference.sampling import SamplingConfig, is_int, sample_tokens
from hybrid_jax.model.cache import DecodeCache, init_cache
from hybrid_jax.model.hybrid_lm import HybridLM
from hybrid_jax.sharding import activation_sharding

# By default a prompt is prefilled in as few equal pieces as keep each attention layer's float32
# logits ([B, H, piece, max_length]) within this many bytes.
PREFILL_LOGITS_BYTES = 1 << 30
MIN_PREFILL_PIECE = 64  # one GDN chunk

# on_tokens(step, tokens [B] int32, finished [B] bool): finished rows were already done before
# this step, and their token is the pad id.
TokenCallback = Callable[[int, np.ndarray, np.ndarray], None]


@partial(jax.jit, static_argnums=0, static_argnames="mesh", donate_argnums=3)
def prefill(graphdef: nnx.GraphDef, params: nnx.State, input_ids: jax.Array,
            cache: DecodeCache, attention_mask: jax.Array, *, mesh: Mesh | None = None,
            block_params: tuple[nnx.State, ...] | None = None) -> tuple[jax.Array, DecodeCache]:
    """One prefill piece, jitted, the cache donated (updated in place).

    input_ids, attention_mask: [B, T]. Returns (last-position logits [B, V] float32, cache).
    With ``mesh`` (the cache's), activations follow the mesh's sharding rules and the GDN
    rule runs per shard (``sharding.activation_sharding``): the Pallas kernels cannot be
    partitioned by XLA. ``block_params``: the stack's per-block parameters, e.g.
    ``DecoderStack.block_views()``; default: sliced out of ``params`` in the program.
    """
    with activation_sharding(mesh):
        model = nnx.merge(graphdef, params)
        logits, cache = model.extend(input_ids, cache, attention_mask, last_only=True,
                                     block_params=block_params)
    return logits[:, 0], cache


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling", "eos_ids", "pad_id",
                                   "on_tokens", "slice_weights_once"), donate_argnames=("cache",))
def decode(graphdef: nnx.GraphDef, params: nnx.State, cache: DecodeCache, logits: jax.Array,
           key: jax.Array, *, max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
           eos_ids: tuple[int, ...] = (), pad_id: int = 0,
           on_tokens: TokenCallback | None = None,
           slice_weights_once: bool = True,
           block_params: tuple[nnx.State, ...] | None = None) -> tuple[jax.Array, DecodeCache]:
    """The decode loop, jitted: sample ``max_new_tokens`` tokens per row, starting from the
    prefill's last logits [B, V], inside one ``lax.while_loop`` (the cache donated and updated in
    place).

    Token i is sampled from the logits after token i-1; N tokens take N-1 decode steps. The loop
    ends early once every row has produced one of ``eos_ids``. Keyword arguments other than
    ``block_params`` are static (hashable: ``eos_ids`` a tuple); ``generate`` checks and
    normalises them.
    ``block_params``: the stack's per-block parameters, read by every step (e.g.
    ``DecoderStack.block_views()``: on the CPU, arrays over the stacked weights' own memory).
    Without them, ``slice_weights_once`` slices the stacked [n, ...] weights once, before the
    loop (a second copy of them while decoding); False slices them in every step instead, which
    XLA:TPU fuses into the products that read them and XLA:CPU does by copying every weight
    matrix per step.
    Returns (tokens [B, max_new_tokens] int32, the cache after the loop, aliasing the donated
    one). That cache holds every token fed back: not the last token sampled, and for rows that
    had stopped, the pad ids fed after their EOS.
    """
    model = nnx.merge(graphdef, params)
    if block_params is None and slice_weights_once:
        block_params = model.stack.block_params()
    batch = logits.shape[0]
    eos = jnp.asarray(eos_ids, jnp.int32) if eos_ids else None

    def pick(i, logits, done):
        token = sample_tokens(logits, jax.random.fold_in(key, i), sampling)
        token = jnp.where(done, pad_id, token)
        if on_tokens is not None:
            io_callback(lambda *a: on_tokens(int(a[0]), np.asarray(a[1]), np.asarray(a[2])),
                        None, i, token, done, ordered=True)
        now_done = done if eos is None else done | jnp.isin(token, eos)
        return token, now_done

    def body(carry):
        i, logits, cache, tokens, done = carry
        token, done = pick(i, logits, done)
        tokens = tokens.at[:, i].set(token)
        logits, cache = model.extend(token[:, None], cache, last_only=True,
                                     block_params=block_params)
        return i + 1, logits[:, 0], cache, tokens, done

    def cond(carry):
        i, _, _, _, done = carry
        return (i < max_new_tokens - 1) & ~jnp.all(done)

    tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
    done = jnp.zeros((batch,), bool)
    i, logits, cache, tokens, done = jax.lax.while_loop(
        cond, body, (jnp.int32(0), logits, cache, tokens, done))

    # The last token needs no decode step after it. If every row stopped early, this writes a
    # pad over a pad (and skips the callback).
    def last(tokens):
        token, _ = pick(i, logits, done)
        return tokens.at[:, i].set(token)

    return jax.lax.cond(jnp.all(done), lambda t: t, last, tokens), cache


@functools.lru_cache(maxsize=16)
def _cache_allocator(cache_sharding: DecodeCache | None) -> Callable[..., DecodeCache]:
    """``init_cache`` jitted with these output shardings (one jit per sharding, reused)."""
    return jax.jit(init_cache, static_argnums=(0, 1, 2), out_shardings=cache_sharding)


def token_ids(value, name: str, vocab_size: int) -> tuple[int, ...]:
    """None, an id or a sequence of ids -> a tuple of ids, each checked against the vocabulary
    (TypeError / ValueError naming ``name``)."""
    if value is None:
        return ()
    values = (value,) if np.ndim(value) == 0 else tuple(value)
    for v in values:
        if not is_int(v):
            raise InputTypeError(f"generate: {name} must be an int or a sequence of ints, "
                                 f"got {value!r}")
        if not 0 <= v < vocab_size:
            raise InputError(f"generate: {name} {v} is outside the vocabulary "
                             f"[0, {vocab_size})")
    return tuple(int(v) for v in values)


def _check_prompt(input_ids: np.ndarray, attention_mask: np.ndarray | None,
                  vocab_size: int) -> np.ndarray:
    """The [B, T] bool mask of real tokens, after checking ids and mask; errors name the culprit."""
    if input_ids.ndim != 2:
        raise InputError(f"generate: input_ids must be [batch, length], got shape "
                         f"{input_ids.shape}")
    if not np.issubdtype(input_ids.dtype, np.integer):
        raise InputTypeError(f"generate: input_ids must hold integers, got {input_ids.dtype}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise InputError(f"generate: the prompt is empty (input_ids shape {input_ids.shape})")
    if attention_mask is None:
        valid = np.ones(input_ids.shape, bool)
    else:
        if attention_mask.shape != input_ids.shape:
            raise InputError(f"generate: attention_mask shape {attention_mask.shape} does not "
                             f"match input_ids shape {input_ids.shape}")
        if not np.all((attention_mask == 0) | (attention_mask == 1)):
            raise InputError("generate: attention_mask must hold only 0 and 1")
        valid = attention_mask.astype(bool)
        # Left padding only: once a row's real tokens start, they do not stop.
        bad = np.nonzero(np.any(valid[:, :-1] & ~valid[:, 1:], axis=1))[0]
        if bad.size:
            raise InputError(f"generate: attention_mask row {int(bad[0])} has padding after a real "
                             f"token; pad on the left (tokenizer padding_side='left')")
    empty = np.nonzero(~valid.any(axis=1))[0]
    if empty.size:
        raise InputError(f"generate: prompt row {int(empty[0])} is empty (no token with "
                         f"attention_mask 1)")
    real = input_ids[valid]
    if real.size and (real.min() < 0 or real.max() >= vocab_size):
        bad_id = int(real.min() if real.min() < 0 else real.max())
        raise InputError(f"generate: input_ids holds token id {bad_id}, outside the vocabulary "
                         f"[0, {vocab_size})")
    return valid


def generate(
    model: HybridLM,
    input_ids,
    max_new_tokens: int,
    *,
    attention_mask=None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    seed: int = 0,
    max_length: int | None = None,
    prefill_chunk_size: int | None = None,
    cache_sharding: DecodeCache | None = None,
    on_tokens: TokenCallback | None = None,
    slice_weights_once: bool | None = None,
) -> jax.Array:
    """Generate up to ``max_new_tokens`` tokens after each prompt.

    Args:
      model: a ``HybridLM``.
      input_ids: [B, T] int prompt ids, left-padded when rows differ in length.
      max_new_tokens: tokens to add per row (> 0).
      attention_mask: [B, T] of 0/1, 0 on left padding (default: all 1).
      temperature: 0 for greedy decoding, else the softmax temperature.
      top_k, top_p: sampling filters (see ``SamplingConfig``).
      eos_token_id: id or ids that end a row; None uses ``model.config.eos_token_id``, ``()``
        never stops early.
      pad_token_id: fills a row after its EOS; None uses the config's pad id, else the first
        EOS id, else 0.
      seed: PRNG seed for sampling (the same seed gives the same tokens).
      max_length: cache capacity in tokens per row (default: longest prompt + max_new_tokens
        - 1, what generation fills).
      prefill_chunk_size: prefill the prompt in equal pieces of at most this many tokens, which
        bounds prefill memory (attention logits are [B, H, piece, max_length] float32). Default:
        as few pieces as keep those logits within ``PREFILL_LOGITS_BYTES`` (1 GiB).
      cache_sharding: optional ``cache_shardings(...)`` tree to place the cache on a mesh.
      on_tokens: optional host callback ``(step, tokens [B], finished [B])`` called as each
        token is chosen, for streaming. A new callable compiles a new decode loop.
      slice_weights_once: how prefill and decode read the stack's stacked [n, ...] weights.
        None (default): on a CPU, through ``DecoderStack.block_views()``, arrays over the
        weights' own memory (no copy at all; where the weights cannot be viewed, e.g. sharded
        over several CPU devices, as True); on an accelerator, sliced in every step, where XLA
        fuses each slice into the product that reads it. True: sliced once before the decode
        loop, a second copy of them while decoding. False: sliced in every step (on a CPU,
        copies of the weights every step).
    Returns:
      [B, T + max_new_tokens] int32: the prompt as given, then the new tokens (pad ids after a
      row's EOS, and for every row once all rows have stopped).
    """
    cfg = model.config
    ids = np.asarray(input_ids)
    mask = None if attention_mask is None else np.asarray(attention_mask)
    valid = _check_prompt(ids, mask, cfg.vocab_size)
    if not is_int(max_new_tokens) or max_new_tokens <= 0:
        raise InputError(f"generate: max_new_tokens must be a positive int, got "
                         f"{max_new_tokens!r}")
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    eos_ids = token_ids(cfg.eos_token_id if eos_token_id is None else eos_token_id,
                         "eos_token_id", cfg.vocab_size)
    if pad_token_id is None:
        pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else (
            eos_ids[0] if eos_ids else 0)
    (pad_id,) = token_ids(pad_token_id, "pad_token_id", cfg.vocab_size)
    longest = int(valid.sum(axis=1).max())
    # The last new token is returned, never fed back: it needs no cache slot.
    needed = longest + int(max_new_tokens) - 1
    if max_length is None:
        max_length = needed
    elif not is_int(max_length) or max_length <= 0:
        raise InputError(f"generate: max_length must be a positive int, got {max_length!r}")
    elif longest > max_length:
        raise InputError(f"generate: the prompt has {longest} tokens, longer than max_length "
                         f"{max_length}")
    elif needed > max_length:
        raise InputError(f"generate: prompt ({longest} tokens) + max_new_tokens "
                         f"({max_new_tokens}) needs {needed} cache slots (the last new token is "
                         f"not fed back), more than max_length {max_length}")
    if prefill_chunk_size is not None and (not is_int(prefill_chunk_size)
                                           or prefill_chunk_size <= 0):
        raise InputError(f"generate: prefill_chunk_size must be a positive int, got "
                         f"{prefill_chunk_size!r}")

    # Pieces of one size compile once: left-pad the prompt to a multiple of the piece size.
    b, t = ids.shape
    if prefill_chunk_size is None:
        per_token = 4 * b * cfg.num_attention_heads * max_length  # float32 logits per query
        prefill_chunk_size = max(MIN_PREFILL_PIECE, PREFILL_LOGITS_BYTES // per_token)
    n_pieces = -(-t // min(int(prefill_chunk_size), t))
    piece = -(-t // n_pieces)  # equal pieces: at most n_pieces - 1 tokens of extra padding
    extra = -t % piece
    ids_p = np.pad(ids, ((0, 0), (extra, 0))).astype(np.int32)
    valid_p = np.pad(valid, ((0, 0), (extra, 0)))

    graphdef, params = nnx.split(model)
    block_params = None
    if slice_weights_once is None:
        block_params = model.stack.block_views()
        on_cpu = all(d.platform == "cpu" for a in jax.tree.leaves(params)
                     for d in a.sharding.device_set)
        slice_weights_once = on_cpu and block_params is None
    # Allocated by a jit straight into its shards (never whole on one device first).
    cache = _cache_allocator(cache_sharding)(cfg, b, max_length)
    logits = None
    mesh = None if cache_sharding is None else jax.tree.leaves(cache_sharding)[0].mesh
    for start in range(0, ids_p.shape[1], piece):
        logits, cache = prefill(graphdef, params, jnp.asarray(ids_p[:, start:start + piece]),
                                cache, jnp.asarray(valid_p[:, start:start + piece]), mesh=mesh,
                                block_params=block_params)
    new, _ = decode(graphdef, params, cache, logits, jax.random.key(seed),
                    max_new_tokens=int(max_new_tokens), sampling=sampling, eos_ids=eos_ids,
                    pad_id=pad_id, on_tokens=on_tokens, slice_weights_once=slice_weights_once,
                    block_params=block_params)
    return jnp.concatenate([jnp.asarray(ids, jnp.int32), new], axis=1)
