"""TVE_ELBO as a drop-in for Pyro's TraceEnum_ELBO (issue 16): every case is compared with Pyro's
class on the same inputs and seed, or checked to raise what Pyro raises."""

from __future__ import annotations

from typing import Any

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO

from plated.pyro import TVE_ELBO

E: Any = {"enumerate": "parallel"}


def empty_guide(*args: Any, **kwargs: Any) -> None:
    return None


def both(make: Any, model: Any, guide: Any, *args: Any, seed: int = 0) -> tuple[float, float]:
    """The loss of Pyro's class and of ours, each from the same seed."""
    losses = []
    for cls in (TraceEnum_ELBO, TVE_ELBO):
        pyro.set_rng_seed(seed)
        pyro.clear_param_store()
        losses.append(make(cls).loss(model, guide, *args))
    return losses[0], losses[1]


def masked_by_enumerated() -> None:
    z = pyro.sample("z", dist.Categorical(torch.tensor([0.2, 0.3, 0.5])), infer=E)
    with poutine.mask(mask=(z == 0)):
        pyro.sample("x", dist.Normal(0.0, 1.0), obs=torch.tensor(3.0))


def test_mask_that_depends_on_an_enumerated_value() -> None:
    pyro_loss, ours = both(lambda c: c(max_plate_nesting=0), masked_by_enumerated, empty_guide)
    closed = -torch.log(0.2 * dist.Normal(0.0, 1.0).log_prob(torch.tensor(3.0)).exp() + 0.8)
    assert abs(ours - float(closed)) < 1e-12 and abs(ours - pyro_loss) < 1e-12
    assert abs(ours - 0.2220) < 1e-4


def test_mask_by_enumerated_value_inside_plates() -> None:
    data = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 3.0], [1.0, 11.0]])
    locs = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 10.0]])
    logits = torch.tensor([0.0, -1.0, 2.0])

    def model() -> None:
        with pyro.plate("data", len(data), dim=-2):
            which = pyro.sample("which", dist.Categorical(logits=logits), infer=E)
            with pyro.plate("components", 3, dim=-1) as k, poutine.mask(mask=(which == k)):
                pyro.sample("obs", dist.Normal(locs, 2.0).to_event(1), obs=data.unsqueeze(-2))

    pyro_loss, ours = both(lambda c: c(max_plate_nesting=2), model, empty_guide)
    mix = dist.MixtureOfDiagNormalsSharedCovariance(locs, torch.tensor([2.0, 2.0]), logits)
    assert abs(ours - pyro_loss) < 1e-10
    assert abs(ours + float(mix.log_prob(data).sum())) < 1e-10


def second_order(history: int) -> Any:
    def model() -> None:
        probs = torch.tensor([[0.9, 0.4], [0.3, 0.2]])
        x: Any = 0
        y: Any = 0
        for t in pyro.markov(range(4), history=history):
            x, y = y, pyro.sample(f"x_{t}", dist.Bernoulli(probs[x, y]), infer=E).long()
            pyro.sample(f"obs_{t}", dist.Normal(y.double(), 1.0), obs=torch.tensor(0.5))
    return model


@pytest.mark.parametrize("history", [0, 1])
def test_misdeclared_markov_history_raises_like_pyro(history: int) -> None:
    for cls in (TraceEnum_ELBO, TVE_ELBO):
        with pytest.raises(ValueError, match="Enumeration dim conflict"):
            cls(max_plate_nesting=0).loss(second_order(history), empty_guide)
    pyro_loss, ours = both(lambda c: c(max_plate_nesting=0), second_order(2), empty_guide)
    assert abs(ours - pyro_loss) < 1e-12


def plated_model(data: torch.Tensor) -> None:
    loc = pyro.param("loc", torch.tensor([-1.0, 1.0]))
    with pyro.plate("n", len(data)):
        z = pyro.sample("z", dist.Categorical(torch.tensor([0.4, 0.6])), infer=E)
        pyro.sample("y", dist.Normal(loc[z], 1.0), obs=data)


def normal_guide(data: torch.Tensor) -> None:
    q = pyro.param("q", torch.tensor(0.3))
    pyro.sample("s", dist.Normal(q, 1.0))


