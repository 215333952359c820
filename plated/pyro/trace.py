"""From a Pyro model (and guide) to engine factors.

Running the model is Pyro's job: its own handlers (``poutine.enum``, ``poutine.trace``,
``poutine.replay``, ``poutine.queue``) run the guide and then the model against it, exactly as
``TraceEnum_ELBO`` does. What happens after the trace is ours: :func:`collect` reads each sample
site's log-probability tensor, names its dims (Pyro plate names for plate dims, site names for
enumeration dims) and sorts it into

* *factors* of a plated factor graph, over the model's enumerated variables, which the engine
  eliminates; and
* *costs*, terms that depend on no model-enumerated variable and are only summed.

Each is a :class:`~plated.factor.Factor` paired with its site's Pyro ordinal
(:class:`PlacedFactor`). Dims are named after Pyro's plates and sites, so every error the engine
raises names them too.
"""

from __future__ import annotations

import math
import queue
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer.enum import iter_discrete_escape, iter_discrete_extend
from pyro.infer.util import is_validation_enabled
from pyro.poutine.enum_messenger import EnumMessenger
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import Message
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from pyro.util import check_model_guide_match, check_site_shape, check_traceenum_requirements
from torch.distributions.utils import clamp_probs, probs_to_logits

from ..errors import GraphError, IntractableError
from ..factor import Factor, Plate
from ..graph import PlatedFactorGraph
from ..plan.analysis import variable_ordinals
from ..rings import LOG
from .markov import FIXED_INIT_KEY, INIT_KEY, MARKOV_KEY

__all__ = [
    "Collected",
    "PlacedFactor",
    "check_max_plate_nesting",
    "collect",
    "factor_graph",
    "get_trace_pairs",
    "get_traces",
    "intractable_hint",
]

ENUM_DIM = "_enumerate_dim"

#: The ways out of an intractable Pyro model, as :meth:`IntractableError.with_remedies` takes
#: them (the engine's own, such as unrolling a plate, are not open to a Pyro model).
_PYRO_REMEDIES = (
    "enumerate the offending sites in the guide instead",
    "move a site that several plate elements share outside the plate (or the plate's sites "
    "inside it)",
    "sequentialize the plate (iterate over pyro.plate rather than using it as a context)",
)


@dataclass(frozen=True)
class PlacedFactor:
    """A factor of a traced site, with the Pyro plates the site lives in.

    :ivar factor: the tensor, its dims (names of the plates of size > 1 and of the enumerated
        sites it varies along) and its label (``"site 'x'"``) for error messages.
    :ivar ordinal: the site's Pyro ordinal, the vectorized plates of its ``cond_indep_stack``.
        It may hold plates the factor has no dim of (plates of size 1, plates already summed
        out); Pyro's expectations and its plate tree are taken over it.
    """

    factor: Factor
    ordinal: frozenset[str]


@dataclass(frozen=True)
class Collected:
    """The factors and costs of one (model trace, guide trace) pair, as :func:`collect` reads
    them.

    :ivar factors: log-factors over the model's enumerated variables (model-enumerated sites,
        sites that depend on them, masked inside the log, and the equality factors of chains
        with ``history > 1``), unscaled; the engine eliminates them.
    :ivar costs: model terms over no model-enumerated variable, scaled and masked.
    :ivar guide_costs: the guide's ``-log q`` terms.
    :ivar dice: DiCE weights of guide sites, in log space: the log-probabilities of enumerated
        values, and for sites sampled without reparameterization the score function minus
        itself detached (value 0, gradient that of ``log q``).
    :ivar log_denom: per Pyro ordinal, the log of the number of values of the guide sites
        enumerated sequentially there.
    :ivar scale: the common ``poutine.scale`` of the factors.
    :ivar plates: the plates of size > 1 by name, in order of first use; a ``markov_plate`` is
        sequential, with the chain variables and their previous-value dims.
    :ivar model_enum: the model's own enumerated sites (name to trace site), in trace order.
    :ivar guide_enum: the guide's enumerated sites, in trace order.
    :ivar variables: the variables the engine sums out: ``model_enum`` and the shift-register
        variables of chains with ``history > 1``, which are no Pyro sites.
    """

    factors: tuple[PlacedFactor, ...]
    costs: tuple[PlacedFactor, ...]
    guide_costs: tuple[PlacedFactor, ...]
    dice: tuple[PlacedFactor, ...]
    log_denom: Mapping[frozenset[str], float]
    scale: float | torch.Tensor
    plates: Mapping[str, Plate]
    model_enum: Mapping[str, Any]
    guide_enum: tuple[str, ...]
    variables: frozenset[str]


def factor_graph(factors: Sequence[Factor], plates: Mapping[str, Plate], *,
                 keep_plates: Sequence[str] = (), extra_plates: Sequence[Plate] = (),
                 validate: bool = True) -> PlatedFactorGraph:
    """The plated factor graph of ``factors``, declaring those of ``plates`` they use.

    A sequential plate none of whose chain variables is among the factors' dims is declared
    independent: for these factors its elements are unrelated. ``extra_plates`` are declared
    after the others; ``keep_plates`` and ``validate`` are :class:`PlatedFactorGraph`'s.
    """
    used = {d for factor in factors for d in factor.dims}
    declared = []
    for plate in plates.values():
        if plate.name not in used:
            continue
        if plate.sequential and not any(curr in used for curr, _ in plate.prev):
            plate = Plate(plate.name, plate.size)
        declared.append(plate)
    declared.extend(extra_plates)
    return PlatedFactorGraph(factors, declared, keep_plates=keep_plates, validate=validate)


