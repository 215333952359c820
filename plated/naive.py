"""The brute-force twin: unroll every plate and enumerate every joint assignment.

Exponential in everything and meant for small graphs: tests check every fast path against it, and
users can check small models with it. It shares no code with the planner or the elimination; it
implements the semantics directly:

* a variable's plates are the intersection of the plates of the factors that mention it (for a
  sequential plate's previous-value dim, of those plates minus the sequential one);
* a variable has one copy per element of its plates;
* a factor contributes, at each element of its plates, its entry at the copies its dims refer to;
  inside sequential plate ``t``, a previous-value dim of chain variable ``c`` refers to ``c`` at
  ``t - 1``, or at ``t = 0`` to the previous-value variable itself.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import GraphError
from .factor import Factor, Plate

__all__ = ["Enumeration", "enumerate_joint", "log_partition", "map", "marginals", "sample",
           "einsum", "MAX_ASSIGNMENTS"]

#: Largest number of joint assignments :func:`enumerate_joint` will build.
MAX_ASSIGNMENTS = 1 << 20


@dataclass
class Enumeration:
    """Every joint assignment of an unrolled graph with its log density.

    :ivar copies: per copy, ``(variable, plate index)``; the plate index is a tuple over the
        variable's plates in declaration order.
    :ivar sizes: domain size of each copy.
    :ivar assignments: long tensor ``(num_assignments, num_copies)``.
    :ivar log_joint: ``(num_assignments,)``, the unnormalised log density of each assignment.
    :ivar var_plates: each variable's plates in declaration order.
    """

    copies: list[tuple[str, tuple[int, ...]]]
    sizes: list[int]
    assignments: torch.Tensor
    log_joint: torch.Tensor
    var_plates: dict[str, tuple[str, ...]]
    plate_sizes: dict[str, int]

    def values(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Decode assignment rows ``(n,)`` into per-variable tensors ``(n, *plate sizes)``."""
        out: dict[str, torch.Tensor] = {}
        for v, ps in self.var_plates.items():
            shape = tuple(self.plate_sizes[p] for p in ps)
            cols = [k for k, (name, _) in enumerate(self.copies) if name == v]
            # copies of v are created in row-major order of its plate indices
            out[v] = self.assignments[rows][:, cols].reshape((len(rows),) + shape)
        return out


def _analyse(factors: Sequence[Factor], plates: Sequence[Plate]
             ) -> tuple[dict[str, int], dict[str, tuple[str, ...]], dict[str, tuple[str, str]]]:
    names = [p.name for p in plates]
    prev_of: dict[str, tuple[str, str]] = {}  # prev dim -> (plate, curr)
    for p in plates:
        for c, q in p.prev:
            prev_of[q] = (p.name, c)
    sizes: dict[str, int] = {}
    ords: dict[str, set[str]] = {}
    for f in factors:
        fp = {d for d in f.dims if d in names}
        for d, n in zip(f.dims, f.tensor.shape, strict=True):
            if sizes.setdefault(d, int(n)) != n:
                raise GraphError(f"dim {d!r} has two sizes")
            if d in names:
                continue
            ctx = fp - {prev_of[d][0]} if d in prev_of else fp
            ords[d] = ords[d] & ctx if d in ords else set(ctx)
    for q, (_, c) in prev_of.items():
        if q not in ords and c in ords:
            ords[q] = set()
            sizes[q] = sizes[c]
    var_plates = {v: tuple(p for p in names if p in o) for v, o in ords.items()}
    return {v: sizes[v] for v in var_plates}, var_plates, prev_of


def enumerate_joint(factors: Sequence[Factor], plates: Sequence[Plate] = (),
                    max_assignments: int = MAX_ASSIGNMENTS) -> Enumeration:
    """Unroll the graph and score every joint assignment.

    :raises GraphError: if there are more than ``max_assignments`` joint assignments.
    """
    plate_sizes = {p.name: p.size for p in plates}
    var_sizes, var_plates, prev_of = _analyse(factors, plates)
    copies: list[tuple[str, tuple[int, ...]]] = []
    index: dict[tuple[str, tuple[int, ...]], int] = {}
    for v, ps in var_plates.items():
        for e in itertools.product(*(range(plate_sizes[p]) for p in ps)):
            index[(v, e)] = len(copies)
            copies.append((v, e))
    sizes = [var_sizes[v] for v, _ in copies]
    total = math.prod(sizes)
    if total > max_assignments:
        raise GraphError(
            f"brute force would enumerate {total} joint assignments (> {max_assignments}); "
            "use a smaller graph"
        )
    t0 = factors[0].tensor
    grids = [torch.arange(n, device=t0.device) for n in sizes]
    if grids:
        assignments = torch.cartesian_prod(*grids).reshape(total, len(sizes))
    else:
        assignments = torch.zeros((1, 0), dtype=torch.long, device=t0.device)
    log_joint = torch.zeros(total, dtype=t0.dtype, device=t0.device)
    for f in factors:
        fplates = [d for d in f.dims if d in plate_sizes]
        for e in itertools.product(*(range(plate_sizes[p]) for p in fplates)):
            where = dict(zip(fplates, e, strict=True))
            idx: list[torch.Tensor | int] = []
            for d in f.dims:
                if d in plate_sizes:
                    idx.append(where[d])
                    continue
                if d in prev_of and prev_of[d][0] in where and where[prev_of[d][0]] > 0:
                    t, c = prev_of[d]
                    w = dict(where)
                    w[t] -= 1
                    key = (c, tuple(w[p] for p in var_plates[c]))
                else:
                    key = (d, tuple(where[p] for p in var_plates[d]))
                idx.append(assignments[:, index[key]])
            log_joint = log_joint + f.tensor[tuple(idx)]
    return Enumeration(copies, sizes, assignments, log_joint, var_plates, plate_sizes)


