"""The factorial chain: a sequential plate whose state is several variables, its transition the
broadcast sum of parts of which none spans every previous and current variable (a factorial
HMM's two transitions and its emission; a partially factorial HMM; a second-order HMM's
transition and the identity that ties its two state variables), eliminated by
:func:`plated.recursion.factorial_chain` one part at a time, without forming the
``(batch, T, K, K)`` joint transition (:attr:`plated.plan.Plan.fused`). Against brute force
(log Z, every gradient, marginals, MAP), the unfused recursion at a length brute force cannot
reach, peaks apart in float64, float32 and bfloat16 (the exact fallback), hard zeros, and
second derivatives.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assignment_rows
from torch.testing import assert_close

from plated import Factor, Plate, PlatedFactorGraph, naive
from plated import markov as markov_module
from plated import recursion as recursion_module

Model = tuple[list[Factor], list[Plate]]


class Calls:
    """Counts the calls of :func:`plated.markov.factorial_chain` (the factorial path taken)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.n = 0
        inner = markov_module.factorial_chain

        def counted(*args: object, **kwargs: object) -> torch.Tensor:
            self.n += 1
            return inner(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(markov_module, "factorial_chain", counted)


class Counted:
    """Counts the calls of ``module.name``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> None:
        self.n = 0
        inner = getattr(module, name)

        def counted(*args: object, **kwargs: object) -> object:
            self.n += 1
            return inner(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)


def _randn(gen: torch.Generator, scale: float, *shape: int) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=gen, dtype=torch.float64)


def fhmm(S: int, T: int, K1: int, K2: int, seed: int, scale: float = 1.0,
         partial: bool = False) -> Model:
    """Two chains ``w`` and ``x``: init factors, ``w``'s transition, ``x``'s transition (given
    ``w`` too with ``partial``, the partially factorial HMM) and an emission over ``(w, x)``."""
    gen = torch.Generator().manual_seed(seed)
    x_trans = (Factor(_randn(gen, scale, S, T, K1, K2, K2), ("s", "t", "w", "x_prev", "x"))
               if partial else
               Factor(_randn(gen, scale, K2, K2).expand(S, T, K2, K2), ("s", "t", "x_prev", "x")))
    factors = [Factor(_randn(gen, scale, S, K1), ("s", "w_prev")),
               Factor(_randn(gen, scale, S, K2), ("s", "x_prev")),
               Factor(_randn(gen, scale, S, T, K1, K1), ("s", "t", "w_prev", "w")),
               x_trans,
               Factor(_randn(gen, scale, S, T, K1, K2), ("s", "t", "w", "x"))]
    return factors, [Plate("s", S),
                     Plate("t", T, sequential=True, prev={"w": "w_prev", "x": "x_prev"})]


def second_order(S: int, T: int, K: int, seed: int) -> Model:
    """A second-order HMM as a chain over the pair ``(y, x) = (x_{t-1}, x_t)``: the transition
    ``p(x_t | x_{t-2}, x_{t-1})`` over ``(y_prev, x_prev, x)``, the identity ``y = x_prev``
    (0 on the diagonal, -inf off it: hard zeros) and an emission over ``x``."""
    gen = torch.Generator().manual_seed(seed)
    eye = torch.full((K, K), -math.inf, dtype=torch.float64).fill_diagonal_(0.0)
    factors = [Factor(_randn(gen, 1.0, S, K, K), ("s", "y_prev", "x_prev")),
               Factor(_randn(gen, 1.0, S, T, K, K, K), ("s", "t", "y_prev", "x_prev", "x")),
               Factor(eye.expand(S, T, K, K), ("s", "t", "x_prev", "y")),
               Factor(_randn(gen, 1.0, S, T, K), ("s", "t", "x"))]
    return factors, [Plate("s", S),
                     Plate("t", T, sequential=True, prev={"y": "y_prev", "x": "x_prev"})]


def leaves(factors: list[Factor]) -> list[torch.Tensor]:
    return [f.tensor.detach().clone().requires_grad_() for f in factors]


def graph(factors: list[Factor], tensors: list[torch.Tensor], plates: list[Plate]
          ) -> PlatedFactorGraph:
    return PlatedFactorGraph([Factor(t, f.dims) for t, f in zip(tensors, factors, strict=True)],
                             plates)


MODELS = {
    "fhmm": lambda seed: fhmm(2, 3, 2, 2, seed),
    "fhmm-uneven": lambda seed: fhmm(1, 3, 2, 3, seed),
    "pfhmm": lambda seed: fhmm(2, 3, 2, 2, seed, partial=True),
    "second-order": lambda seed: second_order(2, 3, 2, seed),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("seed", range(3))
def test_factorial_chain_vs_brute_force(monkeypatch: pytest.MonkeyPatch, name: str,
                                        seed: int) -> None:
    """log Z, the gradient of every factor, the marginals and the MAP of small factorial
    chains equal brute force's; the plan fuses both pair steps and the factorial path runs."""
    factors, plates = MODELS[name](seed)
    calls = Calls(monkeypatch)
    g = PlatedFactorGraph(factors, plates)
    plan = g.plan("log")
    assert len(plan.fused) == 2 and "no part spans them all" in str(g.cost())
    ours = leaves(factors)
    z = graph(factors, ours, plates).log_partition()
    assert calls.n == 1
    ref_in = leaves(factors)
    ref = naive.log_partition([Factor(t, f.dims) for t, f in zip(ref_in, factors, strict=True)],
                              plates)
    assert torch.isfinite(ref)
    assert_close(z, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(z, ours), torch.autograd.grad(ref, ref_in),
                    strict=True):
        assert not a.isnan().any()
        assert_close(a, b, rtol=0, atol=1e-12)
    for v, m in naive.marginals(factors, plates).items():
        assert_close(g.marginals()[v], m, rtol=0, atol=1e-12, msg=v)
    en = naive.enumerate_joint(factors, plates)
    row = assignment_rows(en, {v: x.unsqueeze(0) for v, x in g.map().items()})
    assert_close(en.log_joint[row].max(), en.log_joint.max(), rtol=1e-12, atol=1e-12)


def test_factorial_equals_unfused_at_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    """Too long for brute force (T = 150, 4 x 3 states, 5 sequences): the factorial path and
    the plan without fusion (the dense recursion over the 12 joint states) agree, log Z and
    every gradient."""
    factors, plates = fhmm(5, 150, 4, 3, seed=4, partial=True)
    calls = Calls(monkeypatch)
    ours = leaves(factors)
    z = graph(factors, ours, plates).log_partition()
    assert calls.n == 1
    # the joint transition as one factor: nothing to fuse, the dense recursion
    # along (s, t, w_prev, x_prev, w, x)
    joint = (factors[2].tensor[:, :, :, None, :, None]
             + factors[3].tensor.permute(0, 1, 3, 2, 4)[:, :, None]  # (s, t, w, x_prev, x)
             + factors[4].tensor[:, :, None, None])
    dense_in = [factors[0].tensor.clone().requires_grad_(),
                factors[1].tensor.clone().requires_grad_(), joint.clone().requires_grad_()]
    dense = PlatedFactorGraph(
        [Factor(dense_in[0], ("s", "w_prev")), Factor(dense_in[1], ("s", "x_prev")),
         Factor(dense_in[2], ("s", "t", "w_prev", "x_prev", "w", "x"))], plates)
    assert not dense.plan("log").fused
    ref = dense.log_partition()
    assert calls.n == 1
    assert_close(z, ref, rtol=1e-12, atol=1e-9)
    g_ours = torch.autograd.grad(z, ours)
    g_dense = torch.autograd.grad(ref, dense_in)
    assert_close(g_ours[0], g_dense[0], rtol=0, atol=1e-10)
    assert_close(g_ours[1], g_dense[1], rtol=0, atol=1e-10)
    gj = g_dense[2]  # the joint's gradient is the pairwise marginal; each part's is its sum
    assert_close(g_ours[2], gj.sum(dim=(-3, -1)), rtol=0, atol=1e-10)
    assert_close(g_ours[3], gj.sum(dim=-4).permute(0, 1, 3, 2, 4), rtol=0, atol=1e-10)
    assert_close(g_ours[4], gj.sum(dim=(-4, -3)), rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype,gap,tol", [(torch.float64, 2000.0, 1e-12),
                                           (torch.float32, 300.0, 2e-5),
                                           (torch.bfloat16, 150.0, 3e-2)])
