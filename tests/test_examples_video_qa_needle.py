"""The needle task of the video-QA example (``python -m examples.video_qa --task needle``): the
seeded needle generator (the needle's place and code recovered from the features alone), the
chunked long-video scorer against the unchunked model and against brute force, the memory cap,
the recall grid and its figure, and the smoke run with ``--resume``."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_one_line_error, run_example
from torch import Tensor

import examples.video_qa.speed
from examples.common import RunExistsError
from examples.video_qa import report
from examples.video_qa.chunked import analyse_long, bytes_per_frame, chunk_frames
from examples.video_qa.data import Batch, Vocab
from examples.video_qa.model import MODES, ModelConfig, VideoQA
from examples.video_qa.needle import (
    CODES,
    KEYS,
    generate_needle,
    make_world,
    needle_position,
    needle_question,
    needle_video,
    recall_figure,
    recall_grid,
    recall_table,
)
from examples.video_qa.train import main

QUIET = ["--no-progress", "--device", "cpu", "--threads", "1"]


@pytest.fixture
def float32_default() -> None:
    """The programs run under torch's default dtype, float32, as users run them
    (``tests/conftest.py`` makes it float64 for every test and restores it afterwards)."""
    torch.set_default_dtype(torch.float32)


def _decode(world_keys: np.ndarray, world_codes: np.ndarray, x: np.ndarray
            ) -> dict[int, tuple[list[int], int]]:
    """From the features alone: per key seen, its needle's frames and the code read there (the
    frames whose projection on the key's vector is above 1/2; the code of largest projection
    on the mean of those frames)."""
    out = {}
    proj = x @ world_keys.T  # (T, keys)
    for k in range(len(world_keys)):
        frames = [int(f) for f in np.flatnonzero(proj[:, k] > 0.5)]
        if frames:
            out[k] = (frames, int(np.argmax(world_codes @ x[frames].mean(0))))
    return out


def test_generator_is_seeded_and_needles_are_recovered_from_the_features() -> None:
    a = generate_needle(60, 16, 40, seed=3, span=2, distractors=3, dim=256)
    b = generate_needle(60, 16, 40, seed=3, span=2, distractors=3, dim=256)
    c = generate_needle(60, 16, 40, seed=4, span=2, distractors=3, dim=256)
    assert torch.equal(a.videos, b.videos) and a.questions == b.questions
    assert not torch.equal(a.videos, c.videos)
    assert a.videos.shape == (60, 40, 256) and int(a.lengths.min()) >= 16
    assert [q.split for q in a.questions].count("train") == 48
    world = make_world(3, 256)
    words = {f"what code does the {k} needle hold?" for k in KEYS}
    counts: dict[int, int] = {}
    for q in a.questions:
        t = int(a.lengths[q.video])
        x = a.videos[q.video].numpy()
        assert not x[t:].any()  # padding
        found = _decode(world.keys, world.codes, x[:t])
        key = KEYS.index(q.text.split()[4])
        assert q.text in words and len(q.evidence) == 2
        # the asked needle: its frames are the evidence, its code the answer
        assert found[key] == (list(q.evidence), CODES.index(q.answer))
        # and the distractors: other keys, two frames each, apart from every needle; every
        # needle the generator reports is found, and nothing else
        needles = a.objects[q.video]
        assert needles[0] == {"key": key, "code": CODES.index(q.answer),
                              "start": q.evidence[0], "span": 2}
        assert found == {n["key"]: ([n["start"], n["start"] + 1], n["code"]) for n in needles}
        counts[len(needles)] = counts.get(len(needles), 0) + 1
    assert counts[4] >= 50  # three distractors, unless a short video has no room


@pytest.mark.parametrize("frames", [16, 257, 100000])
def test_needle_at_a_depth(frames: int) -> None:
    world = make_world(0, 256)
    for depth, span in [(0.0, 1), (0.5, 1), (1.0, 1), (0.37, 3), (1.0, 3)]:
        start = needle_position(frames, depth, span)
        assert start == round(depth * (frames - span))
        rng = np.random.Generator(np.random.PCG64(7))
        x, needles = needle_video(world, rng, frames, start, key=5, code=11, span=span)
        assert x.shape == (frames, 256) and x.dtype == np.float32
        assert needles[0] == (5, 11, start) and len(needles) >= (4 if frames > 16 else 2)
        found = _decode(world.keys, world.codes, x)
        assert found == {k: (list(range(s, s + span)), c) for k, c, s in needles}
    assert needle_position(100000, 1.0) == 99999
    with pytest.raises(ValueError, match="depth"):
        needle_position(10, 1.5)


def _model(mode: str, window: int = 1, num_answers: int = 7, feature_dim: int = 5,
           segment_len: int = 4, vocab_size: int = 10) -> VideoQA:
    config = ModelConfig(vocab_size=vocab_size, num_answers=num_answers, mode=mode,
                         feature_dim=feature_dim, dim=8, embed=4, window=window, k_max=3,
                         segment_len=segment_len)
    return VideoQA(config).eval()


def _batch(video: Tensor, words: Tensor, lengths: Tensor, answers: Tensor) -> Batch:
    t, b = video.shape[0], words.shape[0]
    return Batch(video[None], torch.ones(1, t, dtype=torch.bool),
                 torch.zeros(b, dtype=torch.long), torch.ones(b, t, dtype=torch.bool), words,
                 lengths, answers, torch.zeros(b, t, dtype=torch.bool), list(range(b)))


@pytest.mark.parametrize("window", [1, 3])
@pytest.mark.parametrize("mode", MODES)
def test_chunked_scorer_equals_the_unchunked_model(mode: str, window: int) -> None:
    """Every mode: the same predictive, prior mode, posterior mode, q's mode and segment as
    :meth:`VideoQA.analyse` on the whole video, for chunks of one frame, of a few frames not
    dividing the video, and of more frames than it has."""
    model = _model(mode, window)
    video = torch.randn(23, 5)
    words, lengths = torch.randint(1, 10, (3, 4)), torch.tensor([4, 2, 3])
    answers = torch.randint(1, 7, (3,))
    ref = model.analyse(_batch(video, words, lengths, answers))
    with torch.no_grad():
        mem = model.frames(video[None], torch.ones(1, 23, dtype=torch.bool)).expand(3, -1, -1)
        log_norm = model.attention.score(model.encode_question(words, lengths).unsqueeze(1),
                                         mem).squeeze(1).logsumexp(-1)
    chunks = (4, 8, 100) if mode == "two-level" else (1, 5, 7, 100)
    for chunk in chunks:
        got = analyse_long(model, video, words, lengths, answers, chunk=chunk)
        assert got.chunks == math.ceil(23 / chunk)
        torch.testing.assert_close(got.log_pred, ref["log_pred"], rtol=0, atol=1e-12)
        assert torch.equal(got.prior_map, ref["prior_map"])
        if mode == "two-level":
            assert got.log_norm is None
        else:
            assert got.log_norm is not None
            torch.testing.assert_close(got.log_norm, log_norm, rtol=0, atol=1e-12)
        if mode == "soft":
            assert got.posterior_map is None
        else:
            assert got.posterior_map is not None
            assert torch.equal(got.posterior_map, ref["posterior_map"])
        assert (got.q_map is None) == ("q_map" not in ref)
        if got.q_map is not None:
            assert torch.equal(got.q_map, ref["q_map"])
        if mode == "two-level":
            assert got.segment_map is not None
            assert torch.equal(got.segment_map, ref["segment_posterior"].argmax(-1))


def test_chunked_two_level_equals_brute_force() -> None:
    """The two-level predictive, summed by hand over every (segment, frame) of a video whose
    length is not a multiple of the segment length, against the chunked scorer."""
    seg = 3
    model = _model("two-level", window=3, segment_len=seg)
    t = 11
    video = torch.randn(t, 5)
    words, lengths = torch.randint(1, 10, (2, 3)), torch.tensor([3, 1])
    answers = torch.tensor([2, 5])
    got = analyse_long(model, video, words, lengths, answers, chunk=2 * seg)
    with torch.no_grad():
        q = model.encode_question(words, lengths)
        mem = model.frames(video[None], torch.ones(1, t, dtype=torch.bool))[0]
        assert model.segment_score is not None
        for i in range(2):
            segments = [list(range(g, min(g + seg, t))) for g in range(0, t, seg)]
            seg_scores = torch.stack([model.segment_score(
                q[i][None, None], mem[s].mean(0)[None, None]).reshape(()) for s in segments])
            p1 = torch.softmax(seg_scores, 0)
            pred = torch.zeros(7)
            best, best_frame = -1.0, -1
            for g, frames in enumerate(segments):
                scores = torch.stack([model.attention.score(q[i][None, None],
                                                            mem[f][None, None]).reshape(())
                                      for f in frames])
                p2 = torch.softmax(scores, 0)
                for j, f in enumerate(frames):
                    pa = torch.softmax(model.classify(mem[f], q[i]), -1)
                    pred += p1[g] * p2[j] * pa
                    if float(p1[g] * p2[j]) > best:
                        best, best_frame = float(p1[g] * p2[j]), f
            torch.testing.assert_close(got.log_pred[i].exp(), pred, rtol=1e-10, atol=1e-12)
            assert int(got.prior_map[i]) == best_frame


def test_the_memory_cap_sets_the_chunk() -> None:
    model = _model("marginal", feature_dim=256)
    per = bytes_per_frame(model, questions=2)
    # float64 (the tests' default dtype): the frames and the window input 2 * 256, encoder
    # 4 * 8, score 8, and per question 1 + 6 * 8 + 3 * 7 values
    assert per == 8 * (2 * 256 + 32 + 8 + 2 * (1 + 48 + 21))
    assert chunk_frames(model, 2, 10 * per + per - 1) == 10
    video = torch.randn(95, 256)
    words, lengths, answers = torch.ones(2, 2, dtype=torch.long), torch.tensor([2, 2]), \
        torch.tensor([1, 2])
    got = analyse_long(model, video, words, lengths, answers, max_bytes=10 * per)
    assert (got.chunk, got.chunks) == (10, 10)
    ref = analyse_long(model, video, words, lengths, answers, chunk=95)
    torch.testing.assert_close(got.log_pred, ref.log_pred, rtol=0, atol=1e-12)
    two = _model("two-level", feature_dim=256, segment_len=4)
    assert chunk_frames(two, 2, 10 * bytes_per_frame(two, 2)) == 8  # whole segments
    with pytest.raises(ValueError, match="above the cap"):
        chunk_frames(two, 2, 3 * bytes_per_frame(two, 2))
    with pytest.raises(ValueError, match="multiple of segment_len"):
        analyse_long(two, video, words, lengths, answers, chunk=6)


def test_recall_grid_counts_answers_and_finds() -> None:
    """A model whose answer is always the same code: recall is that code's share of the
    cells' questions, recounted from the generator."""
    world = make_world(1, 16)
    vocab = Vocab([w for k in range(len(KEYS)) for w in needle_question(k).split()], CODES)
    model = _model("marginal", num_answers=len(vocab.answers), feature_dim=16,
                   vocab_size=len(vocab.words))
    with torch.no_grad():
        last = model.classifier[-1]
        last.weight.zero_()
        last.bias.fill_(-10.0)
        last.bias[vocab.answer_index["code03"]] = 10.0
    grid = recall_grid(model, vocab, world, [16, 50], [0.0, 1.0], per_cell=6,
                       show_progress=False)
    assert grid["lengths"] == [16, 50] and grid["depths"] == [0.0, 1.0]
    for li, t in enumerate([16, 50]):
        for di in range(2):
            codes = []
            for i in range(6):
                rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
                    [1, 1, 2, t, di, i])))
                rng.integers(0, len(KEYS))
                codes.append(int(rng.integers(0, len(CODES))))
            assert grid["recall"][li][di] == codes.count(3) / 6
            assert 0.0 <= grid["found"][li][di] <= 1.0
            assert 0.0 < grid["needle_mass"][li][di] < 1.0
    text = recall_table({"marginal": grid})
    assert "| 100 % |" in text and "**worst depth**" in text


