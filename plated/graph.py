"""The graph face: :class:`PlatedFactorGraph` and its queries.

Build a graph from :class:`~plated.factor.Factor` objects and :class:`~plated.factor.Plate`
declarations, then ask for the log partition function, a MAP assignment, exact posterior samples,
posterior marginals or the predicted cost. All queries share one cached elimination plan per ring:
MAP and sampling run it backward with :func:`~plated.contract.run_backward`, marginals run it
backward by autograd.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .contract import check_values, run_backward, run_plan
from .errors import GraphError
from .factor import Factor, Plate
from .plan import CostReport, Plan, Structure, make_plan
from .rings import LOG, MAX, LogRing, Semiring
from .typing import RingName
from .unroll import unroll_plates

__all__ = ["PlatedFactorGraph"]


class PlatedFactorGraph:
    """A plated factor graph over discrete variables, eliminated exactly by TVE.

    Variables are the non-plate dim names of the factors; their domain sizes come from the factor
    shapes, and their plates are the intersection of the plates of the factors that mention them.
    The joint (unnormalised) log density is the sum, over factors and over every element of each
    factor's plates, of the factor's entries.

    >>> import torch
    >>> from plated import Factor, Plate, PlatedFactorGraph
    >>> g = PlatedFactorGraph(
    ...     [Factor(torch.randn(3), ("z",)), Factor(torch.randn(5, 3, 2), ("n", "z", "x"))],
    ...     [Plate("n", 5)])
    >>> g.log_partition().shape
    torch.Size([])
    >>> g.marginals()["x"].shape   # x has its own value in each element of plate n
    torch.Size([5, 2])

    :param factors: the factors.
    :param plates: the plates, in the order in which they lay out results.
    :param keep_plates: plates not to product-reduce: :meth:`log_partition` then returns one value
        per element (every factor and variable must be inside them).
    :param keep_vars: variables not to eliminate from :meth:`log_partition`'s result, which then
        has one value per assignment of them (laid out as :meth:`result_dims` says), as an einsum
        output keeps them. The other queries eliminate every variable.
    :param unroll: plates to unroll into distinct variables per element before planning: exact for
        graphs that are intractable only because of these plates, at a cost exponential in their
        size. Unrolled plates disappear from the results (their variables are named
        ``"{var}[{i}]"``).
    :param memory_cap: optional cap in bytes on one step's working memory (see :mod:`plated.plan`).
    :param validate: check factor values for NaN and ``+inf`` on each query (one host-device sync).
    :raises GraphError: if the graph is malformed (names the factor, dim, variable or plate).
    :raises IntractableError: if the graph has no polynomial-time elimination (raised on the first
        query or :meth:`cost`, before any tensor work).
    """

    def __init__(
        self,
        factors: Iterable[Factor],
        plates: Iterable[Plate] = (),
        *,
        keep_plates: Sequence[str] = (),
        keep_vars: Sequence[str] = (),
        unroll: Sequence[str] = (),
        memory_cap: int | None = None,
        validate: bool = True,
    ) -> None:
        factors = list(factors)
        plates = list(plates)
        for f in factors:
            if not isinstance(f, Factor):
                raise GraphError(f"expected Factor objects, got {type(f).__name__}")
        for p in plates:
            if not isinstance(p, Plate):
                raise GraphError(f"expected Plate objects, got {type(p).__name__}")
        if not factors:
            raise GraphError("a plated factor graph needs at least one factor")
        names = {p.name for p in plates}
        for f in factors:
            for d in f.dims:
                if d.endswith("]") and "[" in d and unroll:
                    raise GraphError(f"factor {f.label}: dim {d!r} clashes with unrolled names")
        for u in unroll:
            if u not in names:
                raise GraphError(f"cannot unroll {u!r}: it is not a declared plate")
        if unroll:
            factors, plates = unroll_plates(factors, plates, tuple(unroll))
        self.factors: tuple[Factor, ...] = tuple(factors)
        self.plates: tuple[Plate, ...] = tuple(plates)
        self.keep_plates = tuple(keep_plates)
        self.keep_vars = tuple(keep_vars)
        self.memory_cap = memory_cap
        self.validate = validate
        self._tensors = [f.tensor for f in self.factors]
        self._labels = tuple(f.label for f in self.factors)

    # -- planning ----------------------------------------------------------------------------------
    def structure(self, ring: RingName = "log", keep_vars: bool = False) -> Structure:
        """The hashable structure that keys this graph's plan in the plan cache.

        :param keep_vars: whether the plan keeps ``keep_vars`` (the plan of :meth:`log_partition`)
            or eliminates every variable (the plan of the other queries).
        """
        t0 = self._tensors[0]
        return Structure(
            plates=self.plates,
            inputs=tuple((f.dims, tuple(f.tensor.shape)) for f in self.factors),
            labels=self._labels,
            keep_plates=self.keep_plates,
            keep_vars=self.keep_vars if keep_vars else (),
            ring=ring,
            itemsize=t0.element_size(),
            memory_cap=self.memory_cap,
        )

    def plan(self, ring: RingName = "log", keep_vars: bool = False) -> Plan:
        """The (cached) elimination plan of this graph in ``ring`` (see :meth:`structure`)."""
        return make_plan(self.structure(ring, keep_vars))

    def cost(self, ring: RingName = "log") -> CostReport:
        """Predicted FLOPs, peak memory in bytes and the printable plan; no tensor work is done.

        With ``keep_vars``, the log ring's report is that of :meth:`log_partition`.

        :raises IntractableError: if the graph has no polynomial-time elimination.
        """
        return self.plan(ring, keep_vars=ring == "log").cost

    def result_dims(self) -> tuple[str, ...]:
        """The dims of :meth:`log_partition`'s result: the kept plates in declaration order, then
        ``keep_vars`` in the order given."""
        return self._result_dims(self.plan("log", keep_vars=True))

    def _result_dims(self, plan: Plan) -> tuple[str, ...]:
        """:meth:`result_dims` of the log-partition ``plan`` already at hand."""
        plates = tuple(p.name for p in self.plates if p.name in plan.result_dims)
        return plates + self.keep_vars

    def variables(self) -> dict[str, tuple[int, tuple[str, ...]]]:
        """Each variable's domain size and plates (in declaration order)."""
        p = self.plan()
        return {v: (p.var_sizes[v], p.var_plates(v)) for v in p.var_sizes}

    def _check(self) -> None:
        if self.validate:
            check_values(self._tensors, self._labels)
        else:
            _check_types(self._tensors, self._labels)

    def _run(self, ring: Semiring, keep: bool) -> tuple[Plan, list[torch.Tensor | None], dict]:
        plan = self.plan(ring.name)  # structural errors first, before any tensor work
        self._check()
        vals, saved = run_plan(plan, self._tensors, ring, keep=keep)
        return plan, vals, saved

    # -- queries -----------------------------------------------------------------------------------
    def log_partition(self) -> torch.Tensor:
        """The log partition function :math:`\\log Z = \\log \\sum_x \\prod_f f(x)`, differentiable.

        :return: a scalar, or one value per element of ``keep_plates`` (in declaration order) and
            per assignment of ``keep_vars``, with dims :meth:`result_dims`.
        """
        plan = self.plan("log", keep_vars=True)  # structural errors first, before tensor work
        self._check()
        vals, _ = run_plan(plan, self._tensors, LOG)
        out = vals[plan.result]
        assert out is not None
        if self.keep_vars:
            want = self._result_dims(plan)
            out = out.permute([plan.result_dims.index(d) for d in want])
        return out

    def map(self) -> dict[str, torch.Tensor]:
        """A MAP assignment of every variable (max-product forward, argmax backward).

        Ties are broken toward the first index.

        :return: for each variable, a long tensor shaped by its plates (declaration order).
        """
        plan, vals, saved = self._run(MAX, keep=True)
        with torch.no_grad():
            picked = run_backward(plan, vals, saved, MAX, 1)
        return {v: x[0] for v, x in picked.items()}

    map_assignment = map

    def max_log_density(self) -> torch.Tensor:
        """The max-product value :math:`\\max_x \\log \\prod_f f(x)` (the MAP's log density)."""
        plan, vals, _ = self._run(MAX, keep=False)
        out = vals[plan.result]
        assert out is not None
        return out

    def sample(self, num_samples: int = 1, generator: torch.Generator | None = None
               ) -> dict[str, torch.Tensor]:
        """Exact joint samples from the posterior :math:`p(x) \\propto \\prod_f f(x)`.

        Forward sum-product, then the plan backward with the log ring's sampling step
        (forward-filter backward-sample generalised to plates).

        :param generator: the random number generator to draw with (on the factors' device;
            default: torch's global one).
        :return: for each variable, a long tensor ``(num_samples, *plate sizes)``.
        """
        if num_samples < 1:
            raise GraphError(f"num_samples must be >= 1, got {num_samples}")
        plan, vals, saved = self._run(LOG, keep=True)
        with torch.no_grad():
            return run_backward(plan, [None if v is None else v.detach() for v in vals],
                                {k: ([x.detach() for x in lv], ln,
                                     None if st is None else st.detach())
                                 for k, (lv, ln, st) in saved.items()},
                                LOG if generator is None else LogRing(generator), num_samples)

    def factor_marginals(self, which: Sequence[int] | None = None) -> dict[int, torch.Tensor]:
        """Posterior marginals over the dims of whole factors (pairwise marginals of a chain's
        transition factor, say), by one backward pass through :math:`\\log Z`.

        For factor ``f`` with dims ``(d_1, ..., d_n)``, entry ``[..., k, ...]`` of its marginal is
        :math:`\\partial \\log Z / \\partial \\log f[\\dots, k, \\dots]`: at each element of the
        factor's plates, the posterior probability that its variables take the values ``k``. The
        result is differentiable (``create_graph``) when a factor requires grad.

        :param which: indices of the factors wanted (default: every factor).
        :return: for each index, a tensor shaped like the factor; summed over the factor's
            variables it is 1 at every plate element, or 0 everywhere where
            :math:`\\log Z = -\\infty`. With ``keep_plates`` each kept element is its own
            posterior.
        :raises GraphError: for an index that is not a factor's.
        """
        return self.log_partition_and_factor_marginals(which)[1]

    def log_partition_and_factor_marginals(self, which: Sequence[int] | None = None
                                           ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """:math:`\\log Z` (every variable eliminated, as without ``keep_vars``) and
        :meth:`factor_marginals`, from one forward and one backward pass; both differentiable.

        An ELBO needs both (the entropy of a chain is :math:`\\log Z` minus the expected
        log potentials under the pairwise marginals).
        """
        grads, logz = self._factor_marginals(which)
        alive = logz.detach()
        return logz, {k: torch.where(self._alive(alive, self.factors[k].dims), g,
                                     torch.zeros_like(g)) for k, g in grads.items()}

    def _factor_marginals(self, which: Sequence[int] | None
                          ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """The raw gradients of :meth:`factor_marginals` and :math:`\\log Z` (differentiable
        in the factors; its graph also reaches the zero probes, which is harmless)."""
        plan = self.plan("log")
        self._check()
        used = sorted(set(range(len(self.factors)) if which is None else which))
        for k in used:
            if not 0 <= k < len(self.factors):
                raise GraphError(
                    f"factor index {k} is out of range; the graph has {len(self.factors)} factors"
                )
        create = any(t.requires_grad for t in self._tensors)
        with torch.enable_grad():
            probes = {k: torch.zeros_like(self._tensors[k], requires_grad=True) for k in used}
            tensors = [t + probes[k] if k in probes else t for k, t in enumerate(self._tensors)]
            vals, _ = run_plan(plan, tensors, LOG)
            logz = vals[plan.result]
            assert logz is not None
            grads = torch.autograd.grad(logz.sum(), [probes[k] for k in used],
                                        create_graph=create)
        # without create_graph the backward pass freed log Z's graph: it is a constant then
        return dict(zip(used, grads, strict=True)), logz if create else logz.detach()

    def _alive(self, logz: torch.Tensor, dims: Sequence[str]) -> torch.Tensor:
        """Where :math:`\\log Z` is finite, laid out to broadcast along ``dims``: a posterior is
        undefined where it is ``-inf``, so queries report zeros there (documented) rather than the
        gradient of an independent, finite part of the graph."""
        order = [p.name for p in self.plates if p.name in self.keep_plates]  # logz's dims
        kept = [d for d in dims if d in self.keep_plates]  # every kept plate, by construction
        alive = torch.isfinite(logz).permute([order.index(d) for d in kept])
        return alive.reshape(tuple(self._plate_size(d) if d in kept else 1 for d in dims))

    def marginals(self) -> dict[str, torch.Tensor]:
        """Posterior marginal of every variable, by differentiating :math:`\\log Z`.

        :math:`p(x_v = k) = \\partial \\log Z / \\partial \\log f[\\dots, k, \\dots]` summed over
        the other dims of a factor ``f`` over ``v`` (see :meth:`factor_marginals`); one backward
        pass gives all of them. The result is differentiable when a factor requires grad.

        :return: for each variable, probabilities ``(*plate sizes, size)`` summing to one; all
            zeros where :math:`\\log Z = -\\infty` (no assignment has positive weight).
        """
        plan = self.plan("log")
        # pick, per variable, a factor over it with the fewest plates
        pick: dict[str, int] = {}
        pick_n: dict[str, int] = {}
        for k, f in enumerate(self.factors):
            nplates = sum(1 for x in f.dims if x not in plan.var_sizes)
            for d in f.dims:
                if d in plan.var_sizes and (d not in pick or nplates < pick_n[d]):
                    pick[d] = k
                    pick_n[d] = nplates
        by_factor, logz = self._factor_marginals(sorted(set(pick.values())))
        logz = logz.detach()
        out = {}
        plate_names = {p.name for p in self.plates}
        for v, k in pick.items():
            f = self.factors[k]
            g = by_factor[k]
            own = set(plan.ordinals[v])
            idx: list[int | slice] = []
            keep_dims = []
            for d in f.dims:
                if d in plate_names and d not in own:
                    idx.append(0)  # any element sees the same marginal; 0 is x_{-1} of a chain
                else:
                    idx.append(slice(None))
                    keep_dims.append(d)
            g = g[tuple(idx)]
            others = tuple(j for j, d in enumerate(keep_dims) if d != v and d not in plate_names)
            if others:
                g = g.sum(dim=others)
            kept = [d for d in keep_dims if d == v or d in plate_names]
            order = list(plan.var_plates(v)) + [v]
            g = g.permute([kept.index(d) for d in order])
            out[v] = torch.where(self._alive(logz, order), g, torch.zeros_like(g))
        return out

    def _plate_size(self, name: str) -> int:
        return next(p.size for p in self.plates if p.name == name)



def _check_types(tensors: Sequence[torch.Tensor], labels: Sequence[str]) -> None:
    dtype, device = tensors[0].dtype, tensors[0].device
    for t, lab in zip(tensors, labels, strict=True):
        if not t.dtype.is_floating_point or t.dtype != dtype or t.device != device:
            raise GraphError(
                f"factor {lab} has dtype {t.dtype} on {t.device}; every factor must share one "
                f"floating dtype and device (factor {labels[0]}: {dtype} on {device})"
            )
