"""Unrolling plates: an exact way out of intractability for small plates.

Unrolling plate ``u`` of size ``n`` replaces each variable ``v`` inside ``u`` by ``n`` distinct
variables ``"v[0]" .. "v[n-1]"`` and each factor inside ``u`` by ``n`` factors (views of its
slices). For a sequential plate, the previous-value dim of chain variable ``c`` becomes ``"c[i-1]"``
in slice ``i`` (and keeps its own name in slice 0). The result has the same joint density without
the plate, so a graph that was intractable only because of ``u`` becomes tractable, at a cost
exponential in ``n`` in the worst case.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import GraphError
from .factor import Factor, Plate
from .plan.analysis import variable_ordinals

__all__ = ["unroll_plates"]


def unroll_plates(
    factors: Sequence[Factor], plates: Sequence[Plate], names: tuple[str, ...]
) -> tuple[list[Factor], list[Plate]]:
    """Unroll the plates ``names`` (see the module docstring); returns new factors and plates.

    :raises GraphError: if a name is not a declared plate.
    """
    factors = list(factors)
    plates = list(plates)
    for u in names:
        plate = next((p for p in plates if p.name == u), None)
        if plate is None:
            raise GraphError(f"cannot unroll {u!r}: it is not a declared plate")
        ords = variable_ordinals((f.dims for f in factors), plates)
        prev_to_curr = {q: c for c, q in plate.prev}
        inside = {v for v, o in ords.items() if u in o}
        new: list[Factor] = []
        for f in factors:
            if u not in f.dims:
                new.append(f)
                continue
            axis = f.dims.index(u)
            for i in range(plate.size):
                dims = []
                for d in f.dims:
                    if d == u:
                        continue
                    if d in prev_to_curr:
                        dims.append(d if i == 0 else f"{prev_to_curr[d]}[{i - 1}]")
                    elif d in inside:
                        dims.append(f"{d}[{i}]")
                    else:
                        dims.append(d)
                new.append(Factor(f.tensor.select(axis, i), tuple(dims), name=f"{f.label}[{i}]"))
        factors = new
        kept: list[Plate] = []
        for p in plates:
            if p.name == u:
                continue
            if p.sequential and any(c in inside for c, _ in p.prev):
                pairs = []
                for c, q in p.prev:
                    if c not in inside:
                        pairs.append((c, q))
                    elif q in inside or q not in ords:
                        pairs += [(f"{c}[{i}]", f"{q}[{i}]") for i in range(plate.size)]
                    else:
                        raise GraphError(
                            f"cannot unroll plate {u!r}: chain variable {c!r} of sequential plate "
                            f"{p.name!r} varies along {u!r} but its initial state {q!r} does "
                            f"not; put every factor over {q!r} inside {u!r} first"
                        )
                p = Plate(p.name, p.size, sequential=True, prev=pairs)
            kept.append(p)
        plates = kept
    return factors, plates