@dataclass(frozen=True)
class _Chain:
    """A ``markov_plate`` chain: its plate, its chain site and its initial site per lag."""

    plate: str
    site: str
    inits: Mapping[int, str]  # lag (1 to history) -> the initial site at that lag


class _SiteChecks(Messenger):
    """Checks each sample site after the plates have seen it and before enumeration does."""

    def __init__(self, max_plate_nesting: int, role: str) -> None:
        """:param role: ``"model"`` or ``"guide"``, for error messages."""
        super().__init__()
        self.max_plate_nesting = max_plate_nesting
        self.role = role

    def _pyro_sample(self, msg: Message) -> None:
        """Check one sample site.

        :raises GraphError: naming the site, if it is in a plate at a dim beyond
            ``max_plate_nesting``, or marked for enumeration while its distribution has no
            enumerable support or with ``num_samples`` (multiple sampling).
        """
        name = msg["name"]
        for frame in msg["cond_indep_stack"]:
            if frame.vectorized and frame.dim is not None and frame.dim < -self.max_plate_nesting:
                raise GraphError(
                    f'at site "{name}", plate stack overflow: {self.role} site {name!r} is '
                    f"inside plate {frame.name!r} at dim {frame.dim}, but max_plate_nesting="
                    f"{self.max_plate_nesting}. Try increasing max_plate_nesting to at least "
                    f"{-frame.dim}: pass max_plate_nesting={-frame.dim} (the number of plate dims "
                    "the model uses), or omit it to have "
                    "it guessed"
                )
        infer = msg["infer"] or {}
        if infer.get("enumerate") and not msg["is_observed"] and not msg["done"]:
            fn = msg["fn"]
            if infer.get("num_samples") is None and not getattr(fn, "has_enumerate_support",
                                                                False):
                raise GraphError(
                    f"{self.role} site {name!r} is marked infer={{'enumerate': "
                    f"{infer['enumerate']!r}}} but its distribution {type(fn).__name__} has no "
                    "enumerable support; only discrete sites can be enumerated (remove the "
                    "annotation, give the site a guide, or sample it several times with "
                    "infer={'enumerate': 'parallel', 'num_samples': k})"
                )


def check_max_plate_nesting(max_plate_nesting: Any) -> int:
    """``max_plate_nesting`` as an int.

    :raises GraphError: if it is missing (``None`` or infinite, Pyro's "unknown"), or not a
        nonnegative int.
    """
    if max_plate_nesting is None or max_plate_nesting == float("inf"):
        raise GraphError(
            "max_plate_nesting is missing: plated.pyro needs it to place enumeration dims to the "
            "left of every plate dim. Pass max_plate_nesting=N, where N is the number of nested "
            "pyro.plate dims in the model (for example 2 for plates at dims -1 and -2)"
        )
    if not isinstance(max_plate_nesting, int) or max_plate_nesting < 0:
        raise GraphError(f"max_plate_nesting must be a nonnegative int, got {max_plate_nesting!r}")
    return max_plate_nesting


def get_traces(model: Callable[..., Any], guide: Callable[..., Any], args: tuple[Any, ...],
               kwargs: dict[str, Any], max_plate_nesting: int
               ) -> Iterator[tuple[Trace, Trace]]:
    """The traced (model, guide) pairs of :func:`get_trace_pairs`, without its flag."""
    for model_trace, guide_trace, _ in get_trace_pairs(model, guide, args, kwargs,
                                                       max_plate_nesting):
        yield model_trace, guide_trace


def get_trace_pairs(model: Callable[..., Any], guide: Callable[..., Any],
                    args: tuple[Any, ...], kwargs: dict[str, Any], max_plate_nesting: int
                    ) -> Iterator[tuple[Trace, Trace, bool]]:
    """Run the guide, then the model against it, with Pyro's own enumeration handlers.

    Guide sites marked ``enumerate="sequential"`` yield one trace pair per value, as in
    ``TraceEnum_ELBO``; everything else yields a single pair. Guide sites get Pyro's score parts;
    model log-probabilities are left to :func:`collect`, which computes each once, in the form it
    needs (Pyro's ``compute_log_prob`` would compute a scaled and masked copy of every site, and
    check each for NaN at the cost of a host-device sync per site).

    Each pair comes with a flag: whether more pairs follow (known before they are traced).
    """
    guide = EnumMessenger(first_available_dim=-1 - max_plate_nesting)(
        _SiteChecks(max_plate_nesting, "guide")(guide))
    model = EnumMessenger()(_SiteChecks(max_plate_nesting, "model")(model))
    pending: queue.LifoQueue[Trace] = queue.LifoQueue()
    guide = poutine.queue(guide, pending, escape_fn=iter_discrete_escape,
                          extend_fn=iter_discrete_extend)
    pending.put(poutine.Trace())
    while not pending.empty():
        guide_trace = poutine.trace(guide, graph_type="flat").get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace),
                                    graph_type="flat").get_trace(*args, **kwargs)
        if is_validation_enabled():
            check_model_guide_match(model_trace, guide_trace, max_plate_nesting)
        for _, site in _sample_sites(guide_trace):
            site["score_parts"] = site["fn"].score_parts(
                site["value"], *site["args"], **site["kwargs"]).scale_and_mask(
                site["scale"], site["mask"])
            site["log_prob"] = site["score_parts"].log_prob
        _check_traces(model_trace, guide_trace, max_plate_nesting)
        yield model_trace, guide_trace, not pending.empty()


