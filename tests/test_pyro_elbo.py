"""``plated.pyro.TVE_ELBO`` against Pyro's own ``TraceEnum_ELBO`` on a battery of models.

Every case of the battery is a Pyro (model, guide) pair. On each, the loss (``loss``,
``differentiable_loss``, ``loss_and_grads``) and the gradient with respect to every Pyro param must
equal ``TraceEnum_ELBO``'s to 1e-6 relative in float64. Guides that sample run under the same RNG
seed for both ELBOs, so both see the same guide sample.

The battery covers the six HMMs of Pyro's polyphonic-music example (``examples/hmm.py``), written
here from scratch with ``pyro.markov`` loops over batched, masked sequences, each in two styles
(probability tables as ``pyro.param``, or as ``pyro.sample`` globals with a MAP guide of
``pyro.param`` + ``dist.Delta``); Gaussian mixtures; nested and subsampled plates;
``poutine.scale`` and ``poutine.mask``; guide-side enumeration (parallel and sequential);
non-reparameterized (score-function) guide sites and reparameterized continuous guide sites.

Each HMM also has a vectorized form written with :class:`plated.pyro.markov_plate`, whose
``TVE_ELBO`` loss and gradients must equal those of the loop form.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import SVI, TraceEnum_ELBO
from pyro.optim import Adam
from torch import nn

from plated.pyro import TVE_ELBO, markov_plate

RTOL = 1e-6
ATOL = 1e-9
SEED = 123
ENUM = {"enumerate": "parallel"}


def assert_close(ours: Any, ref: Any, what: str) -> None:
    torch.testing.assert_close(torch.as_tensor(ours), torch.as_tensor(ref), rtol=RTOL, atol=ATOL,
                               msg=lambda m: f"{what}: {m}")


@dataclass
class Case:
    """A (model, guide) pair with its arguments and the number of plate dims of the model."""

    model: Callable[..., Any]
    guide: Callable[..., Any]
    args: tuple[Any, ...]
    max_plate_nesting: int


def empty_guide(*args: Any, **kwargs: Any) -> None:
    pass


# ------------------------------------------------------------------------------------------------
# Globals: a pyro.param, or a pyro.sample site with a MAP (Delta) guide


@dataclass
class Global:
    name: str
    init: torch.Tensor
    constraint: Any
    prior: dist.TorchDistribution  # used by the "sample" style only


def get_global(style: str, g: Global) -> torch.Tensor:
    if style == "param":
        return pyro.param(g.name, lambda: g.init.clone(), constraint=g.constraint)
    return pyro.sample(g.name, g.prior)


def map_guide(style: str, globals_: list[Global]) -> Callable[..., Any]:
    """The guide of a model whose globals are read with :func:`get_global`: nothing for
    ``"param"``, a ``Delta`` at a constrained ``pyro.param`` for ``"sample"``."""
    if style == "param":
        return empty_guide

    def guide(*args: Any, **kwargs: Any) -> None:
        for g in globals_:
            value = pyro.param(f"{g.name}_map", lambda g=g: g.init.clone(),
                               constraint=g.constraint)
            pyro.sample(g.name, dist.Delta(value, event_dim=value.dim()))

    return guide


def table(name: str, *shape: int) -> Global:
    """A conditional probability table over the last dim (a simplex), with a Dirichlet prior."""
    init = torch.rand(*shape) + 0.2
    init = init / init.sum(-1, keepdim=True)
    conc = torch.full(shape, 0.5) + 0.5 * torch.eye(shape[-1]).expand(shape)
    return Global(name, init, constraints.simplex, dist.Dirichlet(conc).to_event(len(shape) - 1))


def bernoulli_table(name: str, *shape: int) -> Global:
    """Bernoulli probabilities (unit interval), with a Beta prior."""
    init = 0.1 + 0.8 * torch.rand(*shape)
    prior = dist.Beta(torch.full(shape, 1.0), torch.full(shape, 2.0)).to_event(len(shape))
    return Global(name, init, constraints.unit_interval, prior)


# ------------------------------------------------------------------------------------------------
# The six HMMs of Pyro's polyphonic-music example, as pyro.markov loops and as markov_plates.
# Data: sequences (N, T, D) of D binary tones, each sequence i valid for its first lengths[i] steps.

K = 3  # hidden states
D = 5  # tones
N = 4  # sequences
T = 6  # steps


class TonesNet(nn.Module):
    """The logits of the tones at step t from the one-hot state x_t and the tones y_{t-1}."""

    def __init__(self, hidden: int = 4) -> None:
        super().__init__()
        self.from_x = nn.Linear(K, hidden)
        self.from_y = nn.Linear(D, hidden)
        self.to_logits = nn.Linear(hidden, D)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # x: long states with a trailing singleton (the tones plate dim); y: tones (..., D)
        one_hot = nn.functional.one_hot(x.squeeze(-1), K).to(y.dtype)
        return self.to_logits(torch.relu(self.from_x(one_hot) + self.from_y(y)))


def hmm_globals(kind: str) -> list[Global]:
    if kind == "hmm":
        return [table("probs_x", K, K), bernoulli_table("probs_y", K, D)]
    if kind == "arhmm":
        return [table("probs_x", K, K), bernoulli_table("probs_y", K, 2, D)]
    if kind == "factorial":
        return [table("probs_w", K, K), table("probs_x", K, K), bernoulli_table("probs_y", K, K, D)]
    if kind == "partial":
        return [table("probs_w", K, K), table("probs_x", K, K, K),
                bernoulli_table("probs_y", K, K, D)]
    if kind == "nn":
        return [table("probs_x", K, K)]
    if kind == "second_order":
        return [table("probs_x", K, K, K), bernoulli_table("probs_y", K, D)]
    raise ValueError(kind)


HMM_KINDS = ["hmm", "arhmm", "factorial", "partial", "nn", "second_order"]


def hmm_loop(kind: str, style: str, globals_: list[Global], net: TonesNet | None
             ) -> Callable[..., Any]:
    """A model over a batch of sequences with a ``pyro.markov`` loop over time."""

    def model(seqs: torch.Tensor, lengths: torch.Tensor) -> None:
        p = {g.name: get_global(style, g) for g in globals_}
        tones = pyro.plate("tones", D, dim=-1)
        tone_ids = torch.arange(D)
        if net is not None:
            pyro.module("tones_net", net)
        with pyro.plate("sequences", N, dim=-2):
            w: Any = 0
            x: Any = 0
            x2: Any = 0  # x two steps back (second order)
            y: Any = torch.zeros(D) if kind == "nn" else 0
            history = 2 if kind == "second_order" else 1
            for t in pyro.markov(range(T), history=history):
                with poutine.mask(mask=(t < lengths).unsqueeze(-1)):
                    if kind in ("factorial", "partial"):
                        w = pyro.sample(f"w_{t}", dist.Categorical(p["probs_w"][w]), infer=ENUM)
                    if kind == "partial":
                        probs = p["probs_x"][w, x]
                    elif kind == "second_order":
                        probs = p["probs_x"][x2, x]
                    else:
                        probs = p["probs_x"][x]
                    x2, x = x, pyro.sample(f"x_{t}", dist.Categorical(probs), infer=ENUM)
                    with tones:
                        obs = seqs[:, t]
                        if kind == "arhmm":
                            fn = dist.Bernoulli(p["probs_y"][x, y, tone_ids])
                        elif kind in ("factorial", "partial"):
                            fn = dist.Bernoulli(p["probs_y"][w, x, tone_ids])
                        elif kind == "nn":
                            assert net is not None
                            fn = dist.Bernoulli(logits=net(x, y))
                        else:
                            fn = dist.Bernoulli(p["probs_y"][x.squeeze(-1)])
                        y = pyro.sample(f"y_{t}", fn, obs=obs)
                        if kind == "arhmm":
                            y = y.long()

    return model


def hmm_vectorized(kind: str, style: str, globals_: list[Global], net: TonesNet | None
                   ) -> Callable[..., Any]:
    """The same model with one ``markov_plate`` over time: plates sequences (-3), time (-2),
    tones (-1)."""

    def model(seqs: torch.Tensor, lengths: torch.Tensor) -> None:
        p = {g.name: get_global(style, g) for g in globals_}
        tones = pyro.plate("tones", D, dim=-1)
        tone_ids = torch.arange(D)
        if net is not None:
            pyro.module("tones_net", net)
        time = markov_plate("time", T, dim=-2, history=2 if kind == "second_order" else 1)
        # the tones at t - 1, zero before the first step (the loop's start)
        y_prev = torch.cat([torch.zeros(N, 1, D), seqs[:, :-1]], dim=1)
        mask = (torch.arange(T) < lengths.unsqueeze(-1)).unsqueeze(-1)  # (N, T, 1)
        with pyro.plate("sequences", N, dim=-3):
            if kind in ("factorial", "partial"):
                w_prev = time.init("w", 0, size=K)
            if kind == "second_order":
                x_prev, x_prev2 = time.init("x", 0, size=K)
            else:
                x_prev = time.init("x", 0, size=K)
            with time, poutine.mask(mask=mask):
                if kind in ("factorial", "partial"):
                    w = pyro.sample("w", dist.Categorical(p["probs_w"][w_prev]), infer=ENUM)
                if kind == "partial":
                    probs = p["probs_x"][w, x_prev]
                elif kind == "second_order":
                    probs = p["probs_x"][x_prev2, x_prev]
                else:
                    probs = p["probs_x"][x_prev]
                x = pyro.sample("x", dist.Categorical(probs), infer=ENUM)
                with tones:
                    if kind == "arhmm":
                        fn = dist.Bernoulli(p["probs_y"][x, y_prev.long(), tone_ids])
                    elif kind in ("factorial", "partial"):
                        fn = dist.Bernoulli(p["probs_y"][w, x, tone_ids])
                    elif kind == "nn":
                        assert net is not None
                        fn = dist.Bernoulli(logits=net(x, y_prev))
                    else:
                        fn = dist.Bernoulli(p["probs_y"][x.squeeze(-1)])
                    pyro.sample("y", fn, obs=seqs)

    return model


def hmm_data() -> tuple[torch.Tensor, torch.Tensor]:
    seqs = (torch.rand(N, T, D) < 0.4).to(torch.get_default_dtype())
    lengths = torch.tensor([T, T - 2, 3, T - 1])
    return seqs, lengths


def hmm_case(kind: str, style: str, vectorized: bool = False) -> Case:
    globals_ = hmm_globals(kind)
    net = TonesNet() if kind == "nn" else None
    make = hmm_vectorized if vectorized else hmm_loop
    return Case(make(kind, style, globals_, net), map_guide(style, globals_), hmm_data(),
                3 if vectorized else 2)


# ------------------------------------------------------------------------------------------------
# The rest of the battery


def gmm_data(n: int = 8) -> torch.Tensor:
    return torch.cat([torch.randn(n // 2) - 2.0, torch.randn(n - n // 2) + 1.5])


def gmm_params() -> Case:
    """Gaussian mixture: global weights, locs and scale as params; enumerated assignments."""
    w0, l0 = torch.tensor([0.3, 0.3, 0.4]), torch.tensor([-1.0, 0.5, 2.0])

    def model(data: torch.Tensor) -> None:
        weights = pyro.param("weights", lambda: w0.clone(), constraint=constraints.simplex)
        locs = pyro.param("locs", lambda: l0.clone())
        scale = pyro.param("scale", lambda: torch.tensor(1.3), constraint=constraints.positive)
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Categorical(weights), infer=ENUM)
            pyro.sample("obs", dist.Normal(locs[z], scale), obs=data)

    return Case(model, empty_guide, (gmm_data(),), 1)


def gmm_dirichlet() -> Case:
    """Mixture weights as a Dirichlet sample site with a Delta guide; per-component scales."""
    l0 = torch.tensor([-1.0, 0.5, 2.0])

    def model(data: torch.Tensor) -> None:
        weights = pyro.sample("weights", dist.Dirichlet(torch.full((3,), 1.5)))
        locs = pyro.param("locs", lambda: l0.clone())
        scales = pyro.param("scales", lambda: torch.tensor([0.8, 1.0, 1.5]),
                            constraint=constraints.positive)
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Categorical(weights), infer=ENUM)
            pyro.sample("obs", dist.Normal(locs[z], scales[z]), obs=data)

    def guide(data: torch.Tensor) -> None:
        w = pyro.param("weights_map", lambda: torch.tensor([0.2, 0.5, 0.3]),
                       constraint=constraints.simplex)
        pyro.sample("weights", dist.Delta(w, event_dim=1))

    return Case(model, guide, (gmm_data(),), 1)


def gmm_2d() -> Case:
    """A mixture of 2-d diagonal Gaussians: an event dim on the observation."""
    data = torch.randn(7, 2) + torch.tensor([1.0, -1.0])
    l0 = torch.randn(3, 2)

    def model(data: torch.Tensor) -> None:
        weights = pyro.param("weights", lambda: torch.tensor([0.5, 0.25, 0.25]),
                             constraint=constraints.simplex)
        locs = pyro.param("locs", lambda: l0.clone())
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Categorical(weights), infer=ENUM)
            pyro.sample("obs", dist.Normal(locs[z], 1.0).to_event(1), obs=data)

    return Case(model, empty_guide, (data,), 1)


def nested_model(subsample: torch.Tensor | None) -> Callable[..., Any]:
    """Groups x items: an enumerated class per group, an enumerated sub-class per item."""
    c0, s0 = torch.randn(2, 3), torch.randn(3)

    def model(data: torch.Tensor) -> None:
        probs_g = pyro.param("probs_g", lambda: torch.tensor([0.4, 0.6]),
                             constraint=constraints.simplex)
        probs_i = pyro.param("probs_i", lambda: torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]]),
                             constraint=constraints.simplex)
        centers = pyro.param("centers", lambda: c0.clone())
        shift = pyro.param("shift", lambda: s0.clone())
        n_groups, n_items = data.shape
        with pyro.plate("groups", n_groups, dim=-2, subsample=subsample) as gi:
            g = pyro.sample("g", dist.Categorical(probs_g), infer=ENUM)
            with pyro.plate("items", n_items, dim=-1):
                i = pyro.sample("i", dist.Categorical(probs_i[g]), infer=ENUM)
                pyro.sample("obs", dist.Normal(centers[g, i] + shift[i], 0.7), obs=data[gi])

    return model


def nested() -> Case:
    return Case(nested_model(None), empty_guide, (torch.randn(3, 4),), 2)


def nested_subsampled() -> Case:
    """The outer plate subsampled: every enumerated site gets the same scale G / 2."""
    return Case(nested_model(torch.tensor([4, 1])), empty_guide, (torch.randn(5, 3),), 2)


def subsampled() -> Case:
    """A GMM whose data plate is subsampled (explicit indices), with a global Normal prior site
    on the locs (a MAP guide) that the subsample scale must not touch."""
    idx = torch.tensor([0, 3, 5, 6, 9])

    def model(data: torch.Tensor) -> None:
        weights = pyro.param("weights", lambda: torch.tensor([0.3, 0.7]),
                             constraint=constraints.simplex)
        locs = pyro.sample("locs", dist.Normal(torch.zeros(2), 3.0).to_event(1))
        with pyro.plate("data", len(data), subsample=idx) as ind:
            z = pyro.sample("z", dist.Categorical(weights), infer=ENUM)
            pyro.sample("obs", dist.Normal(locs[z], 1.0), obs=data[ind])

    def guide(data: torch.Tensor) -> None:
        loc = pyro.param("locs_map", lambda: torch.tensor([-1.0, 1.0]))
        pyro.sample("locs", dist.Delta(loc, event_dim=1))

    return Case(model, guide, (gmm_data(10),), 1)


def scaled() -> Case:
    """poutine.scale (scalar) on the plated part; the global Dirichlet prior is not scaled."""

    def model(data: torch.Tensor) -> None:
        weights = pyro.sample("weights", dist.Dirichlet(torch.full((3,), 2.0)))
        locs = pyro.param("locs", lambda: torch.tensor([-1.0, 0.0, 1.0]))
        with poutine.scale(scale=0.3), pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Categorical(weights), infer=ENUM)
            pyro.sample("obs", dist.Normal(locs[z], 1.0), obs=data)

    def guide(data: torch.Tensor) -> None:
        w = pyro.param("weights_map", lambda: torch.tensor([0.3, 0.3, 0.4]),
                       constraint=constraints.simplex)
        pyro.sample("weights", dist.Delta(w, event_dim=1))

    return Case(model, guide, (gmm_data(),), 1)


def masked() -> Case:
    """poutine.mask on some data points (their assignment and observation)."""
    mask = torch.tensor([True, False, True, True, False, True, True, False])

    def model(data: torch.Tensor) -> None:
        weights = pyro.param("weights", lambda: torch.tensor([0.3, 0.7]),
                             constraint=constraints.simplex)
        locs = pyro.param("locs", lambda: torch.tensor([-1.0, 1.0]))
        with pyro.plate("data", len(data)), poutine.mask(mask=mask):
            z = pyro.sample("z", dist.Categorical(weights), infer=ENUM)
            pyro.sample("obs", dist.Normal(locs[z], 1.0), obs=data)
        # a masked observation outside any enumerated site
        pyro.sample("extra", dist.Normal(locs.sum(), 1.0).mask(False), obs=torch.tensor(0.5))

    return Case(model, empty_guide, (gmm_data(),), 1)


def regime_model(data: torch.Tensor) -> None:
    """A global regime c, an enumerated component z per data point given c."""
    pi = pyro.param("pi", lambda: torch.tensor([0.6, 0.4]), constraint=constraints.simplex)
    probs_z = pyro.param("probs_z", lambda: torch.tensor([[0.2, 0.3, 0.5], [0.5, 0.4, 0.1]]),
                         constraint=constraints.simplex)
    locs = pyro.param("locs", lambda: torch.tensor([-2.0, 0.0, 2.0]))
    shift = pyro.param("shift", lambda: torch.tensor([0.0, 1.0]))
    c = pyro.sample("c", dist.Categorical(pi))
    with pyro.plate("data", len(data)):
        z = pyro.sample("z", dist.Categorical(probs_z[c]), infer=ENUM)
        pyro.sample("obs", dist.Normal(locs[z] + shift[c], 1.0), obs=data)


def regime_guide(how: str | None) -> Callable[..., Any]:
    def guide(data: torch.Tensor) -> None:
        q = pyro.param("q_c", lambda: torch.tensor([0.3, 0.7]), constraint=constraints.simplex)
        infer = {"enumerate": how} if how else {}
        pyro.sample("c", dist.Categorical(q), infer=infer)

    return guide


def model_enum_global() -> Case:
    """The regime c enumerated in the model too: a global enumerated site coupled to the plate."""
    model = poutine.infer_config(regime_model, lambda site: ENUM if site["name"] == "c" else {})
    return Case(model, empty_guide, (gmm_data(),), 1)


def guide_enum_parallel() -> Case:
    return Case(regime_model, regime_guide("parallel"), (gmm_data(),), 1)


def guide_enum_sequential() -> Case:
    return Case(regime_model, regime_guide("sequential"), (gmm_data(),), 1)


def score_function_global() -> Case:
    """The guide samples c without enumeration: a score-function (DiCE) term."""
    return Case(regime_model, regime_guide(None), (gmm_data(),), 1)


def guide_enum_local() -> Case:
    """The guide enumerates a local z in the plate; the model enumerates w given z there."""
    q0 = torch.rand(6, 2) + 0.1
    q0 = q0 / q0.sum(-1, keepdim=True)

    def model(data: torch.Tensor) -> None:
        pi = pyro.param("pi", lambda: torch.tensor([0.6, 0.4]), constraint=constraints.simplex)
        probs_w = pyro.param("probs_w", lambda: torch.tensor([[0.2, 0.8], [0.7, 0.3]]),
                             constraint=constraints.simplex)
        locs = pyro.param("locs", lambda: torch.tensor([[-2.0, -1.0], [1.0, 2.0]]))
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Categorical(pi))
            w = pyro.sample("w", dist.Categorical(probs_w[z]), infer=ENUM)
            pyro.sample("obs", dist.Normal(locs[z, w], 1.0), obs=data)

    def guide(data: torch.Tensor) -> None:
        q = pyro.param("q_z", lambda: q0.clone(), constraint=constraints.simplex)
        with pyro.plate("data", len(data)):
            pyro.sample("z", dist.Categorical(q), infer=ENUM)

    return Case(model, guide, (gmm_data(6),), 1)


def score_function_local() -> Case:
    """A non-reparameterized Bernoulli per data point in the guide; enumerated z given it."""
    q0 = 0.2 + 0.6 * torch.rand(8)

    def model(data: torch.Tensor) -> None:
        probs_z = pyro.param("probs_z", lambda: torch.tensor([[0.2, 0.3, 0.5], [0.5, 0.4, 0.1]]),
                             constraint=constraints.simplex)
        locs = pyro.param("locs", lambda: torch.tensor([-2.0, 0.0, 2.0]))
        with pyro.plate("data", len(data)):
            b = pyro.sample("b", dist.Bernoulli(0.3))
            z = pyro.sample("z", dist.Categorical(probs_z[b.long()]), infer=ENUM)
            pyro.sample("obs", dist.Normal(locs[z] + b, 1.0), obs=data)

    def guide(data: torch.Tensor) -> None:
        q = pyro.param("q_b", lambda: q0.clone(), constraint=constraints.unit_interval)
        with pyro.plate("data", len(data)):
            pyro.sample("b", dist.Bernoulli(q))

    return Case(model, guide, (gmm_data(),), 1)


def reparam_continuous() -> Case:
    """Continuous latents (a global mu, a local h per data point) with reparameterized Normal
    guides, next to enumerated assignments."""

    def model(data: torch.Tensor) -> None:
        weights = pyro.param("weights", lambda: torch.tensor([0.5, 0.5]),
                             constraint=constraints.simplex)
        locs = pyro.param("locs", lambda: torch.tensor([-1.0, 1.0]))
        mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
        with pyro.plate("data", len(data)):
            h = pyro.sample("h", dist.Normal(0.0, 1.0))
            z = pyro.sample("z", dist.Categorical(weights), infer=ENUM)
            pyro.sample("obs", dist.Normal(mu + locs[z] + 0.5 * h, 1.0), obs=data)

    def guide(data: torch.Tensor) -> None:
        m = pyro.param("mu_loc", lambda: torch.tensor(0.2))
        s = pyro.param("mu_scale", lambda: torch.tensor(0.5), constraint=constraints.positive)
        pyro.sample("mu", dist.Normal(m, s))
        h_loc = pyro.param("h_loc", lambda: torch.zeros(len(data)))
        with pyro.plate("data", len(data)):
            pyro.sample("h", dist.Normal(h_loc, 0.7))

    return Case(model, guide, (gmm_data(),), 1)


BATTERY: dict[str, Callable[[], Case]] = {
    **{f"{kind}-{style}": (lambda kind=kind, style=style: hmm_case(kind, style))
       for kind in HMM_KINDS for style in ("param", "sample")},
    "gmm_params": gmm_params,
    "gmm_dirichlet": gmm_dirichlet,
    "gmm_2d": gmm_2d,
    "nested": nested,
    "nested_subsampled": nested_subsampled,
    "subsampled": subsampled,
    "scaled": scaled,
    "masked": masked,
    "model_enum_global": model_enum_global,
    "guide_enum_parallel": guide_enum_parallel,
    "guide_enum_sequential": guide_enum_sequential,
    "guide_enum_local": guide_enum_local,
    "score_function_global": score_function_global,
    "score_function_local": score_function_local,
    "reparam_continuous": reparam_continuous,
}


# ------------------------------------------------------------------------------------------------
# Running an ELBO


def params() -> dict[str, torch.Tensor]:
    """Every Pyro param, unconstrained (what the optimizer updates)."""
    return dict(pyro.get_param_store().named_parameters())


def loss_and_grad(elbo: Any, case: Case) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``differentiable_loss`` and its gradient w.r.t. every param (zero where unused)."""
    pyro.set_rng_seed(SEED)
    loss = elbo.differentiable_loss(case.model, case.guide, *case.args)
    ps = params()
    grads = torch.autograd.grad(loss, list(ps.values()), allow_unused=True)
    return loss.detach(), {n: torch.zeros_like(p) if g is None else g
                           for (n, p), g in zip(ps.items(), grads, strict=True)}


