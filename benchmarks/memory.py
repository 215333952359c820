"""Memory caps, measured: each path and query of the engine under a cap, against its peak.

Every (case, query, cap) runs in a fresh subprocess (``--child``): the child builds the case's
factors, runs the query once unmeasured (plan building, torch's lazy initialisation), drops the
results and gradients, resets the resident-set high-water mark (``/proc/self/clear_refs``), runs
the query again and reports the rise of ``VmHWM`` over the resident set at the reset. glibc is
told to serve blocks over 64 KiB by ``mmap`` and to unmap them when freed, so freed memory leaves
the resident set instead of being reused unseen.

The cap promises (see ``docs/tutorial_engine.rst``): *measured peak <= cap + the query's
gradients and results*, or :class:`~plated.MemoryCapError` before any tensor work. The table
prints the measured rise, the gradients and results it may add, and whether the promise held.

Queries: ``logz`` (no gradient), ``logz_grad`` (log Z and its gradient into every factor),
``marginals``, ``map``, ``sample`` (8 samples).

Run ``PYTHONPATH=. python benchmarks/memory.py`` (``--write-readme`` records the table in
``benchmarks/README.md``; ``--cases`` picks some).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SECTION = "## memory.py"

#: see the module docstring
CHILD_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}

QUERIES = ("logz", "logz_grad", "marginals", "map", "sample")

MB = 10**6

#: name -> (description, cap in bytes, builder name); the builders are in :func:`build`
CASES: dict[str, tuple[str, int]] = {
    "unary": ("one 3000 x 3000 factor (reduce step)", 16 * MB),
    "plate": ("a (n=3000, x=1000) factor in plate n (reduce, then plate product)", 8 * MB),
    "pair": ("ab,bc,cd-> at 700 states (pair steps, sliced)", 12 * MB),
    "max_pair": ("ab,bc-> at 300 x 600 x 300 (max ring: private dims first)", 4 * MB),
    "keep": ("ab,bc with b kept (normalize step)", 12 * MB),
    "chain": ("8 factors of 700 x 700 in a chain (chain step)", 8 * MB),
    "scan": ("HMM, T = 100,000, K = 4, sequential plate (scan step)", 30 * MB),
    "scan_batch": ("HMM, 64 sequences x T = 2000, K = 8 (scan step, batch)", 16 * MB),
}


def build(case: str, dtype: Any) -> Any:
    """The :class:`~plated.PlatedFactorGraph` of ``case`` (uncapped; the child sets the cap)."""
    import torch

    from plated import Factor, Plate, PlatedFactorGraph

    gen = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> Any:
        return torch.randn(*shape, generator=gen, dtype=dtype)

    def chain_factors(n: int, k: int) -> list[Any]:
        names = [f"v{i}" for i in range(n + 1)]
        return [Factor(rnd(k, k), (names[i], names[i + 1])) for i in range(n)]

    if case == "unary":
        return PlatedFactorGraph([Factor(rnd(3000, 3000), ("a", "b"))])
    if case == "plate":
        return PlatedFactorGraph([Factor(rnd(3000, 1000), ("n", "x"))], [Plate("n", 3000)])
    if case == "pair":
        return PlatedFactorGraph(chain_factors(3, 700))
    if case == "max_pair":
        return PlatedFactorGraph([Factor(rnd(300, 600), ("a", "b")),
                                  Factor(rnd(600, 300), ("b", "c"))])
    if case == "keep":
        return PlatedFactorGraph([Factor(rnd(700, 700), ("a", "b")),
                                  Factor(rnd(700, 700), ("b", "c"))], keep_vars=["b"])
    if case == "chain":
        return PlatedFactorGraph(chain_factors(8, 700))
    if case == "scan":
        t, k = 100_000, 4
        return PlatedFactorGraph(
            [Factor(rnd(k), ("x_prev",)), Factor(rnd(t, k, k), ("t", "x_prev", "x"))],
            [Plate("t", t, sequential=True, prev={"x": "x_prev"})])
    if case == "scan_batch":
        n, t, k = 64, 2000, 8
        return PlatedFactorGraph(
            [Factor(rnd(n, k), ("n", "x_prev")),
             Factor(rnd(n, t, k, k), ("n", "t", "x_prev", "x"))],
            [Plate("n", n), Plate("t", t, sequential=True, prev={"x": "x_prev"})])
    raise ValueError(f"unknown case {case!r}")


def _high_water_kib() -> int:
    with open("/proc/self/status") as f:
        for ln in f:
            if ln.startswith("VmHWM:"):
                return int(ln.split()[1])
    raise OSError("no VmHWM")  # pragma: no cover - Linux only


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for ln in f:
            if ln.startswith("VmRSS:"):
                return int(ln.split()[1])
    raise OSError("no VmRSS")  # pragma: no cover - Linux only


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one query of one case twice; measure the second (see the module docstring)."""
    import torch

    import plated
    from plated import PlatedFactorGraph

    torch.set_num_threads(int(spec.get("threads", 1)))
    dtype = getattr(torch, spec.get("dtype", "float64"))
    query, cap = spec["query"], spec["cap"]
    base = build(spec["case"], dtype)
    grad = query == "logz_grad"
    tensors = [f.tensor.requires_grad_(grad) for f in base.factors]
    g = PlatedFactorGraph(base.factors, base.plates, keep_vars=base.keep_vars, memory_cap=cap)
    input_bytes = sum(t.numel() * t.element_size() for t in tensors)
    ring = "max" if query == "map" else "log"
    try:
        cost = g.cost(ring)
        predicted = {"peak_bytes": cost.peak_bytes, "peak_bytes_saved": cost.peak_bytes_saved,
                     "peak_bytes_grad": getattr(cost, "peak_bytes_grad", None)}
    except plated.MemoryCapError as err:
        return {"refused": str(err), "input_bytes": input_bytes}

    def run() -> Any:
        if query == "logz":
            with torch.no_grad():
                return g.log_partition()
        if query == "logz_grad":
            out = g.log_partition()
            out.sum().backward()
            return out
        if query == "marginals":
            return g.marginals()
        if query == "map":
            return g.map()
        if query == "sample":
            return g.sample(8)
        raise ValueError(query)

    def nbytes(x: Any) -> int:
        if isinstance(x, dict):
            return sum(nbytes(v) for v in x.values())
        return int(x.numel() * x.element_size())

    try:
        run()
    except plated.MemoryCapError as err:
        return {"refused": str(err), "input_bytes": input_bytes, **predicted}
    for t in tensors:
        t.grad = None
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss_kib()
    out = run()
    after = _high_water_kib()
    grads = sum(nbytes(t.grad) for t in tensors if t.grad is not None)
    if query == "marginals":  # the gradient of log Z in every factor, then reduced
        grads = input_bytes
    return {"increase_bytes": (after - before) * 1024, "grad_bytes": grads,
            "output_bytes": nbytes(out), "input_bytes": input_bytes, **predicted}


