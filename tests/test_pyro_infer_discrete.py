"""``plated.pyro.infer_discrete`` against :func:`pyro.infer.infer_discrete`.

MAP values (``temperature=0``) must equal Pyro's on the same models; samples (``temperature=1``)
must follow the exact joint posterior (chi-squared against the brute-force enumeration of
:mod:`test_pyro_query`, whose log joint is Pyro's own ``log_prob_sum``), as Pyro's do. Many samples
are drawn in one call by wrapping the model in a plate of independent copies, for Pyro and for us
alike. ``markov_plate`` models are compared with their ``pyro.markov`` loop form, which Pyro can
decode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Predictive, TraceEnum_ELBO
from pyro.infer import infer_discrete as pyro_infer_discrete
from pyro.infer.autoguide import AutoDelta
from test_pyro_dropin import MIX_DATA, mixture
from test_pyro_query import (
    BY_NAME,
    CASES,
    HMM_N,
    HMM_T,
    Case,
    brute,
    brute_cached,
    check_samples,
    history_2_models,
    hmm_loop,
    hmm_params,
    hmm_vec,
    loop_values,
    score,
    values_of,
)

import plated.pyro as pp

E: Any = {"enumerate": "parallel"}
#: Pyro's infer_discrete cannot pack OneHotCategorical's enumerated values (see test_pyro_query)
PYRO_CASES = [c for c in CASES if c.name != "onehot"]


@pytest.fixture(autouse=True)
def clean_param_store() -> Iterator[None]:
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def traced(decoder: Callable[..., Any], *args: Any) -> Any:
    return poutine.trace(decoder).get_trace(*args)


def copies(model: Callable[..., Any], n: int, nesting: int) -> Callable[..., Any]:
    """``model`` run as ``n`` independent copies, in a plate left of its own plates."""

    def many(*args: Any) -> None:
        with pyro.plate("copies", n, dim=-1 - nesting):
            model(*args)

    return many


# ------------------------------------------------------------------------------------------------
# MAP


@pytest.mark.parametrize("case", PYRO_CASES, ids=lambda c: c.name)
def test_map_equals_pyro(case: Case) -> None:
    args = case.args()
    b = brute_cached(case.name)
    top2 = b.log_joint.topk(2).values
    assert top2[0] - top2[1] > 1e-6, "the test needs a model with a unique MAP"
    dim = -1 - case.nesting
    ref = traced(pyro_infer_discrete(case.model, first_available_dim=dim, temperature=0), *args)
    ours = traced(pp.infer_discrete(case.model, first_available_dim=dim, temperature=0), *args)
    best = values_of(case, b.assignments[b.log_joint.argmax()])
    for site in case.sites:
        value = ours.nodes[site]["value"]
        assert torch.equal(value, ref.nodes[site]["value"].expand(value.shape)), site
        assert torch.equal(value, best[site]), site
    assert ours.nodes.keys() == ref.nodes.keys()  # the first, enumerated, run is hidden


def test_onehot_map_is_the_brute_force_argmax() -> None:
    case = BY_NAME["onehot"]
    b = brute_cached("onehot")
    ours = traced(pp.infer_discrete(case.model, first_available_dim=-2, temperature=0),
                  *case.args())
    best = values_of(case, b.assignments[b.log_joint.argmax()])
    assert torch.equal(ours.nodes["z"]["value"], best["z"])


def test_returns_what_the_model_returns_and_works_as_a_decorator() -> None:
    locs = torch.tensor([-2.0, 0.0, 2.0])

    @pp.infer_discrete(first_available_dim=-2, temperature=0)
    def decode(data: torch.Tensor) -> torch.Tensor:
        with pyro.plate("n", len(data)):
            z = pyro.sample("z", dist.Categorical(torch.ones(3) / 3), infer=E)
            pyro.sample("y", dist.Normal(locs[z], 0.5), obs=data)
        return z

    assert decode(torch.tensor([2.1, -1.8, 0.2, 1.7])).tolist() == [2, 0, 1, 2]


def test_guessed_nesting_and_pyro_errors_and_warnings() -> None:
    case = BY_NAME["nested"]
    args = case.args()
    guessed = traced(pp.infer_discrete(case.model, temperature=0), *args)
    given = traced(pp.infer_discrete(case.model, max_plate_nesting=2, temperature=0), *args)
    for site in case.sites:
        assert torch.equal(guessed.nodes[site]["value"], given.nodes[site]["value"])
    with pytest.raises(ValueError, match="temperature must be 0"):
        pp.infer_discrete(case.model, first_available_dim=-3, temperature=2)

    def nothing() -> torch.Tensor:
        return pyro.sample("x", dist.Normal(0.0, 1.0))

    for decoder in (pyro_infer_discrete, pp.infer_discrete):
        with pytest.warns(UserWarning, match="infer_discrete found no sample sites"):
            decoder(nothing, first_available_dim=-1)()


# ------------------------------------------------------------------------------------------------
# samples


@pytest.mark.parametrize("name", ["hmm_loop", "bern", "gmm_param", "nested"])
def test_samples_follow_the_posterior_as_pyros_do(name: str) -> None:
    case = BY_NAME[name]
    args = case.args()
    b = brute_cached(name)
    n = 4000
    model = copies(case.model, n, case.nesting)
    dim = -2 - case.nesting
    draws = {}
    for who, decoder in (("pyro", pyro_infer_discrete), ("plated", pp.infer_discrete)):
        pyro.set_rng_seed(7)
        tr = traced(decoder(model, first_available_dim=dim, temperature=1), *args)
        draws[who] = {site: tr.nodes[site]["value"].expand(
            (n, *(1,) * (case.nesting - len(shape)), *shape)).reshape((n, *shape))
            for site, (shape, _) in case.sites.items()}
        check_samples(case, draws[who], n, b)  # chi-squared against the exact posterior
    # and the two agree on each site's marginal frequencies (within 5 standard errors)
    for site in case.sites:
        p, q = (draws[who][site].double().mean(0) for who in ("pyro", "plated"))
        assert ((p - q).abs() <= 5 * (2 * 0.25 / n) ** 0.5).all(), site


def test_each_call_draws_afresh() -> None:
    case = BY_NAME["gmm_param"]
    decoder = pp.infer_discrete(case.model, first_available_dim=-2, temperature=1)
    values = {tuple(traced(decoder, *case.args()).nodes["z"]["value"].tolist())
              for _ in range(40)}
    assert len(values) > 1


# ------------------------------------------------------------------------------------------------
# markov_plate, against its pyro.markov loop


def chain_of(tr: Any) -> torch.Tensor:
    """The ``x_t`` values of a decoded loop trace, stacked along time: ``(seq, time)``."""
    return torch.stack([tr.nodes[f"x_{t}"]["value"].expand(HMM_N) for t in range(HMM_T)], -1)


def returning_previous(trans: torch.Tensor, locs: torch.Tensor, data: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``hmm_vec``, returning the tensor ``init`` gave and the chain's values."""
    time = pp.markov_plate("time", HMM_T, dim=-1)
    with pyro.plate("seq", HMM_N, dim=-2):
        x_prev = time.init("x", 0, size=2)
        with time:
            x = pyro.sample("x", dist.Categorical(trans[x_prev]), infer=E)
            pyro.sample("y", dist.Normal(locs[x], 1.0), obs=data)
    return x_prev, x


