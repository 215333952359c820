"""The results table and the alignment figure of several video-QA runs.

``python -m examples.video_qa.report RUN_DIR... [--table FILE] [--figure FILE]`` reads each run's
``results.json`` (and ``best.pt`` for the figure), prints a Markdown table with a row per run
(answer accuracy, NLL, grounding accuracies, training time) and draws the alignments of every
run on the same test questions, one of each question type, against their evidence frames.
For runs of ``--task needle`` it also prints each run's needle-recall grid (video length by
needle depth) and, with ``--recall-figure FILE``, draws them side by side, one panel per run.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..common import (
    ExampleError,
    HelpFormatter,
    atomic_write_text,
    device_option,
    plain_text,
    positive_int,
    print_written,
    resolve_device,
    run_cli,
)
from .data import VideoQAData, load_features, load_or_generate
from .needle import recall_figure, recall_table
from .train import alignment_figure, load_run

__all__ = ["figure", "main", "make_parser", "read_results", "table", "type_table"]

PROG = "python -m examples.video_qa.report"


def _runs(paths: list[str]) -> list[Path]:
    """Run folders: each path is a run (has results.json) or a folder of runs."""
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / "results.json").is_file():
            out.append(p)
        elif p.is_dir():
            out += sorted(q.parent for q in p.glob("*/results.json"))
        else:
            raise ExampleError(f"{str(p)!r} is neither a run folder (with results.json) nor a "
                               "folder of runs: give the --out-dir of python -m "
                               "examples.video_qa, or its parent")
    if not out:
        raise ExampleError(f"no results.json in {', '.join(map(repr, paths))} or its sub-folders: "
                           "give the --out-dir of finished runs of python -m examples.video_qa")
    return out


def read_results(run: Path, split: str) -> dict[str, Any]:
    """``RUN/results.json``, checked to be a finished run's results with the ``split``.

    :raises ExampleError: naming the file if it is not JSON or not such results.
    """
    path = run / "results.json"
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExampleError(f"{str(path)!r} is not JSON ({e}); run the training again") from e
    need = ("mode", "epochs", "train_seconds", split)
    if not isinstance(results, dict) or not all(k in results for k in need) or not all(
            k in results[split] for k in ("accuracy", "nll", "accuracy_by_type")):
        raise ExampleError(f"{str(path)!r} is not a results file of python -m examples.video_qa "
                           f"(it needs {', '.join(need)}, and the {split} accuracies)")
    return dict(results)


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def table(results: list[dict[str, Any]], split: str = "test") -> str:
    """A Markdown table, one row per run."""
    lines = ["| mode | answer accuracy (%) | NLL | grounding: prior argmax (%) | exact posterior "
             "argmax (%) | q argmax (%) | posterior segment (%) | within 1 frame: prior / "
             "posterior / q (%) | epochs | training |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        t = r[split]
        near = " / ".join(_pct(t.get(f"near_{k}")) or "–" for k in ("prior", "posterior", "q"))
        lines.append(
            f"| {r['mode']} | {_pct(t['accuracy'])} | {t['nll']:.3f} | "
            f"{_pct(t.get('ground_prior'))} | {_pct(t.get('ground_posterior'))} | "
            f"{_pct(t.get('ground_q'))} | {_pct(t.get('ground_segment'))} | {near} | "
            f"{r['epochs']} | {r['train_seconds'] / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def _ground(g: dict[str, float]) -> str:
    """The prior argmax's grounding, then q's or the exact posterior's where there is one."""
    other = "q" if "q" in g else "posterior" if "posterior" in g else None
    return _pct(g.get("prior")) + (f" / {_pct(g[other])}" if other else "")


def type_table(results: list[dict[str, Any]], split: str = "test") -> str:
    """A Markdown table by question type, one row per run: answer accuracy, then the grounding
    of the prior's argmax (and of q's, or the exact posterior's, where there is one)."""
    types = sorted({t for r in results for t in r[split]["accuracy_by_type"]})
    names = [t.replace("_", " ") for t in types]
    lines = ["| mode | " + " | ".join(f"accuracy: {n}" for n in names) + " | "
             + " | ".join(f"grounding: {n}" for n in names) + " | "
             + " | ".join(f"prior within 1 frame: {n}" for n in names) + " |",
             "|---|" + "---|" * (3 * len(types))]
    for r in results:
        acc = r[split]["accuracy_by_type"]
        gr = r[split].get("grounding_by_type", {})
        lines.append(f"| {r['mode']} | " + " | ".join(_pct(acc.get(t)) for t in types) + " | "
                     + " | ".join(_ground(gr.get(t, {})) for t in types) + " | "
                     + " | ".join(_pct(gr.get(t, {}).get("near_prior")) for t in types) + " |")
    return "\n".join(lines) + "\n"


