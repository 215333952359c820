"""The graph face's kept variables and factor marginals, against brute-force enumeration.

* ``PlatedFactorGraph(..., keep_vars=...)``: :meth:`log_partition` keeps those variables, as an
  einsum output does; checked against :func:`plated.naive.einsum` on the same equation.
* :meth:`~plated.PlatedFactorGraph.factor_marginals`: the posterior over a whole factor's dims,
  checked against the enumerated joint.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from plated import Factor, GraphError, Plate, PlatedFactorGraph, naive


def _graph(seed: int) -> tuple[list[Factor], list[Plate]]:
    g = torch.Generator().manual_seed(seed)
    factors = [
        Factor(torch.randn(2, generator=g, dtype=torch.float64), ("a",)),
        Factor(torch.randn(2, 3, generator=g, dtype=torch.float64), ("a", "b")),
        Factor(torch.randn(3, 3, 2, generator=g, dtype=torch.float64), ("i", "b", "c")),
    ]
    return factors, [Plate("i", 3)]


@pytest.mark.parametrize("keep", [("a",), ("b",), ("b", "a"), ("c",), ("c", "a")])
@pytest.mark.parametrize("seed", range(3))
def test_keep_vars_equals_naive_einsum(keep: tuple[str, ...], seed: int) -> None:
    factors, plates = _graph(seed)
    g = PlatedFactorGraph(factors, plates, keep_vars=keep)
    dims = g.result_dims()
    assert dims[len(dims) - len(keep):] == keep
    out = "".join(dims)
    eq = ",".join("".join(f.dims) for f in factors) + "->" + out
    (ref,) = naive.einsum(eq, *[f.tensor for f in factors], plates="i")
    torch.testing.assert_close(g.log_partition(), ref)
    # the other queries still eliminate everything
    assert g.log_partition().dim() == len(dims)
    torch.testing.assert_close(
        g.marginals()["a"], naive.marginals(factors, plates)["a"])


def test_factor_marginals_equal_enumerated_pair_posterior() -> None:
    gen = torch.Generator().manual_seed(0)
    ab = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    bc = torch.randn(4, 2, generator=gen, dtype=torch.float64)
    c = torch.randn(2, generator=gen, dtype=torch.float64)
    factors = [Factor(ab, ("a", "b")), Factor(bc, ("b", "c")), Factor(c, ("c",))]
    got = PlatedFactorGraph(factors).factor_marginals()
    joint = ab[:, :, None] + bc[None] + c[None, None]
    p = (joint - joint.logsumexp((0, 1, 2))).exp()
    torch.testing.assert_close(got[0], p.sum(2))
    torch.testing.assert_close(got[1], p.sum(0))
    torch.testing.assert_close(got[2], p.sum((0, 1)))


def test_factor_marginals_of_a_chain_sum_to_one_per_step() -> None:
    gen = torch.Generator().manual_seed(1)
    trans = torch.randn(5, 3, 3, generator=gen, dtype=torch.float64)
    init = torch.randn(3, generator=gen, dtype=torch.float64)
    factors = [Factor(init, ("z0",)), Factor(trans, ("t", "z0", "z"))]
    plates = [Plate("t", 5, sequential=True, prev={"z": "z0"})]
    (mu,) = PlatedFactorGraph(factors, plates).factor_marginals([1]).values()
    torch.testing.assert_close(mu.sum((1, 2)), torch.ones(5, dtype=torch.float64))
    # brute force: enumerate all 3**6 paths
    states = list(itertools.product(range(3), repeat=6))
    logw = torch.tensor([float(init[s[0]]) + sum(float(trans[t, s[t], s[t + 1]])
                                                 for t in range(5)) for s in states],
                        dtype=torch.float64)
    w = (logw - logw.logsumexp(0)).exp()
    ref = torch.zeros(5, 3, 3, dtype=torch.float64)
    for s, wt in zip(states, w, strict=True):
        for t in range(5):
            ref[t, s[t], s[t + 1]] += wt
    torch.testing.assert_close(mu, ref)


def test_factor_marginals_are_zero_where_log_z_is_minus_inf() -> None:
    x = torch.tensor([[0.0, 1.0], [-math.inf, -math.inf]], dtype=torch.float64)
    y = torch.zeros(2, 3, dtype=torch.float64)
    g = PlatedFactorGraph([Factor(x, ("n", "a")), Factor(y, ("n", "b"))], [Plate("n", 2)],
                          keep_plates=("n",))
    got = g.factor_marginals()
    assert torch.equal(got[1][1], torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(got[1][0], torch.full((3,), 1 / 3, dtype=torch.float64))


def test_factor_marginals_bad_index_names_the_count() -> None:
    factors, plates = _graph(0)
    with pytest.raises(GraphError, match="factor index 7 is out of range; the graph has 3"):
        PlatedFactorGraph(factors, plates).factor_marginals([7])


def test_log_partition_and_factor_marginals_agree_with_the_separate_queries() -> None:
    gen = torch.Generator().manual_seed(3)
    trans = torch.randn(4, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    init = torch.randn(3, generator=gen, dtype=torch.float64)
    g = PlatedFactorGraph([Factor(init, ("z0",)), Factor(trans, ("t", "z0", "z"))],
                          [Plate("t", 4, sequential=True, prev={"z": "z0"})])
    log_z, marginals = g.log_partition_and_factor_marginals([1])
    torch.testing.assert_close(log_z, g.log_partition())
    torch.testing.assert_close(marginals[1], g.factor_marginals([1])[1])
    # both differentiable: d log Z / d trans is the pairwise marginal itself
    (grad,) = torch.autograd.grad(log_z, trans, retain_graph=True)
    torch.testing.assert_close(grad, marginals[1])
    (second,) = torch.autograd.grad(marginals[1][0, 0, 0], trans)
    assert second.abs().sum() > 0
    # with nothing to differentiate, log Z is a constant (no freed graph behind it)
    log_z, _ = PlatedFactorGraph([Factor(init, ("z0",))]).log_partition_and_factor_marginals()
    assert not log_z.requires_grad
