"""The three ways of eliminating a chain, the sequential recursion (:mod:`plated.recursion`), the
blocked recursion (:func:`plated.recursion.blocked_chain_messages`) and the parallel scan
(:mod:`plated.markov`), against brute force and against each other; and the plan's choice
between them by its cost model.

Each method is forced with :func:`plated.plan.chains.forced_chain_method`; the planner's own
choice is checked separately.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import RecordOps, assignment_rows, sample_pvalue
from torch.testing import assert_close

from plated import Factor, Plate, PlatedFactorGraph, naive, testing
from plated.plan import ChainStep, ScanStep, Structure, make_plan
from plated.plan.chains import chain_method, forced_chain_method
from plated.recursion import chain_messages, compiled_steps, exact_messages, recursion_forward
from plated.rings import LOG, MAX

METHODS = ("recursion", "blocked", "scan")


def chain_steps(g: PlatedFactorGraph, ring: str = "log") -> list[ChainStep | ScanStep]:
    return [s for s in g.plan(ring).steps if isinstance(s, ChainStep | ScanStep)]


def leaves_of(factors: list[Factor]) -> list[torch.Tensor]:
    return [f.tensor.detach().clone().requires_grad_() for f in factors]


def regraph(factors: list[Factor], tensors: list[torch.Tensor], plates: list[Plate]
            ) -> PlatedFactorGraph:
    return PlatedFactorGraph([Factor(t, f.dims) for t, f in zip(tensors, factors, strict=True)],
                             plates)


# -- random plated graphs with a sequential plate -------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_random_sequential_graphs_vs_brute_force(method: str) -> None:
    """log Z, its gradient, marginals and MAP of 40 random graphs with a sequential plate."""
    checked = 0
    with forced_chain_method(method):  # type: ignore[arg-type]
        for seed in range(40):
            factors, plates = testing.random_graph(seed, sequential=True)
            g = PlatedFactorGraph(factors, plates)
            steps = chain_steps(g)
            assert steps and all(s.method == method or s.layout.length == 1 for s in steps), seed
            leaves = leaves_of(factors)
            z = regraph(factors, leaves, plates).log_partition()
            ref_leaves = leaves_of(factors)
            ref = naive.log_partition(
                [Factor(t, f.dims) for t, f in zip(ref_leaves, factors, strict=True)], plates)
            assert_close(z, ref, rtol=1e-9, atol=1e-9, msg=f"seed {seed}")
            grads = torch.autograd.grad(z, leaves, allow_unused=True)
            refs = torch.autograd.grad(ref, ref_leaves, allow_unused=True)
            for k, (a, b) in enumerate(zip(grads, refs, strict=True)):
                if b is not None:
                    assert a is not None
                    assert_close(a, b, rtol=0, atol=1e-9, msg=f"seed {seed} factor {k}")
            truth = naive.marginals(factors, plates)
            ours = g.marginals()
            for v, m in truth.items():
                assert_close(ours[v], m, rtol=0, atol=1e-9, msg=f"seed {seed} {v}")
            en = naive.enumerate_joint(factors, plates)
            best = g.map()
            row = assignment_rows(en, {v: x.unsqueeze(0) for v, x in best.items()})
            assert_close(en.log_joint[row].max(), en.log_joint.max(), rtol=1e-12, atol=1e-12)
            assert_close(g.max_log_density(), en.log_joint.max(), rtol=1e-12, atol=1e-12)
            checked += 1
    assert checked == 40


def test_methods_agree_on_random_graphs() -> None:
    """The three methods give the same log Z and gradients (to rounding)."""
    for seed in range(40, 70):
        factors, plates = testing.random_graph(seed, sequential=True)
        out = {}
        for method in METHODS:
            with forced_chain_method(method):  # type: ignore[arg-type]
                leaves = leaves_of(factors)
                z = regraph(factors, leaves, plates).log_partition()
                out[method] = (z, torch.autograd.grad(z, leaves, allow_unused=True))
        za, ga = out["recursion"]
        for other in ("blocked", "scan"):
            zb, gb = out[other]
            assert_close(za, zb, rtol=1e-10, atol=1e-10)
            for a, b in zip(ga, gb, strict=True):
                assert (a is None) == (b is None)
                if a is not None and b is not None:
                    assert_close(a, b, rtol=0, atol=1e-10)


def hmm(T: int, K: int, batch: int, seed: int, dtype: torch.dtype = torch.float64
        ) -> tuple[list[Factor], list[Plate]]:
    gen = torch.Generator().manual_seed(seed)
    init = torch.randn(batch, K, generator=gen, dtype=torch.float64)
    trans = torch.randn(batch, T, K, K, generator=gen, dtype=torch.float64)
    return ([Factor(init.to(dtype), ("seq", "x_prev")),
             Factor(trans.to(dtype), ("seq", "time", "x_prev", "x"))],
            [Plate("seq", batch), Plate("time", T, sequential=True, prev={"x": "x_prev"})])


@pytest.mark.parametrize("method", METHODS)
def test_samples_goodness_of_fit(method: str) -> None:
    """6,000 joint samples of a 4-step chain in a plate of 2 against the enumerated posterior."""
    factors, plates = hmm(T=4, K=2, batch=2, seed=3)
    with forced_chain_method(method):  # type: ignore[arg-type]
        g = PlatedFactorGraph(factors, plates)
        assert [s.method for s in chain_steps(g)] == [method]
        torch.manual_seed(0)
        samples = g.sample(6000)
    en = naive.enumerate_joint(factors, plates)
    p, dof, impossible = sample_pvalue(en, samples)
    assert impossible == 0 and dof >= 20
    assert p > 1e-4, p


def test_second_derivatives_of_the_recursion() -> None:
    """The Hessian of log Z with respect to the transitions, by the recursion's twin, equals
    brute force's."""
    factors, plates = hmm(T=3, K=2, batch=1, seed=5)
    trans = factors[1].tensor.detach().clone().requires_grad_()

    def ours(x: torch.Tensor) -> torch.Tensor:
        with forced_chain_method("recursion"):
            return PlatedFactorGraph([factors[0], Factor(x, factors[1].dims)],
                                     plates).log_partition()

    def ref(x: torch.Tensor) -> torch.Tensor:
        return naive.log_partition([factors[0], Factor(x, factors[1].dims)], plates)

    h = torch.autograd.functional.hessian(ours, trans)
    h_ref = torch.autograd.functional.hessian(ref, trans)
    assert h.abs().max() > 1e-3
    assert_close(h, h_ref, rtol=0, atol=1e-10)
    m = torch.randn(2, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: chain_messages(x)[0], (m,))


