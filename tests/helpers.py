"""Helpers shared by the tests: tolerances, enumeration lookups and a chi-squared test.

Kept free of fixtures so any test module can import it (``tests/`` is on ``sys.path`` because
``tests/conftest.py`` lives there and the directory is not a package).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from plated import Factor, naive

#: The repository root.
REPO = Path(__file__).resolve().parents[1]


#: Set to 1 (``.ci/run`` does) to make a missing real data set a failure instead of a skip.
REQUIRE_DATA_ENV = "PLATED_REQUIRE_DATA"


class RealData(NamedTuple):
    """Where a test module's real data set is, and the mark for the tests that need it.

    ``folder`` is the data folder (``$PLATED_DATA``) when it holds every file, else a path that
    names the missing files (so module-level code that joins paths still runs); ``needed`` skips
    a test when the files are absent, with a reason that names the data set and its origin.
    """

    folder: Path
    present: bool
    needed: pytest.MarkDecorator


def real_data(*files: str) -> RealData:
    """The real data files ``files`` (paths relative to the data folder, e.g.
    ``"polyphonic/JSB_Chorales.mat"``), looked up in ``$PLATED_DATA``.

    Without the data a test marked ``needed`` is skipped, and the reason names the data set, where
    it comes from and how to point the tests at it. With ``PLATED_REQUIRE_DATA=1`` (CI) a missing
    file is an error instead: the module fails to load, naming the files.
    """
    from examples.data import DATA_ENV, SOURCES

    env = os.environ.get(DATA_ENV)
    folder = Path(env).expanduser() if env else None
    missing = [f for f in files if folder is None or not (folder / f).is_file()]
    if not missing:
        assert folder is not None
        # the data are here: the mark's condition is false, so it never skips
        return RealData(folder, True, pytest.mark.skipif(False, reason="the data are present"))
    sets = sorted({f.split("/")[0] for f in missing})
    origin = "; ".join(f"{s}/ comes from {SOURCES[s]}" if s in SOURCES else s for s in sets)
    where = (f"{DATA_ENV} is not set" if folder is None
             else f"{DATA_ENV}={str(folder)!r} lacks {', '.join(missing)}")
    reason = (f"needs the real data {', '.join(missing)} ({where}); {origin}. Point the tests at "
              f"the data with {DATA_ENV}=DIR")
    if os.environ.get(REQUIRE_DATA_ENV) == "1":
        raise RuntimeError(f"{REQUIRE_DATA_ENV}=1 and a test {reason}")
    placeholder = Path(f"<missing real data: {', '.join(missing)}>")
    return RealData(placeholder, False, pytest.mark.skipif(True, reason=reason))


#: float64 relative tolerance for values compared with a brute-force or Pyro reference.
RTOL = 1e-8


def logz_atol(factors: Sequence[Factor], rtol: float = RTOL) -> float:
    """An absolute tolerance that grows with problem size: rounding in a log-space sum-product is
    at most a few ulps per added term, so allow ``rtol`` per thousand factor entries (at least
    ``rtol``)."""
    numel = sum(f.tensor.numel() for f in factors)
    return rtol * max(1.0, numel / 1000.0)


def assignment_rows(en: naive.Enumeration, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The enumeration row of each joint assignment in ``values``.

    :param values: per variable, a long tensor ``(n, *plate sizes)`` (as ``sample`` returns, or a
        MAP assignment with a leading dim of one).
    :return: ``(n,)`` row indices into ``en.assignments`` / ``en.log_joint``.

    ``en.assignments`` is the row-major Cartesian product of the copies' domains, so a row is the
    mixed-radix number of its copy values; the decoding is checked against ``en.assignments``.
    """
    n = next(iter(values.values())).shape[0] if values else 1
    cols = []
    for v, e in en.copies:
        x = values[v]
        cols.append(x[(slice(None),) + tuple(e)] if e else x.reshape(n))
    if not cols:
        return torch.zeros(n, dtype=torch.long)
    table = torch.stack(cols, dim=1)
    rows = torch.zeros(n, dtype=torch.long)
    for k, size in enumerate(en.sizes):
        rows = rows * size + table[:, k]
    assert torch.equal(en.assignments[rows], table), "enumeration is not row-major"
    return rows


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0
                ) -> tuple[float, int]:
    """Pearson's chi-squared goodness-of-fit p-value of ``counts`` against ``probs``.

    Bins with expected count below ``min_expected`` are merged (smallest first) into one pooled
    bin, which is grown with the next smallest bin until its expected count reaches
    ``min_expected``. Zero-probability bins must have zero counts (checked by the caller). The
    p-value is the regularised upper incomplete gamma ``Q(dof / 2, chi2 / 2)``.

    :return: ``(p_value, degrees of freedom)``; ``(1.0, 0)`` when everything merges into one bin.
    """
    n = counts.sum().to(torch.float64)
    expected = probs.to(torch.float64) * n
    observed = counts.to(torch.float64)
    order = torch.argsort(expected)
    expected, observed = expected[order].tolist(), observed[order].tolist()
    bins_e: list[float] = []
    bins_o: list[float] = []
    pool_e = pool_o = 0.0
    k = 0
    while k < len(expected) and (expected[k] < min_expected or 0 < pool_e < min_expected):
        pool_e += expected[k]
        pool_o += observed[k]
        k += 1
    if pool_e > 0:
        bins_e.append(pool_e)
        bins_o.append(pool_o)
    bins_e += expected[k:]
    bins_o += observed[k:]
    if len(bins_e) == 1:
        return 1.0, 0
    e = torch.tensor(bins_e, dtype=torch.float64)
    o = torch.tensor(bins_o, dtype=torch.float64)
    chi2 = ((o - e) ** 2 / e).sum()
    dof = len(bins_e) - 1
    p = torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), chi2 / 2)
    return float(p), dof


