"""Benchmark: this checkout against another revision, paired, on the other benchmarks' cases.

A refactor must not make the engine slower. This script runs two worker processes, one per
checkout (``--base``, e.g. made by ``git worktree add /tmp/base REV``, and this one), each
importing its own ``plated``, ``attention`` and ``benchmarks``. For every case the workers take
turns, in alternating order, each timing one round of ``--calls`` calls; a case's figure is the
median over rounds of each side's per-round median, and the *paired* ratio is the median of the
per-round ratios base/new (> 1: this checkout is faster), which is robust to load drift on a
shared machine.

The cases come from the other scripts, built the same way in both checkouts:

* ``contract.py``'s battery (log Z + gradient of ``plated.einsum``), an unrolled HMM einsum and a
  sequential-plate graph (case (b), smaller);
* ``pyro_hmm.py``'s ``TVE_ELBO`` training step on JSB chorales (the vectorised model);
* ``attention.py``'s training steps (marginal, variational-enum, K-max, Markov);
* case (c)'s sequential-plate chain at any shape (``chain:SEQS-STEPS-STATES-DTYPE``, e.g.
  ``chain:16-10000-16-float32``; only with ``--cases``), and its MAP assignment
  (``chain_map:SEQS-STEPS-STATES-DTYPE``, the max ring's recursion and descent);
* ``examples.music``'s ``TVE_ELBO`` step of a model at ``K`` states a chain on the full JSB
  training set (``music:MODEL-K``, e.g. ``music:fhmm-8``; only with ``--cases``);
* MAP, 8 samples and marginals of a sequential-plate HMM graph and of a plated mixture
  (``query:*``, built here from the public graph API).

Run: ``PYTHONPATH=. python benchmarks/revisions.py --base /tmp/base [--write-readme]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
Fn = Callable[[], object]


# ----------------------------------------------------------------------------------------------
# the worker: builds cases from its own checkout and times them on request


def _battery(index: int) -> Fn:
    from benchmarks.contract import BATTERY, battery_case

    equation, plates = BATTERY[index]
    return battery_case(equation, plates, seed=index).fns["plated"]


def _hmm(which: str) -> Fn:
    import torch

    from benchmarks.contract import hmm_b_case

    name = "plated" if which == "einsum" else "plated graph (seq plate)"
    return hmm_b_case(64, 64, 16, torch.float32).fns[name]


def _chain(spec: str) -> Fn:
    """``SEQS-STEPS-STATES-DTYPE``: log Z plus its gradient of :mod:`benchmarks.contract`'s
    sequential-plate HMM graph (case c is ``16-10000-16-float32``)."""
    import torch

    from benchmarks.contract import hmm_tensors, leaf, logz_and_grad, seq_graph

    seqs, steps, states, dtype = spec.split("-")
    init, trans = hmm_tensors(int(seqs), int(steps), int(states), getattr(torch, dtype), seed=2)
    g_init, g_trans = leaf(init), leaf(trans)
    return logz_and_grad(lambda: seq_graph(g_init, g_trans).log_partition(), [g_init, g_trans])


def _chain_map(spec: str) -> Fn:
    """``SEQS-STEPS-STATES-DTYPE``: the MAP assignment (``graph.map()``, no gradient) of the
    graph of :func:`_chain`."""
    import torch

    from benchmarks.contract import hmm_tensors, seq_graph

    seqs, steps, states, dtype = spec.split("-")
    init, trans = hmm_tensors(int(seqs), int(steps), int(states), getattr(torch, dtype), seed=2)
    graph = seq_graph(init, trans)
    return graph.map


def _pyro_hmm() -> Fn:
    import pyro
    import torch

    from benchmarks.pyro_hmm import make_guide, model_vec
    from examples.data import load_polyphonic
    from plated.pyro import TVE_ELBO

    torch.set_default_dtype(torch.float32)
    pyro.clear_param_store()
    sequences, lengths = load_polyphonic("JSB_Chorales", "train", dtype=torch.float32)
    sequences, lengths = sequences[:64], lengths[:64]
    sequences = sequences[:, : int(lengths.max())].contiguous()
    generator = torch.Generator().manual_seed(0)
    hidden = 16
    init_x = torch.softmax(torch.randn(hidden, hidden, generator=generator)
                           + 2.0 * torch.eye(hidden), dim=-1)
    init_y = torch.sigmoid(torch.randn(hidden, sequences.shape[-1], generator=generator) - 2.0)
    guide = make_guide(init_x, init_y)
    guide(sequences, lengths, hidden)
    elbo = TVE_ELBO(max_plate_nesting=2)

    def step() -> object:
        loss = elbo.loss_and_grads(model_vec, guide, sequences, lengths, hidden)
        for name in ("map_probs_x", "map_probs_y"):
            param = pyro.param(name).unconstrained()
            param.grad = None
        return loss

    return step


def _music(spec: str) -> Fn:
    """``MODEL-K``: one ``TVE_ELBO`` ``loss_and_grads`` of ``examples.music``'s model ``MODEL``
    with ``K`` states a chain, ``markov_plate`` form, on the full JSB chorales training set
    (229 sequences, float32), at parameter values drawn from the priors (seed 0)."""
    import pyro
    import torch

    from examples.data import load_polyphonic
    from examples.music import Config, Music
    from plated.pyro import TVE_ELBO

    model, _, k = spec.partition("-")
    torch.set_default_dtype(torch.float32)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    sequences, lengths = load_polyphonic("JSB_Chorales", "train", dtype=torch.float32)
    lens = [int(n) for n in lengths]
    seqs = sequences[:, : max(lens)].contiguous()
    music = Music(Config(model, int(k), seqs.shape[-1]))
    elbo = TVE_ELBO(max_plate_nesting=2)
    elbo.loss(music.model, music.guide, seqs, lens)  # makes the guide's parameters

    def step() -> object:
        loss = elbo.loss_and_grads(music.model, music.guide, seqs, lens)
        for _, param in pyro.get_param_store().named_parameters():
            param.grad = None
        return loss

    return step


def _attention(variant: str) -> Fn:
    from benchmarks.attention import KMAX, MARGINAL, MARKOV, VENUM, Bench, Config

    names = {"marginal": MARGINAL, "variational-enum": VENUM, "k-max": KMAX, "markov": MARKOV}
    bench = Bench(Config(batch=16, src_len=20, tgt_len=20, hidden=128, vocab=2000))
    loss_fn = bench.losses[names[variant]]

    def step() -> object:
        bench.zero_grad()
        loss = loss_fn()
        loss.backward()  # type: ignore[attr-defined]
        return loss

    return step


def _query(spec: str) -> Fn:
    """A MAP, sampling or marginals query on a sequential-plate HMM graph or a plated mixture
    (public :class:`~plated.PlatedFactorGraph` API, the same in both checkouts)."""
    import torch

    from plated import Factor, Plate, PlatedFactorGraph

    graph_name, _, query = spec.partition("-")
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    if graph_name == "hmm":  # 64 sequences x 64 steps x 16 states, float32
        n, t, k = 64, 64, 16
        g = PlatedFactorGraph(
            [Factor(rnd(n, k), ("n", "x_prev")),
             Factor(rnd(n, t, k, k), ("n", "t", "x_prev", "x"))],
            [Plate("n", n), Plate("t", t, sequential=True, prev={"x": "x_prev"})])
    else:  # a global 8-state latent, 2000 local 16-state latents
        n, k, j = 2000, 8, 16
        g = PlatedFactorGraph([Factor(rnd(k), ("g",)), Factor(rnd(n, k, j), ("n", "g", "l"))],
                              [Plate("n", n)])
    if query == "map":
        return g.map
    if query == "marginals":
        return g.marginals
    return lambda: g.sample(8)


def build(case: str) -> Fn:
    """The function one call of ``case`` times (see :data:`CASES`)."""
    kind, _, arg = case.partition(":")
    if kind == "battery":
        return _battery(int(arg))
    if kind == "hmm":
        return _hmm(arg)
    if kind == "chain":
        return _chain(arg)
    if kind == "chain_map":
        return _chain_map(arg)
    if kind == "pyro_hmm":
        return _pyro_hmm()
    if kind == "attention":
        return _attention(arg)
    if kind == "music":
        return _music(arg)
    if kind == "query":
        return _query(arg)
    raise SystemExit(f"unknown case {case!r}")


def worker() -> None:
    """Serve ``{"case", "calls"}`` requests on stdin with ``{"seconds": [...]}`` on stdout."""
    # run as a script, this file's folder leads sys.path and would shadow the attention package
    # with benchmarks/attention.py: import from the worker's checkout (PYTHONPATH) instead
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    import torch

    torch.set_num_threads(int(os.environ.get("REVISIONS_THREADS", "1")))
    fns: dict[str, Fn] = {}
    for line in sys.stdin:
        request = json.loads(line)
        case = request["case"]
        if case not in fns:
            fns[case] = build(case)
            for _ in range(2):  # warm-up: plans, paths and allocator
                fns[case]()
        seconds = []
        for _ in range(request["calls"]):
            gc.collect()
            start = time.perf_counter()
            fns[case]()
            seconds.append(time.perf_counter() - start)
        print(json.dumps({"seconds": seconds}), flush=True)


# ----------------------------------------------------------------------------------------------
# the parent: alternates the two workers


#: ``chain:SEQS-STEPS-STATES-DTYPE`` and ``chain_map:...`` cases (:func:`_chain`,
#: :func:`_chain_map`) are not in the default set either.
#: ``music:*`` cases (the factorial, partially factorial and second-order HMMs at 8 states a
#: chain, full batch) are not in the default set: run them with ``--cases``.
MUSIC_CASES = [f"music:{m}-8" for m in ("fhmm", "pfhmm", "hmm2")]
CASES = ([f"battery:{k}" for k in range(15)] + ["hmm:einsum", "hmm:graph", "pyro_hmm"]
         + [f"attention:{v}" for v in ("marginal", "variational-enum", "k-max", "markov")]
         + [f"query:{g}-{q}" for g in ("hmm", "mixture") for q in ("map", "sample", "marginals")])


class Worker:
    """A worker process running in checkout ``root``."""

    def __init__(self, root: Path, threads: int) -> None:
        env = {**os.environ, "PYTHONPATH": str(root), "REVISIONS_THREADS": str(threads)}
        self.root = root
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "benchmarks" / "revisions.py"), "--worker"],
            cwd=root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def time(self, case: str, calls: int) -> float:
        """The median seconds of ``calls`` calls of ``case``."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"case": case, "calls": calls}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the worker in {self.root} died on case {case!r}")
        return statistics.median(json.loads(line)["seconds"])

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def git_rev(root: Path) -> str:
    out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True, check=False)
    dirty = subprocess.run(
        ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True, text=True, check=False).stdout.strip()
    return (out.stdout.strip() or "?") + ("+changes" if dirty else "")


