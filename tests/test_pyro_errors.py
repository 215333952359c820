"""Error paths of the Pyro front end: each error has the right type and names the Pyro site and/or
plate at fault (and, where there is one, says a way out).

Every model goes through both entry points, :class:`plated.pyro.TVE_ELBO` and
:func:`plated.pyro.posterior`. Where Pyro's ``TraceEnum_ELBO`` understands the model, it is checked
to reject it too, so that no error here refuses a model Pyro would answer; models it accepts
(markov_plate misuse: Pyro treats the plate as independent) are marked so.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO

import plated
import plated.pyro as pp
from plated import GraphError, IntractableError

E: Any = {"enumerate": "parallel"}
T = 3


@pytest.fixture(autouse=True)
def clean_param_store() -> Iterator[None]:
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def empty_guide(*args: Any, **kwargs: Any) -> None:
    return None


def p2() -> torch.Tensor:
    return torch.tensor([0.3, 0.7])


def locs() -> torch.Tensor:
    return torch.tensor([-1.0, 1.0])


def trans() -> torch.Tensor:
    return torch.tensor([[0.8, 0.2], [0.3, 0.7]])


def names(*parts: str) -> str:
    """A regex matching a message that mentions every part, in any order (DOTALL)."""
    return "(?s)" + "".join(f"(?=.*{re.escape(p)})" for p in parts)


def entry_points(model: Callable[..., None], guide: Callable[..., None] | None, nesting: int
                 ) -> list[tuple[str, Callable[[], Any]]]:
    """Every way in: the ELBO (loss and differentiable loss) and the posterior queries."""
    g = empty_guide if guide is None else guide

    def post(query: str) -> Callable[[], Any]:
        return lambda: getattr(pp.posterior(model, max_plate_nesting=nesting, guide=guide),
                               query)()

    return [
        ("loss", lambda: pp.TVE_ELBO(max_plate_nesting=nesting).loss(model, g)),
        ("differentiable_loss",
         lambda: pp.TVE_ELBO(max_plate_nesting=nesting).differentiable_loss(model, g)),
        ("loss_and_grads", lambda: pp.TVE_ELBO(max_plate_nesting=nesting).loss_and_grads(model, g)),
        ("log_likelihood", post("log_likelihood")),
        ("map", post("map")),
        ("sample", post("sample")),
        ("marginals", post("marginals")),
    ]


def check_all(exc: type[Exception], pattern: str, model: Callable[..., None],
              guide: Callable[..., None] | None = None, nesting: int = 1,
              pyro_rejects: bool = True) -> None:
    for where, fn in entry_points(model, guide, nesting):
        with pytest.raises(exc, match=pattern) as info:
            fn()
        assert info.type is exc or issubclass(info.type, exc), where
    if pyro_rejects:
        # Pyro's own TraceEnum_ELBO rejects the model too (with its own wording)
        with pytest.raises((ValueError, NotImplementedError)):
            TraceEnum_ELBO(max_plate_nesting=nesting).loss(
                model, empty_guide if guide is None else guide)


# ------------------------------------------------------------------------------------------------
# intractable


def intractable_model() -> None:
    """x inside plate i, y inside plate j, and a factor inside both that depends on both."""
    i = pyro.plate("i", 2, dim=-1)
    j = pyro.plate("j", 3, dim=-2)
    with i:
        x = pyro.sample("x", dist.Categorical(p2()), infer=E)
    with j:
        y = pyro.sample("y", dist.Categorical(p2()), infer=E)
    with i, j:
        pyro.sample("obs", dist.Normal(locs()[x] + locs()[y], 1.0), obs=torch.zeros(3, 2))


def test_intractable_names_sites_plates_and_ways_out() -> None:
    check_all(IntractableError, names("'x'", "'y'", "i", "j", "guide"), intractable_model,
              nesting=2)
    with pytest.raises(IntractableError) as info:
        pp.posterior(intractable_model, max_plate_nesting=2).log_likelihood()
    msg = str(info.value)
    assert re.search(r"\{i, j\}|\{j, i\}", msg), msg
    assert "ways out" in msg and "sequentialize the plate" in msg, msg
    # it is also a NotImplementedError, as Pyro raises in this case
    assert isinstance(info.value, NotImplementedError)


def test_intractable_with_a_global_site_too() -> None:
    """A global z above the non-nested pair does not hide the intractable coupling."""

    def model() -> None:
        z = pyro.sample("z", dist.Categorical(p2()), infer=E)
        i = pyro.plate("i", 2, dim=-1)
        j = pyro.plate("j", 2, dim=-2)
        probs = torch.stack([p2(), p2().flip(0)])
        with i:
            x = pyro.sample("x", dist.Categorical(probs[z]), infer=E)
        with j:
            y = pyro.sample("y", dist.Categorical(probs[z]), infer=E)
        with i, j:
            pyro.sample("obs", dist.Bernoulli(logits=locs()[x] * locs()[y]),
                        obs=torch.ones(2, 2))

    check_all(IntractableError, names("'x'", "'y'"), model, nesting=2)


# ------------------------------------------------------------------------------------------------
# site annotations


def test_enumerate_on_a_continuous_site_names_the_site() -> None:
    def model() -> None:
        x = pyro.sample("cont_x", dist.Normal(0.0, 1.0), infer=E)
        pyro.sample("obs", dist.Normal(x, 1.0), obs=torch.tensor(0.0))

    check_all(GraphError, names("'cont_x'", "Normal", "enumerable support"), model)


def test_num_samples_in_the_model_warns_as_pyro() -> None:
    """Multiple sampling of a model site is answered (biased, as in Pyro), with Pyro's warning;
    posterior queries refuse it (their values are a site's support)."""
    def model() -> None:
        z = pyro.sample("zz", dist.Categorical(p2()),
                        infer={"enumerate": "parallel", "num_samples": 3})
        pyro.sample("obs", dist.Normal(locs()[z], 1.0), obs=torch.tensor(0.0))

    with pytest.warns(RuntimeWarning, match="Site zz is multiply sampled in model"):
        pp.TVE_ELBO(max_plate_nesting=0).loss(model, empty_guide)
    with pytest.raises(NotImplementedError, match=names("'zz'", "num_samples")), \
            pytest.warns(RuntimeWarning, match="multiply sampled"):
        pp.posterior(model, max_plate_nesting=0).marginals()


# ------------------------------------------------------------------------------------------------
# max_plate_nesting


def two_plates() -> None:
    with pyro.plate("outer", 2, dim=-1), pyro.plate("inner", 3, dim=-2):
        x = pyro.sample("x", dist.Categorical(p2()), infer=E)
        pyro.sample("obs", dist.Normal(locs()[x], 1.0), obs=torch.zeros(3, 2))


def test_missing_max_plate_nesting() -> None:
    """TVE_ELBO guesses it as Pyro does; posterior() needs it."""
    for elbo in (pp.TVE_ELBO(), pp.TVE_ELBO(max_plate_nesting=None)):
        elbo.loss(two_plates, empty_guide)
        assert elbo.max_plate_nesting == 2
    with pytest.raises(GraphError, match="max_plate_nesting is missing"):
        pp.posterior(two_plates, max_plate_nesting=None)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [-1, 1.5, "2"])
