"""The bytes a compiled program's collectives move per call, read from its HLO text.

Each collective counts its result's bytes (per device: an all-gather's whole result, a
collective-permute's one buffer), times the trip count of every loop around it (the layer
scan's body runs once per block of layers): XLA's ``known_trip_count`` or the constant the
loop's condition compares against; a loop whose bound is known only at run time counts once,
so the totals are lower bounds where collectives sit inside such a loop.
Collectives over groups of one device move nothing and are left out. The result's size is a
proxy for the traffic: an all-gather receives (P - 1) / P of it, a ring all-reduce sends
about twice it.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all")
_OP = re.compile(r"= (.+?) (" + "|".join(KINDS) + r")(?:-start)?\(")
_ARRAY = re.compile(r"\b(pred|[a-z]+)(\d*)\[([\d,]*)\]")
_ONE_DEVICE_GROUPS = re.compile(r"replica_groups=\{\{\d+\}(?:,\{\d+\})*\}")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) ")
_WHILE = re.compile(r"while\(.*?condition=%?([\w.\-]+), body=%?([\w.\-]+)")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CONSTANT = re.compile(r"%([\w.\-]+) = s32\[\]\S* constant\((\d+)\)")
_LESS_THAN = re.compile(r"compare\(%([\w.\-]+), %([\w.\-]+)\), direction=LT")
_CALLS = re.compile(r"(?:to_apply|calls|body|condition|branch_computations)=\{?%?([\w.\-]+)")


def _bytes(shapes: str) -> int:
    total = 0
    for kind, bits, dims in _ARRAY.findall(shapes):
        width = 1 if kind == "pred" else int(bits or 8) // 8
        total += math.prod(int(d) for d in dims.split(",") if d) * width
    return total


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    """The program's computations, name -> body lines, and the entry computation's name."""
    bodies: dict[str, list[str]] = {}
    entry, current = "", None
    for line in hlo.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            found = _COMPUTATION.match(line)
            current = found.group(1) if found else None
            if current is not None:
                bodies[current] = []
                if line.startswith("ENTRY"):
                    entry = current
        elif current is not None:
            bodies[current].append(line)
    return bodies, entry


def _trips(line: str, loop: re.Match, bodies: dict[str, list[str]]) -> int:
    """A while loop's trip count: XLA's ``known_trip_count`` where it writes one (XLA:CPU),
    else the constant its condition compares the counter against (XLA TPU: ``i < N``), else
    1 (a bound only known at run time, such as a causal block loop's)."""
    known = _TRIPS.search(line)
    if known:
        return int(known.group(1))
    condition = "\n".join(bodies.get(loop.group(1), ()))
    constants = dict(_CONSTANT.findall(condition))
    compare = _LESS_THAN.search(condition)
    if compare is None:
        return 1
    bound = constants.get(compare.group(2)) or constants.get(compare.group(1))
    return int(bound) if bound is not None else 1


def _runs(bodies: dict[str, list[str]], entry: str) -> dict[str, int]:
    """How many times each computation runs per call: loop bodies their trip count times
    their caller's runs."""
    runs: dict[str, int] = defaultdict(int)

    def visit(name: str, times: int) -> None:
        runs[name] += times
        for line in bodies.get(name, ()):
            loop = _WHILE.search(line)
            for callee in _CALLS.findall(line):
                if callee not in bodies:
                    continue
                body = loop is not None and callee == loop.group(2)
                visit(callee, times * (_trips(line, loop, bodies) if body else 1))

    visit(entry, 1)
    return runs


def collective_bytes(hlo: str) -> dict[str, int]:
    """Bytes per call by collective kind (``KINDS``) of the compiled program's text."""
    bodies, entry = _computations(hlo)
    totals = dict.fromkeys(KINDS, 0)
    for name, times in _runs(bodies, entry).items():
        for line in bodies[name]:
            found = _OP.search(line)
            if found and not _ONE_DEVICE_GROUPS.search(line):
                shapes = found.group(1)
                if "-start(" in line and shapes.startswith("("):
                    # An async start's result is (operands, results[, u32[] contexts]): count
                    # the results.
                    arrays = [a for a in _ARRAY.findall(shapes) if a[2]]
                    shapes = "".join(f"{k}{b}[{d}]" for k, b, d in arrays[len(arrays) // 2:])
                totals[found.group(2)] += times * _bytes(shapes)
    return totals
