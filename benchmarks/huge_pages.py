"""Benchmark: filling a chain-sized CPU buffer, fresh, advised onto huge pages, and touched.

The exponentials of case (c)'s chain (16 sequences x 10,000 steps x 16 x 16 states, float32:
164 MB) written into (1) a fresh ``torch.empty`` buffer, which glibc maps afresh and the kernel
faults in 4 KiB at a time; (2) a fresh buffer from :func:`plated._memory.empty`, advised onto
2 MiB pages before the write; (3) a buffer allocated and touched once, outside the timing (the
floor: the write alone). The three alternate, round by round; medians and paired ratios.

Run: ``PYTHONPATH=. python benchmarks/huge_pages.py [--rounds 15] [--mb 164]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import machine_info
from plated import _memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--mb", type=float, default=163.84, help="buffer size in MB (1e6 bytes)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = int(args.mb * 1e6) // 4
    x = torch.randn(n)
    touched = torch.zeros(n)
    sides = {
        "fresh torch.empty": lambda: torch.exp(x, out=torch.empty(n)),
        "fresh, huge pages": lambda: torch.exp(x, out=_memory.empty((n,), x)),
        "touched (floor)": lambda: torch.exp(x, out=touched),
    }
    times: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(args.rounds):
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            t0 = time.perf_counter()
            out = sides[name]()
            times[name].append(time.perf_counter() - t0)
            del out
    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine_info().items()))
    print(f"exp into a {n * 4 / 1e6:.0f} MB float32 buffer, {args.rounds} rounds, "
          f"{args.threads} thread(s); huge pages offered: {_memory._madvise() is not None}")
    base = times["fresh torch.empty"]
    for name, ts in times.items():
        paired = statistics.median(b / t for b, t in zip(base, ts, strict=True))
        print(f"{name:20s} median {statistics.median(ts) * 1e3:7.1f} ms   "
              f"fresh/this {paired:.2f}")


if __name__ == "__main__":
    main()