def test_invalid_max_plate_nesting(bad: Any) -> None:
    with pytest.raises(GraphError, match=re.escape(repr(bad))):
        pp.TVE_ELBO(max_plate_nesting=bad).loss(two_plates, empty_guide)
    with pytest.raises(GraphError, match=re.escape(repr(bad))):
        pp.posterior(two_plates, max_plate_nesting=bad)


def test_max_plate_nesting_too_small_names_plate_and_needed_value() -> None:
    check_all(GraphError, names("'inner'", "dim -2", "max_plate_nesting=1",
                                "max_plate_nesting=2"), two_plates, nesting=1)
    # enough nesting: it works
    assert torch.isfinite(pp.posterior(two_plates, max_plate_nesting=2).log_likelihood())


# ------------------------------------------------------------------------------------------------
# enumeration dim conflicts


def test_undeclared_batch_dim_of_an_enumerated_site() -> None:
    def model() -> None:
        x = pyro.sample("batchy", dist.Categorical(torch.ones(3, 2) / 2), infer=E)
        pyro.sample("obs", dist.Normal(locs()[x], 1.0).to_event(1), obs=torch.zeros(3))

    check_all(GraphError, names("'batchy'", "(2, 3)", "enumeration dim conflict", "pyro.plate"),
              model, nesting=1)


