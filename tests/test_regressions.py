"""Cases that have previously failed, each named, with what broke and the commit that fixed it.

As opt_einsum keeps its "random test cases that have previously failed", every bug found in the
engine becomes an entry of one of the lists below (a graph, an einsum equation, or an input that
must be refused for its structure), and each entry runs against the brute-force twin
(:mod:`plated.naive`) and, where Pyro computes the same thing, against Pyro (used only as a
reference): ``pyro.ops.contract.einsum`` and ``naive_ubersum`` with the ``torch_log`` backend.

Each entry was checked to fail on the engine of the revisions named in ``broke`` and to pass
now: ``git archive REV plated | tar -x -C DIR``, then ``cd DIR && python -m pytest
/path/to/tests/test_regressions.py`` runs these tests against that revision's engine. Entries
marked "hypothesis" are the shrunk examples ``tests/test_properties.py`` reported on those
revisions; "random_graph(SEED)" and "random_einsum(SEED)" ones were drawn by
:mod:`plated.testing` and are written out here, so they do not change when the generators do.

Values are drawn from ``torch.Generator().manual_seed(case.seed)``; random draws of the engine
(samples) use the global seed that ``conftest.py`` fixes per test.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import pytest
import torch
from helpers import RTOL, assignment_rows, logz_atol, sample_pvalue
from pyro.ops.contract import einsum as pyro_einsum
from pyro.ops.contract import naive_ubersum
from torch.testing import assert_close

import plated
from plated import Factor, Plate, PlatedFactorGraph, naive, testing

BACKEND = "pyro.ops.einsum.torch_log"


def seq(name: str, size: int, **prev: str) -> Plate:
    """A sequential plate with chain variables ``prev`` (``curr=prev_dim``)."""
    return Plate(name, size, sequential=True, prev=prev)


# -- graphs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GraphCase:
    """A plated factor graph that once gave a wrong answer or a wrong error.

    :ivar name: the case's test id.
    :ivar broke: what went wrong (on which revisions), and the commit that fixed it.
    :ivar plates: the plates.
    :ivar factors: the dims of each factor; values are standard normal draws.
    :ivar sizes: the domain size of each variable (a previous-value dim takes its variable's).
    :ivar dead: ``(k, i)``: factor ``k`` is ``-inf`` everywhere (``i is None``) or at index ``i``
        of its first dim (a plate).
    :ivar keep_plates: plates kept in log Z (``PlatedFactorGraph(..., keep_plates=...)``).
    :ivar unroll: plates to unroll (``PlatedFactorGraph(..., unroll=...)``).
    :ivar second_order_factor: also compare the Hessian of log Z and the gradient of the
        marginals of ``x`` with respect to this factor with brute force.
    :ivar chi_squared: also test 4000 joint samples against the enumerated posterior.
    """

    name: str
    broke: str
    plates: tuple[Plate, ...]
    factors: tuple[tuple[str, ...], ...]
    sizes: Mapping[str, int]
    dead: tuple[int, int | None] | None = None
    keep_plates: tuple[str, ...] = ()
    unroll: tuple[str, ...] = ()
    second_order_factor: int | None = None
    chi_squared: bool = False
    seed: int = 0

    def build(self, requires_grad: bool = False) -> tuple[list[Factor], list[Plate]]:
        gen = torch.Generator().manual_seed(self.seed)
        plate_sizes = {p.name: p.size for p in self.plates}
        prev_of = {q: c for p in self.plates for c, q in p.prev}
        factors = []
        for k, dims in enumerate(self.factors):
            shape = tuple(plate_sizes[d] if d in plate_sizes else self.sizes[prev_of.get(d, d)]
                          for d in dims)
            t = torch.randn(shape, generator=gen)
            if self.dead is not None and self.dead[0] == k:
                where = slice(None) if self.dead[1] is None else self.dead[1]
                t[where] = -math.inf
            factors.append(Factor(t.requires_grad_(requires_grad), dims, name=f"f{k}"))
        return factors, list(self.plates)


#: Graphs that have previously failed.
GRAPHS: list[GraphCase] = [
    # -- 0f3c154: a previous-value dim read inside a plate nested in its sequential plate was
    #    given the plates of x_prev (none) instead of those of x one step back, so the planner
    #    summed it out once for all steps: wrong log Z, MAP, marginals and samples on 63ce35e
    GraphCase("prev-dim-in-nested-plate", "hypothesis, on 63ce35e; fixed by 0f3c154",
              (seq("t", 3, x="x_prev"), Plate("m", 2)),
              (("t", "x_prev", "x"), ("t", "m", "x_prev")), {"x": 2}),
    GraphCase("random-graph-215-sequential",
              "random_graph(215, sequential=True): log Z, max and marginals wrong on 63ce35e; "
              "fixed by 0f3c154",
              (seq("p0", 4, x="x_prev"), Plate("p1", 1)),
              (("p0", "p1", "v0", "v1", "v2"), ("v1",), ("p0", "p1", "v2", "v0", "v1"),
               ("p0", "x_prev", "x", "v1"), ("p0", "p1", "x_prev", "v2"), ("v1",)),
              {"v0": 1, "v1": 3, "v2": 1, "x": 2}, seed=215),
    GraphCase("random-graph-268-sequential",
              "random_graph(268, sequential=True): log Z wrong and samples failed the "
              "chi-squared test (p = 0) on 63ce35e; fixed by 0f3c154",
              (seq("p0", 3, x="x_prev"), Plate("p1", 3)),
              (("v0",), ("p0", "p1", "v1"), ("p0", "x_prev", "x"), ("p0", "p1", "x_prev", "v1"),
               ("p0", "p1", "v1"), ("v0",)),
              {"v0": 3, "v1": 1, "x": 2}, chi_squared=True, seed=268),
    # -- ff06026: where log Z = -inf, the marginals of a variable in another, finite, part of
    #    the graph were that part's posterior instead of the documented zeros (63ce35e-3d1fef1)
    GraphCase("dead-component-marginals", "marginals of 'a' were [0.5, 0.5]; fixed by ff06026",
              (), (("a",), ("b",)), {"a": 2, "b": 3}, dead=(1, None)),
    GraphCase("dead-plated-component-marginals",
              "hypothesis, on 3d1fef1 (with an unused plate p1); fixed by ff06026",
              (Plate("p0", 2), Plate("p1", 2)),
              (("v0",), ("p0", "v1"), ("p0", "v2")), {"v0": 2, "v1": 2, "v2": 2},
              dead=(2, None)),
    GraphCase("dead-element-of-kept-plate",
              "log Z = -inf at n = 1 only: marginal of 'a' there was its posterior, not zeros; "
              "fixed by ff06026",
              (Plate("n", 3),), (("n", "a"), ("n", "b")), {"a": 2, "b": 2}, dead=(1, 1),
              keep_plates=("n",)),
    # -- ff06026: unrolling a plate that a chain lives in left the sequential plate naming the
    #    old chain variable: GraphError "names chain variable 'x', which no factor mentions"
    GraphCase("unroll-plate-around-chain", "GraphError on 63ce35e-3d1fef1; fixed by ff06026",
              (Plate("n", 2), seq("t", 3, x="x_prev")),
              (("n", "x_prev"), ("n", "t", "x_prev", "x")), {"x": 2}, unroll=("n",)),
    GraphCase("unroll-plate-around-chain-with-emissions",
              "GraphError on 63ce35e-3d1fef1; fixed by ff06026",
              (seq("t", 2, x="x_prev"), Plate("n", 2)),
              (("n", "x_prev"), ("t", "n", "x_prev", "x"), ("t", "n", "x")), {"x": 3},
              unroll=("n",)),
    # -- 4fc6cfd: the scan's fused log-matmul backward (168ca5c) was not differentiable, so
    #    second derivatives through a chain were silently wrong (Hessian off by 0.25)
    GraphCase("hessian-through-chain-scan", "wrong on 168ca5c-ddccef5; fixed by 4fc6cfd",
              (seq("t", 5, x="x_prev"),), (("x_prev",), ("t", "x_prev", "x")), {"x": 3},
              second_order_factor=1),
    GraphCase("hessian-through-chain-in-plate", "wrong on 168ca5c-ddccef5; fixed by 4fc6cfd",
              (Plate("n", 2), seq("t", 3, x="x_prev")),
              (("n", "x_prev"), ("n", "t", "x_prev", "x"), ("n", "t", "x")), {"x": 2},
              second_order_factor=2),
]


def case_ids(cases: Sequence[GraphCase | EinsumCase | RefusedCase]) -> list[str]:
    return [c.name for c in cases]


WHOLE = [c for c in GRAPHS if not c.keep_plates]


@pytest.mark.parametrize("case", WHOLE, ids=case_ids(WHOLE))
def test_graph_vs_brute_force(case: GraphCase) -> None:
    """log Z, the max-product value, marginals, the MAP's score, sample support (and a
    chi-squared test where marked) and the gradient of log Z against brute force."""
    factors, plates = case.build(requires_grad=True)
    tensors = [f.tensor for f in factors]
    g = PlatedFactorGraph(factors, plates, unroll=case.unroll)
    en = naive.enumerate_joint(factors, plates)
    atol = logz_atol(factors)
    ref_logz = en.log_joint.logsumexp(0)
    logz = g.log_partition()
    assert_close(logz, ref_logz, rtol=RTOL, atol=atol)
    assert_close(g.max_log_density(), en.log_joint.max(), rtol=RTOL, atol=atol)
    marg = g.marginals()
    if ref_logz == -math.inf:
        for v, m in marg.items():  # documented: zeros where log Z = -inf
            assert (m == 0).all(), f"marginal of {v!r} is {m} though log Z = -inf"
        return
    # unrolled plates name their variables "{var}[{i}]": compare per variable in the unrolled
    # graph's terms (log Z and the maximum above are compared with the original graph's)
    ref_factors, ref_plates = factors, plates
    if case.unroll:
        ref_factors, ref_plates = list(g.factors), list(g.plates)
    ref_en = naive.enumerate_joint(ref_factors, ref_plates)
    ref_marg = naive.marginals(ref_factors, ref_plates)
    assert set(marg) == set(ref_marg)
    for v, m in marg.items():
        assert_close(m, ref_marg[v], rtol=0, atol=1e-8, msg=lambda s, v=v: f"{v!r}: {s}")
    best = assignment_rows(ref_en, {v: x.unsqueeze(0) for v, x in g.map_assignment().items()})
    assert_close(ref_en.log_joint[best[0]], en.log_joint.max(), rtol=RTOL, atol=atol)
    samples = g.sample(4000 if case.chi_squared else 10)
    assert (ref_en.log_joint[assignment_rows(ref_en, samples)] > -math.inf).all()
    if case.chi_squared:
        p, dof, impossible = sample_pvalue(ref_en, samples)
        assert impossible == 0 and dof >= 5 and p > 1e-6, (p, dof, impossible)
    ours = torch.autograd.grad(logz, tensors)
    ref = torch.autograd.grad(ref_logz, tensors)
    for k, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert_close(a, b, rtol=1e-7, atol=1e-9, msg=lambda m, k=k: f"d log Z / d f{k}: {m}")


KEPT = [c for c in GRAPHS if c.keep_plates]


@pytest.mark.parametrize("case", KEPT, ids=case_ids(KEPT))
def test_graph_with_kept_plate_vs_brute_force(case: GraphCase) -> None:
    """One log Z per element of the kept plate, each equal to brute force on that element's
    slice of the graph; marginals per element likewise (zeros where that element's log Z is
    -inf)."""
    factors, plates = case.build()
    (kept,) = case.keep_plates
    g = PlatedFactorGraph(factors, plates, keep_plates=case.keep_plates)
    logz, marg = g.log_partition(), g.marginals()
    rest = [p for p in plates if p.name != kept]
    size = next(p.size for p in plates if p.name == kept)
    assert logz.shape == (size,)
    for i in range(size):
        part = [Factor(f.tensor.select(f.dims.index(kept), i),
                       tuple(d for d in f.dims if d != kept), name=f.name) for f in factors]
        ref = naive.log_partition(part, rest)
        assert_close(logz[i], ref, rtol=RTOL, atol=logz_atol(factors), msg=lambda m, i=i:
                     f"{kept}={i}: {m}")
        ref_marg = naive.marginals(part, rest)
        for v, m in marg.items():
            want = ref_marg[v] if ref > -math.inf else torch.zeros_like(ref_marg[v])
            assert_close(m[i], want, rtol=0, atol=1e-8, msg=lambda s, v=v, i=i:
                         f"{v!r} at {kept}={i}: {s}")


SECOND_ORDER = [c for c in GRAPHS if c.second_order_factor is not None]


@pytest.mark.parametrize("case", SECOND_ORDER, ids=case_ids(SECOND_ORDER))
def test_graph_second_order_vs_brute_force(case: GraphCase) -> None:
    """Hessian of log Z, and the gradient of a marginal (``create_graph`` through the backward
    pass), with respect to one factor."""
    factors, plates = case.build()
    k = case.second_order_factor
    assert k is not None
    target = factors[k].tensor.clone().requires_grad_()

    def with_target(t: torch.Tensor) -> list[Factor]:
        return [Factor(t, f.dims, name=f.name) if j == k else f for j, f in enumerate(factors)]

    def logz(t: torch.Tensor) -> torch.Tensor:
        return PlatedFactorGraph(with_target(t), plates).log_partition()

    def ref_logz(t: torch.Tensor) -> torch.Tensor:
        return naive.log_partition(with_target(t), plates)

    h = torch.autograd.functional.hessian(logz, target)
    h_ref = torch.autograd.functional.hessian(ref_logz, target)
    assert h_ref.abs().max() > 1e-3  # not vacuously zero
    assert_close(h, h_ref, rtol=1e-8, atol=1e-10)
    weights = torch.randn(naive.marginals(factors, plates)["x"].shape,
                          generator=torch.Generator().manual_seed(1))
    (ours,) = torch.autograd.grad(
        (weights * PlatedFactorGraph(with_target(target), plates).marginals()["x"]).sum(), target)
    (ref,) = torch.autograd.grad(
        (weights * naive.marginals(with_target(target), plates)["x"]).sum(), target)
    assert_close(ours, ref, rtol=1e-8, atol=1e-10)


def unroll_time(factors: list[Factor], plates: list[Plate]) -> tuple[list[Factor], list[Plate]]:
    """The same graph with every sequential plate unrolled into one variable per step (for Pyro,
    whose einsum has no sequential plates): at step ``t`` chain variable ``c`` is ``c@t`` and its
    previous-value dim is ``c@{t-1}``, or the previous-value variable itself at ``t = 0``."""
    for plate in [p for p in plates if p.sequential]:
        new = []
        for f in factors:
            if plate.name not in f.dims:
                new.append(f)
                continue
            axis = f.dims.index(plate.name)
            for t in range(plate.size):
                names = {c: f"{c}@{t}" for c, _ in plate.prev}
                names |= {q: f"{c}@{t - 1}" if t else q for c, q in plate.prev}
                dims = tuple(names.get(d, d) for d in f.dims if d != plate.name)
                new.append(Factor(f.tensor.select(axis, t), dims, name=f"{f.name}@{t}"))
        factors, plates = new, [p for p in plates if p.name != plate.name]
    return factors, plates


@pytest.mark.parametrize("case", GRAPHS, ids=case_ids(GRAPHS))
def test_graph_vs_pyro(case: GraphCase) -> None:
    """log Z (summed over kept plates) equals ``pyro.ops.contract.einsum`` of the same graph,
    sequential plates unrolled by :func:`unroll_time`."""
    factors, plates = case.build()
    ours = PlatedFactorGraph(factors, plates, unroll=case.unroll,
                             keep_plates=case.keep_plates).log_partition().sum()
    flat, flat_plates = unroll_time(factors, plates)
    # the unrolled graph is the same graph: its brute force agrees with the original's
    assert_close(naive.log_partition(flat, flat_plates), naive.log_partition(factors, plates),
                 rtol=RTOL, atol=1e-10)
    inputs, plate_letters, _ = testing.graph_to_einsum(flat, flat_plates)
    (ref,) = pyro_einsum(inputs + "->", *[f.tensor for f in flat], plates=plate_letters,
                         backend=BACKEND, modulo_total=True)
    assert_close(ours, ref, rtol=RTOL, atol=1e-10)


# -- einsum equations -----------------------------------------------------------------------------


@dataclass(frozen=True)
class EinsumCase:
    """A plated einsum that once gave a wrong answer or a wrong error.

    :ivar equation: the equation; sizes cycle through ``sizes`` in letter order.
    :ivar plates: the plate letters.
    :ivar ring: ``"log"`` or ``"max"``.
    :ivar dead: an operand set to ``-inf`` everywhere, if any.
    :ivar grad: also compare the gradient of a random linear functional of every output with
        ``naive_ubersum``'s (log ring).
    :ivar hessian: also compare the Hessian of the (single, scalar) output with respect to
        operand 1 with ``naive_ubersum``'s.
    """

    name: str
    broke: str
    equation: str
    plates: str
    ring: Literal["log", "max"] = "log"
    sizes: tuple[int, ...] = (2, 3, 4)
    dead: int | None = None
    grad: bool = False
    hessian: bool = False
    seed: int = 0

    def operands(self) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        letters = sorted(set(self.equation) - set(",->"))
        size = dict(zip(letters, itertools.cycle(self.sizes), strict=False))
        ops = [torch.randn(tuple(size[d] for d in dims), generator=gen)
               for dims in self.equation.split("->")[0].split(",")]
        if self.dead is not None:
            ops[self.dead] = torch.full_like(ops[self.dead], -math.inf)
        return ops


#: ``x0,x0x1,...,x7x8->``: a chain of 9 variables, which the planner eliminates by parallel scan.
CHAIN_EQUATION = "a,ab,bc,cd,de,ef,fg,gh,hi->"

#: Einsum equations that have previously failed.
EINSUMS: list[EinsumCase] = [
    # -- 0f3c154: outputs that keep a plated variable raised NotImplementedError in the max ring
    #    ("needs max-marginals") on 63ce35e
    EinsumCase("max-keeps-plated-variable", "NotImplementedError; fixed by 0f3c154",
               "ai->ai", "i", ring="max"),
    EinsumCase("max-keeps-plated-variable-beside-others",
               "hypothesis, on 63ce35e; fixed by 0f3c154", "ab,c,d->ab", "a", ring="max",
               sizes=(2,)),
    EinsumCase("max-keeps-plated-variables-several-outputs",
               "NotImplementedError; fixed by 0f3c154", "a,ai,abi->a,bi,i,ai", "i", ring="max"),
    EinsumCase("max-keeps-plated-variable-dead-operand",
               "NotImplementedError; fixed by 0f3c154", "ai,ai->,ai,i", "i", ring="max",
               dead=0),
    EinsumCase("max-keeps-plated-variable-dead-pair",
               "NotImplementedError; fixed by 0f3c154", "a,ai,abi->a,bi", "i", ring="max",
               dead=2),
    # -- 0f3c154: an output keeping two plated variables of non-nested plates ('a' in {i}, 'd'
    #    in {j}) was computed by clamping them with one factor over both, which made the
    #    contraction look intractable: IntractableError for a tractable einsum on 63ce35e
    EinsumCase("keeps-variables-of-non-nested-plates",
               "IntractableError (an equation of Pyro's tests); fixed by 0f3c154",
               "aij,abi,bc,cdj,dij->,bi,cj,aij,dij,adij", "ij"),
    EinsumCase("keeps-variables-of-non-nested-plates-small",
               "IntractableError; fixed by 0f3c154", "ai,dj,aij,dij->adij", "ij"),
    # -- ff06026: gradients of outputs that keep a plated variable were wrong on 0f3c154-3d1fef1
    #    (the conditional of the kept variables was formed with a detached normaliser)
    EinsumCase("grad-keeps-plated-variable", "wrong; fixed by ff06026", "ai->ai", "i",
               grad=True),
    EinsumCase("grad-keeps-plated-variable-of-pair", "wrong; fixed by ff06026", "ai,abi->bi",
               "i", grad=True),
    EinsumCase("grad-keeps-plated-variable-with-plate-outputs", "wrong; fixed by ff06026",
               ",i,ia->,i,ia", "i", grad=True),
    EinsumCase("grad-keeps-variable-of-two-plates",
               "random_einsum(7): wrong; fixed by ff06026", "abc,abc->abc", "ab", grad=True,
               seed=7),
    EinsumCase("grad-keeps-plated-variable-unused-plates",
               "random_einsum(24), plates b and c unused: wrong; fixed by ff06026", "ad->da",
               "abc", grad=True, seed=24),
    EinsumCase("grad-keeps-plated-variable-unused-plate",
               "random_einsum(290), plate a unused: wrong; fixed by ff06026", "bc->cb", "ab",
               grad=True, seed=290),
    # -- 4fc6cfd: second derivatives through a chain found inside a contraction (parallel scan
    #    with the fused log-matmul of 168ca5c) were silently wrong
    EinsumCase("hessian-through-chain-in-contraction",
               "wrong on 168ca5c-ddccef5; fixed by 4fc6cfd", CHAIN_EQUATION, "", sizes=(2,),
               hessian=True),
]


@pytest.mark.parametrize("case", EINSUMS, ids=case_ids(EINSUMS))
def test_einsum_vs_brute_force(case: EinsumCase) -> None:
    ops = case.operands()
    ours = plated.einsum(case.equation, *ops, plates=case.plates, ring=case.ring)
    ref = naive.einsum(case.equation, *ops, plates=case.plates, ring=case.ring)
    outs = case.equation.split("->")[1].split(",")
    assert len(ours) == len(ref) == len(outs)
    for out, a, b in zip(outs, ours, ref, strict=True):
        assert a.shape == b.shape, f"{out!r}: {a.shape} vs {b.shape}"
        assert not a.isnan().any(), f"{out!r}: NaN"
        assert_close(a, b, rtol=RTOL, atol=1e-10, msg=lambda m, out=out: f"{out!r}: {m}")


LOG_EINSUMS = [c for c in EINSUMS if c.ring == "log"]


@pytest.mark.parametrize("case", LOG_EINSUMS, ids=case_ids(LOG_EINSUMS))
def test_einsum_vs_pyro(case: EinsumCase) -> None:
    """``naive_ubersum`` for every output; Pyro's fast ``einsum`` for ``""`` outputs (its other
    outputs are only defined up to a scale per plate slice)."""
    ops = case.operands()
    ours = plated.einsum(case.equation, *ops, plates=case.plates)
    ref = naive_ubersum(case.equation, *ops, plates=case.plates, backend=BACKEND)
    fast = pyro_einsum(case.equation, *ops, plates=case.plates, backend=BACKEND,
                       modulo_total=True)
    for out, a, b, c in zip(case.equation.split("->")[1].split(","), ours, ref, fast,
                            strict=True):
        assert_close(a, b, rtol=RTOL, atol=1e-10, msg=lambda m, out=out: f"{out!r}: {m}")
        if out == "":
            assert_close(a, c, rtol=RTOL, atol=1e-10, msg=lambda m: f"pyro einsum: {m}")


GRAD_EINSUMS = [c for c in EINSUMS if c.grad]


@pytest.mark.parametrize("case", GRAD_EINSUMS, ids=case_ids(GRAD_EINSUMS))
def test_einsum_gradients_vs_pyro(case: EinsumCase) -> None:
    ops = [x.requires_grad_() for x in case.operands()]
    ours = plated.einsum(case.equation, *ops, plates=case.plates)
    ref = naive_ubersum(case.equation, *ops, plates=case.plates, backend=BACKEND)
    gen = torch.Generator().manual_seed(case.seed + 1)
    weights = [torch.randn(x.shape, generator=gen) for x in ref]

    def grads(outs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        total = torch.stack([(w * x).sum() for w, x in zip(weights, outs, strict=True)]).sum()
        gs = torch.autograd.grad(total, ops, allow_unused=True)
        return [torch.zeros_like(x) if g is None else g for g, x in zip(gs, ops, strict=True)]

    for k, (a, b) in enumerate(zip(grads(ours), grads(ref), strict=True)):
        assert_close(a, b, rtol=1e-7, atol=1e-9, msg=lambda m, k=k: f"operand {k}: {m}")


HESSIAN_EINSUMS = [c for c in EINSUMS if c.hessian]


@pytest.mark.parametrize("case", HESSIAN_EINSUMS, ids=case_ids(HESSIAN_EINSUMS))
def test_einsum_hessian_vs_pyro(case: EinsumCase) -> None:
    ops = case.operands()

    def run(f: object, x: torch.Tensor) -> torch.Tensor:
        args = [x if k == 1 else y for k, y in enumerate(ops)]
        (out,) = f(case.equation, *args, plates=case.plates)  # type: ignore[operator]
        return out

    h = torch.autograd.functional.hessian(lambda x: run(plated.einsum, x), ops[1])
    h_ref = torch.autograd.functional.hessian(
        lambda x: run(lambda *a, **k: naive_ubersum(*a, backend=BACKEND, **k), x), ops[1])
    assert h_ref.abs().max() > 1e-3  # not vacuously zero
    assert_close(h, h_ref, rtol=1e-8, atol=1e-10)


# -- inputs that must be refused for their structure ---------------------------------------------


@dataclass(frozen=True)
class RefusedCase:
    """An input that must raise ``IntractableError`` (as Pyro raises ``NotImplementedError``).

    :ivar nan_operand: an operand that holds a NaN: the structural error must come first.
    """

    name: str
    broke: str
    equation: str
    plates: str
    nan_operand: int | None = None


#: Inputs whose refusal once went wrong.
REFUSED: list[RefusedCase] = [
    # -- 4eecf9c: values were checked before structure, so an intractable input holding a NaN
    #    raised GraphError ("contains NaN") instead of IntractableError
    RefusedCase("intractable-with-nan-einsum", "GraphError on 63ce35e-96d8e13; fixed by 4eecf9c",
                "ia,jb,ijab->", "ij", nan_operand=2),
    RefusedCase("intractable-with-nan-kept-output",
                "GraphError on 63ce35e-96d8e13; fixed by 4eecf9c", "c,ica,jcb,ijab->c", "ij",
                nan_operand=0),
]


@pytest.mark.parametrize("case", REFUSED, ids=case_ids(REFUSED))
@pytest.mark.parametrize("face", ["einsum", "graph"])
def test_refused_for_structure_first(case: RefusedCase, face: str) -> None:
    ops = EinsumCase(case.name, case.broke, case.equation, case.plates).operands()
    with pytest.raises(NotImplementedError):  # the reference refuses it too
        pyro_einsum(case.equation, *ops, plates=case.plates, backend=BACKEND, modulo_total=True)
    if case.nan_operand is not None:
        ops[case.nan_operand] = ops[case.nan_operand].clone()
        ops[case.nan_operand].view(-1)[0] = math.nan
    if face == "einsum":
        with pytest.raises(plated.IntractableError):
            plated.einsum(case.equation, *ops, plates=case.plates)
        return
    inputs = case.equation.split("->")[0].split(",")
    sizes = {d: n for dims, x in zip(inputs, ops, strict=True)
             for d, n in zip(dims, x.shape, strict=True)}
    g = PlatedFactorGraph([Factor(x, tuple(dims)) for dims, x in zip(inputs, ops, strict=True)],
                          [Plate(p, sizes[p]) for p in case.plates])
    with pytest.raises(plated.IntractableError):
        g.log_partition()


def test_regression_lists_have_unique_names() -> None:
    names = case_ids(GRAPHS) + case_ids(EINSUMS) + case_ids(REFUSED)
    assert len(names) == len(set(names)) >= 15
