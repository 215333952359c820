"""Benchmark: ``pyro_hmm.py``'s cases in this checkout against another revision, paired.

Like ``revisions.py``, but on every variant of ``pyro_hmm.py`` that runs on the engine, at the size
``pyro_hmm.py`` uses (all 229 JSB chorales by default): one ``loss_and_grads`` of

* ``loop``: ``TVE_ELBO`` on the ``pyro.markov`` loop model (variant 2);
* ``vec``: ``TVE_ELBO`` on the ``markov_plate`` model (variant 3);
* ``vec_bernoulli``: ``TVE_ELBO`` on the ``markov_plate`` model with Bernoulli sites (3b);
* ``pyro``: Pyro's ``TraceEnum_ELBO`` on the loop model (variant 1), a control: the same code on
  both sides, so its paired ratio shows the noise of the measurement.

Two worker processes, one per checkout (``--base`` and ``--new``, each a directory holding a
``plated`` package and ``benchmarks/pyro_hmm.py``), each import their own ``plated``; they take
turns case by case, in alternating order, each timing one round of ``--calls`` calls. A case's
figure is the median over rounds of each side's per-round median; *paired* is the median of the
per-round ratios base/new (> 1: the new side is faster).

Run from the repository root, e.g. against the revision before issue 16::

    mkdir -p /tmp/base16 && git archive 5419eaf | tar -x -C /tmp/base16
    PYTHONPATH=. python benchmarks/pyro_revisions.py --base /tmp/base16
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
CASES = ("loop", "vec", "vec_bernoulli", "pyro")
Fn = Callable[[], object]


def build(case: str, num_sequences: int | None) -> Fn:
    """One ``loss_and_grads`` of ``case`` on the first ``num_sequences`` JSB chorales (all if
    ``None``), float32, with ``pyro_hmm.py``'s initial parameter values."""
    import pyro
    import torch
    from pyro.infer import TraceEnum_ELBO

    from benchmarks.pyro_hmm import make_guide, model_loop, model_vec, model_vec_bernoulli
    from examples.data import load_polyphonic
    from plated.pyro import TVE_ELBO

    torch.set_default_dtype(torch.float32)
    pyro.enable_validation(False)
    pyro.clear_param_store()
    sequences, lengths = load_polyphonic("JSB_Chorales", "train", dtype=torch.float32)
    if num_sequences is not None:
        sequences, lengths = sequences[:num_sequences], lengths[:num_sequences]
    sequences = sequences[:, : int(lengths.max())].contiguous()
    hidden = 16
    generator = torch.Generator().manual_seed(0)
    cpu64: dict[str, Any] = {"dtype": torch.float64}
    init_x = torch.softmax(torch.randn(hidden, hidden, generator=generator, **cpu64)
                           + 2.0 * torch.eye(hidden, **cpu64), dim=-1)
    init_y = torch.sigmoid(torch.randn(hidden, sequences.shape[-1], generator=generator,
                                       **cpu64) - 2.0)
    guide = make_guide(init_x.float(), init_y.float())
    guide(sequences, lengths, hidden)
    model, elbo = {
        "loop": (model_loop, TVE_ELBO(max_plate_nesting=2)),
        "vec": (model_vec, TVE_ELBO(max_plate_nesting=2)),
        "vec_bernoulli": (model_vec_bernoulli, TVE_ELBO(max_plate_nesting=3)),
        "pyro": (model_loop, TraceEnum_ELBO(max_plate_nesting=2)),
    }[case]
    leaves = [pyro.param(name).unconstrained() for name in ("map_probs_x", "map_probs_y")]

    def step() -> object:
        loss = elbo.loss_and_grads(model, guide, sequences, lengths, hidden)
        for leaf in leaves:
            leaf.grad = None
        return loss

    return step


def worker(num_sequences: int | None) -> None:
    """Serve ``{"case", "calls"}`` requests on stdin with ``{"seconds": [...], "loss": x}``."""
    # this file's folder would lead sys.path and shadow the attention package with
    # benchmarks/attention.py: import from the worker's checkout (PYTHONPATH) instead
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    import torch

    torch.set_num_threads(int(os.environ.get("PYRO_REVISIONS_THREADS", "1")))
    fns: dict[str, Fn] = {}
    for line in sys.stdin:
        request = json.loads(line)
        case = request["case"]
        if case not in fns:
            fns[case] = build(case, num_sequences)
            for _ in range(2):  # warm-up: plans, paths and allocator
                fns[case]()
        seconds, loss = [], None
        for _ in range(request["calls"]):
            gc.collect()
            start = time.perf_counter()
            loss = fns[case]()
            seconds.append(time.perf_counter() - start)
        print(json.dumps({"seconds": seconds, "loss": loss}), flush=True)


