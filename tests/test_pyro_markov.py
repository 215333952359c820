"""markov_plate corner cases: terms that see only the previous value of a chain; guides that meet
a chain (guide-enumerated sites the chain depends on, guide sites sampled inside the plate)."""

from __future__ import annotations

from typing import Any

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO

from plated.errors import GraphError
from plated.pyro import TVE_ELBO, markov_plate

K, N, T = 3, 2, 6
ENUM = {"enumerate": "parallel"}


def _params() -> tuple[torch.Tensor, torch.Tensor]:
    trans = pyro.param("trans", lambda: torch.rand(K, K) + 0.1, constraint=dist.constraints.simplex)
    locs = pyro.param("locs", lambda: torch.randn(K))
    return trans, locs


def loop(data: torch.Tensor) -> None:
    trans, locs = _params()
    with pyro.plate("seq", N, dim=-1):
        x = 0
        for t in pyro.markov(range(T)):
            x_prev = x
            x = pyro.sample(f"x_{t}", dist.Categorical(trans[x]), infer=ENUM)
            # y_t depends on the previous state only (x_{-1} = 0)
            pyro.sample(f"y_{t}", dist.Normal(locs[x_prev], 1.0), obs=data[:, t])


def vectorized(data: torch.Tensor) -> None:
    trans, locs = _params()
    time = markov_plate("time", T, dim=-1)
    with pyro.plate("seq", N, dim=-2):
        x_prev = time.init("x", 0, size=K)
        with time:
            pyro.sample("x", dist.Categorical(trans[x_prev]), infer=ENUM)
            pyro.sample("y", dist.Normal(locs[x_prev], 1.0), obs=data)


