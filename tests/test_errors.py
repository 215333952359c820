"""Every documented error, with a message that names the offending dim, factor, plate or variable.

* :class:`plated.GraphError` (a ``ValueError``) for malformed graphs and equations;
* :class:`plated.IntractableError` (a ``NotImplementedError``, as Pyro raises) when no
  polynomial-time elimination exists, raised by the planner before any tensor work: checked with
  a ``TorchDispatchMode`` that records every ATen op;
* ``unroll=`` as the exact way out of intractability, checked against brute force;
* :class:`plated.MemoryCapError` (a ``MemoryError``) when a memory cap cannot be met, and slicing
  when it can.

Messages are matched by the names they must contain (in any order), not by their wording.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import RTOL, RecordOps
from torch.testing import assert_close

import plated
from plated import (
    Factor,
    GraphError,
    IntractableError,
    MemoryCapError,
    Plate,
    PlatedError,
    PlatedFactorGraph,
    naive,
    testing,
)
from plated.testing import peak_allocated


def naming(*names: str) -> str:
    """A ``match=`` pattern requiring every one of ``names`` somewhere in the message."""
    return "(?s)" + "".join(f"(?=.*{re.escape(n)})" for n in names)


def F(shape: tuple[int, ...], dims: tuple[str, ...], name: str, **kw: Any) -> Factor:
    return Factor(torch.randn(shape, **kw), dims, name=name)


def chain_plate(T: int = 3) -> Plate:
    return Plate("t", T, sequential=True, prev={"x": "x_prev"})


# -- GraphError -----------------------------------------------------------------------------------

#: (id, what raises, names its message must contain)
GRAPH_ERRORS: list[tuple[str, Callable[[], object], tuple[str, ...]]] = [
    ("dim with two sizes",
     lambda: PlatedFactorGraph([F((2, 3), ("a", "b"), "f0"), F((4,), ("a",), "f1")]).cost(),
     ("'a'", "f0", "f1")),
    ("plate dim size != plate size",
     lambda: PlatedFactorGraph([F((3, 2), ("n", "a"), "f0")], [Plate("n", 4)]).cost(),
     ("'n'", "f0")),
    ("plate used as a chain variable",
     lambda: PlatedFactorGraph(
         [F((2, 2), ("n", "z"), "f0"), F((3, 2), ("t", "n"), "f1")],
         [Plate("n", 2), Plate("t", 3, sequential=True, prev={"n": "n_prev"})]).cost(),
     ("'t'", "'n'")),
    ("plate used as a previous-value dim",
     lambda: PlatedFactorGraph(
         [F((2, 2), ("n", "z"), "f0"), F((3, 2), ("t", "x"), "f1")],
         [Plate("n", 2), Plate("t", 3, sequential=True, prev={"x": "n"})]).cost(),
     ("'t'", "'n'")),
    ("plate used as a variable in its own prev",
     lambda: Plate("t", 3, sequential=True, prev={"t": "t_prev"}), ("'t'",)),
    ("keep_plates names a variable",
     lambda: PlatedFactorGraph([F((2, 3), ("n", "a"), "f0")], [Plate("n", 2)],
                               keep_plates=("a",)).cost(),
     ("'a'",)),
    ("keep_plates names an unknown plate",
     lambda: PlatedFactorGraph([F((2, 3), ("n", "a"), "f0")], [Plate("n", 2)],
                               keep_plates=("m",)).cost(),
     ("'m'",)),
    ("kept plate that a factor is not in",
     lambda: PlatedFactorGraph([F((2, 3), ("n", "a"), "f0"), F((3,), ("a",), "f1")],
                               [Plate("n", 2)], keep_plates=("n",)).cost(),
     ("'n'", "f1")),
    ("prev names a variable no factor mentions",
     lambda: PlatedFactorGraph([F((3, 2), ("t", "x"), "f0")],
                               [Plate("t", 3, sequential=True, prev={"y": "y_prev"})]).cost(),
     ("'t'", "'y'")),
    ("previous-value dim of a different size",
     lambda: PlatedFactorGraph([F((3, 2, 2), ("t", "x_prev", "x"), "f0"),
                                F((5,), ("x_prev",), "f1")], [chain_plate()]).cost(),
     ("'x_prev'",)),
    ("unroll of an unknown plate",
     lambda: PlatedFactorGraph([F((2, 3), ("n", "a"), "f0")], [Plate("n", 2)], unroll=["q"]),
     ("'q'",)),
    ("NaN in a factor",
     lambda: PlatedFactorGraph([F((2,), ("a",), "f0"),
                                Factor(torch.tensor([0.0, math.nan]), ("a",), name="f1")]
                               ).log_partition(),
     ("f1", "NaN")),
    ("+inf in a factor",
     lambda: PlatedFactorGraph([F((2,), ("a",), "f0"),
                                Factor(torch.tensor([math.inf, 0.0]), ("a",), name="f1")]
                               ).map(),
     ("f1", "+inf")),
    ("non-floating dtype",
     lambda: PlatedFactorGraph([Factor(torch.tensor([1, 2]), ("a",), name="f0")]).log_partition(),
     ("f0", "int64")),
    ("mixed dtypes",
     lambda: PlatedFactorGraph([F((2,), ("a",), "f0"),
                                F((2,), ("a",), "f1", dtype=torch.float32)]).log_partition(),
     ("f1", "float32", "f0")),
    ("mixed devices",
     lambda: PlatedFactorGraph([F((2,), ("a",), "f0"),
                                F((2,), ("a",), "f1", device="meta")]).log_partition(),
     ("f1", "meta")),
    ("factor dims length != tensor.dim()",
     lambda: F((2, 3), ("a",), "f0"), ("f0", "(2, 3)")),
    ("duplicate dim names",
     lambda: F((2, 2), ("a", "a"), "f0"), ("f0", "'a'")),
    ("chain variable in a factor outside its sequential plate",
     lambda: PlatedFactorGraph([F((3, 2, 2), ("t", "x_prev", "x"), "trans"),
                                F((2,), ("x",), "outside")], [chain_plate()]).cost(),
     ("'x'", "'t'", "outside")),
    ("sequential plate without prev",
     lambda: Plate("t", 3, sequential=True), ("'t'",)),
    ("prev on an independent plate",
     lambda: Plate("n", 3, prev={"x": "x_prev"}), ("'n'",)),
    ("zero plate size", lambda: Plate("n", 0), ("'n'",)),
    ("negative plate size", lambda: Plate("n", -2), ("'n'",)),
    ("duplicate plate names",
     lambda: PlatedFactorGraph([F((2, 3), ("n", "a"), "f0")], [Plate("n", 2), Plate("n", 2)]
                               ).cost(),
     ("'n'",)),
    # the functional face
    ("einsum output dim in no input",
     lambda: plated.einsum("ab->c", torch.randn(2, 3)), ("'c'",)),
    ("einsum dim with two sizes",
     lambda: plated.einsum("ab,bc->", torch.randn(2, 3), torch.randn(4, 5)), ("'b'",)),
    ("einsum output keeps a plated variable without its plates",
     lambda: plated.einsum("ai->a", torch.randn(2, 3), plates="i"), ("'a'", "'i'")),
    ("einsum operand count",
     lambda: plated.einsum("ab,bc->", torch.randn(2, 3)), ("'ab,bc->'",)),
    ("einsum operand rank",
     lambda: plated.einsum("ab,bc->", torch.randn(2, 3), torch.randn(3)), ("'bc'",)),
    ("einsum NaN operand",
     lambda: plated.einsum("ab,bc->", torch.randn(2, 3), torch.full((3, 2), math.nan)),
     ("NaN", "bc")),
]


@pytest.mark.parametrize("build,names", [c[1:] for c in GRAPH_ERRORS],
                         ids=[c[0] for c in GRAPH_ERRORS])
def test_graph_errors_name_the_culprit(build: Callable[[], object], names: tuple[str, ...]
                                       ) -> None:
    with pytest.raises(GraphError, match=naming(*names)) as info:
        build()
    assert isinstance(info.value, ValueError) and isinstance(info.value, PlatedError)


def test_other_argument_errors() -> None:
    g = PlatedFactorGraph([F((2,), ("a",), "f0")])
    with pytest.raises(ValueError, match="num_samples"):
        g.sample(0)
    with pytest.raises(ValueError, match="'sum'"):
        plated.einsum("a->", torch.randn(2), ring="sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="-1"):
        plated.set_plan_cache_size(-1)


# -- IntractableError -----------------------------------------------------------------------------


def coupled_plates(nan: bool = False) -> tuple[list[Factor], list[Plate]]:
    """``a`` in plate i and ``b`` in plate j, coupled in {i, j}: einsum ``"ia,jb,ijab->"``."""
    pair = torch.randn(2, 3, 2, 2)
    if nan:
        pair[0, 0, 0, 0] = math.nan
    factors = [F((2, 2), ("i", "a"), "fa"), F((3, 2), ("j", "b"), "fb"),
               Factor(pair, ("i", "j", "a", "b"), name="fab")]
    return factors, [Plate("i", 2), Plate("j", 3)]


def coupled_chain() -> tuple[list[Factor], list[Plate]]:
    """Chain x in {n, t} coupled to w, which varies along t (w in {t}) but is no chain variable."""
    T, N = 3, 2
    factors = [F((2,), ("x_prev",), "init"),
               F((N, T, 2, 2, 2), ("n", "t", "x_prev", "x", "w"), "trans"),
               F((T, 2), ("t", "w"), "prior_w")]
    return factors, [Plate("n", N), Plate("t", T, sequential=True, prev={"x": "x_prev"})]


def chain_grid() -> tuple[list[Factor], list[Plate]]:
    """Chains along two sequential plates in the same plates: a grid, exponential either way."""
    factors = [F((3, 4, 2, 2, 2, 2), ("s", "t", "x_prev", "x", "y_prev", "y"), "grid")]
    return factors, [Plate("s", 3, sequential=True, prev={"x": "x_prev"}),
                     Plate("t", 4, sequential=True, prev={"y": "y_prev"})]


INTRACTABLE = [
    ("independent plates coupled", coupled_plates, ("'a'", "'b'")),
    ("chain coupled to a non-chain variable along its plate", coupled_chain, ("'t'", "'w'")),
    ("grid of chains", chain_grid, ("'s'", "'t'")),
]

#: per case of INTRACTABLE: the error's structured fields (plates, variables)
INTRACTABLE_FIELDS = {
    "independent plates coupled": (("i", "j"), ("a", "b")),
    "chain coupled to a non-chain variable along its plate": (("t",), ("w",)),
    "grid of chains": (("s", "t"), ()),
}


@pytest.mark.parametrize("make,fields", [(c[1], INTRACTABLE_FIELDS[c[0]]) for c in INTRACTABLE],
                         ids=[c[0] for c in INTRACTABLE])
def test_intractable_error_carries_its_fields(
        make: Callable[[], tuple[list[Factor], list[Plate]]],
        fields: tuple[tuple[str, ...], tuple[str, ...]]) -> None:
    factors, plates = make()
    with pytest.raises(IntractableError) as info:
        PlatedFactorGraph(factors, plates).cost()
    err = info.value
    assert (err.plates, err.variables) == fields
    assert err.remedies and str(err) == f"{err.problem}. Way out: {', or '.join(err.remedies)}"
    # a front end re-words the remedies from the fields, not by parsing the text
    wrapped = err.with_remedies(["do this", "do that", "ask"], context="In a front end")
    assert str(wrapped) == (f"{err.problem}.\nIn a front end the ways out are: do this, do that, "
                            "or ask.")
    assert (wrapped.plates, wrapped.variables, wrapped.problem) == (err.plates, err.variables,
                                                                    err.problem)


@pytest.mark.parametrize("make,names", [c[1:] for c in INTRACTABLE],
                         ids=[c[0] for c in INTRACTABLE])
def test_intractable_raised_by_cost_without_tensor_work(
        make: Callable[[], tuple[list[Factor], list[Plate]]], names: tuple[str, ...]) -> None:
    factors, plates = make()
    plated.clear_plan_cache()
    g = PlatedFactorGraph(factors, plates)
    rec = RecordOps()
    with rec, pytest.raises(IntractableError, match=naming(*names)) as info:
        g.cost()
    assert rec.ops == [], f"tensor work before the IntractableError: {rec.ops}"
    assert isinstance(info.value, NotImplementedError) and isinstance(info.value, PlatedError)
    for query in (g.log_partition, g.map, g.max_log_density, g.marginals, lambda: g.sample(2)):
        with pytest.raises(IntractableError):
            query()


def test_intractable_comes_before_values_when_not_validating() -> None:
    """NaN values are never looked at: the planner refuses first, and no ATen op runs, with or
    without validation."""
    factors, plates = coupled_plates(nan=True)
    g = PlatedFactorGraph(factors, plates, validate=False)
    rec = RecordOps()
    with rec, pytest.raises(IntractableError, match=naming("'a'", "'b'")):
        g.log_partition()
    with rec, pytest.raises(IntractableError):
        g.map()
    assert rec.ops == [], rec.ops
    ops = [f.tensor for f in factors]
    rec = RecordOps()
    with rec, pytest.raises(IntractableError):
        plated.einsum("ia,jb,ijab->", *ops, plates="ij", validate=False)
    assert rec.ops == [], rec.ops
    # with validation on too, the structure is checked first: no value is looked at
    rec = RecordOps()
    with rec, pytest.raises(IntractableError):
        PlatedFactorGraph(factors, plates).log_partition()
    assert rec.ops == [], rec.ops


# -- unroll: the way out -------------------------------------------------------------------------


@pytest.mark.parametrize("make,plate", [(coupled_plates, "j"), (coupled_plates, "i"),
                                        (coupled_chain, "t")], ids=["j", "i", "chain t"])
def test_unroll_makes_intractable_tractable(
        make: Callable[[], tuple[list[Factor], list[Plate]]], plate: str) -> None:
    factors, plates = make()
    g = PlatedFactorGraph(factors, plates, unroll=[plate])
    en = naive.enumerate_joint(factors, plates)
    assert_close(g.log_partition(), en.log_joint.logsumexp(0), rtol=RTOL, atol=1e-10)
    assert_close(g.max_log_density(), en.log_joint.max(), rtol=RTOL, atol=1e-10)
    assert all(plate not in ps for _, ps in g.variables().values())
    # marginals of the unrolled copies are the brute-force marginals of the plated variable
    ref = naive.marginals(factors, plates)
    marg = g.marginals()
    size = next(p.size for p in plates if p.name == plate)
    for v, m in ref.items():
        vplates = en.var_plates[v]
        if plate not in vplates:
            assert_close(marg[v], m, rtol=0, atol=1e-8)
            continue
        for k in range(size):
            expected = m.select(vplates.index(plate), k)
            assert_close(marg[f"{v}[{k}]"], expected, rtol=0, atol=1e-8, msg=f"{v}[{k}]")


@pytest.mark.parametrize("which", ["independent, no chain", "sequential", "around a chain"])
def test_unroll_preserves_tractable_graphs(which: str) -> None:
    """Unrolling any plate of a tractable graph keeps log Z (and the max): random graphs without
    chains (unroll each independent plate), with a chain (unroll the sequential plate), and with
    a chain inside independent plates (unroll one of those)."""
    checked = 0
    for seed in range(80):
        factors, plates = testing.random_graph(seed, sequential=which != "independent, no chain")
        seq = next((p for p in plates if p.sequential), None)
        if which == "independent, no chain":
            names = [p.name for p in plates]
        elif which == "sequential":
            names = [seq.name] if seq is not None else []
        else:
            chain_plates = naive.enumerate_joint(factors, plates).var_plates.get("x", ())
            names = [p for p in chain_plates if seq is None or p != seq.name]
        for name in names:
            tag = f"seed {seed}, unroll {name!r}"
            g = PlatedFactorGraph(factors, plates, unroll=[name])
            assert_close(g.log_partition(), naive.log_partition(factors, plates), rtol=RTOL,
                         atol=1e-10, msg=lambda m, tag=tag: f"{tag}: {m}")
            assert_close(g.max_log_density(), naive.map(factors, plates)[1], rtol=RTOL,
                         atol=1e-10, msg=lambda m, tag=tag: f"{tag}: {m}")
            checked += 1
    assert checked >= 10, checked


def test_unroll_independent_plate_around_a_chain() -> None:
    """Sequences (plate n) of a chain along t: unrolling n gives one chain per sequence."""
    factors = [F((2, 3, 2, 2), ("n", "t", "x_prev", "x"), "trans")]
    plates = [Plate("n", 2), Plate("t", 3, sequential=True, prev={"x": "x_prev"})]
    g = PlatedFactorGraph(factors, plates, unroll=["n"])
    assert_close(g.log_partition(), naive.log_partition(factors, plates), rtol=RTOL, atol=1e-10)


# -- memory cap ----------------------------------------------------------------------------------


def big_chain() -> list[Factor]:
    n = 100
    return [F((n, n), ("a", "b"), "fab"), F((n, n), ("b", "c"), "fbc"),
            F((n, n), ("c", "d"), "fcd")]


def test_memory_cap_slices_and_keeps_the_result() -> None:
    n = 300
    factors = [F((n, n), ("a", "b"), "fab"), F((n, n), ("b", "c"), "fbc"),
               F((n, n), ("c", "d"), "fcd")]
    free = PlatedFactorGraph(factors)
    free_cost = free.cost()
    assert not any("slice" in s for s in free_cost.steps)
    cap = free_cost.working_bytes["log_partition"] // 3
    capped = PlatedFactorGraph(factors, memory_cap=cap)
    cost = capped.cost()
    assert any("slice" in s for s in cost.steps), str(cost)
    assert "slice" in str(cost)
    assert cost.peak_bytes < free_cost.peak_bytes
    with torch.no_grad():  # the cap holds, measured
        _, peak = peak_allocated(capped.log_partition)
    assert peak <= cap, (peak, cap, str(cost))
    assert_close(capped.log_partition(), free.log_partition(), rtol=1e-12, atol=1e-12)
    assert_close(capped.max_log_density(), free.max_log_density(), rtol=1e-12, atol=1e-12)
    for v, m in capped.map().items():
        assert torch.equal(m, free.map()[v])
    # the functional face slices too
    ops = [f.tensor for f in factors]
    (ref,) = plated.einsum("ab,bc,cd->d", *ops)
    (out,) = plated.einsum("ab,bc,cd->d", *ops, memory_cap=cap)
    assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_memory_cap_too_small_raises() -> None:
    factors = big_chain()
    g = PlatedFactorGraph(factors, memory_cap=1000)
    rec = RecordOps()
    with rec, pytest.raises(MemoryCapError, match=naming("memory", "cap")) as info:
        g.cost()
    assert rec.ops == []
    assert isinstance(info.value, MemoryError) and isinstance(info.value, PlatedError)
    with pytest.raises(MemoryCapError):
        g.log_partition()
    with pytest.raises(MemoryCapError):
        plated.einsum("ab,bc,cd->", *[f.tensor for f in factors], memory_cap=1000)


def test_memory_cap_on_a_chain_names_the_plate() -> None:
    T, K = 1000, 8
    factors = [F((K,), ("x_prev",), "init"), F((T, K, K), ("t", "x_prev", "x"), "trans")]
    plates = [Plate("t", T, sequential=True, prev={"x": "x_prev"})]
    with pytest.raises(MemoryCapError, match=naming("'t'")):
        PlatedFactorGraph(factors, plates, memory_cap=4096).cost()
