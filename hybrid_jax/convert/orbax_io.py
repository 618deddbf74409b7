"""Save and restore a ``HybridLM`` as an orbax checkpoint directory, and stream one to transformers.

Layout of a checkpoint written by ``save_orbax(model, path)``::

    path/
      model_config.json   # {"format": "hybrid_jax.orbax", "version": 1, "config": {ModelConfig fields}}
      params/             # orbax StandardCheckpointer directory of the parameters' pure dict
                          # (nnx.to_pure_dict(nnx.state(model)): {"embed": {"embedding": ...}, ...})

Training code restores the parameters with plain orbax::

    cfg = read_orbax_config(path)
    abstract = nnx.eval_shape(lambda: HybridLM(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                          nnx.to_pure_dict(state))
    pure = ocp.StandardCheckpointer().restore(path / "params", target)
    nnx.replace_by_pure_dict(state, pure); model = nnx.merge(graphdef, state)

(which is what ``load_orbax`` does; give the abstract arrays a ``sharding`` of the training
mesh to restore them sharded). The config is stored field for field
(``dataclasses.asdict``), execution options and dtypes included, so it round-trips exactly.

Stacked layer parameters ([n, ...], see ``hybrid_jax.model.stack``) are chunked one layer per
chunk (orbax ``SaveArgs(shard_axes=(0,))``) and large arrays in chunks of at most 64 MiB, so that
``orbax_to_hf`` can read one layer's slice of one parameter at a time (``tensorstore``) and write
the transformers checkpoint without ever holding the whole model.

``hf_to_orbax`` converts a transformers checkpoint without building the model: it reads one
parameter at a time (``from_hf.stream_params``) and writes each with orbax's partial save
(``save_orbax_leaves``), merged at the end into the same ``params/`` pytree layout (uncompressed
by default; ``compress=True`` zstd-compresses as ``save_orbax`` does). The one difference in
chunking: a large unstacked array whose first axis is not its longest (``lm_head``'s [D, V]
kernel) is stored as a single chunk, which ``to_hf`` reads back in column blocks.

As with ``to_hf``, the output is assembled in a temporary directory beside ``path`` and renamed
into place at the end; an existing non-empty ``path`` is replaced only with ``overwrite=True``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from hybrid_jax.convert.hf_names import LAYOUT_RELEASE, tokenizer_files
from hybrid_jax.convert.output_dir import check_extra_files, refuse_existing, writing
from hybrid_jax.config import ModelConfig
from hybrid_jax.model.hybrid_lm import HybridLM
from hybrid_jax.tree_paths import flat_paths, path_keys, set_path

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
FORMAT = "hybrid_jax.orbax"
VERSION = 1
_CHUNK_BYTES = 64 * 2**20

Path_ = tuple[str | int, ...]


class OrbaxCheckpointError(ValueError):
    """An orbax checkpoint directory that cannot be read; the message names the file."""


# ----------------------------------------------------------------------------- helpers
def _is_stacked(path: Path_) -> bool:
    return path[:2] == ("stack", "blocks")


def _abstract(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    return nnx.split(nnx.eval_shape(lambda: HybridLM(cfg, rngs=nnx.Rngs(0))))


def config_to_json(cfg: ModelConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["layer_types"] = list(d["layer_types"])
    return {"format": FORMAT, "version": VERSION, "config": d}


def config_from_json(data: Any, where: Path) -> ModelConfig:
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(
            data.get("config"), dict):
        raise OrbaxCheckpointError(f"{where}: not a hybrid_jax orbax config (expected an object "
                                   f"with format {FORMAT!r} and a 'config' object)")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    raw = data["config"]
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise OrbaxCheckpointError(f"{where}: unknown ModelConfig field(s) {unknown}")
    try:
        return ModelConfig(**raw)
    except (TypeError, ValueError) as e:
        raise OrbaxCheckpointError(f"{where}: invalid config: {e}") from None


def read_orbax_config(path: str | os.PathLike) -> ModelConfig:
    """The ``ModelConfig`` stored in an orbax checkpoint directory written by ``save_orbax``."""
    ckpt = Path(path)
    if not ckpt.is_dir():
        raise OrbaxCheckpointError(f"{ckpt}: orbax checkpoint directory not found")
    cfg_path = ckpt / CONFIG_FILE
    if not cfg_path.is_file():
        raise OrbaxCheckpointError(f"{cfg_path}: {CONFIG_FILE} not found in orbax checkpoint "
                                   f"directory {ckpt}")
    try:
        data = json.loads(cfg_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OrbaxCheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    if not (ckpt / PARAMS_DIR).is_dir():
        raise OrbaxCheckpointError(f"{ckpt / PARAMS_DIR}: parameter directory not found in orbax "
                                   f"checkpoint directory {ckpt}")
    return config_from_json(data, cfg_path)


# ----------------------------------------------------------------------------- save
def _save_args(pure: dict) -> dict:
    import orbax.checkpoint as ocp

    args: dict = jax.tree.map(lambda _: None, pure)
    for path, leaf in flat_paths(pure).items():
        nbytes = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        stacked = _is_stacked(path) and len(leaf.shape) > 0 and leaf.shape[0] > 1
        big = nbytes > _CHUNK_BYTES
        set_path(args, path, ocp.SaveArgs(shard_axes=(0,) if stacked else (),
                                      chunk_byte_size=_CHUNK_BYTES if big else None))
    return args


def save_orbax(model: HybridLM, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``model``'s parameters and config as an orbax checkpoint directory ``path``.

    Memory: orbax snapshots the whole parameter tree to host memory before writing (for its
    asynchronous save), so peak memory is about twice the model (see experiments/RESULTS.md,
    "Weight conversion memory").
    Raises FileExistsError when ``path`` exists, is not empty and ``overwrite`` is false (checked
    before anything is written).
    """
    import orbax.checkpoint as ocp

    if not isinstance(model, HybridLM):
        raise TypeError(f"save_orbax: expected a HybridLM, got {type(model).__name__}")
    out = Path(path).absolute()
    refuse_existing(out, overwrite)
    pure = nnx.to_pure_dict(nnx.state(model))
    with writing(out, overwrite) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config_to_json(model.config), indent=2) + "\n")
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / PARAMS_DIR, pure, save_args=_save_args(pure))
            ckptr.wait_until_finished()
    return out