def accumulated_grads(elbo: Any, case: Case) -> tuple[float, dict[str, torch.Tensor]]:
    """``loss_and_grads``' float and the ``.grad`` it accumulates into every param."""
    ps = params()
    for p in ps.values():
        p.grad = None
    pyro.set_rng_seed(SEED)
    loss = elbo.loss_and_grads(case.model, case.guide, *case.args)
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in ps.items()}
    for p in ps.values():
        p.grad = None
    return loss, grads


def float_loss(elbo: Any, case: Case) -> float:
    pyro.set_rng_seed(SEED)
    return elbo.loss(case.model, case.guide, *case.args)


def assert_grads_close(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], what: str
                       ) -> None:
    assert ours.keys() == ref.keys()
    for name in ref:
        assert_close(ours[name], ref[name], f"{what}: gradient of {name!r}")


# ------------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("name", list(BATTERY))
def test_tve_elbo_matches_trace_enum_elbo(name: str) -> None:
    pyro.clear_param_store()
    case = BATTERY[name]()
    ref_elbo = TraceEnum_ELBO(max_plate_nesting=case.max_plate_nesting)
    ours_elbo = TVE_ELBO(max_plate_nesting=case.max_plate_nesting)

    ref_loss, ref_grads = loss_and_grad(ref_elbo, case)  # creates the params
    assert torch.isfinite(ref_loss)
    assert any(g.abs().sum() > 0 for g in ref_grads.values())
    ours_loss, ours_grads = loss_and_grad(ours_elbo, case)
    assert_close(ours_loss, ref_loss, "differentiable_loss")
    assert_grads_close(ours_grads, ref_grads, "differentiable_loss")

    ref_float = float_loss(ref_elbo, case)
    ours_float = float_loss(ours_elbo, case)
    assert isinstance(ours_float, float)
    assert_close(ours_float, ref_float, "loss")
    assert_close(ours_float, ref_loss, "loss vs differentiable_loss")

    ours_float2, ours_acc = accumulated_grads(ours_elbo, case)
    assert isinstance(ours_float2, float)
    assert_close(ours_float2, ref_float, "loss_and_grads (value)")
    assert_grads_close(ours_acc, ref_grads, "loss_and_grads (accumulated .grad)")


