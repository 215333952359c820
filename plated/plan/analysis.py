"""Structure analysis shared by every face: dim sizes and variable ordinals, computed one way.

The planner, plate unrolling, :func:`plated.einsum` and the Pyro front end all need the same two
facts about a set of named factors, and they get them here:

* :func:`dim_sizes`: the size of every dim name, with one error (and one wording) when two factors
  disagree, or a factor disagrees with its plate;
* :func:`variable_ordinals`: a variable's *ordinal*, the set of plates it lives in: the
  intersection of the plates of the factors that mention it, as in
  :func:`pyro.ops.contract.einsum`. Inside sequential plate ``t`` a previous-value dim refers to
  the chain variable one step back, so a factor inside ``t`` does not put that dim in ``t``.

On top of these, :func:`analyse` checks a whole :class:`~plated.plan.ir.Structure` once and
returns its :class:`Analysis` (sizes, ordinals, canonical order, chains) for the planner, and
:func:`connected_components` is the one union-find of the planner and the Pyro ELBO.

:mod:`plated.naive` keeps its own copy on purpose: it is the independent twin.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..errors import GraphError
from ..factor import Plate
from .ir import Structure

__all__ = ["Analysis", "analyse", "dim_sizes", "variable_ordinals", "connected_components",
           "plate_str"]


def dim_sizes(
    inputs: Iterable[tuple[Sequence[str], Sequence[int], str]],
    plate_sizes: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """The size of every dim of ``inputs``, checked for agreement.

    :param inputs: per factor, its dim names, its shape and its label for error messages.
    :param plate_sizes: declared plate sizes, which a factor's plate dims must equal.
    :return: each dim's size, plates included, in order of first appearance.
    :raises GraphError: naming the dim and both factors when two factors give a dim two sizes, or
        the factor and the plate when a plate dim's size is not the plate's.
    """
    plate_sizes = plate_sizes or {}
    sizes: dict[str, int] = {}
    where: dict[str, str] = {}
    for dims, shape, label in inputs:
        for d, n in zip(dims, shape, strict=True):
            n = int(n)
            if d in plate_sizes and n != plate_sizes[d]:
                raise GraphError(
                    f"factor {label} has size {n} along plate {d!r}, but the plate has size "
                    f"{plate_sizes[d]}; expand or slice the factor to the plate's size"
                )
            old = sizes.setdefault(d, n)
            if old != n:
                raise GraphError(
                    f"dim {d!r} has two sizes: {old} in factor {where[d]} and {n} in factor "
                    f"{label}; every factor must agree on a dim's size"
                )
            where.setdefault(d, label)
    return sizes


def variable_ordinals(
    factor_dims: Iterable[Sequence[str]], plates: Sequence[Plate]
) -> dict[str, frozenset[str]]:
    """Each variable's plates: the intersection of the plates of the factors that mention it.

    A previous-value dim of sequential plate ``t`` (``prev`` in :class:`~plated.factor.Plate`)
    does not take ``t`` from the factors inside ``t`` that mention it: there it stands for the
    chain variable at the previous element.

    :param factor_dims: per factor, its dim names (plates and variables).
    :param plates: the declared plates.
    :return: for every non-plate dim, its ordinal.
    """
    names = {p.name for p in plates}
    prev_plate = {q: p.name for p in plates for _, q in p.prev}
    ordinals: dict[str, frozenset[str]] = {}
    for dims in factor_dims:
        factor_plates = frozenset(d for d in dims if d in names)
        for d in dims:
            if d in names:
                continue
            context = factor_plates - {prev_plate[d]} if d in prev_plate else factor_plates
            ordinals[d] = ordinals[d] & context if d in ordinals else context
    return ordinals


def connected_components(scopes: Sequence[Iterable[str]], joining: set[str] | frozenset[str]
                         ) -> list[list[int]]:
    """Group items that share a name of ``joining``, transitively (union-find).

    :param scopes: per item, its names (a factor's dims, say).
    :param joining: the names that connect items (the variables to be summed out, say).
    :return: the items' indices, grouped; groups in order of their first item, items in order.
    """
    parent = list(range(len(scopes)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, names in enumerate(scopes):
        for name in names:
            if name in joining:
                parent[find(i)] = find(owner.setdefault(name, i))
    groups: dict[int, list[int]] = {}
    for i in range(len(scopes)):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def plate_str(plates: Iterable[str]) -> str:
    """A set of plates as error messages print it: ``{a, b}``, sorted."""
    return "{" + ", ".join(sorted(plates)) + "}"


@dataclass(frozen=True)
class Analysis:
    """The facts about a :class:`~plated.plan.ir.Structure` that planning needs, checked.

    :ivar plates: the declared plates by name.
    :ivar var_sizes: the domain size of every variable (a chain's previous-value dim included).
    :ivar ordinals: the plates of every variable (a chain variable's ordinal includes its plate;
        its previous-value dim's does not).
    :ivar sizes: the size of every dim name, plates and variables.
    :ivar order: the canonical position of every dim name: plates in declaration order, then
        variables in order of first appearance, then chain names no factor mentions.
    :ivar chain_vars: per sequential plate, its chain variables.
    :ivar chain_prevs: per sequential plate, their previous-value dims (same order).
    :ivar prev_plate: for each previous-value dim, its sequential plate.
    :ivar prev_curr: for each previous-value dim, its chain variable.
    """

    plates: dict[str, Plate]
    var_sizes: dict[str, int]
    ordinals: dict[str, frozenset[str]]
    sizes: dict[str, int]
    order: dict[str, int]
    chain_vars: dict[str, tuple[str, ...]]
    chain_prevs: dict[str, tuple[str, ...]]
    prev_plate: dict[str, str]
    prev_curr: dict[str, str]

    def canon(self, dims: Iterable[str]) -> tuple[str, ...]:
        """``dims`` in canonical order."""
        return tuple(sorted(dims, key=self.order.__getitem__))

    def effective_ordinal(self, var: str, where: frozenset[str]) -> frozenset[str]:
        """The plates ``var`` varies along inside plates ``where``: a previous-value dim inside
        its sequential plate refers to the chain variable one step back, so it has that one's
        plates."""
        plate = self.prev_plate.get(var)
        if plate is not None and plate in where:
            return self.ordinals[self.prev_curr[var]]
        return self.ordinals[var]


def analyse(structure: Structure) -> Analysis:
    """Check ``structure`` and compute its :class:`Analysis`.

    :raises GraphError: naming the plate, dim, variable or factor at fault: a plate declared twice,
        a dim with two sizes, a chain name that is a plate or belongs to two chains, a chain
        variable no factor mentions or used outside its plate, a previous-value dim of the wrong
        size or without its variable's plates, or a kept variable or plate that cannot be kept.
    """
    plates = {p.name: p for p in structure.plates}
    if len(plates) != len(structure.plates):
        names = [p.name for p in structure.plates]
        dup = sorted({n for n in names if names.count(n) > 1})
        raise GraphError(f"plate {dup[0]!r} is declared twice; give each plate one name")
    sizes = dim_sizes(((dims, shape, label) for (dims, shape), label
                       in zip(structure.inputs, structure.labels, strict=True)),
                      {name: p.size for name, p in plates.items()})
    var_sizes = {d: n for d, n in sizes.items() if d not in plates}

    chain_plate: dict[str, str] = {}  # curr -> plate
    prev_plate: dict[str, str] = {}  # prev -> plate
    for p in structure.plates:
        for curr, prev in p.prev:
            for name, role in ((curr, "chain variable"), (prev, "previous-value dim")):
                if name in plates:
                    raise GraphError(
                        f"sequential plate {p.name!r} uses plate {name!r} as its {role}; "
                        "chain names must be variables"
                    )
                if name in chain_plate or name in prev_plate:
                    raise GraphError(
                        f"variable {name!r} belongs to the chains of two sequential plates"
                    )
            if curr not in var_sizes:
                raise GraphError(
                    f"sequential plate {p.name!r} names chain variable {curr!r}, which no factor "
                    "mentions; check the spelling or add a factor over it"
                )
            if prev in var_sizes and var_sizes[prev] != var_sizes[curr]:
                raise GraphError(
                    f"chain variable {curr!r} has size {var_sizes[curr]} but its previous-value "
                    f"dim {prev!r} has size {var_sizes[prev]}; they must match"
                )
            chain_plate[curr] = p.name
            prev_plate[prev] = p.name
            var_sizes.setdefault(prev, var_sizes[curr])

    ordinals = variable_ordinals((dims for dims, _ in structure.inputs), structure.plates)
    for curr, plate in chain_plate.items():
        prev = dict(plates[plate].prev)[curr]
        if plate not in ordinals[curr]:
            bad = [lab for (dims, _), lab in zip(structure.inputs, structure.labels, strict=True)
                   if curr in dims and plate not in dims]
            raise GraphError(
                f"chain variable {curr!r} of sequential plate {plate!r} appears in factor "
                f"{bad[0]} outside the plate; every factor over a chain variable must include "
                f"dim {plate!r} (use {prev!r} outside the plate for the initial state)"
            )
        for (dims, _), lab in zip(structure.inputs, structure.labels, strict=True):
            if prev in dims and plate in dims:
                missing = ordinals[curr] - set(dims)
                if missing:
                    raise GraphError(
                        f"factor {lab} uses {prev!r} (the previous value of {curr!r}) but lacks "
                        f"plates {sorted(missing)} of {curr!r}; add those plate dims"
                    )
        if prev not in ordinals:
            ordinals[prev] = ordinals[curr] - {plate}
    for v in structure.keep_vars:
        if v not in var_sizes:
            raise GraphError(f"kept variable {v!r} is unknown; it appears in no factor")
        if v in chain_plate or v in prev_plate:
            raise GraphError(f"kept variable {v!r} belongs to a chain; chains cannot be kept")
    for kept in structure.keep_plates:
        if kept not in plates:
            what = "a variable" if kept in var_sizes else "unknown"
            raise GraphError(f"kept plate {kept!r} is {what}, not a declared plate")
        if plates[kept].sequential:
            raise GraphError(f"plate {kept!r} is sequential and cannot be kept in the result")
        for (dims, _), lab in zip(structure.inputs, structure.labels, strict=True):
            if kept not in dims:
                raise GraphError(
                    f"plate {kept!r} is kept in the result but factor {lab} is not in it; a kept "
                    "plate must contain every factor"
                )



    order: dict[str, int] = {}
    for p in structure.plates:
        order[p.name] = len(order)
    for dims, _ in structure.inputs:
        for d in dims:
            order.setdefault(d, len(order))
    for p in structure.plates:
        for curr, prev in p.prev:
            order.setdefault(curr, len(order))
            order.setdefault(prev, len(order))
    sequential = [p for p in structure.plates if p.sequential]
    return Analysis(
        plates=plates,
        var_sizes=var_sizes,
        ordinals=ordinals,
        sizes={**{p.name: p.size for p in structure.plates}, **var_sizes},
        order=order,
        chain_vars={p.name: tuple(curr for curr, _ in p.prev) for p in sequential},
        chain_prevs={p.name: tuple(prev for _, prev in p.prev) for p in sequential},
        prev_plate=prev_plate,
        prev_curr={prev: curr for p in sequential for curr, prev in p.prev},
    )
