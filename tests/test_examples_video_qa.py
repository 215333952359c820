"""The video-QA example (``python -m examples.video_qa``): the seeded generator and its
ground-truth evidence (re-derived from the rendered pixels), the real-feature loader, GIF
decoding, the two-level model's exact marginal likelihood against brute force, the smoke run of
every mode, resume, and a two-process data-parallel run."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import assert_one_line_error, interrupt_run, real_data, run_example
from scipy import ndimage
from torch import Tensor

import examples.video_qa.data as vqdata
import examples.video_qa.train as vqtrain
from examples.common import ExampleError, RunExistsError
from examples.data import DataError, decode_gif, load_tgif_qa
from examples.video_qa.data import (
    _RGB,
    COLOURS,
    COUNTS,
    DIRECTIONS,
    QUESTION_TYPES,
    SHAPES,
    Question,
    Vocab,
    _overlap,
    _questions,
    _render,
    cache_name,
    collate,
    generate,
    load_features,
    load_or_generate,
    write_features,
)
from examples.video_qa.model import MODES, ModelConfig, VideoQA, two_level_graph
from examples.video_qa.train import main

REPO = Path(__file__).resolve().parents[1]
TGIF = ("tgif-qa/qa.json", "tgif-qa/1.gif", "tgif-qa/2.gif", "tgif-qa/3.gif", "tgif-qa/4.gif")
#: The four TGIF-QA GIFs and their questions: only the GIF tests need them; the generated data
#: and the real-feature folders of the other tests are made by the tests themselves.
TGIF_DATA = real_data(*TGIF)
#: Options of every run: CPU, one thread, no progress bars, and half the smoke test's 40 videos
#: (16 for training with 4 questions each, 2 a batch: 8 steps an epoch; 8 validation and 8 test
#: questions).
QUIET = ["--no-progress", "--device", "cpu", "--threads", "1", "--videos", "20"]


@pytest.fixture
def float32_default() -> None:
    """The programs run under torch's default dtype, float32, as users run them
    (``tests/conftest.py`` makes it float64 for every test and restores it afterwards)."""
    torch.set_default_dtype(torch.float32)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


# -- the generator ---------------------------------------------------------------------------------


def test_generate_is_seeded_and_the_cache_reads_back(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    a, b, c = generate(10, seed=3), generate(10, seed=3), generate(10, seed=4)
    assert a.videos.shape == (10, 16, 32, 32, 3) and a.videos.dtype == torch.uint8
    assert a.lengths.tolist() == [16] * 10 and a.pixels
    assert torch.equal(a.videos, b.videos)
    assert a.questions == b.questions and a.objects == b.objects
    assert not torch.equal(a.videos, c.videos) and a.objects != c.objects
    # 4 questions a video, split by video 80/10/10
    assert [q.video for q in a.questions] == [v for v in range(10) for _ in range(4)]
    assert [q.split for q in a.questions[::4]] == ["train"] * 8 + ["val", "test"]

    first = load_or_generate(tmp_path, 10, seed=3)
    assert [p.name for p in tmp_path.iterdir()] == [cache_name(10, 16, 32, 4, 3)]

    def no_generation(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the cached data set was generated again")

    monkeypatch.setattr(vqdata, "generate", no_generation)
    again = load_or_generate(tmp_path, 10, seed=3)
    for d in (first, again):
        assert torch.equal(d.videos, a.videos) and torch.equal(d.lengths, a.lengths)
        assert d.questions == a.questions and d.objects == a.objects and d.source == a.source
    with pytest.raises(AssertionError, match="generated again"):  # another seed: another file
        load_or_generate(tmp_path, 10, seed=4)


def _life(first: int, frames: int, colours: list[int], directions: list[int],
          pos: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame colour, direction and position rows of a life starting at ``first``."""
    colour = np.full(frames, -1, dtype=np.int64)
    direction = np.full(frames, -1, dtype=np.int64)
    rows = np.full((frames, 2), -1, dtype=np.int64)
    n = len(colours)
    colour[first:first + n] = colours
    direction[first:first + n] = directions
    rows[first:first + n] = pos
    return colour, direction, rows


def _obj(shape: str, first: int, last: int, frames: int, colours: list[str],
         directions: list[str], pos: list[tuple[int, int]]) -> dict[str, Any]:
    assert len(colours) == len(directions) == len(pos) == last - first + 1
    c, d, p = _life(first, frames, [COLOURS.index(x) for x in colours],
                    [DIRECTIONS.index(x) for x in directions], pos)
    return {"shape": SHAPES.index(shape), "first": first, "last": last, "colour": c,
            "direction": d, "pos": p}


#: 10 frames: a square visible throughout (red, moving right; green from frame 5, moving down),
#: a circle in frames 3-7 (blue, moving left; cyan from 6, moving up) and a triangle in frames
#: 2-9 (yellow, moving down; red from 6, moving up).
def _three_objects() -> list[dict[str, Any]]:
    square = _obj("square", 0, 9, 10, ["red"] * 5 + ["green"] * 5,
                  ["still"] + ["right"] * 4 + ["down"] * 5,
                  [(2, 2), (2, 3), (2, 4), (2, 5), (2, 6), (3, 6), (4, 6), (5, 6), (6, 6), (7, 6)])
    circle = _obj("circle", 3, 7, 10, ["blue"] * 3 + ["cyan"] * 2,
                  ["still", "left", "left", "up", "up"],
                  [(20, 20), (20, 19), (20, 18), (19, 18), (18, 18)])
    triangle = _obj("triangle", 2, 9, 10, ["yellow"] * 4 + ["red"] * 4,
                    ["still", "down", "down", "down", "up", "up", "up", "up"],
                    [(20, 2), (21, 2), (22, 2), (23, 2), (22, 2), (21, 2), (20, 2), (19, 2)])
    return [square, circle, triangle]


def test_questions_of_hand_built_videos() -> None:
    objs = _three_objects()
    assert not _overlap(objs)
    want = [
        # the circle appears at frame 3: all three are there; the square moved right into 3,
        # the triangle down
        ("count_when_appears", "how many shapes are there when the circle appears?", "three",
         (3,)),
        ("colour_when_appears", "what colour is the square when the circle appears?", "red",
         (3,)),
        ("direction_when_appears", "which way does the square move when the circle appears?",
         "right", (3,)),
        ("colour_when_appears", "what colour is the triangle when the circle appears?",
         "yellow", (3,)),
        ("direction_when_appears", "which way does the triangle move when the circle appears?",
         "down", (3,)),
        # the circle's last frame is 7
        ("colour_when_leaves", "what colour is the square when the circle leaves?", "green",
         (7,)),
        ("colour_when_leaves", "what colour is the triangle when the circle leaves?", "red",
         (7,)),
        # the triangle appears at frame 2, before the circle: no question about the circle
        ("count_when_appears", "how many shapes are there when the triangle appears?", "two",
         (2,)),
        ("colour_when_appears", "what colour is the square when the triangle appears?", "red",
         (2,)),
        ("direction_when_appears", "which way does the square move when the triangle appears?",
         "right", (2,)),
        # green and cyan are each held by one object, not at its first frame; red is held by two,
        # blue and yellow from their holder's first frame: no question about them
        ("shape_turns", "what shape turns green?", "square", (5, 6, 7, 8, 9)),
        ("shape_turns", "what shape turns cyan?", "circle", (6, 7)),
    ]
    got = _questions(objs, 10)
    assert len(got) == len(set(got)) and sorted(got) == sorted(want)

    # a still cross that leaves at frame 5 and a square that appears at frame 4 and stays
    cross = _obj("cross", 0, 5, 10, ["magenta"] * 3 + ["cyan"] * 3, ["still"] * 6, [(5, 5)] * 6)
    square = _obj("square", 4, 9, 10, ["red"] * 6, ["still"] * 6, [(20, 20)] * 6)
    want = [
        ("count_when_appears", "how many shapes are there when the square appears?", "two",
         (4,)),
        ("colour_when_appears", "what colour is the cross when the square appears?", "cyan",
         (4,)),
        ("direction_when_appears", "which way does the cross move when the square appears?",
         "still", (4,)),
        ("colour_when_leaves", "what colour is the square when the cross leaves?", "red", (5,)),
        ("shape_turns", "what shape turns cyan?", "cross", (3, 4, 5)),
    ]
    got = _questions([cross, square], 10)
    assert len(got) == len(set(got)) and sorted(got) == sorted(want)


