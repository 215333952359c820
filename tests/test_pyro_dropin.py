"""TVE_ELBO as a drop-in for Pyro's TraceEnum_ELBO (issue 16): every case is compared with Pyro's
class on the same inputs and seed, or checked to raise what Pyro raises."""

from __future__ import annotations

from typing import Any

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Predictive, TraceEnum_ELBO
from pyro.infer.autoguide import AutoDelta, AutoNormal

from plated.pyro import TVE_ELBO, markov_plate

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
    # Pyro detects the conflict only under validation (which another test may have turned off)
    for cls in (TraceEnum_ELBO, TVE_ELBO):
        with pyro.validation_enabled(True), \
                pytest.raises(ValueError, match="Enumeration dim conflict"):
            cls(max_plate_nesting=0).loss(second_order(history), empty_guide)
    with pyro.validation_enabled(False), \
            pytest.raises(ValueError, match="Enumeration dim conflict"):  # ours: always
        TVE_ELBO(max_plate_nesting=0).loss(second_order(history), empty_guide)
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


# ------------------------------------------------------------------------------------------------
# with pyro.infer.SVI, Predictive and autoguides: each against TraceEnum_ELBO on the same seed

MIX_DATA = torch.tensor([0.0, 1.0, 10.0, 11.0, 12.0, 0.5])


def mixture(data: torch.Tensor) -> None:
    """Pyro's Gaussian mixture tutorial model: global weights, scale and component locations,
    an enumerated assignment per data point."""
    weights = pyro.sample("weights", dist.Dirichlet(0.5 * torch.ones(2)))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 2.0))
    with pyro.plate("components", 2):
        locs = pyro.sample("locs", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(data)):
        assignment = pyro.sample("assignment", dist.Categorical(weights), infer=E)
        pyro.sample("obs", dist.Normal(locs[assignment], scale), obs=data)


GUIDES: dict[str, Any] = {
    "AutoDelta": lambda: AutoDelta(poutine.block(mixture, expose=["weights", "scale", "locs"])),
    "AutoNormal": lambda: AutoNormal(poutine.block(mixture, hide=["assignment"])),
}


def train(cls: Any, make_guide: Any, steps: int, seed: int = 0
          ) -> tuple[list[float], dict[str, torch.Tensor], Any]:
    """``steps`` SVI steps with ``cls`` from seed ``seed``: the losses, the parameters (by
    name, unconstrained) and the guide."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = make_guide()
    svi = SVI(mixture, guide, pyro.optim.Adam({"lr": 0.1}), cls(max_plate_nesting=1))
    losses = [svi.step(MIX_DATA) for _ in range(steps)]
    params = {name: pyro.param(name).unconstrained().detach().clone()
              for name in pyro.get_param_store()}
    return losses, params, guide


@pytest.mark.parametrize("guide_name", sorted(GUIDES))
def test_svi_with_autoguide_matches_pyro(guide_name: str) -> None:
    """Losses of every step and the parameters after them equal TraceEnum_ELBO's."""
    steps = 8
    pyro_losses, pyro_params, _ = train(TraceEnum_ELBO, GUIDES[guide_name], steps)
    losses, params, _ = train(TVE_ELBO, GUIDES[guide_name], steps)
    assert len(params) == len(pyro_params) > 0 and params.keys() == pyro_params.keys()
    for ours, theirs in zip(losses, pyro_losses, strict=True):
        assert ours == pytest.approx(theirs, rel=1e-10, abs=1e-10)
    for name, value in params.items():
        torch.testing.assert_close(value, pyro_params[name], rtol=1e-9, atol=1e-10)
    pyro.clear_param_store()


def test_svi_loss_decreases() -> None:
    losses, _, _ = train(TVE_ELBO, GUIDES["AutoDelta"], 30)
    assert losses[-1] < 0.5 * losses[0]
    assert all(b < a for a, b in zip(losses[:5], losses[1:6], strict=True))  # steadily at first
    pyro.clear_param_store()