def _check_traces(model_trace: Trace, guide_trace: Trace, max_plate_nesting: int) -> None:
    """Pyro's checks of a traced pair, with its errors and warnings.

    Always (it reads shapes only): an enumerated site whose distribution has a batch dim of size
    > 1 at its enumeration dim, as a ``pyro.markov`` history too short for the model makes it.
    Under validation: Pyro's site shape checks, its warnings on possibly invalid plate
    dependencies (``check_traceenum_requirements``) and on multiple sampling.

    :raises GraphError: (a :class:`ValueError`) for an enumeration dim conflict, naming the site.
    :raises ValueError: Pyro's, for a log-probability of the wrong shape.
    """
    for role, trace in (("model", model_trace), ("guide", guide_trace)):
        for name, site in _sample_sites(trace):
            dim = site["infer"].get(ENUM_DIM)
            batch = tuple(site["fn"].batch_shape)
            if dim is not None and len(batch) >= -dim and batch[dim] != 1:
                raise GraphError(
                    f'Enumeration dim conflict at site "{name}"\n  Try increasing pyro.markov '
                    f"history size: the distribution of {role} site {name!r} has batch shape "
                    f"{batch}, of size {batch[dim]} at its enumeration dim {dim}, so it depends "
                    "on an enumerated site that its pyro.markov context has forgotten (pass "
                    "history= at least the order of the chain)"
                )
    if not is_validation_enabled():
        return
    check_traceenum_requirements(model_trace, guide_trace)
    _warn_multiple_sampling(model_trace, guide_trace)


def _check_site_shapes(model_trace: Trace, guide_trace: Trace, max_plate_nesting: int) -> None:
    """Under validation, Pyro's site shape checks (``check_site_shape``) of a traced pair, after
    :func:`collect`'s own, which name the dims at fault.

    :raises ValueError: Pyro's, for a log-probability of the wrong shape.
    """
    if not is_validation_enabled():
        return
    for role, trace in (("model", model_trace), ("guide", guide_trace)):
        for _, site in _sample_sites(trace):
            log_prob = site["log_prob"] if role == "guide" else _log_prob(site)
            shape = log_prob.shape
            for extra in (site["mask"], site["scale"]):
                if isinstance(extra, torch.Tensor):
                    shape = torch.broadcast_shapes(shape, extra.shape)
            check_site_shape({**site, "log_prob": torch.empty(shape, device="meta")},
                             max_plate_nesting)


def _warn_multiple_sampling(model_trace: Trace, guide_trace: Trace) -> None:
    """Pyro's warnings on multiple sampling (``infer={"num_samples": k}``): different ``k`` at
    parallel guide sites, and a model site sampled several times (whose gradients are biased,
    in Pyro as here)."""
    counts = {site["infer"].get("num_samples") for _, site in _sample_sites(guide_trace)
              if site["infer"].get("enumerate") == "parallel"
              and site["infer"].get("num_samples") is not None}
    if len(counts) > 1:
        warnings.warn(
            "Using different numbers of Monte Carlo samples for different guide sites in "
            "TraceEnum_ELBO.\nThis may be biased if the guide is not factorized "
            f"(TVE_ELBO: num_samples {sorted(counts)})", UserWarning, stacklevel=4)
    for name, site in _sample_sites(model_trace):
        if (site["infer"].get("enumerate") == "parallel" and site["infer"].get("num_samples")
                and name not in guide_trace):
            warnings.warn(
                f"Site {name} is multiply sampled in model,\nexpect incorrect gradient estimates "
                "from TraceEnum_ELBO.\nConsider using exact enumeration or guide sampling if "
                "possible.", RuntimeWarning, stacklevel=4)


def _sample_sites(trace: Trace) -> Iterator[tuple[str, Any]]:
    """The sample sites of ``trace`` (name, site), in trace order, without subsample sites."""
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site_is_subsample(site):
            yield name, site


def _ordinal(site: Any) -> frozenset[str]:
    """A site's Pyro ordinal: the names of the vectorized plates of its ``cond_indep_stack``."""
    return frozenset(frame.name for frame in site["cond_indep_stack"] if frame.vectorized)


def _site_label(name: str) -> str:
    """The label of a site's factor in the engine's error messages."""
    return f"site {name!r}"


