"""Exact queries on Pyro models (:func:`plated.pyro.posterior`) against independent references.

Every model here is small enough to enumerate: the reference log joint of an assignment is Pyro's
own ``log_prob_sum`` of the model run under ``poutine.condition`` on that assignment, so the
brute-force references share no code with :mod:`plated`. Queries are also checked against the
graph face (``post.graph`` and :mod:`plated.naive` on its factors), Pyro's ``TraceEnum_ELBO``
(loss and ``compute_marginals``) and ``infer_discrete(temperature=0)``, and the vectorized
:class:`~plated.pyro.markov_plate` HMM against its ``pyro.markov`` loop form.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyro
import pyro.distributions as dist
import pytest
import torch
from helpers import chi2_pvalue
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import TraceEnum_ELBO, infer_discrete
from torch.testing import assert_close

import plated.pyro as pp
from plated import naive

E: Any = {"enumerate": "parallel"}
ATOL = 1e-8  # probabilities: absolute
RTOL = 1e-8  # log densities: relative (with the same absolute floor)


@pytest.fixture(autouse=True)
def clean_param_store() -> Iterator[None]:
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def empty_guide(*args: Any, **kwargs: Any) -> None:
    return None


# ------------------------------------------------------------------------------------------------
# models (parameters are fixed tensors built in float64 inside each builder)


def _probs(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(*shape, generator=g, dtype=torch.float64) + 0.2
    return p / p.sum(-1, keepdim=True)


def _randn(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


HMM_K, HMM_N, HMM_T = 2, 2, 3


def hmm_params() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    trans = _probs(HMM_K, HMM_K, seed=1)
    locs = torch.tensor([-1.0, 1.3], dtype=torch.float64)
    data = _randn(HMM_N, HMM_T, seed=2)
    return trans, locs, data


def hmm_loop(trans: torch.Tensor, locs: torch.Tensor, data: torch.Tensor) -> None:
    """A 3-step HMM in ``pyro.markov`` loop form, one chain per element of plate ``seq``."""
    x: Any = 0
    with pyro.plate("seq", HMM_N, dim=-1):
        for t in pyro.markov(range(HMM_T)):
            x = pyro.sample(f"x_{t}", dist.Categorical(trans[x]), infer=E)
            pyro.sample(f"y_{t}", dist.Normal(locs[x], 1.0), obs=data[:, t])


def hmm_vec(trans: torch.Tensor, locs: torch.Tensor, data: torch.Tensor) -> None:
    """The same HMM with the time loop vectorized by a markov_plate."""
    time = pp.markov_plate("time", HMM_T, dim=-1)
    with pyro.plate("seq", HMM_N, dim=-2):
        x_prev = time.init("x", 0, size=HMM_K)
        with time:
            x = pyro.sample("x", dist.Categorical(trans[x_prev]), infer=E)
            pyro.sample("y", dist.Normal(locs[x], 1.0), obs=data)


def nested_params() -> tuple[torch.Tensor, ...]:
    return (_probs(2, seed=3), _probs(2, 2, seed=4), _probs(2, 2, seed=5),
            torch.tensor([-0.7, 1.1], dtype=torch.float64), _randn(2, 3, seed=6))


def nested(pz: torch.Tensor, py: torch.Tensor, pw: torch.Tensor, locs: torch.Tensor,
           data: torch.Tensor) -> None:
    """A global z, y inside plate ``a`` (dim -1, size 3) and w inside plates ``a`` and ``b``
    (``b`` at dim -2, size 2, entered second): Pyro's layout transposes the declaration order."""
    z = pyro.sample("z", dist.Categorical(pz), infer=E)
    with pyro.plate("a", 3, dim=-1):
        y = pyro.sample("y", dist.Categorical(py[z]), infer=E)
        with pyro.plate("b", 2, dim=-2):
            w = pyro.sample("w", dist.Categorical(pw[y]), infer=E)
            pyro.sample("obs", dist.Normal(locs[w] + 0.5 * z, 1.0), obs=data)


def bern_params() -> tuple[torch.Tensor]:
    return (torch.tensor([0.4, -1.2, 0.9], dtype=torch.float64),)


