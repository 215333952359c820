"""The blocked recursion (:class:`plated.recursion._BlockedChain`): the chain in blocks, the
recursion run within all blocks at once and across them by the blocks' products.

Against brute force (every path enumerated) and the exact recursion in float64, with padding,
hard zeros, weights of both signs, blocks of one step and of the whole chain; where its products
underflow (the check must send the sequence to the exact recursion); a second backward pass, a
Hessian, the steps form; its dependent steps, about 2 sqrt(T), not T; and its errors. The plan's
choice of it, and its MAP, samples and marginals through a graph, are in
``test_chain_methods.py`` (its ``METHODS``).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers import RecordOps
from torch.testing import assert_close

from plated import Factor, Plate, PlatedFactorGraph
from plated import recursion as recursion_module
from plated.plan import ScanStep
from plated.plan.chains import chain_method, chain_times, forced_chain_method
from plated.recursion import (
    block_length,
    blocked_chain_messages,
    chain_messages,
    exact_messages,
    recursion_forward,
)
from plated.rings import LOG, MAX


def exact_beta0(m: torch.Tensor) -> torch.Tensor:
    d, mx = exact_messages(m)
    return d[0] + mx[1:].sum(0).unsqueeze(-1)


def linear_beta0(m: torch.Tensor) -> torch.Tensor:
    """``beta_0`` by the backward recursion in linear space, rescaled each step, in autograd's
    operations (hard zeros are exact zeros; an impossible first state gives ``-inf`` with a zero
    gradient)."""
    b = torch.ones(m.shape[0], m.shape[-1], 1, dtype=m.dtype)
    logs = torch.zeros(m.shape[0], 1, dtype=m.dtype)
    for t in reversed(range(m.shape[1])):
        b = m[:, t].exp() @ b
        s = b.detach().amax(dim=(-2, -1), keepdim=True).clamp(min=1e-300)
        b = b / s
        logs = logs + s.log().squeeze(-1)
    b = b.squeeze(-1)
    live = b > 0
    return torch.where(live, torch.where(live, b, 1.0).log() + logs, -math.inf)


def brute_beta0(m: torch.Tensor) -> torch.Tensor:
    """``beta_0[b, i] = log sum over paths i = x_0, x_1, ..., x_n of exp(sum_t M_t[x_t,
    x_{t+1}])``, every path enumerated."""
    batch, n, k, _ = m.shape
    scores: list[list[torch.Tensor]] = [[] for _ in range(k)]
    for path in itertools.product(range(k), repeat=n + 1):
        scores[path[0]].append(sum(m[:, t, path[t], path[t + 1]] for t in range(n)))
    return torch.stack([torch.stack(s, dim=-1).logsumexp(-1) for s in scores], dim=-1)


@pytest.mark.parametrize("batch,n,k,length", [(3, 5, 3, 2), (2, 6, 2, 6), (1, 4, 3, 1),
                                              (2, 7, 2, 3), (4, 5, 3, 4)])
def test_blocked_equals_brute_force(batch: int, n: int, k: int, length: int) -> None:
    """log Z per first state and its gradient (weights of both signs) against every path
    enumerated: blocks that divide the chain, that need padding, of one step and of all."""
    gen = torch.Generator().manual_seed(batch * 100 + n * 10 + length)
    m = (2 * torch.randn(batch, n, k, k, generator=gen, dtype=torch.float64)).requires_grad_()
    ref_in = m.detach().clone().requires_grad_()
    z, w = blocked_chain_messages(m, length)
    ref = brute_beta0(ref_in)
    assert_close(z, ref, rtol=1e-12, atol=1e-12)
    weights = torch.randn(batch, k, generator=gen, dtype=torch.float64)
    weights[0, 0], weights[0, -1] = -0.7, 1.3  # both signs
    (g,) = torch.autograd.grad(z, m, weights)
    (g_ref,) = torch.autograd.grad(ref, ref_in, weights)
    assert_close(g, g_ref, rtol=0, atol=1e-12)
    _, w_seq = chain_messages(m.detach())
    assert_close(w, w_seq, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", range(12))
def test_blocked_equals_the_exact_recursion(seed: int) -> None:
    """Random shapes, block lengths and hard zeros (``-inf`` entries, an impossible row, and a
    whole impossible sequence): log Z, the messages and the gradient of the exact recursion in
    float64; ``-inf`` where it is ``-inf``, never NaN."""
    gen = torch.Generator().manual_seed(seed)
    batch = int(torch.randint(1, 5, (), generator=gen))
    n = int(torch.randint(2, 60, (), generator=gen))
    k = int(torch.randint(2, 6, (), generator=gen))
    length = int(torch.randint(1, n + 1, (), generator=gen))
    m = 3 * torch.randn(batch, n, k, k, generator=gen, dtype=torch.float64)
    m = m.masked_fill(torch.rand(m.shape, generator=gen) < 0.2, -math.inf)
    if seed % 3 == 0:
        m[0, n // 2, 0] = -math.inf  # a state with no successor
    if seed % 4 == 0 and batch > 1:
        m[-1, n // 3] = -math.inf  # a sequence of probability zero
    x = m.clone().requires_grad_()
    ref_in = m.clone().requires_grad_()
    z, w = blocked_chain_messages(x, length)
    ref = linear_beta0(ref_in)
    assert_close(exact_beta0(m), ref, rtol=1e-11, atol=1e-11)  # the two references agree
    assert torch.equal(torch.isinf(z), torch.isinf(ref)), seed
    fin = torch.isfinite(ref)
    assert_close(z[fin], ref[fin], rtol=1e-11, atol=1e-11)
    weights = torch.rand(batch, k, generator=gen, dtype=torch.float64) - 0.3
    weights = torch.where(fin, weights, torch.zeros_like(weights))
    (g,) = torch.autograd.grad(z, x, weights)
    (g_ref,) = torch.autograd.grad(ref, ref_in, weights)
    assert not g.isnan().any()
    assert_close(g, g_ref, rtol=0, atol=1e-11)


def test_blocked_float32_long_chain_against_float64() -> None:
    """contract.py's case (c) shape, shortened: 2,000 steps of 16 states in a plate of 4, in
    float32, against the exact recursion in float64."""
    gen = torch.Generator().manual_seed(5)
    m64 = torch.randn(4, 2000, 16, 16, generator=gen, dtype=torch.float64).log_softmax(-1)
    m = m64.float().requires_grad_()
    z, _ = blocked_chain_messages(m)
    ref_in = m64.clone().requires_grad_()
    ref = exact_beta0(ref_in)
    top, top_ref = z.logsumexp(-1), ref.logsumexp(-1)
    assert_close(top.double(), top_ref, rtol=0, atol=2e-3)
    (g,) = torch.autograd.grad(top.sum(), m)
    (g_ref,) = torch.autograd.grad(top_ref.sum(), ref_in)
    assert_close(g.double(), g_ref, rtol=0, atol=1e-4)


def only_sequence_0_goes_exact(monkeypatch: pytest.MonkeyPatch, m64: torch.Tensor,
                               length: int) -> None:
    """The blocked recursion of ``m64`` in float32, in blocks of ``length``, sends sequence 0
    alone to the exact recursion (a spy counts its calls), and its log Z (finite) and gradient
    are those of the exact float64 recursion."""
    calls = []
    real = recursion_module.exact_messages

    def spy(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(x.shape[0])
        return real(x)

    monkeypatch.setattr(recursion_module, "exact_messages", spy)
    m = m64.float().requires_grad_()
    z, _ = blocked_chain_messages(m, length)
    assert calls == [1]  # sequence 0 only
    ref_in = m64.clone().requires_grad_()
    ref = exact_beta0(ref_in)
    assert torch.isfinite(z).all() and torch.isfinite(ref).all()
    assert_close(z.double(), ref, rtol=1e-6, atol=1e-4)
    (g,) = torch.autograd.grad(z.logsumexp(-1).sum(), m)
    (g_ref,) = torch.autograd.grad(ref.logsumexp(-1).sum(), ref_in)
    assert_close(g.double(), g_ref, rtol=0, atol=1e-5)


def test_products_that_underflow_go_to_the_exact_recursion(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """Sequence 0 stays in its state (hard zeros off the diagonal), state 1 at a cost of 6 a
    step: a block's product (30 steps) carries ``exp(-180)`` for state 1, which float32 rounds
    to 0, and its messages fall under the underflow threshold. That sequence alone (sequence 1
    is ordinary) is recomputed by the exact recursion: log Z, ``-inf``-free, and the gradient
    are those of the float64 recursion."""
    n, length, c = 120, 30, 6.0
    m64 = torch.randn(2, n, 2, 2, generator=torch.Generator().manual_seed(1),
                      dtype=torch.float64).log_softmax(-1)
    m64[0] = torch.tensor([[0.0, -math.inf], [-math.inf, -c]], dtype=torch.float64)
    e = m64[0, 0].float().exp()  # the float32 product of one block: state 1 has underflowed
    assert torch.linalg.matrix_power(e, length)[1, 1] == 0
    only_sequence_0_goes_exact(monkeypatch, m64, length)


def drifting_chain() -> torch.Tensor:
    """``(2, 330, 2, 2)`` float64 transitions whose float32 block products (blocks of 110)
    lose a path no message loses. Sequence 0: block 2 ends with 28 steps that cost state 0
    2 a step (its first message favours state 1 by 56); block 1 costs state 0 2 a step for 55
    steps, then state 1 2 a step for 55 (no switching), so its product is a multiple of the
    identity, but the partial product over its second half carries ``exp(-110)`` for state 1,
    which float32 rounds to 0, and the product comes out ``diag(1, 0)``; block 0 mixes. Every
    message and shifted sum stays within ``exp(-58)`` of its max, above the underflow
    threshold. Sequence 1 is an ordinary chain."""
    off = -math.inf
    m = torch.randn(2, 330, 2, 2, generator=torch.Generator().manual_seed(2),
                    dtype=torch.float64).log_softmax(-1)
    stay = torch.tensor([[0.0, off], [off, 0.0]], dtype=torch.float64)
    m[0, 110:] = stay
    m[0, 110:165, 0, 0] = -2.0
    m[0, 165:220, 1, 1] = -2.0
    m[0, 302:, 0, 0] = -2.0
    return m


def test_a_product_that_loses_a_path_is_caught_by_the_drift_check(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """:func:`drifting_chain`'s block 1 product hands block 0 the end vector ``(1, 0)`` where
    the truth is ``(exp(-56), 1)``; block 1's own recursion gets its first message right, the
    two disagree, and sequence 0 (only) is recomputed by the exact recursion: log Z and the
    gradient are the float64 recursion's. (Without the check, log Z is off by 0.14.)"""
    m64 = drifting_chain()
    e = m64[0, 165:220].float().exp()
    partial = e[0]
    for step in e[1:]:
        partial = partial @ step
        partial = partial / partial.max()
    assert partial[1, 1] == 0  # the path through state 1 is lost in float32
    only_sequence_0_goes_exact(monkeypatch, m64, 110)