def test_undeclared_batch_dim_of_an_observed_site() -> None:
    def model() -> None:
        x = pyro.sample("x", dist.Categorical(p2()), infer=E)
        pyro.sample("obs_y", dist.Normal(locs()[x], torch.ones(3)), obs=torch.zeros(3))

    check_all(GraphError, names("'obs_y'", "enumeration dim conflict"), model, nesting=1)


def test_undeclared_batch_dim_inside_the_plate_dims_is_called_a_plate_dim() -> None:
    """With max_plate_nesting=2, dim -2 is a plate dim (enumeration starts at -3): the message
    should say so rather than call it an enumeration dim."""

    def model() -> None:
        with pyro.plate("i", 2, dim=-1):
            pyro.sample("x", dist.Categorical(torch.ones(3, 2, 2) / 2), infer=E)

    check_all(GraphError, names("'x'", "dim -2", "a plate dim"), model, nesting=2)


# ------------------------------------------------------------------------------------------------
# guide enumeration


def test_guide_enumerates_a_site_the_model_lacks() -> None:
    def model() -> None:
        z = pyro.sample("z", dist.Categorical(p2()), infer=E)
        pyro.sample("obs", dist.Normal(locs()[z], 1.0), obs=torch.tensor(0.0))

    def guide() -> None:
        pyro.sample("ghost", dist.Categorical(p2()), infer=E)

    with warnings.catch_warnings():
        # Pyro's validation warns about the same mistake (as an error under this suite's
        # policy); silence only that warning to reach ours
        warnings.filterwarnings("ignore", "Found non-auxiliary vars in guide but not model",
                                UserWarning)
        for elbo in (pp.TVE_ELBO(max_plate_nesting=0),):
            with pytest.raises(GraphError, match=names("'ghost'", "model has no site")):
                elbo.loss(model, guide)
            with pytest.raises(GraphError, match=names("'ghost'", "model has no site")):
                elbo.differentiable_loss(model, guide)
        with pytest.raises(GraphError, match=names("'ghost'", "model has no site")):
            pp.posterior(model, max_plate_nesting=0, guide=guide)
        # (Pyro's TraceEnum_ELBO silently ignores the guide site)
        TraceEnum_ELBO(max_plate_nesting=0).loss(model, guide)


def test_guide_enumeration_inside_a_plate_below_model_enumeration() -> None:
    def model() -> None:
        z = pyro.sample("zg", dist.Categorical(p2()), infer=E)
        with pyro.plate("iplate", 2):
            probs = torch.stack([p2(), p2().flip(0)])
            w = pyro.sample("w", dist.Categorical(probs[z]))
            pyro.sample("obs", dist.Normal(locs()[w], 1.0), obs=torch.zeros(2))

    def guide() -> None:
        with pyro.plate("iplate", 2):
            pyro.sample("w", dist.Categorical(p2()), infer=E)

    pattern = names("'w'", "'iplate'", "'zg'", "no more global")
    for elbo in (pp.TVE_ELBO(max_plate_nesting=1),):
        with pytest.raises(GraphError, match=pattern):
            elbo.loss(model, guide)
        with pytest.raises(GraphError, match=pattern):
            elbo.differentiable_loss(model, guide)
    with pytest.raises(GraphError, match=pattern):
        pp.posterior(model, max_plate_nesting=1, guide=guide)
    with pytest.raises(ValueError, match="no more global"):
        TraceEnum_ELBO(max_plate_nesting=1).loss(model, guide)


