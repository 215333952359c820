"""The cost model: predicted FLOPs and peak memory of a plan, before any tensor work.

Each step predicts its own FLOPs (forward and backward) and working memory
(:mod:`plated.plan.ir`); this module walks the steps in order, tracking which intermediates are
alive, to give the peak of a forward run that frees intermediates and of one that keeps them all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from ..errors import MemoryCapError
from .ir import Slot, Step, fmt_bytes

if TYPE_CHECKING:
    from .ir import Plan

__all__ = ["CostReport", "cost_report", "check_query_memory", "CAP_MARGIN", "Query"]

#: The queries whose working memory a plan predicts (see :func:`check_query_memory`).
Query = Literal["log_partition", "gradient", "map", "sample"]

#: Headroom kept under a memory cap for the prediction's error: a step is sliced, and a query
#: refused, so that the predicted working memory times this factor stays under the cap. On the
#: battery of ``benchmarks/cost_accuracy.py`` no prediction of a query over 1 MB falls below
#: 1/1.25 of the measured working memory (see ``benchmarks/README.md``).
CAP_MARGIN = 1.25


@dataclass
class CostReport:
    """Predicted cost of a plan, available before any tensor work.

    Memory comes in two kinds of figure. ``peak_bytes`` and ``peak_bytes_saved`` count the
    inputs too (the footprint of a run). The *working memory* of a query (``working_bytes``,
    :meth:`backward_working_bytes`) is what a memory cap bounds: every tensor the engine
    allocates while it answers, beyond the inputs, their gradients and the query's results; that
    is, the intermediates alive at once, what autograd saves of them, the gradients of
    intermediates, and one step's temporaries, forward and backward.

    :ivar flops: predicted floating-point operations of one forward run.
    :ivar peak_bytes: predicted peak bytes of inputs plus live intermediates plus the working
        memory of the largest step, for a forward run that frees intermediates (no gradient).
    :ivar peak_bytes_saved: the inputs plus the working memory of log Z with its gradient
        (``working_bytes["gradient"]``).
    :ivar steps: one printable line per step of the elimination plan.
    :ivar backward_flops: predicted floating-point operations of one backward pass (gradient,
        MAP or sampling), step by step as each step predicts it.
    :ivar working_bytes: predicted working memory of ``"log_partition"`` (no gradient) and of
        ``"gradient"`` (log Z and its gradient, as marginals take it), in bytes.
    :ivar peak_step: for each figure of ``working_bytes`` (and ``"backward"``), the step at
        which it peaks.
    """

    flops: int
    peak_bytes: int
    peak_bytes_saved: int
    steps: list[str] = field(default_factory=list)
    backward_flops: int = 0
    working_bytes: dict[str, int] = field(default_factory=dict)
    peak_step: dict[str, int] = field(default_factory=dict)
    itemsize: int = 8
    #: per step, in elements: what is alive during its backward choice, its choice's working
    #: memory per parallel sample and shared by all, whether every sample shares the choice, and
    #: its chosen indices per sample
    choice: list[tuple[int, int, int, bool, int]] = field(default_factory=list)
    #: floating-point operations of a backward choice: shared by all samples, and per sample
    choose_flops: tuple[int, int] = (0, 0)
    #: elements alive at the peak of a forward run that keeps every intermediate
    keep_forward: int = 0

    def backward_working_bytes(self, num_samples: int = 1) -> int:
        """Predicted working memory of a MAP (``num_samples=1``, max ring) or of drawing
        ``num_samples`` joint samples (log ring): the forward run that keeps every intermediate,
        then the backward choice of every step."""
        return self._backward(num_samples)[0] * self.itemsize

    def backward_peak_step(self, num_samples: int = 1) -> int:
        """The step at which :meth:`backward_working_bytes` peaks (``-1``: the forward run)."""
        return self._backward(num_samples)[1]

    def _backward(self, num_samples: int) -> tuple[int, int]:
        best, peak = -1, self.keep_forward
        for k, (alive, per_sample, fixed, shared, indices) in enumerate(self.choice):
            need = (alive + max(fixed, per_sample * (1 if shared else num_samples))
                    + indices * num_samples)
            if need > peak:
                best, peak = k, need
        return peak, best

    def choice_flops(self, num_samples: int = 1) -> int:
        """Predicted floating-point operations of a backward choice of ``num_samples``."""
        shared, per_sample = self.choose_flops
        return shared + per_sample * num_samples

    def __str__(self) -> str:
        lines = [
            f"plan: {len(self.steps)} steps, {self.flops:.3e} FLOPs, peak memory "
            f"{fmt_bytes(self.peak_bytes)} (forward) / {fmt_bytes(self.peak_bytes_saved)} "
            "(with the gradient)"
        ]
        lines += [f"  {i:3d}. {s}" for i, s in enumerate(self.steps)]
        return "\n".join(lines)


def _forward(slots: Sequence[Slot], steps: Sequence[Step], n_inputs: int) -> tuple[int, int]:
    """Working memory (elements) of a forward run that frees each intermediate after its last
    read, and the step where it peaks."""
    last_read = _last_reads(steps)
    live = peak = 0
    at = 0
    for k, step in enumerate(steps):
        out = slots[step.out].numel
        if live + out + step.temp_numel > peak:
            peak, at = live + out + step.temp_numel, k
        live += out
        for i in set(step.ins):
            if i >= n_inputs and last_read.get(i) == k:
                live -= slots[i].numel
    return peak, at


def _last_reads(steps: Sequence[Step]) -> dict[int, int]:
    last: dict[int, int] = {}
    for k, step in enumerate(steps):
        for i in step.ins:
            last[i] = k
    return last


def _holds_inputs(step: Step) -> bool:
    """Whether autograd keeps the step's inputs alive until its backward (a recomputed step)."""
    return bool(getattr(step, "recompute", False))


