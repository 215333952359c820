"""``TVE_ELBO``: the engine as the exact-inference backend of :class:`pyro.infer.SVI`.

The model and guide run under Pyro's handlers, as in ``TraceEnum_ELBO``
(:func:`~plated.pyro.trace.get_traces`). After the trace, the log-factors of the model's
enumerated sites form a plated factor graph which the engine contracts; guide-side enumeration and
score-function terms are handled by exact expectations (DiCE), whose marginal probabilities are
again engine contractions.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pyro.distributions as dist
import pyro.ops.jit
import torch
from pyro import poutine
from pyro.distributions.util import is_identically_zero
from pyro.infer.elbo import ELBO
from pyro.infer.util import is_validation_enabled
from pyro.poutine.messenger import Messenger

from ..errors import GraphError, IntractableError
from ..factor import Factor, Plate
from ..graph import PlatedFactorGraph
from ..plan.analysis import connected_components, dim_sizes
from .trace import (
    Collected,
    PlacedFactor,
    check_max_plate_nesting,
    collect,
    factor_graph,
    get_trace_pairs,
    intractable_hint,
)

__all__ = ["JitTVE_ELBO", "TVE_ELBO", "elbo_particle", "marginal_terms"]


def _components(collected: Collected) -> list[list[PlacedFactor]]:
    """The factors, split into groups connected through model-enumerated variables (groups in
    order of their first factor, factors in order)."""
    factors = collected.factors
    groups = connected_components([placed.factor.dims for placed in factors],
                                  collected.variables)
    return [[factors[i] for i in group] for group in groups]


def marginal_terms(collected: Collected, validate: bool) -> list[PlacedFactor]:
    """The model's enumerated sites summed out by the engine, as cost terms.

    When the guide neither enumerates nor samples sites inside plates without reparameterization,
    this is one scalar: the log partition function of the whole graph times the common scale.
    Otherwise each group of factors connected through model-enumerated variables becomes a term
    at the group's smallest plate context, over the guide-enumerated values it depends on (as
    Pyro's ``contract_tensor_tree`` leaves it), so that the guide's expectation of each plate
    element's term is taken with that element's own weights.

    :param validate: check factor values for NaN and ``+inf``.
    :raises IntractableError: with the ways out a Pyro model has, if the engine finds no
        polynomial-time elimination.
    :raises GraphError: if a ``markov_plate`` chain meets guide-enumerated sites.
    """
    if not collected.factors:
        return []
    guide = set(collected.guide_enum)
    tree = bool(guide) or any(weight.ordinal for weight in collected.dice)
    plain: list[PlacedFactor] = []
    terms = []
    components: Sequence[Sequence[PlacedFactor]] = (
        _components(collected) if tree else [collected.factors])
    try:
        for component in components:
            ordinal = (frozenset.intersection(*(placed.ordinal for placed in component)) if tree
                       else frozenset())
            if not ordinal and not any(d in guide for placed in component
                                       for d in placed.factor.dims):
                plain.extend(component)
            else:
                terms.append(_tree_term(collected, component, ordinal, guide, validate))
        if plain:
            graph = factor_graph([placed.factor for placed in plain], collected.plates,
                                 validate=validate)
            logz = graph.log_partition() * collected.scale
            terms.append(PlacedFactor(Factor(logz, (), "enumerated sites"), frozenset()))
    except IntractableError as err:
        raise intractable_hint(err) from None
    return terms


def _tree_term(collected: Collected, component: Sequence[PlacedFactor], ordinal: frozenset[str],
               guide: set[str], validate: bool) -> PlacedFactor:
    """One group's log partition function per element of its plates and guide-enumerated values.

    Guide-enumerated values are synchronized across plate elements (Pyro's parallel
    enumeration), so their dims act as extra kept plates; factors lacking one are broadcast.

    :param ordinal: the Pyro plates every factor of the group lives in.
    :param guide: the guide-enumerated sites.
    :raises GraphError: if a ``markov_plate`` chain of a kept plate meets guide-enumerated sites.
    """
    sizes = dim_sizes((placed.factor.dims, placed.factor.tensor.shape, placed.factor.label)
                      for placed in component)
    guide_dims = tuple(sorted(d for d in sizes if d in guide))
    expanded = []
    for placed in component:
        factor = placed.factor
        missing = tuple(d for d in guide_dims if d not in factor.dims)
        shape = tuple(factor.tensor.shape)
        x = factor.tensor.reshape(shape + (1,) * len(missing))
        x = x.expand(shape + tuple(sizes[d] for d in missing))
        expanded.append(Factor(x, factor.dims + missing, factor.name))
    keep_plates = tuple(p for p in collected.plates if p in ordinal and p in sizes)
    chains = {curr for p in keep_plates for curr, _ in collected.plates[p].prev}
    if chains & sizes.keys():
        # A chain's transitions use its previous-value dims, which belong to the initial sites
        # outside the plate, so a group holding them never lives in the chain's plate; this one
        # holds a chain site but none of its transitions
        sequential = [p for p in keep_plates if collected.plates[p].sequential]
        raise GraphError(
            f"markov_plate {sequential}: chain site(s) {sorted(chains & sizes.keys())} are in a "
            f"group of factors that depends on guide-enumerated sites {list(guide_dims)} or on "
            "guide sites sampled inside the plate, but not on the chain's previous values (the "
            "tensor init() returned), so the plate would have to be kept as a batch dim, which a "
            "chain cannot be. Make the chain site depend on its previous value, use pyro.plate if "
            "the steps are independent, or enumerate those guide sites in the model instead"
        )
    graph = factor_graph(expanded, collected.plates, keep_plates=keep_plates + guide_dims,
                         extra_plates=tuple(Plate(d, sizes[d]) for d in guide_dims),
                         validate=validate)
    value = graph.log_partition() * collected.scale
    return PlacedFactor(Factor(value, keep_plates + guide_dims, "enumerated sites"), ordinal)


def _expectation(costs: Sequence[PlacedFactor], dice: Sequence[PlacedFactor],
                 log_denom: Mapping[frozenset[str], float]) -> torch.Tensor | float:
    """Sum of the costs' expectations under the guide's enumerated and score-function weights.

    A cost at Pyro ordinal ``o`` is weighted by the DiCE weights at ordinals within ``o``, and
    divided by the number of sequentially enumerated guide values at ordinals not within ``o``.
    Entries whose weight is zero count as zero whatever the cost (no ``0 * -inf``).
    """
    total: torch.Tensor | float = 0.0
    for cost in costs:
        denom = sum(value for ordinal, value in log_denom.items() if not ordinal <= cost.ordinal)
        weight = math.exp(-denom)
        weights = [d for d in dice if d.ordinal <= cost.ordinal]
        tensor = cost.factor.tensor
        if not weights:
            total = total + weight * tensor.sum()
            continue
        prob = _marginal([d.factor for d in weights], cost.factor)
        safe = torch.where(prob > 0, tensor, torch.zeros_like(tensor))
        total = total + weight * (prob * safe).sum()
    return total


def _marginal(weights: list[Factor], cost: Factor) -> torch.Tensor:
    """exp of the log-weights summed over every dim but the cost's, laid out to broadcast with
    the cost.

    Every dim, plate dims included, is a variable of the weights' graph (their sum, not a
    product over plate elements); values are not checked (``validate=False``).
    """
    kept = tuple(d for d in cost.dims if any(d in weight.dims for weight in weights))
    graph = PlatedFactorGraph(weights, keep_vars=kept, validate=False)
    logp = graph.log_partition()  # dims ``kept``: no plates are declared
    shape = [cost.tensor.shape[i] if d in kept else 1 for i, d in enumerate(cost.dims)]
    return logp.exp().reshape(shape)


def elbo_particle(model_trace: Any, guide_trace: Any, max_plate_nesting: int,
                  validate: bool = True) -> torch.Tensor | float:
    """The ELBO of one traced (model, guide) pair: exact over every enumerated site.

    :param validate: check factor values for NaN and ``+inf``.
    :raises GraphError: see :func:`~plated.pyro.trace.collect`.
    :raises IntractableError: if the enumerated sites admit no polynomial-time elimination.
    """
    collected = collect(model_trace, guide_trace, max_plate_nesting)
    costs = [*collected.costs, *marginal_terms(collected, validate), *collected.guide_costs]
    return _expectation(costs, collected.dice, collected.log_denom)


#: Pyro's warning when nothing is enumerated, word for word, then ours.
_NOTHING_ENUMERATED = (
    "TraceEnum_ELBO found no sample sites configured for enumeration. If you want to enumerate "
    'sites, you need to @config_enumerate or set infer={"enumerate": "sequential"} or '
    'infer={"enumerate": "parallel"}? If you do not want to enumerate, consider using '
    "Trace_ELBO instead. (TVE_ELBO found no sample sites marked for enumeration.)"
)


def _checked(loss: float) -> float:
    """``loss``, after warning (as Pyro does) if it is NaN."""
    if math.isnan(loss):
        warnings.warn("Encountered NaN: loss", stacklevel=3)
    return loss


class TVE_ELBO(ELBO):
    """A drop-in for :class:`pyro.infer.TraceEnum_ELBO` whose contractions run on the engine.

    Use it in :class:`pyro.infer.SVI` exactly as ``TraceEnum_ELBO``: mark discrete model sites
    ``infer={"enumerate": "parallel"}`` (or enumerate discrete guide sites), declare plates with
    :class:`pyro.plate`, and loop with :func:`pyro.markov` — or, much faster, run the loop body once
    inside a :class:`~plated.pyro.markov_plate`. Subsampled plates, ``poutine.mask``,
    ``poutine.scale``, multiple sampling of guide sites (``infer={"num_samples": k}``) and
    vectorized particles follow Pyro's semantics; the loss and its gradients equal
    ``TraceEnum_ELBO``'s.

    The arguments are :class:`pyro.infer.ELBO`'s, plus ``validate``.

    :param num_particles: the number of guide samples averaged per step.
    :param max_plate_nesting: the number of plate dims of the model (enumeration uses the dims
        to their left); guessed, as Pyro does, by tracing the model and guide once if omitted.
    :param vectorize_particles: draw the ``num_particles`` samples at once, in an outer plate
        ``num_particles_vectorized`` left of every model plate (as Pyro does).
    :param strict_enumeration_warning: warn when nothing is enumerated (under validation, as
        Pyro does).
    :param retain_graph: retain the last particle's graph in ``loss_and_grads`` too (every
        earlier particle's graph is retained, as ``TraceEnum_ELBO`` retains them all).
    :param validate: check factor values for NaN and ``+inf`` (one host-device sync per step);
        defaults to Pyro's validation setting.
    :raises GraphError: (a :class:`ValueError`) on a too small ``max_plate_nesting``, an
        enumerate annotation on a continuous site, enumeration dim conflicts, or a guide that
        enumerates a site the model lacks (each message names the Pyro site or plate).
    :raises IntractableError: if the enumerated sites admit no polynomial-time elimination.
    """

    def __init__(self, num_particles: int = 1, max_plate_nesting: float | None = float("inf"),
                 max_iarange_nesting: int | None = None, vectorize_particles: bool = False,
                 strict_enumeration_warning: bool = True, ignore_jit_warnings: bool = False,
                 jit_options: dict[str, Any] | None = None, retain_graph: bool | None = None,
                 tail_adaptive_beta: float = -1.0, *, validate: bool | None = None) -> None:
        super().__init__(num_particles=num_particles,
                         max_plate_nesting=float("inf") if max_plate_nesting is None
                         else max_plate_nesting,
                         max_iarange_nesting=max_iarange_nesting,
                         vectorize_particles=vectorize_particles,
                         strict_enumeration_warning=strict_enumeration_warning,
                         ignore_jit_warnings=ignore_jit_warnings, jit_options=jit_options,
                         retain_graph=retain_graph, tail_adaptive_beta=tail_adaptive_beta)
        self.validate = validate

    def _get_trace(self, model: Callable[..., Any], guide: Callable[..., Any],
                   args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        """One traced (model, guide) pair (the first, under sequential guide enumeration)."""
        model_trace, guide_trace, _ = next(iter(self._traces(model, guide, args, kwargs)))
        return model_trace, guide_trace

    def _nesting(self, model: Callable[..., Any], guide: Callable[..., Any],
                 args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
        """``max_plate_nesting``, guessed first if it is unknown (Pyro's ``inf``), by tracing
        the model and guide once as Pyro does; then checked
        (:func:`~plated.pyro.trace.check_max_plate_nesting`)."""
        if self.max_plate_nesting == float("inf"):
            self._guess_max_plate_nesting(model, guide, args, kwargs)
        return check_max_plate_nesting(self.max_plate_nesting)

    def _traces(self, model: Callable[..., Any], guide: Callable[..., Any],
                args: tuple[Any, ...], kwargs: dict[str, Any]
                ) -> Iterator[tuple[Any, Any, bool]]:
        """The traced (model, guide) pairs of every particle (several per particle under
        sequential guide enumeration; one pair for all particles with
        ``vectorize_particles``), each with whether it is the last.

        :raises NotImplementedError: for a :class:`pyro.infer.GuideMessenger` guide, as Pyro.
        """
        if isinstance(poutine.unwrap(guide), Messenger):
            raise NotImplementedError(
                "TraceEnum_ELBO does not support GuideMessenger (nor does TVE_ELBO): write the "
                "guide as a function or a PyroModule")
        nesting = self._nesting(model, guide, args, kwargs)
        if self.vectorize_particles:
            model = self._vectorized_num_particles(model)
            guide = self._vectorized_num_particles(guide)
        runs = 1 if self.vectorize_particles else self.num_particles
        for run in range(runs):
            for model_trace, guide_trace, more in get_trace_pairs(model, guide, args, kwargs,
                                                                  nesting):
                yield model_trace, guide_trace, run == runs - 1 and not more

    def _particles(self, model: Callable[..., Any], guide: Callable[..., Any],
                   args: tuple[Any, ...], kwargs: dict[str, Any]
                   ) -> Iterator[tuple[torch.Tensor | float, bool, bool]]:
        """Per traced pair, its ELBO, whether the pair holds a ``param`` site and whether it is
        the last; under validation, warns when nothing is enumerated (with
        ``strict_enumeration_warning``)."""
        validate = is_validation_enabled() if self.validate is None else self.validate
        for model_trace, guide_trace, last in self._traces(model, guide, args, kwargs):
            traces = (model_trace, guide_trace)
            if is_validation_enabled() and self.strict_enumeration_warning and not any(
                    site["type"] == "sample" and site["infer"].get("enumerate")
                    for trace in traces for site in trace.nodes.values()):
                warnings.warn(_NOTHING_ENUMERATED, stacklevel=3)
            params = any(site["type"] == "param" for trace in traces
                         for site in trace.nodes.values())
            yield (elbo_particle(model_trace, guide_trace, self.max_plate_nesting, validate),
                   params, last)

    def loss(self, model: Callable[..., Any], guide: Callable[..., Any], *args: Any,
             **kwargs: Any) -> float:
        """The negative ELBO, a float (no gradients are recorded); warns if it is NaN."""
        elbo = 0.0
        with torch.no_grad():
            for particle, _, _ in self._particles(model, guide, args, kwargs):
                if is_identically_zero(particle):
                    continue
                elbo += float(particle) / self.num_particles
        return _checked(-elbo)

    def differentiable_loss(self, model: Callable[..., Any], guide: Callable[..., Any],
                            *args: Any, **kwargs: Any) -> torch.Tensor:
        """The negative ELBO as a differentiable tensor.

        :raises ValueError: if the ELBO is not differentiable (for example identically zero),
            as Pyro does.
        """
        elbo: torch.Tensor | float = 0.0
        for particle, _, _ in self._particles(model, guide, args, kwargs):
            if is_identically_zero(particle):
                continue
            elbo = elbo + particle
        elbo = elbo / self.num_particles
        if not isinstance(elbo, torch.Tensor) or not elbo.requires_grad:
            raise ValueError(f"ELBO is cannot be differentiated: {elbo} (TVE_ELBO: the model "
                             "and guide have no parameters it depends on)")
        return -elbo  # no NaN check here: it would cost a host-device sync

    def loss_and_grads(self, model: Callable[..., Any], guide: Callable[..., Any],
                       *args: Any, **kwargs: Any) -> float:
        """The negative ELBO as a float; accumulates its gradients into the parameters; warns if
        it is NaN.

        The graph of every particle but the last is retained, as ``TraceEnum_ELBO`` retains
        them all, so that later particles may differentiate through tensors they share (a guide
        that calls ``torch.autograd.grad`` itself, under sequential enumeration). The last one's
        is retained only with ``retain_graph=True``: freeing its saved tensors as the backward
        pass goes makes a large step markedly faster (``benchmarks/pyro_revisions.py``). Pass
        ``retain_graph=True`` when the model's arguments carry a graph that a later call
        differentiates again.
        """
        elbo = 0.0
        for particle, params, last in self._particles(model, guide, args, kwargs):
            if not isinstance(particle, torch.Tensor) or is_identically_zero(particle):
                continue
            elbo += particle.item() / self.num_particles
            if params and particle.requires_grad:
                (-particle / self.num_particles).backward(
                    retain_graph=bool(self.retain_graph) or not last)
        return _checked(-elbo)

    def _one_posterior(self, what: str, model: Callable[..., Any], guide: Callable[..., Any],
                       args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any, Any]:
        """The traced pair and engine queries (:class:`~plated.pyro.Posterior`) of one run.

        :raises NotImplementedError: with Pyro's wording, for several particles or guide
            enumeration.
        """
        from .query import Posterior, _check_no_multiple_sampling

        if self.num_particles != 1:
            raise NotImplementedError(
                f"TraceEnum_ELBO.{what}() is not compatible with multiple particles "
                f"(TVE_ELBO: num_particles={self.num_particles}; use num_particles=1)")
        model_trace, guide_trace, _ = next(iter(self._traces(model, guide, args, kwargs)))
        for name, site in guide_trace.nodes.items():
            if site["type"] == "sample" and (
                    "_enumerate_dim" in site["infer"] or "_enum_total" in site["infer"]):
                raise NotImplementedError(
                    f"TraceEnum_ELBO.{what}() is not compatible with guide enumeration "
                    f"(TVE_ELBO: guide site {name!r} is enumerated; enumerate it in the model)")
        validate = is_validation_enabled() if self.validate is None else self.validate
        collected = collect(model_trace, guide_trace, self.max_plate_nesting)
        _check_no_multiple_sampling(collected)
        return model_trace, guide_trace, Posterior(collected, validate=validate)

    def compute_marginals(self, model: Callable[..., Any], guide: Callable[..., Any],
                          *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Marginal distributions of each model-enumerated site, as ``TraceEnum_ELBO`` returns
        them: a dict from site name to a distribution of the site's type with ``logits``, all
        from one engine pass (:meth:`plated.pyro.Posterior.marginals`).

        :raises NotImplementedError: for several particles or guide enumeration, as Pyro.
        """
        _, _, post = self._one_posterior("compute_marginals", model, guide, args, kwargs)
        probs = post.marginals() if post.sites else {}
        out: dict[str, Any] = OrderedDict()
        for name in post.sites:
            fn = post._collected.model_enum[name]["fn"]
            logits = probs[name].log()
            if isinstance(fn, dist.Bernoulli):
                logits = logits[..., 1] - logits[..., 0]
            out[name] = type(fn)(logits=logits)
        return out

    def sample_posterior(self, model: Callable[..., Any], guide: Callable[..., Any],
                         *args: Any, **kwargs: Any) -> Any:
        """Run the model once with every model-enumerated site set to a joint posterior sample
        (one engine pass, :meth:`plated.pyro.Posterior.sample`) and the guide's values
        replayed; return what the model returns, as ``TraceEnum_ELBO.sample_posterior``.

        :raises NotImplementedError: for several particles or guide enumeration, as Pyro.
        """
        from .query import replay_values

        with poutine.block(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Found vars in model but not guide")
            _, guide_trace, post = self._one_posterior("sample_posterior", model, guide, args,
                                                       kwargs)
            samples = post.sample(1) if post.sites else {}
            values = {name: value[0] for name, value in samples.items()}
        return replay_values(poutine.replay(model, trace=guide_trace), post, values)(
            *args, **kwargs)


class JitTVE_ELBO(TVE_ELBO):
    """A drop-in for :class:`pyro.infer.JitTraceEnum_ELBO`: :class:`TVE_ELBO` with
    :meth:`differentiable_loss` (and so :meth:`loss_and_grads`) compiled by
    :func:`pyro.ops.jit.trace`, as Pyro compiles ``TraceEnum_ELBO``'s.

    The first call of each (model, guide, number of arguments, keyword arguments) traces the
    whole step: the guide and model under Pyro's handlers, the collection of factors and the
    engine's plan, which is made then and baked into the compiled graph. Later calls run that
    graph (torch's TorchScript interpreter), with no Python for the handlers, the trace or the
    plan. Losses and gradients equal :class:`TVE_ELBO`'s; :meth:`loss` is not compiled (nor is
    Pyro's).

    The limits are ``JitTraceEnum_ELBO``'s: the model and guide must have static structure,
    tensors must be passed in ``*args`` and everything else in ``**kwargs`` (a new value of a
    keyword argument compiles again), and the parameters must all exist after the first call.
    Every choice the step makes from tensor *values* is frozen at the first call, with a
    ``TracerWarning`` (``ignore_jit_warnings=True`` silences them): here that is the engine's
    check of each log-space contraction for underflow, so a later call whose contraction
    underflows where the first call's did not gets the plain shifted sum, as Pyro's
    contractions always do, not the repaired one; use :class:`TVE_ELBO` for such peaked
    models. Factor values are never validated inside a compiled step (``validate`` is off, as
    Pyro turns validation off while it compiles).

    The arguments are :class:`TVE_ELBO`'s; ``ignore_jit_warnings`` and ``jit_options`` go to
    :func:`pyro.ops.jit.trace`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._compiled: dict[tuple[int, int], Any] = {}

    def differentiable_loss(self, model: Callable[..., Any], guide: Callable[..., Any],
                            *args: Any, **kwargs: Any) -> torch.Tensor:
        """The negative ELBO as a differentiable tensor, from the compiled step (compiled on
        the first call for this model and guide)."""
        key = (id(model), id(guide))
        compiled = self._compiled.get(key)
        if compiled is None:
            weak_self = weakref.ref(self)

            def loss(*args: Any, **kwargs: Any) -> torch.Tensor:
                elbo = weak_self()
                assert elbo is not None  # the compiled step lives in the ELBO's own dict
                validate, elbo.validate = elbo.validate, False
                try:
                    return TVE_ELBO.differentiable_loss(elbo, model, guide, *args, **kwargs)
                finally:
                    elbo.validate = validate

            compiled = pyro.ops.jit.trace(loss, ignore_warnings=self.ignore_jit_warnings,
                                          jit_options=dict(self.jit_options or {}))
            self._compiled[key] = compiled
        return compiled(*args, **kwargs)

    def loss_and_grads(self, model: Callable[..., Any], guide: Callable[..., Any],
                       *args: Any, **kwargs: Any) -> float:
        """The negative ELBO as a float, from the compiled step; accumulates its gradients into
        the parameters; warns if it is NaN."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward(retain_graph=bool(self.retain_graph))
        return _checked(loss.item())
