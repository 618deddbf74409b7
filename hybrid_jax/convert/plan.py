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

from hybrid_jax.config import GDN, MOE, ModelConfig, dtype_name
from hybrid_jax.convert import qwen_names
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
def _swap_last(index: Spans) -> Spans:
    return index[:-2] + (index[-1], index[-2])


def direct_reader(info: AnyTensorInfo, transposed: bool) -> BoxReader:
    """Box of our parameter -> the same elements of a tensor ours is (the transpose of, on the
    last two axes)."""
    if transposed:  # ours [..., in, out] = torch [..., out, in] transposed
        return lambda index: np.swapaxes(read_slice(info, _swap_last(index)), -1, -2)
    return lambda index: read_slice(info, index)


def rows_reader(info: AnyTensorInfo, rows: np.ndarray, transposed: bool) -> BoxReader:
    """Box of our parameter -> its elements in the 2-D tensor ``info``, of which ours holds
    ``rows`` (in that order; transposed: ours [in, len(rows)]), read in runs of consecutive
    rows."""
    def read(index: Spans) -> np.ndarray:
        (a, b), cols = _swap_last(index) if transposed else index
        wanted = rows[a:b]
        breaks = np.flatnonzero(np.diff(wanted) != 1) + 1
        runs = np.split(wanted, breaks) if wanted.size else []
        parts = [read_slice(info, ((int(r[0]), int(r[-1]) + 1), cols)) for r in runs]
        box = (np.concatenate(parts) if parts
               else np.zeros((0, cols[1] - cols[0]), DTYPES[info.dtype]))
        return box.T if transposed else box
    return read


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


def expert_columns_reader(parts: list[list[AnyTensorInfo]]) -> BoxReader:
    """Box [experts, in, out] of stacked expert kernels whose out columns are the rows of
    ``parts[0][e]``, then of ``parts[1][e]``, ... (per-expert torch weights [out_p, in])."""
    def read(index: Spans) -> np.ndarray:
        (e0, e1), (i0, i1), (c0, c1) = index
        out = []
        for e in range(e0, e1):
            pieces, offset = [], 0
            for infos in parts:
                rows = infos[e].shape[0]
                a, b = max(c0, offset), min(c1, offset + rows)
                if a < b:
                    pieces.append(read_slice(infos[e], ((a - offset, b - offset), (i0, i1))).T)
                offset += rows
            out.append(np.concatenate(pieces, axis=1) if pieces else
                       np.zeros((i1 - i0, 0), DTYPES[parts[0][e].dtype]))
        return np.stack(out) if out else np.zeros((0, i1 - i0, c1 - c0), np.float32)
    return read


# ----------------------------------------------------------------------------- planning
class _Planner:
    """Resolves every parameter to a checkpoint tensor, collecting all problems."""

    def __init__(self, files: Files, naming: Naming) -> None:
        self.tensors = files.tensors
        self.where = files.where
        self.naming = naming
        self.used: set[str] = set()
        self.misshapen: set[str] = set()
        self.problems: list[str] = []

    def _check_dtype(self, info: AnyTensorInfo) -> bool:
        if info.dtype not in FLOAT_DTYPES:
            self.problems.append(f"tensor {info.name} in {info.path} has dtype {info.dtype}, "
                                 f"expected a floating-point dtype")
            return False
        return True

    def _check(self, info: AnyTensorInfo, shape: tuple[int, ...]) -> bool:
        if info.shape != shape:
            if info.name in self.misshapen:  # a fused tensor several parameters share
                return False
            self.misshapen.add(info.name)
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
        if want.rows is not None:
            reader = rows_reader(info, np.asarray(want.rows), want.transposed)
        else:
            reader = direct_reader(info, want.transposed)
        return Choice(target, (info,), want.transposed, reader)

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
        if not split_names:  # only the fused conv is named
            self.problems.append(f"missing tensor {fused_name} (expected in {self.where})")
            return None
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

    def pick_experts(self, prefix: str, cfg: ModelConfig) -> list[Choice]:
        """An MoE layer's experts, fused ([E, 2I, D] and [E, D, I]) or one tensor per expert
        and projection, read as our [E, D, 2I] and [E, I, D]."""
        e, d, f = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        fused = {t: prefix + n for t, n in qwen_names.FUSED_EXPERTS.items()}
        if any(n in self.tensors for n in fused.values()):
            shapes = {("mlp", "experts_gate_up"): (e, 2 * f, d), ("mlp", "experts_down"): (e, d, f)}
            return [c for t, n in fused.items()
                    if (c := self.pick(prefix, Want(t, (n[len(prefix):],), shapes[t], True), t))]
        names = [{p: prefix + n for p, n in qwen_names.expert_names(i).items()} for i in range(e)]
        shapes = {"gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}
        infos: dict[str, list] = {p: [] for p in shapes}
        for per_expert in names:
            for p, name in per_expert.items():
                self.used.add(name)
                if name not in self.tensors:
                    self.problems.append(f"missing tensor {name} (expected in {self.where}; a "
                                         f"fused {fused[('mlp', 'experts_gate_up')]} is also "
                                         f"accepted)")
                elif self._check(self.tensors[name], shapes[p]):
                    infos[p].append(self.tensors[name])
        if any(len(v) != e for v in infos.values()):
            return []
        gate_up = expert_columns_reader([infos["gate_proj"], infos["up_proj"]])
        down = expert_columns_reader([infos["down_proj"]])
        return [Choice(("mlp", "experts_gate_up"), tuple(infos["gate_proj"] + infos["up_proj"]),
                       True, gate_up),
                Choice(("mlp", "experts_down"), tuple(infos["down_proj"]), True, down)]

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
    for layer, (kind, mlp) in enumerate(zip(cfg.layer_types, cfg.mlp_kinds)):
        prefix = naming.layer_prefix(layer)
        wants = naming.layer_wants(cfg, kind, mlp)
        choices = [c for w in wants if (c := planner.pick(prefix, w, w.target))]
        if kind == GDN:
            choices += planner.pick_convs(prefix, cfg, ())
        if mlp == MOE:
            choices += planner.pick_experts(prefix, cfg)
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
