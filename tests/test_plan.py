"""Plans: the bounded plan cache, the cost report, and log-depth elimination of long chains.

A plan depends only on a graph's structure (names, shapes, ring, options), never on values, so
graphs that share a structure share one plan. The cost report is computed at planning time, with
no tensor work. A sequential plate of length T is eliminated by a parallel scan whose plan has
O(1) steps and whose run dispatches O(log T) tensor ops: no Python loop over time steps.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from helpers import RTOL, RecordOps
from torch.testing import assert_close

import plated
from plated import Factor, Plate, PlatedFactorGraph, naive
from plated.plan import ScanStep
from plated.plan.chains import forced_chain_method


@pytest.fixture(autouse=True)
def fresh_plan_cache() -> Iterator[None]:
    """Each test starts from an empty cache; the cache bound is restored afterwards."""
    maxsize = plated.plan_cache_info()["maxsize"]
    plated.clear_plan_cache()
    try:
        yield
    finally:
        plated.set_plan_cache_size(maxsize)
        plated.clear_plan_cache()


def small_graph(n: int = 3, k: int = 2) -> PlatedFactorGraph:
    return PlatedFactorGraph(
        [Factor(torch.randn(k), ("a",), name="fa"),
         Factor(torch.randn(n, k, k + 1), ("n", "a", "b"), name="fab")],
        [Plate("n", n)])


def chain(T: int, K: int = 4, batch: int = 2) -> PlatedFactorGraph:
    return PlatedFactorGraph(
        [Factor(torch.randn(batch, K), ("n", "x_prev")),
         Factor(torch.randn(batch, T, K, K), ("n", "t", "x_prev", "x")),
         Factor(torch.randn(batch, T, K), ("n", "t", "x"))],
        [Plate("n", batch), Plate("t", T, sequential=True, prev={"x": "x_prev"})])


# -- the plan cache --------------------------------------------------------------------------------


def test_same_structure_is_planned_once() -> None:
    info = plated.plan_cache_info()
    assert (info["misses"], info["hits"], info["size"]) == (0, 0, 0)
    g1 = small_graph()
    z1 = g1.log_partition()
    info = plated.plan_cache_info()
    assert (info["misses"], info["hits"], info["size"]) == (1, 0, 1)
    # new values, same structure: a hit, and the values are the new graph's own
    g2 = small_graph()
    z2 = g2.log_partition()
    info = plated.plan_cache_info()
    assert (info["misses"], info["hits"], info["size"]) == (1, 1, 1)
    assert z1 != z2
    assert_close(z2, naive.log_partition(list(g2.factors), list(g2.plates)), rtol=RTOL, atol=0)
    for _ in range(5):
        g2.log_partition()
    assert plated.plan_cache_info()["misses"] == 1
    assert plated.plan_cache_info()["hits"] == 6


def test_different_structure_is_a_new_plan() -> None:
    small_graph(3, 2).log_partition()
    assert plated.plan_cache_info()["misses"] == 1
    small_graph(4, 2).log_partition()  # another plate size
    assert plated.plan_cache_info()["misses"] == 2
    small_graph(3, 3).log_partition()  # another domain size
    assert plated.plan_cache_info()["misses"] == 3
    g = small_graph(3, 2)
    g.max_log_density()  # another ring
    assert plated.plan_cache_info()["misses"] == 4
    g.map()  # the max ring's plan again
    assert plated.plan_cache_info()["misses"] == 4
    PlatedFactorGraph(list(g.factors), list(g.plates), memory_cap=1 << 30).log_partition()
    assert plated.plan_cache_info()["misses"] == 5  # another option
    PlatedFactorGraph([Factor(f.tensor.float(), f.dims) for f in g.factors],
                      list(g.plates)).log_partition()
    assert plated.plan_cache_info()["misses"] == 6  # another dtype (item size)
    assert plated.plan_cache_info()["size"] == 6


def test_einsum_uses_the_plan_cache() -> None:
    x, y = torch.randn(3, 4), torch.randn(4, 5)
    (a,) = plated.einsum("ab,bc->", x, y)
    (b,) = plated.einsum("ab,bc->", x + 1, y)
    info = plated.plan_cache_info()
    assert (info["misses"], info["hits"]) == (1, 1)
    assert_close(b, a + 1, rtol=RTOL, atol=1e-12)


def test_cache_bound_is_respected_lru() -> None:
    plated.set_plan_cache_size(3)
    assert plated.plan_cache_info()["maxsize"] == 3
    graphs = [small_graph(n) for n in range(1, 7)]
    for g in graphs:
        g.log_partition()
        assert plated.plan_cache_info()["size"] <= 3
    assert plated.plan_cache_info()["misses"] == 6
    # the three most recent plans are cached, the oldest were evicted
    graphs[-1].log_partition()
    assert plated.plan_cache_info()["hits"] == 1
    graphs[0].log_partition()
    assert plated.plan_cache_info()["misses"] == 7
    # using a plan makes it most recent: it survives the next insertion
    graphs[-2].log_partition()  # hit; order now: g5, g0, g4 -> g4 newest
    small_graph(10).log_partition()  # evicts g5 (least recent)
    hits = plated.plan_cache_info()["hits"]
    graphs[-2].log_partition()
    assert plated.plan_cache_info()["hits"] == hits + 1
    misses = plated.plan_cache_info()["misses"]
    graphs[-1].log_partition()
    assert plated.plan_cache_info()["misses"] == misses + 1
    # resizing starts a new, empty cache (functools.lru_cache cannot be resized in place)
    plated.set_plan_cache_size(1)
    assert plated.plan_cache_info()["size"] == 0
    graphs[0].log_partition()
    graphs[1].log_partition()
    assert plated.plan_cache_info()["size"] == 1


def test_graphs_that_differ_only_in_labels_share_a_plan() -> None:
    def graph(names: tuple[str, str]) -> PlatedFactorGraph:
        x = torch.randn(3, 4)
        y = torch.randn(4)
        return PlatedFactorGraph([Factor(x, ("a", "b"), name=names[0]),
                                  Factor(y, ("b",), name=names[1])])

    graph(("site 'x'", "site 'y'")).log_partition()
    graph(("site 'u'", "site 'v'")).log_partition()
    info = plated.plan_cache_info()
    assert (info["misses"], info["hits"]) == (1, 1)


def test_an_error_from_a_shared_plan_still_names_the_factor() -> None:
    for name in ("first", "second"):
        bad = [Factor(torch.randn(3, 4), ("a", "b"), name=f"{name}-ab"),
               Factor(torch.randn(5), ("b",), name=f"{name}-b")]
        with pytest.raises(plated.GraphError, match=f"in factor {name}-ab and 5 in factor "
                                                    f"{name}-b"):
            PlatedFactorGraph(bad).log_partition()


def test_cache_size_zero_still_works() -> None:
    plated.set_plan_cache_size(0)
    g = small_graph()
    z = g.log_partition()
    assert_close(g.log_partition(), z, rtol=0, atol=0)
    assert plated.plan_cache_info()["size"] == 0


def test_clear_plan_cache_resets_counters() -> None:
    small_graph().log_partition()
    small_graph().log_partition()
    plated.clear_plan_cache()
    info = plated.plan_cache_info()
    assert (info["hits"], info["misses"], info["size"]) == (0, 0, 0)


# -- the cost report -------------------------------------------------------------------------------


def test_cost_report() -> None:
    g = small_graph(5, 3)
    rec = RecordOps()
    with rec:
        cost = g.cost()
    assert rec.ops == [], f"cost() did tensor work: {rec.ops}"
    assert isinstance(cost, plated.CostReport)
    assert cost.flops > 0
    assert cost.peak_bytes > 0
    inputs = sum(f.tensor.numel() * f.tensor.element_size() for f in g.factors)
    assert cost.peak_bytes >= inputs
    assert cost.peak_bytes_saved >= cost.peak_bytes
    assert len(cost.steps) == len(g.plan().ops) >= 1
    text = str(cost)
    for step in cost.steps:
        assert step in text
    assert text.count("\n") >= len(cost.steps)
    assert g.cost("max").flops > 0


def test_cost_grows_with_problem_size() -> None:
    small, big = small_graph(2, 2).cost(), small_graph(50, 20).cost()
    assert big.flops > small.flops
    assert big.peak_bytes > small.peak_bytes
    short, long = chain(100).cost(), chain(10_000).cost()
    assert long.flops > 50 * short.flops  # linear in T
    assert long.peak_bytes > 50 * short.peak_bytes


# -- log-depth chains ------------------------------------------------------------------------------


def test_long_chain_plan_has_no_step_per_time_step() -> None:
    g = chain(10_000)
    assert len(g.plan().ops) < 50
    assert len(g.cost().steps) < 50
    assert len(chain(10_000).plan().ops) == len(chain(17).plan().ops)


def test_long_chain_run_is_log_depth() -> None:
    """The tensor ops dispatched to eliminate (and to run backward through) a chain by the scan
    grow like log T: far fewer than T for T = 10,000, and about a constant more per doubling.
    The plan's own choice for this narrow chain is not the sequential recursion."""
    counts = {}
    for T in (1_000, 10_000):
        assert [s.method for s in chain(T).plan().steps
                if isinstance(s, ScanStep)] in (["scan"], ["blocked"])
    with forced_chain_method("scan"):
        _count_scan_ops(counts)
    assert counts[10_000] < 1_000, counts
    assert counts[(10_000, "map")] < 2_000, counts
    assert counts[(10_000, "sample")] < 2_000, counts
    # log2(10,000 / 1,000) ~ 3.3 more levels; a loop over steps would add ~9,000 ops
    assert counts[10_000] - counts[1_000] < 200, counts


def _count_scan_ops(counts: dict[object, int]) -> None:
    for T in (1_000, 10_000):
        g = chain(T)
        assert [s.method for s in g.plan().steps if isinstance(s, ScanStep)] == ["scan"]
        g.log_partition()  # plan outside the recording
        rec = RecordOps()
        with rec:
            g.log_partition()
        counts[T] = len(rec.ops)
        rec = RecordOps()
        with rec:
            g.map()
        counts[(T, "map")] = len(rec.ops)
        rec = RecordOps()
        with rec:
            g.sample(2)
        counts[(T, "sample")] = len(rec.ops)
    assert counts[(10_000, "map")] - counts[(1_000, "map")] < 400, counts
