"""Where each attention mode looks in real frames: the TGIF-QA demo.

``python -m examples.video_qa.tgif --runs RUN_DIR...`` decodes the four TGIF-QA GIFs of
``$PLATED_DATA/tgif-qa/`` with Pillow, resizes their frames to each model's input size, encodes
them and the questions with the models of the given runs (trained by ``python -m
examples.video_qa``), and draws, per GIF, the frames as thumbnails above each mode's alignment
prior :math:`p(z \\mid x, q)` over them (``tgif_alignments.png``, numbers in ``tgif.json``).

This demonstrates the pipeline on real frames; it is not a benchmark. Models trained on the
generated shapes know none of the TGIF questions' content words (they map to ``<unk>``) and
have never seen natural images, so their alignments say where a shapes-trained prior looks, not
where the answer is. ``--smoke-test`` runs the pipeline with untrained models of every mode.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..common import (
    HelpFormatter,
    device_option,
    plain_text,
    positive_int,
    print_written,
    progress,
    resolve_device,
    run_cli,
    save_figure,
    write_json,
)
from ..data import GifQuestion, add_data_dir_argument, decode_gif, load_tgif_qa
from .data import Batch, Vocab, tokenize
from .model import MODES, ModelConfig, VideoQA
from .train import load_run

__all__ = ["gif_batch", "main", "make_parser"]

PROG = "python -m examples.video_qa.tgif"


def gif_batch(frames: np.ndarray, question: str, vocab: Vocab) -> Batch:
    """A one-question batch of decoded frames ``(T, H, W, 3)`` uint8."""
    t = frames.shape[0]
    words = torch.tensor([vocab.encode(question)])
    return Batch(torch.from_numpy(frames).unsqueeze(0), torch.ones(1, t, dtype=torch.bool),
                 torch.zeros(1, dtype=torch.long), torch.ones(1, t, dtype=torch.bool), words,
                 torch.tensor([words.shape[1]]), torch.zeros(1, dtype=torch.long),
                 torch.zeros(1, t, dtype=torch.bool), [0])


def _untrained(questions: list[GifQuestion], seed: int) -> tuple[dict[str, VideoQA], Vocab]:
    vocab = Vocab([w for q in questions for w in tokenize(q.question)],
                  [q.answer for q in questions])
    models = {}
    for m in MODES:
        torch.manual_seed(seed)
        models[f"{m} (untrained)"] = VideoQA(ModelConfig(len(vocab.words), len(vocab.answers),
                                                         mode=m, dim=32, embed=16)).eval()
    return models, vocab


#: ``--help``'s text: the module docstring after its title, as plain text.
_DESCRIPTION = plain_text((__doc__ or "").split("\n\n", 1)[-1]).replace("\\mid", "|")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=_DESCRIPTION,
                                formatter_class=HelpFormatter)
    add_data_dir_argument(p, "tgif-qa/qa.json and the GIFs it names")
    p.add_argument("--runs", nargs="*", default=[], metavar="RUN_DIR",
                   help="run folders of python -m examples.video_qa (each with best.pt); one "
                        "panel row per run")
    p.add_argument("--out-dir", default="runs/video_qa/tgif", metavar="DIR",
                   help="folder for tgif_alignments.png and tgif.json")
    p.add_argument("--max-frames", type=positive_int, default=32,
                   help="evenly spaced frames kept per GIF")
    p.add_argument("--device", default="cpu", type=device_option,
                   help="torch device: 'auto' (CUDA when available, else CPU), 'cpu', 'cuda', "
                        "'cuda:1', ...")
    p.add_argument("--seed", type=int, default=0, help="seed of the untrained smoke-test models")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--smoke-test", action="store_true",
                   help="use untrained models of every mode (no --runs needed)")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m examples.video_qa.tgif``: draw and return the alignments (``tgif.json``)."""
    p = make_parser()
    args = p.parse_args(argv)
    if not args.runs and not args.smoke_test:
        p.error("give --runs RUN_DIR... (trained by python -m examples.video_qa), or "
                "--smoke-test for untrained models")
    device = resolve_device(args.device)
    questions = load_tgif_qa(args.data_dir)
    if args.runs:
        models, vocabs = {}, {}
        for run in args.runs:
            model, vocab, res = load_run(run, device)
            if model.config.feature_dim is not None:
                raise ValueError(f"the run {run!r} was trained on precomputed features; the GIF "
                                 "demo needs a model trained on pixels")
            name = res.get("mode", Path(run).name)
            models[name], vocabs[name] = model, vocab
    else:
        models, vocab = _untrained(questions, args.seed)
        models = {name: m.to(device) for name, m in models.items()}
        vocabs = dict.fromkeys(models, vocab)
    out_dir = Path(args.out_dir)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 1 + len(models)
    fig, axes = plt.subplots(len(questions) * rows, 1, squeeze=False,
                             figsize=(12, 1.0 * len(questions) * rows + 0.5))
    report: dict[str, Any] = {"questions": []}
    bar = progress(questions, desc="GIFs", disable=args.no_progress)
    for i, q in enumerate(bar):
        thumbs = decode_gif(q.gif, size=48, max_frames=args.max_frames)
        t = thumbs.shape[0]
        ax = axes[i * rows, 0]
        ax.imshow(np.concatenate(list(thumbs), 1), extent=(-0.5, t - 0.5, 0, 1), aspect="auto")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{q.gif.name} ({q.type}): {q.question}  answer: {q.answer}", fontsize=9)
        entry: dict[str, Any] = {"gif": q.gif.name, "question": q.question, "answer": q.answer,
                                 "frames": t, "modes": {}}
        for j, (name, model) in enumerate(models.items()):
            frames = decode_gif(q.gif, size=model.config.image_size, max_frames=args.max_frames)
            vocab = vocabs[name]
            known = [w for w in tokenize(q.question) if w in vocab.word_index]
            with torch.no_grad():
                r = model.analyse(gif_batch(frames, q.question, vocab).to(device))
            prior = r["prior"][0].float().cpu().numpy()
            a = axes[i * rows + 1 + j, 0]
            a.bar(range(t), prior, color="tab:blue", width=0.8)
            a.set_xlim(-0.5, t - 0.5)
            a.set_ylim(0, max(float(prior.max()) * 1.15, 1e-3))
            a.set_ylabel(name, fontsize=8, rotation=0, ha="right", va="center")
            a.tick_params(labelsize=7)
            a.text(t - 0.6, a.get_ylim()[1] * 0.95,
                   f"known words: {' '.join(known) or 'none'}", ha="right", va="top",
                   fontsize=7)
            entry["modes"][name] = {"prior": [round(float(x), 5) for x in prior],
                                    "argmax_frame": int(prior.argmax()), "known_words": known}
        report["questions"].append(entry)
    fig.tight_layout()
    bar.close()
    figure = save_figure(fig, out_dir / "tgif_alignments.png")
    numbers = write_json(report, out_dir / "tgif.json")
    for e in report["questions"]:
        looks = ", ".join(f"{m}: frame {v['argmax_frame']}" for m, v in e["modes"].items())
        print(f"{e['gif']} ({e['frames']} frames) {e['question']!r}: {looks}")
    print_written(PROG, {"results": numbers, "figures": [figure]})
    return report


if __name__ == "__main__":
    run_cli(PROG, main)
