"""The plan's intermediate representation: slots, layouts, and one frozen dataclass per step.

A plan is a straight-line program over numbered *slots* (tensors with named dims in canonical
order). Each step is a frozen dataclass that carries its own layout and its predicted cost
(forward and backward FLOPs, working memory):

* :class:`PairStep` contracts two slots (one :func:`torch.einsum` in the ring), optionally sliced;
* :class:`ReduceStep` eliminates variables of one slot;
* :class:`PlateProduct` product-reduces plate dims;
* :class:`NormalizeStep` divides a term by its total over kept variables (the local part of
  Pyro's ``global_local`` split);
* :class:`ScanStep` eliminates a sequential plate's chain by parallel scan;
* :class:`ChainStep` eliminates a chain of variables found inside one contraction.

:mod:`plated.contract` runs a plan forward and backward by dispatching on these types, and
:mod:`plated.plan.cost` sums their costs. Costs count elements, not bytes; the cost model
multiplies by the dtype's item size.

Under a memory cap, a pairwise step or a reduction is sliced to fit when it is emitted (its
``slice_dim`` and ``slice_chunks``; ``recompute`` makes its gradient recompute it slice by slice),
a chain that does not fit is contracted pairwise instead, and a scan that does not fit is refused
(:func:`check_working_memory`). Each step also predicts what autograd saves of it, its backward
working memory and that of its MAP or sampling choice, from which
:func:`plated.plan.cost.check_query_memory` refuses a whole query that would not fit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import MemoryCapError
from ..factor import Plate
from ..typing import ChainMethod, ChainRole, RingName

if TYPE_CHECKING:
    from .cost import CostReport

__all__ = [
    "Structure", "Slot", "PairLayout", "ScanLayout", "ChainPart", "ChainLayout", "Step",
    "PairStep", "ReduceStep", "PlateProduct", "NormalizeStep", "ScanStep", "ChainStep", "Plan",
    "fmt_bytes",
]


@dataclass(frozen=True)
class Structure:
    """Everything about a graph that a plan depends on: names, shapes and options, no values.

    :ivar plates: the declared plates, in order (this order lays out every result's plate dims).
    :ivar inputs: per factor, its dim names and shape.
    :ivar labels: per factor, the label used in error messages. Labels take no part in equality
        or hashing, so structures that differ only in labels share one cached plan.
    :ivar keep_plates: plates kept in the result (not product-reduced).
    :ivar keep_vars: variables kept in the result (not eliminated), as einsum outputs keep them.
    :ivar ring: the ring the plan runs in (memory estimates differ by ring).
    :ivar itemsize: bytes per element of the factors' dtype.
    :ivar memory_cap: an optional cap in bytes on a query's working memory (see
        :class:`~plated.plan.cost.CostReport`).
    :ivar device: the factors' device type (``"cpu"``, ``"cuda"``, ...): the cost model that
        chooses how to eliminate a chain depends on it.
    """

    plates: tuple[Plate, ...]
    inputs: tuple[tuple[tuple[str, ...], tuple[int, ...]], ...]
    labels: tuple[str, ...] = field(compare=False)
    keep_plates: tuple[str, ...] = ()
    keep_vars: tuple[str, ...] = ()
    ring: RingName = "log"
    itemsize: int = 8
    memory_cap: int | None = None
    device: str = "cpu"


@dataclass(frozen=True)
class Slot:
    """One tensor of a plan: its dim names (canonical order) and its shape."""

    dims: tuple[str, ...]
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        """The number of elements."""
        return math.prod(self.shape)


def fmt_bytes(n: int) -> str:
    """A byte count as people read it: ``512 B``, ``1.5 KiB``, ..., ``3.0 GiB``."""
    x = float(n)
    for unit in ("B", "KiB", "MiB"):
        if x < 1024:
            return f"{x:.1f} {unit}" if unit != "B" else f"{int(x)} B"
        x /= 1024
    return f"{x:.1f} GiB"


# ----------------------------------------------------------------------------------------------
# layouts


@dataclass(frozen=True)
class PairLayout:
    """Precomputed layout of one pairwise contraction ``a, b -> out``.

    :ivar equation: a :func:`torch.einsum` equation over letters.
    :ivar red_a: positions of ``a``'s dims eliminated by this step (likewise ``red_b``).
    :ivar shift_a: the shape that lays ``a``'s shift (eliminated dims dropped) along the output.
    :ivar view_a: the shape that lays ``a`` along the union of both operands' dims (max ring).
    :ivar red_union: positions of the eliminated dims in that union.
    """

    equation: str
    red_a: tuple[int, ...]
    red_b: tuple[int, ...]
    shift_a: tuple[int, ...]
    shift_b: tuple[int, ...]
    view_a: tuple[int, ...]
    view_b: tuple[int, ...]
    red_union: tuple[int, ...]

    def narrowed(self, out_pos: int, union_pos: int, size: int) -> PairLayout:
        """The layout of one slice: output dim ``out_pos`` (union dim ``union_pos``) has ``size``
        elements; an operand without that dim (extent 1 there) keeps its shape."""

        def fix(shape: tuple[int, ...], pos: int) -> tuple[int, ...]:
            return shape if shape[pos] == 1 else shape[:pos] + (size,) + shape[pos + 1:]

        return PairLayout(self.equation, self.red_a, self.red_b, fix(self.shift_a, out_pos),
                          fix(self.shift_b, out_pos), fix(self.view_a, union_pos),
                          fix(self.view_b, union_pos), self.red_union)


@dataclass(frozen=True)
class ScanLayout:
    """Layout of a sequential plate's scan (see :mod:`plated.markov`).

    The transition slot is permuted by ``in_perm`` and viewed as ``in_view`` (1 where a dim is
    absent), expanded to ``in_full`` = ``(*plates_after, *outer, plate, *prev, *curr)`` and
    flattened to ``(batch, length, state, state)``.
    """

    plate: str
    curr: tuple[str, ...]
    prev: tuple[str, ...]
    present_prev: tuple[str, ...]
    in_perm: tuple[int, ...]
    in_view: tuple[int, ...]
    in_full: tuple[int, ...]
    batch_shape: tuple[int, ...]
    length: int
    state: int
    prev_sizes: tuple[int, ...]
    curr_sizes: tuple[int, ...]
    out_batch_dims: tuple[str, ...]
    out_perm: tuple[int, ...]
    plates_before: tuple[str, ...]
    plates_after: tuple[str, ...]
    #: per dim of ``in_full``: whether the transition slot has it (``in_perm``'s dims, in order)
    in_present: tuple[bool, ...] = ()


@dataclass(frozen=True)
class ChainPart:
    """How one input of a :class:`ChainStep` enters the scan.

    :ivar role: see :data:`plated.typing.ChainRole`.
    :ivar step: the chain step it belongs to (``v_step -> v_{step+1}``).
    :ivar perm: the permutation that puts its dims in ``(*batch, *chain vars)`` order.
    :ivar view: its shape along ``(*batch, K, K)`` (edge), ``(*batch, 1, K)`` (next),
        ``(*batch, K)`` (start) or ``(*batch,)`` (const), 1 where a batch dim is absent.
    """

    role: ChainRole
    step: int
    perm: tuple[int, ...]
    view: tuple[int, ...]


@dataclass(frozen=True)
class ChainLayout:
    """Layout of a chain ``v_0 - v_1 - ... - v_n`` of equal-sized variables inside one
    contraction, eliminated by the same parallel scan as a sequential plate."""

    vars: tuple[str, ...]
    size: int
    batch_dims: tuple[str, ...]
    batch_shape: tuple[int, ...]
    parts: tuple[ChainPart, ...]
    out_perm: tuple[int, ...]


# ----------------------------------------------------------------------------------------------
# steps


@dataclass(frozen=True, kw_only=True)
class Step:
    """One step of a plan.

    :ivar ins: the slots it reads.
    :ivar out: the slot it writes.
    :ivar note: what the step is for, as the cost report prints it.
    :ivar flops: predicted floating-point operations of the forward step, counted as the step
        runs them: a matrix product as its multiply-adds, an elementwise operation or a
        reduction as one per element.
    :ivar backward_flops: predicted floating-point operations of its gradient.
    :ivar temp_numel: predicted elements of working memory beyond its inputs and output, in the
        forward pass.
    :ivar saved_numel: predicted elements that autograd keeps from the forward pass for the
        backward pass (temporaries of the step, not its inputs or output).
    :ivar backward_numel: predicted elements of working memory of the step's gradient, beyond
        what it saved and the gradients of its inputs and output.
    :ivar choose_numel: predicted elements of working memory of the step's backward choice (MAP
        or sampling) for its inputs over variables chosen before it, per sample drawn in
        parallel (one sample for a step whose choice every sample shares).
    :ivar choose_fixed: the same for its other inputs, which every sample shares.
    :ivar choose_indices: elements (in the factors' dtype) of the indices it chooses, per sample.
    :ivar choose_flops: predicted floating-point operations of its backward choice, per sample
        drawn in parallel (and ``choose_flops_fixed``, shared by all samples).
    :ivar kept_numel: predicted elements the step keeps for a backward choice beyond its output
        (a scan's levels).
    """

    ins: tuple[int, ...]
    out: int
    note: str
    flops: int
    temp_numel: int
    backward_flops: int = 0
    saved_numel: int = 0
    backward_numel: int = 0
    choose_numel: int = 0
    choose_fixed: int = 0
    choose_indices: int = 0
    choose_flops: int = 0
    choose_flops_fixed: int = 0
    kept_numel: int = 0

    #: the printed name of the step kind (cost report)
    label = "step"

    def eliminated(self) -> tuple[str, ...]:
        """The variables the step sums (or maxes) out; chosen again by the backward pass."""
        return ()

    def describe(self, slots: Sequence[Slot]) -> str:
        """One line of the cost report."""
        ins = " x ".join("(" + ",".join(slots[i].dims) + ")" for i in self.ins)
        what = f"sum out {list(self.eliminated())} " if self.eliminated() else ""
        return f"{self.label:9s} {ins} -> ({','.join(slots[self.out].dims)})  {what}{self.note}"


@dataclass(frozen=True, kw_only=True)
class _Contraction(Step):
    """A step that multiplies its inputs and eliminates variables."""


@dataclass(frozen=True, kw_only=True)
class PairStep(_Contraction):
    """``out = a (x) b`` with ``elim`` summed out, as one einsum; under a memory cap it may run
    in ``slice_chunks`` slices along output dim ``slice_dim``, and with ``recompute`` its
    gradient recomputes the step slice by slice instead of saving its temporaries
    (:mod:`plated.sliced`); its backward choice (MAP, sampling) may run in ``choose_chunks``
    chunks along its output plate ``choose_plate``."""

    layout: PairLayout
    elim: tuple[str, ...]
    slice_dim: int | None = None
    slice_chunks: int = 1
    recompute: bool = False
    choose_plate: str | None = None
    choose_chunks: int = 1

    label = "pair"

    def eliminated(self) -> tuple[str, ...]:
        return self.elim

    def describe(self, slots: Sequence[Slot]) -> str:
        line = super().describe(slots)
        if self.slice_dim is None:
            return line
        return (f"{line} [sliced {self.slice_chunks}x along "
                f"{slots[self.out].dims[self.slice_dim]!r}]")


@dataclass(frozen=True, kw_only=True)
class ReduceStep(Step):
    """``out = (+)_{elim} x``: eliminate the variables at positions ``dims`` of one slot; under a
    memory cap it may run in ``slice_chunks`` slices along output dim ``slice_dim``, recomputed
    by its gradient (``recompute``) as a :class:`PairStep` is."""

    dims: tuple[int, ...]
    elim: tuple[str, ...]
    slice_dim: int | None = None
    slice_chunks: int = 1
    recompute: bool = False
    choose_plate: str | None = None
    choose_chunks: int = 1

    label = "unary"

    def eliminated(self) -> tuple[str, ...]:
        return self.elim

    def describe(self, slots: Sequence[Slot]) -> str:
        line = super().describe(slots)
        if self.slice_dim is None:
            return line
        return (f"{line} [sliced {self.slice_chunks}x along "
                f"{slots[self.out].dims[self.slice_dim]!r}]")


@dataclass(frozen=True, kw_only=True)
class PlateProduct(Step):
    """``out = (x)_{plates} x``: product over the plate dims at positions ``dims`` (a sum in
    log space, for every ring)."""

    dims: tuple[int, ...]

    label = "product"


@dataclass(frozen=True, kw_only=True)
class NormalizeStep(Step):
    """``out = x / total``: a term over kept variables divided by its total over them
    (``ins = (term, total)``; ``dims`` are the kept variables' positions in the term)."""

    dims: tuple[int, ...]

    label = "normalize"


@dataclass(frozen=True, kw_only=True)
class ScanStep(_Contraction):
    """The chain of a sequential plate, eliminated by ``method``: the sequential recursion
    (:mod:`plated.recursion`) or the log-depth parallel scan (:mod:`plated.markov`)."""

    layout: ScanLayout
    method: ChainMethod = "scan"

    label = "scan"

    def eliminated(self) -> tuple[str, ...]:
        return self.layout.curr

    def describe(self, slots: Sequence[Slot]) -> str:
        ins = "(" + ",".join(slots[self.ins[0]].dims) + ")"
        return (f"{self.label:9s} {ins} -> ({','.join(slots[self.out].dims)})  {self.note}")


@dataclass(frozen=True, kw_only=True)
class ChainStep(_Contraction):
    """A chain of variables inside one contraction, eliminated by ``method`` (as a
    :class:`ScanStep` is)."""

    layout: ChainLayout
    method: ChainMethod = "scan"

    label = "chain"

    def eliminated(self) -> tuple[str, ...]:
        return self.layout.vars

    def describe(self, slots: Sequence[Slot]) -> str:
        return (f"{self.label:9s} {len(self.ins)} factors -> "
                f"({','.join(slots[self.out].dims)})  {self.note}")


def check_working_memory(what: str, numel: int, itemsize: int, cap: int | None) -> None:
    """Refuse a step whose working memory of ``numel`` elements exceeds ``cap`` bytes.

    :raises MemoryCapError: naming the step ``what`` and both sizes.
    """
    if cap is not None and numel * itemsize > cap:
        raise MemoryCapError(
            f"{what} needs {fmt_bytes(numel * itemsize)}, over the memory cap of "
            f"{fmt_bytes(cap)}; raise memory_cap"
        )


# ----------------------------------------------------------------------------------------------
# the plan


@dataclass(frozen=True)
class Plan:
    """A compiled elimination plan. See :func:`plated.plan.make_plan`.

    :ivar structure: the structure it was made for.
    :ivar slots: the shape and dims of every slot; slots ``0..n-1`` are the input factors,
        permuted into canonical dim order by ``input_perms`` (``None``: already in order).
    :ivar steps: the steps, in execution order.
    :ivar result: the slot holding the final result, with dims ``result_dims``.
    :ivar var_sizes: domain size of every variable.
    :ivar ordinals: the plates of every variable (a chain variable's ordinal includes its plate).
    :ivar order: the canonical position of every dim name.
    :ivar cost: the predicted cost (see :class:`~plated.plan.cost.CostReport`).
    :ivar frees: per step, the intermediate slots last read by it (dropped after it runs
        unless every intermediate is kept).
    """

    structure: Structure
    slots: list[Slot]
    steps: tuple[Step, ...]
    input_perms: list[tuple[int, ...] | None]
    result: int
    result_dims: tuple[str, ...]
    var_sizes: dict[str, int]
    ordinals: dict[str, frozenset[str]]
    order: dict[str, int]
    cost: CostReport
    frees: list[tuple[int, ...]] = field(default_factory=list)
    #: pair steps whose broadcast sum only feeds the next step, a log-ring recursion or another
    #: such pair step: when ``run_plan`` keeps no intermediates, it hands their operands to the
    #: chain instead (:func:`plated.markov.factored_scan`), which runs without forming their sum
    #: where one operand is a ``(K, K)`` matrix shared by every batch element and step, or
    #: where the state is several variables and no operand spans them all
    fused: frozenset[int] = frozenset()

    @property
    def ops(self) -> tuple[Step, ...]:
        """The steps (the name of earlier releases)."""
        return self.steps

    def var_plates(self, var: str) -> tuple[str, ...]:
        """The plates of ``var`` in declaration order (leading dims of its MAP/sample/marginal)."""
        return tuple(p.name for p in self.structure.plates if p.name in self.ordinals[var])
