"""Exactness on adversarial factors: peaks at different positions, sticky chains, ``-inf`` beside
large finite values.

A log-space contraction shifts each operand by its own max before exponentiating; when operands
peak at different positions every product underflows unless the contraction repairs those entries
(:func:`plated.rings.repair_entries`). Each case here is checked against the brute-force twin
(:mod:`plated.naive`), which adds log factors exactly and takes one ``logsumexp`` over the joint
(shifted by the joint's own max, never per operand), in float64.

Tolerances: float64 1e-9 relative (to ``1 + |log Z|``); float32 ``F32_RTOL`` and bfloat16
``BF16_RTOL`` relative to ``1 + |log Z|``, against the float64 answer on the *same* (rounded)
inputs, so only the contraction's rounding is measured.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assignment_rows, sample_pvalue
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

import attention.functional as AF
from plated import Factor, Plate, PlatedFactorGraph, naive, testing
from plated.rings import LOG, log_matmul

F64_RTOL = 1e-9
#: float32: a few hundred units in the last place of |log Z| (inputs up to 1e3 apart).
F32_RTOL = 2e-5
#: bfloat16: its 8-bit mantissa (eps 7.8e-3) makes a few ulps about 3e-2.
BF16_RTOL = 3e-2

GAPS_F64 = (30.0, 800.0, 1e4)
GAPS_F32 = (30.0, 110.0, 1e3)


def adversarial(factors: list[Factor], gap: float, seed: int, hard_zero_prob: float = 0.0,
                dtype: torch.dtype = torch.float64) -> list[Factor]:
    """The same graph with each factor's entries drawn from ``{0, -gap/3, -gap, -2 gap}``, one
    ``0`` per factor at a random position (peaks apart), optionally ``-inf`` beside them."""
    gen = torch.Generator().manual_seed(seed)
    levels = torch.tensor([0.0, -gap / 3, -gap, -2 * gap], dtype=torch.float64)
    out = []
    for f in factors:
        t = f.tensor
        pick = torch.randint(len(levels), t.shape, generator=gen)
        v = levels[pick]
        flat = v.reshape(-1)
        flat[torch.randint(flat.numel(), (1,), generator=gen)] = 0.0
        if hard_zero_prob:
            zero = torch.rand(t.shape, generator=gen) < hard_zero_prob
            v = v.masked_fill(zero, -math.inf)
        out.append(Factor(v.to(dtype), f.dims))
    return out


def as64(factors: list[Factor]) -> list[Factor]:
    return [Factor(f.tensor.double(), f.dims) for f in factors]


def check_log_partition(factors: list[Factor], plates: list[Plate], rtol: float, label: str
                        ) -> None:
    ours = PlatedFactorGraph(factors, plates).log_partition()
    truth = naive.log_partition(as64(factors), plates)
    assert not torch.isnan(ours), label
    if torch.isinf(truth):
        assert ours == truth, f"{label}: {ours} but brute force {truth}"
        return
    assert torch.isfinite(ours), f"{label}: {ours.item()} but brute force {truth.item()}"
    err = abs(ours.double().item() - truth.item())
    assert err <= rtol * (1 + abs(truth.item())), f"{label}: {ours.item()} vs {truth.item()}"


# ----------------------------------------------------------------------------------------------
# the cases, by closed form


def test_peaks_apart_pair_float64() -> None:
    a = torch.tensor([0.0, -800.0], dtype=torch.float64)
    z = PlatedFactorGraph([Factor(a, ("x",)), Factor(a.flip(0), ("x",))]).log_partition()
    assert_close(z, torch.tensor(-800 + math.log(2), dtype=torch.float64), rtol=1e-12, atol=0)


@pytest.mark.parametrize("gap", [100.0, 110.0, 1e3])
def test_peaks_apart_pair_float32(gap: float) -> None:
    a = torch.tensor([0.0, -gap])
    z = PlatedFactorGraph([Factor(a, ("x",)), Factor(a.flip(0), ("x",))]).log_partition()
    assert abs(z.item() - (-gap + math.log(2))) <= F32_RTOL * (1 + gap)


def hmm_graph(length: int, gap: float, dtype: torch.dtype) -> tuple[list[Factor], float]:
    """The sticky HMM unrolled into a chain of named variables ``x0 .. x{T-1}``: the planner
    finds the chain (a :class:`~plated.plan.ir.ChainStep`, the parallel scan)."""
    trans = torch.tensor([[0.0, -gap], [-gap, 0.0]], dtype=torch.float64)
    half = length // 2
    factors = []
    for t in range(length):
        e = torch.zeros(2, dtype=torch.float64)
        if t < half:
            e[1] = -gap
        elif t > half:
            e[0] = -gap
        factors.append(Factor(e.to(dtype), (f"x{t}",)))
        if t:
            factors.append(Factor(trans.to(dtype), (f"x{t - 1}", f"x{t}")))
    # the two paths that switch at the neutral step, each with one off-diagonal transition;
    # every other path pays at least 2 gap
    return factors, -gap + math.log(2)


@pytest.mark.parametrize("dtype,gaps,rtol", [(torch.float64, (800.0, 1e4), F64_RTOL),
                                             (torch.float32, (110.0, 1e3), F32_RTOL)])
@pytest.mark.parametrize("length", [6, 33])
def test_sticky_chain_with_switching_evidence(dtype: torch.dtype, gaps: tuple[float, ...],
                                              rtol: float, length: int) -> None:
    for gap in gaps:
        factors, truth = hmm_graph(length, gap, dtype)
        g = PlatedFactorGraph(factors)
        assert any(type(s).__name__ == "ChainStep" for s in g.plan().steps) or length < 10
        z = g.log_partition()
        assert torch.isfinite(z), (gap, length)
        assert abs(z.double().item() - truth) <= rtol * (1 + abs(truth)), (gap, z.item(), truth)
        # MAP: one of the two best paths (state 0 then 1, switching at the middle)
        best = g.map()
        path = [int(best[f"x{t}"]) for t in range(length)]
        half = length // 2
        assert path[:half] == [0] * half and path[half + 1:] == [1] * (length - half - 1), path
        # marginals at the neutral step: one half each
        marg = g.marginals()[f"x{half}"]
        assert_close(marg.double(), torch.tensor([0.5, 0.5], dtype=torch.float64),
                     rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-12)


def test_sequential_plate_sticky_chain() -> None:
    """The same sticky chain as a sequential plate (the scan path with ``_LogMatmul``)."""
    gap, length = 1e4, 40
    trans = torch.tensor([[0.0, -gap], [-gap, 0.0]], dtype=torch.float64)
    half = length // 2
    emit = torch.zeros(length, 2, dtype=torch.float64)
    emit[:half, 1] = -gap
    emit[half + 1:, 0] = -gap
    plate = Plate("t", length, sequential=True, prev={"x": "x_prev"})
    factors = [Factor(trans.expand(length, 2, 2).contiguous(), ("t", "x_prev", "x")),
               Factor(emit, ("t", "x"))]
    g = PlatedFactorGraph(factors, [plate])
    assert any(type(s).__name__ == "ScanStep" for s in g.plan().steps)
    z = g.log_partition()
    assert abs(z.item() - (-gap + math.log(2))) <= F64_RTOL * gap
    marg = g.marginals()["x"]
    assert_close(marg[half], torch.tensor([0.5, 0.5], dtype=torch.float64), rtol=0, atol=1e-12)
    best = g.map()["x"]
    assert best[:half].eq(0).all() and best[half + 1:].eq(1).all()


def test_log_matmul_peaks_apart_and_gradient() -> None:
    gap = 5e3
    a = torch.tensor([[0.0, -gap], [-gap, 0.0]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[-gap, 0.0], [0.0, -gap]], dtype=torch.float64, requires_grad=True)
    c = log_matmul(a, b)
    truth = (a.unsqueeze(-1) + b.unsqueeze(-3)).logsumexp(-2)
    assert_close(c, truth, rtol=1e-12, atol=0)
    (ga, gb) = torch.autograd.grad(c.sum(), (a, b))
    (ta, tb) = torch.autograd.grad(truth.sum(), (a, b))
    assert_close(ga, ta, rtol=0, atol=1e-12)
    assert_close(gb, tb, rtol=0, atol=1e-12)


def test_level_of_scan_peaks_apart() -> None:
    gap = 2e3
    m = torch.tensor([[[[0.0, -gap], [-gap, 0.0]], [[-gap, 0.0], [0.0, -gap]],
                       [[0.0, -gap], [-gap, -gap]]]], dtype=torch.float32)
    out = LOG.level(m)
    ref = (m[:, 0].double().unsqueeze(-1) + m[:, 1].double().unsqueeze(-3)).logsumexp(-2)
    assert torch.isfinite(out[:, 0]).all()
    assert_close(out[:, 0].double(), ref, rtol=F32_RTOL, atol=0)
    assert torch.equal(out[:, 1], m[:, 2])


def test_neg_inf_beside_large_finite() -> None:
    big = 1e4
    a = torch.tensor([[0.0, -torch.inf, -big], [-torch.inf, -torch.inf, -torch.inf]],
                     dtype=torch.float64, requires_grad=True)
    b = torch.tensor([-big, 0.0, 0.0], dtype=torch.float64, requires_grad=True)
    g = PlatedFactorGraph([Factor(a, ("y", "x")), Factor(b, ("x",))], keep_vars=("y",))
    z = g.log_partition()
    ref = (a + b).logsumexp(-1)
    assert z[1] == -torch.inf
    assert_close(z[0], ref[0], rtol=1e-12, atol=0)
    grad_a, grad_b = torch.autograd.grad(z[0], (a, b))
    assert not grad_a.isnan().any() and not grad_b.isnan().any()
    row0 = (a[0] + b).logsumexp(-1)  # torch's logsumexp gives NaN gradients for the -inf row
    ref_a, ref_b = torch.autograd.grad(row0, (a, b))
    assert_close(grad_a, ref_a, rtol=0, atol=1e-12)
    assert_close(grad_b, ref_b, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# random plated graphs with adversarial values, against brute force


SEEDS = range(120)


@pytest.mark.parametrize("gap", GAPS_F64)
def test_random_adversarial_graphs_float64(gap: float) -> None:
    for seed in SEEDS:
        factors, plates = testing.random_graph(seed)
        hard = 0.2 if seed % 3 == 0 else 0.0
        adv = adversarial(factors, gap, seed, hard_zero_prob=hard)
        check_log_partition(adv, plates, F64_RTOL, f"seed {seed} gap {gap}")


@settings(derandomize=True, database=None, max_examples=150, deadline=None)
@given(seed=st.integers(0, 10**6), gap=st.floats(0.0, 1e4), hard=st.sampled_from([0.0, 0.25]),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_property_adversarial_log_partition(seed: int, gap: float, hard: float,
                                            dtype: torch.dtype) -> None:
    if dtype == torch.float32:
        gap = min(gap, 1e3)
    factors, plates = testing.random_graph(seed)
    adv = adversarial(factors, gap, seed, hard_zero_prob=hard, dtype=dtype)
    check_log_partition(adv, plates, F64_RTOL if dtype == torch.float64 else F32_RTOL,
                        f"seed {seed} gap {gap} {dtype}")


@pytest.mark.parametrize("gap", GAPS_F32)
def test_random_adversarial_graphs_float32(gap: float) -> None:
    for seed in SEEDS:
        factors, plates = testing.random_graph(seed)
        adv = adversarial(factors, gap, seed, dtype=torch.float32)
        check_log_partition(adv, plates, F32_RTOL, f"seed {seed} gap {gap}")


def test_random_adversarial_graphs_bfloat16() -> None:
    gap = 200.0
    for seed in range(40):
        factors, plates = testing.random_graph(seed, max_plates=1, max_vars=3)
        adv = adversarial(factors, gap, seed, dtype=torch.bfloat16)
        check_log_partition(adv, plates, BF16_RTOL, f"seed {seed} gap {gap}")


@pytest.mark.parametrize("gap", (800.0, 1e4))
def test_random_adversarial_marginals_and_map(gap: float) -> None:
    for seed in range(60):
        factors, plates = testing.random_graph(seed)
        adv = adversarial(factors, gap, seed)
        g = PlatedFactorGraph(adv, plates)
        truth = naive.marginals(adv, plates)
        ours = g.marginals()
        for v, m in truth.items():
            assert not ours[v].isnan().any(), (seed, v)
            assert_close(ours[v], m, rtol=0, atol=1e-9, msg=f"seed {seed} variable {v}")
        en = naive.enumerate_joint(adv, plates)
        best = g.map()
        if best:
            row = assignment_rows(en, {k: x.unsqueeze(0) for k, x in best.items()})
            assert_close(en.log_joint[row].max(), en.log_joint.max(), rtol=1e-12, atol=0)


def test_random_adversarial_gradients_float32() -> None:
    gap = 500.0
    for seed in range(40):
        factors, plates = testing.random_graph(seed)
        adv = adversarial(factors, gap, seed, dtype=torch.float32)
        leaves = [f.tensor.clone().requires_grad_() for f in adv]
        ours = PlatedFactorGraph([Factor(t, f.dims) for t, f in zip(leaves, adv, strict=True)],
                                 plates).log_partition()
        grads = torch.autograd.grad(ours, leaves, allow_unused=True)
        leaves64 = [t.detach().double().requires_grad_() for t in leaves]
        ref = naive.log_partition([Factor(t, f.dims) for t, f in zip(leaves64, adv, strict=True)],
                                  plates)
        refs = torch.autograd.grad(ref, leaves64, allow_unused=True)
        for k, (g, r) in enumerate(zip(grads, refs, strict=True)):
            if r is None:
                continue
            assert g is not None and not g.isnan().any(), (seed, k)
            assert_close(g.double(), r, rtol=0, atol=1e-5, msg=f"seed {seed} factor {k}")


@pytest.mark.parametrize("gap,soften", [(40.0, True), (800.0, False)])
def test_random_adversarial_samples_chi_squared(gap: float, soften: bool) -> None:
    # softened (gap 40, scaled down, plus noise): several assignments have visible mass, yet
    # operands peak apart; raw gap 800: the posterior sits on the best assignments (ties split
    # evenly), and a sample anywhere else is a sample from a wrong forward pass
    tested = 0
    for seed in range(80):
        factors, plates = testing.random_graph(seed, max_assignments=64)
        adv = adversarial(factors, gap, seed)
        if soften:
            gen = torch.Generator().manual_seed(seed)
            adv = [Factor(f.tensor / 8 + torch.randn(f.tensor.shape, dtype=torch.float64,
                                                     generator=gen), f.dims) for f in adv]
        en = naive.enumerate_joint(adv, plates)
        if en.log_joint.numel() < 2:
            continue
        samples = PlatedFactorGraph(adv, plates).sample(
            3000, generator=torch.Generator().manual_seed(seed))
        rows = assignment_rows(en, samples)
        logp = en.log_joint - en.log_joint.logsumexp(0)
        assert logp[rows].min() > -60, (seed, "a sample of posterior probability < e^-60")
        p, _, impossible = sample_pvalue(en, samples)
        assert impossible == 0, seed
        assert p > 1e-6, (seed, p)
        tested += 1
    assert tested >= 30


# ----------------------------------------------------------------------------------------------
# attention


def test_attention_losses_and_posterior_peaks_apart() -> None:
    for dtype, gap in ((torch.float32, 110.0), (torch.float32, 1e3), (torch.float64, 1e4)):
        prior = torch.tensor([[0.0, -gap]], dtype=dtype)
        log_lik = torch.tensor([[-gap, 0.0]], dtype=dtype)
        truth = gap - math.log(2)  # -log(e^-gap + e^-gap), the prior normalised first
        truth_prior = torch.tensor([[0.0, -gap]], dtype=torch.float64).log_softmax(-1)
        exact = -(truth_prior + log_lik.double()).logsumexp(-1).item()
        loss = AF.alignment_loss(prior, log_lik, mode="marginal")
        assert abs(loss.double().item() - exact) <= 1e-5 * (1 + truth), (dtype, gap, loss)
        post = AF.alignment_posterior(prior, log_lik)
        assert_close(post.double(), torch.tensor([[0.5, 0.5]], dtype=torch.float64), rtol=0,
                     atol=1e-5)


def markov_brute(init_logits: torch.Tensor, trans_logits: torch.Tensor, log_lik: torch.Tensor
                 ) -> torch.Tensor:
    """Brute-force ``log p(y | x)`` ``(B,)`` of the Markov alignment model: every path of
    ``S ** T`` enumerated, float64, one ``logsumexp`` over all paths."""
    init_lp = init_logits.double().log_softmax(-1)
    trans_lp = trans_logits.double().log_softmax(-1)
    ll = log_lik.double()
    b, t, s = ll.shape
    paths = torch.cartesian_prod(*[torch.arange(s)] * t).reshape(-1, t)
    rows = torch.arange(b)[:, None]
    score = init_lp[rows, paths[None, :, 0]] + ll[rows, 0, paths[None, :, 0]]
    for k in range(1, t):
        score = score + trans_lp[rows, k, paths[None, :, k - 1], paths[None, :, k]]
        score = score + ll[rows, k, paths[None, :, k]]
    return score.logsumexp(-1)


@pytest.mark.parametrize("dtype,gap,rtol", [(torch.float64, 1e4, F64_RTOL),
                                            (torch.float32, 1e3, F32_RTOL)])
def test_markov_alignment_sticky_prior_peaks_apart(dtype: torch.dtype, gap: float, rtol: float
                                                   ) -> None:
    from attention.markov import markov_alignment_log_marginal, markov_alignment_marginals
    b, t, s = 2, 5, 3
    gen = torch.Generator().manual_seed(0)
    trans = torch.full((b, t, s, s), -gap, dtype=torch.float64)
    trans[:, :, torch.arange(s), torch.arange(s)] = 0.0  # sticky: stay put
    init = torch.randn(b, s, dtype=torch.float64, generator=gen)
    # the evidence prefers position 0 early and position 2 late: every path pays at least gap
    log_lik = torch.zeros(b, t, s, dtype=torch.float64)
    log_lik[:, :2, 1:] = -gap
    log_lik[:, 3:, :2] = -gap
    args = [x.to(dtype) for x in (init, trans, log_lik)]
    ours = markov_alignment_log_marginal(*args)
    truth = markov_brute(*args)
    assert torch.isfinite(ours).all(), ours
    assert ((ours.double() - truth).abs() <= rtol * (1 + truth.abs())).all(), (ours, truth)
    marg = markov_alignment_marginals(*args)
    assert not marg.isnan().any()
    assert_close(marg.double().sum(-1), torch.ones(b, t, dtype=torch.float64), rtol=0,
                 atol=1e-5)


def test_output_layer_log_probs_with_peaked_prior() -> None:
    import copy

    from attention.output import AlignedOutputLayer
    torch.manual_seed(0)
    layer = AlignedOutputLayer(6, 5, 7).float()
    with torch.no_grad():  # peaked word distributions: a word unlikely under the likely
        layer.out.weight.mul_(1000.0)  # alignment can be likely under an unlikely one
    h = torch.randn(2, 6).float()
    values = torch.randn(2, 3, 5).float()
    gap = 110.0  # e^-110 is 0 in float32: probabilities drop the position, logs do not
    log_prior = torch.tensor([[0.0, -gap, -gap], [-gap, 0.0, -torch.inf]]).float().log_softmax(-1)
    got = layer.log_probs(h, values, log_prior=log_prior)
    ref_layer = copy.deepcopy(layer).double()
    word = torch.log_softmax(ref_layer.out(torch.tanh(
        ref_layer.hidden_proj(h.double())[:, None] + ref_layer.memory_proj(values.double()))),
        -1)  # (B, S, V)
    truth = (log_prior.double()[..., None] + word).logsumexp(1)
    assert torch.isfinite(got).all()
    assert_close(got.double(), truth, rtol=F32_RTOL, atol=1e-5)
    from_probs = layer.log_probs(h, values, log_prior.exp())  # what probabilities lose
    assert (from_probs.double() - truth).abs().max() > 1.0
    with pytest.raises(ValueError, match="exactly one of probs"):
        layer.log_probs(h, values, log_prior.exp(), log_prior=log_prior)
