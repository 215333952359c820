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

import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger

from ..errors import GraphError, IntractableError
from ..graph import PlatedFactorGraph
from .markov import INIT_KEY, replayed_chains
from .trace import (
    Collected,
    check_max_plate_nesting,
    collect,
    factor_graph,
    get_traces,
    intractable_hint,
)

__all__ = ["Posterior", "infer_discrete", "posterior", "replay_values"]


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
    return _posterior(model, args, kwargs, check_max_plate_nesting(max_plate_nesting), guide,
                      validate)


def _posterior(model: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
               nesting: int, guide: Callable[..., Any] | None, validate: bool) -> Posterior:
    """:func:`posterior`, with the model's arguments as a tuple and a dict."""
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


# ------------------------------------------------------------------------------------------------
# replay: the model re-run with its enumerated sites fixed


class _SetValues(Messenger):
    """Sets the value of each named sample site and marks it done (as ``poutine.replay`` does)."""

    def __init__(self, values: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.values = values

    def _pyro_sample(self, msg: Any) -> None:
        """Give a site in ``values`` its value."""
        value = self.values.get(msg["name"])
        if value is not None:
            msg["value"] = value
            msg["done"] = True


def _previous_values(collected: Collected, values: Mapping[str, torch.Tensor]
                     ) -> dict[tuple[str, str, int], torch.Tensor]:
    """For each ``markov_plate`` chain with fixed values, the tensor its ``init`` must return at
    each lag: the chain's values ``lag`` steps earlier at every step, the initial sites' values
    before step 0 (see :func:`~plated.pyro.markov.replayed_chains`), by ``(plate, chain, lag)``.
    """
    inits: dict[tuple[str, str], dict[int, str]] = {}
    for name, site in collected.model_enum.items():
        info = site["infer"].get(INIT_KEY)
        if info is not None:
            inits.setdefault((info[0], info[1]), {})[info[2]] = name
    out: dict[tuple[str, str, int], torch.Tensor] = {}
    for (plate, chain), lags in inits.items():
        site = collected.model_enum.get(chain)
        if site is None or chain not in values:
            continue
        event_ndim = len(site["fn"].event_shape)
        time_dim = next(frame.dim for frame in site["cond_indep_stack"] if frame.name == plate)
        history = len(lags)
        # the sequence x(-history), ..., x(-1), x(0), ..., x(T - 1) along the time dim
        parts = [values[lags[lag]] for lag in range(history, 0, -1)] + [values[chain]]
        ndim = max(part.dim() for part in parts)
        parts = [part.reshape((1,) * (ndim - part.dim()) + tuple(part.shape)) for part in parts]
        position = ndim - event_ndim + time_dim  # the time dim, counted from the left
        shape = list(torch.broadcast_shapes(*(part.shape for part in parts)))
        steps = parts[-1].shape[position]
        shape[position] = 1
        heads = [part.expand(shape) for part in parts[:-1]]
        shape[position] = steps
        sequence = torch.cat([*heads, parts[-1].expand(shape)], position)
        for lag in lags:  # x(t - lag) for t = 0 .. T - 1
            out[(plate, chain, lag)] = sequence.narrow(position, history - lag, steps)
    return out


def replay_values(model: Callable[..., Any], posterior: Posterior,
                  values: Mapping[str, torch.Tensor]) -> Callable[..., Any]:
    """``model`` with its enumerated sites fixed to ``values`` (one value per site, as
    :meth:`Posterior.map` gives them): a ``markov_plate`` chain's ``init`` then returns the
    chain's values shifted by one step, so that each step sees its own previous value.

    :param posterior: the queries ``values`` came from (for the chains of ``markov_plate``).
    """
    previous = _previous_values(posterior._collected, values)

    def replayed(*args: Any, **kwargs: Any) -> Any:
        with replayed_chains(previous):
            return _SetValues(values)(model)(*args, **kwargs)

    return replayed


def _guess_max_plate_nesting(model: Callable[..., Any], args: tuple[Any, ...],
                             kwargs: dict[str, Any]) -> int:
    """The number of plate dims of ``model``, from one run without enumeration (as Pyro's ELBOs
    guess it)."""
    with poutine.block():
        trace = poutine.trace(model).get_trace(*args, **kwargs)
    dims = [frame.dim for site in trace.nodes.values() if site["type"] == "sample"
            for frame in site["cond_indep_stack"] if frame.vectorized and frame.dim is not None]
    return -min(dims) if dims else 0


#: Pyro's warning when infer_discrete finds nothing enumerated, word for word.
_NOTHING_ENUMERATED = (
    "infer_discrete found no sample sites configured for enumeration. If you want to enumerate "
    'sites, you need to @config_enumerate or set infer={"enumerate": "sequential"} or '
    'infer={"enumerate": "parallel"}.'
)


def infer_discrete(fn: Callable[..., Any] | None = None, first_available_dim: int | None = None,
                   temperature: int = 1, *, strict_enumeration_warning: bool = True,
                   max_plate_nesting: int | None = None, validate: bool = True) -> Any:
    """A drop-in for :func:`pyro.infer.infer_discrete` whose inference runs on the engine.

    The returned function runs ``fn`` once to trace its enumerated sites, makes one engine pass
    over all of them (max-product for ``temperature=0``, a joint posterior sample for
    ``temperature=1``), and runs ``fn`` again with each site marked
    ``infer={"enumerate": "parallel"}`` fixed to its MAP value or sample; it returns what ``fn``
    returns, and ``poutine.trace`` of it records the fixed values. Unlike Pyro's, it understands
    :class:`~plated.pyro.markov_plate` chains: the chain site gets one value per step, its
    initial site the state before step 0, and the tensor ``init`` returned is the chain shifted
    by one step. As in Pyro, the first run is hidden from outer handlers, and latent sites that
    are not enumerated are sampled afresh in the second run (replay a guide trace *into* ``fn``
    to fix them).

    Usable as a decorator: ``@infer_discrete(first_available_dim=-2, temperature=0)``.

    :param fn: the model.
    :param first_available_dim: Pyro's way of giving the plate dims: ``-1 - max_plate_nesting``.
    :param temperature: 0 for MAP values, 1 for posterior samples.
    :param strict_enumeration_warning: warn (in Pyro's words) when nothing is enumerated.
    :param max_plate_nesting: the number of plate dims, if ``first_available_dim`` is not
        given; if neither is, it is guessed at the first call from one more run of ``fn``
        without enumeration, and kept.
    :param validate: check factor values for NaN and ``+inf``.
    :raises ValueError: for a temperature other than 0 or 1, or a nonnegative
        ``first_available_dim``.
    """
    if fn is None:  # used as a decorator
        return functools.partial(infer_discrete, first_available_dim=first_available_dim,
                                 temperature=temperature,
                                 strict_enumeration_warning=strict_enumeration_warning,
                                 max_plate_nesting=max_plate_nesting, validate=validate)
    if temperature not in (0, 1):
        raise ValueError(f"temperature must be 0 (map) or 1 (sample) for now (got "
                         f"{temperature!r})")
    if first_available_dim is not None:
        if first_available_dim >= 0:
            raise GraphError(f"first_available_dim must be negative, got {first_available_dim}")
        given: int | None = -1 - first_available_dim
    else:
        given = max_plate_nesting
    model = fn
    guessed: list[int] = []  # the guess of the first call, kept (as Pyro's ELBOs keep theirs)

    def inferred(*args: Any, **kwargs: Any) -> Any:
        if given is None and not guessed:
            guessed.append(_guess_max_plate_nesting(model, args, kwargs))
        nesting = check_max_plate_nesting(given) if given is not None else guessed[0]
        with poutine.block(), torch.no_grad(), warnings.catch_warnings():
            # there is no guide: Pyro's infer_discrete does not check one either
            warnings.filterwarnings("ignore", "Found vars in model but not guide")
            post = _posterior(model, args, kwargs, nesting, None, validate)
            if not post.sites:
                values: dict[str, torch.Tensor] = {}
                if strict_enumeration_warning:
                    warnings.warn(_NOTHING_ENUMERATED, stacklevel=2)
            elif temperature == 0:
                values = post.map()
            else:
                values = {name: value[0] for name, value in post.sample(1).items()}
        return replay_values(model, post, values)(*args, **kwargs)

    return inferred