def collect(model_trace: Trace, guide_trace: Trace, max_plate_nesting: int) -> Collected:
    """Sort the sample sites of a traced (model, guide) pair into factors and costs.

    Reads the pair only, except that each model site's unscaled log-probability is stored in it
    (``site["unscaled_log_prob"]``, computed once per trace).

    :param model_trace: the model run against the guide (see :func:`get_traces`).
    :param guide_trace: the guide run, with Pyro's score parts on each sample site.
    :param max_plate_nesting: the number of plate dims; enumeration dims lie to their left.
    :raises GraphError: naming the site or plate, for a guide that enumerates a site the model
        lacks, a plate at two dims, a dim that no plate or enumerated site owns, a misdeclared
        ``markov_plate``, sites over enumerated variables with different scales, or model
        enumeration more local than guide enumeration.
    """
    # Phase 1: the enumerated sites, and which site each enumeration id stands for
    guide_enum, model_enum, site_of_enum_id = _enumerated_sites(model_trace, guide_trace)
    # Phase 2: the plates, sequential where a markov_plate makes them chains
    plates, chains = _markov_chains(model_trace, _plates(model_trace, guide_trace), model_enum)
    variables = frozenset(model_enum) | {_lag_var(chain.site, lag) for chain in chains
                                         for lag in range(1, len(chain.inits))}

    def named(x: torch.Tensor, name: str, site: Any, what: str
              ) -> tuple[torch.Tensor, tuple[str, ...]]:
        """``x``, a tensor of site ``name`` (its ``what``), with its size-1 dims squeezed, and the
        names of its other dims: the plates and enumerated sites that own them."""
        names: dict[int, str] = {frame.dim: frame.name for frame in site["cond_indep_stack"]
                                 if frame.vectorized}
        for dim, enum_id in site["infer"].get("_dim_to_id", {}).items():
            if enum_id in site_of_enum_id:
                names[dim] = site_of_enum_id[enum_id]
        ndim = x.dim()
        dims = []
        for position, size in enumerate(x.shape):
            if size == 1:
                continue
            dim = position - ndim
            if dim not in names:
                where = "a plate dim" if -dim <= max_plate_nesting else "an enumeration dim"
                raise GraphError(
                    f"site {name!r}: its {what} has shape {tuple(x.shape)}, with size {size} at "
                    f"dim {dim}, which is {where} that no plate or enumerated site of this site "
                    "owns (an enumeration dim conflict). Declare batch dims with pyro.plate, "
                    "move event dims right with .to_event(), and keep max_plate_nesting at least "
                    "the number of plate dims"
                )
            dims.append(names[dim])
        return x.squeeze() if len(dims) < ndim else x, tuple(dims)

    def pack(x: torch.Tensor, name: str, site: Any, what: str) -> Factor:
        """``x``, a tensor of site ``name``, as a factor with named dims (see ``named``)."""
        return Factor(*named(x, name, site, what), _site_label(name))

    # Phase 3: each model site's log-probability; one over no model-enumerated variable is a cost
    costs: list[PlacedFactor] = []
    over_variables: list[tuple[str, Any, torch.Tensor, tuple[str, ...]]] = []
    site_dims: list[tuple[str, ...]] = []  # of each over_variables entry, its mask's included
    for name, site in _sample_sites(model_trace):
        tensor, dims = named(_log_prob(site), name, site, "log-probability")
        mask = site["mask"]
        # a site depends on enumerated variables through its log-probability or its mask
        mask_dims = (named(mask, name, site, "mask")[1] if isinstance(mask, torch.Tensor)
                     else ())
        if (name in model_enum or not variables.isdisjoint(dims)
                or not variables.isdisjoint(mask_dims)):
            over_variables.append((name, site, tensor, dims))
            site_dims.append(dims + tuple(d for d in mask_dims if d not in dims))
            continue
        if site["mask"] is not None or not _is_one(site["scale"]):
            tensor, dims = named(scale_and_mask(_log_prob(site), site["scale"], site["mask"]),
                                 name, site, "log-probability")
        costs.append(PlacedFactor(Factor(tensor, dims, _site_label(name)), _ordinal(site)))

    # Phase 4: the factors. A term over enumerated variables is masked inside the log and scaled
    # outside it. Plates that none of its variables lives in (by the engine's rule) are summed
    # first, as the engine would product-reduce them first anyway, so that the mask is applied
    # to the smaller tensor; a term that uses a previous-value dim of a sequential plate is a
    # transition of that plate's chain and is never summed along it.
    ordinals = variable_ordinals(site_dims, list(plates.values()))
    prev_plate = {prev: plate.name for plate in plates.values() for _, prev in plate.prev}
    factors: list[tuple[str, PlacedFactor]] = []
    scales: list[tuple[str, Any]] = []
    for (name, site, tensor, dims), full_dims in zip(over_variables, site_dims, strict=True):
        scales.append((name, site["scale"]))
        if name not in model_enum:  # Pyro's semantics: enumerated sites are never masked
            chains_used = {prev_plate[d] for d in dims if d in prev_plate}
            free = [d for d in dims if d in plates and d not in chains_used and all(
                d not in ordinals[v] for v in full_dims if v in variables)]
            mask = site["mask"]
            mask_named = (named(mask, name, site, "mask") if isinstance(mask, torch.Tensor)
                          else None)
            tensor, dims = _sum_and_mask(tensor, dims, free, mask, mask_named)
        factors.append((name, PlacedFactor(Factor(tensor, dims, _site_label(name)),
                                           _ordinal(site))))
    fixed = {name for name, site in model_enum.items() if site["infer"].get(FIXED_INIT_KEY)}
    model_factors = (*_match_fixed_inits(factors, costs, fixed),
                     *_markov_factors(chains, model_enum, plates))

    # Phase 5: the guide's -log q terms and DiCE weights
    guide_costs: list[PlacedFactor] = []
    dice: list[PlacedFactor] = []
    log_denom: dict[frozenset[str], float] = {}
    chain_plates = {name for name, plate in plates.items() if plate.sequential}
    for name, site in _sample_sites(guide_trace):
        ordinal = _ordinal(site)
        log_q = site["log_prob"]
        _check_guide_site_in_chain(name, site, ordinal & chain_plates)
        if not is_identically_zero(log_q):
            guide_costs.append(PlacedFactor(pack(-log_q, name, site, "log-probability"),
                                            ordinal))
        # DiCE weights: probabilities of enumerated values, score-function terms of sites
        # sampled without reparameterization (value 1, gradient of log q)
        score = site["score_parts"].score_function
        how = site["infer"].get("enumerate")
        num_samples = site["infer"].get("num_samples") if how else None
        if num_samples is not None:  # multiple sampling: weight 1 / k per sample (Pyro's Dice)
            if not is_identically_zero(score):
                score = score - score.detach()
            score = torch.broadcast_tensors(torch.as_tensor(score, dtype=log_q.dtype,
                                                            device=log_q.device),
                                            log_q)[0] - math.log(num_samples)
            dice.append(PlacedFactor(pack(score, name, site, "score function"), ordinal))
            continue
        if is_identically_zero(score):
            continue
        if not how:
            score = score - score.detach()
        elif how == "sequential":
            log_total = math.log(site["infer"]["_enum_total"])
            log_denom[ordinal] = log_denom.get(ordinal, 0.0) + log_total
        dice.append(_outside_chains(
            PlacedFactor(pack(score, name, site, "score function"), ordinal), chain_plates))

    # Phase 6: checks across sites
    _check_site_shapes(model_trace, guide_trace, max_plate_nesting)
    scale = _common_scale(scales)
    if model_enum and guide_enum:
        _check_guide_more_global(model_enum, guide_enum)
    return Collected(
        factors=model_factors, costs=tuple(costs), guide_costs=tuple(guide_costs),
        dice=tuple(dice), log_denom=log_denom, scale=scale, plates=plates,
        model_enum=model_enum, guide_enum=tuple(guide_enum), variables=variables)


