"""Benchmark: ``torch.compile`` and the chain's sequential recursion.

On one chain of the JSB-chorales shape (``--batch`` 229 sequences, ``--length`` 128 steps,
``--states`` 16, float32), times log Z plus its gradient with respect to every step for:

* ``torch loop``: the hand-written forward algorithm (``logsumexp`` a step, autograd's
  backward), eager;
* ``torch loop, compiled``: the same function under :func:`torch.compile` (the loop unrolled
  into one graph, compiled once for this length: a new length compiles again);
* ``plated recursion``: :func:`plated.recursion.chain_messages` on the steps, eager;
* ``plated recursion, compiled steps``: the same inside
  :func:`plated.recursion.compiled_steps` (each step's operations compiled once per step
  shape, whatever the length);
* ``plated recursion under torch.compile``: the whole call compiled; the graph breaks that
  :func:`torch._dynamo.explain` reports are printed (the exact fallback's data-dependent
  ``nonzero``).

It first checks that every variant gives the same log Z and gradients (float32 rounding),
reports the first (compiling) call's time, then alternates the variants for ``--rounds`` rounds
(in alternating order) and prints medians and paired ratios to the eager torch loop.

Run from the repository root::

    PYTHONPATH=. python benchmarks/compile.py [--rounds 9] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from benchmarks.common import machine_info, text_table
from plated.recursion import chain_messages, compiled_steps

Fn = Callable[[], tuple[torch.Tensor, tuple[torch.Tensor, ...]]]


def variants(batch: int, length: int, k: int) -> tuple[dict[str, Fn], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    trans = torch.randn(batch, length, k, k, generator=gen).log_softmax(-1)
    trans = trans + 0.5 * torch.randn(batch, length, 1, k, generator=gen)
    steps = [m.clone().requires_grad_() for m in trans.unbind(1)]

    def loop() -> torch.Tensor:
        alpha = torch.zeros(batch, k)
        for m in steps:
            alpha = torch.logsumexp(alpha.unsqueeze(-1) + m, dim=-2)
        return torch.logsumexp(alpha, dim=-1).sum()

    def ours() -> torch.Tensor:
        return chain_messages(steps)[0].logsumexp(-1).sum()

    compiled_loop = torch.compile(loop)
    compiled_ours = torch.compile(ours)

    def with_grad(f: Callable[[], torch.Tensor], steps_compiled: bool = False) -> Fn:
        def run() -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
            if steps_compiled:
                with compiled_steps():
                    z = f()
                    return z, torch.autograd.grad(z, steps)
            z = f()
            return z, torch.autograd.grad(z, steps)
        return run

    fns = {"torch loop": with_grad(loop), "torch loop, compiled": with_grad(compiled_loop),
           "plated recursion": with_grad(ours),
           "plated recursion, compiled steps": with_grad(ours, steps_compiled=True),
           "plated recursion under torch.compile": with_grad(compiled_ours)}
    explained = torch._dynamo.explain(ours)()
    print(f"plated recursion under torch.compile: {explained.graph_count} graphs, "
          f"{explained.graph_break_count} graph breaks; first reason: "
          + (str(explained.break_reasons[0].reason).splitlines()[0]
             if explained.break_reasons else "-"))
    return fns, steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=229)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--states", type=int, default=16)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    info = machine_info()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    fns, _ = variants(args.batch, args.length, args.states)
    ref_z, ref_g = fns["torch loop"]()
    for name, fn in fns.items():
        began = time.perf_counter()
        z, g = fn()
        first = time.perf_counter() - began
        err = max(float((a - b).abs().max()) for a, b in zip(g, ref_g, strict=True))
        dz = abs(z.item() - ref_z.item())
        assert dz <= 1e-5 * abs(ref_z.item()) and err < 1e-4, name
        print(f"  {name}: first call {first:.2f} s; log Z = {z.item():.4f} (loop's "
              f"{ref_z.item():.4f}), max |grad - loop's| = {err:.1e}")
    times: dict[str, list[float]] = {name: [] for name in fns}
    ratios: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(args.rounds):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))
        this: dict[str, float] = {}
        for name in order:
            began = time.perf_counter()
            fns[name]()
            this[name] = time.perf_counter() - began
            times[name].append(this[name])
        for name in fns:
            ratios[name].append(this["torch loop"] / this[name])
    rows = [[name, f"{1e3 * statistics.median(t):.1f}",
             f"{statistics.median(ratios[name]):.2f}"] for name, t in times.items()]
    print(f"\nlog Z + gradient, batch {args.batch} x length {args.length} x {args.states} "
          f"states, float32, {args.threads} thread(s), {args.rounds} rounds")
    print(text_table(["variant", "ms median", "torch loop / variant (paired)"], rows))


if __name__ == "__main__":
    main()