def _data(results: dict[str, Any], cache_dir: str | None) -> VideoQAData:
    a = results["data_args"]
    if a["features"]:
        return load_features(a["features"])
    return load_or_generate(cache_dir, a["videos"], a["frames"], a["size"],
                            a["questions_per_video"], a["data_seed"],
                            variant=a.get("variant", "default"))


def figure(runs: list[Path], path: Path, cache_dir: str | None, device: torch.device,
           per_type: int = 1) -> None:
    """The alignments of every run on the same test questions (``per_type`` of each type)."""
    models, vocab, first = {}, None, None
    for run in runs:
        model, v, res = load_run(run, device)
        if first is None:
            first, vocab = res, v
        elif res.get("data_args") != first.get("data_args") or (
                vocab is not None and v.as_dict() != vocab.as_dict()):
            raise ValueError(f"{str(run)!r} was trained on other data than {str(runs[0])!r}; "
                             "a figure compares runs on the same questions")
        models[res.get("mode", run.name)] = model
    if first is None or vocab is None:
        raise ExampleError("no runs to draw")
    data = _data(first, cache_dir)
    chosen: list = []
    seen: dict[str, int] = {}
    for q in data.split("test"):
        if seen.get(q.type, 0) < per_type:
            seen[q.type] = seen.get(q.type, 0) + 1
            chosen.append(q)
    alignment_figure(models, data, chosen, vocab, device, path)


def make_parser() -> argparse.ArgumentParser:
    doc = (__doc__ or "").split("\n\n", 1)[-1]
    p = argparse.ArgumentParser(prog=PROG, description=plain_text(doc),
                                formatter_class=HelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run folders (the --out-dir of python -m examples.video_qa), or folders "
                        "of run folders")
    p.add_argument("--table", default=None, metavar="FILE",
                   help="also write the table to this file")
    p.add_argument("--figure", default=None, metavar="FILE",
                   help="write the alignment figure to this PNG")
    p.add_argument("--recall-figure", default=None, metavar="FILE",
                   help="write the needle-recall grids of the --task needle runs to this PNG")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="the generated-data cache of the runs (their --cache-dir; default: "
                        "generate the data again)")
    p.add_argument("--per-type", type=positive_int, default=1,
                   help="test questions of each question type in the figure")
    p.add_argument("--device", default="cpu", type=device_option,
                   help="torch device of the figure's models: 'auto', 'cpu', 'cuda', ...")
    p.add_argument("--split", default="test", choices=("valid", "test"),
                   help="the split whose results the tables show")
    return p


def main(argv: Sequence[str] | None = None) -> str:
    """``python -m examples.video_qa.report``: print (and write) the tables, draw the figure;
    returns the tables' text."""
    args = make_parser().parse_args(argv)
    runs = _runs(args.runs)
    results = [read_results(r, args.split) for r in runs]
    text = table(results, args.split) + "\n" + type_table(results, args.split)
    grids = {r["mode"]: r["recall_grid"] for r in results if "recall_grid" in r}
    if grids:
        text += "\n" + recall_table(grids) + "\n" + recall_table(grids, "found")
    print(text, end="")
    written: dict[str, Any] = {"table": [], "figures": []}
    if args.recall_figure:
        if not grids:
            raise ExampleError("--recall-figure: none of the runs is of --task needle (their "
                               "results.json have no recall_grid)")
        written["figures"].append(recall_figure(grids, Path(args.recall_figure)))
    if args.table:
        written["table"].append(atomic_write_text(text, args.table))
    if args.figure:
        figure(runs, Path(args.figure), args.cache_dir, resolve_device(args.device),
               args.per_type)
        written["figures"].append(Path(args.figure))
    if args.table or args.figure or args.recall_figure:
        print_written(PROG, written)
    return text


if __name__ == "__main__":
    run_cli(PROG, main)
