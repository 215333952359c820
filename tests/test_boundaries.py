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


def test_import_plated_loads_no_applications() -> None:
    code = (
        "import sys, plated; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('attention', 'examples')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_check_can_fail() -> None:
    """The same probe sees ``attention`` when it is imported, so an empty answer means something."""
    code = (
        "import sys, plated, attention; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('attention', 'examples')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=120)
    assert "attention" in out.stdout, out.stdout + out.stderr
