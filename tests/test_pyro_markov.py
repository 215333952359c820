"""markov_plate corner cases: terms that see only the previous value of a chain."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

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
