"""``TVE_ELBO``: the engine as the exact-inference backend of :class:`pyro.infer.SVI`.

The model and guide run under Pyro's handlers, as in ``TraceEnum_ELBO``
(:func:`~plated.pyro.trace.get_traces`). After the trace, the log-factors of the model's
enumerated sites form a plated factor graph which the engine contracts; guide-side enumeration and
score-function terms are handled by exact expectations (DiCE), whose marginal probabilities are
again engine contractions (:func:`plated.einsum`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from pyro.infer.elbo import ELBO
from pyro.infer.util import is_validation_enabled

from ..contract import einsum
from ..errors import GraphError, IntractableError
from ..factor import Plate
from .trace import Collected, Term, check_max_plate_nesting, collect, get_traces, intractable_hint

__all__ = ["TVE_ELBO", "elbo_particle", "marginal_terms"]


def _components(c: Collected) -> list[list[Term]]:
    """Split the factors into groups connected through model-enumerated variables."""
    sums = set(c.model_enum) | c.hidden
    parent = list(range(len(c.factors)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, t in enumerate(c.factors):
        for d in t.dims:
            if d in sums:
                j = owner.setdefault(d, i)
                parent[find(i)] = find(j)
    groups: dict[int, list[Term]] = {}
    for i, t in enumerate(c.factors):
        groups.setdefault(find(i), []).append(t)
    return list(groups.values())


def marginal_terms(c: Collected, validate: bool) -> list[Term]:
    """The model's enumerated sites summed out by the engine, as cost terms.

    When the guide neither enumerates nor samples sites inside plates without reparameterization,
    this is one scalar: the log partition function of the whole graph times the common scale.
    Otherwise each group of factors connected through model-enumerated variables becomes a term
    at the group's smallest plate context, over the guide-enumerated values it depends on (as
    Pyro's ``contract_tensor_tree`` leaves it), so that the guide's expectation of each plate
    element's term is taken with that element's own weights.
    """
    if not c.factors:
        return []
    guide = set(c.guide_enum)
    tree = bool(guide) or any(d.ordinal for d in c.dice)
    plain: list[Term] = []
    out = []
    try:
        for comp in (_components(c) if tree else [c.factors]):
            ordinal = frozenset.intersection(*(t.ordinal for t in comp)) if tree else frozenset()
            if not ordinal and not any(d in guide for t in comp for d in t.dims):
                plain.extend(comp)
            else:
                out.append(_tree_term(c, comp, ordinal, guide, validate))
        if plain:
            logz = c.graph(plain, validate=validate).log_partition()
            out.append(Term(logz * c.scale, (), frozenset(), "enumerated sites"))
    except IntractableError as e:
        raise intractable_hint(e) from None
    return out


def _tree_term(c: Collected, comp: list[Term], ordinal: frozenset[str], guide: set[str],
               validate: bool) -> Term:
    """One group's log partition function per element of its plates and guide-enumerated values.

    Guide-enumerated values are synchronized across plate elements (Pyro's parallel
    enumeration), so their dims act as extra kept plates; factors lacking one are broadcast.
    """
    sizes: dict[str, int] = {}
    for t in comp:
        sizes.update(zip(t.dims, t.tensor.shape, strict=True))
    g_dims = tuple(sorted(d for d in sizes if d in guide))
    expanded = []
    for t in comp:
        missing = tuple(d for d in g_dims if d not in t.dims)
        x = t.tensor.reshape(t.tensor.shape + (1,) * len(missing))
        x = x.expand(t.tensor.shape + tuple(sizes[d] for d in missing))
        expanded.append(Term(x, t.dims + missing, t.ordinal, t.name))
    keep_plates = tuple(p for p in c.plates if p in ordinal and p in sizes)
    chains = {curr for p in keep_plates for curr, _ in c.plates[p].prev}
    if chains & sizes.keys():
        raise GraphError(
            f"the chain of markov_plate {[p for p in keep_plates if c.plates[p].sequential]} "
            f"meets guide-enumerated sites {list(g_dims)} or guide sites sampled inside it; "
            "enumerate those sites in the model instead"
        )
    graph = c.graph(expanded, keep=keep_plates + g_dims,
                    extra_plates=tuple(Plate(d, sizes[d]) for d in g_dims), validate=validate)
    value = graph.log_partition()
    return Term(value * c.scale, keep_plates + g_dims, ordinal, "enumerated sites")


def _expectation(costs: list[Term], dice: list[Term], log_denom: dict[frozenset[str], float]
                 ) -> torch.Tensor | float:
    """Sum of the costs' expectations under the guide's enumerated and score-function weights."""
    total: torch.Tensor | float = 0.0
    for cost in costs:
        denom = sum(v for o, v in log_denom.items() if not o <= cost.ordinal)
        weight = math.exp(-denom)
        factors = [d for d in dice if d.ordinal <= cost.ordinal]
        if not factors:
            total = total + weight * cost.tensor.sum()
            continue
        prob = _marginal(factors, cost)
        safe = torch.where(prob > 0, cost.tensor, torch.zeros_like(cost.tensor))
        total = total + weight * (prob * safe).sum()
    return total


def _marginal(factors: list[Term], cost: Term) -> torch.Tensor:
    """exp of the factors summed over every dim but the cost's, laid out to broadcast with it."""
    names = sorted({d for t in factors for d in t.dims} | set(cost.dims))
    letters = {d: chr(ord("a") + i) if i < 26 else chr(ord("A") + i - 26)
               for i, d in enumerate(names)}
    if len(names) > 52:
        raise GraphError(f"too many dims ({len(names)}) in one guide expectation")
    out = [d for d in cost.dims if any(d in t.dims for t in factors)]
    eq = ",".join("".join(letters[d] for d in t.dims) for t in factors)
    eq += "->" + "".join(letters[d] for d in out)
    (logp,) = einsum(eq, *[t.tensor for t in factors], validate=False)
    shape = [cost.tensor.shape[i] if d in out else 1 for i, d in enumerate(cost.dims)]
    return logp.exp().reshape(shape)


