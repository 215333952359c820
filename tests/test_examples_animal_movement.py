"""The animal-movement example (:mod:`examples.animal_movement`) and its seal loaders.

- The loaders on the real files: sizes, masks, and every step length and turning angle of the
  elephant seals against an independent computation (3-D vectors on the sphere); hand-checked
  values on tiny synthetic files; ``DataError`` for missing and malformed files.
- Every model variant (random effects none / individual / group / both; elephant seals, and the
  fur seal with a Bernoulli or Poisson dive emission) gives the same loss and gradients under
  ``TVE_ELBO`` in its ``markov_plate`` form and its ``pyro.markov`` loop form, and under Pyro's
  ``TraceEnum_ELBO`` (loop form), on small batches of real tracks.
- The exact log-likelihood, the joint MAP assignment and the class posteriors equal brute-force
  enumeration over every discrete assignment.
- ``--resume`` continues a run exactly, and the script runs end to end (smoke mode).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyro
import pyro.distributions as dist
import pytest
import torch
from helpers import assert_one_line_error, interrupt_run, real_data, run_example
from pyro.infer import TraceEnum_ELBO

from examples.animal_movement import (
    RANDOM_EFFECTS,
    Config,
    MovementHMM,
    guide,
    main,
)
from examples.common import ExampleError, run_cli
from examples.data import DataError
from examples.data.seals import EARTH_RADIUS_KM, Tracks, load_nfs, load_ses
from plated.pyro import TVE_ELBO, posterior

REPO = Path(__file__).resolve().parents[1]


SEALS = real_data("seals/sesData.csv", "seals/nfs_locations.csv", "seals/nfs_foragedives.csv")
DATA = SEALS.folder

SES_COUNTS = {"1": 550, "2": 477, "3": 593, "4": 603, "5": 349, "6": 356, "7": 586, "8": 471,
              "9": 84, "10": 414, "11": 573, "12": 576, "13": 573, "14": 584, "15": 564}


@pytest.fixture(scope="module")
def ses() -> Tracks:
    return load_ses(DATA, dtype=torch.float64)


@pytest.fixture(scope="module")
def nfs() -> Tracks:
    return load_nfs(DATA, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------
# loaders on the real files


def _unit(lon: torch.Tensor, lat: torch.Tensor) -> torch.Tensor:
    lon, lat = torch.deg2rad(lon), torch.deg2rad(lat)
    return torch.stack([lat.cos() * lon.cos(), lat.cos() * lon.sin(), lat.sin()], -1)


@SEALS.needed
def test_ses_shapes_masks_and_geometry(ses: Tracks) -> None:
    assert ses.coords == "lonlat" and ses.dive is None and ses.dive_mask is None
    assert dict(zip(ses.ids, ses.lengths.tolist(), strict=True)) == SES_COUNTS
    assert ses.step.shape == ses.angle.shape == ses.mask.shape == (15, 603)
    assert ses.position.shape == (15, 603, 2)
    assert int(ses.lengths.sum()) == 7353
    # every step but each track's last; every angle but the first and last (no zero steps)
    assert int(ses.step_mask.sum()) == 7353 - 15 and int(ses.angle_mask.sum()) == 7353 - 30
    assert not (ses.step_mask & ~ses.mask).any() and not (ses.angle_mask & ~ses.mask).any()
    last = ses.lengths - 1
    rows = torch.arange(15)
    assert not ses.step_mask[rows, last].any() and not ses.angle_mask[:, 0].any()
    assert (ses.step[ses.step_mask] > 0).all() and (ses.step[ses.step_mask] < 150).all()
    assert (ses.step[~ses.step_mask] == 0).all() and (ses.angle[~ses.angle_mask] == 0).all()
    assert (ses.position[~ses.mask] == 0).all()
    a = ses.angle[ses.angle_mask]
    assert (a > -math.pi).all() and (a <= math.pi).all()
    # one location every 9.6 hours
    dt = ses.hours[:, 1:] - ses.hours[:, :-1]
    torch.testing.assert_close(dt[ses.mask[:, 1:]], torch.full_like(dt[ses.mask[:, 1:]], 9.6))
    # the first location of seal 1, as in the file
    torch.testing.assert_close(ses.position[0, 0],
                               torch.tensor([70.6094622452686, -49.6073687463654]))


@SEALS.needed
def test_ses_steps_and_angles_match_3d_vector_geometry(ses: Tracks) -> None:
    """An independent computation: steps as angles between unit vectors, turning angles as the
    signed angle between the tangent vectors of the two arcs at each location."""
    p = _unit(ses.position[..., 0], ses.position[..., 1])  # (N, T, 3)
    a, b = p[:, :-1], p[:, 1:]
    central = torch.atan2(torch.linalg.cross(a, b).norm(dim=-1), (a * b).sum(-1))
    m = ses.step_mask[:, :-1]
    torch.testing.assert_close(ses.step[:, :-1][m], EARTH_RADIUS_KM * central[m], rtol=1e-9,
                               atol=1e-9)
    prev, here, nxt = p[:, :-2], p[:, 1:-1], p[:, 2:]

    def tangent(towards: torch.Tensor) -> torch.Tensor:
        return towards - (towards * here).sum(-1, keepdim=True) * here

    t_in, t_out = -tangent(prev), tangent(nxt)  # arriving and leaving directions at ``here``
    left = (torch.linalg.cross(t_in, t_out) * here).sum(-1)
    turn = -torch.atan2(left, (t_in * t_out).sum(-1))  # right turns positive
    m = ses.angle_mask[:, 1:-1]
    diff = torch.remainder(ses.angle[:, 1:-1][m] - turn[m] + math.pi, 2 * math.pi) - math.pi
    assert diff.abs().max() < 1e-7


@SEALS.needed
def test_nfs_shapes_alignment_and_masks(nfs: Tracks) -> None:
    assert nfs.ids == ("NFSF0907",) and nfs.coords == "xy"
    assert nfs.step.shape == (1, 227) and int(nfs.lengths[0]) == 227
    assert nfs.dive is not None and nfs.dive_mask is not None
    assert bool(nfs.dive_mask.all())
    assert int(nfs.dive.sum()) == 318 and int((nfs.dive > 0).sum()) == 86
    assert int(nfs.dive.max()) == 16
    # hourly time steps
    torch.testing.assert_close(nfs.hours[0], torch.arange(227, dtype=torch.float64))
    # the first hour (17:49:25) lies between the fixes at 17:29:00 and 17:57:00, and is
    # interpolated linearly (metres -> km)
    w = (20 * 60 + 25) / (28 * 60)
    first = (1 - w) * torch.tensor([11579.077401574083, 7484.6589078678335]) + w * torch.tensor(
        [10896.318523256234, 7300.837557463322])
    torch.testing.assert_close(nfs.position[0, 0], first / 1000)
    # gaps of more than 3 h between fixes mask the steps and angles that use them
    assert int(nfs.step_mask.sum()) == 171 and int(nfs.angle_mask.sum()) == 163
    assert not nfs.step_mask[0, -1] and not nfs.angle_mask[0, 0]
    s = nfs.step[nfs.step_mask]
    assert (s > 0).all() and (s < 20).all()  # km per hour
    xy = nfs.position[0]
    torch.testing.assert_close(nfs.step[0, :-1][nfs.step_mask[0, :-1]],
                               (xy[1:] - xy[:-1]).norm(dim=-1)[nfs.step_mask[0, :-1]])


@SEALS.needed
def test_select_and_to(ses: Tracks) -> None:
    sub = ses.select([8, 0], max_length=100)
    assert sub.ids == ("9", "1") and sub.lengths.tolist() == [84, 100]
    assert sub.step.shape == (2, 100) and int(sub.mask.sum()) == 184
    torch.testing.assert_close(sub.step[1], ses.step[0, :100])
    assert bool(sub.step_mask[1, 99])  # the cut keeps the last kept step's length
    assert not sub.step_mask[0, 83]
    f32 = sub.to(dtype=torch.float32)
    assert f32.step.dtype == torch.float32 and f32.lengths.dtype == torch.long
    assert f32.mask.dtype == torch.bool
    with pytest.raises(ValueError, match="max_length"):
        ses.select([0], max_length=0)


# ------------------------------------------------------------------------------------------------
# loaders on tiny synthetic files


def _write(folder: Path, name: str, text: str) -> Path:
    (folder / "seals").mkdir(parents=True, exist_ok=True)
    path = folder / "seals" / name
    path.write_text(text)
    return path


def test_ses_hand_checked_steps_and_angles(tmp_path: Path) -> None:
    # east along the equator, north, back south (a U-turn), then west (a right turn when
    # heading south); a second seal whose rows are out of time order
    _write(tmp_path, "sesData.csv", '"ID","lon","lat","date"\n'
           'a,0,0,"2020-01-01 00:00:00"\n'
           'a,1,0,"2020-01-01 01:00:00"\n'
           'a,1,1,"2020-01-01 02:00:00"\n'
           'a,1,0,"2020-01-01 03:00:00"\n'
           'a,0,0,"2020-01-01 04:00:00"\n'
           'b,5,5,"2020-01-01 12:00:00"\n'
           'b,5,4,"2020-01-01 06:00:00"\n')
    t = load_ses(tmp_path, dtype=torch.float64)
    assert t.ids == ("a", "b") and t.lengths.tolist() == [5, 2] and t.step.shape == (2, 5)
    degree = EARTH_RADIUS_KM * math.pi / 180  # 111.195... km
    torch.testing.assert_close(t.step[0], torch.tensor([degree] * 4 + [0.0]))
    torch.testing.assert_close(t.angle[0], torch.tensor([0.0, -math.pi / 2, math.pi,
                                                         math.pi / 2, 0.0]), atol=1e-12, rtol=0)
    assert t.step_mask[0].tolist() == [True] * 4 + [False]
    assert t.angle_mask[0].tolist() == [False, True, True, True, False]
    # b sorted by time: (5, 4) at 06:00, then (5, 5) at 12:00
    torch.testing.assert_close(t.position[1, :2], torch.tensor([[5.0, 4.0], [5.0, 5.0]]))
    torch.testing.assert_close(t.hours[1, :2], torch.tensor([0.0, 6.0]))
    torch.testing.assert_close(t.step[1, 0], torch.tensor(degree))
    assert t.step_mask[1].tolist() == [True, False, False, False, False]
    assert not t.angle_mask[1].any() and t.mask[1].tolist() == [True, True, False, False, False]


def test_nfs_hand_checked_interpolation(tmp_path: Path) -> None:
    # fixes at 0, 1, 2, 3 h, a gap of 8 h, then 11 and 12 h; dives every hour at h + 0.5
    _write(tmp_path, "nfs_locations.csv", "ID,time,x,y\n"
           "s,2020-01-01 00:00:00,0,0\n"
           "s,2020-01-01 01:00:00,1000,0\n"
           "s,2020-01-01 02:00:00,1000,1000\n"
           "s,2020-01-01 03:00:00,0,1000\n"
           "s,2020-01-01 11:00:00,0,9000\n"
           "s,2020-01-01 12:00:00,1000,9000\n")
    dives = [f"s,2020-01-01 {h:02d}:30:00,{'NA' if h == 4 else h % 3}\n" for h in range(12)]
    _write(tmp_path, "nfs_foragedives.csv", "ID,time,dive\n" + "".join(dives))
    t = load_nfs(tmp_path, dtype=torch.float64)
    assert t.ids == ("s",) and t.step.shape == (1, 12)
    torch.testing.assert_close(t.position[0, :3], torch.tensor([[0.5, 0.0], [1.0, 0.5],
                                                                [0.5, 1.0]]))
    torch.testing.assert_close(t.position[0, 11], torch.tensor([0.5, 9.0]))
    torch.testing.assert_close(t.position[0, 3], torch.tensor([0.0, 1.5]))  # interpolated
    half = math.sqrt(0.5)
    assert t.step_mask[0].tolist() == [True, True] + [False] * 10  # 3.5 h .. 10.5 h in the gap
    torch.testing.assert_close(t.step[0, :2], torch.tensor([half, half]))
    assert t.angle_mask[0].tolist() == [False, True] + [False] * 10
    torch.testing.assert_close(t.angle[0, 1], torch.tensor(-math.pi / 2))  # NE, then NW: left
    assert t.dive is not None and t.dive_mask is not None
    assert t.dive_mask[0].tolist() == [h != 4 for h in range(12)]
    torch.testing.assert_close(t.dive[0], torch.tensor([0.0 if h == 4 else h % 3.0
                                                        for h in range(12)]))
    # a longer allowed gap keeps the interpolated steps
    loose = load_nfs(tmp_path, dtype=torch.float64, max_gap_hours=10)
    assert int(loose.step_mask.sum()) == 11


def test_missing_files_raise_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="sesData.csv"):
        load_ses(tmp_path)
    with pytest.raises(DataError, match="nfs_locations.csv"):
        load_nfs(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_ses(tmp_path / "nowhere")


HEADER = '"ID","lon","lat","date"\n'
GOOD = '1,70.6,-49.6,"2014-02-11 10:34:58"\n'


@pytest.mark.parametrize("text, message", [
    (HEADER + GOOD + '1,abc,-49.7,"2014-02-11 20:10:58"\n', r"line 3: column 'lon' is 'abc'"),
    (HEADER + GOOD + '1,70.7,-49.7\n', r"line 3: 3 cells, expected 4"),
    (HEADER + GOOD + '1,70.7,-49.7,"yesterday"\n', r"line 3: column 'date' is 'yesterday'"),
    (HEADER + GOOD + '1,70.7,-95,"2014-02-11 20:10:58"\n', r"line 3: latitude -95"),
    (HEADER + GOOD + '1,70.7,NA,"2014-02-11 20:10:58"\n', r"line 3: column 'lat' is 'NA'"),
    (HEADER + GOOD + GOOD.replace("70.6", "70.7"), r"lines 2 and 3: individual '1' has two"),
    ('"ID","lon","date"\n' + '1,70.6,"2014-02-11 10:34:58"\n', r"line 1: .* lacks .*lat"),
    (HEADER, r"no data rows"),
    ("", r"is empty"),
])
def test_malformed_ses_raises_data_error(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, "sesData.csv", text)
    with pytest.raises(DataError, match=message) as err:
        load_ses(tmp_path)
    assert str(path) in str(err.value)


def test_malformed_nfs_raises_data_error(tmp_path: Path) -> None:
    _write(tmp_path, "nfs_locations.csv",
           "ID,time,x,y\ns,2020-01-01 00:00:00,0,0\ns,2020-01-01 01:00:00,1000,0\n")
    _write(tmp_path, "nfs_foragedives.csv", "ID,time,dive\ns,2020-01-01 00:30:00,-1\n")
    with pytest.raises(DataError, match=r"nfs_foragedives.csv', line 2: the dive count"):
        load_nfs(tmp_path)
    _write(tmp_path, "nfs_foragedives.csv", "ID,time,dive\nq,2020-01-01 00:30:00,1\n")
    with pytest.raises(DataError, match=r"individual 'q' has dive rows but"):
        load_nfs(tmp_path)
    _write(tmp_path, "nfs_foragedives.csv", "ID,time,dive\ns,2020-01-01 00:30:00,1\n")
    _write(tmp_path, "nfs_locations.csv", "ID,time,x,y\ns,2020-01-01 00:00:00,0,zero\n")
    with pytest.raises(DataError, match=r"nfs_locations.csv', line 2: column 'y' is 'zero'"):
        load_nfs(tmp_path)


# ------------------------------------------------------------------------------------------------
# the model: both forms and both ELBOs agree


def _windows(t: Tracks, cuts: list[tuple[int, int, int]], width: int) -> Tracks:
    """A batch of windows ``(individual, start, length)`` of ``width`` time steps; a window
    ``length`` shorter than ``width`` ends the track early (its steps past it are masked)."""
    def take(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x[i, s:s + width] for i, s, _ in cuts])

    lengths = torch.tensor([n for _, _, n in cuts])
    inside = torch.arange(width) < lengths[:, None]
    return replace(
        t, ids=tuple(f"{t.ids[i]}@{s}" for i, s, _ in cuts), position=take(t.position),
        hours=take(t.hours), step=take(t.step), angle=take(t.angle), lengths=lengths,
        mask=inside, step_mask=take(t.step_mask) & inside, angle_mask=take(t.angle_mask) & inside,
        dive=None if t.dive is None else take(t.dive),
        dive_mask=None if t.dive_mask is None else take(t.dive_mask) & inside)


def _batch(ses: Tracks, nfs: Tracks, dataset: str) -> Tracks:
    if dataset == "ses":  # seal 1 from its first location (no angle there), seals 9 and 4
        return _windows(ses, [(0, 0, 6), (8, 30, 4), (3, 100, 6)], 6)
    # the fur seal's windows cover observed hours and hours in a gap (masked steps, angles)
    return _windows(nfs, [(0, 0, 6), (0, 24, 5), (0, 150, 6)], 6)


VARIANTS = [(d, dive, r) for d, dive in (("ses", None), ("nfs", "bernoulli"), ("nfs", "poisson"))
            for r in RANDOM_EFFECTS]


def _model(config: Config, data: Tracks, seed: int = 1) -> MovementHMM:
    pyro.clear_param_store()
    hmm = MovementHMM(config, data, torch.Generator().manual_seed(seed))
    hmm.params()
    with torch.no_grad():  # off the initial values
        gen = torch.Generator().manual_seed(seed + 1)
        for _, p in pyro.get_param_store().named_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return hmm


def _loss_and_grads(elbo: Any, hmm: MovementHMM, data: Tracks, vectorized: bool
                    ) -> tuple[float, dict[str, torch.Tensor]]:
    store = pyro.get_param_store()
    for _, p in store.named_parameters():
        p.grad = None
    loss = elbo.loss_and_grads(hmm.model, guide, data, vectorized=vectorized)
    grads = {name: p.grad.clone() for name, p in store.named_parameters() if p.grad is not None}
    return float(loss), grads


@pytest.mark.parametrize("dataset, dive, effects", VARIANTS)
@SEALS.needed
def test_forms_and_elbos_agree(ses: Tracks, nfs: Tracks, dataset: str, dive: str | None,
                               effects: str) -> None:
    data = _batch(ses, nfs, dataset)
    hmm = _model(Config(3, effects, 2, 2, dive), data)
    results = {
        "tve markov_plate": _loss_and_grads(TVE_ELBO(max_plate_nesting=2), hmm, data, True),
        "tve loop": _loss_and_grads(TVE_ELBO(max_plate_nesting=1), hmm, data, False),
        "pyro loop": _loss_and_grads(TraceEnum_ELBO(max_plate_nesting=1), hmm, data, False),
    }
    ref_loss, ref_grads = results["pyro loop"]
    expected = {"init_probs", "trans_logits", "step_mean", "step_sd", "angle_loc",
                "angle_concentration"}
    expected |= {"individual_class_probs", "individual_effect"} if effects in (
        "individual", "both") else set()
    expected |= {"group_class_probs", "group_effect"} if effects in ("group", "both") else set()
    expected |= {"dive_probs" if dive == "bernoulli" else "dive_rate"} if dive else set()
    assert {k.split("$")[0] for k in ref_grads} == expected
    assert all(g.abs().sum() > 0 for g in ref_grads.values())
    for what, (loss, grads) in results.items():
        assert loss == pytest.approx(ref_loss, rel=1e-10), what
        assert grads.keys() == ref_grads.keys(), what
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-8, atol=1e-10,
                                       msg=f"{what}: gradient of {name}")


@SEALS.needed
def test_vectorized_form_has_one_site_per_chain(ses: Tracks) -> None:
    data = ses.select([0, 1], max_length=50)
    hmm = _model(Config(), data)
    post = posterior(hmm.model, data, max_plate_nesting=2)
    assert post.sites == ("group_class", "individual_class", "x_prev", "x")
    time_plate = next(p for p in post.graph.plates if p.name == "time")
    assert time_plate.sequential and time_plate.size == 50


# ------------------------------------------------------------------------------------------------
# the model against brute-force enumeration


def _brute_force(hmm: MovementHMM, data: Tracks
                 ) -> tuple[torch.Tensor, dict[tuple[Any, ...], float]]:
    """log p(data) and the log joint of every assignment (g, c_1..c_N, x paths), by hand."""
    cfg = hmm.config
    p = {k: v.detach() for k, v in hmm.params().items()}
    k = cfg.states
    mean, sd = p["step_mean"], p["step_sd"]
    gamma = dist.Gamma(mean ** 2 / sd ** 2, mean / sd ** 2)
    vm = dist.VonMises(p["angle_loc"], p["angle_concentration"])

    def emit(i: int, t: int) -> torch.Tensor:  # (K,)
        out = torch.zeros(k)
        if data.step_mask[i, t]:
            out = out + gamma.log_prob(data.step[i, t])
        if data.angle_mask[i, t]:
            out = out + vm.log_prob(data.angle[i, t])
        if cfg.dive is not None:
            assert data.dive is not None and data.dive_mask is not None
            if data.dive_mask[i, t]:
                y = data.dive[i, t]
                out = out + (dist.Bernoulli(p["dive_probs"]).log_prob((y > 0).double())
                             if cfg.dive == "bernoulli" else dist.Poisson(p["dive_rate"])
                             .log_prob(y))
        return out

    lengths = data.lengths.tolist()
    emits = [[emit(i, t).tolist() for t in range(n)] for i, n in enumerate(lengths)]
    groups = list(range(cfg.group_classes)) if cfg.group else [None]
    classes = list(range(cfg.individual_classes)) if cfg.individual else [None]
    log_trans = {}
    for g, c in itertools.product(groups, classes):
        logits = p["trans_logits"].clone()
        if g is not None:
            logits = logits + p["group_effect"][g]
        if c is not None:
            logits = logits + p["individual_effect"][c]
        log_trans[g, c] = torch.log_softmax(logits, -1).tolist()
    log_init = p["init_probs"].log().tolist()
    log_class = p["individual_class_probs"].log().tolist() if cfg.individual else [0.0]
    log_group = p["group_class_probs"].log().tolist() if cfg.group else [0.0]
    joint: dict[tuple[Any, ...], float] = {}
    per_individual = [list(itertools.product(classes, itertools.product(range(k), repeat=n + 1)))
                      for n in lengths]
    for g in groups:
        for combo in itertools.product(*per_individual):
            total = log_group[g or 0]
            for i, (c, path) in enumerate(combo):
                lt = log_trans[g, c]
                total += log_class[c or 0] + log_init[path[0]]
                for t in range(lengths[i]):
                    total += lt[path[t]][path[t + 1]] + emits[i][t][path[t + 1]]
            joint[(g, combo)] = total
    values = torch.tensor(list(joint.values()))
    return torch.logsumexp(values, 0), joint


@pytest.mark.parametrize("dataset, dive, effects", [("ses", None, "both"),
                                                    ("nfs", "poisson", "both"),
                                                    ("ses", None, "individual"),
                                                    ("nfs", "bernoulli", "group")])
@SEALS.needed
def test_exact_queries_equal_brute_force(ses: Tracks, nfs: Tracks, dataset: str,
                                         dive: str | None, effects: str) -> None:
    full = _batch(ses, nfs, dataset)
    data = _windows(full, [(0, 0, 3), (1, 0, 2)], 3)  # a track ending early: masked steps
    hmm = _model(Config(2, effects, 2, 2, dive), data)
    ref, joint = _brute_force(hmm, data)
    with torch.no_grad():
        post = posterior(hmm.model, data, max_plate_nesting=2)
        assert float(post.log_likelihood()) == pytest.approx(float(ref), rel=1e-12)
        loss = TVE_ELBO(max_plate_nesting=2).loss(hmm.model, guide, data)
        assert -loss == pytest.approx(float(ref), rel=1e-12)
        best = post.map()
        marg = post.marginals()
    # the joint MAP (the brute force has no steps past a track's end, where the state stays)
    (g_best, combo_best), _ = max(joint.items(), key=lambda kv: kv[1])
    if effects in ("group", "both"):
        assert int(best["group_class"]) == g_best
    if effects in ("individual", "both"):
        assert best["individual_class"].reshape(-1).tolist() == [c for c, _ in combo_best]
        # the posterior of each individual's class
        for i in range(data.num_individuals):
            for c in range(2):
                sel = torch.tensor([v for (_, combo), v in joint.items() if combo[i][0] == c])
                expected = float((torch.logsumexp(sel, 0) - ref).exp())
                assert float(marg["individual_class"].reshape(2, 2)[i, c]) == pytest.approx(
                    expected, abs=1e-10)
    x = best["x"].reshape(2, 3)
    for i in range(data.num_individuals):
        n = int(data.lengths[i])
        assert x[i, :n].tolist() == list(combo_best[i][1][1:])


@SEALS.needed
def test_padding_past_a_track_end_changes_nothing(ses: Tracks) -> None:
    """Past a track's end the state stays put, so padding changes neither the likelihood nor
    the MAP path. Emissions are made uninformative and the prior chosen so that free padded
    steps (a plain transition) would move the MAP's last valid state from 1 to 0."""
    long = ses.select([0], max_length=40)
    short = _windows(long, [(0, 0, 4)], 4)
    padded = _windows(long, [(0, 0, 4), (0, 0, 40)], 40)
    pyro.clear_param_store()
    hmm = MovementHMM(Config(2, "none"), padded)
    hmm.init.update(
        init_probs=torch.tensor([0.01, 0.99]),
        trans_logits=torch.tensor([[12.0, 0.0], [math.log(0.1), math.log(0.9)]]),
        step_mean=torch.tensor([10.0, 10.0]), step_sd=torch.tensor([10.0, 10.0]),
        angle_loc=torch.zeros(2), angle_concentration=torch.ones(2))
    with torch.no_grad():
        alone = [posterior(hmm.model, d, max_plate_nesting=2) for d in (short, long)]
        both = posterior(hmm.model, padded, max_plate_nesting=2)
        assert float(both.log_likelihood()) == pytest.approx(
            sum(float(a.log_likelihood()) for a in alone), rel=1e-12)
        assert both.map()["x"].reshape(2, 40)[0, :4].tolist() == [1, 1, 1, 1]
        assert alone[0].map()["x"].reshape(-1).tolist() == [1, 1, 1, 1]
        for a, i, n in ((alone[0], 0, 4), (alone[1], 1, 40)):
            torch.testing.assert_close(both.marginals()["x"].reshape(2, 40, 2)[i, :n],
                                       a.marginals()["x"].reshape(n, 2))


