"""Load a checkpoint into a ``HybridLM``: OLMo Hybrid (transformers or OLMo-core naming), or
Qwen3.5, Qwen3.5-MoE and Qwen3-Next (transformers naming, ``qwen_names``; the family from
config.json's ``model_type``, ``hf_configs``; a vision-language checkpoint's text model).

Accepted sources:
  * a directory with ``config.json`` and weights, looked for in this order (as transformers does):
    ``model.safetensors``; safetensors shards listed in ``model.safetensors.index.json``;
    ``pytorch_model.bin``; ``.bin`` shards listed in ``pytorch_model.bin.index.json`` (as older
    transformers wrote them); else the directory's only ``.pt``/``.pth``/``.bin`` file;
  * a single weights file (``.safetensors``, or a torch state dict ``.pt``/``.pth``/``.bin``),
    with ``config=`` (a ``ModelConfig`` or a config.json path) or a ``config.json`` beside it.
Torch files are read with ``torch.load(weights_only=True)`` (see ``torch_file``).

Accepted tensor names (detected from the names, see ``namings``; mixing namings is an error):
  * transformers, per layer ``model.layers.N.``: as transformers 5.23 writes them to disk (split
    ``linear_attn.{q,k,v}_conv1d.weight`` [C, 1, K]; GDN norms ``attention_layer_norm`` /
    ``feedforward_layer_norm``; and, because its save-time renaming also applies to attention
    layers, an attention layer's post-attention norm as ``feedforward_layer_norm``), or as a
    module ``state_dict()`` names them (fused ``linear_attn.conv1d.weight`` (q, k, v channels
    concatenated), ``input_layernorm`` / ``post_attention_layernorm``);
  * OLMo-core, both generations (``blocks.N.attention.*``, or ``blocks.N.fla.inner.*`` with
    ``blocks.N.fla_norm`` for GDN blocks).
Names transformers ignores on load (``mtp.*``) are ignored, as is the head when the embeddings
are tied.

Everything (config, index, every file's header, every expected name and shape) is checked before
the model is built; problems are reported together, each naming the tensor, field or file.

The steps, each in its own module: config.json is checked by ``hybrid_jax.config.check_hf_dict``;
``sources`` finds the weights files and reads their headers; ``plan`` resolves every parameter
to its tensor(s); ``reading`` reads parameters in bounded boxes (``stream_params``); ``build``
makes the model, unsharded or sharded over devices (``from_hf``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hybrid_jax.config import ModelConfig, dtype_name, hf_dict_dtype
from hybrid_jax.convert import qwen_names
from hybrid_jax.convert.build import build
from hybrid_jax.convert.namings import QWEN
from hybrid_jax.convert.plan import Plan, detect, make_plan, tensor_dtype
from hybrid_jax.convert.reading import param_readers
from hybrid_jax.convert.sources import (
    CheckpointError,
    Files,
    check_exists,
    config_source,
    read_config,
    read_files,
    read_weights_file,
)
from hybrid_jax.hf_configs import FAMILIES, config_from_hf, text_fields
from hybrid_jax.model.hybrid_lm import HybridLM

log = logging.getLogger(__name__)

__all__ = ["CheckpointError", "from_hf", "stream_params"]


def from_hf(path: str | Path, *, dtype: Any = None,
            config: ModelConfig | str | Path | None = None, shardings: Any = None,
            **config_overrides: Any) -> HybridLM:
    """Load an OLMo Hybrid checkpoint (transformers or OLMo-core tensor naming).

    Args:
      path: a checkpoint directory with ``config.json`` and weights (``model.safetensors``,
        safetensors shards with ``model.safetensors.index.json``, ``pytorch_model.bin``, ``.bin``
        shards with ``pytorch_model.bin.index.json``, or a single ``.pt``/``.pth``/``.bin`` state
        dict), or a single weights file (``.safetensors``/``.pt``/``.pth``/``.bin``).
      dtype: params and compute dtype; default: the config's (config.json's ``dtype``/
        ``torch_dtype``, else the tensors' dtype; a ``ModelConfig``'s own ``dtype``/``param_dtype``).
      config: a ``ModelConfig`` or a config.json path to use instead of the checkpoint's
        config.json (needed for a weights file without a config.json beside it).
      **config_overrides: ``ModelConfig`` fields to replace (e.g. ``gdn_method``, ``remat``,
        ``scan_layers``, or ``param_dtype`` to store params in a different dtype than ``dtype``).
      shardings: load straight onto devices. Either a pytree of ``jax.sharding.Sharding``s matching
        the model's params (the ``nnx.State`` that
        ``hybrid_jax.split(nnx.eval_shape(lambda: HybridLM(cfg, rngs=nnx.Rngs(0))))[1]`` gives, mapped
        to shardings, or its ``nnx.to_pure_dict``), or a callable ``(path, shape) -> Sharding`` with
        ``path`` a tuple of keys such as ``("stack", "blocks", "layers", 0, "gdn", "q_proj",
        "kernel")``, or one ``Sharding`` for every parameter. Each parameter is made with
        ``jax.make_array_from_callback``, each device's callback reading only its own box of the
        checkpoint: safetensors files are memory-mapped and only those byte ranges are read
        (kernels map back to the transposed torch box; on the stacked ``stack.blocks`` parameters
        the box's first axis picks which layers' tensors are read at all; a conv's box is cut from
        the q/k/v conv tensors that hold it). Devices holding the same box share one read. Torch
        ``.pt``/``.bin`` sources cannot be byte-range read in general: they are sliced after
        ``torch.load`` (memory-mapped for zip-format files, whole in memory for legacy ones). The
        checkpoint and the shardings are fully validated before any array is made. Default:
        unsharded arrays on the default device.
    Returns:
      A ``HybridLM`` holding the checkpoint's weights.
    Raises:
      CheckpointError (a ValueError) naming the missing/unexpected/misshapen tensor and its file,
      the invalid config field, an absent shard, a corrupt safetensors file, a torch file that is
      not a state dict (or torch not installed), or tensors mixing namings. ValueError naming
      the parameter when ``shardings`` misses or adds a parameter or does not divide its shape.
    """
    cfg, plan = resolve(path, dtype, config, config_overrides)
    return build(cfg, plan, shardings)


def stream_params(path: str | Path, *, dtype: Any = None,
                  config: ModelConfig | str | Path | None = None, **config_overrides: Any
                  ) -> tuple[ModelConfig, list[tuple[tuple[str | int, ...], tuple[int, ...],
                                                     Callable[[], np.ndarray]]]]:
    """The checkpoint's config and, for every parameter of ``HybridLM(config)`` (the model's own
    paths, in its order), ``(path, shape, read)``: ``read()`` returns that parameter as a host
    numpy array of ``config.param_dtype``, read from the checkpoint only then (a stacked
    [n, ...] parameter is filled one layer at a time, each tensor in boxes of <= 32 MiB). Takes
    the same arguments, and validates the checkpoint as fully, as ``from_hf``; nothing but
    headers is read before a ``read()``. Lets a writer convert a checkpoint one parameter at a
    time (see ``hybrid_jax.convert.orbax_io.hf_to_orbax``)."""
    cfg, plan = resolve(path, dtype, config, config_overrides)
    readers = param_readers(cfg, plan)
    return cfg, [(p, shape, read) for p, (shape, read) in readers.items()]


def resolve(path: str | Path, dtype: Any, config: ModelConfig | str | Path | None,
            config_overrides: dict[str, Any]) -> tuple[ModelConfig, Plan]:
    """from_hf's validation: the config and, per parameter, where it comes from (nothing read
    but headers). Raises CheckpointError naming the culprit."""
    ckpt = Path(path)
    check_exists(ckpt)
    source = config_source(ckpt, config)
    raw = read_config(source) if isinstance(source, Path) else None
    files = read_files(ckpt) if ckpt.is_dir() else read_weights_file(ckpt)
    family = source.model_type if isinstance(source, ModelConfig) else _model_type(raw)
    if family == "olmo_hybrid":
        naming = detect(files, ckpt)
    else:
        naming, files = QWEN, _text_model_files(files, ckpt)
    if isinstance(source, ModelConfig):
        cfg = _replace_config(source, dtype, config_overrides)
    else:
        compute = dtype_name(dtype) if dtype is not None else (
            hf_dict_dtype(raw) or tensor_dtype(files, naming))
        cfg = _config_from_json(raw, source, compute, config_overrides)
    return cfg, make_plan(cfg, files, ckpt, naming)


def _model_type(raw: Any) -> str:
    """The family (text model type) a config.json dict names; "olmo_hybrid" when it names
    none or one we do not read (``config_from_hf`` then names the problem)."""
    model_type = text_fields(raw)[1] if isinstance(raw, dict) else None
    return model_type if model_type in FAMILIES else "olmo_hybrid"


def _text_model_files(files: Files, ckpt: Path) -> Files:
    """A Qwen checkpoint's tensors as the text model names them: a vision-language
    checkpoint's language model read from ``model.language_model.*``, its vision tower
    skipped (logged once)."""
    text, vision = qwen_names.language_model_names(list(files.tensors))
    if vision:
        log.warning("%s: skipping the vision tower's %d tensors (%s...)", ckpt, len(vision),
                    qwen_names.VISION_PREFIX)
    return Files({name: files.tensors[stored] for name, stored in text.items()}, files.where)


def _replace_config(source: ModelConfig, dtype: Any, config_overrides: dict[str, Any]
                    ) -> ModelConfig:
    """A given ``ModelConfig`` with the overrides; ``dtype`` sets both dtypes unless
    ``param_dtype`` is overridden too."""
    overrides = dict(config_overrides)
    if dtype is not None:
        overrides["dtype"] = dtype_name(dtype)
        overrides.setdefault("param_dtype", overrides["dtype"])
    try:
        return source.replace(**overrides)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config: invalid config: {e}") from None


def _config_from_json(raw: dict[str, Any], source: Path, compute: str,
                      config_overrides: dict[str, Any]) -> ModelConfig:
    """The ``ModelConfig`` of a checked config.json, computing in ``compute`` (and storing the
    params in it unless ``param_dtype`` is overridden)."""
    config_overrides.setdefault("param_dtype", compute)
    try:
        return config_from_hf(raw, dtype=compute, **config_overrides)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: invalid config: {e}") from None