@pytest.mark.parametrize("style", ["param", "sample"])
@pytest.mark.parametrize("kind", HMM_KINDS)
def test_markov_plate_matches_markov_loop(kind: str, style: str) -> None:
    """The vectorized HMM (markov_plate) has the loss and gradients of the pyro.markov loop."""
    pyro.clear_param_store()
    globals_ = hmm_globals(kind)
    net = TonesNet() if kind == "nn" else None
    guide, data = map_guide(style, globals_), hmm_data()
    loop = Case(hmm_loop(kind, style, globals_, net), guide, data, 2)
    vec = Case(hmm_vectorized(kind, style, globals_, net), guide, data, 3)

    ref_loss, ref_grads = loss_and_grad(TraceEnum_ELBO(max_plate_nesting=2), loop)
    loop_loss, loop_grads = loss_and_grad(TVE_ELBO(max_plate_nesting=2), loop)
    vec_elbo = TVE_ELBO(max_plate_nesting=3)
    vec_loss, vec_grads = loss_and_grad(vec_elbo, vec)
    assert_close(loop_loss, ref_loss, "loop form vs TraceEnum_ELBO")
    assert_close(vec_loss, ref_loss, "markov_plate form vs TraceEnum_ELBO")
    assert_grads_close(loop_grads, ref_grads, "loop form vs TraceEnum_ELBO")
    assert_grads_close(vec_grads, ref_grads, "markov_plate form vs TraceEnum_ELBO")
    assert_close(float_loss(vec_elbo, vec), ref_loss, "markov_plate form, loss()")


