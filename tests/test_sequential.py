"""Sequential (Markov) plates: chains against hand-written recursions and brute force.

The graph of a hidden Markov model of length ``T`` on the graph face::

    Plate("t", T, sequential=True, prev={"x": "x_prev"})
    Factor(init,  ("x_prev",))            # the state before the chain, x_{-1}
    Factor(trans, ("t", "x_prev", "x"))   # x_{t-1} -> x_t; at t = 0, x_{-1} -> x_0
    Factor(emit,  ("t", "x"))             # log-likelihood of the observation at t

The references are written in the tests as plain Python loops over time (forward algorithm,
Viterbi), which is fine for a reference; the engine itself eliminates the chain by a log-depth
parallel scan (see ``test_plan.py`` for the proof that it does not loop over time).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import RTOL, assignment_rows, sample_pvalue
from torch.testing import assert_close

from plated import Factor, Plate, PlatedFactorGraph, naive


def forward(init: torch.Tensor, trans: torch.Tensor, emit: torch.Tensor,
            semiring: str = "log") -> torch.Tensor:
    """Forward algorithm (``"log"``) or Viterbi score (``"max"``), batched over leading dims.

    :param init: ``(*batch, K)`` over x_{-1}.
    :param trans: ``(*batch, T, K, K)``, ``trans[..., t, i, j]`` for x_{t-1} = i -> x_t = j.
    :param emit: ``(*batch, T, K)``.
    """
    alpha = init
    for t in range(trans.shape[-3]):
        step = alpha.unsqueeze(-1) + trans[..., t, :, :]
        alpha = (step.logsumexp(-2) if semiring == "log" else step.amax(-2)) + emit[..., t, :]
    return alpha.logsumexp(-1) if semiring == "log" else alpha.amax(-1)


def forward_marginals(init: torch.Tensor, trans: torch.Tensor, emit: torch.Tensor
                      ) -> torch.Tensor:
    """Posterior marginals of x_t, ``(*batch, T, K)``: the gradient of the forward algorithm's
    log Z with respect to the emission log-likelihoods (forward-backward by autograd)."""
    emit = emit.detach().requires_grad_()
    (grad,) = torch.autograd.grad(forward(init, trans, emit).sum(), emit)
    return grad


def path_score(init: torch.Tensor, trans: torch.Tensor, emit: torch.Tensor,
               x_prev: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Log joint of a path: ``x_prev`` ``(*batch)``, ``x`` ``(*batch, T)``."""
    prev = torch.cat([x_prev.unsqueeze(-1), x[..., :-1]], dim=-1)
    K = init.shape[-1]
    score = init.gather(-1, x_prev.unsqueeze(-1))[..., 0]
    rows = trans.gather(-2, prev[..., None, None].expand(*prev.shape, 1, K))[..., 0, :]
    tr = rows.gather(-1, x.unsqueeze(-1))[..., 0]
    em = emit.gather(-1, x.unsqueeze(-1))[..., 0]
    return score + tr.sum(-1) + em.sum(-1)


def hmm(init: torch.Tensor, trans: torch.Tensor, emit: torch.Tensor, batch: bool = False
        ) -> PlatedFactorGraph:
    T = trans.shape[-3]
    plates = [Plate("t", T, sequential=True, prev={"x": "x_prev"})]
    b: tuple[str, ...] = ()
    if batch:
        plates.insert(0, Plate("n", init.shape[0]))
        b = ("n",)
    return PlatedFactorGraph(
        [Factor(init, (*b, "x_prev"), name="init"),
         Factor(trans, (*b, "t", "x_prev", "x"), name="trans"),
         Factor(emit, (*b, "t", "x"), name="emit")],
        plates)