def _enumerated_sites(model_trace: Trace, guide_trace: Trace
                      ) -> tuple[dict[str, Any], dict[str, Any], dict[int, str]]:
    """The guide's enumerated sites, the model's own (not replayed from the guide), each by name
    in trace order, and the name of the site each enumeration id belongs to.

    :raises GraphError: if the guide enumerates a site the model lacks.
    """
    guide_enum: dict[str, Any] = {}
    model_enum: dict[str, Any] = {}
    site_of_enum_id: dict[int, str] = {}
    for trace, store in ((guide_trace, guide_enum), (model_trace, model_enum)):
        for name, site in _sample_sites(trace):
            if trace is model_trace and name in guide_trace.nodes:
                continue
            dim = site["infer"].get(ENUM_DIM)
            if dim is not None:
                site_of_enum_id[site["infer"]["_dim_to_id"][dim]] = name
                store[name] = site
    for name in guide_enum:
        if name not in model_trace.nodes:
            raise GraphError(
                f"guide site {name!r} is enumerated, but the model has no site {name!r}; "
                "enumerate only sites the model samples"
            )
    return guide_enum, model_enum, site_of_enum_id


def _plates(model_trace: Trace, guide_trace: Trace) -> dict[str, Plate]:
    """The vectorized Pyro plates of size > 1 that the sites of either trace are in, by name in
    order of first use, as independent plates.

    :raises GraphError: if a plate is used at two dims.
    """
    plate_dims: dict[str, int] = {}
    plates: dict[str, Plate] = {}
    for trace in (model_trace, guide_trace):
        for _, site in _sample_sites(trace):
            for frame in site["cond_indep_stack"]:
                if not frame.vectorized:
                    continue
                old = plate_dims.setdefault(frame.name, frame.dim)
                if old != frame.dim:
                    raise GraphError(f"plate {frame.name!r} is used at dims {old} and {frame.dim}")
                if frame.size > 1 and frame.name not in plates:
                    plates[frame.name] = Plate(frame.name, frame.size)
    return plates


def _sum_and_mask(tensor: torch.Tensor, dims: tuple[str, ...], free: Sequence[str], mask: Any,
                  mask_named: tuple[torch.Tensor, tuple[str, ...]] | None
                  ) -> tuple[torch.Tensor, tuple[str, ...]]:
    """A model site's log-probability over enumerated variables (``tensor`` with ``dims``),
    summed along those of its ``free`` plates that the mask does not vary along, then masked:
    zero where the mask is false. Returns the result and its dims.

    :param mask: the site's Pyro mask: ``None``, a bool, or a tensor (then ``mask_named`` is it
        with its dims named).
    """
    if mask_named is not None:
        free = [d for d in free if d not in mask_named[1]]
    if free:
        tensor = tensor.sum([dims.index(d) for d in free])
        dims = tuple(d for d in dims if d not in free)
    if mask_named is not None:
        mask_tensor, mask_dims = mask_named
        out_dims = dims + tuple(d for d in mask_dims if d not in dims)
        tensor = torch.where(_align(mask_tensor, mask_dims, out_dims),
                             _align(tensor, dims, out_dims), tensor.new_zeros(()))
        dims = out_dims
    elif mask is False:
        tensor = torch.zeros_like(tensor)
    return tensor, dims


def _log_prob(site: Any) -> torch.Tensor:
    """A model site's unscaled, unmasked log-probability, computed once per trace."""
    lp = site.get("unscaled_log_prob")
    if lp is None:
        lp = _enumerated_categorical(site)
        if lp is None:
            lp = _broadcast_bernoulli(site)
        if lp is None:
            lp = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
        site["unscaled_log_prob"] = lp
    return lp


