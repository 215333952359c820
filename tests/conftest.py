"""Shared numerics policy of the test suite.

* **float64 by default.** Every test runs with ``torch.set_default_dtype(torch.float64)``
  (restored afterwards), and the random graphs of :mod:`plated.testing` are drawn in float64, so
  fast paths can be compared with the brute-force twin (:mod:`plated.naive`) and with Pyro to
  ~1e-8 relative. Tests of float32 state so and give their own, looser, bound.
* **A fixed seed per test.** ``torch.manual_seed(0)`` and ``random.seed(0)`` run before every test,
  and every random graph or equation comes from an explicit seed, so each test is deterministic:
  a statistical test (e.g. chi-squared goodness of fit of posterior samples) either always passes
  or always fails, and a failure names the seed that reproduces it.
* **Tolerances scale with problem size.** Rounding error of a log-space sum-product grows with the
  number of terms it adds, so values must satisfy ``|ours - ref| <= atol + rtol * |ref|`` with
  ``rtol = 1e-8`` and an ``atol`` that grows with the number of factor entries (see
  :func:`helpers.logz_atol`); probabilities (marginals) are compared to ``1e-8`` absolute.
* **One intra-op thread per test.** The tests run many thousands of tiny tensor ops (references
  written as Python loops, brute-force enumeration), for which a thread pool saves nothing, and on
  a busy 2-core machine its synchronisation can stall: a 10,000-step autograd reference took
  1 s with one thread and 30-160 s with two. ``torch.set_num_threads(1)`` also fixes the order of
  floating-point reductions. The previous setting is restored after each test.
* **Warnings are errors** (``filterwarnings = error`` in ``setup.cfg``): a new warning fails the
  suite until it is fixed or filtered there with a reason.
* **Pyro's validation is on**, as it is by default, and restored after each test: an example's
  ``main()`` run in-process sets it from its ``--validate`` flag, and Pyro's errors and warnings
  (which the drop-in tests compare with ours) depend on it.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pyro
import pytest
import torch
from pyro.infer.util import is_validation_enabled


@pytest.fixture(autouse=True)
def numerics_policy() -> Iterator[None]:
    """float64 default dtype, one thread and a fixed seed for every test; restores the default
    dtype and the thread count afterwards."""
    old_dtype, old_threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    random.seed(0)
    try:
        yield
    finally:
        torch.set_default_dtype(old_dtype)
        torch.set_num_threads(old_threads)


@pytest.fixture(autouse=True)
def pyro_validation() -> Iterator[None]:
    """Pyro's validation on for every test, restored afterwards (see the module docstring)."""
    old = is_validation_enabled()
    pyro.enable_validation(True)
    try:
        yield
    finally:
        pyro.enable_validation(old)