def random_hmm(T: int, K: int, batch: tuple[int, ...] = (), homogeneous: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    init = torch.randn(*batch, K).log_softmax(-1)
    if homogeneous:  # one transition matrix for all steps, as a stride-0 view
        trans = torch.randn(*batch, 1, K, K).log_softmax(-1).expand(*batch, T, K, K)
    else:
        trans = torch.randn(*batch, T, K, K).log_softmax(-1)
    emit = torch.randn(*batch, T, K)
    return init, trans, emit


# -- chains against the forward algorithm --------------------------------------------------------


@pytest.mark.parametrize("T", range(1, 41))
def test_hmm_log_partition_vs_forward(T: int) -> None:
    gen = torch.Generator().manual_seed(T)
    K = int(torch.randint(1, 6, (1,), generator=gen))
    init, trans, emit = random_hmm(T, K, homogeneous=bool(T % 2))
    g = hmm(init, trans, emit)
    assert_close(g.log_partition(), forward(init, trans, emit), rtol=RTOL, atol=1e-10)
    assert_close(g.max_log_density(), forward(init, trans, emit, "max"), rtol=RTOL, atol=1e-10)
    m = g.map()
    assert m["x"].shape == (T,) and m["x_prev"].shape == ()
    assert_close(path_score(init, trans, emit, m["x_prev"], m["x"]), g.max_log_density(),
                 rtol=RTOL, atol=1e-10)
    assert_close(g.marginals()["x"], forward_marginals(init, trans, emit), rtol=0, atol=1e-9)


@pytest.mark.parametrize("T,K", [(1, 1), (1, 3), (2, 2), (3, 3), (4, 2), (4, 3), (6, 2)])
def test_short_hmm_vs_brute_force(T: int, K: int) -> None:
    init, trans, emit = random_hmm(T, K)
    g = hmm(init, trans, emit)
    en = naive.enumerate_joint(list(g.factors), list(g.plates))
    assert_close(g.log_partition(), en.log_joint.logsumexp(0), rtol=RTOL, atol=1e-10)
    assert_close(g.max_log_density(), en.log_joint.max(), rtol=RTOL, atol=1e-10)
    m = g.map()
    ref_map, ref_val = naive.map(list(g.factors), list(g.plates))
    assert {v: x.shape for v, x in m.items()} == {v: x.shape for v, x in ref_map.items()}
    row = assignment_rows(en, {v: x.unsqueeze(0) for v, x in m.items()})
    assert_close(en.log_joint[row[0]], ref_val, rtol=RTOL, atol=1e-10)
    marg = g.marginals()
    ref = naive.marginals(list(g.factors), list(g.plates))
    assert set(marg) == set(ref) == {"x", "x_prev"}
    for v in ref:
        assert_close(marg[v], ref[v], rtol=0, atol=1e-8)


def test_tiny_hmm_samples_chi_squared() -> None:
    """4000 joint samples of a 3-step, 2-state chain (16 assignments) against the enumerated
    posterior; deterministic under the fixed seed."""
    init, trans, emit = random_hmm(3, 2)
    g = hmm(init, trans, emit)
    en = naive.enumerate_joint(list(g.factors), list(g.plates))
    samples = g.sample(4000)
    assert samples["x"].shape == (4000, 3) and samples["x_prev"].shape == (4000,)
    p, dof, impossible = sample_pvalue(en, samples)
    assert impossible == 0 and dof >= 10
    assert p > 1e-6, p


def test_hmm_with_hard_zeros_vs_brute_force() -> None:
    """A left-to-right chain (upper-triangular transitions: -inf below the diagonal)."""
    T, K = 5, 3
    init, trans, emit = random_hmm(T, K)
    mask = torch.ones(K, K, dtype=torch.bool).tril(-1)
    trans = trans.masked_fill(mask, -math.inf)
    g = hmm(init, trans, emit)
    en = naive.enumerate_joint(list(g.factors), list(g.plates))
    assert_close(g.log_partition(), en.log_joint.logsumexp(0), rtol=RTOL, atol=1e-10)
    assert_close(g.log_partition(), forward(init, trans, emit), rtol=RTOL, atol=1e-10)
    assert_close(g.max_log_density(), en.log_joint.max(), rtol=RTOL, atol=1e-10)
    samples = g.sample(500)
    assert (samples["x"].diff(dim=-1) >= 0).all(), "sampled a forbidden (downward) transition"
    assert (samples["x"][:, 0] >= samples["x_prev"]).all()
    ref = naive.marginals(list(g.factors), list(g.plates))
    for v, m in g.marginals().items():
        assert_close(m, ref[v], rtol=0, atol=1e-8)


# -- chains inside an independent plate ------------------------------------------------------------


def test_chains_in_an_independent_plate_vs_forward() -> None:
    N, T, K = 5, 17, 3
    init, trans, emit = random_hmm(T, K, batch=(N,))
    g = hmm(init, trans, emit, batch=True)
    per_seq = forward(init, trans, emit)
    assert_close(g.log_partition(), per_seq.sum(), rtol=RTOL, atol=1e-10)
    assert_close(g.max_log_density(), forward(init, trans, emit, "max").sum(), rtol=RTOL,
                 atol=1e-10)
    m = g.map()
    assert m["x"].shape == (N, T) and m["x_prev"].shape == (N,)
    assert_close(path_score(init, trans, emit, m["x_prev"], m["x"]).sum(), g.max_log_density(),
                 rtol=RTOL, atol=1e-10)
    kept = PlatedFactorGraph(list(g.factors), list(g.plates), keep_plates=("n",))
    assert_close(kept.log_partition(), per_seq, rtol=RTOL, atol=1e-10)
    marg = g.marginals()
    assert marg["x"].shape == (N, T, K) and marg["x_prev"].shape == (N, K)
    assert_close(marg["x"], forward_marginals(init, trans, emit), rtol=0, atol=1e-9)


def test_chains_in_an_independent_plate_vs_brute_force() -> None:
    N, T, K = 2, 2, 2
    init, trans, emit = random_hmm(T, K, batch=(N,))
    g = hmm(init, trans, emit, batch=True)
    factors, plates = list(g.factors), list(g.plates)
    en = naive.enumerate_joint(factors, plates)
    assert en.log_joint.numel() == K ** (N * (T + 1))
    assert_close(g.log_partition(), en.log_joint.logsumexp(0), rtol=RTOL, atol=1e-10)
    ref = naive.marginals(factors, plates)
    for v, m in g.marginals().items():
        assert_close(m, ref[v], rtol=0, atol=1e-8)
    p, _, impossible = sample_pvalue(en, g.sample(4000))
    assert impossible == 0 and p > 1e-6, p


def test_sequential_plate_declared_first_lays_out_results_first() -> None:
    """Results follow plate declaration order: (t, n) here, not (n, t)."""
    N, T, K = 3, 4, 2
    init, trans, emit = random_hmm(T, K, batch=(N,))
    factors = [Factor(init, ("n", "x_prev")), Factor(trans.permute(1, 0, 2, 3), ("t", "n",
               "x_prev", "x")), Factor(emit.transpose(0, 1), ("t", "n", "x"))]
    g = PlatedFactorGraph(factors, [Plate("t", T, sequential=True, prev={"x": "x_prev"}),
                                    Plate("n", N)])
    assert_close(g.log_partition(), forward(init, trans, emit).sum(), rtol=RTOL, atol=1e-10)
    assert g.map()["x"].shape == (T, N)
    assert g.sample(7)["x"].shape == (7, T, N)
    assert g.marginals()["x"].shape == (T, N, K)
    ref = hmm(init, trans, emit, batch=True).marginals()["x"]
    assert_close(g.marginals()["x"], ref.transpose(0, 1), rtol=0, atol=1e-10)


# -- a long chain --------------------------------------------------------------------------------


def test_long_chain() -> None:
    """T = 10,000, K = 4, batch 2: log Z and the Viterbi score equal hand-written recursions over
    10,000 steps, and our MAP path scores exactly the Viterbi score."""
    N, T, K = 2, 10_000, 4
    init, trans, emit = random_hmm(T, K, batch=(N,))
    g = hmm(init, trans, emit, batch=True)
    logz = g.log_partition()
    assert_close(logz, forward(init, trans, emit).sum(), rtol=RTOL, atol=1e-8)
    best = g.max_log_density()
    assert_close(best, forward(init, trans, emit, "max").sum(), rtol=RTOL, atol=1e-8)
    m = g.map()
    assert m["x"].shape == (N, T) and m["x_prev"].shape == (N,)
    assert m["x"].dtype == torch.long
    assert_close(path_score(init, trans, emit, m["x_prev"], m["x"]).sum(), best, rtol=RTOL,
                 atol=1e-8)
    marg = g.marginals()["x"]
    assert marg.shape == (N, T, K)
    assert_close(marg, forward_marginals(init, trans, emit), rtol=0, atol=1e-8)


def test_long_chain_samples_and_marginals() -> None:
    """A deterministic chain (a cyclic shift, with hard zeros elsewhere) of length 10,000: every
    sample is the shifted path, and marginals put all mass on it."""
    T, K = 10_000, 4
    shift = torch.full((K, K), -math.inf)
    shift[torch.arange(K), (torch.arange(K) + 1) % K] = 0.0
    trans = shift.expand(T, K, K)
    init = torch.tensor([0.0] + [-math.inf] * (K - 1))
    emit = torch.zeros(T, K)
    g = hmm(init, trans, emit)
    assert_close(g.log_partition(), torch.tensor(0.0), rtol=0, atol=1e-10)
    expected = (torch.arange(T) + 1) % K
    s = g.sample(3)
    assert (s["x"] == expected).all()
    assert (g.map()["x"] == expected).all()
    marg = g.marginals()["x"]
    assert_close(marg, torch.nn.functional.one_hot(expected, K).double(), rtol=0, atol=1e-10)


# -- multi-variable chains -----------------------------------------------------------------------


def two_chain_graph(T: int, Kx: int, Ky: int) -> tuple[list[Factor], list[Plate],
                                                       torch.Tensor, torch.Tensor, torch.Tensor]:
    """x and y both chains of plate t, coupled; returns the graph and the equivalent HMM on the
    product state (x, y) (index x * Ky + y)."""
    init = torch.randn(Kx, Ky)
    tx = torch.randn(T, Kx, Kx)  # x_prev -> x
    ty = torch.randn(T, Ky, Kx, Ky)  # y_prev, x -> y
    em = torch.randn(T, Kx, Ky)
    factors = [Factor(init, ("x_prev", "y_prev")), Factor(tx, ("t", "x_prev", "x")),
               Factor(ty, ("t", "y_prev", "x", "y")), Factor(em, ("t", "x", "y"))]
    plates = [Plate("t", T, sequential=True, prev={"x": "x_prev", "y": "y_prev"})]
    # product-state transition [t, (xp, yp), (x, y)]
    big = (tx[:, :, None, :, None] + ty[:, None, :, :, :]).reshape(T, Kx * Ky, Kx * Ky)
    return factors, plates, init.reshape(-1), big, em.reshape(T, Kx * Ky)


def test_multi_variable_chain_vs_brute_force() -> None:
    factors, plates, *_ = two_chain_graph(T=3, Kx=2, Ky=2)
    g = PlatedFactorGraph(factors, plates)
    en = naive.enumerate_joint(factors, plates)
    assert en.log_joint.numel() == 4 ** 4
    assert_close(g.log_partition(), en.log_joint.logsumexp(0), rtol=RTOL, atol=1e-10)
    assert_close(g.max_log_density(), en.log_joint.max(), rtol=RTOL, atol=1e-10)
    m = g.map()
    assert m["x"].shape == m["y"].shape == (3,)
    row = assignment_rows(en, {v: x.unsqueeze(0) for v, x in m.items()})
    assert_close(en.log_joint[row[0]], en.log_joint.max(), rtol=RTOL, atol=1e-10)
    ref = naive.marginals(factors, plates)
    marg = g.marginals()
    assert set(marg) == {"x", "y", "x_prev", "y_prev"}
    for v in ref:
        assert_close(marg[v], ref[v], rtol=0, atol=1e-8)
    p, _, impossible = sample_pvalue(en, g.sample(4000))
    assert impossible == 0 and p > 1e-6, p


@pytest.mark.parametrize("T", [1, 7, 64, 100])
def test_multi_variable_chain_vs_product_state_forward(T: int) -> None:
    factors, plates, init, big, em = two_chain_graph(T=T, Kx=3, Ky=2)
    g = PlatedFactorGraph(factors, plates)
    assert_close(g.log_partition(), forward(init, big, em), rtol=RTOL, atol=1e-9)
    assert_close(g.max_log_density(), forward(init, big, em, "max"), rtol=RTOL, atol=1e-9)


# -- previous-value dims in a plate nested inside the sequential plate --------------------------


def nested_graph(T: int, M: int, K: int, J: int) -> tuple[list[Factor], list[Plate]]:
    """Plate m nested in sequential plate t; factor (t, m, x_prev, z) reads the previous state
    from inside m, and z (in {t, m}) also talks to x."""
    factors = [
        Factor(torch.randn(K), ("x_prev",), name="init"),
        Factor(torch.randn(T, K, K), ("t", "x_prev", "x"), name="trans"),
        Factor(torch.randn(T, M, K, J), ("t", "m", "x_prev", "z"), name="from_prev"),
        Factor(torch.randn(T, M, K, J), ("t", "m", "x", "z"), name="to_curr"),
    ]
    plates = [Plate("t", T, sequential=True, prev={"x": "x_prev"}), Plate("m", M)]
    return factors, plates


def test_prev_dim_in_nested_plate_vs_brute_force() -> None:
    factors, plates = nested_graph(T=3, M=2, K=2, J=2)
    g = PlatedFactorGraph(factors, plates)
    en = naive.enumerate_joint(factors, plates)
    assert en.var_plates["z"] == ("t", "m")
    assert_close(g.log_partition(), en.log_joint.logsumexp(0), rtol=RTOL, atol=1e-10)
    assert_close(g.max_log_density(), en.log_joint.max(), rtol=RTOL, atol=1e-10)
    m = g.map()
    assert m["z"].shape == (3, 2) and m["x"].shape == (3,)
    row = assignment_rows(en, {v: x.unsqueeze(0) for v, x in m.items()})
    assert_close(en.log_joint[row[0]], en.log_joint.max(), rtol=RTOL, atol=1e-10)
    ref = naive.marginals(factors, plates)
    for v, mg in g.marginals().items():
        assert_close(mg, ref[v], rtol=0, atol=1e-8)


def test_prev_dim_in_nested_plate_vs_forward() -> None:
    """The nested plate folds into a per-step transition: trans[t] + sum_m logsumexp_z(...)."""
    T, M, K, J = 30, 3, 3, 2
    factors, plates = nested_graph(T, M, K, J)
    init, trans, from_prev, to_curr = (f.tensor for f in factors)
    pair = from_prev.unsqueeze(3) + to_curr.unsqueeze(2)  # t, m, x_prev, x, z
    step = trans + pair.logsumexp(-1).sum(1)
    g = PlatedFactorGraph(factors, plates)
    assert_close(g.log_partition(), forward(init, step, torch.zeros(T, K)), rtol=RTOL, atol=1e-9)
    step_max = trans + pair.amax(-1).sum(1)
    assert_close(g.max_log_density(), forward(init, step_max, torch.zeros(T, K), "max"),
                 rtol=RTOL, atol=1e-9)
