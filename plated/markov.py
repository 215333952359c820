"""Sequential plates: log-depth parallel-scan elimination of a Markov chain and its backward pass.

A chain of length :math:`T` with transition log-matrices :math:`M_0, \\dots, M_{T-1}` (each
:math:`M_t[x_{t-1}, x_t]`, batched) is eliminated by pairing neighbours,
:math:`M^{(l+1)}_i = M^{(l)}_{2i} \\otimes M^{(l)}_{2i+1}`, for :math:`\\lceil \\log_2 T \\rceil`
levels, carrying an odd level's last matrix to the next level. The Python loop runs over levels,
never over time steps. The result is :math:`\\bigoplus_{x_{T-1}} (M_0 \\otimes \\cdots \\otimes
M_{T-1})[x_{-1}, x_{T-1}]`, a factor of the state before the chain.

The backward pass (MAP or sampling, chosen by the ring's ``choose``) walks the same levels in
reverse: given the boundary states of a level-:math:`l+1` block it chooses the middle state of its
two children from :math:`M^{(l)}_{2i}[\\text{left}, m] + M^{(l)}_{2i+1}[m, \\text{right}]`, for
all blocks at once. This is exact forward-filter backward-sample (or Viterbi) in log depth, as in
Obermeyer et al. (2019), Sec. 4 ("Sequential plates"), and Särkkä & García-Fernández (2021).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .plan.ir import ChainLayout, ScanLayout
from .recursion import factored_chain, factorial_chain, recursion_descend, recursion_forward
from .rings import Semiring
from .typing import ChainMethod

__all__ = ["scan_forward", "factored_scan", "scan_backward", "chain_forward", "chain_backward",
           "unravel", "scan_levels", "descend", "Eliminated"]


@dataclass
class Eliminated:
    """What a chain's elimination keeps for its backward choice (MAP or sampling).

    :ivar m: the transitions ``(batch, n, K, K)``, or their steps ``(batch, K, K)`` (recursion).
    :ivar beta: the recursion's messages ``(batch, n + 1, K)``; ``pointers`` the max ring's
        back-pointers ``(batch, n, K)``.
    :ivar levels: the scan's levels and their ``lengths`` (scan).
    :ivar start: a chain of variables' start vector ``(batch, K)``, if it has one.
    """

    method: ChainMethod
    m: torch.Tensor | list[torch.Tensor] | None = None
    beta: torch.Tensor | None = None
    pointers: torch.Tensor | None = None
    levels: list[torch.Tensor] | None = None
    lengths: list[int] | None = None
    start: torch.Tensor | None = None

    def last(self) -> torch.Tensor:
        """The chain's result before its state before the chain is summed: ``(batch, K)`` over
        the first state (recursion) or ``(batch, K, K)`` over the first and last (scan)."""
        if self.method != "scan":
            assert self.beta is not None
            return self.beta[:, 0]
        assert self.levels is not None
        return self.levels[-1][:, 0]

    def descend(self, ring: Semiring, b: torch.Tensor, first: torch.Tensor,
                last: torch.Tensor | None) -> torch.Tensor:
        """Every state of the chains at batch index ``b`` ``(S, P)``, given the first state
        ``(S, P)`` (and, for the scan, the last one): ``(S, P, n + 1)``."""
        if self.method != "scan":
            assert self.m is not None and self.beta is not None
            return recursion_descend(ring, self.m, self.beta, self.pointers, b, first)
        assert self.levels is not None and self.lengths is not None and last is not None
        return descend(ring, self.levels, self.lengths, b, torch.stack([first, last], dim=-1))


def _eliminate(ring: Semiring, m: torch.Tensor | list[torch.Tensor], method: ChainMethod
               ) -> tuple[torch.Tensor, Eliminated]:
    """Eliminate the chain ``m`` ``(batch, n, K, K)`` (for the recursion, also its steps as
    separate ``(batch, K, K)`` tensors) by ``method``: the result over the first and (scan) last
    state, and what the backward choice needs."""
    if method != "scan":
        top, beta, pointers = recursion_forward(ring, m, blocked=method == "blocked")
        return top, Eliminated(method, m=m, beta=beta, pointers=pointers)
    assert isinstance(m, torch.Tensor)
    levels, lengths = scan_levels(ring, m)
    return levels[-1][:, 0], Eliminated(method, levels=levels, lengths=lengths)


def scan_levels(ring: Semiring, m: torch.Tensor) -> tuple[list[torch.Tensor], list[int]]:
    """All levels of the pairwise product tree of ``m`` ``(batch, n, K, K)``.

    An odd level's last matrix has no partner; it is carried to the next level unchanged (its
    block holds one matrix), which copies only the small next level, never the whole one.

    :return: the tensor of every level, ``(batch, n_l, K, K)``, the last ``(batch, 1, K, K)``
        being the product of all ``n`` matrices; and each level's length ``n_l``.
    """
    levels: list[torch.Tensor] = []
    lengths: list[int] = []
    while True:
        n = m.shape[1]
        lengths.append(n)
        levels.append(m)
        if n == 1:
            return levels, lengths
        m = ring.level(m)


def descend(ring: Semiring, levels: list[torch.Tensor], lengths: list[int], b: torch.Tensor,
            bnd: torch.Tensor) -> torch.Tensor:
    """Choose every interior state of a chain given its two end states.

    :param b: batch index into the levels, ``(S, P)``.
    :param bnd: the states before the first and after the last matrix, ``(S, P, 2)``.
    :return: all ``n + 1`` states, ``(S, P, n + 1)``.
    """
    s = b.shape[0]
    bcol = b.unsqueeze(-1)
    for lev, n in zip(reversed(levels[:-1]), reversed(lengths[:-1]), strict=True):
        blocks = bnd.shape[-1] - 1
        pairs = n // 2  # blocks of two matrices; an odd level's last block holds one
        i = torch.arange(pairs, device=b.device)
        a_rows = lev[bcol, 2 * i, bnd[..., :pairs], :]
        b_cols = lev[bcol, 2 * i + 1, :, bnd[..., 1: pairs + 1]]
        mid = ring.choose(a_rows + b_cols)
        if blocks > pairs:  # a one-matrix block: no interior state; its end stands in
            mid = torch.cat([mid, bnd[..., -1:]], dim=-1)
        inter = torch.stack([bnd[..., :-1], mid], dim=-1).reshape(s, -1, 2 * blocks)
        bnd = torch.cat([inter, bnd[..., -1:]], dim=-1)[..., : n + 1]
    return bnd


def _batch_index(batch_dims: tuple[str, ...], batch_shape: tuple[int, ...],
                 plates: tuple[str, ...], ctx: dict[str, torch.Tensor], device: torch.device
                 ) -> torch.Tensor:
    """Flat index over ``batch_dims`` (plates first, then variables), aligned to ``plates``."""
    na = len(plates)
    b = torch.zeros((1,) * (1 + na), dtype=torch.long, device=device)
    for d, n in zip(batch_dims, batch_shape, strict=True):
        if d in plates:
            shape = [1] * (1 + na)
            shape[1 + plates.index(d)] = n
            idx = torch.arange(n, device=device).view(shape)
        else:
            idx = ctx[d]
        b = b * n + idx
    return b


def scan_forward(
    ring: Semiring, x: torch.Tensor, spec: ScanLayout, method: ChainMethod = "scan"
) -> tuple[torch.Tensor, Eliminated]:
    """Eliminate the chain of ``spec.plate`` from the transition tensor ``x`` by ``method``.

    :param x: log transition factor with the slot's canonical dims (plates, outer variables, the
        chain's previous-value dims and its variables).
    :return: ``(result, kept)``: the result over the remaining plates, outer variables and
        previous-value dims (canonical order); and what the backward choice needs.
    """
    batch = math.prod(spec.batch_shape)
    k = spec.state
    m = x.permute(spec.in_perm).reshape(spec.in_view).expand(spec.in_full)
    m = m.reshape(batch, spec.length, k, k)
    top, kept = _eliminate(ring, m, method)
    # eliminate the last state of the chain (the recursion's messages already have)
    res = ring.reduce(top, (-1,)) if method == "scan" else top
    return _scan_result(res, spec), kept


def _scan_result(res: torch.Tensor, spec: ScanLayout) -> torch.Tensor:
    """The chain's result ``(batch, K)`` laid out over the scan's result dims."""
    res = res.reshape(tuple(spec.batch_shape) + tuple(spec.prev_sizes))
    nb = len(spec.batch_shape)
    for j in reversed(range(len(spec.prev))):
        if spec.prev[j] not in spec.present_prev:
            res = res.select(nb + j, 0)  # constant along a prev dim no factor mentions
    return res.permute(spec.out_perm)


def _scan_part(x: torch.Tensor, spec: ScanLayout, narrow: bool) -> torch.Tensor:
    """One operand of the transition's sum, laid along the slot's dims (extent 1 where it
    lacks one), as a view over the scan's target dims ``(*plates_after, *outer, plate, *prev,
    *curr)``; with ``narrow``, a dim it is only broadcast along (stride 0) gets extent 1."""
    p = x.permute(spec.in_perm)
    extents = iter(p.shape)
    p = p.reshape([next(extents) if present else 1 for present in spec.in_present])
    if narrow and any(st == 0 and n > 1 for st, n in zip(p.stride(), p.shape, strict=True)):
        p = p[tuple(slice(0, 1) if st == 0 and n > 1 else slice(None)
                    for st, n in zip(p.stride(), p.shape, strict=True))]
    return p


def _may_narrow(x: torch.Tensor) -> bool:
    """Whether a stride-0 operand may be read as its one element along the broadcast dims.
    The gradient then reaches the storage exactly (every broadcast position's share summed
    into it), but lands on the first position of a broadcast tensor. So not where gradients are
    read at a broadcast tensor, the operand or the tensor it is a view of (``run_plan`` permutes
    its inputs): a leaf that requires grad (as :meth:`~plated.PlatedFactorGraph.marginals` makes
    of each factor) or one that retains its gradient, with a stride-0 dim of its own."""
    for t in (x, x._base):
        if (t is not None and t.requires_grad and (t.is_leaf or t.retains_grad)
                and any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape, strict=True))):
            return False
    return True


def factored_scan(parts: list[torch.Tensor], spec: ScanLayout) -> torch.Tensor | None:
    """Eliminate the chain of ``spec.plate`` by the log ring's recursion, its transition
    being the broadcast sum of ``parts`` (a fused transition, :attr:`Plan.fused`; each part
    laid along the transition slot's dims, extent 1 where it lacks one) that is never formed:

    * parts that vary only with the chain's previous and current states (they sum to a
      ``(K, K)`` matrix shared by every batch element and step) and parts that do not vary
      with the previous state (they sum to a vector a step), at least one of each:
      :func:`~plated.recursion.factored_chain` runs one ``(batch, K) x (K, K)`` product a step;
    * a state of several variables (a factorial chain) and no part over all of its previous
      and current variables: :func:`~plated.recursion.factorial_chain` contracts the parts
      with the message one by one, each step (``K_1 K_2 (K_1 + K_2)`` work for two chains of
      ``K_1`` and ``K_2`` states, where the joint matrix has ``(K_1 K_2)^2`` entries).

    :return: the result as :func:`scan_forward`'s, or ``None`` where the parts are of neither
        form (the caller then sums them).
    """
    if not spec.in_present:
        return None
    nb = len(spec.batch_shape)
    npv = len(spec.prev)
    full = spec.in_full
    laid = [_scan_part(x, spec, _may_narrow(x)) for x in parts]
    shared = [all(n == 1 for n in p.shape[: nb + 1]) for p in laid]
    no_prev = [all(n == 1 for n in p.shape[nb + 1: nb + 1 + npv]) for p in laid]
    factored = all(a or b for a, b in zip(shared, no_prev, strict=True))
    if factored and any(shared) and not all(shared):
        mat = vec = None  # the shared parts sum to the matrix, the others to the vector
        for p, is_shared in zip(laid, shared, strict=True):
            if is_shared:
                m = p.expand(*p.shape[: nb + 1], *full[nb + 1:]).reshape(spec.state, spec.state)
                mat = m if mat is None else mat + m
            else:
                v = p.expand(*full[: nb + 1], *p.shape[nb + 1: nb + 1 + npv],
                             *full[nb + 1 + npv:]).reshape(-1, spec.length, spec.state)
                vec = v if vec is None else vec + v
        assert mat is not None and vec is not None
        return _scan_result(factored_chain(mat, vec.transpose(0, 1).contiguous()), spec)
    state_dims = range(nb + 1, len(full))
    if npv < 2 or any(all(p.shape[d] == full[d] or full[d] == 1 for d in state_dims)
                      for p in laid):
        return None
    batch = math.prod(spec.batch_shape)
    flat = []
    for p in laid:  # (batch or 1, length or 1, *prev, *curr), extent 1 where absent
        if any(p.shape[d] != 1 for d in range(nb)):
            p = p.expand(*full[:nb], *p.shape[nb:]).reshape(batch, *p.shape[nb:])
        else:
            p = p.reshape(1, *p.shape[nb:])
        flat.append(p)
    # (1, ...) where no part varies by batch
    beta0 = factorial_chain(flat, spec.prev_sizes, spec.length)
    return _scan_result(beta0.reshape(-1, spec.state).expand(batch, spec.state), spec)


def unravel(flat: torch.Tensor, sizes: tuple[int, ...]) -> list[torch.Tensor]:
    """Split a flat index over ``sizes`` (row-major) into one index per size."""
    out = []
    for n in reversed(sizes):
        out.append(flat % n)
        flat = torch.div(flat, n, rounding_mode="floor")
    return out[::-1]


def scan_backward(
    ring: Semiring,
    kept: Eliminated,
    spec: ScanLayout,
    ctx: dict[str, torch.Tensor],
    num_samples: int,
    plate_sizes: dict[str, int],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Choose every state of the chain given the values of its outer and previous-value dims.

    :param ctx: values of variables already chosen, each ``(S or 1, *plates)`` aligned to
        ``spec.plates_after``.
    :return: ``(chosen, child_ctx)``: the chain variables, each ``(S, *plates)`` aligned to
        ``spec.plates_before``; and the context for the transition factor (aligned likewise), in
        which each previous-value dim holds the chain's value one step earlier.
    """
    after = spec.plates_after
    s = num_samples
    device = kept.last().device
    after_sizes = tuple(plate_sizes[p] for p in after)
    na = len(after)

    def aligned_arange(pos: int, n: int) -> torch.Tensor:
        shape = [1] * (1 + na)
        shape[1 + pos] = n
        return torch.arange(n, device=device).view(shape)

    outer = spec.out_batch_dims[na: len(spec.batch_shape)]
    b = torch.zeros((1,) * (1 + na), dtype=torch.long, device=device)
    for j, d in enumerate(list(after) + list(outer)):
        n = spec.batch_shape[j]
        idx = aligned_arange(j, n) if j < na else ctx[d]
        b = b * n + idx
    left = torch.zeros((1,) * (1 + na), dtype=torch.long, device=device)
    for q, n in zip(spec.prev, spec.prev_sizes, strict=True):
        left = left * n + (ctx[q] if q in spec.present_prev else 0)
    full = (s,) + after_sizes
    b = b.expand(full).reshape(s, -1)
    left = left.expand(full).reshape(s, -1)

    top = kept.last()
    last = ring.choose(top[b, left]) if kept.method == "scan" else None
    bnd = kept.descend(ring, b, left, last)

    t_pos = spec.plates_before.index(spec.plate)

    def to_before(flat: torch.Tensor) -> torch.Tensor:
        return flat.reshape(full + (spec.length,)).movedim(-1, 1 + t_pos)

    currs = [to_before(v) for v in unravel(bnd[..., 1:], spec.curr_sizes)]
    chosen = dict(zip(spec.curr, currs, strict=True))
    child = {k: v.unsqueeze(1 + t_pos) for k, v in ctx.items()}
    child.update(chosen)
    prevs = [to_before(v) for v in unravel(bnd[..., :-1], spec.prev_sizes)]
    child.update(zip(spec.prev, prevs, strict=True))
    return chosen, child


