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

__all__ = ["main", "table"]

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


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python -m examples.translation.report",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+",
                   help="run folders (each holding a results.json), or folders of run folders")
    args = p.parse_args(argv)
    results = []
    for d in args.runs:
        path = Path(d) / "results.json"
        found = [path] if path.is_file() else sorted(Path(d).glob("*/results.json"))
        if not found:
            raise SystemExit(f"examples.translation.report: error: no {path} (nor in its "
                             f"sub-folders); is {d!r} a finished run of python -m "
                             "examples.translation?")
        results += [json.loads(f.read_text()) for f in found]
    out = table(results)
    print(out)
    return out


if __name__ == "__main__":
    main()