def test_peaks_apart_fall_back_to_the_exact_recursion(monkeypatch: pytest.MonkeyPatch,
                                                      dtype: torch.dtype, gap: float,
                                                      tol: float) -> None:
    """Parts whose peaks sit apart by ``gap`` (every shifted product underflows in one
    sequence): log Z and the gradients are finite and equal the float64 brute force (the
    flagged sequence is recomputed exactly; the other keeps the fast path)."""
    factors, plates = fhmm(2, 3, 2, 2, seed=7)
    w_trans = factors[2].tensor.clone()
    w_trans[0, :, 0, 1] += gap  # sequence 0: w's transition wants 0 -> 1 ...
    emit = factors[4].tensor.clone()
    emit[0, :, 1, :] -= gap  # ... and the emission forbids w = 1 by as much
    emit[0, :, 0, :] += gap / 2
    factors = [factors[0], factors[1], Factor(w_trans, factors[2].dims), factors[3],
               Factor(emit, factors[4].dims)]
    calls = Calls(monkeypatch)
    exact = Counted(monkeypatch, recursion_module, "exact_messages")
    ours = [f.tensor.detach().to(dtype).requires_grad_() for f in factors]
    z = graph(factors, ours, plates).log_partition()
    assert calls.n == 1
    ref_in = [f.tensor.detach().to(dtype).double().requires_grad_() for f in factors]
    ref = naive.log_partition([Factor(t, f.dims) for t, f in zip(ref_in, factors, strict=True)],
                              plates)
    assert torch.isfinite(z)
    assert exact.n == 1  # the one flagged sequence, recomputed exactly
    assert abs(z.item() - ref.item()) <= tol * (1 + abs(ref.item()))
    for a, b in zip(torch.autograd.grad(z, ours), torch.autograd.grad(ref, ref_in),
                    strict=True):
        assert not a.isnan().any()
        assert_close(a.double(), b, rtol=0, atol=tol * 10)


