"""From a Pyro model (and guide) to engine factors.

Running the model is Pyro's job: its own handlers (``poutine.enum``, ``poutine.trace``,
``poutine.replay``, ``poutine.queue``) run the guide and then the model against it, exactly as
``TraceEnum_ELBO`` does. What happens after the trace is ours: :func:`collect` reads each sample
site's log-probability tensor, names its dims (Pyro plate names for plate dims, site names for
enumeration dims) and sorts it into

* *factors* of a plated factor graph, over the model's enumerated variables, which the engine
  eliminates; and
* *costs*, terms that depend on no model-enumerated variable and are only summed.

Dims are named after Pyro's plates and sites, so every error the engine raises names them too.
"""

from __future__ import annotations

import math
import queue
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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
from pyro.util import check_model_guide_match
from torch.distributions.utils import probs_to_logits

from ..errors import GraphError, IntractableError
from ..factor import Factor, Plate
from ..graph import PlatedFactorGraph
from ..rings import LOG
from .markov import FIXED_INIT_KEY, INIT_KEY, MARKOV_KEY

__all__ = ["Collected", "Term", "collect", "get_traces", "check_max_plate_nesting"]

ENUM_DIM = "_enumerate_dim"


@dataclass
class _Chain:
    plate: str
    site: str
    inits: dict[int, str] = field(default_factory=dict)  # lag -> init site


@dataclass
class Term:
    """A tensor with named dims (plate names, enumerated site names), at an ordinal."""

    tensor: torch.Tensor
    dims: tuple[str, ...]
    ordinal: frozenset[str]
    name: str


@dataclass
class Collected:
    """The factors and costs of one (model trace, guide trace) pair."""

    factors: list[Term] = field(default_factory=list)
    costs: list[Term] = field(default_factory=list)  # model terms (scaled, masked)
    guide_costs: list[Term] = field(default_factory=list)  # -log q terms of the guide
    dice: list[Term] = field(default_factory=list)  # DiCE weights of guide sites (log space)
    log_denom: dict[frozenset[str], float] = field(default_factory=dict)
    scale: float | torch.Tensor = 1.0
    plates: dict[str, Plate] = field(default_factory=dict)
    plate_dims: dict[str, int] = field(default_factory=dict)  # plate name -> Pyro batch dim
    model_enum: dict[str, dict[str, Any]] = field(default_factory=dict)  # site -> trace site
    guide_enum: dict[str, dict[str, Any]] = field(default_factory=dict)
    hidden: frozenset[str] = frozenset()  # engine variables that are not Pyro sites
    chains: list[_Chain] = field(default_factory=list)  # markov chains with history > 1

    def graph(self, factors: list[Term] | None = None, keep: tuple[str, ...] = (),
              extra_plates: tuple[Plate, ...] = (), validate: bool = True) -> PlatedFactorGraph:
        """The plated factor graph of ``factors`` (default: all of them)."""
        terms = self.factors if factors is None else factors
        used = {d for t in terms for d in t.dims}
        plates = []
        for p in self.plates.values():
            if p.name not in used:
                continue
            if p.sequential and not any(curr in used for curr, _ in p.prev):
                p = Plate(p.name, p.size)  # none of its chains is here: independent for these
            plates.append(p)
        plates.extend(extra_plates)
        return PlatedFactorGraph(
            [Factor(t.tensor, t.dims, name=f"site {t.name!r}") for t in terms], plates,
            keep_plates=keep, validate=validate)


