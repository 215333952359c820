"""Property tests (hypothesis) of the engine against brute force, on tiny graphs.

Every example is a plated factor graph small enough for :mod:`plated.naive` to enumerate every
joint assignment (domain sizes and plate sizes 1-3, chains of length 1-4, at most
``MAX_ASSIGNMENTS`` joint assignments). Two strategies draw the structure dim by dim:

* :func:`tractable_graphs` builds graphs that tensor variable elimination handles *by
  construction* (the condition of :mod:`plated.testing`, re-derived here: plates form a random
  forest, each variable lives in a branch of it, i.e. the plates on a path from a root, and each
  factor lives in a branch and mentions only variables of branches along it), optionally with
  one sequential plate carrying a chain variable ``x`` (previous value ``x_prev``). The engine
  must accept every such graph: a refusal fails the test, so no test here can pass vacuously.
* :func:`free_graphs` gives each variable a home factor in an arbitrary set of independent
  plates and couples variables in factors over any plates containing their homes; about a third
  of these graphs are intractable. The engine may legitimately refuse one
  (:class:`plated.IntractableError`); then the test checks the refusal's fields and that
  unrolling every plate (the documented way out) gives the brute-force answer. Graphs whose
  plate sets are nested (tractable by the construction above) must not be refused, so this test
  fails too if the engine refuses everything.

Properties: log Z equals enumeration; marginals sum to one and equal enumerated marginals;
the MAP assignment scores the enumerated maximum and samples never land on zero-weight
assignments; with all-zero log potentials log Z is the log of the number of assignments (counted
from the strategy's own bookkeeping, not from :mod:`plated.naive`) and marginals are uniform;
gradients of log Z with respect to zero "probe" factors equal :meth:`marginals`; float32 agrees
with float64 within a tolerance that grows with the number of factor entries; and
:func:`plated.einsum` equals :func:`plated.naive.einsum` (both rings, several outputs, ``-inf``
entries, all-``-inf`` operands, size-1 dims) and, without plates, ``log(einsum(exp(x)))``.

Numerics follow ``conftest.py``: float64, and tensor values come from a ``torch.Generator`` seeded
by a drawn integer, so every example (and a falsifying example hypothesis prints) is reproducible.
The settings below are per test (no global profile): ``derandomize=True`` keeps the suite
deterministic, as the seed policy asks (set it to ``False`` locally to explore new examples), and
``database=None`` keeps no example database (hypothesis still caches constants in the git-ignored
``.hypothesis/``).
"""

from __future__ import annotations

import itertools
import math
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from helpers import RTOL, assignment_rows, logz_atol
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

import plated
from plated import Factor, Plate, PlatedFactorGraph, naive, testing

#: Largest number of joint assignments of a drawn graph (brute force enumerates all of them).
MAX_ASSIGNMENTS = 256

#: Domain and plate sizes, the first the one hypothesis shrinks towards (2, so that a shrunk
#: example still has a choice to make); size 1 is drawn too.
SIZES = st.sampled_from((2, 3, 1))

#: How values of the factors are drawn: standard normal; normal with 30% hard zeros (``-inf``);
#: small integers (many exact ties, for MAP tie-breaking); normal with one factor all ``-inf``.
VALUE_KINDS = ("randn", "hard_zeros", "ties", "dead_factor")


def fast(max_examples: int) -> settings:
    """Per-test settings: modest example counts, no deadline (the first example of a new graph
    structure pays for planning), deterministic and with no example database on disk."""
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


# -- strategies ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Drawn:
    """A drawn graph and the strategy's own bookkeeping of it.

    :ivar var_plates: every variable's plates in declaration order, as the strategy built them.
    :ivar var_sizes: every variable's domain size.
    :ivar log_count: log of the number of joint assignments, counted from the bookkeeping.
    """

    factors: list[Factor]
    plates: list[Plate]
    var_plates: dict[str, tuple[str, ...]]
    var_sizes: dict[str, int]
    log_count: float

    def graph(self, unroll: Sequence[str] = ()) -> PlatedFactorGraph:
        return PlatedFactorGraph(self.factors, self.plates, unroll=unroll)

    def with_tensors(self, tensors: list[torch.Tensor]) -> Drawn:
        factors = [Factor(t, f.dims, name=f.name)
                   for f, t in zip(self.factors, tensors, strict=True)]
        return Drawn(factors, self.plates, self.var_plates, self.var_sizes, self.log_count)