def test_recall_figure(tmp_path: Path) -> None:
    grid = {"lengths": [16, 100000], "depths": [0.0, 0.5, 1.0], "per_cell": 2,
            "recall": [[1.0, 0.5, 1.0], [0.0, 1.0, 0.5]], "found": [[1.0] * 3] * 2}
    path = recall_figure({"soft": grid, "k-max": grid, "marginal": grid}, tmp_path / "r.png")
    assert path.is_file() and path.stat().st_size > 5000
    assert "| 100,000 |" in recall_table({"soft": grid})


@pytest.mark.usefixtures("float32_default")
def test_needle_smoke_run_resume_and_report(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    argv = ["--task", "needle", "--mode", "k-max", "--smoke-test", "--out-dir", str(out)] + QUIET
    res = main(argv)
    assert capsys.readouterr().out.endswith(
        f"  figures: {out / 'alignments.png'}, {out / 'recall.png'}\n")
    assert res["task"] == "needle" and res["config"]["window"] == 1
    assert res["config"]["feature_dim"] == 32 and res["frames"] == 64
    assert {"iou_prior", "iou50_prior", "iou_posterior", "ground_posterior"} <= set(res["test"])
    assert all(0.0 <= res["test"][k] <= 1.0 for k in res["test"] if k.startswith("iou"))
    grid = res["recall_grid"]
    assert grid["lengths"] == [16, 300] and grid["depths"] == [0.0, 0.5, 1.0]
    assert len(grid["recall"]) == 2 and all(len(r) == 3 for r in grid["recall"])
    for name in ("results.json", "best.pt", "checkpoint.pt", "recall.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    assert saved["recall_grid"] == json.loads(json.dumps(grid))
    with pytest.raises(RunExistsError):
        main(argv)
    # a finished run resumes into evaluation only, with the same grid; the grid's options may
    # change
    again = main(argv + ["--resume", "--eval-lengths", "16,300,40"])
    assert again["steps"] == res["steps"]
    assert [r[:3] for r in again["recall_grid"]["recall"][:2]] == grid["recall"]
    assert again["recall_grid"]["lengths"] == [16, 300, 40]
    text = report.main([str(out), "--recall-figure", str(tmp_path / "all.png")])
    assert "**k-max** (recall" in text and (tmp_path / "all.png").is_file()
    # the speed program: one long video in a fresh process, and training steps in turn
    speed = examples.video_qa.speed.main(
        [str(out), "--out", str(tmp_path / "speed.json"), "--frames", "3000", "--repeats", "1",
         "--chunk-mb", "0.25", "--step-modes", "soft,k-max", "--steps", "1", "--dim", "8",
         "--embed", "4", "--feature-size", "16", "--batch-size", "4", "--no-progress",
         "--fresh", "markov"])
    one, fresh = speed["inference"]
    assert one["mode"] == "k-max" and one["frames"] == 3000 and one["chunks"] > 1
    assert not one["fresh"] and fresh["fresh"] and fresh["mode"] == "markov"
    assert fresh["chunks"] > 1 and fresh["chunk_bytes_counted_mib"] <= 0.25
    assert one["chunk_bytes_counted_mib"] <= 0.25 and one["peak_growth_mib"] >= 0.0
    assert one["median_seconds"] > 0.0 and isinstance(one["correct"], bool)
    assert set(speed["training"]["median_ms"]) == {"soft", "k-max"}
    assert speed["training"]["ratio_to_soft"]["soft"] == 1.0
    assert json.loads((tmp_path / "speed.json").read_text()) == json.loads(json.dumps(speed))


def test_a_bad_window_is_one_line_and_leaves_no_folder(tmp_path: Path) -> None:
    bad = run_example("examples.video_qa", "--task", "needle", "--window", "2", "--smoke-test",
                      "--out-dir", str(tmp_path / "bad"), *QUIET)
    assert_one_line_error(bad, "examples.video_qa", "--window must be odd")
    assert not (tmp_path / "bad").exists()


def test_options_of_grounded_runs_are_unchanged() -> None:
    """A grounded run records the options it did before the needle task (so its checkpoints
    resume), and the needle task records its own."""
    from examples.video_qa.train import make_parser, options, resolve_defaults

    grounded = resolve_defaults(make_parser().parse_args([]))
    needle = resolve_defaults(make_parser().parse_args(["--task", "needle"]))
    got = options(grounded)
    assert not {"task", "window", "k_max", "eval_lengths", "min_frames"} & set(got)
    assert got["frames"] == 16
    assert options(needle)["frames"] == 64 and options(needle)["window"] == 1
    assert "eval_lengths" not in options(needle)  # may change on resume
    assert list(itertools.islice(iter(options(needle)), 1))  # non-empty


def test_temporal_iou_of_the_predicted_span() -> None:
    from examples.video_qa.train import predicted_span, temporal_iou

    probs = torch.tensor([[0.05, 0.3, 0.4, 0.2, 0.05, 0.0],    # frames 1-3: >= 0.4 / 2
                          [0.3, 0.0, 0.0, 0.1, 0.3, 0.3],     # ties: the first mode's run
                          [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    evidence = torch.tensor([[False, False, True, True, False, False],
                             [True, True, False, False, False, False],
                             [False, False, False, False, False, True]])
    span = predicted_span(probs)
    assert span.tolist() == [[False, True, True, True, False, False],
                             [True, False, False, False, False, False],
                             [False, False, False, False, False, True]]
    iou = temporal_iou(probs, evidence)
    assert iou.tolist() == pytest.approx([2 / 3, 1 / 2, 1.0])
    assert temporal_iou(probs, torch.zeros_like(evidence)).tolist() == [0.0, 0.0, 0.0]


@pytest.mark.usefixtures("float32_default")
def test_two_process_run_shards_the_recall_grid(tmp_path: Path) -> None:
    """``python -m examples.video_qa --task needle --smoke-test`` from the command line, as two
    processes under torchrun: each process measures every other cell of the grid, and the
    gathered grid equals the one a single process measures with the trained model."""
    from examples.video_qa.train import load_run

    out = tmp_path / "ddp"
    r = run_example("torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                    "examples.video_qa", "--task", "needle", "--mode", "marginal",
                    "--smoke-test", "--out-dir", str(out), *QUIET, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "needle recall, worst depth per length: 16 frames" in r.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "needle" and res["world_size"] == 2 and res["replicas_identical"] is True
    grid = res["recall_grid"]
    assert all(m is not None for row in grid["needle_mass"] for m in row)
    model, vocab, _ = load_run(out)
    world = make_world(0, 32)
    again = recall_grid(model, vocab, world, grid["lengths"], grid["depths"], grid["per_cell"],
                        show_progress=False)
    for key in ("recall", "found", "needle_mass"):
        assert again[key] == grid[key], key
