"""Speed and memory of the needle task (``python -m examples.video_qa.speed --help``).

Two measurements, on the machine it runs on:

* **Inference on one long video.** For each trained ``--task needle`` run given (and each mode
  of ``--fresh``, on a fresh model of the size of ``--feature-size``, ``--dim`` and
  ``--embed``), a fresh process (so that no earlier allocation is reused) loads the best
  model, draws one video of
  ``--frames`` frames (default 100,000) with its needle at half depth, and answers one question
  about it with :func:`examples.video_qa.chunked.analyse_long` under the cap ``--chunk-mb``.
  *Peak memory* is the growth of the process's peak resident set (Linux ``VmHWM``, reset
  through ``/proc/self/clear_refs`` just before the call) over its resident set before it,
  i.e. everything the call allocated, the precomputed features excluded (they exist before).
  The first call is measured for memory; the time is the median of ``--repeats`` calls after it.
* **A training step** (``--step-modes``): one optimizer step on a batch of ``--batch-size``
  questions, each about its own video of ``--step-frames`` frames (default 64), for models of
  the needle task's size built afresh per mode; the modes take their steps in turn (so that a
  changing load on a shared machine hits them alike), and each mode's median step time is
  reported with its ratio to soft attention's.

Writes the figures as JSON to ``--out`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import re
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..common import (
    ExampleError,
    HelpFormatter,
    plain_text,
    positive_float,
    positive_int,
    print_written,
    progress,
    run_cli,
    write_json,
)

__all__ = ["inference", "main", "make_parser", "training_steps"]

PROG = "python -m examples.video_qa.speed"


def _memory_kib() -> tuple[int, int]:
    """``(peak, current)`` resident set of this process in KiB (Linux ``/proc/self/status``)."""
    status = Path("/proc/self/status").read_text()
    peak = re.search(r"VmHWM:\s+(\d+)", status)
    now = re.search(r"VmRSS:\s+(\d+)", status)
    if peak is None or now is None:
        raise ExampleError("/proc/self/status has no VmHWM / VmRSS: peak memory is measured on "
                           "Linux only")
    return int(peak.group(1)), int(now.group(1))


def _fresh(mode: str, feature_size: int, dim: int, embed: int) -> tuple[Any, Any, int]:
    """A fresh (untrained) needle-task model of ``mode``, its vocabulary and its data seed."""
    from .data import Vocab
    from .model import ModelConfig, VideoQA
    from .needle import CODES, generate_needle

    data = generate_needle(64, 16, 16, 0, dim=feature_size)
    vocab = Vocab.build(data.questions)
    torch.manual_seed(0)
    model = VideoQA(ModelConfig(len(vocab.words), len(CODES) + 1, mode, feature_size, dim=dim,
                                embed=embed, window=1))
    model.eval()
    return model, vocab, 0


def inference(run: str, frames: int, repeats: int, chunk_mb: float, threads: int,
              seed: int = 0, fresh: tuple[int, int, int] | None = None) -> dict[str, Any]:
    """The inference figures of one run (module docstring); call it in a fresh process. With
    ``fresh`` ``(feature_size, dim, embed)``, ``run`` is a mode instead, timed on a fresh model
    of that size (the time does not depend on the weights)."""
    from .chunked import analyse_long, bytes_per_frame, chunk_frames
    from .needle import CODES, make_world, needle_position, needle_question, needle_video
    from .train import load_run

    torch.set_num_threads(threads)
    if fresh is not None:
        model, vocab, data_seed = _fresh(run, *fresh)
    else:
        model, vocab, results = load_run(run)
        if results.get("task") != "needle":
            raise ExampleError(f"{run!r} is not a run of --task needle")
        data_seed = results.get("data_args", {})["data_seed"]
    world = make_world(data_seed, int(model.config.feature_dim or 0))
    rng = np.random.Generator(np.random.PCG64(seed))
    key, code = 3, 7
    x, _ = needle_video(world, rng, frames, needle_position(frames, 0.5), key, code)
    video = torch.from_numpy(x)
    features_mib = video.numel() * video.element_size() / 2 ** 20
    words = torch.tensor([vocab.encode(needle_question(key))])
    lengths = torch.tensor([words.shape[1]])
    answer = torch.tensor([vocab.answer_index[CODES[code]]])
    cap = int(chunk_mb * 2 ** 20)
    # memory: the first call, from a reset peak
    Path("/proc/self/clear_refs").write_text("5")
    _, before = _memory_kib()
    began = time.perf_counter()
    out = analyse_long(model, video, words, lengths, answer, cap)
    first = time.perf_counter() - began
    peak, _ = _memory_kib()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        analyse_long(model, video, words, lengths, answer, cap)
        times.append(time.perf_counter() - began)
    return {"run": run, "mode": model.config.mode, "frames": frames, "threads": threads,
            "features_mib": features_mib, "chunk_frames": chunk_frames(model, 1, cap),
            "chunks": out.chunks, "cap_mib": chunk_mb,
            "chunk_bytes_counted_mib": out.chunk * bytes_per_frame(model, 1) / 2 ** 20,
            "peak_growth_mib": (peak - before) / 1024, "first_seconds": first,
            "median_seconds": statistics.median(times), "times": times,
            "correct": int(out.log_pred.argmax(-1)) == int(answer),
            "found": int(out.prior_map) == needle_position(frames, 0.5)}


def training_steps(modes: Sequence[str], steps: int, frames: int, batch_size: int,
                   feature_size: int, dim: int, embed: int, threads: int,
                   show_progress: bool = True) -> dict[str, Any]:
    """Median training-step times of fresh needle-task models, the modes in turn."""
    from .data import Vocab, collate
    from .model import ModelConfig, VideoQA
    from .needle import CODES, generate_needle

    torch.set_num_threads(threads)
    data = generate_needle(batch_size, frames, frames, 0, dim=feature_size)
    vocab = Vocab.build(data.questions)
    batch = collate(data, data.questions, vocab, list(range(batch_size)))
    models, optims = {}, {}
    for mode in modes:
        torch.manual_seed(0)
        models[mode] = VideoQA(ModelConfig(len(vocab.words), len(CODES) + 1, mode, feature_size,
                                           dim=dim, embed=embed, window=1))
        optims[mode] = torch.optim.Adam(models[mode].parameters(), lr=1e-3)
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in progress(range(steps + 2), desc="training steps", disable=not show_progress):
        for mode in modes:
            model, optim = models[mode], optims[mode]
            model.train()
            began = time.perf_counter()
            optim.zero_grad(set_to_none=True)
            loss, _ = model(batch)
            (loss / batch_size).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optim.step()
            times[mode].append(time.perf_counter() - began)
    medians = {m: 1000 * statistics.median(t[2:]) for m, t in times.items()}
    soft = medians.get("soft")
    return {"frames": frames, "batch_size": batch_size, "steps": steps, "threads": threads,
            "median_ms": medians,
            "ratio_to_soft": {m: v / soft for m, v in medians.items()} if soft else {}}


def make_parser() -> argparse.ArgumentParser:
    doc = (__doc__ or "").split("\n\n", 1)[-1]
    p = argparse.ArgumentParser(prog=PROG, description=plain_text(doc),
                                formatter_class=HelpFormatter)
    p.add_argument("runs", nargs="*", metavar="RUN_DIR",
                   help="runs of python -m examples.video_qa --task needle to time on one long "
                        "video")
    p.add_argument("--fresh", default="", metavar="MODE,MODE,...",
                   help="also time inference of fresh (untrained) models of these modes, of "
                        "the size given by --feature-size, --dim and --embed")
    p.add_argument("--out", required=True, metavar="FILE", help="write the figures (JSON) here")
    p.add_argument("--frames", type=positive_int, default=100000,
                   help="frames of the long video")
    p.add_argument("--repeats", type=positive_int, default=5,
                   help="timed inference calls after the first")
    p.add_argument("--chunk-mb", type=positive_float, default=64.0,
                   help="memory cap of one chunk of frames, in MiB")
    p.add_argument("--threads", type=positive_int, default=1, help="CPU threads for torch")
    p.add_argument("--step-modes", default="", metavar="MODE,MODE,...",
                   help="modes whose training steps to time (empty: none)")
    p.add_argument("--steps", type=positive_int, default=30,
                   help="timed training steps per mode")
    p.add_argument("--step-frames", type=positive_int, default=64,
                   help="frames per video of a training batch")
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="questions per training batch")
    p.add_argument("--feature-size", type=positive_int, default=256,
                   help="features per frame of the training batch")
    p.add_argument("--dim", type=positive_int, default=64,
                   help="model size of the timed training steps")
    p.add_argument("--embed", type=positive_int, default=32,
                   help="embedding size of the timed training steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m examples.video_qa.speed``: measure, print a table and write the JSON."""
    args = make_parser().parse_args(argv)
    out: dict[str, Any] = {"torch": torch.__version__, "inference": [], "training": None}
    spawn = multiprocessing.get_context("spawn")
    fresh = (args.feature_size, args.dim, args.embed)
    jobs = [(run, None) for run in args.runs] + [(m, fresh) for m in args.fresh.split(",") if m]
    for run, size in jobs:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
            r = pool.submit(inference, run, args.frames, args.repeats, args.chunk_mb,
                            args.threads, 0, size).result()
        r["fresh"] = size is not None
        out["inference"].append(r)
        print(f"| {r['mode']} | {r['frames']:,} | {r['median_seconds']:.3f} s "
              f"(first {r['first_seconds']:.3f} s) | {r['peak_growth_mib']:.0f} MiB | "
              f"{r['chunks']} chunks of {r['chunk_frames']:,} | {r['correct']} |", flush=True)
    modes = [m for m in args.step_modes.split(",") if m]
    if modes:
        t = training_steps(modes, args.steps, args.step_frames, args.batch_size,
                           args.feature_size, args.dim, args.embed, args.threads,
                           not args.no_progress)
        out["training"] = t
        for m in modes:
            ratio = t["ratio_to_soft"].get(m)
            print(f"| {m} | {t['median_ms'][m]:.1f} ms | "
                  f"{'' if ratio is None else f'{ratio:.2f}'} |", flush=True)
    write_json(out, args.out)
    print_written(PROG, {"figures": [Path(args.out)]})
    return out


if __name__ == "__main__":
    run_cli(PROG, main)