# -- chains found inside one contraction ----------------------------------------------------------


def unrolled(length: int, K: int, seed: int, hard_zeros: bool = False
             ) -> tuple[list[Factor], list[Plate]]:
    """An HMM unrolled into named variables in a plate of 2, with start, next-state and
    constant factors (every role of a chain's inputs)."""
    gen = torch.Generator().manual_seed(seed)
    factors = [Factor(torch.randn(2, K, generator=gen, dtype=torch.float64), ("i", "x0")),
               Factor(torch.randn(2, generator=gen, dtype=torch.float64), ("i",))]
    for t in range(1, length):
        m = torch.randn(2, K, K, generator=gen, dtype=torch.float64)
        if hard_zeros:
            m = m.masked_fill(torch.rand(m.shape, generator=gen) < 0.3, -math.inf)
        factors.append(Factor(m, ("i", f"x{t - 1}", f"x{t}")))
        factors.append(Factor(torch.randn(K, generator=gen, dtype=torch.float64), (f"x{t}",)))
    return factors, [Plate("i", 2)]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("hard_zeros", [False, True])
def test_unrolled_chain_vs_brute_force(method: str, hard_zeros: bool) -> None:
    factors, plates = unrolled(9, 3, seed=11 + hard_zeros, hard_zeros=hard_zeros)
    with forced_chain_method(method):  # type: ignore[arg-type]
        g = PlatedFactorGraph(factors, plates)
        assert [type(s).__name__ for s in chain_steps(g)] == ["ChainStep"]
        assert chain_steps(g)[0].method == method
        leaves = leaves_of(factors)
        z = regraph(factors, leaves, plates).log_partition()
        grads = torch.autograd.grad(z, leaves)
        best = g.map()
        marg = g.marginals()
    ref_leaves = leaves_of(factors)
    ref = naive.log_partition(
        [Factor(t, f.dims) for t, f in zip(ref_leaves, factors, strict=True)], plates)
    assert torch.isfinite(ref)
    assert_close(z, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads, torch.autograd.grad(ref, ref_leaves), strict=True):
        assert not a.isnan().any()
        assert_close(a, b, rtol=0, atol=1e-10)
    en = naive.enumerate_joint(factors, plates)
    row = assignment_rows(en, {v: x.unsqueeze(0) for v, x in best.items()})
    assert_close(en.log_joint[row].max(), en.log_joint.max(), rtol=1e-12, atol=1e-12)
    for v, m in naive.marginals(factors, plates).items():
        assert_close(marg[v], m, rtol=0, atol=1e-10)


