"""The chain whose transition is a shared ``(K, K)`` matrix plus a per-step vector (an HMM's
transition and emission), eliminated by :func:`plated.recursion.factored_chain` without ever
forming the ``(batch, T, K, K)`` sum (:attr:`plated.plan.Plan.fused`): against brute force, the
unfused recursion and the exact float64 recursion, with peaks apart, hard zeros, lower
precisions, broadcast (stride-0) inputs and second derivatives; and the fallback where the
operands are not of that form.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assignment_rows
from torch.testing import assert_close

from plated import Factor, Plate, PlatedFactorGraph, naive, testing
from plated import markov as markov_module
from plated.plan.chains import forced_chain_method
from plated.recursion import _beta0, exact_messages, factored_chain


class Calls:
    """Counts the calls of :func:`plated.markov.factored_chain` (the fused path taken)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.n = 0
        inner = markov_module.factored_chain

        def counted(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
            self.n += 1
            return inner(a, u)

        monkeypatch.setattr(markov_module, "factored_chain", counted)


def hmm(batch: int, T: int, K: int, seed: int, scale: float = 1.0,
        dtype: torch.dtype = torch.float64, broadcast: bool = False
        ) -> tuple[list[Factor], list[Plate]]:
    """init ``(seq, x_prev)``, a homogeneous transition ``(time, x_prev, x)`` (one ``(K, K)``
    matrix expanded along ``time``, stride 0) and emissions ``(seq, time, x)``; with
    ``broadcast`` the transition is a stride-0 view over ``(seq, time)`` too, as Pyro's
    enumerated ``Categorical`` hands it over."""
    gen = torch.Generator().manual_seed(seed)
    init = scale * torch.randn(batch, K, generator=gen, dtype=torch.float64)
    trans = scale * torch.randn(K, K, generator=gen, dtype=torch.float64)
    emit = scale * torch.randn(batch, T, K, generator=gen, dtype=torch.float64)
    tf = (Factor(trans.to(dtype).expand(batch, T, K, K), ("seq", "time", "x_prev", "x"))
          if broadcast else Factor(trans.to(dtype).expand(T, K, K), ("time", "x_prev", "x")))
    return ([Factor(init.to(dtype), ("seq", "x_prev")), tf,
             Factor(emit.to(dtype), ("seq", "time", "x"))],
            [Plate("seq", batch), Plate("time", T, sequential=True, prev={"x": "x_prev"})])


def leaves(factors: list[Factor]) -> list[torch.Tensor]:
    """A fresh leaf per factor; a stride-0 (expanded) factor's leaf is its one matrix, expanded
    again in :func:`graph` (a clone would materialise it)."""
    return [f.tensor.detach()[(0,) * (f.tensor.dim() - 2)].clone().requires_grad_()
            if 0 in f.tensor.stride() else f.tensor.detach().clone().requires_grad_()
            for f in factors]


def graph(factors: list[Factor], tensors: list[torch.Tensor], plates: list[Plate]
          ) -> PlatedFactorGraph:
    return PlatedFactorGraph(rebuilt(factors, tensors), plates)


def rebuilt(factors: list[Factor], tensors: list[torch.Tensor]) -> list[Factor]:
    return [Factor(t.expand(f.tensor.shape), f.dims) for t, f in zip(tensors, factors, strict=True)]


def equals_brute_force(z: torch.Tensor, ours: list[torch.Tensor], factors: list[Factor],
                       plates: list[Plate]) -> None:
    """``z``, log Z over the leaves ``ours``, and its gradient equal enumeration's."""
    ref_leaves = leaves(factors)
    ref = naive.log_partition(rebuilt(factors, ref_leaves), plates)
    assert_close(z, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(z, ours), torch.autograd.grad(ref, ref_leaves),
                    strict=True):
        assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("broadcast", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_fused_hmm_vs_brute_force(monkeypatch: pytest.MonkeyPatch, seed: int,
                                  broadcast: bool) -> None:
    """log Z, the gradient of every factor and the marginals, against enumeration."""
    calls = Calls(monkeypatch)
    batch, T = 2 + seed % 2, 3 + seed % 3
    factors, plates = hmm(batch=batch, T=T, K=3 if batch == 2 else 2, seed=seed,
                          broadcast=broadcast)
    with forced_chain_method("recursion"):
        ours = leaves(factors)
        g = graph(factors, ours, plates)
        assert "passed unsummed" in str(g.cost())
        z = g.log_partition()
        assert calls.n == 1
        equals_brute_force(z, ours, factors, plates)
        truth = naive.marginals(factors, plates)
        mine = PlatedFactorGraph(factors, plates).marginals()
        for v, m in truth.items():
            assert_close(mine[v], m, rtol=0, atol=1e-12)


def test_several_emissions_and_a_split_transition_fuse(monkeypatch: pytest.MonkeyPatch) -> None:
    """The transition as two shared matrices and the evidence as two emissions per step (four
    parts, three fused pair steps): the shared parts sum to the matrix, the others to the
    vector, and the factored chain runs once; log Z and every gradient equal brute force's."""
    factors, plates = hmm(batch=2, T=4, K=3, seed=9)
    gen = torch.Generator().manual_seed(1)
    factors = factors + [
        Factor(torch.randn(3, 3, generator=gen, dtype=torch.float64).expand(4, 3, 3),
               ("time", "x_prev", "x")),
        Factor(torch.randn(2, 4, 3, generator=gen, dtype=torch.float64), ("seq", "time", "x"))]
    calls = Calls(monkeypatch)
    with forced_chain_method("recursion"):
        ours = leaves(factors)
        g = graph(factors, ours, plates)
        assert len(g.plan("log").fused) == 3
        z = g.log_partition()
    assert calls.n == 1
    equals_brute_force(z, ours, factors, plates)


def test_fused_equals_unfused_at_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    """A chain too long for brute force: the fused path and the unfused recursion (the
    transition given with a dependence on the sequence, so not of the fused form) agree."""
    factors, plates = hmm(batch=7, T=200, K=5, seed=11, scale=3.0, broadcast=True)
    calls = Calls(monkeypatch)
    with forced_chain_method("recursion"):
        ours = leaves(factors)
        z = graph(factors, ours, plates).log_partition()
        assert calls.n == 1
        # the same transition, materialised (contiguous): the plan fuses, but the operands
        # are not of the factored form, so the chain sums them and runs the plain recursion
        trans = factors[1].tensor.detach().contiguous().requires_grad_()
        init, emit = (f.tensor.detach().clone().requires_grad_() for f in (factors[0], factors[2]))
        g2 = PlatedFactorGraph([Factor(init, ("seq", "x_prev")),
                                Factor(trans, ("seq", "time", "x_prev", "x")),
                                Factor(emit, ("seq", "time", "x"))], plates)
        z2 = g2.log_partition()
        assert calls.n == 1
    assert_close(z, z2, rtol=1e-12, atol=1e-10)
    ga = torch.autograd.grad(z, ours)
    gb = torch.autograd.grad(z2, [init, trans, emit])
    assert_close(ga[0], gb[0], rtol=0, atol=1e-12)
    assert_close(ga[1], gb[1].sum((0, 1)), rtol=0, atol=1e-10)  # the broadcast's total
    assert_close(ga[2], gb[2], rtol=0, atol=1e-12)


def exact_reference(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``beta_0`` of the chain ``a + u_t`` by the exact recursion on the materialised sum."""
    return _beta0(*exact_messages((a + u.unsqueeze(-2)).transpose(0, 1)))


@pytest.mark.parametrize("dtype,scale,tol", [(torch.float64, 1.0, 1e-12),
                                             (torch.float64, 300.0, 1e-12),
                                             (torch.float32, 1.0, 1e-5),
                                             (torch.float32, 60.0, 1e-5),
                                             (torch.bfloat16, 1.0, 3e-2),
                                             (torch.bfloat16, 40.0, 3e-2)])
def test_factored_chain_peaks_apart(dtype: torch.dtype, scale: float, tol: float) -> None:
    """Transition rows and emissions peaked at different states (every shifted product of the
    fast path underflows for some batch element at large scales), hard zeros next to large
    finite values: log Z finite where the truth is, gradients without NaN, both equal to the
    exact float64 recursion (relative to the scale)."""
    gen = torch.Generator().manual_seed(0)
    n, b, k = 40, 6, 4
    a64 = scale * torch.randn(k, k, generator=gen, dtype=torch.float64)
    u64 = scale * torch.randn(n, b, k, generator=gen, dtype=torch.float64)
    a64[0, 1] = -math.inf
    u64[5, 2, :2] = -math.inf
    u64[7, 3] = -math.inf  # sequence 3 is impossible
    a, u = (x.to(dtype).requires_grad_() for x in (a64, u64))
    z = factored_chain(a, u)
    a_ref, u_ref = (x.to(dtype).double().requires_grad_() for x in (a64, u64))
    ref = exact_reference(a_ref, u_ref)
    assert torch.equal(torch.isinf(z), torch.isinf(ref)) and torch.isinf(z[3]).all()
    fin = torch.isfinite(ref)
    assert_close(z.double()[fin], ref[fin], rtol=0, atol=tol * (1 + 10 * scale))
    # gradients: the impossible sequence weighs nothing (the reference's own gradient there is
    # NaN, so it is left out of the reference)
    keep = torch.tensor([0, 1, 2, 4, 5])
    w = torch.randn(b, k, generator=gen, dtype=torch.float64).masked_fill(~fin, 0.0)
    ga, gu = torch.autograd.grad((z * w.to(dtype)).sum(), (a, u))
    ref_keep = exact_reference(a_ref, u_ref[:, keep])
    ra, ru = torch.autograd.grad((ref_keep.masked_fill(~fin[keep], 0.0) * w[keep]).sum(),
                                 (a_ref, u_ref))
    assert not ga.isnan().any() and not gu.isnan().any()
    assert gu[:, 3].abs().max() == 0
    assert_close(ga.double(), ra, rtol=tol, atol=tol * 10)
    assert_close(gu.double(), ru, rtol=tol, atol=tol * 10)


def test_factored_chain_gradcheck_and_second_derivatives() -> None:
    a = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    u = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(factored_chain, (a, u))
    assert torch.autograd.gradgradcheck(factored_chain, (a, u))


def test_hessian_through_the_fused_graph() -> None:
    """The Hessian of log Z with respect to the shared transition, through the plan's fused
    path, equals brute force's."""
    factors, plates = hmm(batch=2, T=3, K=2, seed=4)

    def ours(x: torch.Tensor) -> torch.Tensor:
        with forced_chain_method("recursion"):
            return PlatedFactorGraph([factors[0], Factor(x.expand(3, 2, 2), dims), factors[2]],
                                     plates).log_partition()

    def ref(x: torch.Tensor) -> torch.Tensor:
        return naive.log_partition([factors[0], Factor(x.expand(3, 2, 2), dims), factors[2]],
                                   plates)

    dims = factors[1].dims
    trans = factors[1].tensor[0].detach().clone()
    h, h_ref = (torch.autograd.functional.hessian(f, trans) for f in (ours, ref))
    assert h.abs().max() > 1e-3
    assert_close(h, h_ref, rtol=0, atol=1e-10)


def test_map_and_samples_do_not_fuse(monkeypatch: pytest.MonkeyPatch) -> None:
    """The backward choice keeps every intermediate, so MAP and sampling run the unfused
    recursion (MAP agrees with enumeration)."""
    factors, plates = hmm(batch=2, T=4, K=3, seed=2)
    calls = Calls(monkeypatch)
    with forced_chain_method("recursion"):
        g = PlatedFactorGraph(factors, plates)
        best = g.map()
        torch.manual_seed(0)
        g.sample(3)
        assert calls.n == 0
    en = naive.enumerate_joint(factors, plates)
    row = assignment_rows(en, {v: x.unsqueeze(0) for v, x in best.items()})
    assert_close(en.log_joint[row].max(), en.log_joint.max(), rtol=1e-12, atol=1e-12)
    assert_close(g.max_log_density(), en.log_joint.max(), rtol=1e-12, atol=1e-12)


def test_random_sequential_graphs_with_the_recursion(monkeypatch: pytest.MonkeyPatch) -> None:
    """The random-graph suite's sequential graphs, forced to the recursion: whichever of them
    the plan fuses (taking the factored path or falling back) match brute force."""
    calls = Calls(monkeypatch)
    fused = 0
    with forced_chain_method("recursion"):
        for seed in range(60):
            factors, plates = testing.random_graph(seed, sequential=True)
            g = PlatedFactorGraph(factors, plates)
            fused += bool(g.plan("log").fused)
            ref = naive.log_partition(factors, plates)
            assert_close(g.log_partition(), ref, rtol=1e-9, atol=1e-9, msg=f"seed {seed}")
    assert fused > 0
    assert calls.n <= fused


@pytest.mark.parametrize("broadcast", [False, True])
def test_gradient_at_a_broadcast_leaf_is_per_position(monkeypatch: pytest.MonkeyPatch,
                                                       broadcast: bool) -> None:
    """A stride-0 factor that is itself the leaf whose gradient is read gets its per-step
    gradient (the pairwise marginals of each step), not the total at its first position: the
    chain then sums the operands instead of narrowing them (the fused plan, unfactored)."""
    factors, plates = hmm(batch=2, T=3, K=2, seed=7, broadcast=broadcast)
    calls = Calls(monkeypatch)
    with forced_chain_method("recursion"):
        ours = [f.tensor.detach().requires_grad_() for f in factors]  # stride 0 kept
        assert 0 in ours[1].stride()
        z = graph(factors, ours, plates).log_partition()
        assert calls.n == 0
    ref_leaves = [f.tensor.detach().clone().requires_grad_() for f in factors]
    ref = naive.log_partition(rebuilt(factors, ref_leaves), plates)
    assert_close(z, ref, rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(z, ours[1])
    (g_ref,) = torch.autograd.grad(ref, ref_leaves[1])
    assert g_ref[..., 1:, :, :].abs().max() > 1e-3  # later steps have their own marginals
    assert_close(g, g_ref, rtol=0, atol=1e-12)