def test_markov_plate_map_equals_pyro_on_the_loop() -> None:
    args = hmm_params()
    ref = traced(pyro_infer_discrete(hmm_loop, first_available_dim=-2, temperature=0), *args)
    ours = traced(pp.infer_discrete(hmm_vec, first_available_dim=-3, temperature=0), *args)
    x = ours.nodes["x"]["value"]
    assert x.shape == (HMM_N, HMM_T)
    assert torch.equal(x, chain_of(ref))
    assert torch.equal(ours.nodes["x_prev"]["value"], torch.zeros(HMM_N, 1, dtype=torch.long))
    # the replayed trace is the model's joint density at the decoded values
    assert float(ours.log_prob_sum()) == pytest.approx(
        float(score(hmm_loop, args, loop_values({"x": x}, 0))), rel=1e-12)
    assert float(ours.log_prob_sum()) == pytest.approx(float(ref.log_prob_sum()), rel=1e-12)


def test_markov_plate_init_returns_the_shifted_chain() -> None:
    x_prev, x = pp.infer_discrete(returning_previous, first_available_dim=-3, temperature=1)(
        *hmm_params())
    assert x_prev.shape == x.shape == (HMM_N, HMM_T)
    assert torch.equal(x_prev[:, 0], torch.zeros(HMM_N, dtype=torch.long))
    assert torch.equal(x_prev[:, 1:], x[:, :-1])


def test_markov_plate_samples_follow_the_posterior_as_pyros_do() -> None:
    args = hmm_params()
    case = BY_NAME["hmm_loop"]
    b = brute_cached("hmm_loop")
    n = 4000
    pyro.set_rng_seed(3)
    tr = traced(pp.infer_discrete(copies(hmm_vec, n, 2), first_available_dim=-4,
                                  temperature=1), *args)
    x = tr.nodes["x"]["value"].reshape(n, HMM_N, HMM_T)
    check_samples(case, loop_values({"x": x}, 1), n, b)
    pyro.set_rng_seed(3)
    ref = traced(pyro_infer_discrete(copies(hmm_loop, n, 1), first_available_dim=-3,
                                     temperature=1), *args)
    y = torch.stack([ref.nodes[f"x_{t}"]["value"].reshape(n, HMM_N) for t in range(HMM_T)], -1)
    check_samples(case, loop_values({"x": y}, 1), n, b)
    p, q = x.double().mean(0), y.double().mean(0)
    assert ((p - q).abs() <= 5 * (2 * 0.25 / n) ** 0.5).all()