def _storage_options(path: Path_, shape: tuple[int, ...], dtype: np.dtype) -> Any:
    """The chunking ``_save_args`` gives, as orbax v1 storage options, except for a large
    unstacked array whose first axis is not its longest (``lm_head``'s [D, V] kernel): orbax
    would cut it into column blocks, which tensorstore copies out of the host array and holds
    until the write commits (a second full copy of the 206 MB head in the benchmark), so it is
    stored as one chunk; ``to_hf`` reads it back in column blocks."""
    import orbax.checkpoint.experimental.v1 as ocpv1

    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    stacked = _is_stacked(path) and len(shape) > 0 and shape[0] > 1
    big = nbytes > _CHUNK_BYTES and (stacked or (len(shape) > 0 and shape[0] == max(shape)))
    return ocpv1.options.ArrayOptions.Saving.StorageOptions(
        shard_axes=(0,) if stacked else (),
        chunk_byte_size=_CHUNK_BYTES if big else None)


def save_orbax_leaves(cfg: ModelConfig,
                      leaves: list[tuple[Path_, tuple[int, ...], Callable[[], np.ndarray]]],
                      path: str | os.PathLike, *, overwrite: bool = False,
                      progress: Callable[[str], None] | None = None,
                      compress: bool = False, extra_files: Sequence[Path] = ()) -> Path:
    """Write an orbax checkpoint directory, in ``save_orbax``'s layout, one parameter at a time.

    ``leaves``: every parameter of ``HybridLM(cfg)`` as ``(path, shape, read)``, ``read()``
    returning the host numpy array (of ``cfg.param_dtype``). Each is read, written with orbax's
    partial save (``orbax.checkpoint.experimental.v1.partial``; host arrays are not copied
    again) and dropped before the next is read, so about one parameter is held at a time; the
    partial saves are then merged into one pytree (``partial.finalize``) that ``load_orbax``,
    ``lazy_params`` and plain ``StandardCheckpointer.restore`` read like ``save_orbax``'s.
    ``progress(name)`` is called after each parameter is written.

    ``compress``: zstd-compress the chunks, as ``save_orbax`` (orbax's default) does. Off by
    default: tensorstore holds a parameter's compressed chunks until its write commits, about
    one more copy of the largest parameter at peak (measured: +190 MB on a 206 MB parameter,
    against +8 MB uncompressed); float weights compress little (~8% on random float32).
    Readers handle either.

    ``extra_files`` (e.g. the tokenizer's) are copied into the directory, by name.
    """
    import orbax.checkpoint.experimental.v1 as ocpv1

    out = Path(path).absolute()
    refuse_existing(out, overwrite)
    check_extra_files(extra_files, (CONFIG_FILE, PARAMS_DIR))
    shapes = {tuple(str(k) for k in p): (tuple(shape), p) for p, shape, _ in leaves}
    pdtype = np.dtype(cfg.params_dtype)

    def options(key: Any, value: Any) -> Any:
        p = tuple(str(k) for k in path_keys(key))
        return _storage_options(shapes[p][1] if p in shapes else p, tuple(value.shape),
                                value.dtype)

    ctx = ocpv1.Context()
    ctx.array.saving.use_zarr3 = False  # as StandardCheckpointer writes (lazy_params reads both)
    ctx.array.saving.scoped_storage_options_creator = options
    ctx.memory.deepcopy_host_arrays = False  # each array is ours alone until its save returns
    ctx.array.saving.use_compression = compress

    with writing(out, overwrite) as tmp:
        partial = tmp / "partial"  # (orbax parses its session's names: no dots in this one)
        (tmp / CONFIG_FILE).write_text(json.dumps(config_to_json(cfg), indent=2) + "\n")
        for f in extra_files:
            shutil.copyfile(f, tmp / Path(f).name)
        with ctx:
            for p, shape, read in leaves:
                array = np.asarray(read())
                if array.shape != tuple(shape) or array.dtype != pdtype:
                    raise AssertionError(f"internal: {'.'.join(map(str, p))} read as "
                                         f"{array.dtype} {array.shape}, expected {pdtype} "
                                         f"{tuple(shape)}")
                sub: dict = {}
                node = sub
                for k in p[:-1]:
                    node = node.setdefault(k, {})
                node[p[-1]] = array
                ocpv1.partial.save(partial, sub)
                del sub, node, array
                if progress is not None:
                    progress(".".join(map(str, p)))
            ocpv1.partial.finalize(partial)
        tree = partial / "state"
        if not (tree / "_METADATA").is_file():
            raise AssertionError(f"internal: orbax's partial save left no pytree in {partial} "
                                 f"(found {sorted(x.name for x in partial.iterdir())})")
        if (partial / "_CHECKPOINT_METADATA").is_file():
            os.rename(partial / "_CHECKPOINT_METADATA", tree / "_CHECKPOINT_METADATA")
        os.rename(tree, tmp / PARAMS_DIR)
        shutil.rmtree(partial)
    return out


