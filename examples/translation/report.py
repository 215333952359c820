"""The results table of several runs: ``python -m examples.translation.report RUN_DIR...``
(or the folder that holds the run folders).

Reads each run's ``results.json`` (written by ``python -m examples.translation``) and prints a
Markdown table like Table 1 of Deng et al. (2018): test perplexity, BLEU, the prior's entropy,
the K-max figures beside them where measured, the validation figures, epochs and training time.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..common import ExampleError, HelpFormatter, plain_text, run_cli

__all__ = ["main", "make_parser", "read_results", "table"]

#: Row order: the paper's, then the Markov prior.
ORDER = ("soft", "marginal", "hard-enum", "hard-sample", "variational-enum", "variational-sample",
         "gumbel", "markov", "variational-markov")


def _fmt(x: float | None, digits: int = 2) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def table(results: Sequence[dict[str, Any]]) -> str:
    """The Markdown table of ``results`` (dicts read from ``results.json``)."""
    rows = sorted(results, key=lambda r: (ORDER.index(r["mode"]) if r["mode"] in ORDER
                                          else len(ORDER), r["mode"],
                                          r.get("config", {}).get("k_max") or 0))
    ks = sorted({k for r in rows for k in r if k.startswith("test_kmax")})
    head = ["mode", "test PPL", "test BLEU", "prior entropy"]
    for k in ks:
        head += [f"PPL, K-max {k[9:]}", f"BLEU, K-max {k[9:]}"]
    head += ["valid PPL", "valid BLEU", "epochs", "training time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        t, v = r["test"], r["valid"]
        k_train = r.get("config", {}).get("k_max")
        label = r["mode"] + (f", trained with K-max {k_train}" if k_train else "")
        cells = [label, _fmt(t["ppl"]), _fmt(t["bleu"]), _fmt(t["prior_entropy"])]
        for k in ks:
            kr = r.get(k)
            cells += [_fmt(kr["ppl"]) if kr else "", _fmt(kr["bleu"]) if kr else ""]
        minutes = r["train_seconds"] / 60.0
        cells += [_fmt(v["ppl"]), _fmt(v["bleu"]), str(r["epochs"]), f"{minutes:.0f} min"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


PROG = "python -m examples.translation.report"


def read_results(path: Path) -> dict[str, Any]:
    """One run's ``results.json``.

    :raises ExampleError: if it cannot be parsed or lacks the figures of the table (the message
        names the file).
    """
    try:
        r = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExampleError(f"cannot read {str(path)!r} ({e}); it is damaged: run that training "
                           "again, or leave its folder out") from None
    need = {"mode": (), "test": ("ppl", "bleu", "prior_entropy"), "valid": ("ppl", "bleu"),
            "epochs": (), "train_seconds": ()}
    if not isinstance(r, dict):
        r = {}
    missing = [k for k in need if k not in r or (need[k] and not isinstance(r[k], dict))]
    missing += [f"{k}.{sub}" for k, subs in need.items() if isinstance(r.get(k), dict)
                for sub in subs if sub not in r[k]]
    if missing:
        raise ExampleError(f"{str(path)!r} lacks {', '.join(missing)}: it is not a results.json "
                           "of python -m examples.translation")
    return dict(r)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=plain_text(__doc__.split("\n\n")[0]),
                                formatter_class=HelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run folders (each holding a results.json), or folders of run folders")
    return p


def main(argv: Sequence[str] | None = None) -> str:
    """Print (and return) the table of the runs ``argv`` names.

    :raises ExampleError: if a folder holds no results.json (nor its sub-folders), or one cannot
        be read.
    """
    args = make_parser().parse_args(argv)
    results = []
    for d in args.runs:
        path = Path(d) / "results.json"
        found = [path] if path.is_file() else sorted(Path(d).glob("*/results.json"))
        if not found:
            raise ExampleError(f"no {path} (nor in its sub-folders); is {d!r} a finished run of "
                               "python -m examples.translation?")
        results += [read_results(f) for f in found]
    out = table(results)
    print(out)
    return out


if __name__ == "__main__":
    run_cli(PROG, main)