class _SiteChecks(Messenger):
    """Checks each sample site after the plates have seen it and before enumeration does."""

    def __init__(self, max_plate_nesting: int, role: str) -> None:
        super().__init__()
        self.max_plate_nesting = max_plate_nesting
        self.role = role

    def _pyro_sample(self, msg: Message) -> None:
        name = msg["name"]
        for frame in msg["cond_indep_stack"]:
            if frame.vectorized and frame.dim is not None and frame.dim < -self.max_plate_nesting:
                raise GraphError(
                    f"{self.role} site {name!r} is inside plate {frame.name!r} at dim {frame.dim}, "
                    f"but max_plate_nesting={self.max_plate_nesting}; pass "
                    f"max_plate_nesting={-frame.dim} (the number of plate dims the model uses)"
                )
        infer = msg["infer"] or {}
        if infer.get("enumerate") and not msg["is_observed"] and not msg["done"]:
            fn = msg["fn"]
            if not getattr(fn, "has_enumerate_support", False):
                raise GraphError(
                    f"{self.role} site {name!r} is marked infer={{'enumerate': "
                    f"{infer['enumerate']!r}}} but its distribution {type(fn).__name__} has no "
                    "enumerable support; only discrete sites can be enumerated (remove the "
                    "annotation, or give the site a guide)"
                )
            if infer.get("num_samples") is not None:
                raise GraphError(
                    f"{self.role} site {name!r} asks for num_samples={infer['num_samples']} "
                    "(multiple sampling); plated.pyro enumerates exactly: drop num_samples"
                )


def check_max_plate_nesting(max_plate_nesting: Any) -> int:
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
    """Run the guide, then the model against it, with Pyro's own enumeration handlers.

    Guide sites marked ``enumerate="sequential"`` yield one trace pair per value, as in
    ``TraceEnum_ELBO``; everything else yields a single pair. Guide sites get Pyro's score parts;
    model log-probabilities are left to :func:`collect`, which computes each once, in the form it
    needs (Pyro's ``compute_log_prob`` would compute a scaled and masked copy of every site, and
    check each for NaN at the cost of a host-device sync per site).
    """
    guide = EnumMessenger(first_available_dim=-1 - max_plate_nesting)(
        _SiteChecks(max_plate_nesting, "guide")(guide))
    model = EnumMessenger()(_SiteChecks(max_plate_nesting, "model")(model))
    q: queue.LifoQueue[Trace] = queue.LifoQueue()
    guide = poutine.queue(guide, q, escape_fn=iter_discrete_escape,
                          extend_fn=iter_discrete_extend)
    q.put(poutine.Trace())
    while not q.empty():
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
        yield model_trace, guide_trace


def _sample_sites(trace: Trace) -> Iterator[tuple[str, Any]]:
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site_is_subsample(site):
            yield name, site


def _ordinal(site: Any) -> frozenset[str]:
    return frozenset(f.name for f in site["cond_indep_stack"] if f.vectorized)


