"""``hybrid-jax train``'s run configuration: seven sections, merged from layers of plain values,
then each read into a frozen dataclass that checks it.

Layers, later wins: a command's base layer (``hybrid-jax main``'s defaults), the preset
(``model`` only), ``--config FILE.yaml``, the flags, ``--set section.key=value`` (values
parsed as YAML 1.2). Every error is a ConfigError naming the section and key, or the file.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hybrid_jax.cli.common import ConfigError, yaml_load
from hybrid_jax.config import ModelConfig

if TYPE_CHECKING:  # imported where used: the training stack loads only for train and main
    from hybrid_jax.sharding import MeshShape
    from hybrid_jax.train.loop import LoopConfig
    from hybrid_jax.train.optimizer import OptimizerConfig

SECTIONS = ("model", "optimizer", "loop", "data", "eval", "mesh", "run")
Sections = dict[str, dict[str, Any]]  # section -> key -> plain value, before checking


@dataclass(frozen=True)
class DataConfig:
    """The ``data`` section, exactly one of: ``path``, token files (OLMo-core's numpy format,
    ``dtype``; a path, a glob or a list of them: one source); ``text``, a UTF-8 file (encoded
    with ``tokenizer``, a tokenizer.json, else (or "bytes") as bytes; split into documents at
    ``doc_separator``, None: one document); ``sources``, a mixture: a list of
    {name, paths (path, glob or list), weight (default 1), dtype (default ``dtype``)}.

    Rows of ``seq_len`` tokens, ``global_batch`` rows a step, in an order set by ``seed``.
    ``holdout``: the fraction of each source's rows (its last ones) kept out of training and
    evaluated as held-out set "holdout" ("holdout.<source>" for several sources) when
    ``eval.every`` is set. ``threads`` read rows in parallel, ``prefetch`` batches ahead.
    With token files, ``tokenizer`` names the codec their ids come from (for bits per byte,
    multiple-choice tasks and --sample)."""

    path: str | list[str] | None = None
    dtype: str = "uint16"
    text: str | None = None
    tokenizer: str | None = None
    doc_separator: str | None = "\n\n"
    sources: list[dict[str, Any]] | None = None
    seq_len: int = 256
    global_batch: int = 8
    seed: int = 0
    holdout: float = 0.0
    threads: int = 2
    prefetch: int = 4

    def __post_init__(self) -> None:
        separator = self.doc_separator
        if separator is not None and (not isinstance(separator, str) or not separator):
            raise ConfigError(f"data.doc_separator: expected a non-empty string or null (one "
                              f"document), got {separator!r}")
        given = [k for k in ("path", "text", "sources") if getattr(self, k)]
        if len(given) != 1:
            raise ConfigError(f"data: give exactly one of path (token files), text or sources "
                              f"(a mixture); got {given or 'none'}")
        if self.sources is not None:
            _check_sources(self.sources)
        _check_dtype("data.dtype", self.dtype)
        seed = self.seed
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 32:
            raise ConfigError(f"data.seed: expected an int in [0, 2**32), got {seed!r}")
        h = self.holdout
        if isinstance(h, bool) or not isinstance(h, int | float) or not 0 <= h < 1:
            raise ConfigError(f"data.holdout: expected a fraction in [0, 1), got {h!r}")


_SOURCE_KEYS = {"name", "paths", "weight", "dtype"}


def _check_sources(sources: Any) -> None:
    """data.sources: a non-empty list of mappings with known keys, each with paths."""
    if not isinstance(sources, list) or not sources:
        raise ConfigError(f"data.sources: expected a non-empty list of sources, got "
                          f"{sources!r}")
    for i, source in enumerate(sources):
        where = f"data.sources[{i}]"
        if not isinstance(source, dict):
            raise ConfigError(f"{where}: expected a mapping, got {source!r}")
        unknown = sorted(set(source) - _SOURCE_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown} (keys: {sorted(_SOURCE_KEYS)})")
        if not source.get("paths"):
            raise ConfigError(f"{where}: paths (a path, glob or list of them) is required")
        if "dtype" in source:
            _check_dtype(f"{where}.dtype", source["dtype"])


def _check_dtype(where: str, dtype: Any) -> None:
    """A token files' dtype name."""
    if dtype not in ("uint16", "uint32"):
        raise ConfigError(f"{where}: token dtype must be uint16 or uint32, got {dtype!r}")


