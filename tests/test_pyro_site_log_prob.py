"""A model site's log-probability in ``plated.pyro.trace``: the shortcut for a ``Bernoulli``
whose parameter Pyro's plates broadcast is ``Bernoulli.log_prob``, to rounding.

The shortcut takes ``log p`` and ``log(1 - p)`` of the compact parameter (one per distinct
probability) instead of the logits of the broadcast one. Both it and ``Bernoulli.log_prob`` are
compared with ``Bernoulli.log_prob`` in float64 on the same inputs, values and gradients: the
shortcut must be about as accurate. Sites come from real ``pyro.plate`` traces, so that the
broadcast is Pyro's own.
"""

from __future__ import annotations

from typing import Any

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from plated.pyro.trace import _broadcast_bernoulli, _log_prob


def _site(param: torch.Tensor, value: torch.Tensor, sizes: tuple[int, ...], logits: bool,
          validate: bool = False) -> dict[str, Any]:
    """The traced site ``y`` of ``Bernoulli(param)`` observed at ``value`` under plates of
    ``sizes`` (rightmost dims)."""

    def model() -> None:
        plates = [pyro.plate(f"p{i}", n, dim=i - len(sizes)) for i, n in enumerate(sizes)]
        for p in plates:
            p.__enter__()
        try:
            kw = {"logits": param} if logits else {"probs": param}
            pyro.sample("y", dist.Bernoulli(validate_args=validate, **kw), obs=value)
        finally:
            for p in reversed(plates):
                p.__exit__(None, None, None)

    return poutine.trace(model).get_trace().nodes["y"]


CASES = [
    # (parameter shape, value shape, plate sizes)
    ((16, 1, 88), (229, 88), (229, 88)),      # an enumerated parent, sequences x keys
    ((3, 1, 5), (4, 5), (4, 5)),
    ((2, 1, 1, 6), (1, 7, 6), (7, 6)),        # the value broadcast too
    ((1, 5), (3, 5), (3, 5)),
    ((4, 1), (4, 9), (4, 9)),
]


def _errors(got: torch.Tensor, want: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    return ((got.double() - ref).abs().max().item(), (want.double() - ref).abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("logits", [False, True])
@pytest.mark.parametrize("shapes", CASES)
def test_broadcast_bernoulli_matches_log_prob(shapes: tuple[tuple[int, ...], ...],
                                              logits: bool, dtype: torch.dtype) -> None:
    pshape, vshape, sizes = shapes
    g = torch.Generator().manual_seed(sum(pshape) + len(vshape))
    # logits of either sign up to about 12, probabilities from about 1e-5 to 1 - 1e-5; and the
    # cross-entropy's soft targets, values strictly between 0 and 1, in the last case
    raw = torch.randn(pshape, generator=g, dtype=torch.float64) * 4
    base = (raw if logits else torch.sigmoid(raw)).to(dtype).requires_grad_()
    value = torch.bernoulli(torch.full(vshape, 0.3, dtype=torch.float64), generator=g)
    if pshape == (4, 1):
        value = torch.rand(vshape, generator=g, dtype=torch.float64)
    value = value.to(dtype)
    site = _site(base, value, sizes, logits)
    fn = site["fn"]
    assert tuple(fn.batch_shape) != pshape  # Pyro's plates broadcast the parameter

    got = _broadcast_bernoulli(site)
    assert got is not None
    assert "logits" not in fn.__dict__ or logits  # the broadcast logits were never taken
    want = fn.log_prob(value)
    assert got.shape == want.shape and got.dtype == want.dtype

    base64 = base.detach().double().requires_grad_()
    ref = _site(base64, value.double(), sizes, logits)["fn"].log_prob(value.double())
    eps = torch.finfo(dtype).eps
    err_got, err_want = _errors(got, want, ref.detach())
    assert err_got <= 4 * err_want + 8 * eps * ref.abs().max().item(), (err_got, err_want)

    w64 = torch.randn(want.shape, generator=g, dtype=torch.float64)
    (g_got,) = torch.autograd.grad((got * w64.to(dtype)).sum(), (base,))
    (g_want,) = torch.autograd.grad((want * w64.to(dtype)).sum(), (base,))
    (g_ref,) = torch.autograd.grad((ref * w64).sum(), (base64,))
    err_got, err_want = _errors(g_got, g_want, g_ref)
    floor = 100 * eps * g_ref.abs().max().item()  # the broadcast dims summed in another order
    assert err_got <= 4 * err_want + floor, (err_got, err_want, floor)


def test_peaked_logits_keep_their_relative_precision() -> None:
    """At logits of +-30 in float64 the log-probability of the likely value is about -1e-13;
    the log-sigmoid gives it to a few ulps, where the cross-entropy's ``log(1 + exp(-30))``
    rounds it to about 2e-3 relative."""
    x = torch.tensor([[30.0], [-30.0]], dtype=torch.float64)  # (2 states, 1, ) x 1 key
    value = torch.tensor([[1.0], [0.0], [1.0]], dtype=torch.float64)  # 3 sequences, 1 key
    site = _site(x.unsqueeze(1), value, (3, 1), logits=True)
    got = _broadcast_bernoulli(site)
    assert got is not None
    exact = -torch.log1p(torch.exp(torch.tensor(-30.0, dtype=torch.float64)))
    # state 0 (x = 30): values 1, 0, 1; state 1 (x = -30): the likely value is 0
    assert torch.allclose(got[0, 0, 0], exact, rtol=1e-14, atol=0)
    assert torch.allclose(got[1, 1, 0], exact, rtol=1e-14, atol=0)
    assert torch.isfinite(got).all()


def test_log_prob_takes_the_shortcut_and_caches_it() -> None:
    probs = torch.rand(5, 1, 8, dtype=torch.float64).clamp(0.05, 0.95)
    value = torch.bernoulli(torch.full((6, 8), 0.5, dtype=torch.float64))
    site = _site(probs, value, (6, 8), logits=False)
    lp = _log_prob(site)
    assert "logits" not in site["fn"].__dict__  # log_prob would have taken them (5 x 6 x 8)
    assert site["unscaled_log_prob"] is lp
    torch.testing.assert_close(lp, site["fn"].log_prob(value), rtol=1e-12, atol=1e-12)


def test_nothing_broadcast_falls_back_and_validation_still_checks() -> None:
    probs = torch.rand(3, 4, dtype=torch.float64)
    value = torch.bernoulli(torch.full((3, 4), 0.5, dtype=torch.float64))
    assert _broadcast_bernoulli(_site(probs, value, (3, 4), logits=False)) is None
    # a distribution that validates its arguments rejects a value outside {0, 1}, as log_prob
    # does, and takes the shortcut for a valid one
    probs = torch.rand(5, 1, 4, dtype=torch.float64)
    site = _site(probs, torch.full((3, 4), 2.0, dtype=torch.float64), (3, 4), logits=False,
                 validate=True)
    with pytest.raises(ValueError, match="support"):
        _log_prob(site)
    site = _site(probs, value, (3, 4), logits=False, validate=True)
    got = _broadcast_bernoulli(site)
    assert got is not None
    torch.testing.assert_close(got, site["fn"].log_prob(value), rtol=1e-12, atol=1e-12)
