"""Exact queries on a Pyro model: log-likelihood, MAP values, posterior samples and marginals.

:func:`posterior` traces the model once (with an optional guide, whose non-enumerated values are
replayed into the model) and builds the plated factor graph of its enumerated sites. Each query is
then one pass of the engine that covers every enumerated site at once, unlike Pyro's
``compute_marginals``, which runs one contraction per site.

Results are laid out as Pyro lays out the site's values: a site inside plates at dims ``-1`` and
``-3`` gets shape ``(size_3, 1, size_1)``; ``sample(n)`` prepends ``n``; ``marginals()`` appends the
number of values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pyro import poutine

from ..errors import IntractableError
from ..graph import PlatedFactorGraph
from .trace import (
    Collected,
    check_max_plate_nesting,
    collect,
    factor_graph,
    get_traces,
    intractable_hint,
)

__all__ = ["Posterior", "posterior"]


def _empty_guide(*args: Any, **kwargs: Any) -> None:
    """A guide with no sites."""
    return None


class Posterior:
    """Exact posterior queries over the enumerated sites of one traced model run.

    Build it with :func:`posterior`.

    :param collected: the traced run's factors and costs (:func:`~plated.pyro.trace.collect`).
    :param validate: check factor values for NaN and ``+inf`` on each query.
    """

    def __init__(self, collected: Collected, validate: bool = True) -> None:
        self._collected = collected
        self._graph: PlatedFactorGraph | None = None
        self._validate = validate

    @property
    def sites(self) -> tuple[str, ...]:
        """The model's enumerated sites, in trace order."""
        return tuple(self._collected.model_enum)

    @property
    def graph(self) -> PlatedFactorGraph:
        """The plated factor graph of the enumerated sites (dims named after sites and plates)."""
        if self._graph is None:
            collected = self._collected
            self._graph = factor_graph([placed.factor for placed in collected.factors],
                                       collected.plates, validate=self._validate)
        return self._graph

    def _call(self, fn: Callable[[], Any]) -> Any:
        """``fn()``, an engine query, with an intractable graph's ways out put for a Pyro model."""
        try:
            return fn()
        except IntractableError as err:
            raise intractable_hint(err) from None

    def log_likelihood(self) -> torch.Tensor:
        """The model's log density with every enumerated site summed out, differentiable.

        For a model whose only latent sites are enumerated, this is the log marginal likelihood
        of the observations; other latent sites count at their traced (or guide) values.
        """
        collected = self._collected
        total = sum((cost.factor.tensor.sum() for cost in collected.costs),
                    start=torch.zeros((), dtype=torch.get_default_dtype()))
        if collected.factors:
            total = total + collected.scale * self._call(self.graph.log_partition)
        return total

    def map(self) -> dict[str, torch.Tensor]:
        """A joint MAP assignment of every enumerated site.

        Like Pyro's ``infer_discrete(temperature=0)``, but one max-product pass for all sites.
        """
        idx = self._call(self.graph.map)
        return {s: self._values(s, idx[s], lead=0) for s in self.sites}

    def sample(self, num_samples: int = 1, generator: torch.Generator | None = None
               ) -> dict[str, torch.Tensor]:
        """Exact joint posterior samples of all enumerated sites, ``(num_samples, *site shape)``.

        :param generator: the random number generator to draw with (default: torch's global one).
        """
        idx = self._call(lambda: self.graph.sample(num_samples, generator=generator))
        return {s: self._values(s, idx[s], lead=1) for s in self.sites}

    def marginals(self) -> dict[str, torch.Tensor]:
        """Posterior marginal probabilities of each enumerated site, ``(*site shape, values)``.

        One backward pass of the engine gives all of them. They are differentiable with respect
        to the model's parameters (``.detach()`` them to plot or convert to numpy).
        """
        probs = self._call(self.graph.marginals)
        return {s: self._layout(s, probs[s], lead=0, trail=1) for s in self.sites}

    # -- layout ----------------------------------------------------------------------------------
    def _layout(self, site: str, x: torch.Tensor, lead: int, trail: int) -> torch.Tensor:
        """``x``, a per-site engine result (``lead`` dims, then the site's plates in the graph's
        order, then ``trail`` dims), with its plate dims laid out at their Pyro dims."""
        collected = self._collected
        plates = self.graph.plan().var_plates(site)
        stack = collected.model_enum[site]["cond_indep_stack"]
        plate_dims = {frame.name: frame.dim for frame in stack if frame.vectorized}
        ndim = max((-d for d in plate_dims.values()), default=0)
        order = sorted(plates, key=lambda p: plate_dims[p])  # leftmost (most negative) first
        perm = (list(range(lead)) + [lead + plates.index(p) for p in order]
                + list(range(lead + len(plates), x.dim())))
        x = x.permute(perm)
        shape = [1] * ndim
        for p in plates:
            shape[ndim + plate_dims[p]] = collected.plates[p].size
        return x.reshape(tuple(x.shape[:lead]) + tuple(shape) + tuple(x.shape[x.dim() - trail:]))

    def _values(self, site: str, idx: torch.Tensor, lead: int) -> torch.Tensor:
        """The site's values at engine indices ``idx`` (``lead`` dims, then the site's plates),
        laid out as Pyro lays out the site's values."""
        fn = self._collected.model_enum[site]["fn"]
        support = fn.enumerate_support(expand=False)
        support = support.reshape((support.shape[0],) + tuple(fn.event_shape))
        return support[self._layout(site, idx, lead=lead, trail=0)]


def posterior(model: Callable[..., Any], *args: Any, max_plate_nesting: int,
              guide: Callable[..., Any] | None = None, validate: bool = True,
              **kwargs: Any) -> Posterior:
    """Trace ``model(*args, **kwargs)`` and return exact queries over its enumerated sites.

    :param model: a Pyro model with sites marked ``infer={"enumerate": "parallel"}``.
    :param max_plate_nesting: the number of plate dims of the model.
    :param guide: an optional guide for the non-enumerated latent sites (for example a trained
        ``AutoDelta``); its values are replayed into the model. It must not enumerate.
    :param validate: check factor values for NaN and ``+inf``.
    :raises GraphError: see :func:`~plated.pyro.trace.collect` (queries raise
        :class:`~plated.IntractableError` for a graph with no polynomial-time elimination).
    :raises NotImplementedError: if the guide enumerates.
    """
    nesting = check_max_plate_nesting(max_plate_nesting)
    traces = list(get_traces(model, _empty_guide if guide is None else guide, args, kwargs,
                             nesting))
    if len(traces) != 1:
        raise NotImplementedError("posterior queries do not support sequential guide enumeration")
    with poutine.block():
        collected = collect(*traces[0], nesting)
    if collected.guide_enum:
        raise NotImplementedError(
            f"posterior queries do not support guide enumeration (guide enumerates "
            f"{sorted(collected.guide_enum)}); enumerate these sites in the model instead"
        )
    _check_no_multiple_sampling(collected)
    return Posterior(collected, validate=validate)


def _check_no_multiple_sampling(collected: Collected) -> None:
    """:raises NotImplementedError: naming the site, for a model site sampled several times
    (``num_samples``): its values are samples, not its support, which the queries report."""
    for name, site in collected.model_enum.items():
        if site["infer"].get("num_samples") is not None:
            raise NotImplementedError(
                f"posterior queries do not support multiple sampling: model site {name!r} has "
                f"num_samples={site['infer']['num_samples']}; enumerate it exactly (drop "
                "num_samples)"
            )
