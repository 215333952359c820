"""Random plated factor graphs against the brute-force twin, in every semiring.

Graphs come from :func:`plated.testing.random_graph` with fixed seeds (tractable by construction,
small enough for :mod:`plated.naive` to enumerate every joint assignment). Seeds are split into
parametrised chunks, and every assertion message names the seed, so a failure is reproduced by
``random_graph(seed, ...)`` alone.

Checked per graph: log Z (log ring) to 1e-8 relative; the max ring's ``max_log_density`` and the
log joint of our MAP assignment equal the brute-force max (robust to ties); MAP and sample shapes;
marginals equal brute force and sum to one; posterior samples pass a chi-squared goodness-of-fit
test; gradients of log Z pass ``gradcheck`` and equal the brute-force gradients; hard zeros
(``-inf`` entries) give finite, NaN-free gradients; all-zero factors count assignments.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from helpers import RTOL, assignment_rows, log_num_assignments, logz_atol, sample_pvalue
from torch.testing import assert_close

from plated import Factor, GraphError, Plate, PlatedFactorGraph, naive, testing

CHUNK = 50
N_GRAPHS = 1000  # per run, in each of the soft and the hard-zero sweeps
N_SEQUENTIAL = 200  # extra graphs forced to have a sequential plate

N_SAMPLE_SEEDS = 300  # seeds considered for the chi-squared tests
MAX_SAMPLE_ASSIGNMENTS = 64  # only graphs with at most this many joint assignments are sampled
NUM_SAMPLES = 4000
P_MIN = 1e-6  # per-graph chi-squared p-value threshold (seeds are fixed: deterministic)

N_GRAD = 100


def chunks(n: int) -> list[range]:
    return [range(k, min(k + CHUNK, n)) for k in range(0, n, CHUNK)]


def chunk_id(r: range) -> str:
    return f"seeds{r.start}-{r.stop - 1}"


def rebuild(factors: list[Factor], tensors: list[torch.Tensor]) -> list[Factor]:
    return [Factor(t, f.dims, name=f.name) for f, t in zip(factors, tensors, strict=True)]


def check_graph(seed: int, factors: list[Factor], plates: list[Plate]) -> bool:
    """Every query of one graph against brute force; returns whether log Z is finite."""
    tag = f"seed {seed}"
    g = PlatedFactorGraph(factors, plates)
    en = naive.enumerate_joint(factors, plates)
    ref_logz = en.log_joint.logsumexp(0)
    ref_max = en.log_joint.max()

    # structure: variables, their sizes and plates
    variables = g.variables()
    assert set(variables) == set(en.var_plates), tag
    for v, (size, vplates) in variables.items():
        assert vplates == en.var_plates[v], f"{tag}: plates of {v!r}"
        assert size == en.sizes[[c for c, _ in en.copies].index(v)], f"{tag}: size of {v!r}"

    # log ring
    logz = g.log_partition()
    assert logz.shape == (), tag
    if ref_logz == -math.inf:
        # every assignment has zero weight: only the -inf results are defined
        assert logz == -math.inf, f"{tag}: brute force log Z is -inf, ours is {logz.item()}"
        assert g.max_log_density() == -math.inf, tag
        for v, m in g.marginals().items():
            assert not m.isnan().any(), f"{tag}: NaN marginal of {v!r} when log Z = -inf"
        # the MAP is arbitrary here, but well-formed; there is no distribution to sample (only
        # unvalidated graphs, which make no host-device sync, draw arbitrary samples)
        shapes = {v: tuple(en.plate_sizes[p] for p in ps) for v, ps in en.var_plates.items()}
        assert {v: tuple(x.shape) for v, x in g.map().items()} == shapes, tag
        if shapes:
            with pytest.raises(GraphError, match="log Z is -inf"):
                g.sample(2)
        unchecked = PlatedFactorGraph(factors, plates, validate=False)
        assert {v: tuple(x.shape[1:]) for v, x in unchecked.sample(2).items()} == shapes, tag
        return False
    assert_close(logz, ref_logz, rtol=RTOL, atol=logz_atol(factors), msg=lambda m: f"{tag}: {m}")

    # max ring: the value, and the value of our MAP assignment (ties may pick another argmax)
    mld = g.max_log_density()
    assert_close(mld, ref_max, rtol=RTOL, atol=logz_atol(factors), msg=lambda m: f"{tag}: {m}")
    ours = g.map()
    ref_map, ref_val = naive.map(factors, plates)
    assert set(ours) == set(ref_map), tag
    for v, x in ours.items():
        assert x.dtype == torch.long, f"{tag}: MAP of {v!r} has dtype {x.dtype}"
        assert x.shape == ref_map[v].shape, f"{tag}: MAP shape of {v!r}"
    row = assignment_rows(en, {v: x.unsqueeze(0) for v, x in ours.items()})
    assert_close(en.log_joint[row[0]], ref_val, rtol=RTOL, atol=logz_atol(factors),
                 msg=lambda m: f"{tag}: log joint of our MAP assignment: {m}")

    # marginals (autograd of log Z)
    marg = g.marginals()
    ref_marg = naive.marginals(factors, plates)
    assert set(marg) == set(ref_marg), tag
    for v, m in marg.items():
        assert m.shape == ref_marg[v].shape, f"{tag}: marginal shape of {v!r}"
        assert_close(m, ref_marg[v], rtol=0, atol=1e-8, msg=lambda s, v=v: f"{tag} {v!r}: {s}")
        assert_close(m.sum(-1), torch.ones(m.shape[:-1]), rtol=0, atol=1e-8,
                     msg=lambda s, v=v: f"{tag}: marginal of {v!r} does not sum to one: {s}")

    # samples: shapes, dtype, and support (never an assignment of zero weight)
    samples = g.sample(3)
    assert set(samples) == set(ref_marg), tag
    for v, x in samples.items():
        assert x.dtype == torch.long, tag
        assert x.shape == (3,) + ref_marg[v].shape[:-1], f"{tag}: sample shape of {v!r}"
    rows = assignment_rows(en, samples)
    assert (en.log_joint[rows] > -math.inf).all(), f"{tag}: sampled a zero-weight assignment"
    return True


# -- log Z, MAP, marginals ---------------------------------------------------------------------


@pytest.mark.parametrize("seeds", chunks(N_GRAPHS), ids=chunk_id)
def test_random_graphs_vs_brute_force(seeds: range) -> None:
    for seed in seeds:
        factors, plates = testing.random_graph(seed)
        assert check_graph(seed, factors, plates), f"seed {seed}: log Z is -inf without hard zeros"


@pytest.mark.parametrize("seeds", chunks(N_GRAPHS), ids=chunk_id)
def test_random_graphs_hard_zeros_vs_brute_force(seeds: range) -> None:
    finite = [check_graph(seed, *testing.random_graph(seed, hard_zero_prob=0.2)) for seed in seeds]
    # the sweep must exercise both the finite and the all-zero-weight (-inf) cases
    assert any(finite) and not all(finite), f"{seeds}: finite log Z for {sum(finite)} graphs"


@pytest.mark.parametrize("seeds", chunks(N_SEQUENTIAL), ids=chunk_id)
def test_random_sequential_graphs_vs_brute_force(seeds: range) -> None:
    for seed in seeds:
        factors, plates = testing.random_graph(seed, sequential=True)
        assert any(p.sequential for p in plates), f"seed {seed}"
        check_graph(seed, factors, plates)


# -- samples --------------------------------------------------------------------------------------


SAMPLE_VARIANTS: tuple[tuple[tuple[str, object], ...], ...] = (
    (), (("hard_zero_prob", 0.2),), (("sequential", True),))


@functools.cache
def sample_test(seed: int, variant: tuple[tuple[str, object], ...]
                ) -> tuple[str, float, int, int] | None:
    """Chi-squared test of ``NUM_SAMPLES`` joint samples of graph ``seed`` (``None`` if the graph
    is too big or has no finite log Z): ``(graph, p-value, dof, zero-weight samples)``.

    The sampler is seeded with ``seed``, so the result is a pure function of its arguments (and is
    cached: the per-chunk tests and the pooled test share the draws).
    """
    kw = dict(variant)
    factors, plates = testing.random_graph(seed, **kw)  # type: ignore[arg-type]
    en = naive.enumerate_joint(factors, plates)
    if en.log_joint.numel() > MAX_SAMPLE_ASSIGNMENTS or en.log_joint.logsumexp(0) == -math.inf:
        return None
    torch.manual_seed(seed)
    samples = PlatedFactorGraph(factors, plates).sample(NUM_SAMPLES)
    p, dof, impossible = sample_pvalue(en, samples)
    return f"seed {seed} {kw}", p, dof, impossible


def sample_tests(seeds: range) -> list[tuple[str, float, int]]:
    """The chi-squared tests of the small graphs among ``seeds``: ``(graph, p-value, dof)``."""
    out = []
    for seed in seeds:
        for variant in SAMPLE_VARIANTS:
            res = sample_test(seed, variant)
            if res is None:
                continue
            tag, p, dof, impossible = res
            assert impossible == 0, f"{tag}: {impossible} samples of zero-weight assignments"
            out.append((tag, p, dof))
    return out


@pytest.mark.parametrize("seeds", chunks(N_SAMPLE_SEEDS), ids=chunk_id)
def test_samples_chi_squared(seeds: range) -> None:
    """Per graph, p > 1e-6: with fixed seeds this is deterministic, and a wrong sampler (e.g. one
    off by a factor, or ignoring a coupling) fails it by a wide margin at 4000 samples."""
    results = sample_tests(seeds)
    assert len(results) >= 20, f"only {len(results)} small graphs among {seeds}"
    for tag, p, dof in results:
        assert p > P_MIN, f"{tag}: chi-squared p-value {p:.3g} (dof {dof})"


def test_samples_chi_squared_pooled() -> None:
    """All sample tests pooled: under a correct sampler p-values are uniform, so about 1% fall
    below 0.01; require fewer than 5% (and enough informative tests for that to mean something)."""
    results = sample_tests(range(N_SAMPLE_SEEDS))
    informative = [p for _, p, dof in results if dof > 0]
    assert len(informative) >= 300, len(informative)
    low = sum(p < 0.01 for p in informative) / len(informative)
    assert low < 0.05, f"{low:.1%} of {len(informative)} chi-squared tests have p < 0.01"
    # and the p-values are not piled up near 1 either (a test that cannot fail would be)
    assert sum(p > 0.5 for p in informative) / len(informative) < 0.7


def test_chi_squared_test_has_power() -> None:
    """The goodness-of-fit test rejects a slightly wrong sampler: samples drawn at temperature
    1/0.7 (every log factor scaled by 0.7) fail it on every small graph."""
    rejected = []
    for seed in range(60):
        factors, plates = testing.random_graph(seed)
        en = naive.enumerate_joint(factors, plates)
        if not 4 <= en.log_joint.numel() <= MAX_SAMPLE_ASSIGNMENTS:
            continue
        wrong = rebuild(factors, [0.7 * f.tensor for f in factors])
        p, _, _ = sample_pvalue(en, PlatedFactorGraph(wrong, plates).sample(NUM_SAMPLES))
        rejected.append(p < P_MIN)
    assert len(rejected) >= 20 and all(rejected), rejected


# -- log Z = -inf -----------------------------------------------------------------------------


def test_marginals_are_zero_when_log_partition_is_neginf() -> None:
    """Documented: when log Z == -inf, marginals are 0 (not NaN), for every variable.

    Includes a variable in a component of the graph whose own partition function is finite while
    another component has zero total weight (the smallest such graph first).
    """
    a = Factor(torch.zeros(2), ("a",))
    b = Factor(torch.full((3,), -math.inf), ("b",))
    g = PlatedFactorGraph([a, b])
    assert g.log_partition() == -math.inf
    marg = g.marginals()
    assert_close(marg["b"], torch.zeros(3), rtol=0, atol=0)
    assert_close(marg["a"], torch.zeros(2), rtol=0, atol=0)

    n_inf = 0
    for seed in range(200):
        factors, plates = testing.random_graph(seed, hard_zero_prob=0.2)
        g = PlatedFactorGraph(factors, plates)
        if g.log_partition() > -math.inf:
            continue
        n_inf += 1
        for v, m in g.marginals().items():
            assert (m == 0).all(), f"seed {seed}: marginal of {v!r} is {m} though log Z = -inf"
    assert n_inf >= 20, n_inf


# -- gradients ------------------------------------------------------------------------------------


def test_gradcheck_log_partition() -> None:
    for seed in range(N_GRAD):
        factors, plates = testing.random_graph(seed, requires_grad=True)
        tensors = [f.tensor for f in factors]

        def logz(*ts: torch.Tensor, factors: list[Factor] = factors,
                 plates: list[Plate] = plates) -> torch.Tensor:
            return PlatedFactorGraph(rebuild(factors, list(ts)), plates).log_partition()

        assert torch.autograd.gradcheck(logz, tensors), f"seed {seed}"


@pytest.mark.parametrize("hard_zero_prob", [0.0, 0.2])
def test_grad_matches_brute_force(hard_zero_prob: float) -> None:
    checked = 0
    for seed in range(N_GRAD):
        tag = f"seed {seed}"
        factors, plates = testing.random_graph(seed, hard_zero_prob=hard_zero_prob,
                                               requires_grad=True)
        tensors = [f.tensor for f in factors]
        logz = PlatedFactorGraph(factors, plates).log_partition()
        ours = torch.autograd.grad(logz, tensors)
        for k, gr in enumerate(ours):
            assert not gr.isnan().any(), f"{tag}: NaN in d log Z / d factor {k}"
            assert gr.isfinite().all(), f"{tag}: non-finite d log Z / d factor {k}"
        ref_logz = naive.log_partition(factors, plates)
        if ref_logz == -math.inf:
            assert logz == -math.inf, tag
            continue  # the brute-force gradient is NaN here; ours must just be NaN-free
        ref = torch.autograd.grad(ref_logz, tensors)
        for k, (a, b) in enumerate(zip(ours, ref, strict=True)):
            assert_close(a, b, rtol=1e-7, atol=1e-9,
                         msg=lambda m, k=k, tag=tag: f"{tag} factor {k}: {m}")
        checked += 1
    assert checked >= N_GRAD // 4, checked


def test_hard_zero_gradients_are_finite() -> None:
    """Gradients are NaN-free with -inf entries, including wrt the -inf entries themselves, and
    when log Z itself is -inf (random graphs with many hard zeros, and all-(-inf) factors)."""
    n_inf = 0
    for seed in range(N_GRAD):
        factors, plates = testing.random_graph(seed, hard_zero_prob=0.5, requires_grad=True)
        tensors = [f.tensor for f in factors]
        g = PlatedFactorGraph(factors, plates)
        logz = g.log_partition()
        n_inf += bool(logz == -math.inf)
        for k, gr in enumerate(torch.autograd.grad(logz, tensors)):
            assert not gr.isnan().any(), f"seed {seed}: NaN in d log Z / d factor {k}"
        mld = g.max_log_density()
        for k, gr in enumerate(torch.autograd.grad(mld, tensors)):
            assert not gr.isnan().any(), f"seed {seed}: NaN in d max / d factor {k}"
    assert n_inf >= 10, n_inf  # the sweep reaches log Z = -inf often

    # a factor that is -inf everywhere
    x = torch.randn(3, 4, 2, requires_grad=True)
    dead = torch.full((4, 2), -math.inf, requires_grad=True)
    g = PlatedFactorGraph([Factor(x, ("i", "a", "b")), Factor(dead, ("a", "b"))], [Plate("i", 3)])
    logz = g.log_partition()
    assert logz == -math.inf
    gx, gd = torch.autograd.grad(logz, [x, dead])
    assert not gx.isnan().any() and not gd.isnan().any()
    for m in g.marginals().values():
        assert not m.isnan().any()


# -- counting -------------------------------------------------------------------------------------


def test_all_zero_factors_count_assignments() -> None:
    """With every log factor 0 (potentials 1), Z is the number of joint assignments, the max log
    density is 0 (every assignment ties, and the MAP takes the first index), and every marginal
    is uniform."""
    for seed in range(200):
        tag = f"seed {seed}"
        factors, plates = testing.random_graph(seed)
        zeros = rebuild(factors, [torch.zeros_like(f.tensor) for f in factors])
        en = naive.enumerate_joint(zeros, plates)
        g = PlatedFactorGraph(zeros, plates)
        expected = torch.tensor(log_num_assignments(en))
        assert_close(g.log_partition(), expected, rtol=RTOL, atol=1e-12,
                     msg=lambda m, tag=tag: f"{tag}: {m}")
        assert_close(g.log_partition(), torch.tensor(math.log(en.log_joint.numel())),
                     rtol=RTOL, atol=1e-12, msg=lambda m, tag=tag: f"{tag}: {m}")
        assert g.max_log_density() == 0, tag
        # every assignment ties; documented: ties are broken toward the first index
        for v, x in g.map().items():
            assert (x == 0).all(), f"{tag}: MAP of {v!r} is {x}, not the first index"
        for v, m in g.marginals().items():
            assert_close(m, torch.full_like(m, 1.0 / m.shape[-1]), rtol=0, atol=1e-12,
                         msg=lambda s, v=v, tag=tag: f"{tag} {v!r}: {s}")
