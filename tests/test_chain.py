"""Chains found inside one contraction (an HMM unrolled into an einsum) run as a parallel scan.

The scan path is checked against the pairwise opt_einsum path (the same plan with chain
detection disabled), against Pyro's reference and, for MAP and samples, against the graph face's
sequential plate and brute force.
"""

from __future__ import annotations

import opt_einsum
import pytest
import torch
from pyro.ops.contract import einsum as pyro_einsum

import plated
import plated.plan.chains as chains_mod
from plated import Factor, Plate, PlatedFactorGraph, naive
from plated.contract import einsum_structures
from plated.plan import ChainStep, make_plan


def unrolled_hmm(t_len: int, k: int, batch: int, seed: int, hard_zeros: bool = False
                 ) -> tuple[str, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    syms = [opt_einsum.get_symbol(i + 1) for i in range(t_len)]
    plate = opt_einsum.get_symbol(0)
    ops = [torch.randn(batch, k, generator=gen)]
    inputs = [plate + syms[0]]
    for t in range(1, t_len):
        m = torch.randn(batch, k, k, generator=gen)
        if hard_zeros:
            m = m.masked_fill(torch.rand(batch, k, k, generator=gen) < 0.3, -torch.inf)
        ops.append(m)
        inputs.append(plate + syms[t - 1] + syms[t])
        if t % 3 == 0:  # a unary (emission) factor on some steps
            ops.append(torch.randn(batch, k, generator=gen))
            inputs.append(plate + syms[t])
    return ",".join(inputs) + "->", ops


def _pairwise(eq: str, ops: list[torch.Tensor], ring: str = "log") -> torch.Tensor:
    old = chains_mod.CHAIN_MIN_LENGTH
    chains_mod.CHAIN_MIN_LENGTH = 10**9
    plated.clear_plan_cache()
    try:
        return plated.einsum(eq, *ops, plates=opt_einsum.get_symbol(0), ring=ring)[0]
    finally:
        chains_mod.CHAIN_MIN_LENGTH = old
        plated.clear_plan_cache()


@pytest.mark.parametrize("t_len,k,batch", [(8, 2, 1), (9, 3, 4), (33, 4, 3), (64, 5, 2)])
@pytest.mark.parametrize("ring", ["log", "max"])
def test_chain_matches_pairwise_and_pyro(t_len: int, k: int, batch: int, ring: str) -> None:
    eq, ops = unrolled_hmm(t_len, k, batch, seed=t_len * 10 + k)
    plate = opt_einsum.get_symbol(0)
    plated.clear_plan_cache()
    (z,) = plated.einsum(eq, *ops, plates=plate, ring=ring)  # type: ignore[arg-type]
    (structure,), _ = einsum_structures(eq, *ops, plates=plate,
                                        ring=ring)  # type: ignore[arg-type]
    assert any(isinstance(step, ChainStep) for step in make_plan(structure).steps)
    torch.testing.assert_close(z, _pairwise(eq, ops, ring), rtol=1e-10, atol=1e-10)
    if ring == "log":
        (ref,) = pyro_einsum(eq, *ops, plates=plate, backend="pyro.ops.einsum.torch_log")
        torch.testing.assert_close(z, ref, rtol=1e-10, atol=1e-10)


def test_chain_gradients_match_pairwise() -> None:
    eq, ops = unrolled_hmm(20, 3, 2, seed=3)
    ops = [x.requires_grad_() for x in ops]
    plate = opt_einsum.get_symbol(0)
    plated.clear_plan_cache()
    (z,) = plated.einsum(eq, *ops, plates=plate)
    g1 = torch.autograd.grad(z, ops)
    g2 = torch.autograd.grad(_pairwise(eq, ops), ops)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_chain_hard_zeros_no_nan() -> None:
    eq, ops = unrolled_hmm(16, 3, 3, seed=5, hard_zeros=True)
    ops = [x.requires_grad_() for x in ops]
    plate = opt_einsum.get_symbol(0)
    (z,) = plated.einsum(eq, *ops, plates=plate)
    torch.testing.assert_close(z, _pairwise(eq, ops))
    for g in torch.autograd.grad(z, ops):
        assert not g.isnan().any()


def _graph(t_len: int, k: int, seed: int) -> list[Factor]:
    gen = torch.Generator().manual_seed(seed)
    factors = [Factor(torch.randn(k, generator=gen), ("x0",))]
    for t in range(1, t_len):
        factors.append(Factor(torch.randn(k, k, generator=gen), (f"x{t - 1}", f"x{t}")))
    return factors


def test_chain_map_and_samples_match_brute_force() -> None:
    factors = _graph(9, 2, seed=11)  # 2**9 joint assignments
    g = PlatedFactorGraph(factors)
    assert any(isinstance(step, ChainStep) for step in g.plan("max").steps)
    best, score = naive.map(factors)
    torch.testing.assert_close(g.max_log_density(), score)
    mp = g.map()
    assert all(int(mp[v]) == int(best[v]) for v in best)
    # samples: compare empirical pair frequencies of (x0, x8) with brute-force marginals
    en = naive.enumerate_joint(factors)
    probs = (en.log_joint - en.log_joint.logsumexp(0)).exp()
    s = g.sample(20000)
    for v in ("x0", "x4", "x8"):
        col = [c for c, (name, _) in enumerate(en.copies) if name == v][0]
        p1 = torch.zeros(2, dtype=probs.dtype).index_add(0, en.assignments[:, col], probs)
        freq = torch.bincount(s[v], minlength=2).to(probs.dtype) / 20000
        assert (freq - p1).abs().max() < 0.02, (v, freq, p1)
    m = g.marginals()
    m0 = naive.marginals(factors)
    for v in m0:
        torch.testing.assert_close(m[v], m0[v])


def test_unrolled_chain_equals_sequential_plate() -> None:
    k, t_len = 3, 40
    gen = torch.Generator().manual_seed(2)
    init = torch.randn(k, generator=gen)
    trans = torch.randn(t_len, k, k, generator=gen)
    seq = PlatedFactorGraph(
        [Factor(init, ("x_prev",)), Factor(trans, ("t", "x_prev", "x"))],
        [Plate("t", t_len, sequential=True, prev={"x": "x_prev"})])
    unrolled = PlatedFactorGraph(
        [Factor(init, ("y0",))]
        + [Factor(trans[t], (f"y{t}", f"y{t + 1}")) for t in range(t_len)])
    torch.testing.assert_close(seq.log_partition(), unrolled.log_partition())
    torch.testing.assert_close(seq.max_log_density(), unrolled.max_log_density())
    a, b = seq.map(), unrolled.map()
    assert int(a["x_prev"]) == int(b["y0"])
    assert [int(v) for v in a["x"]] == [int(b[f"y{t + 1}"]) for t in range(t_len)]