def model_with_s(data: torch.Tensor) -> None:
    s = pyro.sample("s", dist.Normal(0.0, 1.0))
    with pyro.plate("n", len(data)):
        z = pyro.sample("z", dist.Categorical(torch.tensor([0.4, 0.6])), infer=E)
        pyro.sample("y", dist.Normal(s + z.double(), 1.0), obs=data)


DATA = torch.tensor([0.1, -0.4, 1.3])


def test_guessed_max_plate_nesting() -> None:
    pyro_loss, ours = both(lambda c: c(), plated_model, empty_guide, DATA)
    assert abs(ours - pyro_loss) < 1e-12
    elbo = TVE_ELBO()
    elbo.loss(plated_model, empty_guide, DATA)
    assert elbo.max_plate_nesting == 1


@pytest.mark.parametrize("vectorize", [False, True])
@pytest.mark.parametrize("num_particles", [1, 4])
def test_particles(vectorize: bool, num_particles: int) -> None:
    pyro_loss, ours = both(lambda c: c(num_particles=num_particles,
                                       vectorize_particles=vectorize),
                           model_with_s, normal_guide, DATA, seed=3)
    assert abs(ours - pyro_loss) < 1e-10


@pytest.mark.parametrize("num_samples", [2, 5])
def test_multiple_sampling_of_a_guide_site(num_samples: int) -> None:
    def guide(data: torch.Tensor) -> None:
        q = pyro.param("q", torch.tensor(0.3))
        pyro.sample("s", dist.Normal(q, 1.0),
                    infer={"enumerate": "parallel", "num_samples": num_samples})

    grads = []
    for cls in (TraceEnum_ELBO, TVE_ELBO):
        pyro.set_rng_seed(5)
        pyro.clear_param_store()
        loss = cls(max_plate_nesting=1).differentiable_loss(model_with_s, guide, DATA)
        q = pyro.param("q").unconstrained()
        grads.append((loss.item(), torch.autograd.grad(loss, q)[0].item()))
    assert abs(grads[0][0] - grads[1][0]) < 1e-10 and abs(grads[0][1] - grads[1][1]) < 1e-10


def test_compute_marginals_matches_pyro() -> None:
    out = []
    for cls in (TraceEnum_ELBO, TVE_ELBO):
        pyro.clear_param_store()
        out.append(cls(max_plate_nesting=1).compute_marginals(plated_model, empty_guide, DATA))
    assert list(out[0]) == list(out[1]) == ["z"]
    assert type(out[1]["z"]) is dist.Categorical
    assert torch.allclose(out[0]["z"].probs, out[1]["z"].probs, atol=1e-12)


def test_sample_posterior_returns_the_model_value() -> None:
    def model(data: torch.Tensor) -> torch.Tensor:
        with pyro.plate("n", len(data)):
            z = pyro.sample("z", dist.Categorical(torch.tensor([0.4, 0.6])), infer=E)
            pyro.sample("y", dist.Normal(10.0 * z.double(), 0.1), obs=data)
        return z

    z = TVE_ELBO(max_plate_nesting=1).sample_posterior(model, empty_guide,
                                                       torch.tensor([0.0, 10.0, 10.0]))
    assert z.tolist() == [0, 1, 1]
    with pytest.raises(NotImplementedError, match="sample_posterior"):
        TVE_ELBO(num_particles=2).sample_posterior(model, empty_guide, torch.zeros(2))


def test_guide_calls_autograd_grad_with_sequential_enumeration() -> None:
    def model() -> None:
        p = pyro.param("p", torch.tensor(0.3))
        pyro.sample("b", dist.Bernoulli(p))
        pyro.sample("x", dist.Normal(p, 1.0), obs=torch.tensor(1.0))

    def guide() -> None:
        w = pyro.param("w", torch.tensor(0.5))
        p = pyro.param("p", torch.tensor(0.3))
        (g,) = torch.autograd.grad(p * w * w, [w], create_graph=True)
        pyro.sample("b", dist.Bernoulli(torch.sigmoid(g)), infer={"enumerate": "sequential"})

    losses = []
    for cls in (TraceEnum_ELBO, TVE_ELBO):
        pyro.clear_param_store()
        losses.append(cls(max_plate_nesting=0).loss_and_grads(model, guide))
    assert abs(losses[0] - losses[1]) < 1e-12