# -- exactness of the recursion's fast path --------------------------------------------------------


def sticky(T: int, gap: float, dtype: torch.dtype) -> torch.Tensor:
    """Transitions ``(1, T, 2, 2)`` of a sticky chain (off-diagonal ``-gap``) whose evidence
    favours state 0 for the first half and state 1 after by ``gap``: the row and vector peaks
    sit apart at the switch, where every shifted product underflows."""
    m = torch.tensor([[0.0, -gap], [-gap, 0.0]], dtype=torch.float64).repeat(1, T, 1, 1)
    half = T // 2
    m[0, :half, :, 1] -= gap
    m[0, half + 1:, :, 0] -= gap
    return m.to(dtype)


@pytest.mark.parametrize("dtype,gap,tol", [(torch.float64, 1e4, 1e-12),
                                           (torch.float64, 800.0, 1e-12),
                                           (torch.float32, 1e3, 2e-5),
                                           (torch.float32, 110.0, 2e-5),
                                           (torch.bfloat16, 200.0, 3e-2)])
def test_recursion_peaks_apart(dtype: torch.dtype, gap: float, tol: float) -> None:
    """log Z and the gradient of the recursion where the fast path underflows: finite, and
    equal to the exact float64 recursion (the flagged sequence is recomputed exactly)."""
    m64 = sticky(33, gap, torch.float64)
    m = m64.to(dtype).requires_grad_()
    z, _, _ = recursion_forward(LOG, m)
    d, mx = exact_messages(m64.requires_grad_())
    truth = d[0, 0] + mx[1:, 0].sum()
    top = z.logsumexp(-1)
    assert torch.isfinite(top).all()
    assert abs(top.double().item() - truth.logsumexp(-1).item()) <= tol * (1 + gap)
    (g,) = torch.autograd.grad(top.sum(), m)
    (g_ref,) = torch.autograd.grad(truth.logsumexp(-1), m64)
    assert not g.isnan().any()
    assert_close(g.double(), g_ref, rtol=0, atol=tol)


