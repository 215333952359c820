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
from .markov import chain_backward, chain_forward, scan_backward, scan_forward, unravel
from .plan import Op, Plan, Structure, make_plan
from .plan.analysis import dim_sizes, variable_ordinals
from .rings import PairSpec, RingName, Semiring, get_ring

__all__ = ["run_plan", "run_backward", "einsum", "check_values"]


Saved = tuple[list[torch.Tensor], list[int], torch.Tensor | None]


def check_values(tensors: Sequence[torch.Tensor], labels: Sequence[str]) -> None:
    """Check dtypes, devices and values of factors (one host-device sync for the values).

    :raises GraphError: naming the first factor with a non-floating dtype, a dtype or device that
        differs from the first factor's, or a NaN or ``+inf`` entry.
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
    # one reduction per factor and one sync: a NaN or +inf anywhere makes its sum NaN or +inf
    # (-inf alone gives -inf); on suspicion, look factor by factor
    total = torch.stack([t.detach().sum(dtype=torch.float64) for t in tensors])
    suspect = torch.isnan(total) | (total == torch.inf)
    if bool(suspect.any()):
        for k, t in enumerate(tensors):
            has_nan = bool(t.isnan().any())
            if has_nan or bool((t == torch.inf).any()):
                raise GraphError(
                    f"factor {labels[k]} contains {'NaN' if has_nan else '+inf'}; factors are "
                    "log potentials, finite or -inf (a hard zero)"
                )


def _chunk_spec(spec: PairSpec, out_pos: int, union_pos: int, n: int) -> PairSpec:
    def fix(shape: tuple[int, ...], pos: int) -> tuple[int, ...]:
        return shape if shape[pos] == 1 else shape[:pos] + (n,) + shape[pos + 1:]

    return PairSpec(spec.equation, spec.red_a, spec.red_b, fix(spec.shift_a, out_pos),
                    fix(spec.shift_b, out_pos), fix(spec.view_a, union_pos),
                    fix(spec.view_b, union_pos), spec.red_union)


def _sliced_pair(ring: Semiring, plan: Plan, op: Op, a: torch.Tensor, b: torch.Tensor
                 ) -> torch.Tensor:
    assert op.spec is not None and op.slice_dim is not None
    out = plan.slots[op.out]
    d = out.dims[op.slice_dim]
    da, db = plan.slots[op.ins[0]].dims, plan.slots[op.ins[1]].dims
    union = sorted(set(da) | set(db), key=plan.order.__getitem__)
    union_pos = union.index(d)
    size = out.shape[op.slice_dim]
    per = -(-size // op.slice_chunks)
    parts = []
    for start in range(0, size, per):
        n = min(per, size - start)
        ca = a.narrow(da.index(d), start, n) if d in da else a
        cb = b.narrow(db.index(d), start, n) if d in db else b
        parts.append(ring.pair(ca, cb, _chunk_spec(op.spec, op.slice_dim, union_pos, n)))
    return torch.cat(parts, dim=op.slice_dim)


def run_plan(
    plan: Plan, tensors: Sequence[torch.Tensor], ring: Semiring, keep: bool = False
) -> tuple[list[torch.Tensor | None], dict[int, Saved]]:
    """Run ``plan`` forward in ``ring``.

    :param tensors: the factors' tensors, in the structure's order and dim order.
    :param keep: keep every intermediate (needed by :func:`run_backward`); otherwise each is
        dropped once used.
    :return: the value of every slot (``None`` for dropped ones) and the saved levels of each scan.
    """
    vals: list[torch.Tensor | None] = [None] * len(plan.slots)
    for k, (t, perm) in enumerate(zip(tensors, plan.input_perms, strict=True)):
        vals[k] = t if perm is None else t.permute(perm)
    saved: dict[int, Saved] = {}
    for k, op in enumerate(plan.ops):
        x = vals[op.ins[0]]
        assert x is not None
        if op.kind == "pair":
            y = vals[op.ins[1]]
            assert y is not None and op.spec is not None
            if op.slice_dim is None:
                r = ring.pair(x, y, op.spec)
            else:
                r = _sliced_pair(ring, plan, op, x, y)
        elif op.kind == "unary":
            r = ring.reduce(x, op.dims)
        elif op.kind == "product":
            r = ring.product(x, op.dims)
        elif op.kind == "chain":
            assert op.chain is not None
            xs = [vals[i] for i in op.ins]
            r, levels, lengths, start = chain_forward(ring, xs, op.chain)  # type: ignore[arg-type]
            if keep:
                saved[k] = (levels, lengths, start)
        elif op.kind == "normalize":
            g = vals[op.ins[1]]
            assert g is not None
            for k2 in op.dims:
                g = g.unsqueeze(k2)
            # not detached: the conditional depends on g (an all -inf slice stays -inf)
            r = x - torch.where(torch.isfinite(g), g, torch.zeros_like(g))
        else:
            assert op.scan is not None
            r, levels, lengths = scan_forward(ring, x, op.scan)
            if keep:
                saved[k] = (levels, lengths, None)
        vals[op.out] = r
        if not keep:
            for i in plan.frees[k]:
                vals[i] = None
    return vals, saved


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
    s = num_samples
    ctxs: dict[int, dict[str, torch.Tensor]] = {plan.result: {}}
    chosen: dict[str, torch.Tensor] = {}
    for k in reversed(range(len(plan.ops))):
        op = plan.ops[k]
        ctx = ctxs.pop(op.out)
        out_slot = plan.slots[op.out]
        out_plates = tuple(d for d in out_slot.dims if d in plates)
        if op.kind in ("pair", "unary"):
            elim = op.elim
            logits = None
            for i in op.ins:
                v = vals[i]
                assert v is not None
                g = _gather(v, plan.slots[i].dims, ctx, out_plates, elim)
                logits = g if logits is None else logits + g
            assert logits is not None
            lsizes = tuple(plates[p] for p in out_plates)
            esizes = tuple(plan.var_sizes[e] for e in elim)
            logits = logits.expand((s,) + lsizes + esizes).reshape((s,) + lsizes + (-1,))
            picked = dict(zip(elim, unravel(ring.choose(logits), esizes), strict=True))
            chosen.update(picked)
            new = {**ctx, **picked}
            for i in op.ins:
                ctxs[i] = new
        elif op.kind == "product":
            in_dims = plan.slots[op.ins[0]].dims
            in_plates = tuple(d for d in in_dims if d in plates)
            ins = [k2 for k2, p in enumerate(in_plates) if p not in out_plates]
            new = {}
            for name, v in ctx.items():
                for pos in ins:
                    v = v.unsqueeze(1 + pos)
                new[name] = v
            ctxs[op.ins[0]] = new
        elif op.kind == "chain":
            assert op.chain is not None
            levels, lengths, start = saved[k]
            picked = chain_backward(ring, levels, lengths, start, op.chain, ctx, s, out_plates,
                                    plates)
            chosen.update(picked)
            new = {**ctx, **picked}
            for i in op.ins:
                ctxs[i] = new
        else:
            assert op.scan is not None
            levels, lengths, _ = saved[k]
            picked, child = scan_backward(ring, levels, lengths, op.scan, ctx, s, plates)
            chosen.update(picked)
            ctxs[op.ins[0]] = child
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
    :param memory_cap: optional cap in bytes on any one step's working memory.
    :param validate: check values for NaN and ``+inf`` (costs one host-device sync).
    :return: one tensor per output, dims in the output's order.
    :raises GraphError: on malformed equations, mismatched sizes, dtypes, devices or bad values,
        or an output that keeps a plated variable without its plates.
    :raises IntractableError: if the contraction has no polynomial-time elimination.
    """
    inputs, outputs = _parse(equation, operands, plates)
    plate_set = set(plates)
    labels = tuple(f"{k}:{dims}" for k, dims in enumerate(inputs))
    sizes = dim_sizes(zip(inputs, (tuple(x.shape) for x in operands), labels, strict=True))
    plate_objs = tuple(Plate(p, sizes[p]) for p in sorted(plate_set) if p in sizes)
    r = get_ring(ring)
    itemsize = operands[0].element_size() if operands else 8
    ordinals = variable_ordinals(inputs, plate_objs)
    plans = []
    for out in outputs:
        out_vars = [d for d in out if d not in plate_set]
        for v in out_vars:
            missing = ordinals[v] - set(out)
            if missing:
                raise GraphError(
                    f"einsum output {out!r} keeps variable {v!r} without its plates "
                    f"{sorted(missing)}; add them to the output"
                )
        st = Structure(plate_objs, tuple((tuple(d), tuple(x.shape))
                                         for d, x in zip(inputs, operands, strict=True)),
                       labels, keep_vars=tuple(out_vars), ring=r.name, itemsize=itemsize,
                       memory_cap=memory_cap)
        plans.append(make_plan(st))
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