@dataclass(frozen=True)
class EvalConfig:
    """The ``eval`` section: evaluation during training, after every ``every`` steps (None:
    none) and after the last. ``heldout``: held-out token files (a path, glob or list: one set
    named "heldout"; or a mapping of set name to paths), read as ``dtype`` (default
    data.dtype); ``max_rows`` the first rows of each set (None: all); ``batch`` rows at a time
    (default data.global_batch). data.holdout adds the training sources' held-out tails.
    ``choice``: multiple-choice tasks (JSON-lines files, ``hybrid_jax.eval.choice``: a path or
    list, each named by its file's stem, or a mapping of name to path), their first
    ``choice_limit`` items (None: all), scored with data.tokenizer's codec."""

    every: int | None = None
    heldout: str | list[str] | dict[str, Any] | None = None
    dtype: str | None = None
    max_rows: int | None = None
    batch: int | None = None
    choice: str | list[str] | dict[str, str] | None = None
    choice_limit: int | None = None

    def __post_init__(self) -> None:
        for name in ("every", "max_rows", "batch", "choice_limit"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ConfigError(f"eval.{name}: expected a positive int or null, got "
                                  f"{value!r}")
        if self.dtype is not None:
            _check_dtype("eval.dtype", self.dtype)
        for name in ("heldout", "choice"):
            if getattr(self, name) is not None and self.every is None:
                raise ConfigError(f"eval.{name}: set eval.every, the steps between "
                                  f"evaluations")

    def heldout_paths(self) -> dict[str, Any]:
        """Set name -> its paths (globs)."""
        if self.heldout is None:
            return {}
        if isinstance(self.heldout, dict):
            return dict(self.heldout)
        return {"heldout": self.heldout}

    def choice_paths(self) -> dict[str, str]:
        """Task name -> its JSON-lines file."""
        if self.choice is None:
            return {}
        if isinstance(self.choice, dict):
            return {str(k): str(v) for k, v in self.choice.items()}
        paths = [self.choice] if isinstance(self.choice, str) else self.choice
        return {Path(p).stem: str(p) for p in paths}


@dataclass(frozen=True)
class RunConfig:
    """The ``run`` section, where a run writes: checkpoints (None: none, no resume), the
    JSON-lines log (default: log.jsonl in the checkpoint dir), TensorBoard event files, and
    the final model in transformers' format."""

    checkpoint_dir: str | None = None
    log_file: str | None = None
    tensorboard_dir: str | None = None
    export_hf: str | None = None

    @property
    def log_path(self) -> str | None:
        """The log file: ``log_file``, else log.jsonl in the checkpoint dir, else None."""
        if self.log_file:
            return self.log_file
        return str(Path(self.checkpoint_dir) / "log.jsonl") if self.checkpoint_dir else None


@dataclass(frozen=True)
class TrainConfig:
    """The seven sections, checked; ``mesh`` None: one device."""

    model: ModelConfig
    optimizer: OptimizerConfig
    loop: LoopConfig
    data: DataConfig
    eval: EvalConfig
    mesh: MeshShape | None
    run: RunConfig


def _read_config_file(path: Path) -> Sections:
    """The sections of a ``--config`` YAML file (each a mapping)."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    loaded = yaml_load(path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got "
                          f"{type(loaded).__name__}")
    for section, values in loaded.items():
        if section not in SECTIONS:
            raise ConfigError(f"{path}: unknown section {section!r} (sections: "
                              f"{list(SECTIONS)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping")
    return loaded


def _flag_values(args: argparse.Namespace) -> Sections:
    """The values the flags set (those given), by section; ``--mesh`` parsed."""
    flags = {("data", "path"): args.data, ("data", "dtype"): args.data_dtype,
             ("data", "text"): args.text, ("data", "tokenizer"): args.tokenizer,
             ("data", "seq_len"): args.seq_len, ("data", "global_batch"): args.global_batch,
             ("loop", "steps"): args.steps, ("optimizer", "lr"): args.lr,
             ("run", "checkpoint_dir"): args.checkpoint_dir,
             ("run", "export_hf"): args.export_hf,
             ("run", "tensorboard_dir"): getattr(args, "tensorboard", None)}
    out: Sections = {}
    for (section, key), value in flags.items():
        if value is not None:
            out.setdefault(section, {})[key] = value
    if args.mesh:
        from hybrid_jax.sharding import ShardingError, parse_mesh_sizes

        try:
            out["mesh"] = parse_mesh_sizes(args.mesh)
        except ShardingError as e:
            raise ConfigError(f"--{e}") from None
    return out


def _set_values(items: list[str]) -> Sections:
    """``--set SECTION.KEY=VALUE`` items by section, each value parsed as YAML."""
    out: Sections = {}
    for item in items:
        key, eq, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not eq or not dot or section not in SECTIONS or not name:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE with a section in "
                              f"{list(SECTIONS)}")
        out.setdefault(section, {})[name] = yaml_load(value)
    return out


def merge_layers(args: argparse.Namespace) -> Sections:
    """The merged configuration (sections of plain values), before checking: a command's
    base layer (``args.base_config``, sections; ``hybrid-jax main``'s defaults) < --config <
    flags < --set; with none of data.path, data.text or data.sources set,
    ``args.fallback_text``."""
    base = getattr(args, "base_config", None) or {}
    layers = [base, _read_config_file(args.config) if args.config is not None else {},
              _flag_values(args), _set_values(args.set)]
    cfg: Sections = {s: {} for s in SECTIONS}
    for layer in layers:
        for section, values in layer.items():
            cfg[section].update(values)
    fallback = getattr(args, "fallback_text", None)
    if fallback is not None and not any(cfg["data"].get(k) for k in ("path", "text", "sources")):
        cfg["data"]["text"] = fallback
    return cfg


def _section(cls: type, section: str, values: dict[str, Any], base: Any = None) -> Any:
    """``cls(**values)`` (or ``base`` with ``values`` replaced); a ConfigError naming the
    section for an unknown key or a value the dataclass rejects."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"{section}: unknown setting(s) {unknown}")
    try:
        return dataclasses.replace(base, **values) if base is not None else cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{section}: {e}") from e


def check_sections(cfg: Sections, preset: str) -> TrainConfig:
    """The merged sections read into their dataclasses: ``model`` over the preset ``preset``;
    ``loop.steps`` 100 unless set, and the optimizer's schedule fitted to it
    (``total_steps`` = steps, ``warmup_steps`` a tenth of them, 1 to 100) unless set."""
    from hybrid_jax.presets import PRESETS
    from hybrid_jax.sharding import MeshShape
    from hybrid_jax.train.loop import LoopConfig
    from hybrid_jax.train.optimizer import OptimizerConfig

    model = _section(ModelConfig, "model", cfg["model"], PRESETS[preset]())
    data = _section(DataConfig, "data", cfg["data"])
    evaluation = _section(EvalConfig, "eval", cfg.get("eval", {}))
    run = _section(RunConfig, "run", cfg["run"])
    steps = cfg["loop"].get("steps", 100)
    optimizer = _section(OptimizerConfig, "optimizer", {
        "warmup_steps": min(100, max(steps // 10, 1)), "total_steps": steps,
        **cfg["optimizer"]})
    loop = _section(LoopConfig, "loop", {"steps": steps, **cfg["loop"]})
    mesh = _section(MeshShape, "mesh", cfg["mesh"]) if cfg["mesh"] else None
    return TrainConfig(model, optimizer, loop, data, evaluation, mesh, run)


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The run's configuration from the command line: ``merge_layers``, then
    ``check_sections`` over ``args.preset``."""
    return check_sections(merge_layers(args), args.preset)


__all__ = ["DataConfig", "EvalConfig", "RunConfig", "SECTIONS", "TrainConfig", "check_sections",
           "merge_layers", "train_config"]
