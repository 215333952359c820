"""Emission of plan steps: slot allocation, contractions folded pairwise, and memory slicing.

An :class:`Emitter` owns the slots and steps of the plan being built. Its ``contract`` compiles
the sum-product of several slots into steps: a chain of variables goes to one
:class:`~plated.plan.ir.ChainStep` (:func:`plated.plan.chains.find_chain`); otherwise
:func:`opt_einsum.contract_path` chooses the order and every n-ary step of its path is folded into
pairwise :class:`~plated.plan.ir.PairStep`\\ s. A pairwise step whose working memory would exceed
the memory cap is sliced along its largest kept dim.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import opt_einsum

from ..errors import MemoryCapError
from .analysis import Analysis
from .chains import find_chain
from .ir import (
    ChainLayout,
    ChainStep,
    NormalizeStep,
    PairLayout,
    PairStep,
    PlateProduct,
    ReduceStep,
    Slot,
    Step,
    Structure,
    fmt_bytes,
)

__all__ = ["Emitter"]

_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


class Emitter:
    """The slots and steps of a plan under construction.

    :param structure: the structure being planned (ring, item size and memory cap are read).
    :param analysis: its analysis (sizes and canonical order of every dim).
    """

    def __init__(self, structure: Structure, analysis: Analysis) -> None:
        self.structure = structure
        self.analysis = analysis
        self.slots: list[Slot] = []
        self.steps: list[Step] = []

    # -- slots --------------------------------------------------------------------------------
    def canon(self, dims: Iterable[str]) -> tuple[str, ...]:
        """``dims`` in canonical order."""
        return self.analysis.canon(dims)

    def new_slot(self, dims: Iterable[str]) -> int:
        """Allocate a slot over ``dims`` (put in canonical order); returns its number."""
        ordered = self.canon(dims)
        self.slots.append(Slot(ordered, tuple(self.analysis.sizes[d] for d in ordered)))
        return len(self.slots) - 1

    def vars_of(self, slot: int) -> set[str]:
        """The variables (non-plate dims) of ``slot``."""
        return {d for d in self.slots[slot].dims if d not in self.analysis.plates}

    def emit(self, step: Step) -> int:
        """Append ``step``; returns its output slot."""
        self.steps.append(step)
        return step.out

    # -- contractions -------------------------------------------------------------------------
    def contract(self, ins: Sequence[int], elim: set[str], note: str) -> int:
        """Emit the sum-product of ``ins`` that eliminates ``elim``; returns the result slot.

        One input with nothing to eliminate is returned as is. Two inputs give one pairwise
        step. More inputs are either a chain (one scan step) or follow opt_einsum's path, each
        n-ary step of it folded into pairwise steps that keep only the dims still needed.
        """
        all_dims = set().union(*(self.slots[i].dims for i in ins))
        out_dims = self.canon(all_dims - elim)
        if len(ins) == 1:
            (only,) = ins
            if not (elim & set(self.slots[only].dims)):
                return only
            return self.reduce(only, out_dims, note)
        if len(ins) == 2:
            return self.pair(ins[0], ins[1], out_dims, note)
        chain = find_chain(self.slots, ins, elim, out_dims, self.analysis)
        if chain is not None:
            return self.chain(ins, chain, note)
        symbols = {d: opt_einsum.get_symbol(k) for k, d in enumerate(self.canon(all_dims))}
        equation = (",".join("".join(symbols[d] for d in self.slots[i].dims) for i in ins) + "->"
                    + "".join(symbols[d] for d in out_dims))
        shapes = [self.slots[i].shape for i in ins]
        path, _ = opt_einsum.contract_path(equation, *shapes, shapes=True, optimize="auto")
        live = list(ins)
        for path_step in path:
            picked = [live[k] for k in path_step]
            for k in sorted(path_step, reverse=True):
                del live[k]
            needed = set(out_dims).union(*(self.slots[i].dims for i in live))
            while len(picked) > 2:  # fold an n-ary step pairwise
                first, second = picked[0], picked[1]
                rest = set().union(*(self.slots[i].dims for i in picked[2:]))
                dims = (set(self.slots[first].dims) | set(self.slots[second].dims)) \
                    & (needed | rest)
                picked = [self.pair(first, second, self.canon(dims), note)] + picked[2:]
            if len(picked) == 2:
                dims = (set(self.slots[picked[0]].dims) | set(self.slots[picked[1]].dims)) \
                    & needed
                result = self.pair(picked[0], picked[1], self.canon(dims), note)
            else:
                dims = set(self.slots[picked[0]].dims) & needed
                result = picked[0]
                if dims != set(self.slots[result].dims):
                    result = self.reduce(result, self.canon(dims), note)
            live.append(result)
        (result,) = live
        return result

    def chain(self, ins: Sequence[int], layout: ChainLayout, note: str) -> int:
        """Emit the scan that eliminates the chain ``layout`` found among ``ins``."""
        batch = math.prod(layout.batch_shape)
        steps = len(layout.vars) - 1
        state = layout.size
        # the log ring keeps two (K, K) matrices per product in the tree; the max ring
        # materialises the (K, K, K) broadcast of each product
        temp = (2 * batch * steps * state * state if self.structure.ring == "log"
                else batch * steps * state ** 3)
        out = self.new_slot(layout.batch_dims)
        return self.emit(ChainStep(
            ins=tuple(ins), out=out, flops=2 * batch * steps * state ** 3, temp_numel=temp,
            note=f"{note}: chain of {len(layout.vars)} variables by parallel scan",
            layout=layout))

    def reduce(self, slot: int, out_dims: tuple[str, ...], note: str) -> int:
        """Emit the elimination of every dim of ``slot`` not in ``out_dims``."""
        src = self.slots[slot]
        positions = tuple(k for k, d in enumerate(src.dims) if d not in out_dims)
        out = self.new_slot(out_dims)
        return self.emit(ReduceStep(
            ins=(slot,), out=out, note=note, flops=2 * src.numel, temp_numel=2 * src.numel,
            dims=positions, elim=tuple(src.dims[k] for k in positions)))

    def pair(self, a: int, b: int, out_dims: tuple[str, ...], note: str) -> int:
        """Emit ``a (x) b`` summed down to ``out_dims`` (sliced under the memory cap)."""
        slot_a, slot_b = self.slots[a], self.slots[b]
        sizes = self.analysis.sizes
        union = self.canon(set(slot_a.dims) | set(slot_b.dims))
        letters = {d: _LETTERS[k] for k, d in enumerate(union)}
        equation = ("".join(letters[d] for d in slot_a.dims) + ","
                    + "".join(letters[d] for d in slot_b.dims) + "->"
                    + "".join(letters[d] for d in out_dims))
        elim = tuple(d for d in union if d not in out_dims)

        def reduced(src: Slot) -> tuple[int, ...]:
            return tuple(k for k, d in enumerate(src.dims) if d not in out_dims)

        def along(src: Slot, dims: tuple[str, ...]) -> tuple[int, ...]:
            return tuple(sizes[d] if d in src.dims else 1 for d in dims)

        layout = PairLayout(equation, reduced(slot_a), reduced(slot_b), along(slot_a, out_dims),
                            along(slot_b, out_dims), along(slot_a, union), along(slot_b, union),
                            tuple(k for k, d in enumerate(union) if d not in out_dims))
        out = self.new_slot(out_dims)
        union_numel = math.prod(sizes[d] for d in union)
        if self.structure.ring == "max" or not elim:
            temp = union_numel  # the broadcast sum is materialised
        else:
            temp = slot_a.numel + slot_b.numel + self.slots[out].numel  # shifted exps
        slice_dim, chunks = self._slicing(a, b, out, temp, note)
        return self.emit(PairStep(
            ins=(a, b), out=out, note=note, flops=2 * union_numel,
            temp_numel=math.ceil(temp / chunks) if slice_dim is not None else temp,
            layout=layout, elim=elim, slice_dim=slice_dim, slice_chunks=chunks))

    def _slicing(self, a: int, b: int, out: int, temp: int, note: str
                 ) -> tuple[int | None, int]:
        """The slicing of a pairwise step with ``temp`` elements of working memory: ``(None, 1)``
        when it fits the memory cap, else the output dim to slice and the number of slices.

        :raises MemoryCapError: when the output alone exceeds the cap, or no kept dim can be cut
            into enough slices.
        """
        cap = self.structure.memory_cap
        if cap is None:
            return None, 1
        item = self.structure.itemsize
        result = self.slots[out]
        need = (temp + result.numel) * item
        if need <= cap:
            return None, 1
        available = cap - result.numel * item
        if available <= 0:
            raise MemoryCapError(
                f"step '{note}' produces a result over dims {result.dims} of "
                f"{fmt_bytes(result.numel * item)}, over the memory cap of {fmt_bytes(cap)}; "
                "raise memory_cap"
            )
        chunks = math.ceil(temp * item / available)
        fits = [k for k, n in enumerate(result.shape) if n >= chunks]
        if not fits:
            raise MemoryCapError(
                f"step '{note}' contracting {self.slots[a].dims} with {self.slots[b].dims} needs "
                f"{fmt_bytes(need)} of working memory, over the cap of {fmt_bytes(cap)}, and no "
                f"kept dim of {result.dims} can be split into {chunks} slices; raise memory_cap"
            )
        best = max(fits, key=lambda k: result.shape[k])
        per_slice = math.ceil(result.shape[best] / chunks)
        return best, math.ceil(result.shape[best] / per_slice)

    def product(self, slot: int, plates: frozenset[str], note: str) -> int:
        """Emit the product over ``plates`` of ``slot`` (nothing when ``plates`` is empty)."""
        if not plates:
            return slot
        src = self.slots[slot]
        positions = tuple(k for k, d in enumerate(src.dims) if d in plates)
        out = self.new_slot([d for d in src.dims if d not in plates])
        return self.emit(PlateProduct(ins=(slot,), out=out, note=note, flops=src.numel,
                                      temp_numel=0, dims=positions))

    def normalize(self, term: int, total: int, kept: set[str], note: str) -> int:
        """Emit ``term`` divided by its ``total`` over the variables ``kept``."""
        src = self.slots[term]
        positions = tuple(k for k, d in enumerate(src.dims) if d in kept)
        out = self.new_slot(src.dims)
        return self.emit(NormalizeStep(ins=(term, total), out=out, note=note, flops=src.numel,
                                       temp_numel=0, dims=positions))