def test_autodelta_over_an_enumerated_site_is_refused_as_pyro() -> None:
    """An autoguide that would cover the enumerated site: the same error as Pyro's."""
    for cls in (TraceEnum_ELBO, TVE_ELBO):
        pyro.clear_param_store()
        svi = SVI(mixture, AutoDelta(mixture), pyro.optim.Adam({"lr": 0.1}),
                  cls(max_plate_nesting=1))
        with pytest.raises(ValueError, match="Continuous inference cannot handle discrete"):
            svi.step(MIX_DATA)
    pyro.clear_param_store()


@pytest.mark.parametrize("guide_name", sorted(GUIDES))
def test_predictive_after_training_matches_pyro(guide_name: str) -> None:
    """Predictive with the guide trained by each ELBO: the same draws from the same seed."""
    draws = []
    for cls in (TraceEnum_ELBO, TVE_ELBO):
        _, _, guide = train(cls, GUIDES[guide_name], 5)
        pyro.set_rng_seed(1)
        draws.append(Predictive(mixture, guide=guide, num_samples=7)(MIX_DATA))
    assert draws[0].keys() == draws[1].keys() >= {"weights", "scale", "locs", "assignment"}
    for name, value in draws[1].items():
        assert value.shape == draws[0][name].shape
        torch.testing.assert_close(value, draws[0][name], rtol=1e-9, atol=1e-10)
    pyro.clear_param_store()


HMM_STATES, HMM_SEQS, HMM_STEPS = 3, 2, 5


def hmm_data() -> torch.Tensor:
    return torch.randn(HMM_SEQS, HMM_STEPS, generator=torch.Generator().manual_seed(4))


def hmm_params() -> tuple[torch.Tensor, torch.Tensor]:
    trans = pyro.param("trans", lambda: torch.full((HMM_STATES, HMM_STATES), 0.1)
                       + torch.eye(HMM_STATES), constraint=dist.constraints.simplex)
    locs = pyro.param("locs", lambda: torch.tensor([-1.0, 0.2, 1.5]))
    return trans, locs


def hmm_loop(data: torch.Tensor) -> None:
    trans, locs = hmm_params()
    with pyro.plate("seq", HMM_SEQS, dim=-1):
        x: Any = 0
        for t in pyro.markov(range(HMM_STEPS)):
            x = pyro.sample(f"x_{t}", dist.Categorical(trans[x]), infer=E)
            pyro.sample(f"y_{t}", dist.Normal(locs[x], 1.0), obs=data[:, t])


def hmm_vec(data: torch.Tensor) -> None:
    trans, locs = hmm_params()
    time = markov_plate("time", HMM_STEPS, dim=-1)
    with pyro.plate("seq", HMM_SEQS, dim=-2):
        x_prev = time.init("x", 0, size=HMM_STATES)
        with time:
            x = pyro.sample("x", dist.Categorical(trans[x_prev]), infer=E)
            pyro.sample("y", dist.Normal(locs[x], 1.0), obs=data)


def test_svi_on_markov_plate_matches_pyro_on_the_loop() -> None:
    """SVI steps of TVE_ELBO on the markov_plate HMM against TraceEnum_ELBO on the loop."""
    data = hmm_data()
    out = []
    for cls, model, nesting in ((TraceEnum_ELBO, hmm_loop, 1), (TVE_ELBO, hmm_vec, 2),
                                (TVE_ELBO, hmm_loop, 1)):
        pyro.clear_param_store()
        svi = SVI(model, empty_guide, pyro.optim.Adam({"lr": 0.05}),
                  cls(max_plate_nesting=nesting))
        losses = [svi.step(data) for _ in range(6)]
        out.append((losses, {n: pyro.param(n).unconstrained().detach().clone()
                             for n in ("trans", "locs")}))
    (ref_losses, ref_params), *rest = out
    assert ref_losses[-1] < ref_losses[0]
    for losses, params in rest:
        assert losses == pytest.approx(ref_losses, rel=1e-10, abs=1e-10)
        for name, value in params.items():
            torch.testing.assert_close(value, ref_params[name], rtol=1e-9, atol=1e-10)
    pyro.clear_param_store()