def test_second_derivatives_through_the_factorial_path(monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    """The Hessian of log Z with respect to the emission, through the factorial path, equals
    brute force's."""
    factors, plates = fhmm(1, 3, 2, 2, seed=3)
    calls = Calls(monkeypatch)

    def ours(e: torch.Tensor) -> torch.Tensor:
        return PlatedFactorGraph(factors[:4] + [Factor(e, factors[4].dims)], plates
                                 ).log_partition()

    def ref(e: torch.Tensor) -> torch.Tensor:
        return naive.log_partition(factors[:4] + [Factor(e, factors[4].dims)], plates)

    e = factors[4].tensor.clone()
    h = torch.autograd.functional.hessian(ours, e)
    assert calls.n > 0
    h_ref = torch.autograd.functional.hessian(ref, e)
    assert h.abs().max() > 1e-3
    assert_close(h, h_ref, rtol=0, atol=1e-10)


def test_a_part_over_every_state_variable_is_not_factorial(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """Where one part spans every previous and current variable there is nothing to factor:
    the chain sums the parts and runs the dense recursion, with the same answer."""
    factors, plates = fhmm(2, 3, 2, 2, seed=5)
    gen = torch.Generator().manual_seed(0)
    full = Factor(torch.randn(2, 3, 2, 2, 2, 2, generator=gen, dtype=torch.float64),
                  ("s", "t", "w_prev", "x_prev", "w", "x"))
    calls = Calls(monkeypatch)
    z = PlatedFactorGraph(factors + [full], plates).log_partition()
    assert calls.n == 0
    assert_close(z, naive.log_partition(factors + [full], plates), rtol=1e-12, atol=1e-12)


def test_parts_broadcast_over_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every part a stride-0 view along the sequence plate (the same chain in every sequence,
    as a model with no per-sequence data hands it over): the factorial path runs on one batch
    element and broadcasts the result; log Z and the gradients equal brute force's."""
    one, plates = fhmm(1, 3, 2, 2, seed=6)
    factors = [Factor(f.tensor.expand(2, *f.tensor.shape[1:]), f.dims) for f in one]
    plates = [Plate("s", 2), plates[1]]
    calls = Calls(monkeypatch)
    base = [f.tensor.detach()[:1].clone().requires_grad_() for f in one]
    z = PlatedFactorGraph([Factor(b.expand(2, *b.shape[1:]), f.dims)
                           for b, f in zip(base, factors, strict=True)], plates).log_partition()
    assert calls.n == 1
    ref_in = [f.tensor.detach()[:1].clone().requires_grad_() for f in one]
    ref = naive.log_partition([Factor(b.expand(2, *b.shape[1:]), f.dims)
                               for b, f in zip(ref_in, factors, strict=True)], plates)
    assert_close(z, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(z, base), torch.autograd.grad(ref, ref_in),
                    strict=True):
        assert_close(a, b, rtol=0, atol=1e-12)


def test_every_part_shared_by_all_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """A homogeneous factorial chain: every part a stride-0 view along the time plate (one
    step's factors repeated), so no part shows the chain's length; the factorial path still
    runs all T steps and equals brute force."""
    one, plates = fhmm(2, 1, 2, 2, seed=2)
    T = 4
    factors = [f if "t" not in f.dims else
               Factor(f.tensor.expand(f.tensor.shape[0], T, *f.tensor.shape[2:]), f.dims)
               for f in one]
    plates = [plates[0], Plate("t", T, sequential=True, prev={"w": "w_prev", "x": "x_prev"})]
    calls = Calls(monkeypatch)
    z = PlatedFactorGraph(factors, plates).log_partition()
    assert calls.n == 1
    assert_close(z, naive.log_partition(factors, plates), rtol=1e-12, atol=1e-12)
