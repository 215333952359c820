"""The self-contained demo (``python -m plated.demo``) runs, learns and prints its report."""

from __future__ import annotations

import re

import pytest
import torch

from plated import demo


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
    for flag in ("--steps", "--seed", "--num-steps", "--device", "--quick"):
        assert flag in out


def test_best_permutation_accuracy() -> None:
    truth = torch.tensor([0, 0, 1, 2, 3, 3])
    pred = torch.tensor([2, 2, 0, 1, 3, 1])  # fitted k -> true perm[k]
    acc, perm = demo.best_permutation_accuracy(pred, truth, 4)
    assert acc == pytest.approx(5 / 6)
    assert perm[2] == 0 and perm[0] == 1
