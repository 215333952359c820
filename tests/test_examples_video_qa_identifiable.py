"""The identifiable variant of the video-QA generator (``--variant identifiable``): the default
variant's data are unchanged (hashes taken before the variant existed), each answer is read from
the pixels of its evidence frames alone and from no other frame (a brute-force pixel rule), the
cache names keep the variants apart, and a smoke run trains on it."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from examples.common import ExampleError
from examples.video_qa.data import (
    _SHOWN_RGB,
    COLOURS,
    IDENTIFIABLE_TYPES,
    SHAPES,
    SHOWN_COLOURS,
    VideoQAData,
    cache_name,
    generate,
    load_or_generate,
)
from examples.video_qa.train import main

#: Options of every run: CPU, one thread, no progress bars, 20 videos.
QUIET = ["--no-progress", "--device", "cpu", "--threads", "1", "--videos", "20"]

#: sha256 of videos, lengths, questions, objects and source of ``generate(*args)``, computed
#: on the generator before the variant was added: the default variant must stay byte for byte
#: (cached data sets and the results of earlier runs depend on it).
DEFAULT_HASHES = {
    (6, 16, 32, 4, 0): "c63c7ac6f49c8ab7e86332895f50d0064ecc89c1cabe32b30971929509d8f163",
    (5, 12, 28, 3, 7): "453fceb61d67d872ae06b0e0c103972849434277d17bb296599918357a8661c5",
}

@pytest.fixture
def float32_default() -> None:
    """The programs run under torch's default dtype, float32, as users run them
    (``tests/conftest.py`` makes it float64 for every test and restores it afterwards)."""
    torch.set_default_dtype(torch.float32)


#: Pixels of each sprite (as in tests/test_examples_video_qa.py).
SPRITE_PIXELS = {"square": 49, "circle": 37, "triangle": 25, "cross": 33}


def _digest(d: VideoQAData) -> str:
    h = hashlib.sha256()
    h.update(d.videos.numpy().tobytes())
    h.update(d.lengths.numpy().tobytes())
    h.update(json.dumps([q.__dict__ for q in d.questions]).encode())
    h.update(json.dumps(d.objects).encode())
    h.update(d.source.encode())
    return h.hexdigest()


@pytest.mark.parametrize("args", sorted(DEFAULT_HASHES))
def test_the_default_variant_is_unchanged(args: tuple[int, int, int, int, int]) -> None:
    d = generate(*args)
    assert _digest(d) == DEFAULT_HASHES[args]
    assert _digest(generate(*args, variant="default")) == DEFAULT_HASHES[args]
    assert d.source == f"generated (version 1, seed {args[-1]})"


def test_variants_are_seeded_and_cached_apart(tmp_path: Path) -> None:
    a, b = generate(8, seed=3, variant="identifiable"), generate(8, seed=3, variant="identifiable")
    c = generate(8, seed=4, variant="identifiable")
    assert torch.equal(a.videos, b.videos) and a.questions == b.questions
    assert not torch.equal(a.videos, c.videos)
    assert not torch.equal(a.videos, generate(8, seed=3).videos)
    assert a.source == "generated (identifiable version 1, seed 3)"
    assert cache_name(8, 16, 32, 4, 3) == "videoqa-v1-n8-t16-s32-q4-seed3.pt"
    assert cache_name(8, 16, 32, 4, 3, "identifiable") == \
        "videoqa-identifiable-v1-n8-t16-s32-q4-seed3.pt"
    default = load_or_generate(tmp_path, 8, seed=3)
    ident = load_or_generate(tmp_path, 8, seed=3, variant="identifiable")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [cache_name(8, 16, 32, 4, 3), cache_name(8, 16, 32, 4, 3, "identifiable")])
    again = load_or_generate(tmp_path, 8, seed=3, variant="identifiable")  # read back
    assert torch.equal(again.videos, ident.videos) and again.questions == ident.questions
    assert torch.equal(default.videos, generate(8, seed=3).videos)
    with pytest.raises(ValueError, match="variant must be one of"):
        generate(2, variant="other")  # type: ignore[arg-type]


# -- the brute-force pixel rule --------------------------------------------------------------------


def _scene(frame: np.ndarray) -> dict[str, str]:
    """The objects of one frame read from its pixels alone: shape -> colour name (of
    :data:`SHOWN_COLOURS`). Each colour's 8-connected blobs are objects (objects never touch:
    they stay more than one pixel apart), named by their pixel count."""
    by_size = {n: s for s, n in SPRITE_PIXELS.items()}
    out: dict[str, str] = {}
    for rgb, name in zip(_SHOWN_RGB, SHOWN_COLOURS, strict=True):
        labels, n = ndimage.label(np.all(frame == rgb, -1), structure=np.ones((3, 3)))
        for k in range(1, n + 1):
            shape = by_size[int((labels == k).sum())]
            assert shape not in out
            out[shape] = name
    return out


def _read(text: str, scene: dict[str, str]) -> str | None:
    """The answer to the question ``text`` that one frame's scene gives, without knowing which
    frame it is (``None``: the frame does not answer it)."""
    if m := re.fullmatch(r"what colour is the (\w+) when the (\w+) (appears|leaves)\?", text):
        a, b, event = m.groups()
        marker = "white" if event == "appears" else "brown"
        if scene.get(b) == marker and scene.get(a) in COLOURS:
            return scene[a]
        return None
    m = re.fullmatch(r"what shape turns (\w+)\?", text)
    assert m is not None, text
    holders = [s for s, c in scene.items() if c == m.group(1)]
    return holders[0] if len(holders) == 1 else None


def _shown(text: str, scene: dict[str, str]) -> str | None:
    """A looser rule, blind to the event: the named object's colour wherever it shows (for a
    colour question; as :func:`_read` for the others)."""
    if m := re.match(r"what colour is the (\w+) when", text):
        return scene.get(m.group(1))
    return _read(text, scene)


def test_answers_are_read_at_the_evidence_frames_and_nowhere_else() -> None:
    data = generate(80, seed=1, variant="identifiable")
    frames = data.videos.shape[1]
    scenes = {v: [_scene(f) for f in data.videos[v].numpy()] for v in range(80)}
    seen = set()
    for q in data.questions:
        seen.add(q.type)
        assert q.evidence, q
        for f in range(frames):
            read, shown = _read(q.text, scenes[q.video][f]), _shown(q.text, scenes[q.video][f])
            if f in q.evidence:
                assert read == shown == q.answer, (q, f, scenes[q.video][f])
            else:  # neither rule gives the answer away at another frame
                assert read is None and shown != q.answer, (q, f, scenes[q.video][f])
    assert seen == set(IDENTIFIABLE_TYPES)


def test_the_rule_fails_on_the_default_variant() -> None:
    """The same looser rule on the default data: the named object shows the answer's colour at
    frames other than the evidence (so the test above can fail)."""
    data = generate(40, seed=1)
    leaks = 0
    for q in data.questions:
        if not q.type.startswith("colour_when"):
            continue
        a = re.match(r"what colour is the (\w+)", q.text)
        assert a is not None
        o = next(o for o in data.objects[q.video] if SHAPES[o["shape"]] == a.group(1))
        leaks += sum(1 for f, c in enumerate(o["colour"])
                     if f not in q.evidence and c >= 0 and COLOURS[c] == q.answer)
    assert leaks > 0


# -- the command line ------------------------------------------------------------------------------


@pytest.mark.usefixtures("float32_default")
def test_smoke_run_of_the_identifiable_variant(tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = main(["--mode", "variational-enum", "--smoke-test", "--variant", "identifiable",
                "--window", "1", "--out-dir", str(out), "--cache-dir", str(tmp_path / "cache")]
               + QUIET)
    assert res["data"] == "generated (identifiable version 1, seed 0)"
    assert res["data_args"]["variant"] == "identifiable"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [
        cache_name(20, 16, 32, 4, 0, "identifiable")]
    assert res["epochs"] == 2 and (out / "best.pt").is_file()
    r = res["test"]
    assert r["questions"] == r["with_evidence"] > 0 and math.isfinite(r["nll"])
    assert set(r["accuracy_by_type"]) <= set(IDENTIFIABLE_TYPES)
    with pytest.raises(ExampleError, match="--variant identifiable"):
        main(["--task", "needle", "--smoke-test", "--variant", "identifiable", "--out-dir",
              str(tmp_path / "needle")] + QUIET)
    # the report draws the run's alignments on the run's own (identifiable) questions: it loads
    # the identifiable cache, and generates no default-variant data beside it
    from examples.video_qa import report

    fig = tmp_path / "alignments.png"
    report.main([str(out), "--figure", str(fig), "--cache-dir", str(tmp_path / "cache")])
    assert fig.stat().st_size > 1000
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [
        cache_name(20, 16, 32, 4, 0, "identifiable")]