def log_partition(factors: Sequence[Factor], plates: Sequence[Plate] = ()) -> torch.Tensor:
    """Brute-force :math:`\\log Z` (differentiable)."""
    return enumerate_joint(factors, plates).log_joint.logsumexp(0)


def map(factors: Sequence[Factor], plates: Sequence[Plate] = ()
        ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Brute-force MAP: ``(assignment, its log density)``; ties go to the first assignment."""
    en = enumerate_joint(factors, plates)
    best = en.log_joint.argmax()
    vals = en.values(best.reshape(1))
    return {v: x[0] for v, x in vals.items()}, en.log_joint[best]


def marginals(factors: Sequence[Factor], plates: Sequence[Plate] = ()) -> dict[str, torch.Tensor]:
    """Brute-force posterior marginals, each ``(*plate sizes, size)``."""
    en = enumerate_joint(factors, plates)
    probs = (en.log_joint - en.log_joint.logsumexp(0)).exp()
    out = {}
    for v, ps in en.var_plates.items():
        shape = tuple(en.plate_sizes[p] for p in ps)
        cols = [k for k, (name, _) in enumerate(en.copies) if name == v]
        n = en.sizes[cols[0]]
        m = torch.zeros(len(cols), n, dtype=probs.dtype, device=probs.device)
        for j, c in enumerate(cols):
            m[j] = m[j].index_add(0, en.assignments[:, c], probs)
        out[v] = m.reshape(shape + (n,))
    return out


def sample(factors: Sequence[Factor], plates: Sequence[Plate] = (), num_samples: int = 1
           ) -> dict[str, torch.Tensor]:
    """Brute-force exact joint samples, each ``(num_samples, *plate sizes)``."""
    en = enumerate_joint(factors, plates)
    rows = torch.distributions.Categorical(logits=en.log_joint.detach()).sample((num_samples,))
    return en.values(rows)


def einsum(equation: str, *operands: torch.Tensor, plates: str = "", ring: str = "log"
           ) -> tuple[torch.Tensor, ...]:
    """Brute-force :func:`~plated.contract.einsum`: unroll, enumerate, and reduce per output.

    ``ring`` is ``"log"`` (logsumexp) or ``"max"``.
    """
    lhs, rhs = equation.replace(" ", "").split("->")
    inputs = lhs.split(",")
    sizes = {d: int(n) for dims, x in zip(inputs, operands, strict=True)
             for d, n in zip(dims, x.shape, strict=True)}
    plate_objs = [Plate(p, sizes[p]) for p in sorted(set(plates)) if p in sizes]
    factors = [Factor(x, tuple(dims)) for dims, x in zip(inputs, operands, strict=True)]
    en = enumerate_joint(factors, plate_objs)
    results = []
    for out in rhs.split(","):
        shape = tuple(sizes[d] for d in out)
        res = torch.empty(shape, dtype=en.log_joint.dtype, device=en.log_joint.device)
        out_plates = [d for d in out if d in set(plates)]
        out_vars = [d for d in out if d not in set(plates)]
        flat = []
        for e in itertools.product(*(range(sizes[p]) for p in out_plates)):
            where = dict(zip(out_plates, e, strict=True))
            key = torch.zeros(en.log_joint.shape, dtype=torch.long, device=res.device)
            for v in out_vars:
                col = en.copies.index((v, tuple(where[p] for p in en.var_plates[v])))
                key = key * sizes[v] + en.assignments[:, col]
            n = math.prod(sizes[v] for v in out_vars)
            if ring == "log":
                m = en.log_joint.detach().max()
                m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
                acc = torch.zeros(n, dtype=res.dtype, device=res.device)
                acc = acc.index_add(0, key, (en.log_joint - m).exp())
                val = acc.log() + m
            else:
                init = torch.full((n,), -torch.inf, dtype=res.dtype, device=res.device)
                val = init.scatter_reduce(0, key, en.log_joint, reduce="amax")
            flat.append(val.reshape(tuple(sizes[v] for v in out_vars)))
        # assemble: flat is ordered by output plates; lay out as (plates..., vars...) then permute
        stacked = torch.stack(flat).reshape(tuple(sizes[p] for p in out_plates)
                                            + tuple(sizes[v] for v in out_vars))
        layout = out_plates + out_vars
        res = stacked.permute([layout.index(d) for d in out])
        results.append(res)
    return tuple(results)