#: Pixels of each sprite, counted by hand: a 7 x 7 square; the circle loses 3 pixels at each
#: corner; the triangle's rows hold 1, 1, 3, 3, 5, 5, 7 pixels; the cross is two 3 x 7 bars
#: sharing 3 x 3.
SPRITE_PIXELS = {"square": 49, "circle": 37, "triangle": 25, "cross": 33}


def _rgb(name: str) -> np.ndarray:
    return _RGB[COLOURS.index(name)]


def test_render_of_hand_built_video() -> None:
    video = _render(_three_objects(), 10, 32)
    assert video.shape == (10, 32, 32, 3) and video.dtype == np.uint8

    def count(f: int, colour: str) -> int:
        return int(np.all(video[f] == _rgb(colour), -1).sum())

    nonblack = np.any(video != 0, -1).sum((1, 2)).tolist()
    assert nonblack == [49, 49, 74, 111, 111, 111, 111, 111, 74, 74]
    assert (count(0, "red"), count(3, "red"), count(3, "blue"), count(3, "yellow")) == \
        (49, 49, 37, 25)
    assert (count(6, "green"), count(6, "cyan"), count(6, "red")) == (49, 37, 25)
    assert (count(9, "green"), count(9, "red"), count(9, "cyan")) == (49, 25, 0)
    # frame 3: the square fills rows 2-8, columns 5-11
    assert np.all(video[3, 2:9, 5:12] == _rgb("red"))
    assert not np.any(video[3, 2:9, 4]) and not np.any(video[3, 2:9, 12])
    # the circle at (20, 20): the centre is blue, the corner black
    assert np.all(video[3, 23, 20:27] == _rgb("blue")) and not np.any(video[3, 20, 20])
    # the triangle at (21, 2): apex at the top row's middle, full bottom row
    assert np.all(video[3, 21, 5] == _rgb("yellow")) and not np.any(video[3, 21, 4])
    assert np.all(video[3, 27, 2:9] == _rgb("yellow")) and not np.any(video[3, 28])


STEPS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0), "still": (0, 0)}


def _scene(frame: np.ndarray) -> dict[str, tuple[str, tuple[int, int]]]:
    """The objects of a frame read from its pixels: shape (from the pixel count) -> (colour,
    top-left corner of its 7 x 7 box)."""
    names = {tuple(int(v) for v in rgb): c for rgb, c in zip(_RGB, COLOURS, strict=True)}
    by_size = {n: s for s, n in SPRITE_PIXELS.items()}
    labels, n = ndimage.label(np.any(frame != 0, -1), structure=np.ones((3, 3)))
    out = {}
    for k in range(1, n + 1):
        rr, cc = np.nonzero(labels == k)
        assert rr.max() - rr.min() == 6 and cc.max() - cc.min() == 6  # one 7 x 7 sprite
        rgbs = np.unique(frame[rr, cc], axis=0)
        assert len(rgbs) == 1
        shape = by_size[len(rr)]
        assert shape not in out
        out[shape] = (names[tuple(int(v) for v in rgbs[0])], (int(rr.min()), int(cc.min())))
    return out


def test_every_generated_answer_and_evidence_is_read_from_the_pixels() -> None:
    data = generate(60, seed=1)
    frames = data.videos.shape[1]
    seen_types = set()
    for v in range(60):
        scenes = [_scene(f) for f in data.videos[v].numpy()]
        # the pixels agree with the generator's bookkeeping
        for o in data.objects[v]:
            for f in range(frames):
                have = SHAPES[o["shape"]] in scenes[f]
                assert have == (o["first"] <= f <= o["last"]) == (o["colour"][f] >= 0)
                if have:
                    assert scenes[f][SHAPES[o["shape"]]] == (COLOURS[o["colour"][f]],
                                                            tuple(o["pos"][f]))
        lives = {s: [f for f in range(frames) if s in scenes[f]] for s in SHAPES}
        for q in [q for q in data.questions if q.video == v]:
            seen_types.add(q.type)
            if m := re.fullmatch(r"what colour is the (\w+) when the (\w+) (appears|leaves)\?",
                                 q.text):
                a, b, event = m.groups()
                assert q.type == f"colour_when_{event}"
                e = lives[b][0] if event == "appears" else lives[b][-1]
                assert (e >= 1) if event == "appears" else (e <= frames - 2)
                assert q.evidence == (e,) and scenes[e][a][0] == q.answer
            elif m := re.fullmatch(r"how many shapes are there when the (\w+) appears\?", q.text):
                e = lives[m.group(1)][0]
                assert q.type == "count_when_appears" and e >= 1 and q.evidence == (e,)
                assert COUNTS[len(scenes[e]) - 1] == q.answer
            elif m := re.fullmatch(r"which way does the (\w+) move when the (\w+) appears\?",
                                   q.text):
                a, b = m.groups()
                e = lives[b][0]
                assert q.type == "direction_when_appears" and e >= 1 and q.evidence == (e,)
                (r0, c0), (r1, c1) = scenes[e - 1][a][1], scenes[e][a][1]
                assert (r1 - r0, c1 - c0) == STEPS[q.answer]
            else:
                m = re.fullmatch(r"what shape turns (\w+)\?", q.text)
                assert m is not None and q.type == "shape_turns", q
                colour = m.group(1)
                holders = {s for sc in scenes for s, (c, _) in sc.items() if c == colour}
                assert holders == {q.answer}  # the one object ever of that colour
                has = [f for f in range(frames)
                       if np.any(np.all(data.videos[v, f].numpy() == _rgb(colour), -1))]
                assert q.evidence == tuple(has)
                assert scenes[lives[q.answer][0]][q.answer][0] != colour  # not at first
    assert seen_types == set(QUESTION_TYPES)


# -- real features ---------------------------------------------------------------------------------


def _features(rng: np.random.Generator, lengths: dict[str, int], dim: int
              ) -> dict[str, np.ndarray]:
    return {v: rng.standard_normal((n, dim)).astype(np.float32) for v, n in lengths.items()}