def chain_forward(ring: Semiring, xs: list[torch.Tensor], spec: ChainLayout,
                  method: ChainMethod = "scan") -> tuple[torch.Tensor, Eliminated]:
    """Eliminate a chain of variables found inside a contraction (see :class:`ChainLayout`) by
    ``method``.

    :return: the result over the batch dims, and what :func:`chain_backward` needs (the start
        vector ``(batch, K)`` among it, or ``None``).
    """
    k = spec.size
    n = len(spec.vars) - 1
    bshape = spec.batch_shape
    batch = math.prod(bshape)
    steps: list[torch.Tensor | None] = [None] * n
    start: torch.Tensor | None = None
    const: torch.Tensor | None = None
    for x, part in zip(xs, spec.parts, strict=True):
        y = x.permute(part.perm).reshape(part.view)
        if part.role in ("edge", "next"):
            old = steps[part.step]
            steps[part.step] = y if old is None else old + y
        elif part.role == "start":
            start = y if start is None else start + y
        else:
            const = y if const is None else const + y
    mats = [m.expand(*bshape, k, k).reshape(batch, k, k) for m in steps if m is not None]
    # the recursion takes the steps as they are; the scan's levels need them in one tensor
    top, kept = _eliminate(ring, mats if method != "scan" else torch.stack(mats, dim=1),
                           method)
    if start is not None:
        kept.start = start.expand(*bshape, k).reshape(batch, k)
        top = top + (kept.start.unsqueeze(-1) if method == "scan" else kept.start)
    res = ring.reduce(top, (-2, -1) if method == "scan" else (-1,)).reshape(bshape)
    if const is not None:
        res = res + const
    return res, kept


def chain_backward(ring: Semiring, kept: Eliminated, spec: ChainLayout,
                   ctx: dict[str, torch.Tensor], num_samples: int, plates: tuple[str, ...],
                   plate_sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    """Choose every variable of a chain given the chosen values of its batch variables.

    :return: each chain variable, ``(S, *plates)``.
    """
    top = kept.last()
    device = top.device
    s = num_samples
    full = (s,) + tuple(plate_sizes[p] for p in plates)
    b = _batch_index(spec.batch_dims, spec.batch_shape, plates, ctx, device)
    b = b.expand(full).reshape(s, -1)
    if kept.method == "scan":
        if kept.start is not None:
            top = top + kept.start.unsqueeze(-1)
        first = ring.choose(ring.reduce(top, (-1,))[b])
        last = ring.choose(top[b, first])
    else:
        if kept.start is not None:
            top = top + kept.start
        first, last = ring.choose(top[b]), None
    bnd = kept.descend(ring, b, first, last)
    return {v: bnd[..., t].reshape(full) for t, v in enumerate(spec.vars)}