def collect(model_trace: Trace, guide_trace: Trace, max_plate_nesting: int) -> Collected:
    """Sort the sample sites of a traced (model, guide) pair into factors and costs."""
    out = Collected()
    id_to_name: dict[int, str] = {}
    for trace, role, store in ((guide_trace, "guide", out.guide_enum),
                               (model_trace, "model", out.model_enum)):
        for name, site in _sample_sites(trace):
            if role == "model" and name in guide_trace.nodes:
                continue
            dim = site["infer"].get(ENUM_DIM)
            if dim is not None:
                id_to_name[site["infer"]["_dim_to_id"][dim]] = name
                store[name] = site
    for name in out.guide_enum:
        if name not in model_trace.nodes:
            raise GraphError(
                f"guide site {name!r} is enumerated, but the model has no site {name!r}; "
                "enumerate only sites the model samples"
            )

    for trace in (model_trace, guide_trace):
        for _, site in _sample_sites(trace):
            for f in site["cond_indep_stack"]:
                if not f.vectorized:
                    continue
                old = out.plate_dims.setdefault(f.name, f.dim)
                if old != f.dim:
                    raise GraphError(f"plate {f.name!r} is used at dims {old} and {f.dim}")
                if f.size > 1 and f.name not in out.plates:
                    out.plates[f.name] = Plate(f.name, f.size)
    _apply_markov(out, model_trace)

    def pack(x: torch.Tensor, name: str, site: dict[str, Any], what: str) -> Term:
        names: dict[int, str] = {f.dim: f.name for f in site["cond_indep_stack"] if f.vectorized}
        for d, i in site["infer"].get("_dim_to_id", {}).items():
            if i in id_to_name:
                names[d] = id_to_name[i]
        n = x.dim()
        dims = []
        for k, size in enumerate(x.shape):
            if size == 1:
                continue
            d = k - n
            if d not in names:
                where = ("a plate dim" if -d <= max_nest else "an enumeration dim")
                raise GraphError(
                    f"site {name!r}: its {what} has shape {tuple(x.shape)}, with size {size} at "
                    f"dim {d}, which is {where} that no plate or enumerated site of this site "
                    "owns (an enumeration dim conflict). Declare batch dims with pyro.plate, "
                    "move event dims right with .to_event(), and keep max_plate_nesting at least "
                    "the number of plate dims"
                )
            dims.append(names[d])
        return Term(x.squeeze() if len(dims) < n else x, tuple(dims), _ordinal(site), name)

    max_nest = max_plate_nesting
    enum_names = set(out.model_enum) | out.hidden
    var_plates = {v: _ordinal(site) for v, site in out.model_enum.items()}
    for c in out.chains:
        for lag in range(1, len(c.inits)):
            var_plates[_lag_var(c.site, lag)] = var_plates[c.site]
    for p in out.plates.values():  # inside its plate a previous-value dim varies along it
        for _, prev in p.prev:
            var_plates[prev] = var_plates.get(prev, frozenset()) | {p.name}
    scales: list[tuple[str, Any]] = []
    for name, site in _sample_sites(model_trace):
        if name in out.model_enum:  # Pyro's semantics: enumerated sites are never masked
            out.factors.append(pack(_log_prob(site), name, site, "log-probability"))
            scales.append((name, site["scale"]))
            continue
        t = pack(_log_prob(site), name, site, "log-probability")
        if enum_names.isdisjoint(t.dims):
            if site["mask"] is not None or not _is_one(site["scale"]):
                t = pack(scale_and_mask(_log_prob(site), site["scale"], site["mask"]),
                         name, site, "log-probability")
            out.costs.append(t)
            continue
        # A term over enumerated variables: masked inside the log, scaled outside it. Plates that
        # none of its variables lives in are summed first (the engine would product-reduce them
        # first anyway), so the mask is applied to the smaller tensor.
        free = [d for d in t.dims if d in out.plates and all(
            d not in var_plates[v] for v in t.dims if v in var_plates)]
        mask = site["mask"]
        if isinstance(mask, torch.Tensor):
            m = pack(mask, name, site, "mask")
            free = [d for d in free if d not in m.dims]
        if free:
            t = Term(t.tensor.sum([t.dims.index(d) for d in free]),
                     tuple(d for d in t.dims if d not in free), t.ordinal, name)
        if isinstance(mask, torch.Tensor):
            dims = t.dims + tuple(d for d in m.dims if d not in t.dims)
            t = Term(torch.where(_align(m, dims), _align(t, dims),
                                 t.tensor.new_zeros(())), dims, t.ordinal, name)
        elif mask is False:
            t = Term(torch.zeros_like(t.tensor), t.dims, t.ordinal, name)
        out.factors.append(t)
        scales.append((name, site["scale"]))
    _match_fixed_inits(out)
    out.factors.extend(_markov_factors(out))
    for name, site in _sample_sites(guide_trace):
        lp = site["log_prob"]
        if not is_identically_zero(lp):
            t = pack(lp, name, site, "log-probability")
            out.guide_costs.append(Term(-t.tensor, t.dims, t.ordinal, name))
        # DiCE weights: probabilities of enumerated values, score-function terms of sites
        # sampled without reparameterization (value 1, gradient of log q)
        sf = site["score_parts"].score_function
        if is_identically_zero(sf):
            continue
        how = site["infer"].get("enumerate")
        if not how:
            sf = sf - sf.detach()
        elif how == "sequential":
            o = _ordinal(site)
            out.log_denom[o] = out.log_denom.get(o, 0.0) + math.log(site["infer"]["_enum_total"])
        out.dice.append(pack(sf, name, site, "score function"))
    out.scale = _common_scale(scales)
    if out.model_enum and out.guide_enum:
        _check_guide_more_global(out)
    return out


