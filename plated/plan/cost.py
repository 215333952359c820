"""The cost model: predicted FLOPs and peak memory of a plan, before any tensor work.

Each step predicts its own FLOPs (forward and backward) and working memory
(:mod:`plated.plan.ir`); this module walks the steps in order, tracking which intermediates are
alive, to give the peak of a forward run that frees intermediates and of one that keeps them all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .ir import Slot, Step, fmt_bytes

__all__ = ["CostReport", "cost_report"]


@dataclass
class CostReport:
    """Predicted cost of a plan, available before any tensor work.

    :ivar flops: predicted floating-point operations of one forward run.
    :ivar peak_bytes: predicted peak bytes of inputs plus live intermediates plus the working
        memory of the largest step, for a forward run that frees intermediates (no gradient).
    :ivar peak_bytes_saved: the same when every intermediate is kept, as for a gradient, MAP,
        sampling or marginals. It counts the plan's own intermediates and step temporaries, not
        autograd's extra saved tensors, backward temporaries or gradient buffers; measured peaks
        of log Z plus gradient run about twice this (see ``benchmarks/README.md``).
    :ivar steps: one printable line per step of the elimination plan.
    :ivar backward_flops: predicted floating-point operations of one backward pass (gradient,
        MAP or sampling), step by step as each step predicts it.
    """

    flops: int
    peak_bytes: int
    peak_bytes_saved: int
    steps: list[str] = field(default_factory=list)
    backward_flops: int = 0

    def __str__(self) -> str:
        lines = [
            f"plan: {len(self.steps)} steps, {self.flops:.3e} FLOPs, peak memory "
            f"{fmt_bytes(self.peak_bytes)} (forward) / {fmt_bytes(self.peak_bytes_saved)} "
            "(all intermediates kept)"
        ]
        lines += [f"  {i:3d}. {s}" for i, s in enumerate(self.steps)]
        return "\n".join(lines)


def cost_report(slots: Sequence[Slot], steps: Sequence[Step], n_inputs: int, itemsize: int
                ) -> CostReport:
    """The predicted cost of running ``steps`` over ``slots`` (the first ``n_inputs`` are the
    factors) with elements of ``itemsize`` bytes."""
    last_read: dict[int, int] = {}
    for k, step in enumerate(steps):
        for i in step.ins:
            last_read[i] = k
    inputs = sum(slots[i].numel for i in range(n_inputs))
    live = 0  # elements of intermediates still to be read
    peak = saved = inputs
    flops = backward = 0
    lines = []
    for k, step in enumerate(steps):
        out = slots[step.out].numel
        peak = max(peak, inputs + live + out + step.temp_numel)
        saved += out + (step.temp_numel if step.saves_temp else 0)
        live += out
        for i in step.ins:
            if i >= n_inputs and last_read.get(i) == k:
                live -= slots[i].numel
        flops += step.flops
        backward += step.backward_flops
        lines.append(step.describe(slots))
    return CostReport(flops=flops, peak_bytes=peak * itemsize, peak_bytes_saved=saved * itemsize,
                      steps=lines, backward_flops=backward)
