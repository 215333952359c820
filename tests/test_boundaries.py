"""Package boundaries: the engine does not depend on the applications built on it.

``import plated`` must load neither ``attention`` nor ``examples`` (checked in a fresh interpreter,
since this test session may have imported them already). Pyro is not checked: ``plated.pyro`` may
import it on demand.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _applications_loaded(imports: str) -> subprocess.CompletedProcess[str]:
    """In a fresh interpreter, import ``imports`` and print the application modules loaded."""
    code = (
        f"import sys, {imports}; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('attention', 'examples')))"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          check=True, timeout=120)


def test_import_plated_loads_no_applications() -> None:
    out = _applications_loaded("plated")
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_check_can_fail() -> None:
    """The same probe sees ``attention`` when it is imported, so an empty answer means something."""
    out = _applications_loaded("plated, attention")
    assert "attention" in out.stdout, out.stdout + out.stderr


def test_import_attention_loads_no_examples() -> None:
    """``attention`` builds on ``plated`` only: importing all of it loads nothing of
    ``examples``."""
    mods = ("attention, attention.functional, attention.modules, attention.output, "
            "attention.markov, attention.distributions, attention.decoding, attention.plotting")
    out = _applications_loaded(mods)
    loaded = eval(out.stdout.strip())  # a printed list of module names
    assert loaded and not [m for m in loaded if m.startswith("examples")], out.stdout + out.stderr


def test_import_plated_pyro_loads_no_applications() -> None:
    out = _applications_loaded("plated.pyro")
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
