"""How far ``cost()`` can be trusted: predicted working memory and FLOPs against measured ones.

For each graph of a battery (chains, wide plates, nested plates, sequential plates, kept
variables, sliced plans under a memory cap) and each query, the script measures

* the working memory: the peak of tensor allocations during the query, from the PyTorch
  profiler's memory events (:func:`plated.testing.peak_allocated`), less the gradients and
  results the query leaves behind — the quantity a memory cap bounds;
* the FLOPs: every arithmetic operator the query runs, counted by a ``TorchDispatchMode``
  (:class:`FlopCounter`): a matrix product or einsum as its multiply-adds, an elementwise
  operator or a reduction as one operation per element it reads or writes;

and prints them beside the prediction (``CostReport.working_bytes``,
``CostReport.backward_working_bytes``, ``CostReport.flops``, ``backward_flops`` and
``choice_flops``), with the ratio predicted / measured. The target is a ratio within
[1/1.5, 1.5]. Graphs are built with ``validate=False``, so that the FLOPs are the engine's own
(the value check adds one sum per input element).

Run ``PYTHONPATH=. python benchmarks/cost_accuracy.py`` (``--write-readme`` records the table
in ``benchmarks/README.md``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from plated import Factor, Plate, PlatedFactorGraph  # noqa: E402
from plated.plan import check_query_memory  # noqa: E402
from plated.testing import peak_allocated  # noqa: E402

SECTION = "## cost_accuracy.py"
MB = 10**6
QUERIES = ("log_partition", "gradient", "map", "sample")
SAMPLES = 8


def _rnd(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _chain(gen: torch.Generator, n: int, k: int, **kw: Any) -> PlatedFactorGraph:
    names = [f"v{i}" for i in range(n + 1)]
    return PlatedFactorGraph([Factor(_rnd(gen, k, k), (names[i], names[i + 1]))
                              for i in range(n)], **kw)


def _star(gen: torch.Generator, k: int, arms: int, **kw: Any) -> PlatedFactorGraph:
    return PlatedFactorGraph([Factor(_rnd(gen, k, k), ("hub", f"x{i}")) for i in range(arms)],
                             **kw)


def _mixture(gen: torch.Generator, n: int, k: int, **kw: Any) -> PlatedFactorGraph:
    return PlatedFactorGraph([Factor(_rnd(gen, k), ("z",)), Factor(_rnd(gen, n, k), ("n", "z"))],
                             [Plate("n", n)], **kw)


def _local(gen: torch.Generator, n: int, k: int, **kw: Any) -> PlatedFactorGraph:
    return PlatedFactorGraph([Factor(_rnd(gen, k), ("g",)), Factor(_rnd(gen, n, k, k),
                                                                   ("n", "g", "l"))],
                             [Plate("n", n)], **kw)


def _nested(gen: torch.Generator, n: int, m: int, k: int, **kw: Any) -> PlatedFactorGraph:
    return PlatedFactorGraph(
        [Factor(_rnd(gen, k), ("a",)), Factor(_rnd(gen, n, k, k), ("i", "a", "b")),
         Factor(_rnd(gen, n, m, k, k), ("i", "j", "b", "c"))],
        [Plate("i", n), Plate("j", m)], **kw)


def _hmm(gen: torch.Generator, n: int, t: int, k: int, **kw: Any) -> PlatedFactorGraph:
    plates = [Plate("t", t, sequential=True, prev={"x": "x_prev"})]
    factors = [Factor(_rnd(gen, k), ("x_prev",)), Factor(_rnd(gen, t, k, k), ("t", "x_prev", "x"))]
    if n > 1:
        plates.insert(0, Plate("n", n))
        factors = [Factor(_rnd(gen, n, k), ("n", "x_prev")),
                   Factor(_rnd(gen, n, t, k, k), ("n", "t", "x_prev", "x"))]
    return PlatedFactorGraph(factors, plates, **kw)


def _unary(gen: torch.Generator, k: int, **kw: Any) -> PlatedFactorGraph:
    return PlatedFactorGraph([Factor(_rnd(gen, k, k), ("a", "b"))], **kw)


def _keep(gen: torch.Generator, k: int, **kw: Any) -> PlatedFactorGraph:
    return PlatedFactorGraph([Factor(_rnd(gen, k, k), ("a", "b")),
                              Factor(_rnd(gen, k, k), ("b", "c"))], keep_vars=["b"], **kw)


#: name -> builder of the graph (a fresh generator each time)
BATTERY: dict[str, Callable[[torch.Generator], PlatedFactorGraph]] = {
    "pair 1000^2": lambda g: _chain(g, 2, 1000),
    "chain 3 x 700^2": lambda g: _chain(g, 3, 700),
    "chain 8 x 300^2": lambda g: _chain(g, 8, 300),
    "star 6 x 400^2": lambda g: _star(g, 400, 6),
    "unary 2000^2": lambda g: _unary(g, 2000),
    "keep b, 700^2": lambda g: _keep(g, 700),
    "mixture n=200k, K=10": lambda g: _mixture(g, 200_000, 10),
    "local n=20k, 16x16": lambda g: _local(g, 20_000, 16),
    "local n=2k, 64x64": lambda g: _local(g, 2_000, 64),
    "nested 50x40, 32x32": lambda g: _nested(g, 50, 40, 32),
    "nested 200x20, 16x16": lambda g: _nested(g, 200, 20, 16),
    "hmm T=20k, K=8": lambda g: _hmm(g, 1, 20_000, 8),
    "hmm T=2k, K=32": lambda g: _hmm(g, 1, 2_000, 32),
    "hmm 64 x T=500, K=8": lambda g: _hmm(g, 64, 500, 8),
    "sliced pair 1000^2, cap 4 MB": lambda g: _chain(g, 2, 1000, memory_cap=4 * MB),
    "sliced chain 3 x 700^2, cap 6 MB": lambda g: _chain(g, 3, 700, memory_cap=6 * MB),
    "sliced star 6 x 400^2, cap 4 MB": lambda g: _star(g, 400, 6, memory_cap=4 * MB),
    "sliced unary 2000^2, cap 8 MB": lambda g: _unary(g, 2000, memory_cap=8 * MB),
    "sliced keep b, 700^2, cap 8 MB": lambda g: _keep(g, 700, memory_cap=8 * MB),
    "sliced local n=2k, 64x64, cap 8 MB": lambda g: _local(g, 2_000, 64, memory_cap=8 * MB),
    "sliced nested 50x40, 32x32, cap 8 MB": lambda g: _nested(g, 50, 40, 32,
                                                               memory_cap=8 * MB),
}


class FlopCounter(TorchDispatchMode):
    """Counts the arithmetic of every operator run under it (see the module docstring)."""

    #: operators that move or view data, or only read metadata: no arithmetic
    FREE = ("view", "reshape", "permute", "expand", "transpose", "t", "unsqueeze", "squeeze",
            "select", "slice", "narrow", "alias", "as_strided", "detach", "clone", "copy_",
            "_to_copy", "empty", "zeros", "ones", "full", "new_empty", "new_zeros", "new_full",
            "fill_", "zero_", "lift_fresh", "arange", "stack", "cat", "index", "index_put",
            "_unsafe_view", "unbind", "split", "_local_scalar_dense", "scalar_tensor",
            "nonzero", "empty_like", "zeros_like", "ones_like", "full_like", "unfold",
            "contiguous", "resize_", "set_", "rand", "uniform_", "multinomial")

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in ("mm", "bmm", "addmm", "baddbmm"):
            a, b = args[0], args[1]
            if name in ("addmm", "baddbmm"):
                a, b = args[1], args[2]
            self.flops += 2 * a.numel() * b.shape[-1]
        elif not name.startswith(self.FREE) and name not in self.FREE:
            inputs = [x for x in args if isinstance(x, torch.Tensor)]
            outs = out if isinstance(out, (tuple, list)) else (out,)
            largest = max([x.numel() for x in inputs]
                          + [x.numel() for x in outs if isinstance(x, torch.Tensor)] + [0])
            self.flops += largest
        return out


def _result_bytes(x: Any) -> int:
    if isinstance(x, dict):
        return sum(_result_bytes(v) for v in x.values())
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    return 0


def run_query(graph: PlatedFactorGraph, query: str) -> tuple[Callable[[], Any], list[Any]]:
    """The query as a function of nothing, and the tensors whose gradients it fills."""
    tensors = [f.tensor for f in graph.factors]
    if query == "gradient":
        for t in tensors:
            t.requires_grad_(True)

        def grad() -> Any:
            out = graph.log_partition()
            out.sum().backward()
            return out
        return grad, tensors
    for t in tensors:
        t.requires_grad_(False)
    if query == "log_partition":
        return graph.log_partition, []
    if query == "map":
        return graph.map, []
    return lambda: graph.sample(SAMPLES), []


def predicted(graph: PlatedFactorGraph, query: str) -> tuple[int, int]:
    """Predicted working memory (bytes) and FLOPs of ``query``."""
    ring = "max" if query == "map" else "log"
    # log Z (and its gradient) keeps the graph's keep_vars; the other queries eliminate all
    plan = graph.plan(ring, keep_vars=query in ("log_partition", "gradient"))
    check_query_memory(plan, query, SAMPLES if query == "sample" else 1)  # refused here
    cost = plan.cost
    if query in ("log_partition", "gradient"):
        flops = cost.flops + (cost.backward_flops if query == "gradient" else 0)
        return cost.working_bytes[query], flops
    num_samples = 1 if query == "map" else SAMPLES
    return (cost.backward_working_bytes(num_samples),
            cost.flops + cost.choice_flops(num_samples))


def measure(graph: PlatedFactorGraph, query: str) -> tuple[int, int]:
    """Measured working memory (bytes) and FLOPs of ``query`` (after one unmeasured run)."""
    fn, leaves = run_query(graph, query)
    fn()
    for t in leaves:
        t.grad = None
    result, peak = peak_allocated(fn)
    left = _result_bytes(result) + sum(_result_bytes(t.grad) for t in leaves)
    for t in leaves:
        t.grad = None
    counter = FlopCounter()
    with counter:
        fn()
    for t in leaves:
        t.grad = None
    return max(peak - left, 0), counter.flops


def _ratio(pred: int, meas: int) -> float:
    return pred / meas if meas > 0 else math.inf if pred > 0 else 1.0


def rows(names: Sequence[str], queries: Sequence[str]) -> tuple[list[list[str]], list[float],
                                                                 list[float]]:
    out, mem_ratios, flop_ratios = [], [], []
    for name in names:
        for query in queries:
            built = BATTERY[name](torch.Generator().manual_seed(0))
            # the engine's own work: no value check (one sum per input element)
            graph = PlatedFactorGraph(built.factors, built.plates, keep_vars=built.keep_vars,
                                      memory_cap=built.memory_cap, validate=False)
            try:
                pm, pf = predicted(graph, query)
            except MemoryError as err:  # MemoryCapError: refused before any tensor work
                out.append([name, query, "refused", "-", "-", "-", "-", "-"])
                print(f"{name}  {query}  refused: {err}", flush=True)
                continue
            mm, mf = measure(graph, query)
            rm, rf = _ratio(pm, mm), _ratio(pf, mf)
            mem_ratios.append(rm)
            flop_ratios.append(rf)
            row = [name, query, f"{pm / MB:.2f}", f"{mm / MB:.2f}", f"{rm:.2f}",
                   f"{pf:.3g}", f"{mf:.3g}", f"{rf:.2f}"]
            print("  ".join(row), flush=True)
            out.append(row)
    return out, mem_ratios, flop_ratios


HEADER = ["graph", "query", "predicted MB", "measured MB", "ratio", "predicted FLOPs",
          "measured FLOPs", "ratio"]


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--graphs", nargs="*", default=list(BATTERY), choices=list(BATTERY))
    p.add_argument("--queries", nargs="*", default=list(QUERIES), choices=list(QUERIES))
    p.add_argument("--write-readme", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    table, mem, flops = rows(args.graphs, args.queries)

    def within(rs: list[float]) -> str:
        ok = sum(1 for r in rs if 1 / 1.5 <= r <= 1.5)
        return (f"{ok} of {len(rs)} within 1.5x (median ratio {statistics.median(rs):.2f}, "
                f"range {min(rs):.2f}-{max(rs):.2f})")

    summary = f"memory: {within(mem)}; FLOPs: {within(flops)}"
    print(summary)
    if args.write_readme:
        from benchmarks.common import machine_info, markdown_table, replace_readme_section

        info = machine_info()
        text = (f"{SECTION}\n\n`cost()` against measurement on {len(args.graphs)} graphs: working "
                "memory (the peak of tensor allocations during the query from the profiler's "
                "memory events, less the gradients and results it leaves; what a memory cap "
                "bounds) and FLOPs (every arithmetic operator, counted by a dispatch mode). "
                f"Queries: log Z, log Z with its gradient, MAP, {SAMPLES} samples.\n\n"
                f"Summary: {summary}.\n\n"
                f"Machine: cpu {info['cpu']}, torch {info['torch']}, 1 thread, float64.\n\n"
                "Command: `PYTHONPATH=. python benchmarks/cost_accuracy.py --write-readme`.\n\n"
                + markdown_table(HEADER, table) + "\n")
        replace_readme_section(SECTION, text)


if __name__ == "__main__":
    main()