@pytest.mark.parametrize("fixed", [True, False], ids=["int_initial", "dist_initial"])
def test_markov_plate_history_2_map_equals_pyro_on_the_loop(fixed: bool) -> None:
    t_len = 5
    loop, vec, data, case = history_2_models(fixed, t_len, seed=17)
    b = brute(case)
    top2 = b.log_joint.topk(2).values
    assert top2[0] - top2[1] > 1e-6, "the test needs a model with a unique MAP"
    ref = traced(pyro_infer_discrete(loop, first_available_dim=-1, temperature=0), data)
    ours = traced(pp.infer_discrete(vec, first_available_dim=-2, temperature=0), data)
    expected = torch.stack([ref.nodes[f"x_{t}"]["value"] for t in range(t_len)])
    assert torch.equal(ours.nodes["x"]["value"], expected)
    assert torch.equal(ours.nodes["x_prev1"]["value"], ref.nodes["x_m1"]["value"])
    assert torch.equal(ours.nodes["x_prev2"]["value"], ref.nodes["x_m2"]["value"])
    assert float(ours.log_prob_sum()) == pytest.approx(float(ref.log_prob_sum()), rel=1e-12)


def test_sample_posterior_of_a_markov_plate_model_is_consistent() -> None:
    """TVE_ELBO.sample_posterior replays the chain the same way: each step sees its own
    previous value."""
    x_prev, x = pp.TVE_ELBO(max_plate_nesting=2).sample_posterior(
        returning_previous, lambda *args: None, *hmm_params())
    assert torch.equal(x_prev[:, 0], torch.zeros(HMM_N, dtype=torch.long))
    assert torch.equal(x_prev[:, 1:], x[:, :-1])


# ------------------------------------------------------------------------------------------------
# with Predictive and a trained guide, as in Pyro's mixture tutorial

def trained_guide() -> Any:
    pyro.set_rng_seed(0)
    guide = AutoDelta(poutine.block(mixture, expose=["weights", "scale", "locs"]))
    svi = SVI(mixture, guide, pyro.optim.Adam({"lr": 0.1}), pp.TVE_ELBO(max_plate_nesting=1))
    for _ in range(50):
        svi.step(MIX_DATA)
    return guide


@pytest.mark.parametrize("temperature", [0, 1])
def test_with_a_replayed_guide_and_predictive_equals_pyro(temperature: int) -> None:
    guide = trained_guide()
    guide_trace = poutine.trace(guide).get_trace(MIX_DATA)
    trained = poutine.replay(mixture, trace=guide_trace)
    out = []
    for decoder in (pyro_infer_discrete, pp.infer_discrete):
        pyro.set_rng_seed(11)
        decoded = traced(decoder(trained, first_available_dim=-2, temperature=temperature),
                         MIX_DATA).nodes["assignment"]["value"]
        pyro.set_rng_seed(12)
        predicted = Predictive(decoder(mixture, first_available_dim=-2, temperature=temperature),
                               guide=guide, num_samples=6)(MIX_DATA)
        out.append((decoded, predicted))
    (ref_decoded, ref_predicted), (decoded, predicted) = out
    if temperature == 0:
        assert decoded.tolist() == [0, 0, 1, 1, 1, 0] or decoded.tolist() == [1, 1, 0, 0, 0, 1]
        assert torch.equal(decoded, ref_decoded)
    assert predicted.keys() == ref_predicted.keys()
    for name, value in predicted.items():
        assert value.shape == ref_predicted[name].shape, name
    if temperature == 0:  # the same draws of the global sites, then the same MAP
        for name, value in predicted.items():
            torch.testing.assert_close(value, ref_predicted[name], rtol=1e-9, atol=1e-10)


def test_infer_discrete_after_svi_with_trace_enum_elbo_trained_guide() -> None:
    """The guide trained by TraceEnum_ELBO decodes the same way (TVE_ELBO trains it alike)."""
    pyro.set_rng_seed(0)
    guide = AutoDelta(poutine.block(mixture, expose=["weights", "scale", "locs"]))
    svi = SVI(mixture, guide, pyro.optim.Adam({"lr": 0.1}), TraceEnum_ELBO(max_plate_nesting=1))
    for _ in range(50):
        svi.step(MIX_DATA)
    trained = poutine.replay(mixture, trace=poutine.trace(guide).get_trace(MIX_DATA))
    ours = traced(pp.infer_discrete(trained, first_available_dim=-2, temperature=0), MIX_DATA)
    ref = traced(pyro_infer_discrete(trained, first_available_dim=-2, temperature=0), MIX_DATA)
    assert torch.equal(ours.nodes["assignment"]["value"], ref.nodes["assignment"]["value"])