def bern(data: torch.Tensor) -> None:
    """Bernoulli-valued enumerated sites: values are the floats 0. and 1."""
    z = pyro.sample("z", dist.Bernoulli(torch.tensor(0.3)), infer=E)
    with pyro.plate("n", 3, dim=-1):
        b = pyro.sample("b", dist.Bernoulli(0.2 + 0.6 * z), infer=E)
        pyro.sample("y", dist.Normal(2.0 * b - 1.0 + 0.5 * z, 1.0), obs=data)


def gmm_params() -> tuple[torch.Tensor]:
    return (torch.tensor([-1.3, 0.2, 1.7], dtype=torch.float64),)


def gmm_param(data: torch.Tensor) -> None:
    """A mixture whose parameters are all ``pyro.param``s (constrained and unconstrained)."""
    weights = pyro.param("weights", torch.tensor([0.3, 0.7]), constraint=constraints.simplex)
    locs = pyro.param("locs", torch.tensor([-1.0, 1.5]))
    scale = pyro.param("scale", torch.tensor(0.8), constraint=constraints.positive)
    with pyro.plate("data", 3):
        z = pyro.sample("z", dist.Categorical(weights), infer=E)
        pyro.sample("obs", dist.Normal(locs[z], scale), obs=data)


def onehot_params() -> tuple[torch.Tensor]:
    return (torch.tensor([0.5, -0.4], dtype=torch.float64),)


def onehot(data: torch.Tensor) -> None:
    """A OneHotCategorical site: values have an event dim (one-hot vectors)."""
    with pyro.plate("n", 2, dim=-1):
        z = pyro.sample("z", dist.OneHotCategorical(torch.tensor([0.2, 0.5, 0.3])), infer=E)
        pyro.sample("y", dist.Normal(z @ torch.tensor([-1.0, 0.0, 1.0]), 1.0), obs=data)


@dataclass
class Case:
    name: str
    model: Callable[..., None]
    params: Callable[[], tuple[torch.Tensor, ...]]
    nesting: int
    #: site -> (Pyro value shape without event dims, support (values, *event shape))
    sites: dict[str, tuple[tuple[int, ...], torch.Tensor]]
    plate_dims: dict[str, int] = field(default_factory=dict)

    def args(self) -> tuple[torch.Tensor, ...]:
        return self.params()


def _cat(k: int) -> torch.Tensor:
    return torch.arange(k)


BERN = torch.tensor([0.0, 1.0], dtype=torch.float64)  # built at import: explicit dtype

CASES = [
    Case("hmm_loop", hmm_loop, hmm_params, 1,
         {f"x_{t}": ((HMM_N,), _cat(HMM_K)) for t in range(HMM_T)}, {"seq": -1}),
    Case("nested", nested, nested_params, 2,
         {"z": ((), _cat(2)), "y": ((3,), _cat(2)), "w": ((2, 3), _cat(2))},
         {"a": -1, "b": -2}),
    Case("bern", bern, bern_params, 1,
         {"z": ((), BERN), "b": ((3,), BERN)},
         {"n": -1}),
    Case("gmm_param", gmm_param, gmm_params, 1, {"z": ((3,), _cat(2))}, {"data": -1}),
    Case("onehot", onehot, onehot_params, 1, {"z": ((2,), torch.eye(3, dtype=torch.float64))},
         {"n": -1}),
]
BY_NAME = {c.name: c for c in CASES}


# ------------------------------------------------------------------------------------------------
# brute force, by Pyro's own log_prob_sum of conditioned runs


def score(model: Callable[..., None], args: tuple[Any, ...], values: dict[str, torch.Tensor]
          ) -> torch.Tensor:
    """The model's log joint density at ``values`` (every enumerated site conditioned)."""
    tr = poutine.trace(poutine.condition(model, data=values)).get_trace(*args)
    return torch.as_tensor(tr.log_prob_sum())


@dataclass
class Brute:
    #: the cells of all sites, in a fixed order: (site, index into the site's value shape)
    cells: list[tuple[str, tuple[int, ...]]]
    radix: list[int]
    #: value index (into the site's support) of every cell, per joint assignment
    assignments: torch.Tensor
    log_joint: torch.Tensor

    @property
    def probs(self) -> torch.Tensor:
        return (self.log_joint - self.log_joint.logsumexp(0)).exp()


