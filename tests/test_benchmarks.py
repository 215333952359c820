"""The benchmark scripts run end to end (smoke mode) and their implementations agree."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from helpers import real_data

REPO = Path(__file__).resolve().parents[1]


JSB = real_data("polyphonic/JSB_Chorales.mat")
DATA = JSB.folder


@JSB.needed
def test_pyro_hmm_smoke() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    cmd = [sys.executable, str(REPO / "benchmarks" / "pyro_hmm.py"), "--smoke-test",
           "--threads", "1", "--data-dir", str(DATA)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120,
                       check=False)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "8 sequences" in out
    agree = re.findall(r"^\s+(\d\w?) .*loss (\S+)\s+rel\. diff (\S+) .* (ok|DISAGREE)$",
                       r.stdout, flags=re.MULTILINE)
    assert [a[0] for a in agree] == ["1", "2", "3", "3b", "4"], out
    assert all(a[3] == "ok" for a in agree), out
    losses = [float(a[1]) for a in agree]
    assert all(abs(x - losses[0]) <= 1e-4 * abs(losses[0]) for x in losses), out
    for variant in ("pyro TraceEnum_ELBO", "TVE_ELBO (loop)", "TVE_ELBO (markov_plate)",
                    "torch forward"):
        assert re.search(rf"{re.escape(variant)}\s+[\d.e+]+ \[", r.stdout), out
    assert "targets:" in r.stdout


def test_attention_benchmark_smoke() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    cmd = [sys.executable, str(REPO / "benchmarks" / "attention.py"), "--smoke-test",
           "--skip-large", "--threads", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120,
                       check=False)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert re.search(r"^machine: .*cpu=.*torch=.*threads=1", r.stdout, flags=re.MULTILINE), out
    # every variant with a plain-torch twin agreed (loss and gradients)
    agree = re.findall(r"^  (\d'?) .* vs .* rel\. diff (\S+) .* (ok|DISAGREE)$", r.stdout,
                       flags=re.MULTILINE)
    assert [a[0] for a in agree] == ["1", "2", "3", "4", "5", "6"], out
    assert all(a[2] == "ok" for a in agree), out
    # every variant timed, with a finite time and a measured peak memory
    for variant in ("1 soft", "2 marginal", "3 variational-enum", "4 variational-enum K-max",
                    "5 variational-sample", "5' variational-sample (all S)", "6 Markov prior",
                    "7 torch reference (variational-enum)"):
        m = re.search(rf"^{re.escape(variant)}\s+([\d.e+]+) \[.*\]\s+1\s+[\d.]+\s+([\d.]+) MiB",
                      r.stdout, flags=re.MULTILINE)
        assert m, f"{variant} missing from the table:\n{out}"
    assert "targets:" in r.stdout
    assert "non-finite" not in r.stdout and "Warning" not in out, out
