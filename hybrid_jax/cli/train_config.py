"""``hybrid-jax train``'s run configuration: six sections, merged from layers of plain values,
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

SECTIONS = ("model", "optimizer", "loop", "data", "mesh", "run")
Sections = dict[str, dict[str, Any]]  # section -> key -> plain value, before checking


@dataclass(frozen=True)
class DataConfig:
    """The ``data`` section: a token file (``path`` in OLMo-core's numpy format, ``dtype``)
    or a UTF-8 ``text`` file (encoded with ``tokenizer``, a tokenizer.json, else as bytes;
    split into documents at ``doc_separator``, None: one document); rows of ``seq_len``
    tokens, ``global_batch`` rows a step, in an order set by ``seed``."""

    path: str | None = None
    dtype: str = "uint16"
    text: str | None = None
    tokenizer: str | None = None
    doc_separator: str | None = "\n\n"
    seq_len: int = 256
    global_batch: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        separator = self.doc_separator
        if separator is not None and (not isinstance(separator, str) or not separator):
            raise ConfigError(f"data.doc_separator: expected a non-empty string or null (one "
                              f"document), got {separator!r}")
        if bool(self.path) == bool(self.text):
            raise ConfigError("data: give exactly one of path (a token file) or text")


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
    """The six sections, checked; ``mesh`` None: one device."""

    model: ModelConfig
    optimizer: OptimizerConfig
    loop: LoopConfig
    data: DataConfig
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
    flags < --set; with neither data.path nor data.text set, ``args.fallback_text``."""
    base = getattr(args, "base_config", None) or {}
    layers = [base, _read_config_file(args.config) if args.config is not None else {},
              _flag_values(args), _set_values(args.set)]
    cfg: Sections = {s: {} for s in SECTIONS}
    for layer in layers:
        for section, values in layer.items():
            cfg[section].update(values)
    fallback = getattr(args, "fallback_text", None)
    if fallback is not None and not cfg["data"].get("path") and not cfg["data"].get("text"):
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
    run = _section(RunConfig, "run", cfg["run"])
    steps = cfg["loop"].get("steps", 100)
    optimizer = _section(OptimizerConfig, "optimizer", {
        "warmup_steps": min(100, max(steps // 10, 1)), "total_steps": steps,
        **cfg["optimizer"]})
    loop = _section(LoopConfig, "loop", {"steps": steps, **cfg["loop"]})
    mesh = _section(MeshShape, "mesh", cfg["mesh"]) if cfg["mesh"] else None
    return TrainConfig(model, optimizer, loop, data, mesh, run)


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The run's configuration from the command line: ``merge_layers``, then
    ``check_sections`` over ``args.preset``."""
    return check_sections(merge_layers(args), args.preset)


__all__ = ["DataConfig", "RunConfig", "SECTIONS", "TrainConfig", "check_sections",
           "merge_layers", "train_config"]