# ------------------------------------------------------------------------------------------------
# the script

PROG = "examples.animal_movement"
FILES = ("checkpoint.pt", "results.json", "tracks.png", "loss.png")


def _argv(out: Path, *extra: str) -> list[str]:
    return ["--smoke-test", "--no-progress", "--data-dir", str(DATA), "--out-dir", str(out),
            "--threads", "1", *extra]


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> SimpleNamespace:
    """Run the program in this process as ``python -m`` runs it (:func:`run_cli`); the result
    looks like ``run_example``'s, for ``assert_one_line_error``."""
    capsys.readouterr()
    try:
        run_cli(f"python -m {PROG}", main, list(argv))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {name: ((folder / name).read_bytes(), (folder / name).stat().st_mtime_ns)
            for name in FILES if (folder / name).is_file()}


@SEALS.needed
def test_resume_continues_exactly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    full = main(_argv(tmp_path / "full", "--steps", "4", "--checkpoint-every", "1"))
    main(_argv(tmp_path / "split", "--steps", "2", "--checkpoint-every", "1"))
    capsys.readouterr()
    resumed = main(_argv(tmp_path / "split", "--steps", "4", "--resume"))
    out = capsys.readouterr().out
    assert f"resumed from {tmp_path / 'split' / 'checkpoint.pt'}: step 2 of 4\n" in out
    assert len(resumed["loss_history"]) == 4
    assert resumed["loss_history"] == pytest.approx(full["loss_history"], rel=1e-12)
    assert resumed["log_likelihood"] == pytest.approx(full["log_likelihood"], rel=1e-12)
    assert full["loss_history"][-1] < full["loss_history"][0]  # it trains
    with pytest.raises(ExampleError, match="other options .*--states 3 -> 2"):
        main(_argv(tmp_path / "split", "--steps", "5", "--resume", "--states", "2"))
    assert "resumed" not in capsys.readouterr().out