def test_posterior_refuses_guide_enumeration() -> None:
    def model() -> None:
        w = pyro.sample("w", dist.Categorical(p2()))
        z = pyro.sample("z", dist.Categorical(p2()), infer=E)
        pyro.sample("obs", dist.Normal(locs()[z] + w, 1.0), obs=torch.tensor(0.0))

    def parallel() -> None:
        pyro.sample("w", dist.Categorical(p2()), infer={"enumerate": "parallel"})

    def sequential() -> None:
        pyro.sample("w", dist.Categorical(p2()), infer={"enumerate": "sequential"})

    with pytest.raises(NotImplementedError, match=names("guide enumeration", "'w'")):
        pp.posterior(model, max_plate_nesting=0, guide=parallel)
    with pytest.raises(NotImplementedError, match="sequential guide enumeration"):
        pp.posterior(model, max_plate_nesting=0, guide=sequential)
    # the ELBO does support both, with Pyro's value
    ref = TraceEnum_ELBO(max_plate_nesting=0).loss(model, parallel)
    for guide in (parallel, sequential):
        assert abs(pp.TVE_ELBO(max_plate_nesting=0).loss(model, guide) - ref) < 1e-8


# ------------------------------------------------------------------------------------------------
# scales


def test_different_scales_on_enumerated_sites_name_both() -> None:
    def model() -> None:
        with poutine.scale(scale=2.0):
            z = pyro.sample("zs", dist.Categorical(p2()), infer=E)
        with poutine.scale(scale=0.5):
            pyro.sample("obs_s", dist.Normal(locs()[z], 1.0), obs=torch.tensor(0.0))

    check_all(GraphError, names("'zs'", "'obs_s'", "2.0", "0.5", "poutine.scale"), model,
              nesting=0)


def test_tensor_scale_on_enumerated_site() -> None:
    def model() -> None:
        with poutine.scale(scale=torch.tensor([1.0, 2.0])), pyro.plate("i", 2):
            z = pyro.sample("zt", dist.Categorical(p2()), infer=E)
            pyro.sample("obs", dist.Normal(locs()[z], 1.0), obs=torch.zeros(2))

    check_all(GraphError, names("'zt'", "tensor poutine.scale", "(2,)"), model)


def test_common_scale_is_fine() -> None:
    def model() -> None:
        with poutine.scale(scale=0.5):
            z = pyro.sample("z", dist.Categorical(p2()), infer=E)
            pyro.sample("obs", dist.Normal(locs()[z], 1.0), obs=torch.tensor(0.0))

    ref = TraceEnum_ELBO(max_plate_nesting=0).loss(model, empty_guide)
    assert abs(pp.TVE_ELBO(max_plate_nesting=0).loss(model, empty_guide) - ref) < 1e-8


# ------------------------------------------------------------------------------------------------
# markov_plate misuse (Pyro's TraceEnum_ELBO treats a markov_plate as an independent plate, so
# it raises nothing where the chain is malformed: pyro_rejects=False)


def test_markov_init_inside_the_plate() -> None:
    def model() -> None:
        time = pp.markov_plate("time", T, dim=-1)
        with time:
            time.init("x", 0, size=2)

    check_all(GraphError, names("'time'", "init('x'", "before entering the plate"), model,
              pyro_rejects=False)
    with pytest.raises(GraphError, match="before entering"):  # raised by the construct itself
        pyro.clear_param_store()
        with poutine.trace():
            model()


def test_markov_chain_site_never_sampled() -> None:
    def model() -> None:
        time = pp.markov_plate("time", T, dim=-1)
        x_prev = time.init("x", 0, size=2)
        with time:
            z = pyro.sample("z", dist.Categorical(trans()[x_prev]), infer=E)
            pyro.sample("obs", dist.Normal(locs()[z], 1.0), obs=torch.zeros(T))

    check_all(GraphError, names("'time'", "chain site 'x'", "never sampled"), model,
              pyro_rejects=False)


