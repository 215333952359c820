"""The self-contained demo of the engine (``python -m examples.hmm_demo``) runs, learns and prints
its report."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import assert_one_line_error, run_example

from examples import hmm_demo as demo

PROG = "examples.hmm_demo"


def test_demo_quick(capsys: pytest.CaptureFixture[str]) -> None:
    results = demo.main(["--quick"])
    out = capsys.readouterr().out

    # the cost report of the elimination plan, with the parallel scan along the sequential plate
    assert "elimination plan" in out
    assert re.search(r"^plan: \d+ steps", out, flags=re.M)
    assert "scan" in out  # the sequential plate is eliminated by a parallel scan
    assert "MAP state accuracy:" in out
    assert "posterior marginals of sequence 0" in out
    assert "sample 2" in out

    assert results["loglik_after"] > results["loglik_before"]
    assert results["map_accuracy"] > results["chance"] + 0.25


def test_demo_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        demo.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--steps", "--seed", "--num-steps", "--device", "--quick", "--smoke-test"):
        assert flag in out


def test_best_permutation_accuracy() -> None:
    truth = torch.tensor([0, 0, 1, 2, 3, 3])
    pred = torch.tensor([2, 2, 0, 1, 3, 1])  # fitted k -> true perm[k]
    acc, perm = demo.best_permutation_accuracy(pred, truth, 4)
    assert acc == pytest.approx(5 / 6)
    assert perm[2] == 0 and perm[0] == 1


def test_smoke_test_keeps_explicit_options() -> None:
    """``--smoke-test`` (the other examples' name of ``--quick``) sets only the options not
    given: an explicit ``--num-seqs 3`` stays 3, the smoke test's 20 steps of 50 observations
    fill in the rest."""
    args = demo.parse_args(["--smoke-test", "--num-seqs", "3"])
    assert (args.steps, args.num_steps, args.num_seqs) == (20, 50, 3)
    assert vars(demo.parse_args(["--quick"])) == vars(demo.parse_args(["--smoke-test"]))


def test_the_command_runs_and_refuses_bad_options_in_one_line() -> None:
    """``python -m examples.hmm_demo --smoke-test`` as a process; a bad value is one usage
    line, an unusable device too."""
    r = run_example(PROG, "--smoke-test", "--seed", "1", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "MAP state accuracy:" in r.stdout and r.stderr == ""
    r = run_example(PROG, "--steps", "0", timeout=300)
    assert_one_line_error(r, PROG, "--steps", "'0'", usage=True)
    r = run_example(PROG, "--num-states", "9", timeout=300)
    assert_one_line_error(r, PROG, "--num-states", "between 2 and 8", usage=True)
    r = run_example(PROG, "--device", "cuda", env={"CUDA_VISIBLE_DEVICES": ""}, timeout=300)
    assert_one_line_error(r, PROG, "--device", "--device cpu", usage=True)