@SEALS.needed
def test_report_on_the_fur_seal(tmp_path: Path) -> None:
    r = main(_argv(tmp_path, "--dataset", "nfs", "--random-effects", "individual",
                   "--dive-model", "poisson", "--max-length", "60"))
    assert r["locations"] == 60 and r["individuals_used"] == 1
    (row,) = r["individuals"]
    # without a group class the individuals' log-likelihoods add up to the total
    assert row["log_likelihood"] == pytest.approx(r["log_likelihood"], rel=1e-10)
    assert sum(row["map_occupancy"].values()) == pytest.approx(1.0, abs=1e-12)
    assert sum(row["posterior_occupancy"].values()) == pytest.approx(1.0, abs=1e-10)
    assert sum(row["class_posterior"]) == pytest.approx(1.0, abs=1e-10)
    means = r["params"]["step_mean_km"]
    assert means == sorted(means) and "dive_rate" in r["params"]
    assert r["params"]["state_names"] == ["resting", "foraging", "travelling"]
    trans = torch.tensor(r["params"]["transition_matrices"])
    assert trans.shape == (1, 3, 3, 3)
    torch.testing.assert_close(trans.sum(-1), torch.ones(1, 3, 3))


@SEALS.needed
def test_smoke_run_subprocess(tmp_path: Path) -> None:
    r = run_example(PROG, *_argv(tmp_path), env={}, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "exact log-likelihood" in r.stdout
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["dataset"] == "ses" and res["individuals_used"] == 3 and res["steps"] == 5
    assert math.isfinite(res["log_likelihood"]) and len(res["individuals"]) == 3
    assert sum(i["log_likelihood"] for i in res["individuals"]) != pytest.approx(
        res["log_likelihood"], rel=1e-6)  # the group class couples the seals
    assert sum(res["group_class_posterior"]) == pytest.approx(1.0, abs=1e-10)
    for name in ("tracks.png", "loss.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "checkpoint.pt").is_file()
    # it says where it wrote its files
    written = r.stdout[r.stdout.index(f"{PROG}: wrote"):]
    assert f"results: {tmp_path / 'results.json'}" in written
    assert f"checkpoint: {tmp_path / 'checkpoint.pt'}" in written
    assert f"figures: {tmp_path / 'tracks.png'}, {tmp_path / 'loss.png'}" in written


@SEALS.needed
def test_a_second_run_is_refused_and_the_first_is_untouched(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(_argv(tmp_path, "--steps", "2"))
    before = _snapshot(tmp_path)
    assert set(before) == set(FILES)
    # each of the run's files alone is enough to refuse a new run (the checkpoint first)
    for name in FILES:
        r = _cli(capsys, *_argv(tmp_path, "--steps", "10"))
        assert_one_line_error(r, PROG, str(tmp_path / name), "--resume", "another --out-dir")
        assert _snapshot(tmp_path) == before  # nothing rewritten
        (tmp_path / name).unlink()
        before.pop(name)
    assert not any(tmp_path.iterdir())


@SEALS.needed
def test_resume_without_a_checkpoint_keeps_the_results(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(_argv(tmp_path, "--steps", "2"))
    (tmp_path / "checkpoint.pt").unlink()
    before = _snapshot(tmp_path)
    r = _cli(capsys, *_argv(tmp_path, "--steps", "10", "--resume"))
    assert_one_line_error(r, PROG, "no checkpoint", str(tmp_path / "results.json"))
    assert _snapshot(tmp_path) == before


@SEALS.needed
def test_smoke_test_keeps_explicit_options(tmp_path: Path) -> None:
    r = main(_argv(tmp_path, "--steps", "4", "--checkpoint-every", "3", "--individuals", "2",
                   "--max-length", "30"))
    assert r["steps"] == 4 and len(r["loss_history"]) == 4
    assert r["individuals_used"] == 2 and r["locations"] == 60
    # a checkpoint at step 3, then the last one at step 4
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["extra"]["step"] == 4 and state["extra"]["options"]["max_length"] == 30
    # the smoke defaults where nothing is given
    r = main(_argv(tmp_path / "defaults"))
    assert (r["steps"], r["individuals_used"], r["locations"]) == (5, 3, 120)


@SEALS.needed
def test_resume_refusals_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                      ) -> None:
    main(_argv(tmp_path, "--steps", "3"))
    path = str(tmp_path / "checkpoint.pt")
    before = _snapshot(tmp_path)
    r = _cli(capsys, *_argv(tmp_path, "--steps", "2", "--resume"))
    assert_one_line_error(r, PROG, path, "at step 3, past --steps 2", "--steps 3 or more")
    for extra, needle in [(("--states", "2"), "--states 3 -> 2"),
                          (("--random-effects", "none"), "--random-effects 'both' -> 'none'"),
                          (("--lr", "0.1"), "--lr 0.05 -> 0.1"),
                          (("--max-length", "20"), "--max-length 40 -> 20"),
                          (("--dataset", "nfs"), "--dataset 'ses' -> 'nfs'")]:
        r = _cli(capsys, *_argv(tmp_path, "--steps", "5", "--resume", *extra))
        assert_one_line_error(r, PROG, path, "other options", needle)
    assert _snapshot(tmp_path) == before
    # the same number of steps: nothing to train, the report again
    r = _cli(capsys, *_argv(tmp_path, "--steps", "3", "--resume"))
    assert r.returncode == 0, r.stderr
    assert f"resumed from {path}: step 3 of 3" in r.stdout
    # a damaged checkpoint: cut in half
    data = (tmp_path / "checkpoint.pt").read_bytes()
    (tmp_path / "checkpoint.pt").write_bytes(data[:len(data) // 2])
    r = _cli(capsys, *_argv(tmp_path, "--steps", "4", "--resume"))
    assert_one_line_error(r, PROG, path, "damaged")


def test_garbage_checkpoint_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint \x00\x01\x02" * 10)
    r = _cli(capsys, *_argv(tmp_path, "--resume"))
    assert_one_line_error(r, PROG, str(tmp_path / "checkpoint.pt"), "damaged")
    torch.save({"params": {}}, tmp_path / "checkpoint.pt")
    r = _cli(capsys, *_argv(tmp_path, "--resume"))
    assert_one_line_error(r, PROG, str(tmp_path / "checkpoint.pt"), "not a checkpoint")


@pytest.mark.parametrize("data_args, needles", [
    ((), ("no data folder", "--data-dir", "PLATED_DATA")),
    (("--data-dir", "/nonexistent"), ("'/nonexistent'", "does not exist", "--data-dir")),
])
def test_missing_data_is_one_line_and_leaves_no_folder(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        data_args: tuple[str, ...], needles: tuple[str, ...]) -> None:
    monkeypatch.delenv("PLATED_DATA", raising=False)
    out = tmp_path / "new" / "run"
    r = _cli(capsys, "--smoke-test", "--no-progress", "--out-dir", str(out), *data_args)
    assert_one_line_error(r, PROG, *needles)
    assert not out.exists() and not (tmp_path / "new").exists()


def test_missing_data_subprocess(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = run_example(PROG, "--smoke-test", "--out-dir", str(out), env={"PLATED_DATA": None},
                    timeout=120)
    assert_one_line_error(r, PROG, "no data folder", "--data-dir")
    assert not out.exists()


BAD_OPTIONS = [("--steps", "-5"), ("--steps", "0"), ("--steps", "1.5"), ("--states", "0"),
               ("--individual-classes", "0"), ("--group-classes", "-1"), ("--lr", "0"),
               ("--lr", "-0.1"), ("--lr", "nan"), ("--checkpoint-every", "0"),
               ("--individuals", "0"), ("--max-length", "-3"), ("--threads", "0"),
               ("--device", "gpu"), ("--device", "cuda")]


@pytest.mark.parametrize("option, value", BAD_OPTIONS)
def test_bad_options_are_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch, option: str,
                                      value: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a GPU machine
    r = _cli(capsys, "--smoke-test", "--out-dir", str(tmp_path / "run"), option, value)
    assert_one_line_error(r, PROG, f"argument {option}", repr(value), usage=True)
    assert not (tmp_path / "run").exists()


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    r = _cli(capsys, "--help")
    assert r.returncode == 0
    text = r.stdout
    assert "``" not in text and ":math:" not in text and ":func:" not in text
    assert "seals/sesData.csv" in text and "seals/nfs_foragedives.csv" in text
    # one block per option: its flag line and the help lines under it
    options = text[text.index("options:"):]
    blocks = re.split(r"\n  (?=-)", options)[1:]
    assert len(blocks) > 15
    for block in blocks:
        first, *more = block.split("\n")
        helped = re.split(r"\s{2,}", first.strip(), maxsplit=1)[1:] + more
        assert "".join(helped).strip(), block  # help beside the flags or below them
        assert block.count("(default:") <= 1, block
    assert "(default: 1500)" in text


@SEALS.needed
def test_ctrl_c_keeps_a_resumable_checkpoint(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    argv = _argv(tmp_path, "--steps", "100000", "--checkpoint-every", "1")
    path = tmp_path / "checkpoint.pt"
    code, out, err = interrupt_run([sys.executable, "-m", PROG, *argv],
                                   path, env, settle=0.5)
    assert code == 130, (out, err)
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.strip()]
    assert line.startswith(f"{PROG}: interrupted; the last checkpoint in --out-dir is kept. "
                           f"Continue with: python -m {PROG} ")
    assert line.endswith("--resume") and "--steps 100000" in line
    assert not (tmp_path / "results.json").exists()
    step = torch.load(path, weights_only=False)["extra"]["step"]
    assert step >= 1
    capsys.readouterr()
    r = main(_argv(tmp_path, "--steps", str(step + 2), "--resume"))
    assert f"resumed from {path}: step {step} of {step + 2}" in capsys.readouterr().out
    assert len(r["loss_history"]) == step + 2 and (tmp_path / "results.json").is_file()