def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` without its broadcast (stride-0) dims: a size-1 view along each."""
    for i, (n, st) in enumerate(zip(t.shape, t.stride(), strict=True)):
        if st == 0 and n > 1:
            t = t.narrow(i, 0, 1)
    return t


def _broadcast_bernoulli(site: Any) -> torch.Tensor | None:
    r"""The log-probability of a ``Bernoulli`` site whose parameter Pyro's plates broadcast,
    computed on the parameter without its broadcast (stride-0) dims.

    ``Bernoulli.log_prob`` takes the logits of the broadcast probabilities (a clamp, a log and a
    log1p for every batch element, each differentiated) and a cross-entropy, where an observed
    site under a plate with an enumerated parent has only (states x keys) distinct
    probabilities, not (states x sequences x keys). Here, with :math:`x` the compact logits,
    :math:`\log p = \log\sigma(x)` and :math:`\log(1 - p) = \log\sigma(-x)` (or, given
    probabilities, their log and log1p) are taken once per distinct parameter, and only

    .. math::

        y \log p + (1 - y) \log(1 - p)

    (two broadcast operations) runs at the full size. It is the same function as
    ``Bernoulli.log_prob``, to rounding, and at a value of 0 or 1 it is the log-sigmoid itself,
    which keeps the relative precision of a log-probability near 0 that the cross-entropy's
    ``log(1 + exp(-|x|))`` rounds. A distribution that validates its arguments checks the value
    first, as ``log_prob`` does. ``None`` where nothing is broadcast.
    """
    fn = site["fn"]
    if type(fn) is not dist.Bernoulli or site["args"] or site["kwargs"]:
        return None
    given = "logits" in fn.__dict__
    param = fn.logits if given else fn.probs
    small = _compact(param)
    if small.numel() == param.numel():
        return None
    value = site["value"]
    if fn._validate_args:
        fn._validate_sample(value)
    if given:
        log_p = torch.nn.functional.logsigmoid(small)
        log_q = torch.nn.functional.logsigmoid(-small)
    else:  # the probabilities clamped as ``probs_to_logits`` clamps them
        p = clamp_probs(small)
        log_p, log_q = p.log(), torch.log1p(-p)
    lp = torch.addcmul(value * log_p, 1 - value, log_q)
    shape = torch.broadcast_shapes(fn.batch_shape, value.shape)
    return lp if lp.shape == shape else lp.expand(shape)


def _enumerated_categorical(site: Any) -> torch.Tensor | None:
    """The log-probability of an enumerated ``Categorical`` site at its whole support, as a view.

    At the enumerated support, ``log_prob`` is the table of log-probabilities itself, moved to
    the enumeration dim. Pyro's plates broadcast the distribution to the full batch shape; taking
    the table from the distribution's (stride-0) parameters keeps that broadcast a view, where
    ``log_prob`` would gather (and differentiate) one entry per batch element and value. Values
    are those of ``Categorical.log_prob``; ``None`` where this does not apply.
    """
    fn = site["fn"]
    dim = site["infer"].get(ENUM_DIM)
    if (dim is None or type(fn) is not dist.Categorical or site["args"] or site["kwargs"]
            or site["infer"].get("num_samples") is not None
            or site["value"].dim() != -dim):
        return None
    batch = tuple(fn.batch_shape)
    if len(batch) >= -dim and batch[dim] != 1:
        return None
    if "logits" in fn.__dict__:
        table = _compact(fn.logits)
    else:
        table = probs_to_logits(_compact(fn.probs))
    table = table.expand(*batch, table.shape[-1])
    x = table[(None,) * max(0, -dim - len(batch))]
    return x.transpose(-1, dim - 1).squeeze(-1)


def _is_one(scale: Any) -> bool:
    """Whether a site's scale is the plain number 1 (no tensor)."""
    return not isinstance(scale, torch.Tensor) and scale == 1.0


def _align(tensor: torch.Tensor, tensor_dims: tuple[str, ...], dims: tuple[str, ...]
           ) -> torch.Tensor:
    """``tensor``, whose dims are ``tensor_dims`` (all among ``dims``), permuted and unsqueezed to
    broadcast against ``dims``."""
    present = [d for d in dims if d in tensor_dims]
    x = tensor.permute([tensor_dims.index(d) for d in present])
    return x.reshape([x.shape[present.index(d)] if d in tensor_dims else 1 for d in dims])


def _common_scale(scales: list[tuple[str, Any]]) -> float | torch.Tensor:
    """The one scale of the sites over enumerated variables (1 if there are none).

    :param scales: (site name, ``poutine.scale``) of each such site.
    :raises GraphError: naming the sites, if a scale is a tensor of dim > 0 or two scales differ.
    """
    if not scales:
        return 1.0
    first_name, first = scales[0]
    for name, scale in scales:
        if isinstance(scale, torch.Tensor) and scale.dim():
            raise GraphError(
                f"site {name!r} has a tensor poutine.scale of shape {tuple(scale.shape)}; sites "
                "that depend on enumerated variables support only scalar scales"
            )
    values = {float(scale) for _, scale in scales}
    if len(values) > 1:
        other = next(name for name, scale in scales if float(scale) != float(first))
        raise GraphError(
            f"sites {first_name!r} (scale {float(first)}) and {other!r} (scale "
            f"{float(dict(scales)[other])}) depend on enumerated variables but have different "
            "poutine.scale or subsampling scales; enumerated parts of a model need one common "
            "scale"
        )
    return first


def _check_guide_site_in_chain(name: str, site: Any, chain_plates: frozenset[str]) -> None:
    """Check that a guide site inside ``markov_plate`` s (``chain_plates``, those of its
    ordinal) is not enumerated.

    A guide site enumerated in a plate takes one value for all the plate's elements, weighted
    by each element's probability, which is exact only if the elements are independent given
    what lies outside the plate; the steps of a chain are not.

    :raises GraphError: naming the site and the plate.
    """
    infer = site["infer"]
    how = infer.get("enumerate")
    if not chain_plates or not how:
        return
    what = (f"sampled several times (num_samples={infer['num_samples']})"
            if infer.get("num_samples") is not None else f"enumerated ({how!r})")
    plate = sorted(chain_plates)[0]
    raise GraphError(
        f"guide site {name!r} is {what} inside markov_plate {plate!r}: a guide-enumerated site "
        "takes one value for every step of the plate, which is exact only for independent plate "
        "elements, and the steps of a chain are not. Enumerate the site in the model instead "
        "(infer={'enumerate': 'parallel'} in the model, no guide site: the engine sums it out "
        "with the chain, exactly), sample it in the guide without enumeration, or, to enumerate "
        "it in the guide, write the time loop with pyro.markov"
    )


def _outside_chains(weight: PlacedFactor, chain_plates: set[str]) -> PlacedFactor:
    """A DiCE weight of a guide site sampled inside ``markov_plate`` s, as the weight the same
    site would have in a ``pyro.markov`` loop: the product of its steps' weights (a sum in log
    space along each such plate), at the ordinal without those plates.

    Pyro weighs a cost only by the guide sites of its own plate element, which assumes the
    elements independent; in a chain, every step's cost depends on every step's guide values
    (through the chain), so each cost takes the weights of all steps, as the loop gives them.
    """
    inside = [p for p in weight.ordinal if p in chain_plates]
    if not inside:
        return weight
    factor = weight.factor
    summed = [factor.dims.index(p) for p in inside if p in factor.dims]
    tensor = factor.tensor.sum(summed) if summed else factor.tensor
    dims = tuple(d for d in factor.dims if d not in inside)
    return PlacedFactor(Factor(tensor, dims, factor.name), weight.ordinal - frozenset(inside))


def _check_guide_more_global(model_enum: Mapping[str, Any], guide_enum: Mapping[str, Any]
                             ) -> None:
    """Check that every guide-enumerated site is in no plate that some model-enumerated site is
    outside of (Pyro's rule, by the sites' Pyro ordinals).

    :raises GraphError: naming both sites and the plate.
    """
    min_ordinal = frozenset.intersection(*(_ordinal(site) for site in model_enum.values()))
    for name, site in guide_enum.items():
        for plate in _ordinal(site):
            if plate not in min_ordinal:
                model_site = next(n for n, s in model_enum.items() if plate not in _ordinal(s))
                raise GraphError(
                    "Expected model enumeration to be no more global than guide enumeration, "
                    f"but found model enumeration sites upstream of guide site '{name}' in "
                    f"plate('{plate}'): model site {model_site!r} is enumerated outside plate "
                    f"{plate!r}. Try converting some model enumeration sites to guide "
                    "enumeration sites, or move the guide site out of the plate"
                )


# ------------------------------------------------------------------------------------------------
# markov_plate


def _markov_chains(model_trace: Trace, plates: Mapping[str, Plate], model_enum: Mapping[str, Any]
                   ) -> tuple[dict[str, Plate], tuple[_Chain, ...]]:
    """The plates with each ``markov_plate`` of size > 1 made sequential, and the chains with
    ``history > 1``, whose shift-register variables the engine sums out too.

    A chain ``x`` of history ``h`` in plate ``t`` has ``x``'s previous value at dim
    ``inits[1]``; for ``h > 1`` the shift-register variable ``L_lag(t) = x(t - lag)``
    (``lag < h``) is a chain variable too, with previous-value dim ``inits[lag + 1]``.

    :raises GraphError: naming the plate and site, for a subsampled ``markov_plate``, one with no
        chain, and a chain or initial site that is not enumerated in the model or sampled on the
        wrong side of the plate.
    """
    # Phase 1: the markov_plates and the initial sites of their chains, in trace order
    inits: dict[tuple[str, str], dict[int, str]] = {}
    sequential: set[str] = set()
    for name, site in _sample_sites(model_trace):
        sequential.update(site["infer"].get(MARKOV_KEY, ()))
        init = site["infer"].get(INIT_KEY)
        if init is not None:
            plate_name, chain_site, lag = init
            inits.setdefault((plate_name, chain_site), {})[lag] = name
    for plate_name in sequential:
        frames = [frame for _, site in _sample_sites(model_trace)
                  for frame in site["cond_indep_stack"] if frame.name == plate_name]
        if frames and frames[0].full_size is not None and frames[0].size != frames[0].full_size:
            raise GraphError(f"markov_plate {plate_name!r} cannot be subsampled")
    by_plate: dict[str, list[_Chain]] = {}
    for (plate_name, chain_site), lags in inits.items():
        by_plate.setdefault(plate_name, []).append(_Chain(plate_name, chain_site, lags))
    for plate_name in sequential:
        if plate_name not in by_plate and plate_name in plates:
            raise GraphError(
                f"markov_plate {plate_name!r} has no chain: declare one with "
                f"{plate_name}.init('site', initial) before entering the plate"
            )

    # Phase 2: check each chain, and make its plate sequential
    out = dict(plates)
    for plate_name, chains in by_plate.items():
        for chain in chains:
            _check_chain(chain, model_trace, model_enum)
        plate = out.get(plate_name)
        if plate is None:  # a single time step: the chain is just variables, no plate needed
            continue
        prev: dict[str, str] = {}
        for chain in chains:
            prev[chain.site] = chain.inits[1]
            for lag in range(1, len(chain.inits)):  # L_lag(t) = site(t - lag)
                prev[_lag_var(chain.site, lag)] = chain.inits[lag + 1]
        out[plate_name] = Plate(plate_name, plate.size, sequential=True, prev=prev)
    long_chains = tuple(chain for chains in by_plate.values() for chain in chains
                        if len(chain.inits) > 1 and chain.plate in out)
    return out, long_chains


def _check_chain(chain: _Chain, model_trace: Trace, model_enum: Mapping[str, Any]) -> None:
    """Check that a chain's initial sites are enumerated and sampled before its plate, and its
    chain site enumerated and sampled inside it.

    :raises GraphError: naming the plate and the site.
    """
    plate_name = chain.plate
    for init in chain.inits.values():
        if init not in model_enum:
            raise GraphError(
                f"markov_plate {plate_name!r}: initial site {init!r} of chain {chain.site!r} must "
                "be enumerated in the model (it has a guide)"
            )
        if plate_name in _ordinal(model_trace.nodes[init]):
            raise GraphError(
                f"markov_plate {plate_name!r}: initial site {init!r} was sampled inside the "
                "plate; call init() before entering it"
            )
    if chain.site not in model_trace.nodes:
        raise GraphError(
            f"markov_plate {plate_name!r}: chain site {chain.site!r} was declared with init() but "
            "never sampled inside the plate"
        )
    if chain.site not in model_enum:
        raise GraphError(
            f"markov_plate {plate_name!r}: chain site {chain.site!r} must be enumerated in the "
            "model (infer={'enumerate': 'parallel'}, no guide site)"
        )
    if plate_name not in _ordinal(model_trace.nodes[chain.site]):
        raise GraphError(
            f"markov_plate {plate_name!r}: chain site {chain.site!r} was sampled outside the plate"
        )


def _lag_var(site: str, lag: int) -> str:
    """The name of the shift-register variable ``site(t - lag)`` of a chain."""
    return f"{site}(t-{lag})"


def _match_fixed_inits(factors: Sequence[tuple[str, PlacedFactor]],
                       costs: Iterable[PlacedFactor], fixed: set[str]) -> list[PlacedFactor]:
    """The model's factors, with the tables of ``markov_plate.init`` sites with a fixed initial
    state (made on the default dtype and device) given the dtype and device of the model's
    other factors (the first other factor, or else the first cost).

    :param factors: (site name, factor) of each factor, in trace order.
    :param fixed: the names of the sites with a fixed initial state.
    """
    placed = [factor for _, factor in factors]
    reference = next((placed_factor.factor.tensor for name, placed_factor in factors
                      if name not in fixed), None)
    if reference is None:
        reference = next((cost.factor.tensor for cost in costs), None)
    if not fixed or reference is None:
        return placed
    like = (reference.dtype, reference.device)
    for i, (name, placed_factor) in enumerate(factors):
        factor = placed_factor.factor
        if name in fixed and (factor.tensor.dtype, factor.tensor.device) != like:
            placed[i] = PlacedFactor(
                Factor(factor.tensor.to(dtype=reference.dtype, device=reference.device),
                       factor.dims, factor.name), placed_factor.ordinal)
    return placed


def _markov_factors(chains: Iterable[_Chain], model_enum: Mapping[str, Any],
                    plates: Mapping[str, Plate]) -> list[PlacedFactor]:
    """Equality factors tying the shift-register variables of chains with ``history > 1``."""
    factors: list[PlacedFactor] = []
    for chain in chains:
        site = model_enum[chain.site]
        log_prob = _log_prob(site)
        size = int(site["fn"].enumerate_support(expand=False).shape[0])
        # the factor lives in every plate of the chain site (the engine requires it of factors
        # that use a previous-value dim); stride-0 expansion costs no memory
        ordinal = _ordinal(site)
        outer = [p for p in plates if p in ordinal and p != chain.plate]
        sizes = [plates[p].size for p in (*outer, chain.plate)]
        equal = LOG.identity(size, log_prob).expand(*sizes, size, size)
        # L_1(t) = site(t - 1), which is inits[1] inside the plate, and
        # L_lag(t) = L_{lag-1}(t - 1), which is inits[lag] (the previous value of L_{lag-1})
        for lag in range(1, len(chain.inits)):
            dims = (*outer, chain.plate, _lag_var(chain.site, lag), chain.inits[lag])
            label = _site_label(f"{chain.site} (lag {lag} of history)")
            factors.append(PlacedFactor(Factor(equal, dims, label), ordinal))
    return factors


def intractable_hint(err: IntractableError) -> IntractableError:
    """An engine :class:`~plated.IntractableError` with the ways out a Pyro model has instead of
    the engine's (same problem, plates and variables)."""
    # Pyro's own wording for this case comes first, so that code matching it still does
    return err.with_remedies(
        _PYRO_REMEDIES,
        context="Expected tree-structured plate nesting, as Pyro says. In a Pyro model")