@pytest.mark.parametrize("dtype,gap,tol", [(torch.float64, 1e4, 1e-12),
                                           (torch.float32, 1e3, 2e-5),
                                           (torch.float32, 110.0, 2e-5)])
def test_blocked_peaks_apart(dtype: torch.dtype, gap: float, tol: float) -> None:
    """The sticky chain of ``test_chain_methods.test_recursion_peaks_apart``: finite, and equal
    to the exact float64 recursion."""
    T = 33
    m64 = torch.tensor([[0.0, -gap], [-gap, 0.0]], dtype=torch.float64).repeat(1, T, 1, 1)
    m64[0, : T // 2, :, 1] -= gap
    m64[0, T // 2 + 1:, :, 0] -= gap
    m = m64.to(dtype).requires_grad_()
    z, _ = blocked_chain_messages(m, 5)
    ref_in = m64.clone().requires_grad_()
    truth = exact_beta0(ref_in).logsumexp(-1)
    top = z.logsumexp(-1)
    assert torch.isfinite(top).all()
    assert abs(top.double().item() - truth.item()) <= tol * (1 + gap)
    (g,) = torch.autograd.grad(top.sum(), m)
    (g_ref,) = torch.autograd.grad(truth.sum(), ref_in)
    assert not g.isnan().any()
    assert_close(g.double(), g_ref, rtol=0, atol=tol)


def test_blocked_second_backward_hessian_and_steps_form() -> None:
    """A second backward pass (``retain_graph``) recomputes the exponentials the first turned
    into its gradient; the steps form stacks and agrees; the Hessian is the exact twin's."""
    gen = torch.Generator().manual_seed(8)
    m = torch.randn(3, 11, 3, 3, generator=gen, dtype=torch.float64)
    whole = m.clone().requires_grad_()
    z, _ = blocked_chain_messages(whole, 4)
    weights = torch.rand(3, 3, generator=gen, dtype=torch.float64)
    (first,) = torch.autograd.grad(z, whole, weights, retain_graph=True)
    (second,) = torch.autograd.grad(z, whole, weights)
    assert first.abs().max() > 0
    assert_close(first, second, rtol=1e-13, atol=1e-13)
    steps = [x.clone().requires_grad_() for x in m.unbind(1)]
    zs, _ = blocked_chain_messages(steps, 4)
    assert_close(zs, z, rtol=1e-13, atol=1e-13)
    gs = torch.stack(torch.autograd.grad(zs, steps, weights), dim=1)
    assert_close(gs, first, rtol=1e-13, atol=1e-13)
    small = torch.randn(2, 5, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: blocked_chain_messages(x, 2)[0], (small,))


def sequential_hmm(T: int, K: int, batch: int) -> PlatedFactorGraph:
    gen = torch.Generator().manual_seed(T)
    return PlatedFactorGraph(
        [Factor(torch.randn(batch, K, generator=gen), ("n", "x_prev")),
         Factor(torch.randn(batch, T, K, K, generator=gen), ("n", "t", "x_prev", "x"))],
        [Plate("n", batch), Plate("t", T, sequential=True, prev={"x": "x_prev"})])


def test_blocked_dependent_steps_grow_like_sqrt_t() -> None:
    """Chosen by the plan for a long chain with a small batch, the blocked recursion dispatches
    a few operations (views included) per position within a block (60 positions for 10,000
    steps) and per block (167), forward and backward: under 5,000 for 10,000 steps, a tenth
    of the sequential recursion's; ten times the steps, about three times the operations."""
    counts: dict[object, int] = {}

    def count(T: int) -> int:
        g = sequential_hmm(T, 16, 4)
        g.log_partition()  # plan outside the recording
        leaves = [f.tensor.requires_grad_() for f in g.factors]
        rec = RecordOps()
        with rec:
            torch.autograd.grad(g.log_partition(), leaves)
        return len(rec.ops)

    for T in (1_000, 10_000):
        g = sequential_hmm(T, 16, 4)
        assert [s.method for s in g.plan().steps if isinstance(s, ScanStep)] == ["blocked"]
        counts[T] = count(T)
    with forced_chain_method("recursion"):
        counts["recursion"] = count(10_000)
    assert counts[10_000] < 5_000, counts
    assert counts[10_000] < 4 * counts[1_000], counts
    assert counts["recursion"] > 10 * counts[10_000], counts
    assert block_length(10_000, 16) == 60


def test_blocked_is_offered_for_the_log_ring_in_four_bytes_or_more() -> None:
    """The max ring has no blocked recursion (forcing it falls back to the fastest other
    method), nor does a 2-byte float; chains of one step neither."""
    assert "blocked" in chain_times("log", 16, 10_000, 16, "cpu", 4)
    assert "blocked" not in chain_times("max", 16, 10_000, 16, "cpu", 4)
    assert "blocked" not in chain_times("log", 16, 10_000, 16, "cpu", 2)
    assert "blocked" not in chain_times("log", 16, 1, 16, "cpu", 4)
    with forced_chain_method("blocked"):
        choice = chain_method("max", 16, 10_000, 16, "cpu", 4, None)
        assert choice is not None and choice[0] != "blocked"
        g = sequential_hmm(50, 3, 2)
        assert [s.method for s in g.plan("max").steps if isinstance(s, ScanStep)] != ["blocked"]
        assert [s.method for s in g.plan("log").steps if isinstance(s, ScanStep)] == ["blocked"]
        g.map()  # runs


def test_blocked_errors_name_the_block_length_and_the_ring() -> None:
    m = torch.randn(2, 6, 3, 3)
    with pytest.raises(ValueError, match="block length of 7 for a chain of 6 steps"):
        blocked_chain_messages(m, 7)
    with pytest.raises(ValueError, match="block length of 0"):
        blocked_chain_messages(m, 0)
    with pytest.raises(ValueError, match="log ring; not 'max'"):
        recursion_forward(MAX, m, blocked=True)
    z, _, _ = recursion_forward(LOG, m, blocked=True)
    assert_close(z, chain_messages(m)[0], rtol=1e-5, atol=1e-5)


def test_the_recursion_needs_no_more_memory_than_the_blocked_recursion() -> None:
    """A fused chain planned by the blocked recursion runs the sequential recursion instead
    (``plated.plan.eliminate._fusable``) without checking the memory cap again: that holds
    because the recursion's working memory is never above the blocked recursion's."""
    from plated.plan.chains import blocked_cost, chain_need, recursion_cost

    for batch in (1, 2, 16, 229):
        for length in (2, 3, 7, 30, 129, 1_000, 10_000):
            for k in (2, 3, 4, 8, 16, 64):
                for copied in (False, True):
                    rec = chain_need(recursion_cost("log", batch, length, k, copied=copied))
                    blk = chain_need(blocked_cost("log", batch, length, k, copied=copied))
                    assert rec <= blk, (batch, length, k, copied, rec, blk)