def _gradient(slots: Sequence[Slot], steps: Sequence[Step], n_inputs: int) -> tuple[int, int]:
    """Working memory (elements) of log Z with its gradient, and the step where it peaks.

    Forward: live intermediates, the inputs of recomputed steps (held until their backward),
    and what autograd saves. Backward, step by step in reverse: what is still saved or held,
    the gradients of intermediates not yet consumed, the step's own backward memory and the
    gradients it creates.
    """
    last_read = _last_reads(steps)
    held_until: dict[int, int] = {}  # slot -> the step whose backward releases it
    for k, step in enumerate(steps):
        if _holds_inputs(step):
            for i in step.ins:
                if i >= n_inputs:
                    held_until[i] = min(held_until.get(i, k), k)
    live = held = saved = peak = 0
    at = 0
    alive: set[int] = set()
    for k, step in enumerate(steps):
        out = slots[step.out].numel
        need = live + held + saved + out + step.temp_numel
        if need > peak:
            peak, at = need, k
        saved += step.saved_numel
        live += out
        alive.add(step.out)
        for i in set(step.ins):
            if i >= n_inputs and last_read.get(i) == k and i in alive:
                alive.discard(i)
                live -= slots[i].numel
                if i in held_until:
                    held += slots[i].numel
    # the backward pass: the result and the intermediates still alive stay so until the end.
    # The gradients of the inputs are not working memory, but they are counted while the pass
    # runs (the peak may come before all exist) and taken off at the end, as a measurement of
    # the whole query less its gradients would see it.
    grads: set[int] = {steps[-1].out} if steps else set()
    grad_numel = sum(slots[i].numel for i in grads)
    input_grads: set[int] = set()
    input_grad_numel = 0
    for k in reversed(range(len(steps))):
        step = steps[k]
        new = {i for i in step.ins if i not in grads and i not in input_grads}
        # the step's saved tensors turn into its inputs' gradients one input at a time; a
        # recomputed step allocates all its inputs' gradients first
        sizes = [slots[i].numel for i in new]
        first = sum(sizes) if _holds_inputs(step) else max(sizes, default=0)
        need = (live + held + saved + grad_numel + input_grad_numel + step.backward_numel
                + first)
        if need > peak:
            peak, at = need, k
        if step.out in grads:
            grads.discard(step.out)
            grad_numel -= slots[step.out].numel
        for i in new:
            if i >= n_inputs:
                grads.add(i)
                grad_numel += slots[i].numel
            else:
                input_grads.add(i)
                input_grad_numel += slots[i].numel
        saved -= step.saved_numel
        for i, until in held_until.items():
            if until == k:
                held -= slots[i].numel
    all_input_grads = sum(slots[i].numel for i in range(n_inputs))
    return max(peak - all_input_grads, 0), at


