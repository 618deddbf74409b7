"""The name plan: which checkpoint tensor (or tensors) feeds which ``HybridLM`` parameter.

The tensor naming (transformers, in either on-disk layout of ``hf_names``, or OLMo-core) is
detected from the names (``namings``); every parameter is then resolved to its tensor(s), with
each name, shape and dtype checked against the config. Problems are collected and reported
together. A resolved parameter (``Choice``) carries ``read``, which reads any box of our array
from the parts of the checkpoint tensors that hold it (nothing is read while planning).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hybrid_jax.config import GDN, ModelConfig, dtype_name
from hybrid_jax.convert.hf_names import Want, conv_targets
from hybrid_jax.convert.namings import Naming, NamingError, detect_naming
from hybrid_jax.convert.safetensors_file import DTYPES, FLOAT_DTYPES
from hybrid_jax.convert.sources import (
    AnyTensorInfo,
    CheckpointError,
    Files,
    Spans,
    raise_if,
    read_slice,
)

log = logging.getLogger(__name__)

IGNORED_PREFIXES = ("mtp.",)  # multi-token-prediction heads; transformers drops them too

BoxReader = Callable[[Spans], np.ndarray]


@dataclass(frozen=True)
class Choice:
    """A resolved source: checkpoint tensor(s) ``infos`` -> our parameter at ``target``."""

    target: tuple[str | int, ...]
    infos: tuple[AnyTensorInfo, ...]
    transposed: bool  # ours is the transpose of the one tensor in ``infos``
    read: BoxReader  # a box of our array, reading only the tensors' parts in it


@dataclass(frozen=True)
class Plan:
    """Every parameter's source: ``global_choices`` (embeddings, final norm, head; targets are model
    paths) and, per HF layer index, that layer's choices (targets relative to the layer)."""

    global_choices: list[Choice]
    layers: dict[int, list[Choice]]


# ----------------------------------------------------------------------------- box readers
def direct_reader(info: AnyTensorInfo, transposed: bool) -> BoxReader:
    """Box of our parameter -> the same elements of a tensor ours is (the transpose of)."""
    if transposed:  # ours [in, out] = torch [out, in].T
        return lambda index: read_slice(info, index[::-1]).T
    return lambda index: read_slice(info, index)


def concat_reader(infos: tuple[AnyTensorInfo, ...], start: int) -> BoxReader:
    """Box [rows, taps] of a conv whose channels start at row ``start`` of the concatenation of
    ``infos`` ([C_i, 1, K] or [C_i, K] each), cut from the parts that hold those rows."""
    def read(index: Spans) -> np.ndarray:
        (lo, hi), taps = index
        lo, hi = lo + start, hi + start
        pieces, offset = [], 0
        for info in infos:
            a, b = max(lo, offset), min(hi, offset + info.shape[0])
            if a < b:
                box = ((a - offset, b - offset),) + ((0, 1),) * (len(info.shape) == 3)
                pieces.append(read_slice(info, box + (taps,)).reshape(b - a, -1))
            offset += info.shape[0]
        if not pieces:
            return np.zeros((0, taps[1] - taps[0]), DTYPES[infos[0].dtype])
        return np.concatenate(pieces)
    return read