def values_of(case: Case, row: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pyro values of the sites of ``case`` for one row of value indices (in ``cells`` order)."""
    out = {}
    k = 0
    for s, (shape, support) in case.sites.items():
        n = math.prod(shape)
        idx = row[k:k + n].reshape(shape)
        out[s] = support[idx]
        k += n
    return out


def brute(case: Case, requires_grad: bool = False) -> Brute:
    args = case.args()
    cells = [(s, e) for s, (shape, _) in case.sites.items()
             for e in itertools.product(*(range(n) for n in shape))]
    radix = [len(case.sites[s][1]) for s, _ in cells]
    rows = torch.cartesian_prod(*(torch.arange(r) for r in radix)).reshape(-1, len(cells))
    with torch.set_grad_enabled(requires_grad):
        lj = torch.stack([score(case.model, args, values_of(case, row)) for row in rows])
    return Brute(cells, radix, rows, lj)


@functools.cache
def brute_cached(name: str) -> Brute:
    return brute(BY_NAME[name])


def value_index(values: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """The support index of each value (values ``(*batch, *event)``); fails on a foreign value."""
    ev = support.dim() - 1
    eq = values.unsqueeze(-1 - ev) == support  # (*batch, n_values, *event)
    if ev:
        eq = eq.flatten(-ev).all(-1)
    assert (eq.sum(-1) == 1).all(), f"values outside the support {support.tolist()}"
    return eq.long().argmax(-1)


def rows_of(case: Case, b: Brute, samples: dict[str, torch.Tensor], n: int) -> torch.Tensor:
    """The brute-force row of each joint sample (``samples`` are ``(n, *site shape, *event)``)."""
    rows = torch.zeros(n, dtype=torch.long)
    for (s, e), r in zip(b.cells, b.radix, strict=True):
        shape, support = case.sites[s]
        idx = value_index(samples[s], support)
        assert idx.shape == (n,) + shape, (s, idx.shape)
        rows = rows * r + idx[(slice(None),) + e]
    return rows


def brute_marginals(case: Case, b: Brute) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    probs = b.probs
    for k, (s, e) in enumerate(b.cells):
        shape, support = case.sites[s]
        m = out.setdefault(s, torch.zeros(shape + (len(support),)))
        m[e] = torch.zeros(len(support)).index_add(0, b.assignments[:, k], probs)
    return out


def graph_to_pyro(case: Case, post: pp.Posterior, site: str, x: torch.Tensor,
                  lead: int = 0) -> torch.Tensor:
    """Lay out a graph-face result (plates in graph declaration order) as Pyro lays out ``site``
    (plates by batch dim, leftmost first), keeping ``lead`` leading and any trailing dims."""
    _, plates = post.graph.variables()[site]
    order = sorted(plates, key=lambda p: case.plate_dims[p])
    perm = (list(range(lead)) + [lead + plates.index(p) for p in order]
            + list(range(lead + len(plates), x.dim())))
    x = x.permute(perm)
    shape = case.sites[site][0]
    rest = x.shape[lead + len(plates):]
    return x.reshape(tuple(x.shape[:lead]) + shape + tuple(rest))


# ------------------------------------------------------------------------------------------------
# log-likelihood


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_log_likelihood_matches_brute_force_and_elbos(case: Case) -> None:
    args = case.args()
    post = pp.posterior(case.model, *args, max_plate_nesting=case.nesting)
    assert set(post.sites) == set(case.sites)
    ll = post.log_likelihood()
    ref = brute_cached(case.name).log_joint.logsumexp(0)
    assert_close(ll, ref, rtol=RTOL, atol=RTOL)
    tve = pp.TVE_ELBO(max_plate_nesting=case.nesting).loss(case.model, empty_guide, *args)
    pyro_loss = TraceEnum_ELBO(max_plate_nesting=case.nesting).loss(case.model, empty_guide,
                                                                    *args)
    assert math.isclose(-tve, float(ref), rel_tol=RTOL, abs_tol=RTOL)
    assert math.isclose(-pyro_loss, float(ref), rel_tol=RTOL, abs_tol=RTOL)
    # every site depends on an enumerated variable: the whole density is the graph's factor part
    assert_close(post.graph.log_partition(), ref, rtol=RTOL, atol=RTOL)
    assert_close(naive.log_partition(post.graph.factors, post.graph.plates), ref,
                 rtol=RTOL, atol=RTOL)


def test_log_likelihood_gradients_of_params() -> None:
    """``log_likelihood`` is differentiable in the ``pyro.param``s, with brute force's gradients
    and those of ``TraceEnum_ELBO.differentiable_loss``."""
    case = BY_NAME["gmm_param"]
    args = case.args()
    post = pp.posterior(case.model, *args, max_plate_nesting=1)
    names = ["weights", "locs", "scale"]
    params = [pyro.param(n).unconstrained() for n in names]
    g_ours = torch.autograd.grad(post.log_likelihood(), params)
    g_brute = torch.autograd.grad(brute(case, requires_grad=True).log_joint.logsumexp(0), params)
    loss = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(case.model, empty_guide, *args)
    g_pyro = torch.autograd.grad(-loss, params)
    tve = pp.TVE_ELBO(max_plate_nesting=1).differentiable_loss(case.model, empty_guide, *args)
    g_tve = torch.autograd.grad(-tve, params)
    for n, a, b, c, d in zip(names, g_ours, g_brute, g_pyro, g_tve, strict=True):
        assert a.abs().sum() > 0, n
        assert_close(a, b, rtol=1e-7, atol=1e-9, msg=n)
        assert_close(c, b, rtol=1e-7, atol=1e-9, msg=n)
        assert_close(d, b, rtol=1e-7, atol=1e-9, msg=n)


# ------------------------------------------------------------------------------------------------
# marginals


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_marginals_match_brute_force_graph_and_pyro(case: Case) -> None:
    args = case.args()
    post = pp.posterior(case.model, *args, max_plate_nesting=case.nesting)
    ours = post.marginals()
    ref = brute_marginals(case, brute_cached(case.name))
    graph = post.graph.marginals()
    nv = naive.marginals(post.graph.factors, post.graph.plates)
    pyro_m = TraceEnum_ELBO(max_plate_nesting=case.nesting).compute_marginals(
        case.model, empty_guide, *args)
    assert set(ours) == set(ref) == set(pyro_m)
    for s in case.sites:
        shape, support = case.sites[s]
        assert ours[s].shape == shape + (len(support),), s
        assert_close(ours[s], ref[s], rtol=0, atol=ATOL, msg=s)
        assert_close(graph_to_pyro(case, post, s, graph[s]), ref[s], rtol=0, atol=ATOL, msg=s)
        assert_close(graph_to_pyro(case, post, s, nv[s]), ref[s], rtol=0, atol=ATOL, msg=s)
        d = pyro_m[s]
        p = d.probs.unsqueeze(-1) if isinstance(d, dist.Bernoulli) else d.probs
        mine = ours[s][..., 1:] if isinstance(d, dist.Bernoulli) else ours[s]
        # Pyro drops leading singleton dims; ours keeps the site's full Pyro shape
        assert mine.shape[mine.dim() - p.dim():] == p.shape, (s, mine.shape, p.shape)
        assert_close(mine, p.expand(mine.shape), rtol=0, atol=ATOL, msg=s)


def test_masked_enumerated_site_follows_pyro() -> None:
    """Pyro ignores ``poutine.mask`` on the log-probability of a model-enumerated site (its
    factor is used unmasked), so a masked-out step is still predicted; ours does the same."""
    trans, locs, data = hmm_params()
    lengths = torch.tensor([3, 2])

    def masked(data: torch.Tensor) -> None:
        x: Any = 0
        with pyro.plate("seq", HMM_N, dim=-1):
            for t in pyro.markov(range(HMM_T)):
                with poutine.mask(mask=t < lengths):
                    x = pyro.sample(f"x_{t}", dist.Categorical(trans[x]), infer=E)
                    pyro.sample(f"y_{t}", dist.Normal(locs[x], 1.0), obs=data[:, t])

    post = pp.posterior(masked, data, max_plate_nesting=1)
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    assert math.isclose(-elbo.loss(masked, empty_guide, data), float(post.log_likelihood()),
                        rel_tol=RTOL, abs_tol=RTOL)
    pyro_m = elbo.compute_marginals(masked, empty_guide, data)
    ours = post.marginals()
    for t in range(HMM_T):
        assert_close(ours[f"x_{t}"], pyro_m[f"x_{t}"].probs, rtol=0, atol=ATOL)
    # the masked-out x_2 of sequence 1 is the prediction from x_1, not uniform
    pred = ours["x_1"][1] @ trans
    assert_close(ours["x_2"][1], pred, rtol=0, atol=ATOL)


# ------------------------------------------------------------------------------------------------
# MAP


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_map_is_a_brute_force_maximizer(case: Case) -> None:
    args = case.args()
    post = pp.posterior(case.model, *args, max_plate_nesting=case.nesting)
    b = brute_cached(case.name)
    best = b.log_joint.max()
    mp = post.map()
    assert set(mp) == set(case.sites)
    for s, (shape, support) in case.sites.items():
        assert mp[s].dtype == support.dtype, s
        assert mp[s].shape == shape + support.shape[1:], s
        value_index(mp[s], support)  # every value is in the support
    assert_close(score(case.model, args, mp), best, rtol=RTOL, atol=RTOL)
    # the graph face's MAP is the same assignment, laid out by its plates
    gmap = post.graph.map()
    for s, (_, support) in case.sites.items():
        assert torch.equal(support[graph_to_pyro(case, post, s, gmap[s])], mp[s]), s
    assert_close(post.graph.max_log_density(), best, rtol=RTOL, atol=RTOL)


# Pyro's infer_discrete cannot pack OneHotCategorical's enumerated values (their event dim is taken
# for a batch dim: "Invalid tensor shape"), so the one-hot model is checked by brute force only
@pytest.mark.parametrize("case", [c for c in CASES if c.name != "onehot"], ids=lambda c: c.name)
def test_map_matches_infer_discrete(case: Case) -> None:
    args = case.args()
    b = brute_cached(case.name)
    top2 = b.log_joint.topk(2).values
    assert top2[0] - top2[1] > 1e-6, "the test needs a model with a unique MAP"
    post = pp.posterior(case.model, *args, max_plate_nesting=case.nesting)
    decoder = infer_discrete(case.model, first_available_dim=-1 - case.nesting, temperature=0)
    tr = poutine.trace(decoder).get_trace(*args)
    mp = post.map()
    for s in case.sites:
        ref = tr.nodes[s]["value"]
        assert torch.equal(mp[s], ref.expand(mp[s].shape)), (s, mp[s], ref)
    # and the brute-force argmax, decoded
    assert all(torch.equal(mp[s], v)
               for s, v in values_of(case, b.assignments[b.log_joint.argmax()]).items())


def test_map_with_ties_achieves_the_max() -> None:
    """Symmetric components tie: any maximizer will do, but it must reach the max."""

    def tied(data: torch.Tensor) -> None:
        with pyro.plate("n", 2, dim=-1):
            z = pyro.sample("z", dist.Categorical(torch.ones(3) / 3), infer=E)
            pyro.sample("y", dist.Normal(torch.tensor([0.0, 0.0, 3.0])[z], 1.0), obs=data)

    data = torch.tensor([0.1, -0.2])
    case = Case("tied", tied, lambda: (data,), 1, {"z": ((2,), _cat(3))}, {"n": -1})
    b = brute(case)
    top = b.log_joint.topk(2).values
    assert_close(top[0], top[1])  # a tie indeed
    mp = pp.posterior(tied, data, max_plate_nesting=1).map()
    assert_close(score(tied, (data,), mp), b.log_joint.max(), rtol=RTOL, atol=RTOL)


# ------------------------------------------------------------------------------------------------
# samples


def check_samples(case: Case, samples: dict[str, torch.Tensor], n: int, b: Brute) -> None:
    rows = rows_of(case, b, samples, n)
    counts = torch.bincount(rows, minlength=b.log_joint.numel())
    probs = b.probs
    assert int(counts[probs == 0].sum()) == 0
    p, dof = chi2_pvalue(counts[probs > 0], probs[probs > 0])
    assert dof >= 3
    assert p > 1e-3, (case.name, p, dof)


@pytest.mark.parametrize("name", ["hmm_loop", "bern", "gmm_param"])
def test_samples_chi_squared(name: str) -> None:
    case = BY_NAME[name]
    b = brute_cached(name)
    assert b.log_joint.numel() < 100
    post = pp.posterior(case.model, *case.args(), max_plate_nesting=case.nesting)
    n = 20000
    samples = post.sample(n)
    assert set(samples) == set(case.sites)
    for s, (shape, support) in case.sites.items():
        assert samples[s].shape == (n,) + shape + support.shape[1:], s
        assert samples[s].dtype == support.dtype, s
    check_samples(case, samples, n, b)


# ------------------------------------------------------------------------------------------------
# markov_plate against the pyro.markov loop


def loop_values(vec: dict[str, torch.Tensor], lead: int) -> dict[str, torch.Tensor]:
    """Loop-form site values from vectorized ones: ``x_t`` is ``x[..., t]``."""
    x = vec["x"]  # (*lead, seq, time)
    assert x.shape[lead:] == (HMM_N, HMM_T)
    return {f"x_{t}": x[..., t] for t in range(HMM_T)}


def test_markov_plate_matches_loop() -> None:
    args = hmm_params()
    loop = pp.posterior(hmm_loop, *args, max_plate_nesting=1)
    vec = pp.posterior(hmm_vec, *args, max_plate_nesting=2)
    assert vec.sites == ("x_prev", "x")
    assert_close(vec.log_likelihood(), loop.log_likelihood(), rtol=RTOL, atol=RTOL)
    tve = pp.TVE_ELBO(max_plate_nesting=2).loss(hmm_vec, empty_guide, *args)
    assert math.isclose(-tve, float(loop.log_likelihood()), rel_tol=RTOL, abs_tol=RTOL)

    mv, ml = vec.marginals(), loop.marginals()
    assert mv["x"].shape == (HMM_N, HMM_T, HMM_K)
    assert mv["x_prev"].shape == (HMM_N, 1, HMM_K)
    assert_close(mv["x_prev"][..., 0], torch.ones(HMM_N, 1), rtol=0, atol=ATOL)  # fixed state 0
    for t in range(HMM_T):
        assert_close(mv["x"][:, t], ml[f"x_{t}"], rtol=0, atol=ATOL)

    b = brute_cached("hmm_loop")
    mp = vec.map()
    assert mp["x"].shape == (HMM_N, HMM_T) and mp["x_prev"].shape == (HMM_N, 1)
    assert torch.equal(mp["x_prev"], torch.zeros(HMM_N, 1, dtype=torch.long))
    assert_close(score(hmm_loop, args, loop_values(mp, 0)), b.log_joint.max(),
                 rtol=RTOL, atol=RTOL)
    assert all(torch.equal(mp["x"][:, t], v) for t, v in enumerate(loop.map().values()))


def test_markov_plate_samples_chi_squared() -> None:
    """Samples of the vectorized HMM follow the loop form's brute-force joint posterior."""
    args = hmm_params()
    vec = pp.posterior(hmm_vec, *args, max_plate_nesting=2)
    n = 20000
    samples = vec.sample(n)
    assert samples["x"].shape == (n, HMM_N, HMM_T)
    assert torch.equal(samples["x_prev"], torch.zeros(n, HMM_N, 1, dtype=torch.long))
    check_samples(BY_NAME["hmm_loop"], loop_values(samples, 1), n, brute_cached("hmm_loop"))


def history_2_models(fixed: bool, t_len: int, seed: int
                     ) -> tuple[Callable[..., None], Callable[..., None], torch.Tensor, Case]:
    """A second-order chain of 2 states as a ``pyro.markov(history=2)`` loop and as a
    ``markov_plate(history=2)``, with a fixed initial state (``init("x", 0, size=k)``) or a
    distribution over it: ``(loop, vec, data, the loop's brute-force case)``."""
    k = 2
    trans = _probs(k, k, k, seed=seed)
    locs = torch.tensor([-0.8, 1.0])
    data = _randn(t_len, seed=seed + 1)
    init = dist.Categorical(torch.tensor([1.0, 0.0]) if fixed else torch.tensor([0.6, 0.4]))

    def loop(data: torch.Tensor) -> None:
        x1 = pyro.sample("x_m1", init, infer=E)
        x2 = pyro.sample("x_m2", init, infer=E)
        for t in pyro.markov(range(t_len), history=2):
            x = pyro.sample(f"x_{t}", dist.Categorical(trans[x1, x2]), infer=E)
            pyro.sample(f"y_{t}", dist.Normal(locs[x], 1.0), obs=data[t])
            x1, x2 = x, x1

    def vec(data: torch.Tensor) -> None:
        time = pp.markov_plate("time", t_len, dim=-1, history=2)
        x1, x2 = time.init("x", 0, size=k) if fixed else time.init("x", init)
        with time:
            x = pyro.sample("x", dist.Categorical(trans[x1, x2]), infer=E)
            pyro.sample("y", dist.Normal(locs[x], 1.0), obs=data)

    case = Case("loop2", loop, lambda: (data,), 0,
                {"x_m1": ((), _cat(k)), "x_m2": ((), _cat(k)),
                 **{f"x_{t}": ((), _cat(k)) for t in range(t_len)}})
    return loop, vec, data, case


@pytest.mark.parametrize("fixed", [True, False], ids=["int_initial", "dist_initial"])
def test_markov_plate_history_2_matches_loop(fixed: bool) -> None:
    """A second-order chain: ``markov_plate(history=2)`` against ``pyro.markov(history=2)``, with
    a fixed initial state (``init("x", 0, size=k)``) or a distribution over it."""
    t_len = 4
    loop, vec, data, case = history_2_models(fixed, t_len, seed=7)
    b = brute(case)
    pv = pp.posterior(vec, data, max_plate_nesting=1)
    pl = pp.posterior(loop, data, max_plate_nesting=0)
    ref = b.log_joint.logsumexp(0)
    assert_close(pl.log_likelihood(), ref, rtol=RTOL, atol=RTOL)
    assert_close(pv.log_likelihood(), ref, rtol=RTOL, atol=RTOL)
    mv, mref = pv.marginals(), brute_marginals(case, b)
    assert_close(mv["x_prev1"], mref["x_m1"], rtol=0, atol=ATOL)
    assert_close(mv["x_prev2"], mref["x_m2"], rtol=0, atol=ATOL)
    for t in range(t_len):
        assert_close(mv["x"][t], mref[f"x_{t}"], rtol=0, atol=ATOL)
    mp = pv.map()
    vals = {"x_m1": mp["x_prev1"], "x_m2": mp["x_prev2"],
            **{f"x_{t}": mp["x"][t] for t in range(t_len)}}
    assert_close(score(loop, (data,), vals), b.log_joint.max(), rtol=RTOL, atol=RTOL)


# ------------------------------------------------------------------------------------------------
# the graph


def test_graph_names_pyro_sites_and_plates() -> None:
    post = pp.posterior(nested, *nested_params(), max_plate_nesting=2)
    assert post.sites == ("z", "y", "w")
    assert post.graph.variables() == {"z": (2, ()), "y": (2, ("a",)), "w": (2, ("a", "b"))}
    assert {p.name: p.size for p in post.graph.plates} == {"a": 3, "b": 2}
    vec = pp.posterior(hmm_vec, *hmm_params(), max_plate_nesting=2)
    assert set(vec.graph.variables()) == {"x_prev", "x"}
    assert vec.graph.variables()["x"] == (HMM_K, ("seq", "time"))
    time = next(p for p in vec.graph.plates if p.name == "time")
    assert time.sequential and time.size == HMM_T


def test_graph_log_partition_is_the_scaled_factor_part() -> None:
    """Sites that depend on no enumerated variable are costs outside the graph; a common
    ``poutine.scale`` multiplies the factor part (the log of the sum), as in Pyro."""
    data = gmm_params()[0]
    extra = torch.tensor(0.3)

    def model(data: torch.Tensor) -> None:
        pyro.sample("extra", dist.Normal(0.0, 1.0), obs=extra)
        gmm_param(data)

    b = brute(BY_NAME["gmm_param"]).log_joint.logsumexp(0)
    cost = dist.Normal(0.0, 1.0).log_prob(extra)
    for scale in (1.0, 0.25):
        scaled = poutine.scale(model, scale=scale)
        post = pp.posterior(scaled, data, max_plate_nesting=1)
        assert_close(post.graph.log_partition(), b, rtol=RTOL, atol=RTOL)
        assert_close(post.log_likelihood(), scale * (cost + b), rtol=RTOL, atol=RTOL)
        for elbo in (pp.TVE_ELBO(max_plate_nesting=1), TraceEnum_ELBO(max_plate_nesting=1)):
            loss = elbo.loss(scaled, empty_guide, data)
            assert math.isclose(-loss, float(scale * (cost + b)), rel_tol=RTOL, abs_tol=RTOL)