def _choice(slots: Sequence[Slot], steps: Sequence[Step]
            ) -> tuple[int, list[tuple[int, int, int, bool, int]], tuple[int, int]]:
    """The forward run that keeps every intermediate (its peak, in elements), and per step its
    backward choice: what is alive, its memory per parallel sample, whether samples share it."""
    live = kept = peak = 0
    for step in steps:
        peak = max(peak, live + kept + slots[step.out].numel + step.temp_numel)
        live += slots[step.out].numel
        kept += step.kept_numel
    # a step's choice is shared by every sample while nothing has been chosen above it
    shared = {steps[-1].out: True} if steps else {}
    choice: list[tuple[int, int, int, bool, int]] = [(0, 0, 0, True, 0)] * len(steps)
    flops = [0, 0]
    for k in reversed(range(len(steps))):
        step = steps[k]
        share = shared.get(step.out, False)
        choice[k] = (live + kept, step.choose_numel, step.choose_fixed, share,
                     step.choose_indices)
        if share:
            flops[0] += step.choose_flops + step.choose_flops_fixed
        else:
            flops[0] += step.choose_flops_fixed
            flops[1] += step.choose_flops
        for i in step.ins:
            shared[i] = share and not step.eliminated()
    return peak, choice, (flops[0], flops[1])


def cost_report(slots: Sequence[Slot], steps: Sequence[Step], n_inputs: int, itemsize: int
                ) -> CostReport:
    """The predicted cost of running ``steps`` over ``slots`` (the first ``n_inputs`` are the
    factors) with elements of ``itemsize`` bytes."""
    inputs = sum(slots[i].numel for i in range(n_inputs))
    forward, forward_at = _forward(slots, steps, n_inputs)
    gradient, gradient_at = _gradient(slots, steps, n_inputs)
    keep_forward, choice, choose_flops = _choice(slots, steps)
    report = CostReport(
        flops=sum(step.flops for step in steps),
        peak_bytes=(inputs + forward) * itemsize,
        peak_bytes_saved=(inputs + gradient) * itemsize,
        steps=[step.describe(slots) for step in steps],
        backward_flops=sum(step.backward_flops for step in steps),
        working_bytes={"log_partition": forward * itemsize, "gradient": gradient * itemsize},
        peak_step={"log_partition": forward_at, "gradient": gradient_at},
        itemsize=itemsize, choice=choice, choose_flops=choose_flops,
        keep_forward=keep_forward)
    return report


_QUERY_WORDS = {"log_partition": "log Z", "gradient": "log Z with its gradient (marginals)",
                "map": "the MAP assignment", "sample": "sampling"}


def check_query_memory(plan: Plan, query: Query, num_samples: int = 1) -> None:
    """Refuse, before any tensor work, a query whose predicted working memory does not fit the
    plan's memory cap (with :data:`CAP_MARGIN` headroom); nothing happens without a cap.

    The working memory is what the cap bounds: every tensor the engine allocates while it
    answers, beyond the inputs, their gradients and the query's results (see
    :class:`CostReport`).

    :param query: ``"log_partition"`` (no gradient), ``"gradient"`` (log Z and its gradient, as
        marginals take it), ``"map"`` or ``"sample"`` (``num_samples`` of them).
    :raises MemoryCapError: naming the query, the predicted need, the step at its peak and the
        cap.
    """
    cap = plan.structure.memory_cap
    if cap is None:
        return
    cost = plan.cost
    if query in ("map", "sample"):
        need = cost.backward_working_bytes(num_samples)
        at = cost.backward_peak_step(num_samples)
    else:
        need, at = cost.working_bytes[query], cost.peak_step[query]
    if need * CAP_MARGIN <= cap:
        return
    where = (f"at step {at} ({cost.steps[at].strip()})" if 0 <= at < len(cost.steps)
             else "in its forward pass")
    what = _QUERY_WORDS[query] + (f" of {num_samples} samples" if query == "sample" else "")
    raise MemoryCapError(
        f"{what} needs about {fmt_bytes(need)} of working memory, peaking {where}; with the "
        f"prediction's headroom (x{CAP_MARGIN}) that is over the memory cap of "
        f"{fmt_bytes(cap)}: raise memory_cap"
        + (", or draw fewer samples at a time" if query == "sample" else "")
    )