def hf_to_orbax(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: Any = None,
                overwrite: bool = False, progress: Callable[[str], None] | None = None,
                compress: bool = False, **config_overrides: Any) -> Path:
    """Write the transformers checkpoint ``src`` (anything ``from_hf`` reads) as an orbax
    checkpoint ``dst``, one parameter at a time (``from_hf.stream_params`` +
    ``save_orbax_leaves``) rather than building the model: about one parameter (a stacked
    [n, ...] one, or the embeddings / head) is held at a time. ``progress(name)`` is called after
    each parameter is written; ``compress``: see ``save_orbax_leaves``. Tokenizer files next to
    the weights (``hf_names.TOKENIZER_FILES``) are copied along."""
    from hybrid_jax.convert.from_hf import stream_params

    out = Path(dst).absolute()
    refuse_existing(out, overwrite)
    cfg, leaves = stream_params(src, dtype=dtype, **config_overrides)
    return save_orbax_leaves(cfg, leaves, out, overwrite=overwrite, progress=progress,
                             compress=compress, extra_files=tokenizer_files(src))


# ----------------------------------------------------------------------------- load
def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def load_orbax(path: str | os.PathLike, **config_overrides: Any) -> HybridLM:
    """Restore a ``HybridLM`` from an orbax checkpoint directory written by ``save_orbax``.

    ``config_overrides`` replace execution options of the stored config (e.g. ``gdn_method``,
    ``remat``); fields that change parameter shapes or dtypes are rejected by orbax's restore.
    Raises OrbaxCheckpointError naming the file for a missing or unreadable checkpoint.
    """
    import orbax.checkpoint as ocp

    ckpt = Path(path).absolute()
    cfg = read_orbax_config(ckpt)
    if config_overrides:
        cfg = cfg.replace(**config_overrides)
    graphdef, state = _abstract(cfg)
    # With a sharding, orbax restores jax arrays (without one, the numpy arrays it saved).
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                          nnx.to_pure_dict(state))
    try:
        with ocp.StandardCheckpointer() as ckptr:
            pure = ckptr.restore(ckpt / PARAMS_DIR, target)
    except Exception as e:  # noqa: BLE001 - orbax raises many types; report the file
        raise OrbaxCheckpointError(f"{ckpt / PARAMS_DIR}: cannot restore the orbax parameters "
                                   f"({type(e).__name__}: {_first_line(e)})") from None
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------- streaming
class LazyParam:
    """A stored parameter read on demand: ``p[j]`` reads slice j only, ``p[:, a:b]`` that box,
    ``np.asarray(p)`` all of it. Shape and dtype come from the checkpoint's metadata, so checks
    need no reads."""

    box_reads = True  # tells to_hf that boxes can be read without reading the whole parameter

    def __init__(self, opener: Callable[[], Any], path: Path_, shape: tuple[int, ...],
                 dtype: np.dtype, on_read: Callable[[Path_, Any], None]) -> None:
        self._opener = opener
        self._store = None
        self.path = path
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self._on_read = on_read

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def _open(self) -> Any:
        if self._store is None:
            self._store = self._opener()
        return self._store

    def _read(self, index: Any) -> np.ndarray:
        try:
            out = np.asarray(self._open()[index].read().result())
        except Exception as e:  # noqa: BLE001
            raise OrbaxCheckpointError(f"cannot read parameter {'.'.join(map(str, self.path))}: "
                                       f"{type(e).__name__}: {_first_line(e)}") from None
        self._on_read(self.path, index)
        return out

    def __getitem__(self, index: Any) -> np.ndarray:
        return self._read(index)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self._read(Ellipsis)
        return a if dtype is None else a.astype(dtype, copy=False)


