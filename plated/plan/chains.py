"""Chains: recognising a chain of variables in a contraction, laying out a sequential scan, and
choosing how to eliminate a chain.

Both kinds of chain are eliminated by one of three methods (:data:`~plated.typing.ChainMethod`):
the sequential forward-backward recursion (:mod:`plated.recursion`), the same recursion in
blocks run side by side (:func:`plated.recursion.blocked_chain_messages`, the log ring), or the
log-depth parallel scan (:mod:`plated.markov`). :func:`chain_method` chooses by a cost model of
the time each takes on the factors' device (:data:`DEVICE_SPEEDS`), among those that fit the
memory cap. These
functions only compute layouts and costs, from slots and sizes, and emit nothing.

* :func:`find_chain`: among the inputs of one contraction, a path ``v_0 - v_1 - ... - v_n`` of
  equal-sized eliminated variables with only edge, unary and constant factors (an HMM unrolled
  into one einsum, say);
* :func:`scan_layout`: a sequential plate's transition tensor laid out as
  ``(batch, length, state, state)``;
* :func:`chain_method`: the method, its predicted cost, and the predicted time of each method.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ..recursion import block_length
from ..typing import ChainMethod, ChainRole
from .analysis import Analysis
from .cost import CAP_MARGIN
from .ir import ChainLayout, ChainPart, ScanLayout, Slot

__all__ = ["CHAIN_MIN_LENGTH", "DEVICE_SPEEDS", "DeviceSpeed", "find_chain", "scan_layout",
           "scan_cost", "recursion_cost", "blocked_cost", "chain_times", "chain_method",
           "chain_need", "forced_chain_method", "forced_method", "describe_times"]

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
        plates_before=analysis.canon(leaf), plates_after=plates_after,
        in_present=tuple(d in source.dims for d in target))
    return layout, out_dims


# ----------------------------------------------------------------------------------------------
# how to eliminate a chain


def scan_cost(ring: str, batch: int, length: int, state: int, stacked: bool = False
              ) -> dict[str, int]:
    """Predicted cost of a parallel scan over ``length`` ``(state, state)`` matrices per batch
    element (a sequential plate's chain, or a chain of variables), as measured on this
    implementation (``benchmarks/cost_accuracy.py``): the levels of the product tree hold about
    twice the first level; the log ring's products add shifted exponentials and their product,
    the max ring's materialise the ``(state, state, state)`` broadcast of each product. Its
    backward choice indexes the levels per sample. A chain of variables (``stacked``) first
    stacks its factors into the first level, whose gradient is split back among them."""
    n = batch * length * state * state
    vectors = batch * length * state
    if ring == "max":
        temp = n * state // 2 + 2 * n
        flops = 7 * n * state // 4 + 4 * n
    else:
        temp = (3 if stacked else 2) * n + n // 5
        flops = 2 * n * state + 20 * n
    return {"flops": flops, "backward_flops": flops, "temp_numel": temp,
            "saved_numel": n, "backward_numel": (4 if stacked else 2) * n, "kept_numel": 2 * n,
            "choose_numel": 2 * vectors, "choose_flops": 2 * vectors}


def recursion_cost(ring: str, batch: int, length: int, state: int, stacked: bool = False,
                   copied: bool = False) -> dict[str, int]:
    """Predicted cost of the sequential recursion (:mod:`plated.recursion`) over ``length``
    ``(state, state)`` matrices per batch element, the fields of :func:`scan_cost`.

    The log ring exponentiates each matrix in its turn: into one scratch matrix a batch without
    a gradient, or, with one, into a chain-sized set of exponentials that it keeps (with the
    ``(batch, length + 1, state)`` messages and the shifted sums) and that its gradient turns
    into the gradient in place. The max ring's recursion keeps its messages and back-pointers,
    and its gradient (autograd's) scatters into one chain-sized tensor. A chain of variables'
    steps are taken as they are (``stacked`` is for :func:`scan_cost`'s signature; the
    recursion stacks nothing); ``copied``: laying out a sequential plate's transitions copies
    them.
    """
    del stacked  # the recursion takes a chain of variables' steps without stacking them
    n = batch * length * state * state
    vectors = batch * (length + 1) * state
    layout = n if copied else 0
    if ring == "max":
        temp = 2 * batch * state * state + 3 * vectors
        flops = 2 * n
        saved = 2 * vectors
        backward = n + 2 * vectors
    else:
        temp = batch * state * state + 3 * vectors
        flops = 2 * n + 4 * n
        saved = n + 2 * vectors + batch * length
        backward = 2 * vectors
    return {"flops": flops, "backward_flops": 3 * n, "temp_numel": temp + layout,
            "saved_numel": saved + layout, "backward_numel": backward,
            "kept_numel": 2 * vectors + layout,
            "choose_numel": 3 * batch * state + batch * (length + 1),
            "choose_flops": 4 * batch * length * state}


def blocked_cost(ring: str, batch: int, length: int, state: int, stacked: bool = False,
                 copied: bool = False) -> dict[str, int]:
    """Predicted cost of the blocked recursion (:class:`plated.recursion._BlockedChain`, the log
    ring) over ``length`` ``(state, state)`` matrices per batch element, in blocks of
    :func:`~plated.recursion.block_length`, the fields of :func:`scan_cost`: the chain's
    exponentials, rounded up to whole blocks, are kept for the gradient, which is a fresh
    chain-sized tensor; each block's product is ``state`` times a step's work, forward and
    backward. A chain of variables' steps are stacked first (``stacked``)."""
    del ring
    size = block_length(length, state)
    padded = -(-length // size) * size
    n = batch * length * state * state
    e = batch * padded * state * state
    vectors = batch * (padded + 1) * state
    layout = n if copied else 0
    stack = n if stacked else 0
    return {"flops": 2 * e * state + 6 * e, "backward_flops": 2 * e * state + 4 * e,
            "temp_numel": e + 4 * vectors + stack + layout,
            "saved_numel": e + 2 * vectors + stack + layout, "backward_numel": n + vectors,
            "kept_numel": 2 * vectors + layout,
            "choose_numel": 3 * batch * state + batch * (length + 1),
            "choose_flops": 4 * batch * length * state}


@dataclass(frozen=True)
class DeviceSpeed:
    """The speed of a device, as :func:`chain_times` models it.

    :ivar op_s: seconds of one small tensor operation (launch and dispatch).
    :ivar elem_s: seconds per element of an elementwise pass or a reduction.
    :ivar flop_s: seconds per multiply-add of a batched matrix product.
    """

    op_s: float
    elem_s: float
    flop_s: float


#: Measured on a 2-core AMD EPYC (torch 2.13.0+cpu; ``benchmarks/chains.py``) for ``"cpu"``;
#: ``"cuda"`` from the launch latency and bandwidth of a data-centre GPU, where a parallel scan's
#: few wide levels beat many narrow steps. Other device types use the ``"cuda"`` figures.
DEVICE_SPEEDS: dict[str, DeviceSpeed] = {
    "cpu": DeviceSpeed(op_s=6e-6, elem_s=1.5e-9, flop_s=1e-10),
    "cuda": DeviceSpeed(op_s=1.5e-5, elem_s=5e-12, flop_s=5e-14),
}

#: Tensor operations a step (recursion) or a level (scan) launches, forward plus backward, in
#: units of :attr:`DeviceSpeed.op_s`; the recursion's passes over the chain's matrices and over
#: its messages (vectors), in units of :attr:`DeviceSpeed.elem_s` for 4-byte floats (the
#: elementwise and product terms of every method scale with the itemsize). The log ring's
#: recursion and blocked figures were fitted (least squares of the relative error) to
#: ``benchmarks/chains.py``'s ten shapes in float32 and in float64 on the 2-core EPYC, one
#: thread, at commit 1089c18: the recursion's three operations a step forward and two back cost
#: about 8.5 us a step there. On other devices each kernel costs a launch: the log ring's
#: recursion runs five a step on narrow steps and seven on wide ones (which form their gradient
#: in the loop, :data:`plated.recursion._WIDE_STEP_BYTES`); the model counts five (unmeasured:
#: no GPU was lent).
_RECURSION_OPS = {"log": 1.4, "max": 8.0}
_RECURSION_LAUNCHES = {"log": 5, "max": 8}
_RECURSION_PASSES = {"log": 1.1, "max": 20.0}
_RECURSION_VECTOR_PASSES = {"log": 10.0, "max": 0.0}
_SCAN_OPS = {"log": 40, "max": 16}
#: The blocked recursion's operations for each position within a block (forward and backward,
#: all blocks at once) and for each block (one block after another), the operations it adds
#: once a call to the recursion's (its layout, its check), its passes over the chain and over
#: its messages, and the weight of its ``2 n K`` products' multiply-adds, fitted like the
#: recursion's on the float32 shapes (float64's blocked times there were erratic); the
#: products' weight was then lowered by hand from the fit's 0.84, so that the long chains of
#: 16 states (2,000 and 10,000 steps in a plate of 16), where the fit's residuals were largest,
#: come out in their measured order. The model chose the measured fastest method on 8 of the 10
#: float32 shapes and 9 of the 10 float64 ones (the same shapes it was fitted to).
_BLOCKED_POSITION_OPS = 9
_BLOCKED_BLOCK_OPS = 4
_BLOCKED_FIXED_OPS = 30
_BLOCKED_PASSES = 0.8
_BLOCKED_VECTOR_PASSES = 22.0
_BLOCKED_PRODUCTS = 0.35


def chain_times(ring: str, batch: int, length: int, state: int, device: str,
                itemsize: int = 4) -> dict[ChainMethod, float]:
    """Predicted seconds of log Z plus its gradient for each method (see :class:`DeviceSpeed`):
    the recursion launches a few operations per step and passes over the chain and its messages
    a few times; the scan launches more per level, over ``log2(length)`` levels, and multiplies
    matrices (``state`` times the recursion's work; the max ring's products are elementwise);
    the blocked recursion launches a few operations per position within a block and per block,
    and multiplies matrices, forward and backward. Every pass and product costs in proportion
    to ``itemsize`` (float64 moves and multiplies twice float32's bytes). The blocked recursion
    is offered for the log ring in float32 and wider only: its products' rounding would swamp
    its check in a 2-byte float."""
    speed = DEVICE_SPEEDS.get(device, DEVICE_SPEEDS["cuda"])
    wide = itemsize / 4
    n = batch * length * state * state
    vectors = batch * length * state
    levels = max(1, math.ceil(math.log2(max(length, 1)))) + 1
    ops = (_RECURSION_OPS if device == "cpu" else _RECURSION_LAUNCHES)[ring]
    recursion = (length * ops * speed.op_s
                 + wide * (_RECURSION_PASSES[ring] * n + _RECURSION_VECTOR_PASSES[ring] * vectors)
                 * speed.elem_s + wide * 4 * n * speed.flop_s)
    if ring == "max":
        products = 3 * n * state * speed.elem_s
    else:
        products = 3 * n * state * speed.flop_s
    scan = levels * _SCAN_OPS[ring] * speed.op_s + wide * (25 * n * speed.elem_s + products)
    times: dict[ChainMethod, float] = {"recursion": recursion, "scan": scan}
    if ring == "log" and itemsize >= 4 and length > 1:
        size = block_length(length, state)
        blocks = -(-length // size)
        e = batch * blocks * size * state * state
        times["blocked"] = ((size * _BLOCKED_POSITION_OPS + blocks * _BLOCKED_BLOCK_OPS
                             + _BLOCKED_FIXED_OPS) * speed.op_s
                            + wide * (_BLOCKED_PASSES * e + _BLOCKED_VECTOR_PASSES * e // state)
                            * speed.elem_s
                            + wide * _BLOCKED_PRODUCTS * 2 * e * state * speed.flop_s)
    return times


_FORCED: list[ChainMethod] = []


@contextlib.contextmanager
def forced_chain_method(method: ChainMethod) -> Iterator[None]:
    """Plan every chain with ``method`` where it fits the memory cap, instead of the cost model's
    choice, inside the block
    (for tests and benchmarks that compare the methods; the plan cache is cleared on entry and
    on exit, so no plan made inside outlives it)."""
    from .cache import clear_plan_cache

    if method not in ("recursion", "blocked", "scan"):
        raise ValueError(f"unknown chain method {method!r}; use 'recursion', 'blocked' or "
                         "'scan' (the log ring has all three, the max ring no 'blocked')")
    clear_plan_cache()
    _FORCED.append(method)
    try:
        yield
    finally:
        _FORCED.pop()
        clear_plan_cache()


def forced_method() -> ChainMethod | None:
    """The method :func:`forced_chain_method` forces now, if any."""
    return _FORCED[-1] if _FORCED else None


def chain_need(cost: dict[str, int]) -> int:
    """The largest working memory of a chain step, in elements, over its queries."""
    return max(cost["temp_numel"], cost["saved_numel"] + cost["backward_numel"],
               cost["kept_numel"] + cost["choose_numel"])


def chain_method(ring: str, batch: int, length: int, state: int, device: str, itemsize: int,
                 cap: int | None, stacked: bool = False, copied: bool = False
                 ) -> tuple[ChainMethod, dict[str, int], dict[ChainMethod, float]] | None:
    """How to eliminate a chain: the fastest method by :func:`chain_times` among those whose
    working memory fits ``cap`` (with :data:`~plated.plan.cost.CAP_MARGIN`).

    :return: the method, its cost fields, and the predicted time of every method; ``None``
        when none fits the cap.
    """
    costs: dict[ChainMethod, dict[str, int]] = {
        "recursion": recursion_cost(ring, batch, length, state, stacked, copied),
        "scan": scan_cost(ring, batch, length, state, stacked),
    }
    times = chain_times(ring, batch, length, state, device, itemsize)
    if "blocked" in times:
        costs["blocked"] = blocked_cost(ring, batch, length, state, stacked, copied)
    order = sorted(costs, key=times.__getitem__)
    if _FORCED:  # the forced method first; the other if it does not fit
        order.sort(key=lambda method: method != _FORCED[-1])
    for method in order:
        if cap is None or chain_need(costs[method]) * itemsize * CAP_MARGIN <= cap:
            return method, costs[method], times
    return None


def describe_times(method: ChainMethod, times: dict[ChainMethod, float]) -> str:
    """``"by sequential recursion (predicted 1.2 ms; scan 3.4 ms)"``: a step's note."""
    names = {"recursion": "sequential recursion", "blocked": "blocked recursion",
             "scan": "parallel scan"}
    order = ("recursion", "blocked", "scan")
    others = "; ".join(f"{m} {_ms(times[m])}" for m in order if m in times and m != method)
    return f"by {names[method]} (predicted {_ms(times[method])}; {others})"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"
