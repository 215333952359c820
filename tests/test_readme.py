"""The README's "Exact inference in ten lines" example runs as printed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    text = README.read_text()
    section = text.split("## Exact inference in ten lines", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the section holds one python example"
    exec(compile(blocks[0], str(README), "exec"), {})
    out = capsys.readouterr().out
    assert "torch.Size([5, 2])" in out
    assert re.search(r"^plan: \d+ steps", out, flags=re.M)


def test_readme_pyro_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    import pyro

    pyro.clear_param_store()
    text = README.read_text()
    section = text.split("## Pyro models: one changed line", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the section holds one python example"
    exec(compile(blocks[0], str(README), "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert float(out[0]) > 0  # a finite negative ELBO
    assert out[1] == "torch.Size([4, 50]) torch.Size([4, 50, 3])"
    pyro.clear_param_store()