def test_load_features_pads_videos_and_reads_questions(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    feats = _features(rng, {"b": 3, "a": 5, "c": 7}, 4)
    qs = [{"video": "b", "question": "What is it?", "answer": "x", "evidence": [0, 2]},
          {"video": "a", "question": "where?", "answer": "y", "split": "train"},
          {"video": "c", "question": "q3", "answer": "z", "split": "val", "type": "t1",
           "evidence": [6]},
          {"video": "b", "question": "q4", "answer": "x", "split": "test"}]
    write_features(tmp_path, {"a": feats["a"], "b": feats["b"]}, qs, fmt="npz")
    write_features(tmp_path, {"c": feats["c"]}, qs, fmt="pt")
    with (tmp_path / "qa.jsonl").open("a") as f:
        f.write("\n  \n")  # blank lines are skipped
    assert sorted(p.name for p in (tmp_path / "features").iterdir()) == ["a.npz", "b.npz", "c.pt"]
    data = load_features(tmp_path)
    assert not data.pixels and data.source == f"features from {tmp_path}"
    assert data.lengths.tolist() == [3, 5, 7]  # videos in order of first mention
    assert data.videos.shape == (3, 7, 4)
    for i, v in enumerate("bac"):
        n = feats[v].shape[0]
        assert torch.equal(data.videos[i, :n], torch.from_numpy(feats[v]))
        assert not data.videos[i, n:].any()
    assert data.questions == [Question(0, "What is it?", "x", "", (0, 2), "train"),
                              Question(1, "where?", "y", "", (), "train"),
                              Question(2, "q3", "z", "t1", (6,), "val"),
                              Question(0, "q4", "x", "", (), "test")]
    assert [q.text for q in data.split("train")] == ["What is it?", "where?"]
    # float32 (as documented) whatever torch's default dtype (float64 in the tests)
    assert data.videos.dtype == torch.float32
    # an .npz holding one array under another name
    np.savez(tmp_path / "features" / "a.npz", other=feats["a"] * 2)
    assert torch.equal(load_features(tmp_path).videos[1, :5], torch.from_numpy(feats["a"] * 2))


def _bad(folder: Path, lines: list[str], feats: dict[str, np.ndarray]) -> Path:
    write_features(folder, feats, [])
    (folder / "qa.jsonl").write_text("".join(x + "\n" for x in lines))
    return folder


def test_load_features_errors_name_the_file_and_line(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    feats = _features(rng, {"a": 5, "b": 3}, 4)
    ok = json.dumps({"video": "a", "question": "q", "answer": "x"})

    def raises(folder: Path, pattern: str) -> None:
        with pytest.raises(DataError, match=pattern):
            load_features(folder)

    qa = re.escape(str(tmp_path / "missing" / "qa.jsonl"))
    (tmp_path / "missing").mkdir()
    raises(tmp_path / "missing", f"{qa}' not found")
    d = _bad(tmp_path / "novideo", [ok, json.dumps({"video": "zz", "question": "q",
                                                    "answer": "x"})], feats)
    raises(d, re.escape(str(d / "qa.jsonl")) + r"', line 2: no features for video 'zz' .*"
           + re.escape(str(d / "features" / "zz.npz")))
    d = _bad(tmp_path / "json", [ok, "", '{"video": "a", "question":'], feats)
    raises(d, re.escape(str(d / "qa.jsonl")) + "', line 3: not JSON")
    d = _bad(tmp_path / "fields", [json.dumps({"video": "a", "question": "q"})], feats)
    raises(d, "line 1: need string fields video, question and answer")
    d = _bad(tmp_path / "split", [ok, json.dumps({"video": "b", "question": "q", "answer": "x",
                                                  "split": "dev"})], feats)
    raises(d, re.escape(str(d / "qa.jsonl")) + "', line 2: split must be one of .*'dev'")
    for ev in ([3], [-1], [0, 1.0], 2):
        d = _bad(tmp_path / f"ev{ev}", [json.dumps({"video": "b", "question": "q",
                                                    "answer": "x", "evidence": ev})], feats)
        raises(d, re.escape(str(d / "qa.jsonl")) + r"', line 1: evidence must be a list of "
               r"frame indices in \[0, 3\) for video 'b'")
    d = _bad(tmp_path / "size", [ok, json.dumps({"video": "b", "question": "q", "answer": "x"})],
             {"a": feats["a"], "b": np.zeros((3, 5), dtype=np.float32)})
    raises(d, re.escape(str(d / "features" / "b.npz")) + "' has 5 features a frame, the videos "
           "before it 4")
    d = _bad(tmp_path / "dims", [ok], {"a": np.zeros(5, dtype=np.float32)})
    raises(d, re.escape(str(d / "features" / "a.npz")) + r"' must hold a \(T, F\) numeric array")
    d = _bad(tmp_path / "two", [ok], {})
    np.savez(d / "features" / "a.npz", x=feats["a"], y=feats["a"])
    raises(d, re.escape(str(d / "features" / "a.npz")) + r"' holds arrays \['x', 'y'\]")
    d = _bad(tmp_path / "empty", [""], {})
    raises(d, "holds no questions")


def _feature_run_folder(folder: Path) -> Path:
    """12 videos of 4-9 frames of 5 features, 3 questions each (8 train, 2 val, 2 test videos),
    evidence for two questions of three."""
    rng = np.random.default_rng(1)
    lengths = {f"v{i}": int(rng.integers(4, 10)) for i in range(12)}
    feats = _features(rng, lengths, 5)
    qs = []
    for i, (v, n) in enumerate(lengths.items()):
        split = "train" if i < 8 else "val" if i < 10 else "test"
        for k in range(3):
            e: dict[str, Any] = {"video": v, "question": f"what is thing {k}?",
                                 "answer": ["yes", "no", "maybe"][(i + k) % 3], "split": split,
                                 "type": f"kind{k}"}
            if k < 2:
                e["evidence"] = [int(rng.integers(0, n))]
            qs.append(e)
    return write_features(folder, feats, qs, fmt="pt")


@pytest.mark.usefixtures("float32_default")
def test_smoke_run_on_real_features(tmp_path: Path) -> None:
    folder = _feature_run_folder(tmp_path / "feats")
    res = main(["--features", str(folder), "--smoke-test", "--mode", "two-level",
                "--segment-len", "3", "--out-dir", str(tmp_path / "run")] + QUIET)
    assert res["data"] == f"features from {folder}" and res["videos"] == 12
    assert res["config"]["feature_dim"] == 5 and res["train_questions"] == 24
    assert res["frames"] == max(int(x) for x in load_features(folder).lengths)
    for split in ("valid", "test"):
        r = res[split]
        assert r["questions"] == 6 and r["with_evidence"] == 4
        assert 0.0 <= r["accuracy"] <= 1.0 and math.isfinite(r["nll"]) and r["nll"] >= 0.0
        for k in ("ground_prior", "ground_posterior", "ground_segment"):
            assert 0.0 <= r[k] <= 1.0
        assert sorted(r["accuracy_by_type"]) == ["kind0", "kind1", "kind2"]
    assert (tmp_path / "run" / "alignments.png").is_file()


# -- GIFs ------------------------------------------------------------------------------------------


@TGIF_DATA.needed
def test_decode_the_tgif_qa_gifs() -> None:
    folder = TGIF_DATA.folder / "tgif-qa"
    full = {}
    for name, n in (("1.gif", 45), ("2.gif", 76), ("3.gif", 42), ("4.gif", 27)):
        x = decode_gif(folder / name)
        assert x.shape == (n, 225, 225, 3) and x.dtype == np.uint8
        assert x.std() > 10  # real pictures, not blank frames
        full[name] = x
    x = full["1.gif"]
    assert not np.array_equal(x[0], x[-1])
    # 45 frames, 5 evenly spaced: every 11th
    sub = decode_gif(folder / "1.gif", max_frames=5)
    assert np.array_equal(sub, x[[0, 11, 22, 33, 44]])
    assert np.array_equal(decode_gif(folder / "1.gif", max_frames=45), x)
    small = decode_gif(folder / "4.gif", size=32, max_frames=2)
    assert small.shape == (2, 32, 32, 3) and small.dtype == np.uint8
    big = full["4.gif"][[0, -1]].astype(np.float64)
    # a resized frame keeps the colour of each region: compare 4 x 4 blocks' means
    blocks = big[:, :224, :224].reshape(2, 4, 56, 4, 56, 3).mean((2, 4))
    got = small.astype(np.float64).reshape(2, 4, 8, 4, 8, 3).mean((2, 4))
    assert np.abs(got - blocks).max() < 12


def test_decode_gif_of_known_colours_and_errors(tmp_path: Path) -> None:
    from PIL import Image

    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    frames = [Image.new("RGB", (16, 12), c) for c in colours]
    path = tmp_path / "flat.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    x = decode_gif(path)
    assert x.shape == (3, 12, 16, 3)
    assert np.array_equal(x, np.broadcast_to(np.array(colours, dtype=np.uint8)[:, None, None],
                                             x.shape))
    y = decode_gif(path, size=8, max_frames=2)
    assert np.array_equal(y, np.broadcast_to(np.array(colours, dtype=np.uint8)[[0, 2], None, None],
                                             (2, 8, 8, 3)))
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "missing.gif")) + "' not found"):
        decode_gif(tmp_path / "missing.gif")
    (tmp_path / "text.gif").write_text("not a picture")
    with pytest.raises(DataError, match="cannot decode '" + re.escape(str(tmp_path / "text.gif"))):
        decode_gif(tmp_path / "text.gif")