def sample_pvalue(en: naive.Enumeration, samples: Mapping[str, torch.Tensor]
                  ) -> tuple[float, int, int]:
    """Chi-squared p-value of joint ``samples`` against the enumerated posterior of ``en``.

    :return: ``(p_value, dof, samples landing on zero-probability assignments)``.
    """
    rows = assignment_rows(en, samples)
    counts = torch.bincount(rows, minlength=en.log_joint.numel())
    logp = en.log_joint.detach() - en.log_joint.detach().logsumexp(0)
    probs = logp.exp()
    impossible = int(counts[probs == 0].sum())
    p, dof = chi2_pvalue(counts[probs > 0], probs[probs > 0])
    return p, dof, impossible


def log_num_assignments(en: naive.Enumeration) -> float:
    """``log`` of the number of joint assignments of an enumeration."""
    return sum(math.log(s) for s in en.sizes)


class RecordOps(TorchDispatchMode):
    """Records every ATen op dispatched while active: any real tensor work dispatches one, while
    reading metadata (shape, dtype, device) does not."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def run_example(module: str, *args: str, env: Mapping[str, str | None] | None = None,
                timeout: float = 600, cwd: Path | None = None) -> Any:
    """Run ``python -m module *args`` in a subprocess from the repository root and return the
    ``subprocess.CompletedProcess`` (text output). ``env`` entries override the environment; an
    entry of ``None`` removes the variable (e.g. ``{"PLATED_DATA": None}``)."""
    import subprocess
    import sys

    full = dict(os.environ)
    full["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [full.get("PYTHONPATH")] if p])
    for key, value in (env or {}).items():
        if value is None:
            full.pop(key, None)
        else:
            full[key] = value
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          env=full, cwd=cwd or REPO, timeout=timeout, check=False)


def assert_one_line_error(result: Any, module: str, *needles: str, usage: bool = False) -> str:
    """Assert that a finished ``run_example`` failed with one line on stderr,
    ``MODULE: error: ...``, holding every one of ``needles``, and no traceback. With ``usage``
    it is argparse's usage error (status 2, the usage lines then the error line); else status 1
    and nothing but the error line. Returns the error line."""
    err = result.stderr
    assert result.returncode == (2 if usage else 1), (result.returncode, result.stdout, err)
    assert "Traceback" not in err and "Traceback" not in result.stdout, err
    lines = [line for line in err.splitlines() if line.strip()]
    prefixes = (f"{module}: error: ", f"python -m {module}: error: ")  # ours, argparse's
    errors = [line for line in lines if line.startswith(prefixes)]
    assert len(errors) == 1, err
    if not usage:
        assert lines[-1] == errors[0] and not any(
            line.startswith(("  File", "    ")) for line in lines), err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def interrupt_run(command: Sequence[str], checkpoint: Path, env: Mapping[str, str],
                  settle: float = 0.0, wait: float = 400) -> tuple[int, str, str]:
    """Start ``command`` (a training program) from the repository root, wait until it has written
    ``checkpoint``, let it run ``settle`` seconds more, then send it a real SIGINT (Ctrl-C).

    :return: its exit status, stdout and stderr. It is killed if it does not end in two minutes.
    :raises AssertionError: if it ends, or writes no checkpoint within ``wait`` seconds, first.
    """
    import signal
    import subprocess
    import time

    def default_sigint() -> None:
        # a suite started in the background (``cmd &``) runs with SIGINT ignored, which children
        # inherit, and Python installs its Ctrl-C handler only where SIGINT is not ignored
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    proc = subprocess.Popen(list(command), cwd=REPO, env=dict(env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    try:
        deadline = time.monotonic() + wait
        while not checkpoint.is_file():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        time.sleep(settle)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out, err