def test_markov_plate_second_order_single_sequence() -> None:
    """A second-order chain in a markov_plate outside any other plate equals the loop form."""
    pyro.clear_param_store()
    probs0, locs0 = table("probs_x", K, K, K).init, torch.randn(K)
    data = torch.randn(T)

    def globals_() -> tuple[torch.Tensor, torch.Tensor]:
        return (pyro.param("probs_x", lambda: probs0.clone(), constraint=constraints.simplex),
                pyro.param("locs", lambda: locs0.clone()))

    def loop(data: torch.Tensor) -> None:
        probs_x, locs = globals_()
        x2: Any = 0
        x: Any = 0
        for t in pyro.markov(range(T), history=2):
            x2, x = x, pyro.sample(f"x_{t}", dist.Categorical(probs_x[x2, x]), infer=ENUM)
            pyro.sample(f"y_{t}", dist.Normal(locs[x], 1.0), obs=data[t])

    def vectorized(data: torch.Tensor) -> None:
        probs_x, locs = globals_()
        time = markov_plate("time", T, dim=-1, history=2)
        x_prev, x_prev2 = time.init("x", 0, size=K)
        with time:
            x = pyro.sample("x", dist.Categorical(probs_x[x_prev2, x_prev]), infer=ENUM)
            pyro.sample("y", dist.Normal(locs[x], 1.0), obs=data)

    ref_loss, ref_grads = loss_and_grad(TraceEnum_ELBO(max_plate_nesting=0),
                                        Case(loop, empty_guide, (data,), 0))
    vec_loss, vec_grads = loss_and_grad(TVE_ELBO(max_plate_nesting=1),
                                        Case(vectorized, empty_guide, (data,), 1))
    assert_close(vec_loss, ref_loss, "second-order markov_plate vs TraceEnum_ELBO")
    assert_grads_close(vec_grads, ref_grads, "second-order markov_plate vs TraceEnum_ELBO")


