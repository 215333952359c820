"""Every example script is covered: it answers ``--help``, and a test runs its ``--smoke-test``.

The smoke runs themselves live in ``tests/test_examples_NAME.py``, next to the example's other
tests (the engine demo's, ``examples.hmm_demo``, in ``tests/test_demo.py``); this meta-test fails
when a new script in ``examples/`` has none in any test file (as Pyro's ``tests/test_examples.py``
does for its examples).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Modules of ``examples/`` that are libraries for the scripts, not scripts.
NOT_SCRIPTS = {"__init__", "common"}
#: Scripts that read no data set and write no file, so have no ``--data-dir``, ``--out-dir`` or
#: ``--resume`` (the engine demo draws its data and prints its report).
NO_FILES = {"hmm_demo"}


def scripts() -> list[str]:
    """The example scripts: modules of ``examples/`` with a ``main`` and a ``__main__`` guard, and
    packages of ``examples/`` with a ``__main__.py`` (``python -m examples.translation``)."""
    out = []
    for path in sorted((REPO / "examples").glob("*.py")):
        text = path.read_text()
        if path.stem not in NOT_SCRIPTS and "def main(" in text and "__main__" in text:
            out.append(path.stem)
    out += [p.parent.name for p in sorted((REPO / "examples").glob("*/__main__.py"))]
    return sorted(out)


def test_the_known_scripts_are_found() -> None:
    assert {"music", "animal_movement", "sentiment", "translation", "hmm_demo"} <= set(scripts())
    assert NO_FILES <= set(scripts())


@pytest.mark.parametrize("name", scripts())
def test_script_has_a_smoke_test(name: str) -> None:
    tests = {p.name: p.read_text() for p in (REPO / "tests").glob("test_*.py")
             if p.name != Path(__file__).name}
    covering = [f for f, text in tests.items()
                if re.search(rf"[\"']examples\.{name}[\"']", text) and "--smoke-test" in text]
    assert covering, (f"examples.{name} has no smoke test: add tests/test_examples_{name}.py "
                      f"running `python -m examples.{name} --smoke-test`")


@pytest.mark.parametrize("name", scripts())
def test_script_help(name: str) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    r = subprocess.run([sys.executable, "-m", f"examples.{name}", "--help"], capture_output=True,
                       text=True, env=env, cwd=REPO, timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    files = ["--data-dir", "--resume", "--out-dir"]
    for option in ["--smoke-test", "--seed"] + ([] if name in NO_FILES else files):
        assert option in r.stdout, f"examples.{name} --help lacks {option}"
    if name in NO_FILES:  # the exemption holds only while the script has none of them
        assert not [o for o in files if o in r.stdout], f"examples.{name}: not in NO_FILES"


#: Programs inside the example packages, beside the packages' own ``__main__``.
SUB_PROGRAMS = ["translation.report", "video_qa.report", "video_qa.tgif"]

#: Run in a subprocess: run the program with ``--help`` after making ``parse_args`` report the
#: parser's options (their help as the formatter expands it) and the whole help text as JSON.
_INSPECT = """
import argparse, json, runpy, sys
def report(self, args=None, namespace=None):
    fmt = self._get_formatter()
    opts = [{"flags": a.option_strings, "help": a.help,
             "expanded": fmt._expand_help(a) if a.help else ""}
            for a in self._actions if a.option_strings and a.dest != "help"]
    print(json.dumps({"options": opts, "text": self.format_help()}))
    raise SystemExit(0)
argparse.ArgumentParser.parse_args = report
sys.argv = [sys.argv[1], "--help"]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("name", scripts() + SUB_PROGRAMS)
def test_help_text_is_complete_and_plain(name: str) -> None:
    import json

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    r = subprocess.run([sys.executable, "-c", _INSPECT, f"examples.{name}"], capture_output=True,
                       text=True, env=env, cwd=REPO, timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    for opt in got["options"]:
        flag = "/".join(opt["flags"])
        assert opt["help"] and opt["help"].strip(), f"examples.{name}: {flag} has no help text"
        assert opt["expanded"].count("(default:") <= 1, f"examples.{name}: {opt['expanded']}"
    text = got["text"]
    for markup in ("``", ":math:", ":func:", ":class:", ":mod:", ":meth:"):
        assert markup not in text, f"examples.{name} --help shows Sphinx markup {markup!r}"
    if name != "music":
        assert "polyphonic" not in text, f"examples.{name} --help speaks of polyphonic music"
