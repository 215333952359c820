"""The graph face: :class:`PlatedFactorGraph` and its queries.

Build a graph from :class:`~plated.factor.Factor` objects and :class:`~plated.factor.Plate`
declarations, then ask for the log partition function, a MAP assignment, exact posterior samples,
posterior marginals or the predicted cost. All queries share one cached elimination plan per ring:
MAP and sampling run it backward with :func:`~plated.contract.run_backward`, marginals run it
backward by autograd.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence

import torch

from .contract import (
    check_types,
    check_values,
    name_bad_values,
    run_backward,
    run_plan,
    value_suspects,
)
from .errors import GraphError
from .factor import Factor, Plate
from .plan import CostReport, Plan, Structure, check_query_memory, make_plan
from .plan.cost import Query
from .rings import LOG, MAX, LogRing, Semiring, get_ring
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
    :param memory_cap: optional cap in bytes on every query's working memory: what the engine
        allocates beyond the factors, their gradients and the query's results (see
        :class:`~plated.plan.cost.CostReport`); a query that would exceed it raises
        :class:`~plated.errors.MemoryCapError` before any tensor work.
    :param validate: check factor values for NaN and ``+inf`` on each query, and for
        :meth:`sample` that :math:`\\log Z > -\\infty` (one host-device sync per query).
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

        :param ring: ``"log"`` or ``"max"``.
        :param keep_vars: whether the plan keeps ``keep_vars`` (the plan of :meth:`log_partition`)
            or eliminates every variable (the plan of the other queries).
        :raises GraphError: for another ring name (as :func:`~plated.contract.einsum` does).
        """
        ring = get_ring(ring).name  # an unknown name is refused here, as einsum refuses it
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
            device=t0.device.type,
        )

    def plan(self, ring: RingName = "log", keep_vars: bool = False) -> Plan:
        """The (cached) elimination plan of this graph in ``ring`` (see :meth:`structure`)."""
        return make_plan(self.structure(ring, keep_vars))

    def cost(self, ring: RingName = "log") -> CostReport:
        """Predicted FLOPs, peak memory in bytes and the printable plan; no tensor work is done.

        With ``keep_vars``, the log ring's report is that of :meth:`log_partition`.

        :param ring: ``"log"`` (sum-product) or ``"max"`` (max-product).
        :raises GraphError: for another ring name.
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

    def _log_z_query(self) -> Query:
        """Which query a log Z (or max-product value) is: with its gradient when autograd will
        differentiate it."""
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in self._tensors)
        return "gradient" if grad else "log_partition"

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
        check_query_memory(plan, self._log_z_query())
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
        check_query_memory(self.plan("max"), "map")
        with torch.no_grad():  # indices: nothing to differentiate, nothing for autograd to save
            plan, vals, saved = self._run(MAX, keep=True)
            picked = run_backward(plan, vals, saved, MAX, 1)
        return {v: x[0] for v, x in picked.items()}

    map_assignment = map

    def max_log_density(self) -> torch.Tensor:
        """The max-product value :math:`\\max_x \\log \\prod_f f(x)` (the MAP's log density)."""
        check_query_memory(self.plan("max"), self._log_z_query())
        plan, vals, _ = self._run(MAX, keep=False)
        out = vals[plan.result]
        assert out is not None
        return out

    def sample(self, num_samples: int = 1, generator: torch.Generator | None = None
               ) -> dict[str, torch.Tensor]:
        """Exact joint samples from the posterior :math:`p(x) \\propto \\prod_f f(x)`.

        Forward sum-product, then the plan backward with the log ring's sampling step
        (forward-filter backward-sample generalised to plates).

        :param num_samples: how many joint samples, an int ``>= 1``.
        :param generator: the random number generator to draw with (on the factors' device;
            default: torch's global one).
        :return: for each variable, a long tensor ``(num_samples, *plate sizes)``.
        :raises GraphError: on a ``num_samples`` that is not a positive int, a ``generator``
            that is not a :class:`torch.Generator` on the factors' device, or where
            :math:`\\log Z = -\\infty` (at some element of ``keep_plates``): no assignment has
            positive weight, so there is no distribution to sample. That last check reads the
            forward pass's result on the host, so it is made with ``validate`` only, in the one
            host-device sync that the value check costs anyway; with ``validate=False`` (no
            sync) such a graph gives arbitrary samples.
        """
        count = _sample_count(num_samples)
        device = self._tensors[0].device
        if generator is not None and not isinstance(generator, torch.Generator):
            raise GraphError(
                f"generator must be a torch.Generator (on {device}, the factors' device) or "
                f"None, got {type(generator).__name__} {generator!r}"
            )
        if (generator is not None and device.type != "meta"
                and generator.device.type != device.type):
            raise GraphError(
                f"generator is on {generator.device} but the factors are on {device}; pass "
                f"torch.Generator(device={str(device)!r})"
            )
        plan = self.plan("log")  # structural errors first, before any tensor work
        check_query_memory(plan, "sample", count)
        if self.validate:  # the values are checked after the forward pass, in its one sync
            check_types(self._tensors, self._labels)
        else:
            _check_types(self._tensors, self._labels)
        with torch.no_grad():  # indices: nothing to differentiate, nothing for autograd to save
            vals, saved = run_plan(plan, self._tensors, LOG, keep=True)
        self._check_sampleable(plan, vals)
        with torch.no_grad():
            return run_backward(plan, vals, saved,
                                LOG if generator is None else LogRing(generator), count)

    def _check_sampleable(self, plan: Plan, vals: list[torch.Tensor | None]) -> None:
        """:meth:`sample`'s value checks, after the forward pass and with ``validate`` only: NaN
        and ``+inf`` in the factors and :math:`\\log Z = -\\infty`, in one host-device sync (the
        one a validated query costs anyway; none without ``validate``).

        :raises GraphError: naming the bad factor, or the plate element where
            :math:`\\log Z = -\\infty` and the factors that are ``-inf`` on every assignment.
        """
        if not self.validate or self._tensors[0].device.type == "meta":
            return
        logz = vals[plan.result]
        assert logz is not None
        dead = torch.isneginf(logz.detach())
        # the one sync of a validated sample: the value check and log Z read back together
        bad_values, any_dead = torch.stack([value_suspects(self._tensors), dead.any()]).tolist()
        if bad_values:
            name_bad_values(self._tensors, self._labels)
        if not any_dead:
            return
        kept = [p.name for p in self.plates if p.name in self.keep_plates]  # logz's dims
        where = ""
        if kept:
            first = [int(i) for i in dead.nonzero()[0]]
            where = f" at the element {dict(zip(kept, first, strict=True))} of the kept plates"
        empty = [f.label for f in self.factors
                 if bool(torch.isneginf(_max_over_vars(f, plan)).any())]
        culprits = (f"factor(s) {', '.join(empty)} are -inf for every value of their "
                    "variables" + (" (at some plate element)" if self.plates else "")
                    if empty else "no single factor is -inf everywhere; their product is zero")
        raise GraphError(
            f"cannot sample: log Z is -inf{where}, so no assignment has positive weight and "
            f"there is no distribution to sample ({culprits}); give some assignment a finite "
            "weight in every factor"
        )

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
        :raises GraphError: for an index that is not a factor's, or under
            :func:`torch.inference_mode` (use :func:`torch.no_grad`).
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
        return logz, {k: torch.where(self._alive(alive, self.factors[k].dims), g, 0.0)
                      for k, g in grads.items()}

    def _factor_marginals(self, which: Sequence[int] | None
                          ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """The raw gradients of :meth:`factor_marginals` and :math:`\\log Z` (differentiable
        in the factors; its graph also reaches the zero probes, which is harmless)."""
        plan = self.plan("log")
        if torch.is_inference_mode_enabled():
            raise GraphError(
                "marginals are the gradient of log Z, and torch.inference_mode() forbids "
                "autograd; call marginals() / factor_marginals() under torch.no_grad() instead "
                "(they need no gradient of their own)"
            )
        used = sorted(set(range(len(self.factors)) if which is None else which))
        for k in used:
            if not 0 <= k < len(self.factors):
                raise GraphError(
                    f"factor index {k} is out of range; the graph has {len(self.factors)} factors"
                )
        check_query_memory(plan, "gradient" if used else self._log_z_query())
        self._check()
        if not used:  # nothing to differentiate: log Z alone
            vals, _ = run_plan(plan, self._tensors, LOG)
            logz = vals[plan.result]
            assert logz is not None
            return {}, logz
        create = any(t.requires_grad for t in self._tensors)
        with torch.enable_grad():
            if create:  # differentiable marginals: zero probes added to the factors
                probes = {k: torch.zeros_like(self._tensors[k], requires_grad=True)
                          for k in used}
                tensors = [t + probes[k] if k in probes else t
                           for k, t in enumerate(self._tensors)]
            else:  # the factors' own storage, as leaves: no copy
                probes = {k: self._tensors[k].detach().requires_grad_() for k in used}
                tensors = [probes.get(k, t) for k, t in enumerate(self._tensors)]
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
            zeros where :math:`\\log Z = -\\infty` (no assignment has positive weight). A graph
            without variables gives ``{}``.
        :raises GraphError: under :func:`torch.inference_mode` (use :func:`torch.no_grad`).
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
        if not pick:  # no variables (the graph was checked as for every query): as map() gives
            return {}
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
            out[v] = torch.where(self._alive(logz, order), g, 0.0)  # one allocation
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


def _sample_count(num_samples: object) -> int:
    """``num_samples`` as an ``int >= 1`` (anything with ``__index__``, but not ``bool``).

    :raises GraphError: naming the value given.
    """
    count = None
    if not isinstance(num_samples, bool):
        try:
            count = operator.index(num_samples)  # type: ignore[arg-type]
        except TypeError:
            count = None
    if count is None or count < 1:
        raise GraphError(
            f"num_samples must be an int >= 1, got {num_samples!r} "
            f"({type(num_samples).__name__}); e.g. sample(int(n))"
        )
    return count


def _max_over_vars(factor: Factor, plan: Plan) -> torch.Tensor:
    """``factor``'s maximum over its variables, at each element of its plates."""
    dims = tuple(k for k, d in enumerate(factor.dims) if d in plan.var_sizes)
    t = factor.tensor.detach()
    return t.amax(dim=dims) if dims else t