def test_markov_plate_hmm_lengths_matter() -> None:
    """Guard against a vacuous comparison: the mask by lengths changes the loss."""
    pyro.clear_param_store()
    case = hmm_case("hmm", "param", vectorized=True)
    seqs, lengths = case.args
    elbo = TVE_ELBO(max_plate_nesting=3)
    full = elbo.loss(case.model, case.guide, seqs, torch.full_like(lengths, T))
    short = elbo.loss(case.model, case.guide, seqs, lengths)
    assert not math.isclose(full, short, rel_tol=1e-3)


def test_svi_decreases_loss_and_follows_trace_enum() -> None:
    """SVI with TVE_ELBO trains a GMM: the loss drops, step by step as with TraceEnum_ELBO."""
    histories = []
    for elbo in (TVE_ELBO(max_plate_nesting=1), TraceEnum_ELBO(max_plate_nesting=1)):
        pyro.clear_param_store()
        torch.manual_seed(0)
        case = gmm_params()
        svi = SVI(case.model, case.guide, Adam({"lr": 0.1}), elbo)
        histories.append([svi.step(*case.args) for _ in range(15)])
    ours, ref = histories
    assert_close(torch.tensor(ours), torch.tensor(ref), "SVI loss history")
    assert ours[-1] < ours[0] - 1.0, ours
    assert min(ours[-5:]) < min(ours[:5]), ours