def elbo_particle(model_trace: Any, guide_trace: Any, max_plate_nesting: int,
                  validate: bool = True) -> torch.Tensor | float:
    """The ELBO of one traced (model, guide) pair: exact over every enumerated site."""
    c = collect(model_trace, guide_trace, max_plate_nesting)
    costs = c.costs + marginal_terms(c, validate) + c.guide_costs
    return _expectation(costs, c.dice, c.log_denom)


def _checked(loss: float) -> float:
    if math.isnan(loss):
        warnings.warn("Encountered NaN: loss", stacklevel=3)
    return loss


class TVE_ELBO(ELBO):
    """A drop-in for :class:`pyro.infer.TraceEnum_ELBO` whose contractions run on the engine.

    Use it in :class:`pyro.infer.SVI` exactly as ``TraceEnum_ELBO``: mark discrete model sites
    ``infer={"enumerate": "parallel"}`` (or enumerate discrete guide sites), declare plates with
    :class:`pyro.plate`, and loop with :func:`pyro.markov` — or, much faster, run the loop body once
    inside a :class:`~plated.pyro.markov_plate`. Subsampled plates, ``poutine.mask`` and
    ``poutine.scale`` follow Pyro's semantics; the loss and its gradients equal
    ``TraceEnum_ELBO``'s.

    :param num_particles: the number of guide samples averaged per step.
    :param max_plate_nesting: the number of plate dims of the model, required: enumeration uses
        the dims to their left.
    :param vectorize_particles: not supported (raises).
    :param strict_enumeration_warning: warn when nothing is enumerated.
    :param validate: check factor values for NaN and ``+inf`` (one host-device sync per step);
        defaults to Pyro's validation setting.
    :raises GraphError: on a missing or too small ``max_plate_nesting``, an enumerate annotation
        on a continuous site, enumeration dim conflicts, or a guide that enumerates a site the
        model lacks (each message names the Pyro site or plate).
    :raises IntractableError: if the enumerated sites admit no polynomial-time elimination.
    """

    def __init__(self, num_particles: int = 1, max_plate_nesting: int | None = None,
                 vectorize_particles: bool = False, strict_enumeration_warning: bool = True,
                 validate: bool | None = None) -> None:
        if vectorize_particles:
            raise NotImplementedError(
                "TVE_ELBO(vectorize_particles=True) is not supported; use num_particles with "
                "vectorize_particles=False"
            )
        super().__init__(num_particles=num_particles,
                         max_plate_nesting=float("inf") if max_plate_nesting is None
                         else max_plate_nesting,
                         strict_enumeration_warning=strict_enumeration_warning)
        self.validate = validate

    def _get_trace(self, model: Callable[..., Any], guide: Callable[..., Any],
                   args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        """One traced (model, guide) pair (the first, under sequential guide enumeration)."""
        return next(iter(self._traces(model, guide, args, kwargs)))

    def _nesting(self) -> int:
        return check_max_plate_nesting(self.max_plate_nesting)

    def _traces(self, model: Callable[..., Any], guide: Callable[..., Any],
                args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[tuple[Any, Any]]:
        nesting = check_max_plate_nesting(self.max_plate_nesting)
        for _ in range(self.num_particles):
            yield from get_traces(model, guide, args, kwargs, nesting)

    def _particles(self, model: Callable[..., Any], guide: Callable[..., Any],
                   args: tuple[Any, ...], kwargs: dict[str, Any]
                   ) -> Iterator[tuple[torch.Tensor | float, bool]]:
        validate = is_validation_enabled() if self.validate is None else self.validate
        for model_trace, guide_trace in self._traces(model, guide, args, kwargs):
            if self.strict_enumeration_warning and not any(
                    site["type"] == "sample" and site["infer"].get("enumerate")
                    for tr in (model_trace, guide_trace) for site in tr.nodes.values()):
                warnings.warn("TVE_ELBO found no sample sites marked for enumeration; "
                              "mark discrete sites infer={'enumerate': 'parallel'}", stacklevel=3)
            params = any(site["type"] == "param" for tr in (model_trace, guide_trace)
                         for site in tr.nodes.values())
            yield elbo_particle(model_trace, guide_trace, self._nesting(), validate), params

    def loss(self, model: Callable[..., Any], guide: Callable[..., Any], *args: Any,
             **kwargs: Any) -> float:
        """The negative ELBO, a float (no gradients are recorded)."""
        elbo = 0.0
        with torch.no_grad():
            for particle, _ in self._particles(model, guide, args, kwargs):
                elbo += float(particle) / self.num_particles
        return _checked(-elbo)

    def differentiable_loss(self, model: Callable[..., Any], guide: Callable[..., Any],
                            *args: Any, **kwargs: Any) -> torch.Tensor:
        """The negative ELBO as a differentiable tensor."""
        elbo: torch.Tensor | float = 0.0
        for particle, _ in self._particles(model, guide, args, kwargs):
            elbo = elbo + particle
        elbo = elbo / self.num_particles
        if not isinstance(elbo, torch.Tensor) or not elbo.requires_grad:
            raise ValueError(f"the ELBO cannot be differentiated: {elbo}")
        return -elbo  # no NaN check here: it would cost a host-device sync

    def loss_and_grads(self, model: Callable[..., Any], guide: Callable[..., Any],
                       *args: Any, **kwargs: Any) -> float:
        """The negative ELBO as a float; accumulates its gradients into the parameters."""
        elbo = 0.0
        for particle, params in self._particles(model, guide, args, kwargs):
            if not isinstance(particle, torch.Tensor):
                continue
            elbo += particle.item() / self.num_particles
            if params and particle.requires_grad:
                (-particle / self.num_particles).backward(retain_graph=self.retain_graph)
        return _checked(-elbo)
