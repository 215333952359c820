"""Chains: recognising a chain of variables in a contraction, and laying out a sequential scan.

Both are eliminated by the same log-depth parallel scan (:mod:`plated.markov`); these functions
only compute layouts, from slots and sizes, and emit nothing.

* :func:`find_chain`: among the inputs of one contraction, a path ``v_0 - v_1 - ... - v_n`` of
  equal-sized eliminated variables with only edge, unary and constant factors (an HMM unrolled
  into one einsum, say);
* :func:`scan_layout`: a sequential plate's transition tensor laid out as
  ``(batch, length, state, state)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..typing import ChainRole
from .analysis import Analysis
from .ir import ChainLayout, ChainPart, ScanLayout, Slot

__all__ = ["CHAIN_MIN_LENGTH", "find_chain", "scan_layout"]

#: Contractions that eliminate a chain of at least this many equal-sized variables (an unrolled
#: HMM, say) run as one parallel scan instead of pairwise steps. Set to a huge value to disable.
CHAIN_MIN_LENGTH = 8


def find_chain(slots: Sequence[Slot], ins: Sequence[int], elim: set[str],
               out_dims: tuple[str, ...], analysis: Analysis) -> ChainLayout | None:
    """The chain layout of the contraction of ``ins`` eliminating ``elim``, or ``None``.

    Applies when at least :data:`CHAIN_MIN_LENGTH` variables are eliminated, all of one size,
    and every input is an edge between consecutive variables of one path through all of them, a
    unary factor of one of them, or a constant (no eliminated variable). The kept dims
    ``out_dims`` are the batch of the scan.
    """
    if len(elim) < CHAIN_MIN_LENGTH:
        return None
    sizes = {analysis.sizes[v] for v in elim}
    if len(sizes) != 1:
        return None
    (state,) = sizes
    # each input's eliminated variables: at most two, joined as an edge
    scopes = [tuple(d for d in slots[i].dims if d in elim) for i in ins]
    if any(len(scope) > 2 for scope in scopes):
        return None
    neighbours: dict[str, set[str]] = {v: set() for v in elim}
    for scope in scopes:
        if len(scope) == 2:
            neighbours[scope[0]].add(scope[1])
            neighbours[scope[1]].add(scope[0])
    ends = [v for v, n in neighbours.items() if len(n) == 1]
    if any(len(n) > 2 or not n for n in neighbours.values()) or len(ends) != 2:
        return None
    # walk the path from its canonically first end
    path = [min(ends, key=analysis.order.__getitem__)]
    while len(path) < len(elim):
        following = neighbours[path[-1]] - ({path[-2]} if len(path) > 1 else set())
        if len(following) != 1:
            return None
        path.append(following.pop())
    position = {v: step for step, v in enumerate(path)}
    # lay out every input along (*batch, chain dims)
    parts = []
    for i, scope in zip(ins, scopes, strict=True):
        dims = slots[i].dims
        batch_present = [d for d in out_dims if d in dims]
        batch_view = [analysis.sizes[d] if d in dims else 1 for d in out_dims]
        role: ChainRole
        if len(scope) == 2:
            first, second = sorted(scope, key=position.__getitem__)
            if position[second] != position[first] + 1:
                return None  # pragma: no cover - a path's edges join neighbours
            role, step, tail = "edge", position[first], [first, second]
            view = (*batch_view, state, state)
        elif len(scope) == 1:
            (var,) = scope
            if position[var] == 0:
                role, step, tail, view = "start", 0, [var], (*batch_view, state)
            else:
                role, step, tail, view = "next", position[var] - 1, [var], (*batch_view, 1, state)
        else:
            role, step, tail, view = "const", 0, [], tuple(batch_view)
        perm = tuple(dims.index(d) for d in batch_present + tail)
        parts.append(ChainPart(role, step, perm, tuple(view)))
    return ChainLayout(tuple(path), state, out_dims, tuple(analysis.sizes[d] for d in out_dims),
                       tuple(parts), tuple(range(len(out_dims))))


def scan_layout(source: Slot, plate: str, leaf: frozenset[str], outer: set[str],
                analysis: Analysis) -> tuple[ScanLayout, tuple[str, ...]]:
    """The layout of the scan along sequential ``plate`` of the transition slot ``source``.

    :param leaf: the plates of the chain variables (``plate`` among them).
    :param outer: the variables of ``source`` other than the chain's, constant along ``plate``.
    :return: the layout and the dims of the scan's result (canonical order): the remaining
        plates, the outer variables and the previous-value dims the transition mentions.
    """
    curr = analysis.chain_vars[plate]
    prev = analysis.chain_prevs[plate]
    sizes = analysis.sizes
    plates_after = analysis.canon(leaf - {plate})
    outer_dims = analysis.canon(outer)
    target = list(plates_after) + list(outer_dims) + [plate] + list(prev) + list(curr)
    present = [d for d in target if d in source.dims]
    present_prev = tuple(q for q in prev if q in source.dims)
    out_batch = list(plates_after) + list(outer_dims) + list(present_prev)
    out_dims = analysis.canon(out_batch)
    layout = ScanLayout(
        plate=plate, curr=curr, prev=prev, present_prev=present_prev,
        in_perm=tuple(source.dims.index(d) for d in present),
        in_view=tuple(sizes[d] if d in source.dims else 1 for d in target),
        in_full=tuple(sizes[d] for d in target),
        batch_shape=tuple(sizes[d] for d in list(plates_after) + list(outer_dims)),
        length=sizes[plate], state=math.prod(sizes[c] for c in curr),
        prev_sizes=tuple(sizes[q] for q in prev), curr_sizes=tuple(sizes[c] for c in curr),
        out_batch_dims=tuple(out_batch), out_perm=tuple(out_batch.index(d) for d in out_dims),
        plates_before=analysis.canon(leaf), plates_after=plates_after)
    return layout, out_dims