def measure(case: str, query: str, cap: int | None, *, dtype: str = "float64",
            timeout_s: float = 300) -> dict[str, Any]:
    """:func:`child` in a fresh subprocess."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.update(CHILD_MALLOC_ENV)
    spec = {"case": case, "query": query, "cap": cap, "dtype": dtype}
    from benchmarks.common import run_json_child

    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    return run_json_child(cmd, env, timeout_s)


def verdict(m: dict[str, Any], cap: int | None) -> str:
    """``ok`` (under cap + gradients + results), ``refused`` or ``OVER``."""
    if "error" in m:
        return "error"
    if "refused" in m:
        return "refused"
    if cap is None:
        return "-"
    allowed = cap + m["grad_bytes"] + m["output_bytes"]
    return "ok" if m["increase_bytes"] <= allowed else "OVER"


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / MB:.1f} MB"


def rows(cases: Sequence[str], queries: Sequence[str],
         progress: Callable[[str], None] = print) -> list[list[str]]:
    out = []
    for case in cases:
        desc, cap = CASES[case]
        for query in queries:
            m = measure(case, query, cap)
            v = verdict(m, cap)
            if "refused" in m:
                peak = "refused (MemoryCapError)"
            elif "error" in m:
                peak = f"failed: {m['error']}"
            else:
                peak = _mb(m["increase_bytes"])
            row = [case, desc, query, _mb(cap), peak, _mb(m.get("grad_bytes", 0)
                                                          + m.get("output_bytes", 0)), v]
            progress("  ".join(row))
            out.append(row)
    return out


HEADER = ["case", "graph", "query", "cap", "measured peak (rise of VmHWM)",
          "gradients + results", "verdict"]


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    p.add_argument("--queries", nargs="*", default=list(QUERIES), choices=list(QUERIES))
    p.add_argument("--write-readme", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child))))
        return
    table = rows(args.cases, args.queries)
    if args.write_readme:
        sys.path.insert(0, str(REPO))
        from benchmarks.common import machine_info, markdown_table, replace_readme_section

        info = machine_info()
        text = (f"{SECTION}\n\nEach path and query under a memory cap, in a fresh subprocess per "
                "cell: the rise of the resident-set high-water mark (`VmHWM`) over one query "
                "after an unmeasured one. The promise: measured <= cap + gradients + results, "
                "or `MemoryCapError` before any tensor work.\n\n"
                f"Machine: cpu {info['cpu']}, {info['cores']} cores, no GPU, torch "
                f"{info['torch']}, 1 thread, python {info['python']}, plated {info['plated']}."
                "\n\nCommand: `PYTHONPATH=. python benchmarks/memory.py --write-readme`.\n\n"
                + markdown_table(HEADER, table) + "\n")
        replace_readme_section(SECTION, text)


if __name__ == "__main__":
    main()
