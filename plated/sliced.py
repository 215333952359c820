"""Sliced steps: a step run slice by slice along one output dim, under a memory cap.

A plan slices a step when its working memory would exceed the memory cap (see
:mod:`plated.plan.emit`). :func:`run_sliced` then computes the output slice by slice into one
preallocated tensor, so that only one slice's temporaries are alive at a time.

Under autograd the same promise holds for the backward pass: :class:`_Sliced` saves only the
step's inputs, not the temporaries of any slice, and its backward pass recomputes each slice
(with gradients) and writes that slice's input gradients into one buffer per input. The
forward work of the step is therefore done twice when a gradient is taken, which is the price of
the cap. A second derivative (``create_graph=True``) differentiates the unsliced step instead,
outside the cap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["SliceSpec", "run_sliced"]

#: a step on one slice: ``fn(parts, n)`` with ``parts`` the inputs narrowed to the slice and
#: ``n`` its length along the sliced dim
SliceFn = Callable[[Sequence[torch.Tensor], int], torch.Tensor]


@dataclass(frozen=True)
class SliceSpec:
    """How a step is sliced.

    :ivar in_dims: per input, the dim that runs along the sliced output dim (``None``: the input
        does not have it and every slice reads it whole).
    :ivar out_dim: the sliced dim of the output (``None``: one slice, the whole step, which is
        then only recomputed by the backward pass).
    :ivar size: the output's extent along ``out_dim``.
    :ivar chunks: the number of slices.
    """

    in_dims: tuple[int | None, ...]
    out_dim: int | None
    size: int
    chunks: int

    @classmethod
    def whole(cls, n_inputs: int) -> SliceSpec:
        """One slice: the step unsliced, recomputed by its gradient."""
        return cls((None,) * n_inputs, None, 1, 1)

    def slices(self) -> list[tuple[int, int]]:
        """``(start, length)`` of each slice."""
        if self.out_dim is None:
            return [(0, self.size)]
        per = -(-self.size // self.chunks)
        return [(start, min(per, self.size - start)) for start in range(0, self.size, per)]

    def narrow(self, xs: Sequence[torch.Tensor], start: int, n: int) -> list[torch.Tensor]:
        """The inputs narrowed to one slice."""
        return [x if d is None else x.narrow(d, start, n) for x, d in zip(xs, self.in_dims,
                                                                           strict=True)]


def _fill(fn: SliceFn, spec: SliceSpec, xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Every slice of the step, written into one preallocated output (no autograd)."""
    if spec.out_dim is None:
        return fn(list(xs), spec.size)
    out: torch.Tensor | None = None
    for start, n in spec.slices():  # the plan chose these slices, under its memory cap
        part = fn(spec.narrow(xs, start, n), n)
        if out is None:
            shape = list(part.shape)
            shape[spec.out_dim] = spec.size
            out = part.new_empty(shape)
        out.narrow(spec.out_dim, start, n).copy_(part)
        del part
    assert out is not None  # a sliced dim has at least one element
    return out


class _Sliced(torch.autograd.Function):
    """A sliced step whose backward pass recomputes one slice at a time (module docstring)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, fn: SliceFn, spec: SliceSpec,
                *xs: torch.Tensor) -> torch.Tensor:
        ctx.fn, ctx.spec = fn, spec  # type: ignore[attr-defined]
        ctx.save_for_backward(*xs)
        return _fill(fn, spec, xs)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, *grads: torch.Tensor
                 ) -> tuple[torch.Tensor | None, ...]:
        fn: SliceFn = ctx.fn  # type: ignore[attr-defined]
        spec: SliceSpec = ctx.spec  # type: ignore[attr-defined]
        xs = ctx.saved_tensors  # type: ignore[attr-defined]
        (g,) = grads
        wanted = ctx.needs_input_grad[2:]  # type: ignore[attr-defined]
        if torch.is_grad_enabled():  # a second derivative: differentiate the unsliced step
            with torch.enable_grad():
                parts = [fn(spec.narrow(xs, start, n), n) for start, n in spec.slices()]
                full = parts[0] if spec.out_dim is None else torch.cat(parts, dim=spec.out_dim)
                used = [x for x, w in zip(xs, wanted, strict=True) if w]
                got = iter(torch.autograd.grad(full, used, g, create_graph=True))
            return (None, None, *(next(got) if w else None for w in wanted))
        buffers = [torch.zeros_like(x) if w else None for x, w in zip(xs, wanted, strict=True)]
        for start, n in spec.slices():  # the plan chose these slices, under its memory cap
            parts = [p.detach().requires_grad_(w)
                     for p, w in zip(spec.narrow(xs, start, n), wanted, strict=True)]
            with torch.enable_grad():
                y = fn(parts, n)
            used = [p for p, w in zip(parts, wanted, strict=True) if w]
            g_part = g if spec.out_dim is None else g.narrow(spec.out_dim, start, n)
            got = iter(torch.autograd.grad(y, used, g_part))
            del y
            for buf, d, w in zip(buffers, spec.in_dims, wanted, strict=True):
                if not w:
                    continue
                assert buf is not None
                part_grad = next(got)
                (buf if d is None else buf.narrow(d, start, n)).add_(part_grad)
                del part_grad
        return (None, None, *buffers)


def run_sliced(fn: SliceFn, spec: SliceSpec, xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Run a step slice by slice (module docstring); differentiable in ``xs``."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in xs):
        return _Sliced.apply(fn, spec, *xs)
    return _fill(fn, spec, xs)