def test_recursion_with_impossible_rows() -> None:
    """Hard zeros: rows and whole chains of probability zero give -inf, never NaN, and zero
    gradients there."""
    m = torch.randn(3, 6, 3, 3, dtype=torch.float64)
    m[0, 2, 1] = -math.inf  # state 1 at step 2 has no successor
    m[1, 4] = -math.inf  # the whole chain is impossible
    m.requires_grad_()
    z, _, _ = recursion_forward(LOG, m)
    d, mx = exact_messages(m.detach())
    ref = d[0] + mx[1:].sum(0).unsqueeze(-1)
    assert torch.equal(torch.isinf(z), torch.isinf(ref)) and torch.isinf(z[1]).all()
    finite = torch.isfinite(ref)
    assert_close(z[finite], ref[finite], rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(z[finite].sum(), m)
    assert not g.isnan().any() and g[1].abs().max() == 0


@pytest.mark.parametrize("dtype,gap,tol", [(torch.float64, 900.0, 1e-12),
                                           (torch.float32, 120.0, 2e-5),
                                           (torch.float32, 40.0, 2e-5),
                                           (torch.bfloat16, 150.0, 3e-2)])
def test_recursion_rows_far_below_their_matrix(dtype: torch.dtype, gap: float, tol: float) -> None:
    """A step is shifted by its matrix's max, not row by row: rows ``gap`` below the peak of
    their matrix (beyond the dtype's underflow at the larger gaps, within it at 40 in float32)
    give log Z and gradients equal to the exact float64 recursion, for the chain as one tensor
    and as separate steps."""
    gen = torch.Generator().manual_seed(3)
    m64 = torch.randn(3, 12, 4, 4, generator=gen, dtype=torch.float64)
    m64[:, :, 1:] -= gap  # every row but the first far below the matrix's peak
    m64[1, 5, 0] -= 2 * gap  # ... and at one step the peak row too, in one sequence
    ref_in = m64.clone().requires_grad_()
    d, mx = exact_messages(ref_in)
    truth = (d[0] + mx[1:].sum(0).unsqueeze(-1)).logsumexp(-1)
    (g_ref,) = torch.autograd.grad(truth.sum(), ref_in)
    one = m64.to(dtype).requires_grad_()
    steps = [x.detach().clone().requires_grad_() for x in one.detach().unbind(1)]
    for z, wrt in ((chain_messages(one)[0], [one]), (chain_messages(steps)[0], steps)):
        top = z.logsumexp(-1)
        assert torch.isfinite(top).all()
        assert (top.double() - truth).abs().max() <= tol * (1 + gap)
        g = torch.autograd.grad(top.sum(), wrt)
        g = g[0] if len(g) == 1 else torch.stack(g, dim=1)
        assert not g.isnan().any()
        assert_close(g.double(), g_ref, rtol=0, atol=tol)


def test_steps_form_equals_tensor_form_and_survives_a_second_backward() -> None:
    """The chain as separate step tensors (a chain of variables) gives the tensor form's
    result and gradient; a second backward pass (``retain_graph``) recomputes the
    exponentials the first turned into its gradient and gives the same gradient; so does the
    tensor form."""
    gen = torch.Generator().manual_seed(8)
    m = torch.randn(5, 9, 3, 3, generator=gen, dtype=torch.float64)
    m[0, 3, 2] = -math.inf
    whole = m.clone().requires_grad_()
    steps = [x.clone().requires_grad_() for x in m.unbind(1)]
    z1, w1 = chain_messages(whole)
    z2, w2 = chain_messages(steps)
    assert_close(z1, z2, rtol=1e-13, atol=1e-13)
    assert_close(w1, w2, rtol=1e-13, atol=1e-13)
    weights = torch.rand(5, 3, generator=gen, dtype=torch.float64)
    for z, wrt in ((z1, [whole]), (z2, steps)):
        first = torch.autograd.grad(z, wrt, weights, retain_graph=True)
        second = torch.autograd.grad(z, wrt, weights)
        for a, b in zip(first, second, strict=True):
            assert a.abs().max() > 0
            assert_close(a, b, rtol=1e-13, atol=1e-13)
        got = first[0] if len(first) == 1 else torch.stack(first, dim=1)
        ref = m.clone().requires_grad_()
        b = torch.ones(5, 3, 1, dtype=torch.float64)  # linear space: the values are modest
        for t in reversed(range(9)):
            b = ref[:, t].exp() @ b
        (g_ref,) = torch.autograd.grad(b.squeeze(-1).log(), ref, weights)
        assert_close(got, g_ref, rtol=0, atol=1e-12)


def test_steps_form_second_derivatives_with_a_constant_step() -> None:
    """A Hessian through the steps form, one step a constant (no gradient): the twin
    differentiates only the steps that want it, and agrees with the exact recursion."""
    gen = torch.Generator().manual_seed(9)
    m = torch.randn(2, 4, 2, 2, generator=gen, dtype=torch.float64)
    const = m[:, 1]

    def ours(x: torch.Tensor) -> torch.Tensor:
        steps = [x[:, 0], const, x[:, 1], x[:, 2]]
        return chain_messages(steps)[0].logsumexp(-1).sum()

    def ref(x: torch.Tensor) -> torch.Tensor:
        full = torch.stack([x[:, 0], const, x[:, 1], x[:, 2]], dim=1)
        d, mx = exact_messages(full)
        return (d[0] + mx[1:].sum(0).unsqueeze(-1)).logsumexp(-1).sum()

    x = m[:, [0, 2, 3]].clone()
    h = torch.autograd.functional.hessian(ours, x)
    assert h.abs().max() > 1e-3
    assert_close(h, torch.autograd.functional.hessian(ref, x), rtol=0, atol=1e-10)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_steps_equal_the_eager_recursion() -> None:
    """Inside :func:`compiled_steps` the recursion's steps run through ``torch.compile``: the
    same log Z, messages and gradient as eager (float32 rounding), including a sequence that
    takes the exact fallback (a row far below its matrix's peak), and no effect outside the
    block."""
    gen = torch.Generator().manual_seed(4)
    m = torch.randn(3, 7, 4, 4, generator=gen)
    m[2, 3, 1:] -= 200.0  # underflows in float32: sequence 2 is recomputed exactly
    steps = [x.clone().requires_grad_() for x in m.unbind(1)]
    weights = torch.rand(3, 4, generator=gen)
    z, w = chain_messages(steps)
    (g,) = [torch.stack(torch.autograd.grad(z, steps, weights), 1)]
    with compiled_steps():
        zc, wc = chain_messages(steps)
        gc = torch.stack(torch.autograd.grad(zc, steps, weights), 1)
    assert_close(zc, z, rtol=1e-6, atol=1e-5)
    assert_close(wc, w, rtol=1e-6, atol=1e-5)
    assert_close(gc, g, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(z).all() and not g.isnan().any()


def test_max_ring_recursion_is_viterbi() -> None:
    m = torch.randn(4, 7, 3, 3, dtype=torch.float64)
    best, beta, pointers = recursion_forward(MAX, m)
    assert pointers is not None
    for b in range(4):
        for first in range(3):
            # the back-pointers trace a path whose score is the max
            x, score = first, 0.0
            for t in range(7):
                nxt = int(pointers[b, t, x])
                score += float(m[b, t, x, nxt])
                x = nxt
            assert math.isclose(score, float(best[b, first]), rel_tol=1e-12)
    brute = torch.full((4, 3), -math.inf, dtype=torch.float64)
    for path in torch.cartesian_prod(*[torch.arange(3)] * 8):
        score = sum(m[:, t, path[t], path[t + 1]] for t in range(7))
        brute[:, path[0]] = torch.maximum(brute[:, path[0]], score)
    assert_close(best, brute, rtol=1e-12, atol=1e-12)


# -- the plan's choice -----------------------------------------------------------------------------


def structure(batch: int, T: int, K: int, device: str = "cpu") -> Structure:
    g = PlatedFactorGraph(*hmm(T, K, batch, seed=0, dtype=torch.float32))
    s = g.structure()
    return Structure(s.plates, s.inputs, s.labels, ring=s.ring, itemsize=s.itemsize,
                     device=device)


def test_plan_chooses_by_cost_and_reports_it() -> None:
    # JSB chorales' shape on a CPU: a wide batch of short chains, the recursion
    plan = make_plan(structure(229, 129, 16))
    (step,) = [s for s in plan.steps if isinstance(s, ScanStep)]
    assert step.method == "recursion"
    line = next(x for x in plan.cost.steps if "chain along" in x)
    assert "by sequential recursion (predicted" in line and "scan" in line
    # a long chain of two states and no batch: the log-depth scan
    plan = make_plan(structure(1, 100_000, 2))
    assert [s.method for s in plan.steps if isinstance(s, ScanStep)] == ["scan"]
    # a long chain of 16 states in a plate of 16 (contract.py's case c): the blocked recursion
    plan = make_plan(structure(16, 10_000, 16))
    assert [s.method for s in plan.steps if isinstance(s, ScanStep)] == ["blocked"]
    line = next(x for x in plan.cost.steps if "chain along" in x)
    assert "by blocked recursion (predicted" in line and "recursion" in line and "scan" in line
    # on a GPU (the model's launch-bound figures, not measured here) few wide steps win where
    # the CPU's recursion did: the blocked recursion's some 140 launches, the scan's 360
    plan = make_plan(structure(229, 129, 16, device="cuda"))
    assert [s.method for s in plan.steps if isinstance(s, ScanStep)] == ["blocked"]
    times = chain_method("log", 229, 129, 16, "cuda", 4, None)
    assert times is not None and times[2]["scan"] < times[2]["recursion"]


def test_choice_follows_the_predicted_times() -> None:
    for batch, T, K in [(1, 10, 2), (229, 129, 16), (16, 10_000, 16), (1, 100_000, 2),
                        (229, 129, 64), (4, 3, 8)]:
        for device in ("cpu", "cuda"):
            for ring in ("log", "max"):
                choice = chain_method(ring, batch, T, K, device, 4, None)
                assert choice is not None
                method, _, times = choice
                assert times[method] == min(times.values()), (batch, T, K, device, ring)


def test_capped_chain_takes_the_method_that_fits() -> None:
    """Under a cap that the faster methods do not fit, the one that fits is chosen."""
    free = chain_method("log", 1, 20_000, 4, "cpu", 8, None)
    assert free is not None
    fastest = free[0]
    from plated.plan.chains import blocked_cost, chain_need, recursion_cost, scan_cost
    need = {"recursion": chain_need(recursion_cost("log", 1, 20_000, 4)),
            "blocked": chain_need(blocked_cost("log", 1, 20_000, 4)),
            "scan": chain_need(scan_cost("log", 1, 20_000, 4))}
    smallest = min(need, key=need.__getitem__)
    assert smallest != fastest and need[smallest] < need[fastest], need
    cap = int(need[smallest] * 8 * 1.3)
    assert sorted(need.values())[1] * 8 * 1.2 > cap  # only the smallest fits
    capped = chain_method("log", 1, 20_000, 4, "cpu", 8, cap)
    assert capped is not None and capped[0] == smallest
    assert chain_method("log", 1, 20_000, 4, "cpu", 8, 1000) is None


def test_recursion_ops_grow_linearly_only_when_chosen() -> None:
    """The recursion loops over time steps (a few ops each), which the plan may choose only by
    its cost: forced on a long narrow chain it dispatches thousands of ops where the scan
    (the plan's own choice there) dispatches a few hundred."""
    factors, plates = hmm(T=2000, K=2, batch=1, seed=1)
    counts = {}
    for method in METHODS:
        with forced_chain_method(method):  # type: ignore[arg-type]
            g = PlatedFactorGraph(factors, plates)
            g.log_partition()
            rec = RecordOps()
            with rec:
                g.log_partition()
            counts[method] = len(rec.ops)
    assert counts["scan"] < 500 < 2000 < counts["recursion"], counts
    assert [s.method for s in chain_steps(PlatedFactorGraph(factors, plates))] == ["scan"]
