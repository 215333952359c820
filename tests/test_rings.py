"""The log ring's scan kernel: values, gradients and second derivatives.

``_LogMatmul`` (the matrix product of each level of the scan's product tree) has a hand-written
backward pass; under ``create_graph`` it must stay differentiable, or second derivatives of log Z
(e.g. gradients of marginals with respect to parameters) would silently be wrong.
"""

from __future__ import annotations

import pytest
import torch

from plated import Factor, Plate, PlatedFactorGraph, naive
from plated.rings import LOG, _LogMatmul


@pytest.mark.parametrize("n", [2, 3, 8, 9])
def test_level_matches_pairwise_products(n: int) -> None:
    m = torch.randn(3, n, 4, 4, requires_grad=True)
    out = LOG.level(m)
    assert out.shape == (3, (n + 1) // 2, 4, 4)
    # each output is the log of a product of neighbours; an odd level's last matrix is carried
    direct = [torch.logsumexp(m[:, 2 * i, :, :, None] + m[:, 2 * i + 1, None, :, :], dim=-2)
              for i in range(n // 2)] + ([m[:, -1]] if n % 2 else [])
    ref = torch.stack(direct, dim=1)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(out)
    g1, = torch.autograd.grad((out * w).sum(), m)
    g2, = torch.autograd.grad((ref * w).sum(), m)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n", [2, 5, 8])
def test_level_first_and_second_derivatives(n: int) -> None:
    m = torch.randn(2, n, 3, 3, requires_grad=True)
    assert torch.autograd.gradcheck(LOG.level, (m,))
    assert torch.autograd.gradgradcheck(LOG.level, (m,))


def test_log_matmul_second_derivatives() -> None:
    a = torch.randn(2, 3, 4, 4, requires_grad=True)
    b = torch.randn(2, 3, 4, 4, requires_grad=True)
    assert torch.autograd.gradcheck(_LogMatmul.apply, (a, b))
    assert torch.autograd.gradgradcheck(_LogMatmul.apply, (a, b))


def test_chain_hessian_matches_brute_force() -> None:
    """Second derivatives of log Z through a parallel scan equal those of brute force."""
    T, K = 5, 3
    init = torch.randn(K)
    trans = torch.randn(T, K, K, requires_grad=True)

    def logz(tr: torch.Tensor, fast: bool) -> torch.Tensor:
        factors = [Factor(init, ("x_prev",)), Factor(tr, ("t", "x_prev", "x"))]
        plates = [Plate("t", T, sequential=True, prev={"x": "x_prev"})]
        if fast:
            return PlatedFactorGraph(factors, plates).log_partition()
        return naive.log_partition(factors, plates)

    h_fast = torch.autograd.functional.hessian(lambda t: logz(t, True), trans)
    h_ref = torch.autograd.functional.hessian(lambda t: logz(t, False), trans)
    assert h_fast.abs().max() > 1e-3  # not vacuously zero
    torch.testing.assert_close(h_fast, h_ref, rtol=1e-8, atol=1e-10)


def test_sample_with_a_generator_is_reproducible_and_leaves_the_global_rng() -> None:
    """``sample(generator=...)`` draws from that generator only (through a chain and a plate)."""
    T, K = 6, 3
    factors = [Factor(torch.randn(4, K), ("n", "x_prev")),
               Factor(torch.randn(4, T, K, K), ("n", "t", "x_prev", "x")),
               Factor(torch.randn(4, K), ("n", "c")),
               Factor(torch.randn(4, K, K), ("n", "c", "x_prev"))]
    plates = [Plate("n", 4), Plate("t", T, sequential=True, prev={"x": "x_prev"})]
    g = PlatedFactorGraph(factors, plates)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = g.sample(50, generator=torch.Generator().manual_seed(7))
    after = torch.rand(3)
    assert torch.equal(before, after)  # the global stream did not move
    b = g.sample(50, generator=torch.Generator().manual_seed(7))
    c = g.sample(50, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(a[v], b[v]) for v in a)
    assert any(not torch.equal(a[v], c[v]) for v in a)
