"""Running plans: tensor variable elimination forward, and the same plan backward.

:func:`run_plan` executes the steps of a :class:`~plated.plan.Plan` in a ring. :func:`run_backward`
walks the steps in reverse, choosing each eliminated variable with the ring's ``choose`` given the
variables chosen so far (argmax for :class:`~plated.rings.MaxRing`, a sample for
:class:`~plated.rings.LogRing`), which is the backward pass of Algorithm 1 of Obermeyer et al.
(2019). Marginals are the gradient of the log partition function with respect to the factors,
i.e. the same plan run backward by autograd.

:func:`einsum` is the functional face, with the semantics of :func:`pyro.ops.contract.einsum`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import GraphError
from .factor import Plate
from .markov import (
    Eliminated,
    chain_backward,
    chain_forward,
    factored_scan,
    scan_backward,
    scan_forward,
    unravel,
)
from .plan import (
    ChainStep,
    NormalizeStep,
    PairStep,
    Plan,
    PlateProduct,
    ReduceStep,
    ScanStep,
    Step,
    Structure,
    check_query_memory,
    make_plan,
)
from .plan.analysis import dim_sizes, variable_ordinals
from .rings import Semiring, get_ring
from .sliced import SliceSpec, run_sliced
from .typing import RingName

__all__ = ["run_plan", "run_backward", "einsum", "einsum_structures", "check_values"]


Saved = Eliminated


def check_values(tensors: Sequence[torch.Tensor], labels: Sequence[str]) -> None:
    """Check dtypes, devices and values of factors (one host-device sync for the values).

    Tensors on the ``meta`` device have no values: only their dtypes and devices are checked.

    :raises GraphError: naming the first factor with a non-floating dtype, a dtype or device that
        differs from the first factor's, or a NaN or ``+inf`` entry.
    """
    check_types(tensors, labels)
    if tensors[0].device.type == "meta":  # shapes only (e.g. to trace or plan): no values
        return
    if bool(value_suspects(tensors)):  # the one sync
        name_bad_values(tensors, labels)


def check_types(tensors: Sequence[torch.Tensor], labels: Sequence[str]) -> None:
    """The dtype and device part of :func:`check_values` (no tensor work, no sync).

    :raises GraphError: naming the first factor with a non-floating dtype, or a dtype or device
        that differs from the first factor's.
    """
    if not tensors:
        raise GraphError("a plated factor graph needs at least one factor")
    dtype, device = tensors[0].dtype, tensors[0].device
    for t, lab in zip(tensors, labels, strict=True):
        if not t.dtype.is_floating_point:
            raise GraphError(
                f"factor {lab} has dtype {t.dtype}; factors are log potentials, use a floating "
                "dtype (e.g. .double() or .float())"
            )
        if t.dtype != dtype:
            raise GraphError(
                f"factor {lab} has dtype {t.dtype} but factor {labels[0]} has {dtype}; convert "
                "all factors to one dtype"
            )
        if t.device != device:
            raise GraphError(
                f"factor {lab} is on {t.device} but factor {labels[0]} is on {device}; move all "
                "factors to one device"
            )


#: The dtype :func:`value_suspects` sums a factor of each dtype in (its own where not listed).
_SUM_DTYPE = {torch.float16: torch.float32}


def value_suspects(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """A 0-dim bool tensor, ``True`` when some factor may hold a NaN or ``+inf``; no sync.

    One reduction per factor: a NaN or ``+inf`` anywhere makes its sum NaN or ``+inf`` (``-inf``
    alone gives ``-inf``), so ``False`` proves every factor clean; on ``True``, call
    :func:`name_bad_values`. The sums run in the factors' own dtype (float32 for half precision,
    whose range a sum of ordinary log values exceeds), with no converted copy of any factor: a
    sum that overflows only makes a false alarm, which :func:`name_bad_values` clears.
    """
    total = torch.stack([t.detach().sum(dtype=_SUM_DTYPE.get(t.dtype, t.dtype))
                         for t in tensors])
    return (torch.isnan(total) | (total == torch.inf)).any()


def name_bad_values(tensors: Sequence[torch.Tensor], labels: Sequence[str]) -> None:
    """Look factor by factor for a NaN or ``+inf`` (after :func:`value_suspects` said so).

    :raises GraphError: naming the first factor that holds one.
    """
    for k, t in enumerate(tensors):
        has_nan = bool(t.isnan().any())
        if has_nan or bool((t == torch.inf).any()):
            raise GraphError(
                f"factor {labels[k]} contains {'NaN' if has_nan else '+inf'}; factors are "
                "log potentials, finite or -inf (a hard zero)"
            )


def _sliced_pair(ring: Semiring, plan: Plan, step: PairStep, a: torch.Tensor, b: torch.Tensor
                 ) -> torch.Tensor:
    """Run a pairwise step in ``step.slice_chunks`` slices along its output dim ``slice_dim``,
    or whole, recomputed by its gradient (:func:`~plated.sliced.run_sliced`)."""
    if step.slice_dim is None:
        return run_sliced(lambda parts, n: ring.pair(parts[0], parts[1], step.layout),
                          SliceSpec.whole(2), (a, b))
    out = plan.slots[step.out]
    dim = out.dims[step.slice_dim]
    dims_a, dims_b = plan.slots[step.ins[0]].dims, plan.slots[step.ins[1]].dims
    union = sorted(set(dims_a) | set(dims_b), key=plan.order.__getitem__)
    union_pos = union.index(dim)
    spec = SliceSpec((dims_a.index(dim) if dim in dims_a else None,
                      dims_b.index(dim) if dim in dims_b else None),
                     step.slice_dim, out.shape[step.slice_dim], step.slice_chunks)
    slice_dim = step.slice_dim

    def one(parts: Sequence[torch.Tensor], n: int) -> torch.Tensor:
        return ring.pair(parts[0], parts[1], step.layout.narrowed(slice_dim, union_pos, n))

    return run_sliced(one, spec, (a, b))


def _sliced_reduce(ring: Semiring, plan: Plan, step: ReduceStep, x: torch.Tensor
                   ) -> torch.Tensor:
    """Run a reduction in ``step.slice_chunks`` slices along its output dim ``slice_dim``, or
    whole, recomputed by its gradient."""
    if step.slice_dim is None:
        spec = SliceSpec.whole(1)
    else:
        out = plan.slots[step.out]
        dim = plan.slots[step.ins[0]].dims.index(out.dims[step.slice_dim])
        spec = SliceSpec((dim,), step.slice_dim, out.shape[step.slice_dim], step.slice_chunks)
    return run_sliced(lambda parts, n: ring.reduce(parts[0], step.dims), spec, (x,))


def _live(vals: list[torch.Tensor | None], slot: int) -> torch.Tensor:
    """The value of ``slot``: every slot is written before it is read and freed after."""
    value = vals[slot]
    assert value is not None, f"slot {slot} read before it was written or after it was freed"
    return value


def run_plan(
    plan: Plan, tensors: Sequence[torch.Tensor], ring: Semiring, keep: bool = False
) -> tuple[list[torch.Tensor | None], dict[int, Saved]]:
    """Run ``plan`` forward in ``ring``.

    :param tensors: the factors' tensors, in the structure's order and dim order.
    :param keep: keep every intermediate (needed by :func:`run_backward`); otherwise each is
        dropped once used.
    :return: the value of every slot (``None`` for dropped ones) and, per chain step, what its
        backward choice needs.
    """
    vals: list[torch.Tensor | None] = [None] * len(plan.slots)
    for k, (t, perm) in enumerate(zip(tensors, plan.input_perms, strict=True)):
        vals[k] = t if perm is None else t.permute(perm)
    saved: dict[int, Saved] = {}
    fuse = bool(plan.fused) and not keep and ring.name == "log"
    pending: dict[int, list[torch.Tensor]] = {}
    for k, step in enumerate(plan.steps):
        if fuse and (k in plan.fused or (isinstance(step, ScanStep) and step.ins[0] in pending)):
            _fused(ring, plan, step, vals, pending)
            for i in plan.frees[k]:
                vals[i] = None
            continue
        ins = [_live(vals, i) for i in step.ins]
        x = ins[0]
        match step:
            case PairStep():
                y = ins[1]
                if step.slice_dim is None and not step.recompute:
                    result = ring.pair(x, y, step.layout)
                else:
                    result = _sliced_pair(ring, plan, step, x, y)
            case ReduceStep():
                result = (ring.reduce(x, step.dims)
                          if step.slice_dim is None and not step.recompute
                          else _sliced_reduce(ring, plan, step, x))
            case PlateProduct():
                result = ring.product(x, step.dims)
            case ChainStep():
                result, kept = chain_forward(ring, ins, step.layout, step.method)
                if keep:
                    saved[k] = kept
            case NormalizeStep():
                total = ins[1]
                for position in step.dims:
                    total = total.unsqueeze(position)
                # not detached: the conditional depends on the total (an all -inf slice stays
                # -inf)
                result = x - torch.where(torch.isfinite(total), total, torch.zeros_like(total))
            case ScanStep():
                result, kept = scan_forward(ring, x, step.layout, step.method)
                if keep:
                    saved[k] = kept
            case _:  # pragma: no cover - every step type is handled above
                raise TypeError(f"unknown plan step {type(step).__name__}")
        vals[step.out] = result
        if not keep:
            for i in plan.frees[k]:
                vals[i] = None
    return vals, saved


def _fused(ring: Semiring, plan: Plan, step: Step, vals: list[torch.Tensor | None],
           pending: dict[int, list[torch.Tensor]]) -> None:
    """Run a step of a fused transition (:attr:`~plated.plan.Plan.fused`): each pair step
    hands its operands on, unsummed, laid along its output's dims (extent 1 where one lacks a
    dim); the chain step eliminates them by :func:`~plated.markov.factored_scan`, or sums them
    first where they are not of a form it can use."""
    if isinstance(step, PairStep):
        out = plan.slots[step.out].dims
        parts: list[torch.Tensor] = []
        for i, view in zip(step.ins, (step.layout.view_a, step.layout.view_b), strict=True):
            if i in pending:  # the parts of an earlier fused pair, laid along this output
                dims = plan.slots[i].dims
                parts += [p.reshape([p.shape[dims.index(d)] if d in dims else 1 for d in out])
                          for p in pending.pop(i)]
            else:
                parts.append(_live(vals, i).reshape(view))
        pending[step.out] = parts
        return
    assert isinstance(step, ScanStep)
    parts = pending.pop(step.ins[0])
    result = factored_scan(parts, step.layout)
    if result is None:
        total = parts[0]
        for p in parts[1:]:
            total = total + p
        result, _ = scan_forward(ring, total, step.layout, step.method)
    vals[step.out] = result


def _gather(x: torch.Tensor, dims: tuple[str, ...], ctx: dict[str, torch.Tensor],
            plates: tuple[str, ...], elim: tuple[str, ...]) -> torch.Tensor:
    """Index ``x`` at the chosen values in ``ctx``: result ``(S|1, *plates, *elim)``."""
    nl, ne = len(plates), len(elim)
    idx: list[torch.Tensor] = []
    for k, d in enumerate(dims):
        n = x.shape[k]
        if d in ctx:
            v = ctx[d]
            idx.append(v.reshape(v.shape + (1,) * ne))
        else:
            shape = [1] * (1 + nl + ne)
            pos = 1 + plates.index(d) if d in plates else 1 + nl + elim.index(d)
            shape[pos] = n
            idx.append(torch.arange(n, device=x.device).view(shape))
    if not idx:
        return x.reshape((1,) * (1 + nl + ne))
    return x[tuple(idx)]


def _choose_jointly(ring: Semiring, logits: torch.Tensor, elim: tuple[str, ...],
                    sizes: tuple[int, ...], plate_sizes: tuple[int, ...], num_samples: int
                    ) -> dict[str, torch.Tensor]:
    """Choose ``elim`` jointly from ``logits`` ``(S|1, *plates|1, *sizes)``; each choice is
    ``(num_samples, *plate_sizes)``."""
    flat = logits.reshape(tuple(logits.shape[: logits.dim() - len(sizes)]) + (-1,))
    picked = ring.choose(flat, num_samples)
    full = (num_samples,) + plate_sizes
    if tuple(picked.shape) != full:
        picked = picked.expand(full).contiguous()
    return dict(zip(elim, unravel(picked, sizes), strict=True))


def _choose_eliminated(plan: Plan, step: PairStep | ReduceStep, vals: list[torch.Tensor | None],
                       ctx: dict[str, torch.Tensor], out_plates: tuple[str, ...], ring: Semiring,
                       num_samples: int) -> dict[str, torch.Tensor]:
    """The backward choice of the variables a pair or reduce step eliminated, given ``ctx``
    (:func:`_choose_from`), in ``step.choose_chunks`` chunks along plate ``step.choose_plate``
    when the plan chose so under its memory cap (every plate element chooses on its own)."""
    xs = [_live(vals, i) for i in step.ins]
    plate_sizes = tuple(plan.slots[step.out].shape[k] for k, d in
                        enumerate(plan.slots[step.out].dims) if d in out_plates)
    if step.choose_plate is None or step.choose_chunks <= 1:
        return _choose_from(plan, step, xs, ctx, out_plates, plate_sizes, ring, num_samples)
    k = out_plates.index(step.choose_plate)
    size = plate_sizes[k]
    per = -(-size // step.choose_chunks)
    parts = []
    for start in range(0, size, per):  # the plan chose these chunks, under its memory cap
        n = min(per, size - start)
        xs_n = [x.narrow(plan.slots[i].dims.index(step.choose_plate), start, n)
                if step.choose_plate in plan.slots[i].dims else x
                for x, i in zip(xs, step.ins, strict=True)]
        ctx_n = {v: t.narrow(1 + k, start, n) if t.dim() > 1 + k and t.shape[1 + k] == size
                 else t for v, t in ctx.items()}
        sizes_n = plate_sizes[:k] + (n,) + plate_sizes[k + 1:]
        parts.append(_choose_from(plan, step, xs_n, ctx_n, out_plates, sizes_n, ring,
                                  num_samples))
    return {v: torch.cat([part[v] for part in parts], dim=1 + k) for v in parts[0]}


def _choose_from(plan: Plan, step: PairStep | ReduceStep, xs: Sequence[torch.Tensor],
                 ctx: dict[str, torch.Tensor], out_plates: tuple[str, ...],
                 plate_sizes: tuple[int, ...], ring: Semiring, num_samples: int
                 ) -> dict[str, torch.Tensor]:
    """The backward choice of the variables a pair or reduce step eliminated, from its inputs
    ``xs`` given ``ctx``.

    A pair step's eliminated variables are chosen in two stages, so that no tensor spans the
    union of both operands' dims: first those the operands share, from the product of each
    operand with its private variables eliminated (the step's own forward order); then each
    operand's private variables, given the shared ones. Both rings factor this way: it is an
    exact joint sample (log ring) or a joint argmax (max ring).
    """
    sizes = plan.var_sizes
    if isinstance(step, ReduceStep) or len(step.ins) == 1:
        (only,) = step.ins
        gathered = _gather(xs[0], plan.slots[only].dims, ctx, out_plates, step.elim)
        return _choose_jointly(ring, gathered, step.elim, tuple(sizes[e] for e in step.elim),
                               plate_sizes, num_samples)
    a, b = step.ins
    dims_a, dims_b = plan.slots[a].dims, plan.slots[b].dims
    shared = tuple(e for e in step.elim if e in dims_a and e in dims_b)
    own = [tuple(e for e in step.elim if e in dims and e not in shared)
           for dims in (dims_a, dims_b)]
    picked: dict[str, torch.Tensor] = {}
    if shared:
        logits: torch.Tensor | None = None
        for x, slot, private in zip(xs, (a, b), own, strict=True):
            g = _gather(x, plan.slots[slot].dims, ctx, out_plates, shared + private)
            g = ring.reduce(g, tuple(range(g.dim() - len(private), g.dim())))
            logits = g if logits is None else logits + g
        assert logits is not None
        picked.update(_choose_jointly(ring, logits, shared, tuple(sizes[e] for e in shared),
                                      plate_sizes, num_samples))
    given = {**ctx, **picked}
    for x, slot, private in zip(xs, (a, b), own, strict=True):
        if private:
            g = _gather(x, plan.slots[slot].dims, given, out_plates, private)
            picked.update(_choose_jointly(ring, g, private, tuple(sizes[e] for e in private),
                                          plate_sizes, num_samples))
    return picked


def run_backward(
    plan: Plan,
    vals: list[torch.Tensor | None],
    saved: dict[int, Saved],
    ring: Semiring,
    num_samples: int,
) -> dict[str, torch.Tensor]:
    """Walk ``plan`` backward, choosing every eliminated variable with ``ring.choose``.

    :return: for each variable, a long tensor ``(num_samples, *plate sizes)`` over its plates in
        declaration order.
    """
    plates = {p.name: p.size for p in plan.structure.plates}
    ctxs: dict[int, dict[str, torch.Tensor]] = {plan.result: {}}
    chosen: dict[str, torch.Tensor] = {}
    for k in reversed(range(len(plan.steps))):
        step = plan.steps[k]
        ctx = ctxs.pop(step.out)
        out_slot = plan.slots[step.out]
        out_plates = tuple(d for d in out_slot.dims if d in plates)
        match step:
            case PairStep() | ReduceStep():
                # choose the eliminated variables given everything chosen after this step
                picked = _choose_eliminated(plan, step, vals, ctx, out_plates, ring, num_samples)
                chosen.update(picked)
                new = {**ctx, **picked}
                for i in step.ins:
                    ctxs[i] = new
            case PlateProduct():
                # the chosen values broadcast over the plates the product removed
                in_dims = plan.slots[step.ins[0]].dims
                in_plates = tuple(d for d in in_dims if d in plates)
                added = [k2 for k2, p in enumerate(in_plates) if p not in out_plates]
                new = {}
                for name, v in ctx.items():
                    for pos in added:
                        v = v.unsqueeze(1 + pos)
                    new[name] = v
                ctxs[step.ins[0]] = new
            case ChainStep():
                picked = chain_backward(ring, saved[k], step.layout, ctx, num_samples,
                                        out_plates, plates)
                chosen.update(picked)
                new = {**ctx, **picked}
                for i in step.ins:
                    ctxs[i] = new
            case ScanStep():
                picked, child = scan_backward(ring, saved[k], step.layout, ctx,
                                              num_samples, plates)
                chosen.update(picked)
                ctxs[step.ins[0]] = child
            case _:  # a normalize step belongs to plans that keep variables (log Z only)
                raise TypeError(f"plan step {type(step).__name__} has no backward choice")
    return chosen


# ----------------------------------------------------------------------------------------------
# functional face


def _parse(equation: str, operands: Sequence[torch.Tensor], plates: str
           ) -> tuple[list[str], list[str]]:
    if not isinstance(equation, str) or "->" not in equation:
        raise GraphError(f"einsum equation {equation!r} needs an explicit '->' output")
    if "." in equation:
        raise GraphError(f"einsum equation {equation!r}: ellipsis is not supported; name each dim")
    lhs, rhs = equation.replace(" ", "").split("->")
    inputs = lhs.split(",")
    outputs = rhs.split(",")
    if len(inputs) != len(operands):
        raise GraphError(
            f"einsum equation {equation!r} names {len(inputs)} inputs but {len(operands)} "
            "operands were given"
        )
    for k, (dims, x) in enumerate(zip(inputs, operands, strict=True)):
        if not isinstance(x, torch.Tensor):
            raise GraphError(f"einsum operand {k} ({dims!r}) is a {type(x).__name__}, not a Tensor")
        if len(dims) != x.dim():
            raise GraphError(
                f"einsum operand {k} ({dims!r}) has {x.dim()} dims, shape {tuple(x.shape)}; the "
                "equation names one letter per dim"
            )
        repeated = sorted({d for d in dims if dims.count(d) > 1}, key=dims.index)
        if repeated:  # Pyro's einsum refuses these too
            first = dims.index(repeated[0])
            second = dims.index(repeated[0], first + 1)
            raise GraphError(
                f"einsum operand {k} ({dims!r}) repeats dim {repeated[0]!r}; a repeated index "
                f"(a diagonal) is not supported: take the diagonal first (x.diagonal(dim1={first}"
                f", dim2={second}) puts it last) and name each dim once"
            )
        for d, n in zip(dims, x.shape, strict=True):
            if n == 0:
                raise GraphError(
                    f"einsum operand {k} ({dims!r}) has dim {d!r} of size 0 (shape "
                    f"{tuple(x.shape)}); every dim needs at least one element: drop the dim or "
                    "the operand"
                )
    known = set("".join(inputs))
    for out in outputs:
        for d in out:
            if d not in known:
                raise GraphError(
                    f"einsum output {out!r} names dim {d!r}, which no input has"
                )
        if len(set(out)) != len(out):
            raise GraphError(f"einsum output {out!r} repeats a dim")
    return inputs, outputs


def einsum_structures(
    equation: str,
    *operands: torch.Tensor,
    plates: str = "",
    ring: RingName = "log",
    memory_cap: int | None = None,
) -> tuple[list[Structure], dict[str, int]]:
    """The plan structure of each output of :func:`einsum` (the same arguments), and the size of
    every letter: what :func:`einsum` plans, for inspecting its plans without running them.

    :raises GraphError: as :func:`einsum` does, for a malformed equation or output.
    """
    inputs, outputs = _parse(equation, operands, plates)
    return _structures(inputs, outputs, operands, plates, ring, memory_cap)


def _structures(inputs: list[str], outputs: list[str], operands: Sequence[torch.Tensor],
                plates: str, ring: RingName, memory_cap: int | None
                ) -> tuple[list[Structure], dict[str, int]]:
    """:func:`einsum_structures` of a parsed equation."""
    plate_set = set(plates)
    labels = tuple(f"{k}:{dims}" for k, dims in enumerate(inputs))
    sizes = dim_sizes(zip(inputs, (tuple(x.shape) for x in operands), labels, strict=True))
    plate_objs = tuple(Plate(p, sizes[p]) for p in sorted(plate_set) if p in sizes)
    itemsize = operands[0].element_size() if operands else 8
    device = operands[0].device.type if operands else "cpu"
    ordinals = variable_ordinals(inputs, plate_objs)
    shapes = tuple((tuple(d), tuple(x.shape)) for d, x in zip(inputs, operands, strict=True))
    structures = []
    for out in outputs:
        out_vars = [d for d in out if d not in plate_set]
        for v in out_vars:
            missing = ordinals[v] - set(out)
            if missing:
                raise GraphError(
                    f"einsum output {out!r} keeps variable {v!r} without its plates "
                    f"{sorted(missing)}; add them to the output"
                )
        structures.append(Structure(plate_objs, shapes, labels, keep_vars=tuple(out_vars),
                                    ring=ring, itemsize=itemsize, memory_cap=memory_cap,
                                    device=device))
    return structures, sizes


def einsum(
    equation: str,
    *operands: torch.Tensor,
    plates: str = "",
    ring: RingName = "log",
    memory_cap: int | None = None,
    validate: bool = True,
) -> tuple[torch.Tensor, ...]:
    """Plated sum-product (or max-product) of log-space tensors by tensor variable elimination.

    Follows the semantics of :func:`pyro.ops.contract.einsum` with the log backend: letters in
    ``plates`` are plate dims (reduced by product), every other letter is a variable (reduced by
    sum, or max for ``ring="max"``). A variable's plates are the intersection of the plates of the
    inputs that mention it. Each comma-separated output is computed exactly, as
    :func:`pyro.ops.contract.naive_ubersum` defines it:

    .. math::

        \\mathrm{out}[p, v] = \\log \\sum_{\\text{all other assignments}}
        \\prod_{\\text{factors } f,\\ \\text{plate elements}} f

    with output variables ``v`` clamped (at plate element ``p`` where they are plated). An output
    that keeps a plated variable must keep all of that variable's plates.

    >>> import torch, plated
    >>> x, y = torch.randn(3, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    >>> (z,) = plated.einsum("ab,b->", x, y)
    >>> torch.allclose(z, (x + y).logsumexp((0, 1)))
    True

    :param equation: e.g. ``"ai,abi->b"``; several outputs may be separated by commas.
    :param operands: log-space tensors, one per input.
    :param plates: the plate letters.
    :param ring: ``"log"`` (sum-product) or ``"max"`` (max-product).
    :param memory_cap: optional cap in bytes on the working memory of the call, with its
        gradient if one is taken (see :class:`~plated.plan.cost.CostReport`).
    :param validate: check values for NaN and ``+inf`` (costs one host-device sync).
    :return: one tensor per output, dims in the output's order.
    :raises GraphError: on malformed equations, mismatched sizes, dtypes, devices or bad values,
        or an output that keeps a plated variable without its plates.
    :raises IntractableError: if the contraction has no polynomial-time elimination.
    """
    inputs, outputs = _parse(equation, operands, plates)
    r = get_ring(ring)
    structures, sizes = _structures(inputs, outputs, operands, plates, r.name, memory_cap)
    labels = structures[0].labels  # an equation has at least one output
    plans = [make_plan(structure) for structure in structures]
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in operands)
    for plan in plans:
        check_query_memory(plan, "gradient" if grad else "log_partition")
    # every structural error (tractability included) is raised above, before any tensor work
    if validate:
        check_values(operands, labels)
    results = []
    for out, plan in zip(outputs, plans, strict=True):
        vals, _ = run_plan(plan, operands, r)
        res = vals[plan.result]
        assert res is not None
        layout = list(plan.result_dims)
        # lay out as requested, broadcasting over output plates not present
        for d in out:
            if d not in layout:
                res = res.unsqueeze(-1)
                layout.append(d)
        res = res.permute([layout.index(d) for d in out])
        res = res.expand(tuple(sizes[d] for d in out))
        results.append(res)
    return tuple(results)
