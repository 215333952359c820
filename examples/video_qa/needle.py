r"""A needle in a haystack of up to 100,000 frames: the ``--task needle`` of
``python -m examples.video_qa``.

**The generator** (version :data:`NEEDLE_VERSION`, seeded). A *world* (:func:`make_world`,
drawn from the data seed) fixes, in ``dim`` (default 256) dimensions, unit vectors for
``components`` haystack means, for the :data:`KEYS` and for the :data:`CODES`. A video of ``T``
frames (:func:`needle_video`) is

* a **haystack**: frame :math:`t` is :math:`\mu_{c_t} + \epsilon_t`, with :math:`c_t` a uniform
  mixture component and :math:`\epsilon_t \sim N(0, \sigma^2 I / \mathrm{dim})` (default
  :math:`\sigma = 0.5`), i.e. a random mixture of Gaussians;
* the **needle**: ``span`` consecutive frames (default 1) at a controlled depth, each a haystack
  frame plus ``strength`` (default 1) times the sum of the vector of a key :math:`k` and the
  vector of a code :math:`a` (one of 16);
* ``distractors`` other needles (default 3) with other keys and random codes, elsewhere.

The question names the needle by its content: "what code does the KEY needle hold?"; the answer
is its code, readable only at the needle's frames, and the evidence is the needle's span. A
model must therefore search all frames for the key it is asked about. At depth :math:`d \in [0,
1]` the needle starts at frame :math:`\mathrm{round}(d\,(T - \mathrm{span}))`.

**Train short, test long.** Training videos have uniformly drawn lengths of ``--min-frames`` to
``--frames`` (default 16 to 64) and depths; the model, trainer and checkpoints are those of the
grounded task (:mod:`examples.video_qa.train`). After training, :func:`recall_grid` answers
``--eval-questions`` fresh questions per cell of the grid of video lengths (``--eval-lengths``,
default 16 to 100,000 frames) by needle depths (``--eval-depths``, 0 to 100 %), each with
:func:`examples.video_qa.chunked.analyse_long` under the memory cap ``--chunk-mb``: recall is
the fraction answered correctly, "found" the fraction whose prior argmax is a needle frame.
:func:`recall_figure` draws the grid (one panel per mode), :func:`recall_table` prints it.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..common import log_main, progress, save_figure
from .chunked import analyse_long
from .data import Question, VideoQAData, Vocab
from .model import VideoQA

__all__ = ["CODES", "KEYS", "NEEDLE_VERSION", "EVAL_DEPTHS", "EVAL_LENGTHS", "NeedleWorld",
           "generate_needle", "make_world", "needle_position", "needle_question", "needle_video",
           "recall_figure", "recall_grid", "recall_table"]

#: Bumped whenever the generated needle data change.
NEEDLE_VERSION = 1
#: The needles' keys: what a question names.
KEYS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")
#: The codes a needle carries: the answers.
CODES = tuple(f"code{i:02d}" for i in range(16))
#: The default evaluation grid.
EVAL_LENGTHS = (16, 64, 256, 1024, 4096, 16384, 65536, 100000)
EVAL_DEPTHS = tuple(i / 10 for i in range(11))


@dataclass(frozen=True)
class NeedleWorld:
    """The fixed vectors of a needle data set (:func:`make_world`).

    :ivar means: ``(components, dim)`` the haystack's mixture means (unit vectors).
    :ivar keys: ``(len(KEYS), dim)`` the keys' vectors. :ivar codes: ``(len(CODES), dim)``.
    :ivar noise: :math:`\\sigma`, the norm scale of each frame's Gaussian noise.
    :ivar seed: the seed it was drawn from.
    """

    means: np.ndarray
    keys: np.ndarray
    codes: np.ndarray
    noise: float
    seed: int

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_world(seed: int, dim: int = 256, components: int = 32, noise: float = 0.5
               ) -> NeedleWorld:
    """The world of data seed ``seed`` (module docstring).

    :raises ValueError: on ``dim < 8``, ``components < 1`` or a negative ``noise``.
    """
    if dim < 8 or components < 1 or noise < 0:
        raise ValueError(f"need dim >= 8, components >= 1 and noise >= 0; got dim={dim}, "
                         f"components={components}, noise={noise}")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, NEEDLE_VERSION, 1])))
    return NeedleWorld(_unit(rng, components, dim), _unit(rng, len(KEYS), dim),
                       _unit(rng, len(CODES), dim), float(noise), seed)


def needle_position(frames: int, depth: float, span: int = 1) -> int:
    """The first frame of a needle of ``span`` frames at ``depth`` (0 to 1) of a video of
    ``frames`` frames."""
    if not 0.0 <= depth <= 1.0 or span < 1 or frames < span:
        raise ValueError(f"need 0 <= depth <= 1 and 1 <= span <= frames; got depth={depth}, "
                         f"span={span}, frames={frames}")
    return int(round(depth * (frames - span)))


def needle_question(key: int) -> str:
    """The question that names the needle of key ``key``."""
    return f"what code does the {KEYS[key]} needle hold?"


def needle_video(world: NeedleWorld, rng: np.random.Generator, frames: int, start: int,
                 key: int, code: int, span: int = 1, distractors: int = 3,
                 strength: float = 1.0) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """One video: ``(features (frames, dim) float32, needles)``, where ``needles`` lists
    ``(key, code, first frame)`` of every needle, the asked one (``key``, ``code`` at
    ``start``) first. Distractors take other keys and places that overlap no other needle
    (fewer of them when the video has no room). A needle frame adds ``strength`` times the
    key's and the code's vectors to its haystack frame.

    :raises ValueError: if the needle does not fit in the video.
    """
    if not 0 <= start <= frames - span:
        raise ValueError(f"a needle of {span} frame(s) at frame {start} does not fit in "
                         f"{frames} frames")
    dim = world.dim
    x = rng.standard_normal((frames, dim), dtype=np.float32)
    x *= np.float32(world.noise / math.sqrt(dim))
    x += world.means[rng.integers(0, len(world.means), size=frames)]
    taken = np.zeros(frames, dtype=bool)
    taken[start:start + span] = True
    needles = [(key, code, start)]
    others = [int(k) for k in rng.permutation(len(KEYS)) if k != key][:distractors]
    for k in others:
        # free places for a span: every frame of it and one frame either side untaken
        free = np.flatnonzero(~np.convolve(taken, np.ones(span + 2), "valid").astype(bool)) \
            if frames >= span + 2 else np.array([], dtype=np.int64)
        if len(free) == 0:
            break
        s = int(free[rng.integers(0, len(free))]) + 1
        needles.append((k, int(rng.integers(0, len(CODES))), s))
        taken[s:s + span] = True
    for k, c, s in needles:
        x[s:s + span] += np.float32(strength) * (world.keys[k] + world.codes[c])
    return x, needles


def generate_needle(num_videos: int, min_frames: int = 16, max_frames: int = 64, seed: int = 0,
                    span: int = 1, distractors: int = 3, dim: int = 256,
                    components: int = 32, noise: float = 0.5,
                    split_fractions: tuple[float, float] = (0.8, 0.1),
                    strength: float = 1.0) -> VideoQAData:
    """A training set of needle videos of ``min_frames`` to ``max_frames`` frames (uniform
    lengths and depths, one question each), split by video into train, validation and test.
    The same arguments give the same data; the world is :func:`make_world` of ``seed``.
    ``objects`` holds every video's needles (``key``, ``code``, ``start``, ``span``), the
    asked one first."""
    if not span <= min_frames <= max_frames or num_videos < 1:
        raise ValueError(f"need span <= min_frames <= max_frames and num_videos >= 1; got "
                         f"span={span}, min_frames={min_frames}, max_frames={max_frames}, "
                         f"num_videos={num_videos}")
    world = make_world(seed, dim, components, noise)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, NEEDLE_VERSION, 0])))
    videos = torch.zeros(num_videos, max_frames, dim)
    lengths = torch.zeros(num_videos, dtype=torch.long)
    questions: list[Question] = []
    objects: list[list[dict[str, Any]]] = []
    n_train = round(split_fractions[0] * num_videos)
    n_val = round(split_fractions[1] * num_videos)
    for v in range(num_videos):
        t = int(rng.integers(min_frames, max_frames + 1))
        start = int(rng.integers(0, t - span + 1))
        key, code = int(rng.integers(0, len(KEYS))), int(rng.integers(0, len(CODES)))
        x, needles = needle_video(world, rng, t, start, key, code, span, distractors, strength)
        objects.append([{"key": k, "code": c, "start": s, "span": span} for k, c, s in needles])
        videos[v, :t] = torch.from_numpy(x)
        lengths[v] = t
        split = "train" if v < n_train else "val" if v < n_train + n_val else "test"
        questions.append(Question(v, needle_question(key), CODES[code], "needle",
                                  tuple(range(start, start + span)), split))
    source = (f"needle (version {NEEDLE_VERSION}, seed {seed}, {min_frames}-{max_frames} frames, "
              f"span {span}, {distractors} distractors, dim {dim}"
              + (f", strength {strength}" if strength != 1.0 else "") + ")")
    return VideoQAData(videos, lengths, questions, source, objects)


# -- the recall grid ------------------------------------------------------------------------------


def _cell_rng(seed: int, frames: int, depth_index: int, i: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(
        [seed, NEEDLE_VERSION, 2, frames, depth_index, i])))


def recall_grid(model: VideoQA, vocab: Vocab, world: NeedleWorld, lengths: Sequence[int],
                depths: Sequence[float], per_cell: int, span: int = 1, distractors: int = 3,
                max_bytes: int = 64 * 2 ** 20, device: torch.device | str = "cpu",
                show_progress: bool = True, rank: int = 0, processes: int = 1,
                strength: float = 1.0) -> dict[str, Any]:
    """Needle recall of ``model`` on fresh videos: ``per_cell`` questions per (length, depth),
    each about its own video (drawn from the world and the cell), answered by
    :func:`~examples.video_qa.chunked.analyse_long` under the cap ``max_bytes``. Under
    ``torchrun`` (``processes > 1``, a process group joined) process ``rank`` takes every
    ``processes``-th cell and every process returns the whole grid (a collective call); the
    cells' videos depend on the cell only, so the grid is the same for any number of processes.

    :return: ``{"lengths", "depths", "per_cell", "recall": [[...] per depth] per length,
        "found": likewise (prior argmax on the needle), "needle_mass": likewise, the median
        prior probability of the needle's frames (full prior, before K-max's truncation;
        ``None`` for two-level), "seconds": per length, the mean inference time of one question
        (features excluded)}``.
    """
    model.eval()
    dtype = next(model.parameters()).dtype
    recall = [[0.0] * len(depths) for _ in lengths]
    found = [[0.0] * len(depths) for _ in lengths]
    mass: list[list[float | None]] = [[None] * len(depths) for _ in lengths]
    seconds = [0.0] * len(lengths)
    cells = [(li, di) for li in range(len(lengths)) for di in range(len(depths))]
    bar = progress(cells[rank::processes], desc="recall grid",
                   disable=not show_progress or rank != 0)
    for li, di in bar:
        frames, depth = int(lengths[li]), float(depths[di])
        start = needle_position(frames, depth, span)
        hits = finds = 0
        masses: list[float] = []
        for i in range(per_cell):
            rng = _cell_rng(world.seed, frames, di, i)
            key, code = int(rng.integers(0, len(KEYS))), int(rng.integers(0, len(CODES)))
            x, _ = needle_video(world, rng, frames, start, key, code, span, distractors,
                                strength)
            video = torch.from_numpy(x).to(device=device, dtype=dtype)
            words = torch.tensor([vocab.encode(needle_question(key))], device=device)
            answer = torch.tensor([vocab.answer_index.get(CODES[code], 0)], device=device)
            began = time.perf_counter()
            out = analyse_long(model, video, words, torch.tensor([words.shape[1]]), answer,
                               max_bytes)
            hit = int(out.log_pred.argmax(-1)) == int(answer)
            seconds[li] += time.perf_counter() - began
            hits += hit
            finds += start <= int(out.prior_map) < start + span
            if out.log_norm is not None:
                with torch.no_grad():
                    needle = model.frames.encode_span(video, start, start + span)
                    score = model.attention.score(model.encode_question(
                        words, torch.tensor([words.shape[1]])).unsqueeze(1), needle[None])
                masses.append(float((score.logsumexp(-1) - out.log_norm).exp().reshape(())))
        recall[li][di], found[li][di] = hits / per_cell, finds / per_cell
        if masses:
            mass[li][di] = float(np.median(masses))
        bar.set_postfix(frames=frames, depth=depth, recall=f"{recall[li][di]:.2f}")
    bar.close()
    if processes > 1:  # every cell from the process that measured it
        import torch.distributed as dist

        mine = {cell: (recall[cell[0]][cell[1]], found[cell[0]][cell[1]],
                       mass[cell[0]][cell[1]]) for cell in cells[rank::processes]}
        gathered: list[Any] = [None] * processes
        dist.all_gather_object(gathered, (mine, seconds))
        seconds = [sum(s[li] for _, s in gathered) for li in range(len(lengths))]
        for part, _ in gathered:
            for (li, di), (r, f, m) in part.items():
                recall[li][di], found[li][di], mass[li][di] = r, f, m
    return {"lengths": [int(t) for t in lengths], "depths": [float(d) for d in depths],
            "per_cell": per_cell, "recall": recall, "found": found, "needle_mass": mass,
            "seconds": [s / (per_cell * len(depths)) for s in seconds]}


def recall_table(grids: dict[str, dict[str, Any]], key: str = "recall") -> str:
    """A Markdown table per mode: rows are needle depths, columns video lengths (in %)."""
    out: list[str] = []
    for mode, g in grids.items():
        names = [_frames(t) for t in g["lengths"]]
        out.append(f"**{mode}** ({key}, %; {g['per_cell']} questions a cell)\n")
        out.append("| depth | " + " | ".join(names) + " |")
        out.append("|---|" + "---|" * len(names))
        for di, d in enumerate(g["depths"]):
            out.append(f"| {100 * d:.0f} % | " + " | ".join(
                f"{100 * g[key][li][di]:.0f}" for li in range(len(names))) + " |")
        worst = [min(row) for row in g[key]]
        out.append("| **worst depth** | " + " | ".join(f"**{100 * w:.0f}**" for w in worst)
                   + " |\n")
    return "\n".join(out)


def _frames(t: int) -> str:
    return f"{t:,}"


def recall_figure(grids: dict[str, dict[str, Any]], path: Path, key: str = "recall") -> Path:
    """The Gemini-1.5-style figure: per mode a panel of recall by video length (x) and needle
    depth (y), green for all found, red for none, with the percentages written in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    cmap = LinearSegmentedColormap.from_list("recall", ["#d73027", "#fee08b", "#1a9850"])
    n = len(grids)
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (mode, g) in zip(axes.flat, grids.items(), strict=False):
        grid = np.array(g[key]).T  # (depths, lengths)
        ax.imshow(grid, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto", origin="upper")
        ax.set_xticks(range(len(g["lengths"])), [_frames(t) for t in g["lengths"]], fontsize=7)
        ax.set_yticks(range(len(g["depths"])), [f"{100 * d:.0f}%" for d in g["depths"]],
                      fontsize=7)
        for (di, li), v in np.ndenumerate(grid):
            ax.text(li, di, f"{100 * v:.0f}", ha="center", va="center", fontsize=6)
        ax.set_xlabel("video length (frames)", fontsize=8)
        ax.set_ylabel("needle depth", fontsize=8)
        worst = min(min(r) for r in g[key])
        ax.set_title(f"{mode}: worst cell {100 * worst:.0f}%", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def data_from_args(args: argparse.Namespace) -> tuple[VideoQAData, NeedleWorld]:
    """The training data and world of a ``--task needle`` command line."""
    data = generate_needle(args.videos, args.min_frames, args.frames, args.data_seed,
                           args.needle_span, args.distractors, args.feature_size,
                           strength=args.needle_strength)
    log_main(f"{data.source}: generated")
    return data, make_world(args.data_seed, args.feature_size)


def grid_from_args(model: VideoQA, vocab: Vocab, world: NeedleWorld, args: argparse.Namespace,
                   device: torch.device, rank: int = 0, processes: int = 1) -> dict[str, Any]:
    """:func:`recall_grid` with the options of a ``--task needle`` command line."""
    return recall_grid(model, vocab, world, args.eval_lengths, args.eval_depths,
                       args.eval_questions, args.needle_span, args.distractors,
                       int(args.chunk_mb * 2 ** 20), device, not args.no_progress, rank,
                       processes, args.needle_strength)

