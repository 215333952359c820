"""Run Pyro's own enumeration tests with ``TraceEnum_ELBO`` bound to :class:`plated.pyro.TVE_ELBO`.

Usage (from the repository root)::

    python -m conformance.pyro_enum            # the CI stage: fails below THRESHOLD
    python -m conformance.pyro_enum --pyro     # the same suite with Pyro's own class
    python -m conformance.pyro_enum -k test_elbo_hmm --failures   # a subset, listing failures

The suite is ``../shared/conformance/pyro/`` (Pyro's files, unmodified, read-only). It is copied
to a temporary directory for the run (pytest writes caches next to it) and never into the
repository. The binding is the pytest plugin :mod:`conformance.plugin`.

A test on :data:`DELIBERATE` checks something ``TVE_ELBO`` does differently on purpose; its
failure is expected and reported apart. Any other failure counts against :data:`THRESHOLD`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT.parent / "shared" / "conformance" / "pyro"
TEST_FILE = "tests/infer/test_enum.py"

#: The number of tests of ``test_enum.py`` (630) that must pass with ``TVE_ELBO``. Raise it as
#: the count rises.
THRESHOLD = 675

#: Tests that check a deliberate difference of ``TVE_ELBO``, by test id, with the reason.
DELIBERATE: dict[str, str] = {}


def _copy_suite(dest: Path) -> None:
    """Copy the suite's files (tests, setup.cfg, licence) to ``dest``."""
    shutil.copytree(SUITE / "tests", dest / "tests")
    for name in ("setup.cfg", "LICENSE.md"):
        shutil.copy(SUITE / name, dest / name)


def _results(report: Path) -> dict[str, str]:
    """Each test id of a junit report, with its outcome: passed, failed, error or skipped."""
    outcomes: dict[str, str] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = case.get("name", "")
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = "failed" if child.tag == "failure" else child.tag
        outcomes[name] = outcome
    return outcomes


def main(argv: list[str] | None = None) -> int:
    """Run the suite; return 0 if at least :data:`THRESHOLD` tests pass (with ``-k``: always
    0 unless pytest itself breaks)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pyro", action="store_true",
                        help="run with Pyro's own TraceEnum_ELBO (no binding)")
    parser.add_argument("-k", default=None, help="pytest -k expression (a subset; no threshold)")
    parser.add_argument("--failures", action="store_true", help="list every failing test id")
    parser.add_argument("pytest_args", nargs="*", help="further pytest arguments")
    args = parser.parse_args(argv)
    if not (SUITE / TEST_FILE).exists():
        print(f"conformance: the suite is missing: {SUITE / TEST_FILE}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="plated-conformance-") as tmp:
        work = Path(tmp)
        _copy_suite(work)
        report = work / "report.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                   f"--junitxml={report}", "-o", "junit_family=xunit1", "--tb=line",
                   TEST_FILE]
        if not args.pyro:
            command[4:4] = ["-p", "conformance.plugin"]
        if args.k:
            command += ["-k", args.k]
        command += args.pytest_args
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        start = time.monotonic()
        proc = subprocess.run(command, cwd=work, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        seconds = time.monotonic() - start
        if not report.exists():
            print(proc.stdout)
            print("conformance: pytest wrote no report", file=sys.stderr)
            return 2
        outcomes = _results(report)
    passed = sorted(t for t, o in outcomes.items() if o == "passed")
    failed = sorted(t for t, o in outcomes.items() if o != "passed")
    expected = [t for t in failed if t in DELIBERATE]
    unexpected = [t for t in failed if t not in DELIBERATE]
    stale = sorted(t for t in DELIBERATE if outcomes.get(t) == "passed")
    who = "TraceEnum_ELBO (Pyro)" if args.pyro else "TVE_ELBO"
    print(f"conformance: {TEST_FILE} with {who}: {len(passed)} of {len(outcomes)} passed, "
          f"{len(expected)} deliberate differences, {len(unexpected)} other failures "
          f"({seconds:.0f} s)")
    if args.failures or (not args.k and unexpected):
        for test in unexpected:
            print(f"  FAILED {test}")
    for test in expected:
        print(f"  deliberate: {test}: {DELIBERATE[test]}")
    for test in stale:
        print(f"  note: {test} is listed as deliberate but passed; remove it from DELIBERATE")
    if args.k or args.pyro:
        return 0
    if len(passed) < THRESHOLD:
        print(f"conformance: {len(passed)} passed, below THRESHOLD={THRESHOLD}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
