"""Structure analysis shared by every face: dim sizes and variable ordinals, computed one way.

The planner, plate unrolling, :func:`plated.einsum` and the Pyro front end all need the same two
facts about a set of named factors, and they get them here:

* :func:`dim_sizes`: the size of every dim name, with one error (and one wording) when two factors
  disagree, or a factor disagrees with its plate;
* :func:`variable_ordinals`: a variable's *ordinal*, the set of plates it lives in: the
  intersection of the plates of the factors that mention it, as in
  :func:`pyro.ops.contract.einsum`. Inside sequential plate ``t`` a previous-value dim refers to
  the chain variable one step back, so a factor inside ``t`` does not put that dim in ``t``.

:mod:`plated.naive` keeps its own copy on purpose: it is the independent twin.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from ..errors import GraphError
from ..factor import Plate

__all__ = ["dim_sizes", "variable_ordinals", "plate_str"]


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


def plate_str(plates: Iterable[str]) -> str:
    """A set of plates as error messages print it: ``{a, b}``, sorted."""
    return "{" + ", ".join(sorted(plates)) + "}"