def _log_prob(site: Any) -> torch.Tensor:
    """A model site's unscaled, unmasked log-probability, computed once per trace."""
    lp = site.get("unscaled_log_prob")
    if lp is None:
        lp = _enumerated_categorical(site)
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
    return not isinstance(scale, torch.Tensor) and scale == 1.0


def _align(t: Term, dims: tuple[str, ...]) -> torch.Tensor:
    """``t``'s tensor permuted and unsqueezed to broadcast against ``dims``."""
    x = t.tensor.permute([t.dims.index(d) for d in dims if d in t.dims])
    return x.reshape([x.shape[[d for d in dims if d in t.dims].index(d)] if d in t.dims else 1
                      for d in dims])


def _common_scale(scales: list[tuple[str, Any]]) -> float | torch.Tensor:
    if not scales:
        return 1.0
    first_name, first = scales[0]
    for name, s in scales:
        if isinstance(s, torch.Tensor) and s.dim():
            raise GraphError(
                f"site {name!r} has a tensor poutine.scale of shape {tuple(s.shape)}; sites that "
                "depend on enumerated variables support only scalar scales"
            )
    values = {float(s) for _, s in scales}
    if len(values) > 1:
        other = next(n for n, s in scales if float(s) != float(first))
        raise GraphError(
            f"sites {first_name!r} (scale {float(first)}) and {other!r} (scale "
            f"{float(dict(scales)[other])}) depend on enumerated variables but have different "
            "poutine.scale or subsampling scales; enumerated parts of a model need one common "
            "scale"
        )
    return first


def _check_guide_more_global(out: Collected) -> None:
    min_ordinal = frozenset.intersection(*(_ordinal(s) for s in out.model_enum.values()))
    for name, site in out.guide_enum.items():
        for p in _ordinal(site):
            if p not in min_ordinal:
                model_site = next(n for n, s in out.model_enum.items() if p not in _ordinal(s))
                raise GraphError(
                    f"guide site {name!r} is enumerated inside plate {p!r}, but model site "
                    f"{model_site!r} is enumerated outside it; model enumeration must be no more "
                    "global than guide enumeration (enumerate such sites in the guide, or move "
                    "the guide site out of the plate)"
                )


# ------------------------------------------------------------------------------------------------
# markov_plate


def _apply_markov(out: Collected, model_trace: Trace) -> None:
    chains: dict[tuple[str, str], _Chain] = {}
    sequential: set[str] = set()
    for name, site in _sample_sites(model_trace):
        sequential.update(site["infer"].get(MARKOV_KEY, ()))
        init = site["infer"].get(INIT_KEY)
        if init is not None:
            plate, chain, lag = init
            chains.setdefault((plate, chain), _Chain(plate, chain)).inits[lag] = name
    for p in sequential:
        dims = [f for _, s in _sample_sites(model_trace) for f in s["cond_indep_stack"]
                if f.name == p]
        if dims and dims[0].full_size is not None and dims[0].size != dims[0].full_size:
            raise GraphError(f"markov_plate {p!r} cannot be subsampled")
    by_plate: dict[str, list[_Chain]] = {}
    for c in chains.values():
        by_plate.setdefault(c.plate, []).append(c)
    for p in sequential:
        if p not in by_plate and p in out.plates:
            raise GraphError(
                f"markov_plate {p!r} has no chain: declare one with "
                f"{p}.init('site', initial) before entering the plate"
            )
    for p, cs in by_plate.items():
        for c in cs:
            for init in c.inits.values():
                if init not in out.model_enum:
                    raise GraphError(
                        f"markov_plate {p!r}: initial site {init!r} of chain {c.site!r} must be "
                        "enumerated in the model (it has a guide)"
                    )
                if p in _ordinal(model_trace.nodes[init]):
                    raise GraphError(
                        f"markov_plate {p!r}: initial site {init!r} was sampled inside the plate; "
                        "call init() before entering it"
                    )
            if c.site not in model_trace.nodes:
                raise GraphError(
                    f"markov_plate {p!r}: chain site {c.site!r} was declared with init() but "
                    "never sampled inside the plate"
                )
            if c.site not in out.model_enum:
                raise GraphError(
                    f"markov_plate {p!r}: chain site {c.site!r} must be enumerated in the model "
                    "(infer={'enumerate': 'parallel'}, no guide site)"
                )
            if p not in _ordinal(model_trace.nodes[c.site]):
                raise GraphError(
                    f"markov_plate {p!r}: chain site {c.site!r} was sampled outside the plate"
                )
        plate = out.plates.get(p)
        if plate is None:  # a single time step: the chain is just variables, no plate needed
            continue
        prev: dict[str, str] = {}
        for c in cs:
            h = len(c.inits)
            prev[c.site] = c.inits[1]
            for lag in range(1, h):  # shift register: lag-variable L_lag(t) = site(t - lag)
                prev[_lag_var(c.site, lag)] = c.inits[lag + 1]
        out.plates[p] = Plate(p, plate.size, sequential=True, prev=prev)
        out.hidden = out.hidden | {_lag_var(c.site, lag) for c in cs
                                   for lag in range(1, len(c.inits))}
    out.chains = [c for cs in by_plate.values() for c in cs
                  if len(c.inits) > 1 and c.plate in out.plates]


