"""Emission of plan steps: slot allocation, contractions folded pairwise, and memory slicing.

An :class:`Emitter` owns the slots and steps of the plan being built. Its ``contract`` compiles
the sum-product of several slots into steps: a chain of variables goes to one
:class:`~plated.plan.ir.ChainStep` (:func:`plated.plan.chains.find_chain`); otherwise
:func:`opt_einsum.contract_path` chooses the order and every n-ary step of its path is folded into
pairwise :class:`~plated.plan.ir.PairStep`\\ s.

Every step predicts its own FLOPs and memory (forward temporaries, what autograd saves, its
gradient's and its backward choice's working memory; see :class:`~plated.plan.ir.Step`), as
measured on this implementation by ``benchmarks/cost_accuracy.py``. Under a memory cap
(:meth:`Emitter._fit`) each operand's private variables are summed out on their own, a step that
does not fit is sliced along its largest kept dim (or first keeps one of its variables, so that it
can be), its gradient recomputes it slice by slice, and a chain whose scan does not fit is
contracted pairwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import opt_einsum

from ..errors import MemoryCapError
from .analysis import Analysis
from .chains import chain_method, describe_times, find_chain, scan_cost
from .cost import CAP_MARGIN
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

__all__ = ["Emitter", "scan_cost"]  # scan_cost: from plated.plan.chains


@dataclass(frozen=True)
class _Memory:
    """Predicted working memory of one step, in elements (see :class:`~plated.plan.ir.Step`)."""

    temp: int
    saved: int = 0
    backward: int = 0

    @property
    def peak(self) -> int:
        """The larger of its forward and backward working memory."""
        return max(self.temp, self.backward)


#: The letters :func:`torch.einsum` accepts. Each pairwise step names only its own operands'
#: dims, so a plan may have any number of dims; a step whose operands span more than these is
#: split (see :meth:`Emitter.pair`).
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
            emitted = self.chain(ins, chain, note)
            if emitted is not None:
                return emitted
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

    def chain(self, ins: Sequence[int], layout: ChainLayout, note: str) -> int | None:
        """Emit the elimination of the chain ``layout`` found among ``ins``, by the method the
        cost model chooses (:func:`~plated.plan.chains.chain_method`); ``None`` when no method
        fits the memory cap (the chain is then contracted pairwise, by steps that can be
        sliced)."""
        st = self.structure
        batch = math.prod(layout.batch_shape)
        choice = chain_method(st.ring, batch, len(layout.vars) - 1, layout.size, st.device,
                              st.itemsize, st.memory_cap, stacked=True)
        if choice is None:
            return None
        method, cost, times = choice
        out = self.new_slot(layout.batch_dims)
        return self.emit(ChainStep(
            ins=tuple(ins), out=out, note=f"{note}: chain of {len(layout.vars)} variables "
            + describe_times(method, times), layout=layout, method=method, **cost))

    def reduce(self, slot: int, out_dims: tuple[str, ...], note: str) -> int:
        """Emit the elimination of every dim of ``slot`` not in ``out_dims``.

        Under a memory cap a reduction that does not fit is sliced along a kept dim; one that
        keeps no dim it could slice first eliminates all but one of its variables (a reduction
        that keeps that one, which it can slice), then that one.
        """
        src = self.slots[slot]
        positions = tuple(k for k, d in enumerate(src.dims) if d not in out_dims)
        elim = tuple(src.dims[k] for k in positions)
        out_numel = math.prod([self.analysis.sizes[d] for d in out_dims])

        def memory(chunks: int, recompute: bool, dim: str | None) -> _Memory:
            x, o = -(-src.numel // chunks), -(-out_numel // chunks)
            if self.structure.ring == "max":  # amax allocates its result only
                return _Memory(temp=o)
            # the shifted exponentials (in place), their sum and its log; autograd saves the
            # exponentials and the sum, and their product with the output's gradient is the
            # input's gradient
            if recompute:  # saves nothing; its gradient recomputes one slice at a time
                return _Memory(temp=x + 3 * o, backward=3 * x + 3 * o)
            return _Memory(temp=x + 3 * o, saved=x + o, backward=2 * o)

        fit = self._fit(out_dims, memory)
        choice = self._choice((slot,), out_dims)
        cap = self.structure.memory_cap
        # under a cap, a step that no slicing fits, or whose backward choice (over all of its
        # variables at once) would not fit, keeps its largest variable for a second step
        split = cap is not None and (fit is None or max(
            choice["choose_numel"], choice["choose_fixed"]) * self.structure.itemsize
            * CAP_MARGIN > cap)  # (a choice in plate chunks counts one chunk)
        if split:
            keep = max(elim, key=lambda d: self.analysis.sizes[d])
            if len(elim) > 1 and (out_numel * self.analysis.sizes[keep] * self.structure.itemsize
                                  * CAP_MARGIN < self._cap()):
                first = self.reduce(slot, self.canon(set(out_dims) | {keep}), note)
                return self.reduce(first, out_dims, note)
        if fit is None:
            need = memory(1, True, None)
            how = (f"even cut into as many slices as its kept dims {out_dims} allow" if out_dims
                   else "with no kept dim to slice")
            raise MemoryCapError(
                f"step '{note}' sums {list(elim)} out of a factor over {src.dims} and needs "
                f"{fmt_bytes((out_numel + need.peak) * self.structure.itemsize)} of working "
                f"memory, over the memory cap of {fmt_bytes(self._cap())} {how}; raise "
                "memory_cap"
            )
        slice_dim, chunks, recompute = fit
        m = memory(chunks, recompute, None if slice_dim is None else out_dims[slice_dim])
        out = self.new_slot(out_dims)
        x = src.numel
        flops, backward_flops = ((x, 2 * x) if self.structure.ring == "max"
                                 else (4 * x + 3 * out_numel, 3 * x))
        if recompute:
            backward_flops += flops
        return self.emit(ReduceStep(
            ins=(slot,), out=out, note=note, flops=flops, backward_flops=backward_flops,
            temp_numel=m.temp, saved_numel=m.saved, backward_numel=m.backward,
            **choice, dims=positions, elim=elim,
            slice_dim=slice_dim, slice_chunks=chunks, recompute=recompute))

    def pair(self, a: int, b: int, out_dims: tuple[str, ...], note: str) -> int:
        """Emit ``a (x) b`` summed down to ``out_dims`` (sliced under the memory cap).

        :func:`torch.einsum` names dims by 52 letters, so when the two operands span more dims
        than that, the step is split: first each operand's private eliminated dims are summed
        out alone (exact: they meet no other factor here); if the rest still spans too many,
        the two are combined by a broadcast product over their union (which needs no einsum)
        and the shared eliminated dims are summed out of it.

        Under a memory cap the private eliminated dims are summed out first too, each in its
        own reduction, so that every step can be sliced (an operand that lacks the sliced dim
        would otherwise be read whole by every slice).
        """
        union = self.canon(set(self.slots[a].dims) | set(self.slots[b].dims))
        if len(union) > len(_LETTERS) or self.structure.memory_cap is not None:
            return self._wide_pair(a, b, out_dims, note)
        return self._pair(a, b, out_dims, note)

    def _wide_pair(self, a: int, b: int, out_dims: tuple[str, ...], note: str) -> int:
        """:meth:`pair` with each operand's private eliminated dims summed out first (operands
        that span more dims than :func:`torch.einsum` has letters, or under a memory cap)."""
        dims_a, dims_b = set(self.slots[a].dims), set(self.slots[b].dims)
        keep = set(out_dims)
        if (dims_a - dims_b) - keep:
            a = self.reduce(a, self.canon(dims_a & (dims_b | keep)), note)
        if (dims_b - dims_a) - keep:
            b = self.reduce(b, self.canon(dims_b & (dims_a | keep)), note)
        union = self.canon(set(self.slots[a].dims) | set(self.slots[b].dims))
        if len(union) <= len(_LETTERS):
            return self._pair(a, b, out_dims, note)
        joint = self._pair(a, b, union, f"{note} (over {len(union)} dims: broadcast, then sum)")
        return self.reduce(joint, out_dims, note) if union != out_dims else joint

    def _pair(self, a: int, b: int, out_dims: tuple[str, ...], note: str) -> int:
        """Emit one :class:`~plated.plan.ir.PairStep`: ``a (x) b`` summed down to ``out_dims``.

        Its einsum equation names the union of the operands' dims; with more than 52 of them
        nothing is eliminated (:meth:`pair` sees to it), so the rings compute a broadcast sum
        and never run that equation, whose letters then go on past the 52 of ``torch.einsum``.
        """
        slot_a, slot_b = self.slots[a], self.slots[b]
        sizes = self.analysis.sizes
        union = self.canon(set(slot_a.dims) | set(slot_b.dims))
        letters = {d: _LETTERS[k] if k < len(_LETTERS) else opt_einsum.get_symbol(k)
                   for k, d in enumerate(union)}
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
        union_numel = math.prod([sizes[d] for d in union])
        out_numel = math.prod([sizes[d] for d in out_dims])
        own_a = [d for d in elim if d not in slot_b.dims]
        own_b = [d for d in elim if d not in slot_a.dims]

        # what torch.einsum multiplies once each operand's private dims are summed out
        contracted = union_numel // math.prod([sizes[d] for d in own_a + own_b])
        matmul = any(d in slot_a.dims and d in slot_b.dims for d in elim) and bool(out_dims)

        def memory(chunks: int, recompute: bool, dim: str | None) -> _Memory:
            def part(numel: int, dims: Iterable[str]) -> int:
                return -(-numel // chunks) if dim is not None and dim in dims else numel

            a_s, b_s = part(slot_a.numel, slot_a.dims), part(slot_b.numel, slot_b.dims)
            o_s = -(-out_numel // chunks)
            if not elim:  # a broadcast sum: only its output
                return _Memory(temp=0)
            if self.structure.ring == "max":  # private dims first, then the joint of the rest
                # (an operand without private dims enters the joint as a view)
                return _Memory(temp=(
                    (part(slot_a.numel // math.prod([sizes[d] for d in own_a]), slot_a.dims)
                     if own_a else 0)
                    + (part(slot_b.numel // math.prod([sizes[d] for d in own_b]), slot_b.dims)
                       if own_b else 0)
                    + part(contracted, out_dims) + o_s))
            # the shifted exponentials of both operands (in place), the einsum's result, its
            # log and the shifts added (in place); autograd saves the exponentials and the
            # einsum's result; the gradient of a contraction over shared dims is one more
            # operand-sized product before it meets the exponentials
            temp = a_s + b_s + 3 * o_s
            extra = max(a_s, b_s) if matmul else 0
            if not recompute:
                return _Memory(temp=temp, saved=a_s + b_s + o_s, backward=extra + 2 * o_s)
            # its gradient recomputes a slice, then runs its backward; an operand that every
            # slice reads whole gets a whole-sized gradient per slice
            whole = (slot_a.numel if a_s == slot_a.numel and chunks > 1 else 0) + \
                (slot_b.numel if b_s == slot_b.numel and chunks > 1 else 0)
            return _Memory(temp=temp, backward=3 * (a_s + b_s) + extra + 4 * o_s + whole)

        fit = self._fit(out_dims, memory)
        if fit is None and elim:
            # keep one eliminated variable (shared, if any: the contraction's own dim) so that
            # the step can be sliced along it, and sum it out after, if its result fits
            keep = max([d for d in elim if d in slot_a.dims and d in slot_b.dims] or elim,
                       key=lambda d: sizes[d])
            if out_numel * sizes[keep] * self.structure.itemsize * CAP_MARGIN < self._cap():
                first = self._pair(a, b, self.canon(set(out_dims) | {keep}), note)
                return self.reduce(first, out_dims, note)
        if fit is None:
            need = memory(1, False, None)
            raise MemoryCapError(
                f"step '{note}' contracting {slot_a.dims} with {slot_b.dims} needs "
                f"{fmt_bytes((out_numel + need.temp) * self.structure.itemsize)} of working "
                f"memory, over the memory cap of {fmt_bytes(self._cap())}, and no kept dim of "
                f"{out_dims} can be split into enough slices; raise memory_cap"
            )
        slice_dim, chunks, recompute = fit
        m = memory(chunks, recompute, None if slice_dim is None else out_dims[slice_dim])
        out = self.new_slot(out_dims)
        # an operand without the sliced dim is read whole by every slice
        sliced = None if slice_dim is None else out_dims[slice_dim]
        numel_a = slot_a.numel * (1 if sliced is None or sliced in slot_a.dims else chunks)
        numel_b = slot_b.numel * (1 if sliced is None or sliced in slot_b.dims else chunks)
        private = (numel_a if own_a else 0) + (numel_b if own_b else 0)
        if not elim:
            flops, backward_flops = out_numel, 2 * out_numel
        elif self.structure.ring == "max":
            flops = private + 2 * contracted
            backward_flops = 2 * (numel_a + numel_b)
        else:
            flops = 3 * (numel_a + numel_b) + private + 2 * contracted + 4 * out_numel
            backward_flops = max(numel_a + numel_b + (4 * contracted if matmul else 0)
                                 + out_numel, 3 * (numel_a + numel_b))
        if recompute:
            backward_flops += flops
        return self.emit(PairStep(
            ins=(a, b), out=out, note=note, flops=flops, backward_flops=backward_flops,
            temp_numel=m.temp, saved_numel=m.saved, backward_numel=m.backward,
            **self._choice((a, b), out_dims),
            layout=layout, elim=elim, slice_dim=slice_dim, slice_chunks=chunks,
            recompute=recompute))

    def _cap(self) -> int:
        """The memory cap (only called under one)."""
        cap = self.structure.memory_cap
        assert cap is not None
        return cap

    def _choice(self, ins: Sequence[int], out_dims: tuple[str, ...]) -> dict[str, Any]:
        """The cost of a step's backward choice (see :class:`~plated.plan.ir.Step`): each input
        gathered at the values chosen for ``out_dims`` (one copy per sample where it has such a
        variable), then, one input at a time, its private dims summed out or its index drawn
        (log ring: through exponentials, or weights and their cumulative sum, or Gumbel noise;
        max ring: an argmax)."""
        chosen = {d for d in out_dims if d not in self.analysis.plates}
        # copies of a gathered input at once: the argmax's input (max ring); Gumbel noise added
        # in place to per-sample logits, or weights and their cumulative sum for shared ones
        per, per_shared = (1, 1) if self.structure.ring == "max" else (2, 3)
        # the chosen indices themselves (longs, per sample and plate element): drawn, laid out
        # and split per variable, a few copies of the result at once
        indices = 2 * math.prod([self.analysis.sizes[d] for d in out_dims
                                 if d in self.analysis.plates]) * max(
            1, 8 // self.structure.itemsize)
        per_sample = fixed = flops = flops_fixed = 0
        for i in ins:
            slot = self.slots[i]
            gathered = math.prod([n for d, n in zip(slot.dims, slot.shape, strict=True)
                                  if d not in chosen])
            work = (2 if self.structure.ring == "max" else 5) * gathered
            # and the index vectors (longs) that gather it: one per dim, about twice over
            index = 2 * sum(n for d, n in zip(slot.dims, slot.shape, strict=True)
                            if d not in chosen) * max(1, 8 // self.structure.itemsize)
            if chosen & set(slot.dims):
                per_sample = max(per_sample, per * gathered + index)
                flops += work
            else:
                fixed = max(fixed, per_shared * gathered + index)
                flops_fixed += work
        choice: dict[str, object] = {
            "choose_numel": per_sample, "choose_fixed": fixed, "choose_flops": flops,
            "choose_flops_fixed": flops_fixed, "choose_indices": indices}
        cap = self.structure.memory_cap
        plates = [d for d in out_dims if d in self.analysis.plates]
        need = max(per_sample, fixed) * self.structure.itemsize * CAP_MARGIN
        if cap is not None and plates and need > cap:
            # under a cap: choose in chunks along the largest output plate (each plate element
            # chooses on its own)
            plate = max(plates, key=lambda d: self.analysis.sizes[d])
            size = self.analysis.sizes[plate]
            chunks = min(size, -(-2 * int(need) // cap))  # half the cap: the rest is alive
            chunks = -(-size // -(-size // chunks))  # as the chunks of equal length fall
            choice.update(choose_plate=plate, choose_chunks=chunks,
                          choose_numel=-(-per_sample // chunks), choose_fixed=-(-fixed // chunks))
        return choice

    def _fit(self, out_dims: tuple[str, ...],
             memory: Callable[[int, bool, str | None], _Memory]
             ) -> tuple[int | None, int, bool] | None:
        """How a step fits the memory cap: ``(slice_dim, chunks, recompute)``, or ``None``
        when no slicing of a kept dim fits its forward pass.

        Without a cap: unsliced, its temporaries saved for the gradient. Under one: the
        gradient recomputes the step (log ring), and the step is cut into the fewest slices
        along its largest kept dim whose forward pass fits; more, if that lets the gradient
        fit too (otherwise a gradient query refuses it, see :mod:`plated.plan.cost`).
        """
        cap = self.structure.memory_cap
        if cap is None:
            return None, 1, False
        item = self.structure.itemsize
        recompute = self.structure.ring == "log"
        out_numel = math.prod([self.analysis.sizes[d] for d in out_dims])

        def call(chunks: int, dim: str | None) -> _Memory:
            return memory(chunks, recompute, dim)

        def fits(m: _Memory, grad: bool) -> bool:
            need = out_numel + (max(m.temp, m.backward) if grad else m.temp)
            return need * item * CAP_MARGIN <= cap

        whole = call(1, None)
        if fits(whole, grad=True):
            return None, 1, recompute
        if not out_dims:
            return (None, 1, recompute) if fits(whole, grad=False) else None
        dim = max(out_dims, key=lambda d: self.analysis.sizes[d])
        size = self.analysis.sizes[dim]

        def least(grad: bool) -> int | None:
            # the fewest slices that fit (the need falls as the slices grow in number)
            if not fits(call(size, dim), grad):
                return None
            lo, hi = 1, size
            while lo < hi:
                mid = (lo + hi) // 2
                if fits(call(mid, dim), grad):
                    hi = mid
                else:
                    lo = mid + 1
            return lo

        chunks = least(grad=True) or least(grad=False)
        if chunks is None:
            return (None, 1, recompute) if fits(whole, grad=False) else None
        per = -(-size // chunks)
        chunks = -(-size // per)
        return out_dims.index(dim), chunks, recompute

    def product(self, slot: int, plates: frozenset[str], note: str) -> int:
        """Emit the product over ``plates`` of ``slot`` (nothing when ``plates`` is empty)."""
        if not plates:
            return slot
        src = self.slots[slot]
        positions = tuple(k for k, d in enumerate(src.dims) if d in plates)
        out = self.new_slot([d for d in src.dims if d not in plates])
        # its gradient is the output's, expanded (a view): no arithmetic
        return self.emit(PlateProduct(ins=(slot,), out=out, note=note, flops=src.numel,
                                      backward_flops=0, temp_numel=0, dims=positions))

    def normalize(self, term: int, total: int, kept: set[str], note: str) -> int:
        """Emit ``term`` divided by its ``total`` over the variables ``kept``."""
        src = self.slots[term]
        positions = tuple(k for k, d in enumerate(src.dims) if d in kept)
        out = self.new_slot(src.dims)
        total_numel = self.slots[total].numel
        return self.emit(NormalizeStep(ins=(term, total), out=out, note=note,
                                       flops=src.numel + 3 * total_numel,
                                       backward_flops=2 * src.numel, temp_numel=3 * total_numel,
                                       backward_numel=src.numel, dims=positions))
