r"""Grounded video-QA data: a seeded procedural generator, a real-feature loader, and batching.

**Generated videos** (:func:`generate`). Each video has ``frames`` frames of ``size x size`` RGB
(default 16 frames of 32 x 32) on a black background with three objects of distinct shapes
(square, circle, triangle, cross). Each object appears at some frame, moves one pixel a frame
(left, right, up, down, or stays still), changes colour one or two times (red, green, blue,
yellow, magenta, cyan), changing its direction at the same moments, and leaves. Objects never
overlap. Questions are generated from templates, each with its answer and its ground-truth
evidence frames (0-based):

==========================  ==========================================================  ==========
type                        question (answer)                                           evidence
==========================  ==========================================================  ==========
``colour_when_appears``     what colour is the circle when the square appears? (red)   the frame
                                                                                        the square
                                                                                        first shows
``colour_when_leaves``      what colour is the circle when the square leaves? (blue)   its last
                                                                                        frame
``count_when_appears``      how many shapes are there when the square appears? (two)   as above
``direction_when_appears``  which way does the circle move when the square appears?    as above
                            (left; the move from the frame before to this one)
``shape_turns``             what shape turns cyan? (triangle; the only object that is  the frames
                            ever cyan, and it was not cyan at first)                    it is cyan
==========================  ==========================================================  ==========

Every answer is readable from one frame together with its neighbours (which show what moved,
appeared or left), so a latent alignment that picks the evidence frame can answer; the
question says which event to find. Objects' colours change during their lives, so for
the colour questions a frame away from the event usually gives another answer.

**The identifiable variant** (``generate(..., variant="identifiable")``, ``--variant
identifiable``). Above, the evidence frame is not identifiable: the named object keeps the
answer's colour over a stretch of frames, and a count or a direction is read at the frames
around the event too. In this variant the objects live and move as above but are drawn grey,
except at the *event frames* (a frame where an object appears, from frame 1 on, or leaves, up to
the last frame but one): there the object that appears is white, the one that leaves brown, and
every other visible object shows a colour, drawn per object without replacement, so an object
never shows one colour twice. Only the question types that one frame answers are asked:

==========================  ==========================================================  ==========
type                        question (answer)                                           evidence
==========================  ==========================================================  ==========
``colour_when_appears``     what colour is the circle when the square appears? (red:    the frame
                            the circle's colour where the square is white)              the square
                                                                                        is white
``colour_when_leaves``      what colour is the circle when the square leaves?           the frame
                            (the circle's colour where the square is brown)             it is brown
``shape_turns``             what shape turns cyan? (the only object that is ever cyan)  that frame
==========================  ==========================================================  ==========

So the evidence frame alone answers each question (with ``--window 1``, so does its encoding),
and no other frame shows the named object in the answer's colour (for ``shape_turns``: no other
frame holds the colour at all). :data:`IDENTIFIABLE_VERSION` versions it.

Generation is seeded (numpy's PCG64) and vectorised per object; :func:`load_or_generate`
caches a data set under a name that holds every generator setting (the variant included).

**Real features** (:func:`load_features`): a folder with

* ``qa.jsonl``: one JSON object per line, ``{"video": ID, "question": TEXT, "answer": TEXT}``
  plus optional ``"split"`` (``"train"``, ``"val"`` or ``"test"``; default ``"train"``),
  ``"type"`` and ``"evidence"`` (a list of 0-based frame indices, used only to score grounding);
* ``features/ID.npz`` (one array, or an array named ``features``) or ``features/ID.pt`` (a
  tensor): the ``(T, F)`` per-frame features of video ``ID`` (any ``T``, the same ``F`` for all).

Both give a :class:`VideoQAData`, which :mod:`examples.video_qa.train` trains on unchanged.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor

from ..common import atomic_save
from ..data import DataError

__all__ = [
    "ANSWERS",
    "COLOURS",
    "DIRECTIONS",
    "GENERATOR_VERSION",
    "IDENTIFIABLE_TYPES",
    "IDENTIFIABLE_VERSION",
    "QUESTION_TYPES",
    "SHAPES",
    "SHOWN_COLOURS",
    "VARIANTS",
    "Batch",
    "Question",
    "Variant",
    "VideoQAData",
    "Vocab",
    "collate",
    "generate",
    "video_batches",
    "load_features",
    "load_or_generate",
    "tokenize",
    "write_features",
]

#: Bumped whenever generated data change, so that caches of older versions are not reused.
GENERATOR_VERSION = 1
SHAPES = ("square", "circle", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
_RGB = np.array([(230, 40, 40), (40, 200, 40), (50, 80, 240), (230, 220, 40), (220, 50, 220),
                 (40, 220, 220)], dtype=np.uint8)
DIRECTIONS = ("left", "right", "up", "down", "still")
_STEP = np.array([(0, -1), (0, 1), (-1, 0), (1, 0), (0, 0)])  # (row, column) per frame
COUNTS = ("one", "two", "three")
#: Every answer of the generated data, in a fixed order.
ANSWERS = COLOURS + SHAPES + COUNTS + DIRECTIONS
QUESTION_TYPES = ("colour_when_appears", "colour_when_leaves", "count_when_appears",
                  "direction_when_appears", "shape_turns")
OBJECT = 7  # side of an object's sprite in pixels
SPLITS = ("train", "val", "test")

#: The generator variants (see the module docstring): ``"default"`` (the data of
#: :data:`GENERATOR_VERSION`, unchanged) and ``"identifiable"``.
Variant = Literal["default", "identifiable"]
VARIANTS: tuple[Variant, ...] = get_args(Variant)
#: Bumped whenever the identifiable variant's data change (its caches are named by it).
IDENTIFIABLE_VERSION = 1
#: The question types of the identifiable variant: those one frame answers.
IDENTIFIABLE_TYPES = ("colour_when_appears", "colour_when_leaves", "shape_turns")
#: What the identifiable variant draws: an object's colour index into this (``COLOURS``, then
#: grey away from events, white where it appears and brown where it leaves).
SHOWN_COLOURS = COLOURS + ("grey", "white", "brown")
GREY, APPEARS, LEAVES = (SHOWN_COLOURS.index(c) for c in ("grey", "white", "brown"))
_SHOWN_RGB = np.concatenate([_RGB, np.array([(128, 128, 128), (255, 255, 255), (150, 90, 30)],
                                            dtype=np.uint8)])


def _sprites() -> np.ndarray:
    """``(4, OBJECT, OBJECT)`` bool masks of the shapes."""
    n = OBJECT
    r, c = np.mgrid[0:n, 0:n]
    mid = (n - 1) / 2
    square = np.ones((n, n), dtype=bool)
    circle = (r - mid) ** 2 + (c - mid) ** 2 <= (mid + 0.3) ** 2
    triangle = np.abs(c - mid) <= r / 2 + 0.01  # apex at the top row
    cross = (np.abs(r - mid) <= 1) | (np.abs(c - mid) <= 1)
    return np.stack([square, circle, triangle, cross])


_SPRITES = _sprites()


@dataclass(frozen=True)
class Question:
    """One question about one video.

    :ivar video: index of the video in :attr:`VideoQAData.videos`.
    :ivar text: the question.
    :ivar answer: the answer (a word).
    :ivar type: the template (one of :data:`QUESTION_TYPES` for generated data).
    :ivar evidence: the ground-truth evidence frames (0-based), empty if unknown.
    :ivar split: ``"train"``, ``"val"`` or ``"test"``.
    """

    video: int
    text: str
    answer: str
    type: str
    evidence: tuple[int, ...]
    split: str


@dataclass
class VideoQAData:
    """Videos and their questions.

    :ivar videos: ``(N, T, H, W, 3)`` uint8 pixels, or ``(N, T, F)`` float32 features (padded).
    :ivar lengths: ``(N,)`` frames per video.
    :ivar questions: every question of every split.
    :ivar source: where the data came from (for reports).
    :ivar objects: per video, the generator's ground truth (generated data only).
    """

    videos: Tensor
    lengths: Tensor
    questions: list[Question]
    source: str
    objects: list[list[dict[str, Any]]] = field(default_factory=list)

    @property
    def pixels(self) -> bool:
        """Whether :attr:`videos` holds pixels (else features)."""
        return self.videos.dim() == 5

    def split(self, name: str) -> list[Question]:
        """The questions of split ``name``."""
        return [q for q in self.questions if q.split == name]


# -- the generator --------------------------------------------------------------------------------


def _segments(rng: np.random.Generator, start: int, stop: int, n_changes: int) -> list[int]:
    """Sorted change frames strictly inside ``(start, stop]`` at least 2 frames apart."""
    inner = np.arange(start + 2, stop)  # a change at f: frames f.. have the new colour
    for _ in range(50):
        pick = np.sort(rng.choice(inner, size=n_changes, replace=False))
        if np.all(np.diff(np.concatenate([[start], pick, [stop + 1]])) >= 2):
            return [int(x) for x in pick]
    return []


def _object(rng: np.random.Generator, shape: int, frames: int, size: int) -> dict[str, Any]:
    """One object's life: appearance, colours, directions and positions per frame."""
    life = int(rng.integers(frames // 2, frames - 1))  # frames visible
    first = int(rng.integers(0, frames - life + 1))
    last = first + life - 1
    changes = _segments(rng, first, last, int(rng.integers(1, 3)))
    bounds = [first] + changes + [last + 1]
    colours: list[int] = []
    for _ in range(len(bounds) - 1):
        options = [c for c in range(len(COLOURS)) if not colours or c != colours[-1]]
        colours.append(int(rng.choice(options)))
    # directions per segment, chosen so that the object stays inside the frame
    span = size - OBJECT
    pos = np.array([rng.integers(0, span + 1), rng.integers(0, span + 1)])
    rows = np.full((frames, 2), -1, dtype=np.int64)
    directions: list[int] = []
    for k in range(len(bounds) - 1):
        seg = bounds[k + 1] - bounds[k]
        steps = seg if k > 0 else seg - 1  # the first frame of a life does not move
        ok = [d for d in range(len(DIRECTIONS))
              if 0 <= pos[0] + _STEP[d][0] * steps <= span and
              0 <= pos[1] + _STEP[d][1] * steps <= span]
        ok = [d for d in ok if not directions or d != directions[-1]] or ok
        d = int(rng.choice(ok))
        directions.append(d)
        for j, f in enumerate(range(bounds[k], bounds[k + 1])):
            if k > 0 or j > 0:
                pos = pos + _STEP[d]
            rows[f] = pos
    colour_at = np.full(frames, -1, dtype=np.int64)
    direction_at = np.full(frames, -1, dtype=np.int64)
    for k in range(len(bounds) - 1):
        colour_at[bounds[k]:bounds[k + 1]] = colours[k]
        direction_at[bounds[k]:bounds[k + 1]] = directions[k]
    direction_at[first] = len(DIRECTIONS) - 1  # no move into the first frame
    return {"shape": shape, "first": first, "last": last, "colour": colour_at,
            "direction": direction_at, "pos": rows}


def _overlap(objs: list[dict[str, Any]]) -> bool:
    for i in range(len(objs)):
        for j in range(i + 1, len(objs)):
            a, b = objs[i], objs[j]
            both = (a["colour"] >= 0) & (b["colour"] >= 0)
            d = np.abs(a["pos"] - b["pos"]).max(-1)
            if np.any(both & (d < OBJECT + 1)):
                return True
    return False


def _render(objs: list[dict[str, Any]], frames: int, size: int, palette: np.ndarray = _RGB
            ) -> np.ndarray:
    """The ``(frames, size, size, 3)`` pixels; ``o["colour"][f]`` indexes ``palette``."""
    video = np.zeros((frames, size, size, 3), dtype=np.uint8)
    for o in objs:
        sprite = _SPRITES[o["shape"]]
        for f in range(o["first"], o["last"] + 1):
            r, c = o["pos"][f]
            patch = video[f, r:r + OBJECT, c:c + OBJECT]
            patch[sprite] = palette[o["colour"][f]]
    return video


def _questions(objs: list[dict[str, Any]], frames: int
               ) -> list[tuple[str, str, str, tuple[int, ...]]]:
    """Every valid (type, question, answer, evidence) of one video."""
    out: list[tuple[str, str, str, tuple[int, ...]]] = []
    visible = np.stack([o["colour"] >= 0 for o in objs])  # (objects, frames)
    for b in objs:
        name_b = SHAPES[b["shape"]]
        events = []
        if b["first"] >= 1:
            events.append(("appears", b["first"]))
        if b["last"] <= frames - 2:
            events.append(("leaves", b["last"]))
        for event, e in events:
            if event == "appears":
                n = int(visible[:, e].sum())
                out.append(("count_when_appears",
                            f"how many shapes are there when the {name_b} appears?",
                            COUNTS[n - 1], (e,)))
            for a in objs:
                if a is b or a["colour"][e] < 0:
                    continue
                name_a = SHAPES[a["shape"]]
                out.append((f"colour_when_{event}",
                            f"what colour is the {name_a} when the {name_b} {event}?",
                            COLOURS[a["colour"][e]], (e,)))
                if event == "appears" and a["colour"][e - 1] >= 0:
                    out.append(("direction_when_appears",
                                f"which way does the {name_a} move when the {name_b} appears?",
                                DIRECTIONS[a["direction"][e]], (e,)))
    for c in range(len(COLOURS)):
        holders = [o for o in objs if np.any(o["colour"] == c)]
        if len(holders) != 1:
            continue
        o = holders[0]
        if o["colour"][o["first"]] == c:
            continue
        ev = tuple(int(f) for f in np.flatnonzero(o["colour"] == c))
        out.append(("shape_turns", f"what shape turns {COLOURS[c]}?", SHAPES[o["shape"]], ev))
    return out


def _events(objs: list[dict[str, Any]], frames: int) -> list[tuple[dict[str, Any], str, int]]:
    """Every (object, ``"appears"`` or ``"leaves"``, frame) that a question may name: an
    appearance from frame 1 on, a leaving up to the last frame but one."""
    out = []
    for o in objs:
        if o["first"] >= 1:
            out.append((o, "appears", o["first"]))
        if o["last"] <= frames - 2:
            out.append((o, "leaves", o["last"]))
    return out


def _identifiable(rng: np.random.Generator, objs: list[dict[str, Any]], frames: int
                  ) -> list[dict[str, Any]]:
    """The objects of the identifiable variant: the same lives and moves, with ``"colour"``
    replaced by the index into :data:`SHOWN_COLOURS` each frame shows (``-1`` where invisible).

    Grey everywhere except at the event frames (:func:`_events`): white where the object
    appears, brown where it leaves, and at another object's event a colour of :data:`COLOURS`,
    drawn without replacement per object (an object is at most at 2 x 2 other objects' events,
    fewer than the 6 colours), so that no object shows one colour at two frames.
    """
    events = _events(objs, frames)
    event_frames = sorted({e for _, _, e in events})
    out = []
    for o in objs:
        shown = np.where(o["colour"] >= 0, GREY, -1)
        own = {e: APPEARS if event == "appears" else LEAVES
               for b, event, e in events if b is o}
        others = [e for e in event_frames if shown[e] >= 0 and e not in own]
        shown[others] = rng.choice(len(COLOURS), size=len(others), replace=False)
        for e, marker in own.items():
            shown[e] = marker
        out.append({**o, "colour": shown})
    return out


def _identifiable_questions(objs: list[dict[str, Any]], frames: int
                            ) -> list[tuple[str, str, str, tuple[int, ...]]]:
    """Every valid (type, question, answer, evidence) of one video of the identifiable variant
    (objects from :func:`_identifiable`)."""
    out: list[tuple[str, str, str, tuple[int, ...]]] = []
    for b, event, e in _events(objs, frames):
        for a in objs:
            if a is not b and 0 <= a["colour"][e] < len(COLOURS):
                out.append((f"colour_when_{event}",
                            f"what colour is the {SHAPES[a['shape']]} when the "
                            f"{SHAPES[b['shape']]} {event}?", COLOURS[a["colour"][e]], (e,)))
    for c in range(len(COLOURS)):
        holders = [o for o in objs if np.any(o["colour"] == c)]
        if len(holders) == 1:  # never at its first frame, which is grey or white
            o = holders[0]
            out.append(("shape_turns", f"what shape turns {COLOURS[c]}?", SHAPES[o["shape"]],
                        tuple(int(f) for f in np.flatnonzero(o["colour"] == c))))
    return out


def generate(num_videos: int, frames: int = 16, size: int = 32, questions_per_video: int = 4,
             seed: int = 0, split_fractions: tuple[float, float] = (0.8, 0.1),
             variant: Variant = "default") -> VideoQAData:
    """Generate a grounded video-QA data set (see the module docstring).

    :param num_videos: videos to render.
    :param frames: frames per video (at least 8).
    :param size: frame side in pixels (at least 24).
    :param questions_per_video: questions drawn per video (without replacement, spread over the
        question types: first one per type in random order, then any).
    :param seed: the seed; the same arguments give the same data set.
    :param split_fractions: the fractions of videos in the train and validation splits (the
        rest is test); splits are by video.
    :param variant: ``"default"`` or ``"identifiable"`` (only the evidence frame shows the
        answer; see the module docstring); the default variant's data are those of
        :data:`GENERATOR_VERSION`, unchanged.
    :raises ValueError: on sizes too small to hold three moving objects, or another variant.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if frames < 8 or size < 3 * OBJECT + 3 or num_videos < 1 or questions_per_video < 1:
        raise ValueError(f"need frames >= 8, size >= {3 * OBJECT + 3}, num_videos >= 1 and "
                         f"questions_per_video >= 1; got frames={frames}, size={size}, "
                         f"num_videos={num_videos}, questions_per_video={questions_per_video}")
    rng = np.random.Generator(np.random.PCG64(seed))
    videos = np.zeros((num_videos, frames, size, size, 3), dtype=np.uint8)
    questions: list[Question] = []
    objects: list[list[dict[str, Any]]] = []
    n_train = round(split_fractions[0] * num_videos)
    n_val = round(split_fractions[1] * num_videos)
    for v in range(num_videos):
        while True:
            shapes = rng.choice(len(SHAPES), size=3, replace=False)
            objs = [_object(rng, int(s), frames, size) for s in shapes]
            if _overlap(objs):
                continue
            if variant == "identifiable":
                objs = _identifiable(rng, objs, frames)
                qs = _identifiable_questions(objs, frames)
            else:
                qs = _questions(objs, frames)
            if qs:
                break
        videos[v] = _render(objs, frames, size,
                            _SHOWN_RGB if variant == "identifiable" else _RGB)
        objects.append([{k: (x.tolist() if isinstance(x, np.ndarray) else x)
                         for k, x in o.items()} for o in objs])
        by_type: dict[str, list[int]] = {}
        for i, q in enumerate(qs):
            by_type.setdefault(q[0], []).append(i)
        order = [int(rng.choice(ix)) for ix in (by_type[t] for t in
                                                 rng.permutation(sorted(by_type)))]
        rest = [i for i in rng.permutation(len(qs)) if int(i) not in order]
        split = "train" if v < n_train else "val" if v < n_train + n_val else "test"
        for i in (order + [int(i) for i in rest])[:questions_per_video]:
            t, text, answer, ev = qs[i]
            questions.append(Question(v, text, answer, t, ev, split))
    version = (f"identifiable version {IDENTIFIABLE_VERSION}" if variant == "identifiable"
               else f"version {GENERATOR_VERSION}")
    return VideoQAData(torch.from_numpy(videos), torch.full((num_videos,), frames),
                       questions, f"generated ({version}, seed {seed})", objects)


def cache_name(num_videos: int, frames: int, size: int, questions_per_video: int,
               seed: int, variant: Variant = "default") -> str:
    """The file name of a cached generated data set: every setting is part of it (the default
    variant's names are those from before variants existed)."""
    version = (f"identifiable-v{IDENTIFIABLE_VERSION}" if variant == "identifiable"
               else f"v{GENERATOR_VERSION}")
    return (f"videoqa-{version}-n{num_videos}-t{frames}-s{size}-"
            f"q{questions_per_video}-seed{seed}.pt")


def load_or_generate(cache_dir: str | os.PathLike[str] | None, num_videos: int,
                     frames: int = 16, size: int = 32, questions_per_video: int = 4,
                     seed: int = 0, variant: Variant = "default") -> VideoQAData:
    """:func:`generate`, cached (atomically) in ``cache_dir`` when given."""
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / cache_name(num_videos, frames, size, questions_per_video, seed,
                                            variant)
        if path.is_file():
            st = torch.load(path, weights_only=False)
            return VideoQAData(st["videos"], st["lengths"],
                               [Question(**q) for q in st["questions"]], st["source"],
                               st["objects"])
    data = generate(num_videos, frames, size, questions_per_video, seed, variant=variant)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save({"videos": data.videos, "lengths": data.lengths,
                     "questions": [q.__dict__ for q in data.questions],
                     "source": data.source, "objects": data.objects}, path)
    return data


# -- real features --------------------------------------------------------------------------------


def _read_features(path: Path) -> np.ndarray:
    try:
        if path.suffix == ".npz":
            with np.load(path) as z:
                keys = list(z.keys())
                key = "features" if "features" in keys else keys[0] if len(keys) == 1 else None
                if key is None:
                    raise DataError(f"{str(path)!r} holds arrays {keys}: name the per-frame "
                                    "features 'features' or store only one array")
                x = np.asarray(z[key])
        else:
            t = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(t, Tensor):
                raise DataError(f"{str(path)!r} must hold one tensor, got {type(t).__name__}")
            x = t.float().numpy()
    except (OSError, ValueError, RuntimeError) as e:
        raise DataError(f"cannot read the features {str(path)!r} ({e})") from e
    if x.ndim != 2 or x.shape[0] < 1 or not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{str(path)!r} must hold a (T, F) numeric array of per-frame features, "
                        f"got shape {x.shape} {x.dtype}")
    return x.astype(np.float32)


def load_features(folder: str | os.PathLike[str]) -> VideoQAData:
    """Real precomputed per-frame features and their questions (format in the module docstring).

    :raises DataError: naming the file (and line) that is missing or malformed.
    """
    folder = Path(folder)
    qa = folder / "qa.jsonl"
    if not qa.is_file():
        raise DataError(f"{str(qa)!r} not found: a real-feature folder holds qa.jsonl (one "
                        "{\"video\", \"question\", \"answer\"} object a line) and "
                        "features/ID.npz or features/ID.pt per video; see "
                        "examples/video_qa/data.py")
    ids: dict[str, int] = {}
    feats: list[np.ndarray] = []
    questions: list[Question] = []
    for n, line in enumerate(qa.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            e = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{str(qa)!r}, line {n}: not JSON ({err})") from err
        if not isinstance(e, dict) or not all(isinstance(e.get(k), str)
                                              for k in ("video", "question", "answer")):
            raise DataError(f"{str(qa)!r}, line {n}: need string fields video, question and "
                            f"answer, got {line.strip()[:200]!r}")
        split = e.get("split", "train")
        if split not in SPLITS:
            raise DataError(f"{str(qa)!r}, line {n}: split must be one of {SPLITS}, got "
                            f"{split!r}")
        vid = e["video"]
        if vid not in ids:
            cands = [folder / "features" / f"{vid}{ext}" for ext in (".npz", ".pt")]
            found = [p for p in cands if p.is_file()]
            if not found:
                raise DataError(f"{str(qa)!r}, line {n}: no features for video {vid!r} (looked "
                                f"for {', '.join(repr(str(p)) for p in cands)})")
            x = _read_features(found[0])
            if feats and x.shape[1] != feats[0].shape[1]:
                raise DataError(f"{str(found[0])!r} has {x.shape[1]} features a frame, the "
                                f"videos before it {feats[0].shape[1]}; use one feature size")
            ids[vid] = len(feats)
            feats.append(x)
        t = feats[ids[vid]].shape[0]
        ev = e.get("evidence", [])
        if not isinstance(ev, list) or not all(isinstance(f, int) and 0 <= f < t for f in ev):
            raise DataError(f"{str(qa)!r}, line {n}: evidence must be a list of frame indices "
                            f"in [0, {t}) for video {vid!r}, got {ev!r}")
        questions.append(Question(ids[vid], e["question"], e["answer"], str(e.get("type", "")),
                                  tuple(ev), split))
    if not questions:
        raise DataError(f"{str(qa)!r} holds no questions")
    lengths = torch.tensor([f.shape[0] for f in feats])
    videos = torch.zeros(len(feats), int(lengths.max()), feats[0].shape[1], dtype=torch.float32)
    for i, f in enumerate(feats):
        videos[i, :f.shape[0]] = torch.from_numpy(f)
    return VideoQAData(videos, lengths, questions, f"features from {folder}")


def write_features(folder: str | os.PathLike[str], features: dict[str, np.ndarray],
                   questions: Sequence[dict[str, Any]], fmt: str = "npz") -> Path:
    """Write a real-feature folder in the format :func:`load_features` reads (a helper for
    users converting their features, and for the tests)."""
    folder = Path(folder)
    (folder / "features").mkdir(parents=True, exist_ok=True)
    for vid, x in features.items():
        if fmt == "npz":
            np.savez(folder / "features" / f"{vid}.npz", features=x)
        else:
            torch.save(torch.as_tensor(x), folder / "features" / f"{vid}.pt")
    (folder / "qa.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions),
                                     encoding="utf-8")
    return folder


# -- vocabularies and batches ---------------------------------------------------------------------


def tokenize(text: str) -> list[str]:
    """Lower-cased words (letters, digits and apostrophes)."""
    return re.findall(r"[a-z0-9']+", text.lower())


class Vocab:
    """Word and answer indices, built from the training questions (index 0 is ``<pad>``, 1 is
    ``<unk>`` for words; answers unseen in training map to ``<unk>`` (index 0), which the model
    can never predict)."""

    def __init__(self, words: Sequence[str], answers: Sequence[str]) -> None:
        self.words = ["<pad>", "<unk>"] + sorted(set(words) - {"<pad>", "<unk>"})
        self.answers = ["<unk>"] + sorted(set(answers) - {"<unk>"})
        self.word_index = {w: i for i, w in enumerate(self.words)}
        self.answer_index = {a: i for i, a in enumerate(self.answers)}

    @classmethod
    def build(cls, questions: Sequence[Question]) -> Vocab:
        return cls([w for q in questions for w in tokenize(q.text)], [q.answer for q in questions])

    def encode(self, text: str) -> list[int]:
        return [self.word_index.get(w, 1) for w in tokenize(text)] or [1]

    def as_dict(self) -> dict[str, list[str]]:
        return {"words": self.words, "answers": self.answers}

    @classmethod
    def from_dict(cls, d: dict[str, list[str]]) -> Vocab:
        v = cls([], [])
        v.words, v.answers = list(d["words"]), list(d["answers"])
        v.word_index = {w: i for i, w in enumerate(v.words)}
        v.answer_index = {a: i for i, a in enumerate(v.answers)}
        return v


@dataclass
class Batch:
    """A batch of questions with their videos.

    :ivar videos: the batch's distinct videos, ``(V, T, H, W, 3)`` uint8 or ``(V, T, F)`` float
        (questions about one video share its frame encoding).
    :ivar video_mask: ``(V, T)`` bool, ``True`` for real frames.
    :ivar video_index: ``(B,)`` long: the row of ``videos`` each question is about.
    :ivar frame_mask: ``(B, T)`` bool, ``True`` for real frames of each question's video.
    :ivar words: ``(B, L)`` long question words, 0-padded; :ivar word_lengths: ``(B,)``.
    :ivar answers: ``(B,)`` long.
    :ivar evidence: ``(B, T)`` bool ground-truth evidence frames.
    :ivar index: the questions' indices in the list they were collated from.
    """

    videos: Tensor
    video_mask: Tensor
    video_index: Tensor
    frame_mask: Tensor
    words: Tensor
    word_lengths: Tensor
    answers: Tensor
    evidence: Tensor
    index: list[int]

    def to(self, device: torch.device) -> Batch:
        return Batch(self.videos.to(device, non_blocking=True),
                     self.video_mask.to(device, non_blocking=True),
                     self.video_index.to(device, non_blocking=True),
                     self.frame_mask.to(device, non_blocking=True),
                     self.words.to(device, non_blocking=True), self.word_lengths,
                     self.answers.to(device, non_blocking=True),
                     self.evidence.to(device, non_blocking=True), self.index)

    def __len__(self) -> int:
        return len(self.index)


def collate(data: VideoQAData, questions: Sequence[Question], vocab: Vocab,
            index: Sequence[int]) -> Batch:
    """The batch of ``questions[i]`` for ``i`` in ``index``."""
    qs = [questions[i] for i in index]
    vids, video_index = torch.unique(torch.tensor([q.video for q in qs]), return_inverse=True)
    lengths = data.lengths[vids]
    t = int(lengths.max())
    videos = data.videos[vids, :t]
    video_mask = torch.arange(t)[None, :] < lengths[:, None]
    frame_mask = video_mask[video_index]
    enc = [vocab.encode(q.text) for q in qs]
    words = torch.zeros(len(qs), max(len(e) for e in enc), dtype=torch.long)
    for i, e in enumerate(enc):
        words[i, :len(e)] = torch.tensor(e)
    evidence = torch.zeros(len(qs), t, dtype=torch.bool)
    for i, q in enumerate(qs):
        evidence[i, list(q.evidence)] = True
    answers = torch.tensor([vocab.answer_index.get(q.answer, 0) for q in qs])
    return Batch(videos, video_mask, video_index, frame_mask, words,
                 torch.tensor([len(e) for e in enc]), answers, evidence, list(index))


def video_batches(questions: Sequence[Question], batch_size: int, seed: int | None = None
                  ) -> list[list[int]]:
    """Batches of question indices that keep each video's questions together (so a batch
    encodes each video once), about ``batch_size`` questions each; videos in a random order
    drawn from ``seed``, or in order of appearance when ``seed`` is ``None``."""
    import random

    by_video: dict[int, list[int]] = {}
    for i, q in enumerate(questions):
        by_video.setdefault(q.video, []).append(i)
    groups = list(by_video.values())
    if seed is not None:
        random.Random(seed).shuffle(groups)
    out: list[list[int]] = []
    cur: list[int] = []
    for g in groups:
        if cur and len(cur) + len(g) > batch_size:
            out.append(cur)
            cur = []
        cur = cur + g
    if cur:
        out.append(cur)
    return out
