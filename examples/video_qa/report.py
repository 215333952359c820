"""The results table and the alignment figure of several video-QA runs.

``python -m examples.video_qa.report RUN_DIR... [--table FILE] [--figure FILE]`` reads each run's
``results.json`` (and ``best.pt`` for the figure), prints a Markdown table with a row per run
(answer accuracy, NLL, grounding accuracies, training time) and draws the alignments of every
run on the same test questions, one of each question type, against their evidence frames.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from ..common import atomic_write_text, resolve_device
from .data import VideoQAData, load_features, load_or_generate
from .train import alignment_figure, load_run

__all__ = ["figure", "main", "table", "type_table"]


def _runs(paths: list[str]) -> list[Path]:
    """Run folders: each path is a run (has results.json) or a folder of runs."""
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / "results.json").is_file():
            out.append(p)
        elif p.is_dir():
            out += sorted(q.parent for q in p.glob("*/results.json"))
        else:
            raise ValueError(f"{str(p)!r} is neither a run folder (with results.json) nor a "
                             "folder of runs")
    if not out:
        raise ValueError(f"no results.json in {paths}")
    return out


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
                            a["questions_per_video"], a["data_seed"])


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
    assert first is not None and vocab is not None
    data = _data(first, cache_dir)
    chosen: list = []
    seen: dict[str, int] = {}
    for q in data.split("test"):
        if seen.get(q.type, 0) < per_type:
            seen[q.type] = seen.get(q.type, 0) + 1
            chosen.append(q)
    alignment_figure(models, data, chosen, vocab, device, path)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python -m examples.video_qa.report",
                                description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("runs", nargs="+", help="run folders, or folders of run folders")
    p.add_argument("--table", default=None, help="also write the table to this file")
    p.add_argument("--figure", default=None, help="write the alignment figure to this PNG")
    p.add_argument("--cache-dir", default=None, help="the generated-data cache of the runs")
    p.add_argument("--device", default="cpu")
    p.add_argument("--split", default="test", choices=("valid", "test"))
    args = p.parse_args(argv)
    runs = _runs(args.runs)
    results = [json.loads((r / "results.json").read_text()) for r in runs]
    text = table(results, args.split) + "\n" + type_table(results, args.split)
    print(text, end="")
    if args.table:
        atomic_write_text(text, args.table)
    if args.figure:
        figure(runs, Path(args.figure), args.cache_dir, resolve_device(args.device))
    return text


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"examples.video_qa.report: error: {e}") from e