def test_markov_chain_site_given_a_guide() -> None:
    def model() -> None:
        time = pp.markov_plate("time", T, dim=-1)
        x_prev = time.init("x", 0, size=2)
        with time:
            x = pyro.sample("x", dist.Categorical(trans()[x_prev]), infer=E)
            pyro.sample("obs", dist.Normal(locs()[x], 1.0), obs=torch.zeros(T))

    def guide() -> None:
        with pyro.plate("time", T, dim=-1):
            pyro.sample("x", dist.Categorical(torch.ones(2) / 2))

    check_all(GraphError, names("'time'", "chain site 'x'", "enumerated in the model"), model,
              guide, pyro_rejects=False)


def test_markov_initial_site_given_a_guide() -> None:
    """The code has a dedicated message for this; it should name the initial site."""

    def model() -> None:
        time = pp.markov_plate("time", T, dim=-1)
        x_prev = time.init("x", dist.Categorical(p2()).mask(True))
        with time:
            x = pyro.sample("x", dist.Categorical(trans()[x_prev]), infer=E)
            pyro.sample("obs", dist.Normal(locs()[x], 1.0), obs=torch.zeros(T))

    def guide() -> None:
        pyro.sample("x_prev", dist.Categorical(p2()))

    check_all(GraphError, names("'time'", "'x_prev'", "'x'"), model, guide, pyro_rejects=False)


def test_markov_chain_site_sampled_outside_the_plate() -> None:
    def model() -> None:
        time = pp.markov_plate("time", T, dim=-1)
        x_prev = time.init("x", 0, size=2)
        x = pyro.sample("x", dist.Categorical(trans()[x_prev]), infer=E)
        with time:
            pyro.sample("obs", dist.Normal(locs()[x], 1.0), obs=torch.zeros(T))

    check_all(GraphError, names("'time'", "chain site 'x'", "outside the plate"), model,
              pyro_rejects=False)


def test_markov_plate_without_a_chain() -> None:
    def model() -> None:
        with pp.markov_plate("time", T, dim=-1):
            x = pyro.sample("x", dist.Categorical(p2()), infer=E)
            pyro.sample("obs", dist.Normal(locs()[x], 1.0), obs=torch.zeros(T))

    check_all(GraphError, names("'time'", "has no chain", "init("), model, pyro_rejects=False)


@pytest.mark.parametrize("initial,size", [(5, 2), (2, 2), (-1, 2), (0, None)])
def test_markov_fixed_initial_state_out_of_range(initial: int, size: int | None) -> None:
    def model() -> None:
        time = pp.markov_plate("time", T, dim=-1)
        x_prev = time.init("x", initial, size=size)
        with time:
            pyro.sample("x", dist.Categorical(trans()[x_prev]), infer=E)

    check_all(GraphError, names("'time'", "chain 'x'", f"initial={initial}", f"size={size}"),
              model, pyro_rejects=False)


def test_markov_initial_distribution_without_enumerable_support() -> None:
    def model() -> None:
        time = pp.markov_plate("time", T, dim=-1)
        time.init("x", dist.Normal(0.0, 1.0))

    check_all(GraphError, names("'time'", "chain 'x'", "Normal", "no enumerable support"), model,
              pyro_rejects=False)


def test_markov_history_below_one() -> None:
    with pytest.raises(GraphError, match=names("'time'", "history", "got 0")):
        pp.markov_plate("time", T, dim=-1, history=0)


# ------------------------------------------------------------------------------------------------
# other arguments


def test_nothing_enumerated_warns() -> None:
    def model() -> None:
        pyro.sample("obs", dist.Normal(0.0, 1.0), obs=torch.tensor(0.0))

    with pytest.warns(UserWarning, match="found no sample sites configured for enumeration"):
        loss = pp.TVE_ELBO(max_plate_nesting=0).loss(model, empty_guide)
    assert abs(loss + float(dist.Normal(0.0, 1.0).log_prob(torch.tensor(0.0)))) < 1e-12
    # no warning when asked not to
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pp.TVE_ELBO(max_plate_nesting=0, strict_enumeration_warning=False).loss(model, empty_guide)


def test_errors_are_plated_errors() -> None:
    assert issubclass(GraphError, plated.PlatedError) and issubclass(GraphError, ValueError)
    assert issubclass(IntractableError, plated.PlatedError)
    assert issubclass(IntractableError, NotImplementedError)
