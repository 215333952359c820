"""Benchmark: plated vs ``pyro.ops.contract.einsum`` on log Z plus its gradient.

Every case times "log partition function plus the gradient with respect to every operand"
(forward and backward) for two or more implementations, side by side in one process on the same
input values, after checking that they agree. Runs of the implementations alternate (in
alternating order) so that drifts in machine load hit them alike; the script prints medians,
interquartile ranges and ratios measured in the same run.

Cases:

* **(a)** a battery of small plated equations in the style of Pyro's own tests (float64):
  ``plated.einsum`` vs ``pyro.ops.contract.einsum(..., backend="pyro.ops.einsum.torch_log")``.
* **(b)** an HMM written as one plated einsum, the JSB-chorales shape: 129 chained 16-state
  variables in a plate of 229 sequences (130 operands): ``plated.einsum`` vs Pyro's einsum on the
  same equation and operands. Extra reference rows: the plated graph face with a sequential plate,
  and a hand-written torch forward-algorithm loop.
* **(c)** the same chain with 10,000 steps in a plate of 16 sequences: the plated graph face
  (``Plate("time", T, sequential=True, prev={"x": "x_prev"})``) vs Pyro's einsum of the unrolled
  chain (10,001 operands over 10,001 variables, unicode symbols from ``opt_einsum.get_symbol``).
  Extra rows: ``plated.einsum`` on the unrolled equation, and a hand-written torch
  forward-algorithm loop (a reference point, not a target).

Memory (cases b and c): the predicted peak of plated's plan for a run that keeps every
intermediate (``CostReport.peak_bytes_saved``, which includes the inputs) against the measured
growth of the resident-set high-water mark (``ru_maxrss``) across one log Z + gradient call, each
implementation in a fresh subprocess after its inputs are allocated.

Run from the repository root::

    PYTHONPATH=. python benchmarks/contract.py            # full run (about 10-20 minutes)
    PYTHONPATH=. python benchmarks/contract.py --quick    # smoke run (about a minute)
    PYTHONPATH=. python benchmarks/contract.py --write-readme   # also record in README.md
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import math
import os
import pstats
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import opt_einsum
import torch
from pyro.ops.contract import einsum as pyro_einsum
from pyro.ops.einsum import _PATH_CACHE as pyro_path_cache

import plated
from benchmarks.common import (
    Timing,
    fmt_ms,
    high_water_kib,
    machine_info,
    markdown_table,
    reset_high_water,
    run_json_child,
    text_table,
)
from plated import Factor, Plate, PlatedFactorGraph

PYRO_BACKEND = "pyro.ops.einsum.torch_log"
REPO = Path(__file__).resolve().parents[1]
README = REPO / "benchmarks" / "README.md"
SECTION = "## contract.py"

#: (a): (equation, plates), in the style of pyro's tests/ops/test_contract.py battery.
BATTERY: list[tuple[str, str]] = [
    ("ai->", "i"),
    ("a,ai->", "i"),
    ("ab,ai,bi->", "i"),
    ("ab,bc,ci->", "i"),
    ("ab,aij,bij->", "ij"),
    ("a,ai,aij->", "ij"),
    ("ai,aij,aijk->", "ijk"),
    (",ai,abij->", "ij"),
    ("a,ai,bij->", "ij"),
    ("ai,abi,bci,cdi->", "i"),
    ("aij,abij,bcij->", "ij"),
    ("a,abi,bcij,cdij->", "ij"),
    # HMM with a global hidden chain and plated observations
    ("a,ab,bc,cd,ai,bi,ci,di->", "i"),
    # HMM with plated hidden chain and doubly plated observations
    ("ai,abi,bci,cdi,aij,bij,cij,dij->", "ij"),
    # 8-variable chain in a plate (long enough for plated's chain recognition)
    ("ai,abi,bci,cdi,dei,efi,fgi,ghi->", "i"),
]
#: (a): size of each plate letter; every other letter is a variable of size ``VAR_SIZE``.
PLATE_SIZES = {"i": 32, "j": 8, "k": 4}
VAR_SIZE = 16

Fn = Callable[[], torch.Tensor]
#: ratios within this factor of 1 count as ties in the (a) verdict
TIE = 1.05


# ----------------------------------------------------------------------------------------------
# timing


def logz_and_grad(compute: Fn, leaves: Sequence[torch.Tensor]) -> Fn:
    """Wrap ``compute`` (returning log Z) into one forward + backward w.r.t. ``leaves``."""

    def run() -> torch.Tensor:
        z = compute()
        torch.autograd.grad(z, list(leaves))
        return z.detach()

    return run


def _timed(fn: Fn) -> float:
    gc.collect()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def side_by_side(
    fns: dict[str, Fn],
    *,
    target_s: float,
    min_n: int,
    max_n: int,
    warmup: int = 2,
    single_threshold_s: float = math.inf,
) -> dict[str, Timing]:
    """Time each of ``fns``: ``warmup`` calls each, then ``N`` rounds alternating their order.

    ``N`` is chosen so the rounds take about ``target_s`` in all (within ``[min_n, max_n]``). An
    implementation whose first call exceeds ``single_threshold_s`` is timed once only.
    """
    out = {name: Timing() for name in fns}
    est: dict[str, float] = {}
    for name, fn in fns.items():
        t = _timed(fn)
        out[name].first_s = t
        if t > single_threshold_s:
            out[name].samples = [t]
            out[name].single = True
            print(f"    {name}: first call {t:.1f} s > {single_threshold_s:.0f} s; timed once only",
                  flush=True)
            continue
        for _ in range(warmup - 1):
            t = _timed(fn)
        est[name] = t
    names = [n for n in fns if not out[n].single]
    if not names:
        return out
    n = int(min(max_n, max(min_n, round(target_s / max(sum(est.values()), 1e-9)))))
    for r in range(n):
        for name in names if r % 2 == 0 else reversed(names):
            out[name].samples.append(_timed(fns[name]))
    return out


def profile_once(fn: Fn, top: int = 18) -> str:
    """cProfile one call of ``fn``; the ``top`` entries by internal time."""
    fn()
    pr = cProfile.Profile()
    pr.enable()
    fn()
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# inputs


def chain_symbols(n: int, avoid: str) -> list[str]:
    """``n`` distinct einsum symbols from :func:`opt_einsum.get_symbol`, skipping ``avoid``."""
    out: list[str] = []
    k = 0
    while len(out) < n:
        s = opt_einsum.get_symbol(k)
        k += 1
        if s not in avoid:
            out.append(s)
    return out


def chain_equation(steps: int, plate: str = "i") -> str:
    """``"i{s0},i{s0}{s1},...,i{s_{T-1}}{s_T}->"``: an initial factor and ``steps`` transitions."""
    s = chain_symbols(steps + 1, avoid=plate)
    terms = [plate + s[0]] + [plate + s[t] + s[t + 1] for t in range(steps)]
    return ",".join(terms) + "->"


def hmm_tensors(seqs: int, steps: int, states: int, dtype: torch.dtype, seed: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random HMM log factors: init ``(seqs, K)`` over ``x_{-1}``; per-step transition plus
    emission log-likelihood ``(seqs, steps, K, K)`` over ``(x_{t-1}, x_t)``."""
    g = torch.Generator().manual_seed(seed)
    init = torch.randn(seqs, states, generator=g, dtype=torch.float64).log_softmax(-1)
    trans = torch.randn(seqs, steps, states, states, generator=g, dtype=torch.float64)
    trans = trans.log_softmax(-1) + 0.5 * torch.randn(seqs, steps, 1, states, generator=g,
                                                      dtype=torch.float64)
    return init.to(dtype), trans.to(dtype)


def leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_()


def forward_loop(init: torch.Tensor, steps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Hand-written forward algorithm: sum over sequences of log p(sequence)."""
    alpha = init
    for m in steps:
        alpha = torch.logsumexp(alpha.unsqueeze(-1) + m, dim=-2)
    return torch.logsumexp(alpha, dim=-1).sum()


def seq_graph(init: torch.Tensor, trans: torch.Tensor) -> PlatedFactorGraph:
    """The chain as a plated factor graph with a sequential plate."""
    seqs, steps = trans.shape[:2]
    return PlatedFactorGraph(
        [Factor(init, ("seq", "x_prev"), name="init"),
         Factor(trans, ("seq", "time", "x_prev", "x"), name="trans")],
        [Plate("seq", seqs), Plate("time", steps, sequential=True, prev={"x": "x_prev"})],
    )


def einsum_graph(equation: str, operands: Sequence[torch.Tensor], plates: str
                 ) -> PlatedFactorGraph:
    """The graph-face twin of ``plated.einsum(equation, ...)`` (same plan, hence same cost)."""
    lhs = equation.split("->")[0].split(",")
    sizes = {d: int(n) for dims, x in zip(lhs, operands, strict=True)
             for d, n in zip(dims, x.shape, strict=True)}
    return PlatedFactorGraph(
        [Factor(x, tuple(dims)) for dims, x in zip(lhs, operands, strict=True)],
        [Plate(p, sizes[p]) for p in sorted(plates) if p in sizes],
    )


# ----------------------------------------------------------------------------------------------
# cases


@dataclass
class Case:
    """One benchmark case: named implementations of log Z + gradient, and reference values."""

    group: str
    name: str
    dtype: torch.dtype
    fns: dict[str, Fn]
    baseline: str = "pyro"
    target: str = "plated"
    notes: list[str] = field(default_factory=list)
    timings: dict[str, Timing] = field(default_factory=dict)
    memory: dict[str, dict[str, Any]] = field(default_factory=dict)
    predicted: dict[str, dict[str, int]] = field(default_factory=dict)


def cold_calls(fns: dict[str, Fn]) -> tuple[dict[str, torch.Tensor], str]:
    """Call each forward once with plated's plan cache and Pyro's path cache emptied.

    :return: the log Z values and a note with each first call's seconds (planning included).
    """
    zs: dict[str, torch.Tensor] = {}
    parts = []
    for name, f in fns.items():
        plated.clear_plan_cache()
        pyro_path_cache.clear()
        t0 = time.perf_counter()
        zs[name] = f().detach()
        parts.append(f"{name} {time.perf_counter() - t0:.3g} s")
    return zs, "first forward call (plan / contraction-path search included): " + ", ".join(parts)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float, what: str) -> float:
    a, b = a.detach().double(), b.detach().double()
    err = float((a - b).abs().max())
    scale = float(b.abs().max()) + 1.0
    if not err <= rtol * scale:
        raise AssertionError(f"{what}: max abs difference {err:.3e} > {rtol:.0e} * {scale:.3e}")
    return err


def battery_case(equation: str, plates: str, seed: int) -> Case:
    lhs = equation.split("->")[0].split(",")
    g = torch.Generator().manual_seed(seed)
    ops = [torch.randn(tuple(PLATE_SIZES[d] if d in plates else VAR_SIZE for d in dims),
                       generator=g, dtype=torch.float64).requires_grad_() for dims in lhs]

    def pl() -> torch.Tensor:
        return plated.einsum(equation, *ops, plates=plates)[0]

    def py() -> torch.Tensor:
        return pyro_einsum(equation, *ops, plates=plates, backend=PYRO_BACKEND)[0]

    zp, zq = pl(), py()
    _close(zp, zq, 1e-10, f"{equation} log Z")
    for gp, gq in zip(torch.autograd.grad(zp, ops), torch.autograd.grad(zq, ops), strict=True):
        _close(gp, gq, 1e-8, f"{equation} gradient")
    shape = " ".join(f"{d}={PLATE_SIZES[d]}" for d in plates)
    case = Case("a", f"{equation} ({shape}, vars={VAR_SIZE})", torch.float64,
                {"plated": logz_and_grad(pl, ops), "pyro": logz_and_grad(py, ops)})
    return case


def hmm_b_case(seqs: int, steps: int, states: int, dtype: torch.dtype) -> Case:
    init, trans = hmm_tensors(seqs, steps, states, dtype, seed=1)
    ref = float(forward_loop(init.double(), trans.double().unbind(1)))
    eq = chain_equation(steps)
    ops = [leaf(init)] + [leaf(m) for m in trans.unbind(1)]
    g_init, g_trans = leaf(init), leaf(trans)

    def pl() -> torch.Tensor:
        return plated.einsum(eq, *ops, plates="i")[0]

    def py() -> torch.Tensor:
        return pyro_einsum(eq, *ops, plates="i", backend=PYRO_BACKEND)[0]

    def graph() -> torch.Tensor:
        return seq_graph(g_init, g_trans).log_partition()

    def loop() -> torch.Tensor:
        return forward_loop(ops[0], ops[1:])

    case = Case("b", f"HMM einsum: {steps + 1} vars x {states} states, plate {seqs}", dtype,
                {"plated": logz_and_grad(pl, ops), "pyro": logz_and_grad(py, ops),
                 "plated graph (seq plate)": logz_and_grad(graph, [g_init, g_trans]),
                 "torch loop": logz_and_grad(loop, ops)})
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    errs = []
    ref64 = torch.tensor(ref, dtype=torch.float64)
    zs, cold = cold_calls({"plated": pl, "pyro": py, "plated graph": graph, "torch loop": loop})
    for name, z in zs.items():
        errs.append(f"{name} {float(z) - ref:+.2e}")
        _close(z, ref64, tol, f"(b) {name} log Z vs float64 reference")
    gp = torch.autograd.grad(pl(), ops)
    gq = torch.autograd.grad(py(), ops)
    gerr = max(_close(a, b, 1e-3 if dtype == torch.float32 else 1e-9, "(b) gradient")
               for a, b in zip(gp, gq, strict=True))
    case.notes.append(f"log Z = {ref:.6f} (float64 forward loop); error: " + ", ".join(errs)
                      + f"; max |grad plated - grad pyro| = {gerr:.1e}")
    case.notes.append(cold)
    case.predicted["plated"] = _cost(einsum_graph(eq, ops, "i"))
    case.predicted["plated graph (seq plate)"] = _cost(seq_graph(g_init, g_trans))
    return case


def hmm_c_case(seqs: int, steps: int, states: int, dtype: torch.dtype, pyro_steps: int) -> Case:
    init, trans = hmm_tensors(seqs, steps, states, dtype, seed=2)
    ref = float(forward_loop(init.double(), trans.double().unbind(1)))
    g_init, g_trans = leaf(init), leaf(trans)
    # Pyro's natural input: one leaf per operand (no unbind charged to pyro)
    p_trans = trans[:, :pyro_steps]
    eq = chain_equation(pyro_steps)
    ops = [leaf(init)] + [leaf(m) for m in p_trans.unbind(1)]

    def graph() -> torch.Tensor:
        return seq_graph(g_init, g_trans).log_partition()

    def py() -> torch.Tensor:
        return pyro_einsum(eq, *ops, plates="i", backend=PYRO_BACKEND)[0]

    def pl_einsum() -> torch.Tensor:
        return plated.einsum(eq, *ops, plates="i")[0]

    def loop() -> torch.Tensor:
        return forward_loop(g_init, g_trans.unbind(1))

    pyro_name = "pyro" if pyro_steps == steps else f"pyro ({pyro_steps} steps)"
    fns = {"plated": logz_and_grad(graph, [g_init, g_trans]),
           pyro_name: logz_and_grad(py, ops),
           "plated.einsum (unrolled)": logz_and_grad(pl_einsum, ops),
           "torch loop": logz_and_grad(loop, [g_init, g_trans])}
    case = Case("c", f"HMM chain: {steps} steps x {states} states, plate {seqs}", dtype, fns,
                baseline=pyro_name)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    errs = []
    ref64 = torch.tensor(ref, dtype=torch.float64)
    zs, cold = cold_calls({"plated": graph, "torch loop": loop, pyro_name: py,
                           "plated.einsum": pl_einsum})
    for name in ("plated", "torch loop") + ((pyro_name, "plated.einsum")
                                            if pyro_steps == steps else ()):
        errs.append(f"{name} {float(zs[name]) - ref:+.2e}")
        _close(zs[name], ref64, tol, f"(c) {name} log Z vs float64 reference")
    if pyro_steps != steps:
        _close(zs["plated.einsum"], zs[pyro_name], tol,
               "(c) plated.einsum vs pyro on the shortened chain")
        case.notes.append(f"pyro (and plated.einsum) measured on the first {pyro_steps} steps "
                          "only; their ratios are not comparable to the full chain")
    case.notes.append(f"log Z = {ref:.4f} (float64 forward loop); error: " + ", ".join(errs))
    case.notes.append(cold)
    case.predicted["plated"] = _cost(seq_graph(g_init, g_trans))
    case.predicted["plated.einsum (unrolled)"] = _cost(einsum_graph(eq, ops, "i"))
    return case


def _cost(g: PlatedFactorGraph) -> dict[str, int]:
    c = g.cost()
    inputs = sum(f.tensor.numel() * f.tensor.element_size() for f in g.factors)
    return {"peak_bytes": c.peak_bytes, "peak_bytes_saved": c.peak_bytes_saved,
            "input_bytes": inputs, "flops": c.flops}


# ----------------------------------------------------------------------------------------------
# memory: one implementation per fresh subprocess


def memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the inputs one implementation needs, run it once, report the ``ru_maxrss`` growth.

    Meant for a fresh process. The inputs are drawn directly in the target dtype, one leaf at a
    time, and the high-water mark is reset after they exist (when the kernel allows it), so the
    growth counts only what the call itself allocates (intermediates, gradients, autograd's saved
    tensors, first-call planning).
    """
    dtype = getattr(torch, spec["dtype"])
    seqs, steps, states, impl = spec["seqs"], spec["steps"], spec["states"], spec["impl"]
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()

    fn: Fn
    stacked = (impl == "plated graph (seq plate)" if spec["case"] == "b"
               else impl in ("plated", "torch loop"))
    if stacked:
        g_init, g_trans = rnd(seqs, states), rnd(seqs, steps, states, states)
        if impl == "torch loop":
            fn = logz_and_grad(lambda: forward_loop(g_init, g_trans.unbind(1)), [g_init, g_trans])
        else:
            fn = logz_and_grad(lambda: seq_graph(g_init, g_trans).log_partition(),
                               [g_init, g_trans])
    else:
        n = spec["pyro_steps"]
        eq = chain_equation(n)
        ops = [rnd(seqs, states)] + [rnd(seqs, states, states) for _ in range(n)]
        if impl.startswith("pyro"):
            fn = logz_and_grad(lambda: pyro_einsum(eq, *ops, plates="i", backend=PYRO_BACKEND)[0],
                               ops)
        elif impl == "torch loop":
            fn = logz_and_grad(lambda: forward_loop(ops[0], ops[1:]), ops)
        else:  # "plated" in (b), "plated.einsum (unrolled)" in (c)
            fn = logz_and_grad(lambda: plated.einsum(eq, *ops, plates="i")[0], ops)
    gc.collect()
    reset = reset_high_water()
    before, source = high_water_kib()
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    after, _ = high_water_kib()
    return {"rss_before_kib": before, "rss_after_kib": after, "high_water_reset": reset,
            "source": source, "increase_bytes": (after - before) * 1024, "wall_s": wall}


def measure_memory(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--threads", str(spec["threads"]),
           "--memory-child", json.dumps(spec)]
    return run_json_child(cmd, env, timeout_s)


# ----------------------------------------------------------------------------------------------
# reporting


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def ratio_rows(cases: Sequence[Case]) -> list[list[str]]:
    rows = []
    for c in cases:
        base = c.timings.get(c.baseline)
        for name, t in c.timings.items():
            if name == c.baseline:
                continue
            ratio = base.median / t.median if base else math.nan
            paired = ""
            if base and not base.single and not t.single:
                pr = [b / a for a, b in zip(t.samples, base.samples, strict=False)]
                paired = f"{statistics.median(pr):.2f}"
            rows.append([c.group, c.name, str(c.dtype).replace("torch.", ""), name, fmt_ms(t),
                         c.baseline if base else "-", fmt_ms(base) if base else "-",
                         f"{ratio:.2f}", paired, str(len(t.samples))])
    return rows


HEADER = ["case", "equation / model", "dtype", "impl", "impl ms median [IQR]", "baseline",
          "baseline ms median [IQR]", "baseline/impl", "paired", "n"]


def memory_rows(cases: Sequence[Case]) -> list[list[str]]:
    rows = []
    for c in cases:
        for impl, m in c.memory.items():
            pred = c.predicted.get(impl)
            if "error" in m:
                meas = f"failed: {m['error']}"
                total = "-"
            else:
                meas = fmt_bytes(m["increase_bytes"])
                total = fmt_bytes(m["increase_bytes"] + (pred or {}).get("input_bytes", 0)) \
                    if pred else "-"
            rows.append([c.group, str(c.dtype).replace("torch.", ""), impl,
                         fmt_bytes(pred["peak_bytes_saved"]) if pred else "-",
                         fmt_bytes(pred["input_bytes"]) if pred else "-",
                         meas, total])
    return rows


MEM_HEADER = ["case", "dtype", "impl", "predicted peak_bytes_saved (incl. inputs)",
              "inputs", "measured peak (RSS high-water increase, excl. inputs)",
              "measured + inputs"]


def target_lines(cases: Sequence[Case]) -> list[str]:
    out = []
    a = [c for c in cases if c.group == "a"]
    if a:
        rs = [c.timings["pyro"].median / c.timings["plated"].median for c in a]
        # a ratio within 5% of 1 is a tie: below the resolution of this noisy measurement
        slower = [c.name for c, r in zip(a, rs, strict=True) if r < 1 / TIE]
        ties = [c.name for c, r in zip(a, rs, strict=True) if 1 / TIE <= r < TIE]
        gm = math.exp(sum(map(math.log, rs)) / len(rs))
        out.append(f"(a) no slower than Pyro on the battery: {'MET' if not slower else 'NOT MET'}"
                   f" (geometric-mean ratio pyro/plated {gm:.2f}, min {min(rs):.2f}; slower by"
                   f" more than {TIE - 1:.0%} on {len(slower)} of {len(a)}"
                   + (f": {', '.join(slower)}" if slower else "")
                   + f"; within {TIE - 1:.0%} (a tie) on {len(ties)}"
                   + (f": {', '.join(ties)}" if ties else "") + ")")
    for grp, need in (("b", 2.0), ("c", 10.0)):
        for c in (c for c in cases if c.group == grp):
            base = c.timings[c.baseline]
            r = base.median / c.timings["plated"].median
            extra = " (pyro timed once)" if base.single else ""
            short = " [pyro measured on a shorter chain]" if c.baseline != "pyro" else ""
            out.append(f"({grp}) >= {need:g}x faster than Pyro, {str(c.dtype)[6:]}: "
                       f"{'MET' if r >= need else 'NOT MET'} (ratio {r:.2f}){extra}{short}")
    return out


def write_readme(text: str, append: bool = False) -> None:
    """Replace the ``SECTION`` section of benchmarks/README.md by ``text``, or append ``text``
    at the end of that section."""
    cur = README.read_text() if README.exists() else "# Benchmarks\n"
    start = cur.find(SECTION)
    if start < 0:
        cur = cur.rstrip("\n") + "\n\n" + SECTION + "\n"
        start = cur.find(SECTION)
    nxt = cur.find("\n## ", start + len(SECTION))
    tail = cur[nxt + 1:] if nxt >= 0 else ""
    if append:
        head = cur[:nxt + 1] if nxt >= 0 else cur
        head = head.rstrip("\n") + "\n\n"
    else:
        head = cur[:start]
    README.write_text(head + text.rstrip("\n") + "\n" + ("\n" + tail if tail else ""))


# ----------------------------------------------------------------------------------------------
# main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time log Z + gradient: plated vs pyro.ops.contract.einsum "
                    "(torch_log backend), side by side in one process.")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: few repeats, a 1,000-step chain in (c), float32 only")
    p.add_argument("--cases", default="a,b,c", help="comma-separated subset of a,b,c")
    p.add_argument("--dtypes", default="float32,float64",
                   help="dtypes for cases b and c (case a is always float64)")
    p.add_argument("--target-seconds", type=float, default=8.0,
                   help="approximate timed seconds per case (sets the number of repeats)")
    p.add_argument("--min-repeats", type=int, default=5)
    p.add_argument("--max-repeats", type=int, default=200)
    p.add_argument("--states", type=int, default=16)
    p.add_argument("--b-seqs", type=int, default=229)
    p.add_argument("--b-steps", type=int, default=128, help="transitions (variables - 1) in (b)")
    p.add_argument("--c-seqs", type=int, default=16)
    p.add_argument("--c-steps", type=int, default=10_000)
    p.add_argument("--c-pyro-steps", type=int, default=None,
                   help="run pyro on a chain this long in (c) (default: the full chain)")
    p.add_argument("--single-threshold", type=float, default=60.0,
                   help="an implementation whose first call takes longer is timed once")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads(N) first (default: leave torch's default alone)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--memory-timeout", type=float, default=900.0)
    p.add_argument("--profile", action="store_true",
                   help="cProfile plated on every case where it is slower than the baseline")
    p.add_argument("--write-readme", action="store_true",
                   help=f"replace the '{SECTION}' section of benchmarks/README.md with the results")
    p.add_argument("--append-readme", action="store_true",
                   help=f"append the results as a subsection at the end of '{SECTION}' instead")
    p.add_argument("--json", type=Path, default=None, help="also dump raw results here")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.target_seconds = min(args.target_seconds, 0.3)
        args.min_repeats = min(args.min_repeats, 3)
        args.max_repeats = min(args.max_repeats, 10)
        if "--c-steps" not in (argv if argv is not None else sys.argv):
            args.c_steps = 1000
        if "--dtypes" not in (argv if argv is not None else sys.argv):
            args.dtypes = "float32"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.memory_child is not None:
        print(json.dumps(memory_child(json.loads(args.memory_child))), flush=True)
        return 0
    info = machine_info()
    command = "PYTHONPATH=. python benchmarks/contract.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    print(f"command: {command.strip()}", flush=True)
    groups = set(args.cases.split(","))
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",") if d]
    timing_kw: dict[str, Any] = {"target_s": args.target_seconds, "min_n": args.min_repeats,
                                 "max_n": args.max_repeats}
    cases: list[Case] = []
    extra: list[str] = []
    t_start = time.perf_counter()

    if "a" in groups:
        print("\n(a) battery, float64: plated.einsum vs pyro einsum", flush=True)
        for k, (eq, pl) in enumerate(BATTERY):
            c = battery_case(eq, pl, seed=100 + k)
            c.timings = side_by_side(c.fns, **timing_kw)
            cases.append(c)
            r = c.timings["pyro"].median / c.timings["plated"].median
            print(f"  {c.name:55s} plated {fmt_ms(c.timings['plated']):>24s} ms  "
                  f"pyro {fmt_ms(c.timings['pyro']):>24s} ms  ratio {r:.2f}", flush=True)

    pyro_steps_c = args.c_pyro_steps or args.c_steps
    if "c" in groups:
        # how opt_einsum's path search (which pyro runs on the whole unrolled chain) scales
        lines = []
        for n in sorted({max(pyro_steps_c // 10, 1), pyro_steps_c}):
            eq = chain_equation(n)
            shapes = [(args.c_seqs, args.states)] + [(args.c_seqs, args.states, args.states)] * n
            t0 = time.perf_counter()
            opt_einsum.contract_path(eq, *shapes, shapes=True)
            lines.append(f"opt_einsum.contract_path on {n + 1} operands: "
                         f"{time.perf_counter() - t0:.2f} s")
            print("  " + lines[-1], flush=True)
        extra += lines

    for dtype in dtypes:
        dname = str(dtype).replace("torch.", "")
        if "b" in groups:
            print(f"\n(b) HMM as one plated einsum, {dname}", flush=True)
            c = hmm_b_case(args.b_seqs, args.b_steps, args.states, dtype)
            for n in c.notes:
                print("  " + n, flush=True)
            c.timings = side_by_side(c.fns, **timing_kw)
            cases.append(c)
            for name, t in c.timings.items():
                print(f"  {name:28s} {fmt_ms(t):>26s} ms", flush=True)
        if "c" in groups:
            print(f"\n(c) HMM chain with a sequential plate, {dname}", flush=True)
            c = hmm_c_case(args.c_seqs, args.c_steps, args.states, dtype, pyro_steps_c)
            for n in c.notes:
                print("  " + n, flush=True)
            c.timings = side_by_side(c.fns, single_threshold_s=args.single_threshold,
                                     **{**timing_kw, "min_n": min(args.min_repeats, 3)})
            cases.append(c)
            for name, t in c.timings.items():
                print(f"  {name:28s} {fmt_ms(t):>26s} ms", flush=True)

    if not args.no_memory:
        print("\nmemory (one fresh subprocess per implementation)", flush=True)
        for c in cases:
            if c.group not in ("b", "c"):
                continue
            for impl in c.fns:
                spec = {"case": c.group, "impl": impl, "dtype": str(c.dtype)[6:],
                        "states": args.states,
                        "seqs": args.b_seqs if c.group == "b" else args.c_seqs,
                        "steps": args.b_steps if c.group == "b" else args.c_steps,
                        "pyro_steps": args.b_steps if c.group == "b" else pyro_steps_c,
                        "threads": torch.get_num_threads()}
                c.memory[impl] = measure_memory(spec, args.memory_timeout)
                m = c.memory[impl]
                pred = c.predicted.get(impl)
                got = m.get("error") or fmt_bytes(m["increase_bytes"])
                print(f"  ({c.group}) {str(c.dtype)[6:]} {impl:28s} measured {got}"
                      + (f"; predicted {fmt_bytes(pred['peak_bytes_saved'])} incl. inputs "
                         f"{fmt_bytes(pred['input_bytes'])}" if pred else ""), flush=True)

    rows = ratio_rows(cases)
    print("\n" + text_table(HEADER, rows))
    targets = target_lines(cases)
    print("\n" + "\n".join(targets))
    mrows = memory_rows(cases)
    if mrows:
        print("\n" + text_table(MEM_HEADER, mrows))

    profiles: list[str] = []
    if args.profile:
        for c in cases:
            base = c.timings.get(c.baseline)
            if base and base.median < c.timings[c.target].median:
                prof = profile_once(c.fns[c.target])
                profiles.append(f"{c.group} {c.name} {c.dtype}:\n{prof}")
                print(f"\nprofile of plated on {c.name} ({c.dtype}):\n{prof}", flush=True)

    total = time.perf_counter() - t_start
    print(f"\ntotal {total:.0f} s", flush=True)

    if args.json is not None:
        args.json.write_text(json.dumps({
            "machine": info, "command": command,
            "cases": [{"group": c.group, "name": c.name, "dtype": str(c.dtype),
                       "timings_s": {k: {"samples": t.samples, "first": t.first_s,
                                         "single": t.single} for k, t in c.timings.items()},
                       "predicted": c.predicted, "memory": c.memory, "notes": c.notes}
                      for c in cases],
            "extra": extra, "targets": targets}, indent=1))

    if args.write_readme or args.append_readme:
        intro = [SECTION, "",
                 "Times one log Z + gradient (forward and backward with respect to every"
                 " operand) per call; plated and Pyro (`pyro.ops.contract.einsum`, backend"
                 " `pyro.ops.einsum.torch_log`) alternate on the same inputs in one process."
                 " Each cell: median ms [interquartile range]; *baseline/impl* is the ratio of"
                 " medians (> 1: the implementation is faster than the baseline); *paired* is"
                 " the median of per-round ratios (the rounds alternate, so this is robust to"
                 " load drift).", ""]
        if args.append_readme:
            intro = [f"### Supplementary run: `{command.strip()}`", ""]
        machine = ", ".join(f"{k} {v}" for k, v in info.items() if k != "load")
        load_end = " ".join(f"{x:.2f}" for x in os.getloadavg())
        md = intro + [f"Machine: {machine}; load average (1, 5, 15 min) at start {info['load']},"
                      f" at end {load_end}.", "",
                      f"Command: `{command.strip()}` (total {total:.0f} s).", "",
                      markdown_table(HEADER, rows), "", "Targets:", ""]
        md += [f"* {t}" for t in targets]
        notes = [f"({c.group}, {str(c.dtype)[6:]}) {n}" for c in cases for n in c.notes] + extra
        if notes:
            md += ["", "Checks and notes:", ""] + [f"* {n}" for n in notes]
        if mrows:
            md += ["", "Peak memory of one log Z + gradient call: plated's prediction"
                   " (`cost().peak_bytes_saved`, inputs included) against the measured growth of"
                   " the resident-set high-water mark across the call, each implementation in a"
                   " fresh subprocess (`--memory-child`) after its inputs were allocated and the"
                   " high-water mark was reset (`/proc/self/clear_refs`), so the measurement"
                   " excludes the inputs; *measured + inputs* adds them back to compare with the"
                   " prediction. The counter read is `VmHWM` from `/proc/self/status`, the"
                   " kernel's `hiwater_rss` that `ru_maxrss` reports, because a child started by"
                   " fork + exec inherits the forked parent's `ru_maxrss` and would read 0 growth."
                   " The measured growth includes the gradient buffers (as large as the inputs),"
                   " autograd's saved tensors, backward temporaries and the first call's planning,"
                   " which the prediction does not model.", "",
                   markdown_table(MEM_HEADER, mrows)]
        write_readme("\n".join(md) + "\n", append=args.append_readme)
        print(f"wrote {README}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