def test_term_on_previous_value_only_matches_loop() -> None:
    pyro.clear_param_store()
    data = torch.randn(N, T)
    guide = lambda data: None  # noqa: E731
    a = TVE_ELBO(max_plate_nesting=1).differentiable_loss(loop, guide, data)
    ref = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(loop, guide, data)
    b = TVE_ELBO(max_plate_nesting=2).differentiable_loss(vectorized, guide, data)
    torch.testing.assert_close(a, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(b, ref, rtol=1e-9, atol=1e-9)
    params = [pyro.param("locs"), pyro.param("trans").unconstrained()]
    for g, h in zip(torch.autograd.grad(b, params), torch.autograd.grad(ref, params), strict=True):
        torch.testing.assert_close(g, h, rtol=1e-8, atol=1e-10)
    pyro.clear_param_store()


def test_fixed_initial_state_takes_the_models_dtype() -> None:
    """Regression: ``init("x", 0, size=K)`` made its table in the default dtype (float32 here),
    and a float64 model then failed with a dtype mismatch between factors."""
    torch.set_default_dtype(torch.float32)  # conftest restores float64 afterwards
    data = torch.tensor([0.3, -1.2, 2.0, 0.1], dtype=torch.float64)
    probs = torch.tensor([[0.7, 0.3], [0.25, 0.75]], dtype=torch.float64)

    def model(init: object) -> None:
        time = markov_plate("time", 4, dim=-1)
        x_prev = time.init("x", init, size=2)  # type: ignore[arg-type]
        with time:
            x = pyro.sample("x", dist.Categorical(probs[x_prev]), infer=ENUM)
            pyro.sample("y", dist.Normal(x.to(data.dtype), 1.0), obs=data)

    fixed = TVE_ELBO(max_plate_nesting=1).loss(model, lambda init: None, 0)
    start = dist.Categorical(torch.tensor([1.0, 0.0], dtype=torch.float64))
    explicit = TVE_ELBO(max_plate_nesting=1).loss(model, lambda init: None, start)
    assert fixed == pytest.approx(explicit, rel=1e-12)


# ------------------------------------------------------------------------------------------------
# guides that meet a markov_plate chain, against TraceEnum_ELBO on the pyro.markov loop

G_STEPS = 4


def _guide_params() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    trans = pyro.param("trans2", lambda: torch.rand(2, K, K) + 0.2,
                       constraint=dist.constraints.simplex)
    locs = pyro.param("locs", lambda: torch.randn(K))
    pg = pyro.param("pg", lambda: torch.tensor([0.3, 0.7]), constraint=dist.constraints.simplex)
    ps = pyro.param("ps", lambda: torch.tensor(0.35), constraint=dist.constraints.unit_interval)
    return trans, locs, pg, ps


def g_loop(data: torch.Tensor) -> None:
    """A chain whose transitions depend on a global ``g`` (given a guide), each step with a
    Bernoulli ``s_t`` (given a guide) and an observation."""
    trans, locs, _, _ = _guide_params()
    g = pyro.sample("g", dist.Categorical(torch.tensor([0.4, 0.6])))
    with pyro.plate("seq", N, dim=-1):
        x: Any = 0
        for t in pyro.markov(range(G_STEPS)):
            x = pyro.sample(f"x_{t}", dist.Categorical(trans[g, x]), infer=ENUM)
            s = pyro.sample(f"s_{t}", dist.Bernoulli(0.5))
            pyro.sample(f"y_{t}", dist.Normal(locs[x] + s, 1.0), obs=data[:, t])


def g_vec(data: torch.Tensor) -> None:
    trans, locs, _, _ = _guide_params()
    g = pyro.sample("g", dist.Categorical(torch.tensor([0.4, 0.6])))
    time = markov_plate("time", G_STEPS, dim=-1)
    with pyro.plate("seq", N, dim=-2):
        x_prev = time.init("x", 0, size=K)
        with time:
            x = pyro.sample("x", dist.Categorical(trans[g, x_prev]), infer=ENUM)
            s = pyro.sample("s", dist.Bernoulli(0.5))
            pyro.sample("y", dist.Normal(locs[x] + s, 1.0), obs=data)


def g_guide(how: str | None, vectorized: bool) -> Any:
    """The guide of ``g_loop`` (``vectorized=False``) or ``g_vec``: ``g`` enumerated ``how``
    (or sampled), ``s`` sampled without reparameterization (a score-function term)."""

    def guide(data: torch.Tensor) -> None:
        _, _, pg, ps = _guide_params()
        pyro.sample("g", dist.Categorical(pg), infer={"enumerate": how} if how else {})
        if vectorized:
            with pyro.plate("seq", N, dim=-2), pyro.plate("time", G_STEPS, dim=-1):
                pyro.sample("s", dist.Bernoulli(ps))
        else:
            with pyro.plate("seq", N, dim=-1):
                for t in pyro.markov(range(G_STEPS)):
                    pyro.sample(f"s_{t}", dist.Bernoulli(ps))

    return guide


def fixed_values(guide: Any, values: dict[str, torch.Tensor], data: torch.Tensor) -> Any:
    """``guide`` with its sampled sites replayed at ``values`` (score functions stay those of
    its own distributions), so that the loop and the vectorized guide draw the same values."""
    trace = poutine.trace(poutine.condition(guide, data=values)).get_trace(data)
    for name in values:
        trace.nodes[name]["is_observed"] = False
    return poutine.replay(guide, trace=trace)


@pytest.mark.parametrize("how", ["parallel", "sequential", None])
def test_guide_meets_chain_matches_loop(how: str | None) -> None:
    """A guide-enumerated (or sampled) global the chain depends on, and score-function guide
    sites inside the markov_plate: loss and gradients equal TraceEnum_ELBO's on the loop."""
    pyro.clear_param_store()
    torch.manual_seed(1)
    data = torch.randn(N, G_STEPS)
    s = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
    g = {} if how else {"g": torch.tensor(1)}
    loop_guide = fixed_values(g_guide(how, False), {**g, **{f"s_{t}": s[:, t]
                                                            for t in range(G_STEPS)}}, data)
    vec_guide = fixed_values(g_guide(how, True), {**g, "s": s}, data)
    ref = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(g_loop, loop_guide, data)
    ours = TVE_ELBO(max_plate_nesting=2).differentiable_loss(g_vec, vec_guide, data)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    names = ["trans2", "locs", "pg", "ps"]
    params = [pyro.param(n).unconstrained() for n in names]
    ref_grads = torch.autograd.grad(ref, params)
    grads = torch.autograd.grad(ours, params)
    for name, a, b in zip(names, grads, ref_grads, strict=True):
        assert b.abs().max() > 1e-6, name  # every parameter's gradient is checked
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    pyro.clear_param_store()


@pytest.mark.parametrize("infer", [{"enumerate": "parallel"}, {"enumerate": "sequential"},
                                   {"enumerate": "parallel", "num_samples": 3}],
                         ids=["parallel", "sequential", "num_samples"])
def test_guide_enumeration_inside_a_markov_plate_is_refused(infer: dict[str, Any]) -> None:
    def guide(data: torch.Tensor) -> None:
        _, _, pg, ps = _guide_params()
        pyro.sample("g", dist.Categorical(pg))
        with pyro.plate("seq", N, dim=-2), pyro.plate("time", G_STEPS, dim=-1):
            pyro.sample("s", dist.Bernoulli(ps), infer=infer)

    pyro.clear_param_store()
    with pytest.raises(GraphError, match="guide site 's' is .* inside markov_plate 'time'.*"
                       "Enumerate the site in the model"):
        TVE_ELBO(max_plate_nesting=2).loss(g_vec, guide, torch.zeros(N, G_STEPS))
    pyro.clear_param_store()


def test_chain_site_without_transitions_meeting_guide_enumeration_is_refused() -> None:
    """A chain site that ignores its previous value, in a group that depends on a
    guide-enumerated site: the plate would have to be kept, which a chain cannot be."""

    def model(data: torch.Tensor) -> None:
        g = pyro.sample("g", dist.Categorical(torch.tensor([0.4, 0.6])))
        time = markov_plate("time", 3, dim=-1)
        time.init("x", 0, size=2)
        with time:
            x = pyro.sample("x", dist.Categorical(torch.tensor([0.3, 0.7])), infer=ENUM)
            pyro.sample("y", dist.Normal(x + g, 1.0), obs=data)

    def guide(data: torch.Tensor) -> None:
        pyro.sample("g", dist.Categorical(torch.tensor([0.5, 0.5])),
                    infer={"enumerate": "parallel"})

    with pytest.raises(GraphError, match=r"markov_plate \['time'\]: chain site\(s\) \['x'\].*"
                       r"guide-enumerated sites \['g'\].*not on the chain's previous values.*"
                       "Make the chain site depend on its previous value"):
        TVE_ELBO(max_plate_nesting=1).loss(model, guide, torch.zeros(3))