class Worker:
    """A worker process importing the ``plated`` of checkout ``root``."""

    def __init__(self, root: Path, threads: int, num_sequences: int | None) -> None:
        env = {**os.environ, "PYTHONPATH": str(root), "PYRO_REVISIONS_THREADS": str(threads)}
        command = [sys.executable, str(Path(__file__).resolve()), "--worker"]
        if num_sequences is not None:
            command += ["--num-sequences", str(num_sequences)]
        self.root = root
        self.proc = subprocess.Popen(command, cwd=root, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def time(self, case: str, calls: int) -> tuple[float, float]:
        """The median seconds of ``calls`` calls of ``case``, and the last loss."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"case": case, "calls": calls}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the worker in {self.root} died on case {case!r}")
        reply = json.loads(line)
        return statistics.median(reply["seconds"]), float(reply["loss"])

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=120)


def compare(base: Path, new: Path, cases: Sequence[str], rounds: int, calls: int, threads: int,
            num_sequences: int | None) -> list[dict[str, Any]]:
    """Time every case on both sides, alternating; one row per case. Raises if the two sides'
    losses differ by more than 1e-5 relative (float32)."""
    sides = {"base": Worker(base, threads, num_sequences),
             "new": Worker(new, threads, num_sequences)}
    rows = []
    try:
        for case in cases:
            per_side: dict[str, list[float]] = {"base": [], "new": []}
            losses: dict[str, float] = {}
            for r in range(rounds):
                for name in ("base", "new") if r % 2 == 0 else ("new", "base"):
                    seconds, losses[name] = sides[name].time(case, calls)
                    per_side[name].append(seconds)
            if abs(losses["base"] - losses["new"]) > 1e-5 * abs(losses["base"]):
                raise SystemExit(f"case {case!r}: the losses differ: {losses}")
            ratios = [b / n for b, n in zip(per_side["base"], per_side["new"], strict=True)]
            row = {"case": case, "base_ms": 1e3 * statistics.median(per_side["base"]),
                   "new_ms": 1e3 * statistics.median(per_side["new"]),
                   "paired": statistics.median(ratios), "min_ratio": min(ratios),
                   "max_ratio": max(ratios), "loss": losses["new"]}
            rows.append(row)
            print(f"{case:14s} base {row['base_ms']:9.1f} ms  new {row['new_ms']:9.1f} ms  "
                  f"paired base/new {row['paired']:.3f} (rounds {row['min_ratio']:.3f}-"
                  f"{row['max_ratio']:.3f})  loss {row['loss']:.6g}", flush=True)
    finally:
        for side in sides.values():
            side.close()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, help="root of the checkout to compare against")
    parser.add_argument("--new", type=Path, default=ROOT,
                        help="root of the checkout to measure (default: this one)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds per case")
    parser.add_argument("--calls", type=int, default=3, help="timed calls per round and side")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--num-sequences", type=int, default=None,
                        help="the first N training sequences only (default: all 229)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.num_sequences)
        return 0
    if args.base is None:
        parser.error("--base is required: a checkout of the revision to compare against")
    for root in (args.base, args.new):
        if not (root / "plated").is_dir() or not (root / "benchmarks" / "pyro_hmm.py").is_file():
            parser.error(f"{root} holds no plated/ package or benchmarks/pyro_hmm.py")
    unknown = set(args.cases.split(",")) - set(CASES)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; choose from {', '.join(CASES)}")
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import machine_info

    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine_info().items()), flush=True)
    print(f"command: PYTHONPATH=. python benchmarks/pyro_revisions.py "
          f"{' '.join(sys.argv[1:] if argv is None else argv)}", flush=True)
    print(f"base {args.base} vs new {args.new}; {args.rounds} rounds x {args.calls} calls, "
          f"{args.threads} thread(s) per worker", flush=True)
    rows = compare(args.base, args.new, args.cases.split(","), args.rounds, args.calls,
                   args.threads, args.num_sequences)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
