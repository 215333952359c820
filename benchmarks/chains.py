"""Benchmark: the three chain methods, and whether the plan's cost model chooses the fastest.

For each shape (batch, length, states) of a sequential-plate HMM, times log Z plus its gradient
through ``PlatedFactorGraph.log_partition`` with the chain forced to the sequential recursion,
the blocked recursion and the parallel scan (:func:`plated.plan.chains.forced_chain_method`),
and a hand-written torch
forward loop (``logsumexp`` per step, autograd's backward) on the same inputs, interleaved
round by round. Prints medians, the paired ratios, the plan's predicted times
(:func:`plated.plan.chains.chain_times`) and whether its choice was the measured faster method.

Run from the repository root::

    PYTHONPATH=. python benchmarks/chains.py [--rounds 7] [--threads 2] [--dtype float64]
        [--write-readme]

``--write-readme`` replaces the README's section for the dtype run (float32 and float64 have a
section each).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from benchmarks.common import machine_info, markdown_table, replace_readme_section
from plated import Factor, Plate, PlatedFactorGraph
from plated.plan.chains import chain_method, forced_chain_method

SHAPES = [(4, 30, 3), (1, 2000, 2), (1, 20000, 4), (229, 129, 16), (16, 2000, 16),
          (229, 129, 64), (64, 500, 8), (8, 129, 64), (16, 10000, 16), (5, 150, 12)]
METHODS = ("recursion", "blocked", "scan")


def tensors(batch: int, length: int, k: int, dtype: torch.dtype
            ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    init = torch.randn(batch, k, generator=g, dtype=torch.float64).log_softmax(-1)
    trans = torch.randn(batch, length, k, k, generator=g, dtype=torch.float64).log_softmax(-1)
    return init.to(dtype).requires_grad_(), trans.to(dtype).requires_grad_()


def graph_fn(init: torch.Tensor, trans: torch.Tensor, method: str) -> Callable[[], None]:
    batch, length = trans.shape[:2]

    def run() -> None:
        with forced_chain_method(method):  # type: ignore[arg-type]
            g = PlatedFactorGraph(
                [Factor(init, ("seq", "x_prev")), Factor(trans, ("seq", "time", "x_prev", "x"))],
                [Plate("seq", batch), Plate("time", length, sequential=True,
                                            prev={"x": "x_prev"})])
            torch.autograd.grad(g.log_partition(), (init, trans))
    return run


def loop_fn(init: torch.Tensor, trans: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        alpha = init
        for m in trans.unbind(1):
            alpha = torch.logsumexp(alpha.unsqueeze(-1) + m, dim=-2)
        torch.autograd.grad(alpha.logsumexp(-1).sum(), (init, trans))
    return run


def measure(fns: dict[str, Callable[[], None]], rounds: int, budget_s: float
            ) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up (the forced plan is rebuilt inside each call: cached after the first)
    start = time.perf_counter()
    for r in range(rounds):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s and r >= 2:
            break
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=20.0, help="per shape")
    ap.add_argument("--write-readme", action="store_true")
    ap.add_argument("--shapes", default=None,
                    help="comma-separated BATCHxLENGTHxSTATES (default: all of SHAPES)")
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    shapes = SHAPES if args.shapes is None else [
        tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    torch.set_num_threads(args.threads)
    rows = []
    right = 0
    for batch, length, k in shapes:
        init, trans = tensors(batch, length, k, dtype)
        fns = {method: graph_fn(init, trans, method) for method in METHODS}
        if length <= 2000:
            fns["torch loop"] = loop_fn(init, trans)
        t = {k2: statistics.median(v) for k2, v in measure(fns, args.rounds,
                                                           args.budget_s).items()}
        choice = chain_method("log", batch, length, k, "cpu", dtype.itemsize, None)
        assert choice is not None
        chosen, _, predicted = choice
        faster = min(METHODS, key=t.__getitem__)
        right += chosen == faster
        rows.append([f"{batch} x {length} x {k}"]
                    + [f"{t[method] * 1e3:.3g}" for method in METHODS]
                    + [f"{t['torch loop'] * 1e3:.3g}" if "torch loop" in t else "-",
                       f"{t['blocked'] / t['recursion']:.2f}",
                       f"{t['scan'] / t['recursion']:.2f}",
                       " / ".join(f"{predicted[method] * 1e3:.3g}" for method in METHODS),
                       chosen, "yes" if chosen == faster else "no"])
        print(rows[-1], flush=True)
    header = ["batch x length x states", "recursion ms", "blocked ms", "scan ms",
              "torch loop ms", "blocked / recursion", "scan / recursion",
              "predicted ms (rec / blocked / scan)", "plan's choice", "fastest?"]
    info = machine_info()
    title = "## chains.py: recursion, blocked recursion and scan, and the plan's choice"
    if args.dtype != "float32":
        title += f" ({args.dtype})"
    text = (f"{title}\n\n"
            f"Machine: {info['cpu']}, {args.threads} threads, torch {info['torch']}; "
            f"{args.rounds} interleaved rounds, medians, {args.dtype}, log Z + gradient.\n\n"
            + markdown_table(header, rows)
            + f"\n\nThe plan chose the faster method in {right} of {len(rows)} shapes.\n")
    print(text)
    if args.write_readme:
        replace_readme_section(title, text)


if __name__ == "__main__":
    main()