@pytest.mark.parametrize("factory", [reparam_continuous, score_function_global],
                         ids=["reparam", "score_function"])
def test_num_particles(factory: Callable[[], Case]) -> None:
    """num_particles=3 with a sampling guide: the same average as TraceEnum_ELBO's, particle by
    particle under the same seed, and not the one-particle value."""
    pyro.clear_param_store()
    case = factory()
    ref_loss, ref_grads = loss_and_grad(TraceEnum_ELBO(num_particles=3, max_plate_nesting=1), case)
    elbo = TVE_ELBO(num_particles=3, max_plate_nesting=1)
    ours_loss, ours_grads = loss_and_grad(elbo, case)
    assert_close(ours_loss, ref_loss, "differentiable_loss, 3 particles")
    assert_grads_close(ours_grads, ref_grads, "differentiable_loss, 3 particles")
    assert_close(float_loss(elbo, case), ref_loss, "loss, 3 particles")
    acc_loss, acc_grads = accumulated_grads(elbo, case)
    assert_close(acc_loss, ref_loss, "loss_and_grads, 3 particles")
    assert_grads_close(acc_grads, ref_grads, "loss_and_grads, 3 particles")
    # the particles are three successive one-particle runs of the same RNG stream, averaged
    pyro.set_rng_seed(SEED)
    one = TVE_ELBO(max_plate_nesting=1)
    singles = [one.loss(case.model, case.guide, *case.args) for _ in range(3)]
    assert_close(sum(singles) / 3, ref_loss, "mean of three one-particle losses")
    if factory is reparam_continuous:  # continuous samples: the particles differ
        assert not math.isclose(singles[0], float(ours_loss), rel_tol=1e-6)