@TGIF_DATA.needed
def test_load_tgif_qa_matches_qa_json() -> None:
    folder = TGIF_DATA.folder
    entries = json.loads((folder / "tgif-qa" / "qa.json").read_text())
    got = load_tgif_qa(folder)
    assert len(got) == len(entries) == 4
    for q, e in zip(got, entries, strict=True):
        assert q.gif == folder / "tgif-qa" / e["gif"] and q.gif.is_file()
        assert (q.type, q.question, q.answer) == (e["type"], e["question"], e["answer"])
    assert got[0].answer == "7 times" and got[3].question == "What is the color of the bulldog?"


# -- the model: exact likelihoods against brute force ----------------------------------------------


def _brute_two_level(log_p1: Tensor, log_p2: Tensor, log_lik: Tensor | None
                     ) -> tuple[list[float], list[tuple[int, int]], Tensor]:
    """Per batch element: log Z, the argmax (z1, z2) and the marginal of z1, by a double loop."""
    b, g, seg = log_p2.shape
    log_z, argmax, marg = [], [], torch.zeros(b, g, dtype=torch.float64)
    for i in range(b):
        terms = {}
        for z1 in range(g):
            for z2 in range(seg):
                t = float(log_p1[i, z1]) + float(log_p2[i, z1, z2])
                if log_lik is not None:
                    t += float(log_lik[i, z1, z2])
                terms[z1, z2] = t
        vals = torch.tensor(list(terms.values()), dtype=torch.float64)
        lz = float(torch.logsumexp(vals, 0))
        log_z.append(lz)
        argmax.append(max(terms, key=lambda k: (terms[k], -k[0], -k[1])))
        if lz > -math.inf:
            for (z1, _), t in terms.items():
                marg[i, z1] += math.exp(t - lz)
    return log_z, argmax, marg


def test_two_level_graph_equals_brute_force() -> None:
    gen = torch.Generator().manual_seed(5)
    b, g, seg = 4, 3, 4
    log_p1 = torch.randn(b, g, generator=gen, dtype=torch.float64)
    log_p2 = torch.randn(b, g, seg, generator=gen, dtype=torch.float64)
    log_lik = torch.randn(b, g, seg, generator=gen, dtype=torch.float64) * 2
    log_p1[0, 2] = -math.inf  # a padded segment
    log_p2[1, 1, 2:] = -math.inf  # padded frames
    log_lik[2, 0, :3] = -math.inf  # impossible answers
    log_p2[3] = -math.inf  # nothing possible: log Z = -inf
    for lik in (log_lik, None):
        graph = two_level_graph(log_p1, log_p2, lik)
        log_z, argmax, marg = _brute_two_level(log_p1, log_p2, lik)
        got = graph.log_partition()
        assert got.shape == (b,) and got[3] == -math.inf
        assert torch.allclose(got[:3], torch.tensor(log_z[:3]), rtol=1e-10, atol=0)
        mp = graph.map()
        for i in range(3):
            assert (int(mp["z1"][i]), int(mp["z2"][i])) == argmax[i]
        m = graph.marginals()["z1"]
        assert torch.allclose(m, marg, rtol=0, atol=1e-10)
        assert torch.equal(m[3], torch.zeros(g, dtype=torch.float64))
    assert argmax[0][0] != 2 and argmax[1] not in ((1, 2), (1, 3))


def _double(model: VideoQA) -> VideoQA:
    """The model in float64 (the frame encoder casts its input to its parameters' dtype)."""
    model.double().eval()
    return model


def _feature_batch(tmp_path: Path) -> tuple[Any, list[Question], Vocab]:
    """Videos of 7, 5 and 3 frames (not all multiples of the segment length 3) with 5
    questions."""
    rng = np.random.default_rng(2)
    feats = _features(rng, {"a": 7, "b": 5, "c": 3}, 4)
    qs = [{"video": v, "question": text, "answer": ans} for v, text, ans in
          [("a", "what colour is it?", "red"), ("b", "what shape is it?", "square"),
           ("a", "which way does it move?", "left"), ("c", "what colour is it?", "blue"),
           ("c", "what shape is it?", "circle")]]
    data = load_features(write_features(tmp_path, feats, qs))
    assert data.lengths.tolist() == [7, 5, 3]
    return data, data.questions, Vocab.build(data.questions)


def _single(model: VideoQA, data: Any, qs: list[Question], vocab: Vocab, i: int
            ) -> tuple[Tensor, Tensor]:
    """Frame memory ``(T_i, D)`` (real frames only) and question vector of question ``i``,
    encoded alone."""
    b = collate(data, qs, vocab, [i])
    b.videos = b.videos.double()
    mem, q = model.encode(b)
    assert mem.shape[1] == int(data.lengths[qs[i].video])
    return mem[0], q[0]