def _lag_var(site: str, lag: int) -> str:
    return f"{site}(t-{lag})"


def _match_fixed_inits(out: Collected) -> None:
    """Give the tables of ``markov_plate.init`` sites with a fixed initial state (made on the
    default dtype and device) the dtype and device of the model's other factors."""
    fixed = {n for n, s in out.model_enum.items() if s["infer"].get(FIXED_INIT_KEY)}
    ref = next((t.tensor for t in (*out.factors, *out.costs) if t.name not in fixed), None)
    if not fixed or ref is None:
        return
    for i, t in enumerate(out.factors):
        if t.name in fixed and (t.tensor.dtype, t.tensor.device) != (ref.dtype, ref.device):
            out.factors[i] = Term(t.tensor.to(dtype=ref.dtype, device=ref.device), t.dims,
                                  t.ordinal, t.name)


def _markov_factors(out: Collected) -> list[Term]:
    """Equality factors tying the shift-register variables of chains with ``history > 1``."""
    terms: list[Term] = []
    for c in out.chains:
        site = out.model_enum[c.site]
        x = _log_prob(site)
        size = int(site["fn"].enumerate_support(expand=False).shape[0])
        # the factor lives in every plate of the chain site (the engine requires it of factors
        # that use a previous-value dim); stride-0 expansion costs no memory
        outer = [p for p in out.plates if p in _ordinal(site) and p != c.plate]
        sizes = [out.plates[p].size for p in (*outer, c.plate)]
        eq = LOG.identity(size, x).expand(*sizes, size, size)
        # L_1(t) = site(t - 1), which is inits[1] inside the plate, and
        # L_lag(t) = L_{lag-1}(t - 1), which is inits[lag] (the previous value of L_{lag-1})
        for lag in range(1, len(c.inits)):
            terms.append(Term(eq, (*outer, c.plate, _lag_var(c.site, lag), c.inits[lag]),
                              _ordinal(site), f"{c.site} (lag {lag} of history)"))
    return terms


def intractable_hint(err: IntractableError) -> IntractableError:
    """An engine :class:`~plated.IntractableError` with the ways out a Pyro model has."""
    what = str(err).split(" Way out:")[0].rstrip(".")
    return IntractableError(
        f"{what}.\nIn a Pyro model the ways out are: enumerate the offending sites in the guide "
        "instead, move a site that several plate elements share outside the plate (or the plate's "
        "sites inside it), or sequentialize the plate (iterate over pyro.plate rather than using "
        "it as a context)."
    )