def compare(base: Path, cases: Sequence[str], rounds: int, calls: int, threads: int
            ) -> list[dict[str, Any]]:
    """Time every case on both sides, alternating; returns one row per case."""
    sides = {"base": Worker(base, threads), "new": Worker(ROOT, threads)}
    rows = []
    try:
        for case in cases:
            per_side: dict[str, list[float]] = {"base": [], "new": []}
            for r in range(rounds):
                for name in ("base", "new") if r % 2 == 0 else ("new", "base"):
                    per_side[name].append(sides[name].time(case, calls))
            ratios = [b / n for b, n in zip(per_side["base"], per_side["new"], strict=True)]
            row = {"case": case, "base_ms": 1e3 * statistics.median(per_side["base"]),
                   "new_ms": 1e3 * statistics.median(per_side["new"]),
                   "paired": statistics.median(ratios)}
            rows.append(row)
            print(f"{case:28s} base {row['base_ms']:9.3f} ms  new {row['new_ms']:9.3f} ms  "
                  f"paired base/new {row['paired']:.3f}", flush=True)
    finally:
        for side in sides.values():
            side.close()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, help="root of the checkout to compare against")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    parser.add_argument("--rounds", type=int, default=9, help="alternating rounds per case")
    parser.add_argument("--calls", type=int, default=5, help="timed calls per round and side")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker()
        return 0
    if args.base is None:
        parser.error("--base is required: a checkout of the revision to compare against")
    if not (args.base / "plated").is_dir():
        parser.error(f"--base {args.base} holds no plated/ package; pass a checkout's root")
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import machine_info

    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine_info().items()), flush=True)
    print(f"base {args.base} ({git_rev(args.base)}) vs new {ROOT} ({git_rev(ROOT)}); "
          f"{args.rounds} rounds x {args.calls} calls, {args.threads} thread(s) per worker",
          flush=True)
    rows = compare(args.base, args.cases.split(","), args.rounds, args.calls, args.threads)
    ratios = [row["paired"] for row in rows]
    geo = statistics.geometric_mean(ratios)
    print(f"geometric mean of paired ratios base/new: {geo:.3f}; min {min(ratios):.3f} "
          f"({rows[ratios.index(min(ratios))]['case']})", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
