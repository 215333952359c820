"""Helpers shared by the benchmark scripts: timings, tables and the machine record.

Each script times implementations side by side in one process and reports medians with their
interquartile range; :func:`machine_info` records what the numbers were measured on.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import opt_einsum
import pyro
import torch

import plated

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Timing:
    """Wall-clock seconds of one implementation on one case."""

    samples: list[float] = field(default_factory=list)
    first_s: float = math.nan  # the first timed call (first warm-up run)
    single: bool = False  # timed once only (too slow to repeat)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def iqr(self) -> tuple[float, float]:
        if len(self.samples) < 2:
            return self.samples[0], self.samples[0]
        q = statistics.quantiles(self.samples, n=4, method="inclusive")
        return q[0], q[2]


def fmt_ms(t: Timing) -> str:
    """``median [q1-q3]`` in milliseconds."""
    if t.single:
        return f"{t.median * 1e3:.0f} (1 run)"
    lo, hi = t.iqr
    return f"{t.median * 1e3:.3g} [{lo * 1e3:.3g}-{hi * 1e3:.3g}]"


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table with padded columns."""
    w = [max(len(h), *(len(r[k]) for r in rows)) if rows else len(h)
         for k, h in enumerate(header)]
    out = ["  ".join(h.ljust(w[k]) for k, h in enumerate(header))]
    out += ["  ".join(x.ljust(w[k]) for k, x in enumerate(r)) for r in rows]
    return "\n".join(out)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (``|`` in cells escaped)."""
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def machine_info(device: torch.device | None = None) -> dict[str, str]:
    """CPU model, cores, GPU (when ``device`` is CUDA), versions, threads, git revision, load."""
    model = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for ln in out.splitlines():
            if ln.startswith("Model name:"):
                model = ln.split(":", 1)[1].strip()
    except OSError:
        pass
    info = {"platform": platform.platform(), "cpu": model, "cores": str(os.cpu_count())}
    if device is not None:
        info["device"] = str(device)
        if device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(device)
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "plated",
                                "attention"], capture_output=True, text=True,
                               check=False).stdout.strip()
        git = (rev or "unknown") + (" + uncommitted changes" if dirty else "")
    except OSError:
        git = "unknown"
    info.update({"torch": torch.__version__, "threads": str(torch.get_num_threads()),
                 "python": platform.python_version(), "pyro": pyro.__version__,
                 "opt_einsum": opt_einsum.__version__,
                 "plated": f"{plated.__version__} (git {git})",
                 "load": " ".join(f"{x:.2f}" for x in os.getloadavg())})
    return info


def reset_high_water() -> bool:
    """Reset this process's resident-set high-water mark (Linux >= 4.0); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def high_water_kib() -> tuple[int, str]:
    """The resident-set high-water mark in KiB: ``VmHWM`` of this process's address space where
    /proc has it, else ``ru_maxrss``.

    ``ru_maxrss`` of a process started by fork + exec keeps the high-water mark of the forked
    copy of the (large) parent, so it is only a fallback; ``VmHWM`` is the same kernel counter
    (``hiwater_rss``) for the new address space alone, and is what ``ru_maxrss`` reports for a
    process that was not forked from a bigger one.
    """
    try:
        with open("/proc/self/status") as f:
            for ln in f:
                if ln.startswith("VmHWM:"):
                    return int(ln.split()[1]), "VmHWM"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"


def replace_readme_section(section: str, text: str) -> None:
    """Put ``text`` (starting with the heading ``section``) into ``benchmarks/README.md``:
    in place of that section if it is there (up to the next ``## `` heading), else at the end."""
    readme = REPO / "benchmarks" / "README.md"
    cur = readme.read_text()
    start = cur.find(section)
    if start < 0:
        readme.write_text(cur.rstrip("\n") + "\n\n" + text)
        return
    nxt = cur.find("\n## ", start + len(section))
    tail = cur[nxt + 1:] if nxt >= 0 else ""
    readme.write_text(cur[:start] + text + ("\n" + tail if tail else ""))


def run_json_child(cmd: Sequence[str], env: dict[str, str], timeout_s: float
                   ) -> dict[str, object]:
    """Run a measuring child process; return the last JSON object line it prints, or
    ``{"error": ...}`` naming a time-out, a failure (with the end of its stderr) or no output."""
    try:
        r = subprocess.run(list(cmd), capture_output=True, text=True, env=env,
                           timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        return {"error": f"exit {r.returncode}: {r.stderr.strip().splitlines()[-3:]}"}
    return dict(json.loads(lines[-1]))