# ----------------------------------------------------------------------------- planning
class _Planner:
    """Resolves every parameter to a checkpoint tensor, collecting all problems."""

    def __init__(self, files: Files, naming: Naming) -> None:
        self.tensors = files.tensors
        self.where = files.where
        self.naming = naming
        self.used: set[str] = set()
        self.problems: list[str] = []

    def _check_dtype(self, info: AnyTensorInfo) -> bool:
        if info.dtype not in FLOAT_DTYPES:
            self.problems.append(f"tensor {info.name} in {info.path} has dtype {info.dtype}, "
                                 f"expected a floating-point dtype")
            return False
        return True

    def _check(self, info: AnyTensorInfo, shape: tuple[int, ...]) -> bool:
        if info.shape != shape:
            self.problems.append(f"tensor {info.name} in {info.path} has shape {list(info.shape)}, "
                                 f"expected {list(shape)} from the config")
            return False
        return self._check_dtype(info)

    def pick(self, prefix: str, want: Want, target: tuple) -> Choice | None:
        present = [prefix + n for n in want.names if prefix + n in self.tensors]
        self.used.update(present)
        if not present:
            alts = " or ".join(prefix + n for n in want.names)
            self.problems.append(f"missing tensor {alts} (expected in {self.where})")
            return None
        if len(present) > 1:
            self.problems.append(f"ambiguous tensors {' and '.join(present)}: both name the same "
                                 f"parameter")
            return None
        info = self.tensors[present[0]]
        if not self._check(info, want.shape):
            return None
        return Choice(target, (info,), want.transposed, direct_reader(info, want.transposed))

    def pick_convs(self, prefix: str, cfg: ModelConfig, target: tuple) -> list[Choice]:
        """q/k/v convs: split or fused, all read as the concatenation of the q, k and v channels
        [2 Kd + Vd, 1, K]."""
        infos = self._conv_infos(prefix, cfg)
        if infos is None:
            return []
        return [Choice(target + path, infos, False, concat_reader(infos, start))
                for path, start, _ in conv_targets(cfg).values()]

    def _conv_infos(self, prefix: str, cfg: ModelConfig) -> tuple[AnyTensorInfo, ...] | None:
        """The fused conv tensor, or the q, k and v ones, checked; None after a problem."""
        kd, vd, k = cfg.linear_key_dim, cfg.linear_value_dim, cfg.linear_conv_kernel_dim
        naming = self.naming
        split_names = [prefix + n for n in naming.conv_names]
        fused_name = prefix + naming.fused_conv if naming.fused_conv else None
        have_split = [n for n in split_names if n in self.tensors]
        have_fused = fused_name is not None and fused_name in self.tensors
        self.used.update(have_split + [fused_name] * have_fused)
        if have_fused and have_split:
            self.problems.append(f"ambiguous tensors {fused_name} and {have_split[0]}: both name "
                                 f"the same parameter")
            return None
        if have_fused:
            infos = (self.tensors[fused_name],)
            return infos if self._check(infos[0], (2 * kd + vd, 1, k)) else None
        missing = [n for n in split_names if n not in self.tensors]
        also = f"; a fused {fused_name} is also accepted" if fused_name else ""
        for name in missing:
            self.problems.append(f"missing tensor {name} (expected in {self.where}{also})")
        if missing:
            return None
        infos = tuple(self.tensors[n] for n in split_names)
        if not self._check_conv_split(infos, cfg):
            return None
        return infos if all(self._check_dtype(i) for i in infos) else None

    def _check_conv_split(self, infos: tuple[AnyTensorInfo, ...], cfg: ModelConfig) -> bool:
        """Whether split q/k/v convs have usable shapes.

        transformers 5.23's ``save_pretrained`` splits the fused conv into three *equal* thirds
        under the q/k/v names (only its concatenation is meaningful when Vd != Kd), while
        checkpoints converted from OLMo-core hold [Kd], [Kd], [Vd] channels; under transformers
        naming any split whose concatenation has the right size is accepted and re-cut at Kd, Kd,
        Vd. OLMo-core's own convs must be exactly [Kd, 1, K], [Kd, 1, K], [Vd, 1, K] (or [C, K]).
        """
        kd, vd, k = cfg.linear_key_dim, cfg.linear_value_dim, cfg.linear_conv_kernel_dim
        if self.naming.exact_conv_split:
            ok = True
            for info, c in zip(infos, (kd, kd, vd)):
                if info.shape not in ((c, 1, k), (c, k)):
                    self.problems.append(
                        f"tensor {info.name} in {info.path} has shape {list(info.shape)}, "
                        f"expected {[c, 1, k]} (or {[c, k]}) from the config")
                    ok = False
            return ok
        total = sum(i.shape[0] for i in infos if len(i.shape) == 3)
        if (any(len(i.shape) != 3 or i.shape[1:] != (1, k) for i in infos)
                or total != 2 * kd + vd):
            got = ", ".join(f"{i.name} {list(i.shape)}" for i in infos)
            self.problems.append(
                f"tensors {got} in {infos[0].path} have the wrong shapes: expected "
                f"{[kd, 1, k]}, {[kd, 1, k]}, {[vd, 1, k]} (or any split of "
                f"{2 * kd + vd} channels) from the config")
            return False
        return True

    def unexpected(self, cfg: ModelConfig) -> None:
        for name, info in self.tensors.items():
            if name in self.used or name.startswith(IGNORED_PREFIXES):
                continue
            if name == self.naming.head_name and cfg.tie_word_embeddings:
                continue  # the tied head reuses the embeddings, as in transformers
            self.problems.append(f"unexpected tensor {name} in {info.path}")


def make_plan(cfg: ModelConfig, files: Files, ckpt: Path | str, naming: Naming) -> Plan:
    """Every parameter of ``HybridLM(cfg)`` resolved to its tensor(s) in ``files`` (named as
    ``naming`` says). Raises CheckpointError listing every missing, unexpected, ambiguous,
    misshapen or non-float tensor."""
    planner = _Planner(files, naming)
    global_choices = [c for w in naming.global_wants(cfg) if (c := planner.pick("", w, w.target))]

    layers: dict[int, list[Choice]] = {}
    wants = naming.layer_wants(cfg)
    for layer, kind in enumerate(cfg.layer_types):
        prefix = naming.layer_prefix(layer)
        choices = [c for w in wants[kind] if (c := planner.pick(prefix, w, w.target))]
        if kind == GDN:
            choices += planner.pick_convs(prefix, cfg, ())
        layers[layer] = choices
    planner.unexpected(cfg)
    raise_if(planner.problems, f"{ckpt}: checkpoint does not match its config "
                               f"(read with {naming.description})")
    return Plan(global_choices, layers)


def detect(files: Files, ckpt: Path | str) -> Naming:
    """The naming ``files``' tensors use; CheckpointError naming ``ckpt`` if none or several."""
    try:
        naming = detect_naming(files.tensors)
    except NamingError as e:
        raise CheckpointError(f"{ckpt}: {e}") from None
    log.info("%s: %s", ckpt, naming.description)
    return naming


def tensor_dtype(files: Files, naming: Naming) -> str:
    """The checkpoint's dtype from its tensors: the embeddings', else the most common float."""
    embed = files.tensors.get(naming.embed_name)
    if embed is not None and embed.dtype in FLOAT_DTYPES:
        code = embed.dtype
    else:
        counts: dict[str, int] = {}
        for info in files.tensors.values():
            if info.dtype in FLOAT_DTYPES:
                counts[info.dtype] = counts.get(info.dtype, 0) + 1
        code = max(counts, key=counts.get) if counts else "F32"
    return dtype_name(DTYPES[code]) if code in ("F32", "F16", "BF16") else "float32"