def _fill(shapes: list[tuple[int, ...]], kind: str, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        if kind == "ties":
            t = torch.randint(-1, 2, shape, generator=gen).to(torch.float64)
        else:
            t = torch.randn(shape, generator=gen, dtype=torch.float64)
        if kind == "hard_zeros":
            t = t.masked_fill(torch.rand(shape, generator=gen) < 0.3, -math.inf)
        out.append(t)
    if kind == "dead_factor":
        k = int(torch.randint(len(out), (), generator=gen))
        out[k] = torch.full_like(out[k], -math.inf)
    return out


def _shrink_sizes(var_ords: dict[str, frozenset[str]], var_sizes: dict[str, int],
                  plate_sizes: dict[str, int], prev_ord: frozenset[str] | None = None) -> None:
    """Lower domain sizes, the variable with the most copies first, until brute force has at
    most ``MAX_ASSIGNMENTS`` joint assignments. ``prev_ord``: the plates of a chain's ``x_prev``
    (more copies of ``x``'s domain)."""

    def copies(v: str) -> int:
        n = math.prod(plate_sizes[p] for p in var_ords[v])
        if v == "x" and prev_ord is not None:
            n += math.prod(plate_sizes[p] for p in prev_ord)
        return n

    while sum(copies(v) * math.log(n) for v, n in var_sizes.items()) > math.log(
            MAX_ASSIGNMENTS) + 1e-9:
        var_sizes[max((v for v in var_sizes if var_sizes[v] > 1), key=copies)] -= 1


@st.composite
def tractable_graphs(draw: st.DrawFn, sequential: bool | None = None,
                     kinds: tuple[str, ...] = VALUE_KINDS) -> Drawn:
    """A graph tractable by construction (see the module docstring), with its bookkeeping.

    :param sequential: force (``True``) or forbid (``False``) one sequential plate; ``None``
        lets hypothesis decide.
    """
    n_plates = draw(st.integers(0 if sequential is not True else 1, 3))
    names = [f"p{i}" for i in range(n_plates)]
    parent: dict[str, str | None] = {}
    for i, p in enumerate(names):
        parent[p] = draw(st.sampled_from([None, *names[:i]]))
    branch: dict[str | None, frozenset[str]] = {None: frozenset()}
    for p in names:
        chain, q = [], parent[p]
        while q is not None:
            chain.append(q)
            q = parent[q]
        branch[p] = frozenset([p, *chain])
    plate_sizes = {p: draw(SIZES) for p in names}
    seq: str | None = None
    if names and (sequential is True
                  or (sequential is None and draw(st.booleans()))):
        # plates with a plate nested inside come first (and twice): a chain's previous value
        # read inside a nested plate is a case that once broke (tests/test_regressions.py)
        outer = [p for p in names if any(branch[q] > branch[p] for q in names)]
        seq = draw(st.sampled_from(outer + names))
        plate_sizes[seq] = draw(st.sampled_from((3, 4, 2, 1)))
    nodes: list[str | None] = [None, *names]

    var_ords: dict[str, frozenset[str]] = {}
    var_sizes: dict[str, int] = {}
    for i in range(draw(st.integers(1 if seq is None else 0, 3))):
        var_ords[f"v{i}"] = branch[draw(st.sampled_from(nodes))]
        var_sizes[f"v{i}"] = draw(SIZES)
    if seq is not None:
        var_ords["x"] = branch[seq]
        var_sizes["x"] = draw(SIZES)

    def below(b: frozenset[str]) -> list[str]:
        """Variables a factor in branch ``b`` may mention (x_prev only inside the chain)."""
        out = [v for v, o in var_ords.items() if o <= b]
        if seq is not None and branch[seq] <= b:
            out.append("x_prev")
        return out

    scopes: list[tuple[frozenset[str], list[str]]] = []
    for v, o in var_ords.items():
        if v == "x":
            continue
        # the variable's home factor: in exactly its branch, so its plates are that branch
        others = [w for w in below(o) if w not in (v, "x_prev")]
        extra = draw(st.lists(st.sampled_from(others), max_size=2, unique=True)) if others else []
        scopes.append((o, [v, *extra]))
    if seq is not None:
        o = branch[seq]
        others = [w for w in below(o) if w not in ("x", "x_prev")]
        extra = draw(st.lists(st.sampled_from(others), max_size=1, unique=True)) if others else []
        scopes.append((o, ["x_prev", "x", *extra]))  # the transition
        if draw(st.booleans()):
            scopes.append((o - {seq}, ["x_prev"]))  # the initial state's factor
        inner = [q for q in names if branch[q] > o]
        read_inside = draw(st.booleans())
        if inner and read_inside:
            # the previous value read inside a plate nested in the chain's plate, with a
            # variable of that plate (which sees x at t - 1)
            b = branch[draw(st.sampled_from(inner))]
            local = [w for w, ow in var_ords.items() if ow == b]
            scopes.append((b, ["x_prev", *draw(st.lists(st.sampled_from(local), max_size=1))]
                           if local else ["x_prev"]))
    for _ in range(draw(st.integers(0, 2))):
        b = branch[draw(st.sampled_from(nodes))]
        cand = below(b)
        if cand:
            scopes.append((b, draw(st.lists(st.sampled_from(cand), min_size=1, max_size=3,
                                            unique=True))))

    extra_copies = {"x_prev": var_ords["x"] - {seq}} if seq is not None else {}
    _shrink_sizes(var_ords, var_sizes, plate_sizes, extra_copies.get("x_prev"))
    plates = [Plate(p, plate_sizes[p], sequential=True, prev={"x": "x_prev"}) if p == seq
              else Plate(p, plate_sizes[p]) for p in names]
    dims_list, shapes = [], []
    for b, scope in scopes:
        pl = [p for p in names if p in b]
        dims_list.append((*pl, *scope))
        shapes.append(tuple(plate_sizes[p] for p in pl)
                      + tuple(var_sizes["x" if d == "x_prev" else d] for d in scope))
    kind = draw(st.sampled_from(kinds))
    tensors = _fill(shapes, kind, draw(st.integers(0, 2**31 - 1)))
    factors = [Factor(t, dims, name=f"f{k}")
               for k, (t, dims) in enumerate(zip(tensors, dims_list, strict=True))]
    all_ords = {**var_ords, **extra_copies}
    var_plates = {v: tuple(p for p in names if p in o) for v, o in all_ords.items()}
    sizes = {**var_sizes, **({"x_prev": var_sizes["x"]} if seq is not None else {})}
    log_count = sum(math.prod(plate_sizes[p] for p in o) * math.log(sizes[v])
                    for v, o in all_ords.items())
    return Drawn(factors, plates, var_plates, sizes, log_count)


@st.composite
def free_graphs(draw: st.DrawFn) -> Drawn:
    """Independent plates; each variable gets a home factor in a random set of plates, and
    coupling factors join random variables in any plates that contain both homes (plus random
    factors anywhere). Variables whose homes are not nested and that share a factor make
    many of these graphs intractable. A variable's plates are the intersection of those of the
    factors over it (a later factor can shrink them)."""
    names = [f"p{i}" for i in range(draw(st.integers(2, 3)))]
    plate_sizes = {p: draw(SIZES) for p in names}
    # single plates first (what hypothesis shrinks towards): two variables in different single
    # plates, coupled, are the simplest intractable graph
    subsets = [frozenset(c) for k in (1, 0, 2, 3) for c in itertools.combinations(names, k)]
    plate_sets = st.sampled_from(subsets)
    var_names = [f"v{i}" for i in range(draw(st.integers(2, 4)))]
    var_sizes = {v: draw(SIZES) for v in var_names}
    home = {v: draw(plate_sets) for v in var_names}
    scopes = [(home[v], [v]) for v in var_names]
    for k in range(draw(st.integers(1, 2))):
        fvars = draw(st.lists(st.sampled_from(var_names), min_size=2 if k == 0 else 1,
                              max_size=3, unique=True))
        scopes.append((frozenset().union(*(home[v] for v in fvars)) | draw(plate_sets), fvars))
    for _ in range(draw(st.integers(0, 1))):
        fvars = draw(st.lists(st.sampled_from(var_names), min_size=1, max_size=2, unique=True))
        scopes.append((draw(plate_sets), fvars))
    var_ords: dict[str, frozenset[str]] = {}
    for fplates, fvars in scopes:
        for v in fvars:
            var_ords[v] = var_ords[v] & fplates if v in var_ords else fplates
    var_sizes = {v: n for v, n in var_sizes.items() if v in var_ords}
    _shrink_sizes(var_ords, var_sizes, plate_sizes)
    plates = [Plate(p, plate_sizes[p]) for p in names]
    dims_list = [(*[p for p in names if p in b], *scope) for b, scope in scopes]
    shapes = [tuple(plate_sizes[d] if d in plate_sizes else var_sizes[d] for d in dims)
              for dims in dims_list]
    tensors = _fill(shapes, draw(st.sampled_from(("randn", "hard_zeros"))),
                    draw(st.integers(0, 2**31 - 1)))
    factors = [Factor(t, dims, name=f"f{k}")
               for k, (t, dims) in enumerate(zip(tensors, dims_list, strict=True))]
    var_plates = {v: tuple(p for p in names if p in o) for v, o in var_ords.items()}
    log_count = sum(math.prod(plate_sizes[p] for p in o) * math.log(var_sizes[v])
                    for v, o in var_ords.items())
    return Drawn(factors, plates, var_plates, var_sizes, log_count)


# -- graph properties -----------------------------------------------------------------------------


def check_against_enumeration(d: Drawn) -> bool:
    """log Z, the max-product value, MAP, marginals and sample support of ``d`` against brute
    force; returns whether log Z is finite."""
    g = d.graph()
    en = naive.enumerate_joint(d.factors, d.plates)
    atol = logz_atol(d.factors)
    assert en.var_plates == d.var_plates  # the strategy's bookkeeping is the twin's semantics
    ref_logz = en.log_joint.logsumexp(0)
    logz = g.log_partition()
    assert logz.shape == ()
    mld = g.max_log_density()
    if ref_logz == -math.inf:
        assert logz == -math.inf and mld == -math.inf
        for v, m in g.marginals().items():
            assert (m == 0).all(), f"marginal of {v!r} is {m} though log Z = -inf"
        return False
    assert_close(logz, ref_logz, rtol=RTOL, atol=atol)
    assert_close(mld, en.log_joint.max(), rtol=RTOL, atol=atol)
    ours = g.map_assignment()
    assert {v: tuple(x.shape) for v, x in ours.items()} == {
        v: tuple(s.size for p in ps for s in d.plates if s.name == p)
        for v, ps in d.var_plates.items()}
    row = assignment_rows(en, {v: x.unsqueeze(0) for v, x in ours.items()})
    assert_close(en.log_joint[row[0]], en.log_joint.max(), rtol=RTOL, atol=atol,
                 msg=lambda m: f"log joint of our MAP assignment is not the maximum: {m}")
    marg, ref = g.marginals(), naive.marginals(d.factors, d.plates)
    assert set(marg) == set(ref) == set(d.var_plates)
    for v, m in marg.items():
        assert m.shape == ref[v].shape, v
        assert_close(m.sum(-1), torch.ones(m.shape[:-1]), rtol=0, atol=1e-8,
                     msg=lambda s, v=v: f"marginal of {v!r} does not sum to one: {s}")
        assert_close(m, ref[v], rtol=0, atol=1e-8, msg=lambda s, v=v: f"marginal of {v!r}: {s}")
    samples = g.sample(4, generator=torch.Generator().manual_seed(0))
    rows = assignment_rows(en, samples)
    assert (en.log_joint[rows] > -math.inf).all(), "sampled a zero-weight assignment"
    return True


@fast(250)
@given(tractable_graphs())
def test_tractable_graph_matches_enumeration(d: Drawn) -> None:
    """Never refused, and every query equals brute force (including log Z = -inf graphs)."""
    finite = check_against_enumeration(d)
    event("log Z finite" if finite else "log Z = -inf")
    event("sequential" if any(p.sequential for p in d.plates) else "independent plates only")


@fast(120)
@given(tractable_graphs(sequential=True, kinds=("randn", "ties")))
def test_sequential_graph_matches_enumeration(d: Drawn) -> None:
    """Chains of length 1-4 (even and odd levels of the scan) inside and around other plates."""
    assert check_against_enumeration(d), "log Z is -inf without hard zeros"


def plate_sets_are_nested(d: Drawn) -> bool:
    """Whether the plate sets of all factors and variables form one chain under inclusion: then
    they are the branches of a single path of plates, and the graph is tractable by the
    construction of :func:`tractable_graphs` (a sufficient condition, not a necessary one)."""
    sets = {frozenset(x for x in f.dims if x in {p.name for p in d.plates}) for f in d.factors}
    sets |= {frozenset(ps) for ps in d.var_plates.values()}
    return all(a <= b or b <= a for a, b in itertools.combinations(sets, 2))


@fast(200)
@given(free_graphs())
def test_free_graph_is_exact_or_refused_with_a_way_out(d: Drawn) -> None:
    """Arbitrary plate sets: the engine either equals brute force or raises IntractableError
    naming plates and variables, in which case unrolling every plate is exact. Graphs whose
    plate sets are nested must not be refused."""
    nested = plate_sets_are_nested(d)
    event("nested plate sets" if nested else "plate sets not nested")
    try:
        d.graph().cost()
    except plated.IntractableError as e:
        event("refused")
        assert not nested, f"refused a graph whose plate sets are nested: {e}"
        assert e.plates and e.variables and e.remedies, e
        assert set(e.plates) <= {p.name for p in d.plates}
        assert set(e.variables) <= set(d.var_plates)
        unrolled = d.graph(unroll=[p.name for p in d.plates])
        assert_close(unrolled.log_partition(), naive.log_partition(d.factors, d.plates),
                     rtol=RTOL, atol=logz_atol(d.factors))
        return
    event("accepted")
    check_against_enumeration(d)


@fast(150)
@given(tractable_graphs(kinds=("randn",)))
def test_all_zero_log_potentials_count_assignments(d: Drawn) -> None:
    """Potentials all one: Z is the number of joint assignments (pytorch-struct's counting
    invariant), every assignment ties at log density 0, and every marginal is uniform."""
    zeros = d.with_tensors([torch.zeros_like(f.tensor) for f in d.factors])
    g = zeros.graph()
    expected = torch.tensor(d.log_count)
    assert_close(g.log_partition(), expected, rtol=RTOL, atol=1e-12)
    assert_close(naive.log_partition(zeros.factors, zeros.plates), expected, rtol=RTOL,
                 atol=1e-12)
    assert g.max_log_density() == 0
    for v, m in g.marginals().items():
        assert_close(m, torch.full_like(m, 1.0 / d.var_sizes[v]), rtol=0, atol=1e-12,
                     msg=lambda s, v=v: f"{v!r}: {s}")


@fast(150)
@given(tractable_graphs(kinds=("randn", "hard_zeros")))
def test_probe_gradients_equal_marginals(d: Drawn) -> None:
    """``marginals()`` equals the gradient of log Z with respect to a zero factor added over
    each variable in exactly its plates (a probe that changes neither Z nor any plate)."""
    sizes = {p.name: p.size for p in d.plates}
    probes = {v: torch.zeros(tuple(sizes[p] for p in ps) + (d.var_sizes[v],),
                             requires_grad=True)
              for v, ps in d.var_plates.items()}
    probe_factors = [Factor(t, (*d.var_plates[v], v), name=f"probe {v}")
                     for v, t in probes.items()]
    g = d.graph()
    logz = PlatedFactorGraph(d.factors + probe_factors, d.plates).log_partition()
    assert_close(logz, g.log_partition(), rtol=RTOL, atol=logz_atol(d.factors))
    if logz == -math.inf:
        return  # the probe gradient is undefined; marginals are documented zeros (checked above)
    grads = dict(zip(probes, torch.autograd.grad(logz, list(probes.values())), strict=True))
    for v, m in g.marginals().items():
        assert_close(m, grads[v], rtol=0, atol=1e-9, msg=lambda s, v=v: f"{v!r}: {s}")


#: float32 error bound per factor entry, relative to ``1 + |log Z|`` (absolute for marginals):
#: four float32 ulps (2**-23) per entry summed or multiplied. The worst measured on 1500 examples
#: of this strategy is 1.9e-8 per entry for log Z and 3.0e-8 for marginals, 16 times below.
FLOAT32_RTOL_PER_ENTRY = 4 * 2.0**-23


@fast(150)
@given(tractable_graphs(kinds=("randn", "hard_zeros")))
def test_float32_agrees_with_float64(d: Drawn) -> None:
    """The same (float32-representable) values in float32 and float64: log Z within a bound
    that grows with the number of factor entries; marginals within the same bound, absolute."""
    lo = d.with_tensors([f.tensor.float() for f in d.factors])
    hi = d.with_tensors([f.tensor.float().double() for f in d.factors])
    z_lo, z_hi = lo.graph().log_partition(), hi.graph().log_partition()
    assert z_lo.dtype == torch.float32
    if z_hi == -math.inf:
        assert z_lo == -math.inf
        return
    n_entries = sum(f.tensor.numel() for f in d.factors)
    bound = FLOAT32_RTOL_PER_ENTRY * max(1, n_entries)
    err = abs(z_lo.double() - z_hi).item() / (1 + abs(z_hi.item()))
    assert err <= bound, f"float32 log Z off by {err:.3g} relative (bound {bound:.3g})"
    m_lo, m_hi = lo.graph().marginals(), hi.graph().marginals()
    for v, m in m_hi.items():
        assert m_lo[v].dtype == torch.float32
        assert_close(m_lo[v].double(), m, rtol=0, atol=bound, msg=lambda s, v=v: f"{v!r}: {s}")


# -- einsum ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DrawnEinsum:
    equation: str
    operands: list[torch.Tensor]
    plates: str


def _kept_plates(inputs: list[str], plates: str) -> dict[str, set[str]]:
    """Each variable's plates under einsum's semantics (intersection over the inputs)."""
    ords: dict[str, set[str]] = {}
    for dims in inputs:
        here = set(dims) & set(plates)
        for d in set(dims) - set(plates):
            ords[d] = ords[d] & here if d in ords else set(here)
    return ords


@st.composite
def plated_einsums(draw: st.DrawFn) -> DrawnEinsum:
    """A tractable plated einsum (from :func:`tractable_graphs` without chains, renamed to
    letters by :func:`plated.testing.graph_to_einsum`) with 1-3 random valid outputs: an output
    that keeps a plated variable keeps its plates."""
    d = draw(tractable_graphs(sequential=False))
    inputs, plates, _ = testing.graph_to_einsum(d.factors, d.plates)
    ords = _kept_plates(inputs.split(","), plates)
    used = sorted(set(inputs) - {","})
    outputs = []
    for _ in range(draw(st.integers(1, 3))):
        keep = set(draw(st.sets(st.sampled_from(used), max_size=4)))
        for v in list(keep):
            keep |= ords.get(v, set())
        outputs.append("".join(draw(st.permutations(sorted(keep)))))
    return DrawnEinsum(inputs + "->" + ",".join(outputs), [f.tensor for f in d.factors], plates)


@fast(200)
@given(plated_einsums(), st.sampled_from(["log", "max"]))
def test_einsum_matches_naive_einsum(e: DrawnEinsum, ring: Literal["log", "max"]) -> None:
    ours = plated.einsum(e.equation, *e.operands, plates=e.plates, ring=ring)
    ref = naive.einsum(e.equation, *e.operands, plates=e.plates, ring=ring)
    outs = e.equation.split("->")[1].split(",")
    assert len(ours) == len(ref) == len(outs)
    atol = 1e-10 * max(1, sum(x.numel() for x in e.operands))
    for out, a, b in zip(outs, ours, ref, strict=True):
        assert a.shape == b.shape, f"{out!r}: {a.shape} vs {b.shape}"
        assert not a.isnan().any(), f"{out!r}: NaN"
        assert_close(a, b, rtol=RTOL, atol=atol, msg=lambda m, out=out: f"{out!r}: {m}")


@st.composite
def unplated_einsums(draw: st.DrawFn) -> tuple[str, list[torch.Tensor]]:
    """An einsum over letters ``a``-``d`` (sizes 1-3), 1-4 operands, 1-2 outputs, no plates;
    values normal, with hard zeros, or with an operand that is ``-inf`` everywhere."""
    letters = string.ascii_lowercase[:4]
    sizes = {c: draw(SIZES) for c in letters}
    inputs = [
        "".join(draw(st.permutations(sorted(draw(st.sets(st.sampled_from(letters),
                                                         max_size=3))))))
        for _ in range(draw(st.integers(1, 4)))]
    used = sorted(set("".join(inputs)))
    outputs = ["".join(draw(st.permutations(sorted(draw(st.sets(st.sampled_from(used))
                                                             if used else st.just(set()))))))
               for _ in range(draw(st.integers(1, 2)))]
    shapes = [tuple(sizes[c] for c in dims) for dims in inputs]
    ops = _fill(shapes, draw(st.sampled_from(("randn", "hard_zeros", "dead_factor"))),
                draw(st.integers(0, 2**31 - 1)))
    return ",".join(inputs) + "->" + ",".join(outputs), ops


@fast(200)
@given(unplated_einsums())
def test_unplated_einsum_equals_log_of_linear_einsum(case: tuple[str, list[torch.Tensor]]
                                                     ) -> None:
    """Log space against linear space: ``log(torch.einsum(eq, *exp(x)))`` (``exp(-inf) = 0``,
    ``log(0) = -inf``); the max ring against ``log`` of a max over the same product terms."""
    equation, ops = case
    lhs, rhs = equation.split("->")
    for out, a in zip(rhs.split(","), plated.einsum(equation, *ops), strict=True):
        ref = torch.einsum(f"{lhs}->{out}", *[x.exp() for x in ops]).log()
        assert a.shape == ref.shape
        assert not a.isnan().any()
        assert_close(a, ref, rtol=RTOL, atol=1e-12, msg=lambda m, out=out: f"{out!r}: {m}")
    for out, a in zip(rhs.split(","), plated.einsum(equation, *ops, ring="max"), strict=True):
        assert_close(a, _max_einsum(lhs, out, ops), rtol=RTOL, atol=1e-12,
                     msg=lambda m, out=out: f"max {out!r}: {m}")


def _max_einsum(lhs: str, out: str, ops: list[torch.Tensor]) -> torch.Tensor:
    """Max-plus einsum by broadcasting every operand to all letters, then reducing."""
    letters = sorted(set(lhs) - {","})
    sizes = {c: n for dims, x in zip(lhs.split(","), ops, strict=True)
             for c, n in zip(dims, x.shape, strict=True)}
    total = torch.zeros(tuple(sizes[c] for c in letters))
    for dims, x in zip(lhs.split(","), ops, strict=True):
        perm = x.permute(sorted(range(len(dims)), key=lambda k: letters.index(dims[k])))
        view = [sizes[c] if c in dims else 1 for c in letters]
        total = total + perm.reshape(view)
    red = tuple(k for k, c in enumerate(letters) if c not in out)
    if red:
        total = total.amax(dim=red)
    kept = [c for c in letters if c in out]
    return total.permute([kept.index(c) for c in out])