def lazy_params(path: str | os.PathLike,
                on_read: Callable[[Path_, Any], None] | None = None) -> tuple[ModelConfig, dict]:
    """(config, pure dict of lazily read parameters) of an orbax checkpoint from ``save_orbax``.

    Each leaf has ``shape``/``dtype`` and reads from disk only when indexed (``leaf[j]``: layer
    slice j of a stacked parameter) or converted (``np.asarray(leaf)``), via tensorstore.
    ``on_read(path, index)`` is called after each read. Falls back to OrbaxCheckpointError when
    the parameters are not in orbax's tensorstore (zarr / OCDBT) layout.
    """
    import orbax.checkpoint as ocp
    import tensorstore as ts

    ckpt = Path(path).absolute()
    cfg = read_orbax_config(ckpt)
    params_dir = ckpt / PARAMS_DIR
    try:
        with ocp.StandardCheckpointer() as ckptr:
            meta = ckptr.metadata(params_dir).item_metadata
        tree = meta.tree
        use_zarr3 = bool(getattr(meta, "use_zarr3", False))
    except Exception as e:  # noqa: BLE001
        raise OrbaxCheckpointError(f"{params_dir}: cannot read the orbax metadata "
                                   f"({type(e).__name__}: {_first_line(e)})") from None
    ocdbt = (params_dir / "manifest.ocdbt").is_file()
    context = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
    driver = "zarr3" if use_zarr3 else "zarr"

    def opener(name: str) -> Callable[[], Any]:
        if ocdbt:
            kvstore = {"driver": "ocdbt", "base": f"file://{params_dir}/", "path": name + "/"}
        else:
            kvstore = {"driver": "file", "path": f"{params_dir}/{name}/"}
        return lambda: ts.open({"driver": driver, "kvstore": kvstore}, open=True, read=True,
                               context=context).result()

    # Re-key the metadata's string keys ("0") with the model's own (0) from the abstract model.
    expected = flat_paths(nnx.to_pure_dict(_abstract(cfg)[1]))
    stored = {tuple(str(k) for k in p): m for p, m in flat_paths(tree).items()}
    notify = on_read or (lambda p, i: None)
    out: dict = nnx.to_pure_dict(_abstract(cfg)[1])
    problems = []
    for p, want in expected.items():
        m = stored.pop(tuple(str(k) for k in p), None)
        if m is None:
            problems.append(f"missing parameter {'.'.join(map(str, p))}")
            continue
        name = getattr(m, "name", None) or ".".join(str(k) for k in p)
        set_path(out, p, LazyParam(opener(name), p, tuple(m.shape), np.dtype(m.dtype), notify))
    problems += [f"unexpected parameter {'.'.join(k)}" for k in stored]
    if problems:
        raise OrbaxCheckpointError(f"{params_dir}: parameters do not match {ckpt / CONFIG_FILE}: "
                                   + "; ".join(problems[:5])
                                   + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
    return cfg, out


def orbax_to_hf(src: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: Any = None,
                max_shard_size: int | str = "5GB", overwrite: bool = False,
                on_read: Callable[[Path_, Any], None] | None = None,
                layout: str = LAYOUT_RELEASE) -> Path:
    """Write the orbax checkpoint ``src`` as a transformers checkpoint ``out_dir`` (``to_hf``,
    ``layout`` as there), reading one layer slice of one parameter at a time rather than
    restoring the whole model. Tokenizer files in ``src`` are copied along."""
    from hybrid_jax.convert.to_hf import to_hf

    cfg, params = lazy_params(src, on_read)
    return to_hf(params, out_dir, config=cfg, dtype=dtype, max_shard_size=max_shard_size,
                 overwrite=overwrite, extra_files=tokenizer_files(src), layout=layout)


__all__ = ["OrbaxCheckpointError", "hf_to_orbax", "lazy_params", "load_orbax", "orbax_to_hf",
           "read_orbax_config", "save_orbax", "save_orbax_leaves"]