def _brute_log_pred(model: VideoQA, mem: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """``(log p(z = t) (T,), log p(a | z = t) (T, A))`` by the mode's definition, from the
    model's submodules, over the real frames of one question."""
    t = mem.shape[0]
    frame = model.attention.score(q[None, None], mem[None]).reshape(t)
    ans = model.answer_log_probs(mem[None], q[None])[0]
    if model.config.mode != "two-level":
        return torch.log_softmax(frame, 0), ans
    seg = model.config.segment_len
    segments = [list(range(s, min(s + seg, t))) for s in range(0, t, seg)]
    means = torch.stack([mem[f].mean(0) for f in segments])
    seg_scores = model.segment_score(q[None, None], means[None]).reshape(len(segments))
    log_p1 = torch.log_softmax(seg_scores, 0)
    prior = []
    for f in range(t):
        within = frame[segments[f // seg]]
        prior.append(log_p1[f // seg] + frame[f] - torch.logsumexp(within, 0))
    return torch.stack(prior), ans


@pytest.mark.parametrize("mode", ["two-level", "marginal"])
def test_exact_likelihood_and_predictions_equal_brute_force(mode: str, tmp_path: Path) -> None:
    data, qs, vocab = _feature_batch(tmp_path)
    model = _double(VideoQA(ModelConfig(len(vocab.words), len(vocab.answers), mode=mode,
                                        feature_dim=4, dim=8, embed=6, segment_len=3)))
    batch = collate(data, qs, vocab, list(range(len(qs))))
    batch.videos = batch.videos.double()
    with torch.no_grad():
        losses = model.losses(batch)
        res = model.analyse(batch)
    assert losses.dtype == torch.float64 and res["log_pred"].shape == (5, len(vocab.answers))
    for i, qn in enumerate(qs):
        with torch.no_grad():
            log_prior, ans = _brute_log_pred(model, *_single(model, data, qs, vocab, i))
        t = log_prior.shape[0]
        assert float(log_prior.exp().sum()) == pytest.approx(1.0, abs=1e-12)
        a = vocab.answer_index[qn.answer]
        log_pred = torch.logsumexp(log_prior[:, None] + ans, 0)  # (A,)
        assert float(losses[i]) == pytest.approx(-float(log_pred[a]), rel=1e-10)
        assert torch.allclose(res["log_pred"][i], log_pred, rtol=1e-10, atol=1e-12)
        assert torch.allclose(res["prior"][i, :t], log_prior.exp(), rtol=0, atol=1e-12)
        assert not res["prior"][i, t:].any()
        joint = log_prior + ans[:, a]
        post = (joint - torch.logsumexp(joint, 0)).exp()
        assert torch.allclose(res["posterior"][i, :t], post, rtol=0, atol=1e-12)
        assert int(res["posterior_map"][i]) == int(post.argmax())
        assert int(res["prior_map"][i]) == int(log_prior.argmax())
        if mode == "two-level":
            seg = res["segment_posterior"][i]
            want = torch.zeros(3, dtype=torch.float64).index_add_(
                0, torch.arange(t) // 3, post)
            assert torch.allclose(seg, want, rtol=0, atol=1e-12)
    assert bool((res["log_pred"].exp().sum(-1) - 1).abs().max() < 1e-12)


# -- end to end ------------------------------------------------------------------------------------


def _best_entry(history: list[dict[str, Any]]) -> dict[str, Any]:
    return max(history, key=lambda h: (h["valid_accuracy"], -h["valid_nll"]))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.usefixtures("float32_default")
def test_smoke_run_of_every_mode(mode: str, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m examples.video_qa --smoke-test --mode MODE``, in process."""
    out = tmp_path / "run"
    res = main(["--mode", mode, "--smoke-test", "--out-dir", str(out)] + QUIET)
    # the run ends by saying where its files are
    assert capsys.readouterr().out.endswith(
        f"examples.video_qa: wrote\n  results: {out / 'results.json'}\n"
        f"  checkpoint: {out / 'checkpoint.pt'}\n  best model: {out / 'best.pt'}\n"
        f"  figures: {out / 'alignments.png'}\n")
    assert res["mode"] == mode and res["epochs"] == 2 and res["steps"] == 16
    assert res["config"]["dim"] == 32 and res["train_questions"] == 64
    assert len(res["history"]) == 2 and all(h["complete"] for h in res["history"])
    for name in ("results.json", "best.pt", "checkpoint.pt", "alignments.png"):
        assert (out / name).is_file(), name
    assert (out / "alignments.png").stat().st_size > 1000
    assert json.loads((out / "results.json").read_text())["test"] == \
        json.loads(json.dumps(res["test"]))
    want = {"ground_prior"}
    if mode != "soft":
        want.add("ground_posterior")
    if mode.startswith("variational"):
        want.add("ground_q")
    if mode == "two-level":
        want.add("ground_segment")
    for split in ("valid", "test"):
        r = res[split]
        assert r["questions"] == r["with_evidence"] == 8
        assert 0.0 <= r["accuracy"] <= 1.0 and math.isfinite(r["nll"]) and r["nll"] >= 0.0
        assert {k for k in r if k.startswith("ground_")} == want
        near = {k.replace("ground_", "near_") for k in want if k != "ground_segment"}
        assert {k for k in r if k.startswith("near_")} == near
        assert all(r[k.replace("near_", "ground_")] <= r[k] <= 1.0 for k in near)
        assert all(0.0 <= r[k] <= 1.0 for k in want)
        assert set(r["accuracy_by_type"]) <= set(QUESTION_TYPES)
    # the evaluated model is the best epoch's (best.pt)
    best = _best_entry(res["history"])
    assert res["best_epoch"] == best["epoch"]
    assert res["valid"]["accuracy"] == best["valid_accuracy"]
    assert res["valid"]["nll"] == pytest.approx(best["valid_nll"], rel=1e-9)


class _Crash(Exception):
    pass


def _params(path: Path) -> dict[str, Tensor]:
    return torch.load(path, weights_only=False)["model"]


def _same_run(a: dict[str, Any], b: dict[str, Any], dir_a: Path, dir_b: Path) -> None:
    """Identical parameters, optimizer state, history (the train loss of an epoch interrupted
    and resumed included) and results, up to the training time."""
    for name in ("checkpoint.pt", "best.pt"):
        pa, pb = _params(dir_a / name), _params(dir_b / name)
        assert pa.keys() == pb.keys()
        for k in pa:
            assert torch.equal(pa[k], pb[k]), (name, k)
    oa = torch.load(dir_a / "checkpoint.pt", weights_only=False)["optim"]["state"]
    ob = torch.load(dir_b / "checkpoint.pt", weights_only=False)["optim"]["state"]
    for k in oa:
        assert torch.equal(oa[k]["exp_avg_sq"], ob[k]["exp_avg_sq"])

    def strip(h: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in e.items() if k != "train_seconds"} for e in h]

    assert (a["epochs"], a["steps"]) == (b["epochs"], b["steps"])
    assert strip(a["history"]) == strip(b["history"])
    assert a["test"] == b["test"] and a["valid"] == b["valid"]


@pytest.mark.usefixtures("float32_default")
def test_interrupted_run_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A run killed in its second epoch (the last checkpoint 2 steps before) and resumed ends
    with the uninterrupted run's parameters; REINFORCE samples make every step random."""
    base = ["--mode", "hard-sample", "--smoke-test", "--cache-dir", str(tmp_path / "cache")]
    base += QUIET
    straight = main(base + ["--out-dir", str(tmp_path / "straight")])
    step = vqtrain.Trainer.step

    def crash(self: vqtrain.Trainer, batch: Any) -> Tensor:
        if self.steps == 11:  # checkpoints every 3 steps: the last one was at step 9
            raise _Crash
        return step(self, batch)

    monkeypatch.setattr(vqtrain.Trainer, "step", crash)
    with pytest.raises(_Crash):
        main(base + ["--out-dir", str(tmp_path / "resumed")])
    monkeypatch.setattr(vqtrain.Trainer, "step", step)
    st = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert (st["epoch"], st["step_in_epoch"], st["steps"]) == (1, 1, 9)
    with pytest.raises(FileExistsError, match="pass --resume"):
        main(base + ["--out-dir", str(tmp_path / "resumed")])
    capsys.readouterr()
    resumed = main(base + ["--out-dir", str(tmp_path / "resumed"), "--resume"])
    # the log calls the first epoch "epoch 1", and so does the resume message: the second epoch,
    # one of its steps done
    out = capsys.readouterr().out
    ckpt = tmp_path / "resumed" / "checkpoint.pt"
    assert f"resumed from {ckpt}: epoch 2 of 2, 1 of its 8 steps done (9 steps in all)\n" in out
    assert "epoch 2: train loss" in out and "epoch 1: train loss" not in out
    # the resumed epoch's train loss averages only the steps taken after the resume
    _same_run(straight, resumed, tmp_path / "straight", tmp_path / "resumed")


@pytest.mark.usefixtures("float32_default")
def test_more_epochs_after_a_finished_run(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """``--epochs 1`` then ``--epochs 2 --resume`` trains the second epoch exactly as a straight
    ``--epochs 2`` run (``--smoke-test`` keeps an explicit ``--epochs``)."""
    base = ["--mode", "soft", "--smoke-test", "--cache-dir", str(tmp_path / "cache")] + QUIET
    straight = main(base + ["--out-dir", str(tmp_path / "straight"), "--epochs", "2"])
    capsys.readouterr()
    one = main(base + ["--out-dir", str(tmp_path / "resumed"), "--epochs", "1"])
    assert (one["epochs"], one["steps"]) == (1, 8)
    assert "epoch 1: train loss" in capsys.readouterr().out
    ckpt = tmp_path / "resumed" / "checkpoint.pt"
    again = main(base + ["--out-dir", str(tmp_path / "resumed"), "--epochs", "1", "--resume"])
    assert f"resumed from {ckpt}: all 1 epochs done (8 steps in all); evaluating" in \
        capsys.readouterr().out
    assert again["test"] == one["test"] and again["steps"] == 8
    resumed = main(base + ["--out-dir", str(tmp_path / "resumed"), "--epochs", "2", "--resume"])
    assert f"resumed from {ckpt}: epoch 2 of 2, 0 of its 8 steps done (8 steps in all)\n" in \
        capsys.readouterr().out
    _same_run(straight, resumed, tmp_path / "straight", tmp_path / "resumed")


def _cli(capsys: pytest.CaptureFixture[str], cli: Any, argv: list[str]
         ) -> subprocess.CompletedProcess[str]:
    """``cli(argv)`` in process, as the command line runs it: its exit status and output."""
    capsys.readouterr()
    code: Any = 0
    try:
        cli(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


@pytest.mark.usefixtures("float32_default")
def test_resume_with_other_options_is_refused(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A resume with another option than the checkpoint's is refused before any tensor is
    loaded, naming the option: the mode, a size, and the learning rate (which fits any shape)."""
    out = tmp_path / "run"
    base = ["--smoke-test", "--epochs", "1", "--out-dir", str(out)] + QUIET
    main(base + ["--mode", "marginal"])
    ckpt = out / "checkpoint.pt"
    before = ckpt.read_bytes()
    ckpt_re = re.escape(str(ckpt))
    with pytest.raises(ExampleError, match=f"checkpoint '{ckpt_re}' was written with other "
                                           "options \\(--mode 'marginal' -> 'soft'\\)"):
        main(base + ["--mode", "soft", "--resume"])
    with pytest.raises(ExampleError, match=f"'{ckpt_re}' .*\\(--dim 32 -> 16\\)"):
        main(base + ["--mode", "marginal", "--dim", "16", "--resume"])
    with pytest.raises(ExampleError, match=f"'{ckpt_re}' .*\\(--lr 0.002 -> 0.01\\)"):
        main(base + ["--mode", "marginal", "--lr", "0.01", "--resume"])
    # more epochs, a new cache folder or checkpoint interval are no other run
    res = main(base + ["--mode", "marginal", "--epochs", "2", "--checkpoint-every", "5",
                       "--cache-dir", str(tmp_path / "cache2"), "--resume"])
    assert res["epochs"] == 2 and ckpt.read_bytes() != before
    # the command line turns the refusals into one-line errors
    r = _cli(capsys, vqtrain.cli, base + ["--mode", "marginal", "--lr", "0.01", "--resume"])
    assert_one_line_error(r, "examples.video_qa", str(ckpt), "--lr 0.002 -> 0.01",
                          "resume with the same options")
    r = _cli(capsys, vqtrain.cli, base + ["--mode", "marginal"])
    assert_one_line_error(r, "examples.video_qa", "pass --resume", "another --out-dir")


def test_two_process_gloo_data_parallel_smoke_run(tmp_path: Path) -> None:
    """``python -m examples.video_qa --smoke-test`` through the command line, as two processes
    under torchrun (the in-process runs above cover one process)."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "examples.video_qa", "--smoke-test", "--mode", "two-level",
           "--out-dir", str(out)] + QUIET
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600,
                       check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["world_size"] == 2 and res["replicas_identical"] is True
    # 8 batches an epoch, 4 a process: 8 steps a process in 2 epochs
    assert res["steps"] == 8 and res["epochs"] == 2
    assert "replicas' parameters are identical" in r.stdout
    assert "test: accuracy" in r.stdout and 0.0 <= res["test"]["accuracy"] <= 1.0


# -- the report and the TGIF demo -----------------------------------------------------------------


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Smoke runs of ``soft`` and ``variational-enum`` into one folder (float32, as users run)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    root = tmp_path_factory.mktemp("runs")
    try:
        for mode in ("soft", "variational-enum"):
            main(["--mode", mode, "--smoke-test", "--out-dir", str(root / mode), "--cache-dir",
                  str(root / "cache")] + QUIET)
    finally:
        torch.set_default_dtype(old)
    return root


@pytest.mark.usefixtures("float32_default")
def test_evaluate_equals_a_per_question_recount(two_runs: Path) -> None:
    """results.json's test accuracy, NLL and grounding equal a recount that analyses each test
    question alone with the saved best model."""
    model, vocab, res = vqtrain.load_run(two_runs / "variational-enum")
    a = res["data_args"]
    data = load_or_generate(two_runs / "cache", a["videos"], a["frames"], a["size"],
                            a["questions_per_video"], a["data_seed"])
    test = data.split("test")
    correct = nll = 0.0
    hits = {"prior": 0, "posterior": 0, "q": 0}
    near = dict.fromkeys(hits, 0)
    for i, q in enumerate(test):
        r = model.analyse(collate(data, test, vocab, [i]))
        answer = vocab.answer_index[q.answer]
        correct += float(int(r["log_pred"][0].argmax()) == answer)
        nll -= float(r["log_pred"][0, answer])
        for k in hits:
            z = int(r[k][0].argmax())
            hits[k] += int(z in q.evidence)
            near[k] += int(any(abs(z - e) <= 1 for e in q.evidence))
    t = res["test"]
    by_type: dict[str, list[tuple[int, int]]] = {}
    for i, q in enumerate(test):
        r = model.analyse(collate(data, test, vocab, [i]))
        by_type.setdefault(q.type, []).append(
            (int(int(r["prior"][0].argmax()) in q.evidence),
             int(int(r["q"][0].argmax()) in q.evidence)))
    for typ, hits_t in by_type.items():
        g = t["grounding_by_type"][typ]
        assert set(g) == {"prior", "posterior", "q", "near_prior", "near_posterior", "near_q"}
        assert g["prior"] == pytest.approx(sum(h[0] for h in hits_t) / len(hits_t))
        assert g["q"] == pytest.approx(sum(h[1] for h in hits_t) / len(hits_t))
    assert t["accuracy"] == pytest.approx(correct / len(test))
    assert t["nll"] == pytest.approx(nll / len(test), rel=1e-5)
    for k, n in hits.items():
        assert t[f"ground_{k}"] == pytest.approx(n / len(test)), k
        assert t[f"near_{k}"] == pytest.approx(near[k] / len(test)), k


def test_report_table_and_figure(two_runs: Path, tmp_path: Path) -> None:
    from examples.video_qa import report

    table = tmp_path / "table.md"
    fig = tmp_path / "alignments.png"
    text = report.main([str(two_runs), "--table", str(table), "--figure", str(fig),
                        "--cache-dir", str(two_runs / "cache")])
    assert table.read_text() == text and fig.stat().st_size > 1000
    main_table, by_type = text.split("\n\n")
    rows = [r for r in main_table.splitlines() if r.startswith(("| soft", "| var"))]
    assert len(rows) == 2
    header, _, *type_rows = by_type.splitlines()
    heads = [c.strip() for c in header.split("|")[2:-1]]
    assert len(heads) == 3 * sum(h.startswith("accuracy") for h in heads)
    types = [h.split(": ")[1].replace(" ", "_") for h in heads if h.startswith("accuracy")]
    assert len(type_rows) == 2 and set(types) <= set(QUESTION_TYPES)
    for row in type_rows:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        t = json.loads((two_runs / cells[0] / "results.json").read_text())["test"]
        acc, gr = t["accuracy_by_type"], t["grounding_by_type"]
        assert cells[1:1 + len(types)] == [f"{100 * acc[k]:.1f}" for k in types]
        n = len(types)
        assert cells[1 + n:1 + 2 * n] == [
            f"{100 * gr[k]['prior']:.1f}" + (f" / {100 * gr[k]['q']:.1f}" if "q" in gr[k] else "")
            for k in types]
        assert cells[1 + 2 * n:] == [f"{100 * gr[k]['near_prior']:.1f}" for k in types]
    for row in rows:
        mode = row.split("|")[1].strip()
        t = json.loads((two_runs / mode / "results.json").read_text())["test"]
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells[1] == f"{100 * t['accuracy']:.1f}" and cells[2] == f"{t['nll']:.3f}"
        assert cells[3] == f"{100 * t['ground_prior']:.1f}"
        assert cells[5] == ("" if mode == "soft" else f"{100 * t['ground_q']:.1f}")
        assert cells[7] == " / ".join(f"{100 * t[f'near_{k}']:.1f}" if f"near_{k}" in t
                                      else "–" for k in ("prior", "posterior", "q"))
    with pytest.raises(ExampleError, match="neither a run folder"):
        report.main([str(tmp_path / "missing")])


@TGIF_DATA.needed
@pytest.mark.usefixtures("float32_default")
def test_tgif_demo_on_real_gifs(two_runs: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m examples.video_qa.tgif``: untrained models of every mode (--smoke-test), and
    trained runs, on the four real GIFs; each prior is a distribution over the kept frames
    (``markov``'s is each frame's probability of being in the needle)."""
    from examples.video_qa import tgif

    rep = tgif.main(["--smoke-test", "--out-dir", str(tmp_path / "smoke"), "--max-frames", "12",
                     "--no-progress"])
    assert [e["gif"] for e in rep["questions"]] == ["1.gif", "2.gif", "3.gif", "4.gif"]
    for e in rep["questions"]:
        assert e["frames"] == 12
        assert set(e["modes"]) == {f"{m} (untrained)" for m in MODES}
        for name, v in e["modes"].items():
            assert len(v["prior"]) == 12
            if name == "markov (untrained)":  # p(h_t = in): each in [0, 1], summing to the
                # expected needle length, not to one
                assert all(0.0 <= p <= 1.0 for p in v["prior"]) and sum(v["prior"]) > 0
            else:
                assert sum(v["prior"]) == pytest.approx(1.0, abs=1e-3)
    assert (tmp_path / "smoke" / "tgif_alignments.png").stat().st_size > 1000
    runs = [str(two_runs / "soft"), str(two_runs / "variational-enum")]
    capsys.readouterr()
    rep = tgif.main(["--runs", *runs, "--out-dir", str(tmp_path / "runs")])
    out, err = capsys.readouterr()
    # a progress bar over the four GIFs (stderr), then where the files are
    assert "GIFs: 100%" in err and "4/4" in err
    assert f"examples.video_qa.tgif: wrote\n  results: {tmp_path / 'runs' / 'tgif.json'}\n" \
        f"  figures: {tmp_path / 'runs' / 'tgif_alignments.png'}" in out
    e = rep["questions"][3]  # 4.gif: 27 frames, all kept
    assert e["frames"] == 27 and set(e["modes"]) == {"soft", "variational-enum"}
    # the generated data's vocabulary knows "what", "is", "the", "of" but not "bulldog"
    assert "bulldog" not in e["modes"]["soft"]["known_words"]
    assert "what" in e["modes"]["soft"]["known_words"]
    with pytest.raises(SystemExit) as exit_:  # a usage error, before any data is read
        tgif.main(["--out-dir", str(tmp_path / "none")])
    assert exit_.value.code == 2 and "give --runs RUN_DIR" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


# -- the command line: refusals, one-line errors, option checks, Ctrl-C --------------------------


def _files(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of ``folder``: its bytes and its modification time."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())
            if p.is_file()}


@pytest.mark.usefixtures("float32_default")
def test_a_second_run_into_a_run_folder_is_refused(two_runs: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Without --resume, a run never overwrites another's checkpoint, best model, results or
    figure: any one of them is enough to refuse, and the files are left as they were."""
    run = tmp_path / "soft"
    shutil.copytree(two_runs / "soft", run)
    before = _files(run)
    assert {"checkpoint.pt", "best.pt", "results.json", "alignments.png"} <= set(before)
    def argv(out: Path) -> list[str]:
        return ["--mode", "soft", "--smoke-test", "--out-dir", str(out), "--cache-dir",
                str(two_runs / "cache")] + QUIET

    with pytest.raises(RunExistsError, match=re.escape(f"{run / 'checkpoint.pt'} exists: pass "
                                                       "--resume")):
        main(argv(run))
    r = _cli(capsys, vqtrain.cli, argv(run))
    assert_one_line_error(r, "examples.video_qa", str(run / "checkpoint.pt"), "pass --resume",
                          "choose another --out-dir")
    assert _files(run) == before
    for name in ("best.pt", "results.json", "alignments.png"):
        alone = tmp_path / f"only-{name}"
        alone.mkdir()
        shutil.copy2(run / name, alone / name)
        with pytest.raises(RunExistsError, match=re.escape(f"{alone / name} exists")):
            main(argv(alone))
        assert [p.name for p in alone.iterdir()] == [name]


@pytest.mark.usefixtures("float32_default")
def test_damaged_files_are_named(two_runs: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A garbage or truncated checkpoint, best model or results file: a one-line error that
    names the file, from the trainer's --resume and from the report."""
    from examples.video_qa import report

    run = tmp_path / "soft"
    shutil.copytree(two_runs / "soft", run)
    argv = ["--mode", "soft", "--smoke-test", "--out-dir", str(run), "--cache-dir",
            str(two_runs / "cache"), "--resume"] + QUIET
    ckpt = run / "checkpoint.pt"
    whole = ckpt.read_bytes()
    for damaged in (b"not a checkpoint at all", whole[:len(whole) // 2]):
        ckpt.write_bytes(damaged)
        r = _cli(capsys, vqtrain.cli, argv)
        assert_one_line_error(r, "examples.video_qa", f"checkpoint {str(ckpt)!r}", "damaged",
                              "delete it")
    # another program's torch file
    torch.save({"step": 3}, ckpt)
    r = _cli(capsys, vqtrain.cli, argv)
    assert_one_line_error(r, "examples.video_qa", str(ckpt), "not a checkpoint of "
                          "examples.video_qa")
    best = run / "best.pt"
    best.write_bytes(best.read_bytes()[:100])
    r = _cli(capsys, lambda a: report_cli(report, a),
             [str(run), "--figure", str(tmp_path / "f.png"), "--cache-dir",
              str(two_runs / "cache")])
    assert_one_line_error(r, "examples.video_qa.report", str(best), "damaged")
    assert not (tmp_path / "f.png").exists()
    (run / "results.json").write_text('{"mode": "soft", "te')
    r = _cli(capsys, lambda a: report_cli(report, a), [str(run)])
    assert_one_line_error(r, "examples.video_qa.report", str(run / "results.json"), "not JSON")
    (run / "results.json").write_text('{"mode": "soft"}')
    r = _cli(capsys, lambda a: report_cli(report, a), [str(run)])
    assert_one_line_error(r, "examples.video_qa.report", str(run / "results.json"),
                          "not a results file")
    r = _cli(capsys, lambda a: report_cli(report, a), [str(tmp_path / "missing")])
    assert_one_line_error(r, "examples.video_qa.report", str(tmp_path / "missing"),
                          "neither a run folder")


def report_cli(report: Any, argv: list[str]) -> None:
    from examples.common import run_cli

    run_cli(report.PROG, report.main, argv)


def test_input_errors_are_one_line_and_leave_no_folder(tmp_path: Path) -> None:
    """The processes themselves: a missing feature folder, no data folder or a wrong one for the
    TGIF demo, and an unknown or absent device each end in one line; no --out-dir is made."""
    new = tmp_path / "new" / "run"
    r = run_example("examples.video_qa", "--features", str(tmp_path / "nonexistent"),
                    "--out-dir", str(new), *QUIET, "--smoke-test")
    assert_one_line_error(r, "examples.video_qa", str(tmp_path / "nonexistent" / "qa.jsonl"),
                          "not found", "features/ID.npz")
    assert not (tmp_path / "new").exists()
    r = run_example("examples.video_qa", "--device", "gpu", "--out-dir", str(new))
    assert_one_line_error(r, "examples.video_qa", "--device", "'gpu'", "use auto, cpu",
                          usage=True)
    r = run_example("examples.video_qa", "--device", "cuda", "--out-dir", str(new),
                    env={"CUDA_VISIBLE_DEVICES": ""})  # no GPU visible, also on a GPU machine
    assert_one_line_error(r, "examples.video_qa", "--device", "no CUDA device",
                          "--device cpu", usage=True)
    tgif_out = tmp_path / "tgif"
    r = run_example("examples.video_qa.tgif", "--smoke-test", "--out-dir", str(tgif_out),
                    env={"PLATED_DATA": None})
    assert_one_line_error(r, "examples.video_qa.tgif", "no data folder", "--data-dir",
                          "PLATED_DATA")
    r = run_example("examples.video_qa.tgif", "--smoke-test", "--out-dir", str(tgif_out),
                    "--data-dir", str(tmp_path / "nonexistent"))
    assert_one_line_error(r, "examples.video_qa.tgif", str(tmp_path / "nonexistent"),
                          "does not exist")
    r = run_example("examples.video_qa.tgif", "--smoke-test", "--device", "gpu")
    assert_one_line_error(r, "examples.video_qa.tgif", "--device", "'gpu'", usage=True)
    assert not new.exists() and not tgif_out.exists()


#: Values each numeric option refuses (argparse usage errors, exit status 2).
BAD_OPTIONS = [("--epochs", "-1"), ("--epochs", "0"), ("--batch-size", "0"),
               ("--batch-size", "-4"), ("--videos", "0"), ("--frames", "4"), ("--size", "10"),
               ("--questions-per-video", "0"), ("--dim", "0"), ("--embed", "-1"),
               ("--samples", "1"), ("--segment-len", "0"), ("--lr", "0"), ("--lr", "-0.1"),
               ("--clip", "0"), ("--patience", "0"), ("--max-minutes", "0"),
               ("--checkpoint-every", "0"), ("--eval-batch-size", "0"),
               ("--figure-questions", "0"), ("--threads", "0"), ("--epochs", "two"),
               ("--lr", "nan")]


def test_numeric_options_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                     ) -> None:
    from examples.video_qa import report, tgif

    out = tmp_path / "run"
    for option, value in BAD_OPTIONS:
        r = _cli(capsys, main, ["--smoke-test", "--out-dir", str(out), option, value])
        assert_one_line_error(r, "examples.video_qa", f"argument {option}", repr(value),
                              usage=True)
    r = _cli(capsys, tgif.main, ["--smoke-test", "--max-frames", "0"])
    assert_one_line_error(r, "examples.video_qa.tgif", "--max-frames", usage=True)
    r = _cli(capsys, report.main, [str(tmp_path), "--per-type", "0"])
    assert_one_line_error(r, "examples.video_qa.report", "--per-type", usage=True)
    assert not out.exists()


@pytest.mark.usefixtures("float32_default")
def test_smoke_test_keeps_explicit_options(tmp_path: Path) -> None:
    """--smoke-test sets only the options not given: an explicit --batch-size 4 makes 16 steps
    an epoch, and an explicit --embed 64 stays 64 although it is the default."""
    res = main(["--smoke-test", "--epochs", "1", "--batch-size", "4", "--embed", "64",
                "--out-dir", str(tmp_path / "run")] + QUIET)
    assert (res["epochs"], res["steps"], res["batch_size"]) == (1, 16, 4)
    assert res["config"]["embed"] == 64 and res["config"]["dim"] == 32  # dim: the smoke value


@pytest.mark.usefixtures("float32_default")
def test_ctrl_c_keeps_a_resumable_checkpoint(tmp_path: Path) -> None:
    """A real SIGINT to a generated-data smoke run: run_cli's one line with the --resume
    command, status 130, and the checkpoint written before it resumes to the end."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    argv = ["--smoke-test", "--epochs", "200", "--checkpoint-every", "1", "--out-dir", str(out),
            "--cache-dir", str(cache)] + QUIET
    env = _env()
    env.pop("PLATED_DATA", None)
    ckpt = out / "checkpoint.pt"
    code, stdout, stderr = interrupt_run([sys.executable, "-m", "examples.video_qa", *argv],
                                         ckpt, env, settle=0.5)
    assert code == 130, (stdout, stderr)
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines == ["examples.video_qa: interrupted; the last checkpoint in --out-dir is kept. "
                     "Continue with: python -m examples.video_qa " + " ".join(argv) + " --resume"]
    st = torch.load(ckpt, weights_only=False)
    assert st["steps"] >= 1 and not (out / "results.json").exists()
    # resume it (in process) to the end of the epoch it was in
    epochs = st["epoch"] + 1
    res = main(argv[:2] + [str(epochs)] + argv[3:] + ["--resume"])
    assert res["epochs"] == epochs and res["steps"] == 8 * epochs
    assert (out / "results.json").is_file()


def test_help_is_plain_text_with_every_option_explained() -> None:
    """--help of the trainer, the report and the TGIF demo: a help text for every option, a
    default named at most once, no Sphinx markup; the demo's --data-dir says what it reads."""
    from examples.video_qa import report, tgif

    for parser in (vqtrain.make_parser(), report.make_parser(), tgif.make_parser()):
        text = parser.format_help()
        assert "``" not in text and ":math:" not in text and ":func:" not in text, text
        formatter = parser.formatter_class(prog=parser.prog)
        for action in parser._actions:
            assert action.help, (parser.prog, action.option_strings or action.dest)
            # the help as --help shows it, "(default: ...)" added where the text has none
            shown = (formatter._get_help_string(action) or "").replace("%(default)s", "X")
            assert shown.count("default") <= 1, (parser.prog, shown)
    data_dir = tgif.make_parser().format_help()
    assert "DIR/tgif-qa/qa.json" in " ".join(data_dir.split())
