"""The polyphonic-music example (:mod:`examples.music`) on the real data files.

- The four data sets load with their standard split sizes and longest pieces.
- Each of the six models gives the same loss and gradients under ``TVE_ELBO`` in its
  ``markov_plate`` form and in its ``pyro.markov`` loop form, and under Pyro's
  ``TraceEnum_ELBO`` (loop form), on a small batch of real JSB chorales.
- The exact negative log-likelihood equals a hand-written forward algorithm, also on Piano-midi's
  longest piece (3,857 steps), which the engine eliminates as a sequential plate.
- ``--resume`` continues a run exactly, and the script runs end to end (smoke mode).

The program's behaviour as a command (refusing to overwrite a run, one-line errors, validated
options, smoke defaults that keep explicit options, the resume message, Ctrl-C, the files it
names, its help) is tested on a small synthetic data file of the same format, so those tests run
without the real data.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyro
import pytest
import torch
from helpers import REPO, assert_one_line_error, interrupt_run, real_data, run_example
from pyro.infer import TraceEnum_ELBO

import examples.music
from examples.common import ExampleError, load_checkpoint, run_cli
from examples.data import POLYPHONIC, DataError, load_polyphonic
from examples.music import MODELS, PROG, Config, Music, batches, main, negative_log_likelihood
from plated.pyro import TVE_ELBO, posterior

POLY = real_data(*(f"polyphonic/{f}" for f in POLYPHONIC.values()))
DATA = POLY.folder

SPLIT_SIZES = {"JSB_Chorales": (229, 76, 77), "Nottingham": (694, 173, 170),
               "MuseData": (524, 135, 124), "Piano_midi": (87, 12, 25)}
#: The longest piece of each split (the data README's "longest sequences" are the train column).
LONGEST = {"JSB_Chorales": (129, 144, 160), "Nottingham": (1788, 1473, 1793),
           "MuseData": (3457, 3723, 4273), "Piano_midi": (3857, 1637, 2645)}


@POLY.needed
@pytest.mark.parametrize("name", list(SPLIT_SIZES))
def test_polyphonic_splits(name: str) -> None:
    for split, size, longest in zip(("train", "valid", "test"), SPLIT_SIZES[name], LONGEST[name],
                                    strict=True):
        seqs, lengths = load_polyphonic(name, split, data_dir=DATA)
        assert seqs.shape == (size, longest, 88) and int(lengths.max()) == longest
        assert lengths.shape == (size,) and int(lengths.min()) >= 1
        assert torch.logical_or(seqs == 0, seqs == 1).all()
        keys_down = seqs.amax(-1)  # (sequences, steps)
        past_end = torch.arange(seqs.shape[1]) >= lengths[:, None]
        assert not keys_down[past_end].any()


def _jsb_batch(n: int = 3, t: int = 8) -> tuple[torch.Tensor, list[int]]:
    seqs, lengths = load_polyphonic("JSB_Chorales", "train", data_dir=DATA, dtype=torch.float64)
    lens = [min(int(x), t) for x in lengths[:n]]
    lens[1] = max(1, lens[1] - 3)  # unequal lengths: the masks matter
    return seqs[:n, :t], lens


def _loss_and_grads(elbo: Any, music: Music, seqs: torch.Tensor, lens: list[int],
                    vectorized: bool) -> tuple[float, dict[str, torch.Tensor]]:
    store = pyro.get_param_store()
    for _, p in store.named_parameters():
        p.grad = None
    loss = elbo.loss_and_grads(music.model, music.guide, seqs, lens, scale=2.0,
                               vectorized=vectorized)
    grads = {name: p.grad.clone() for name, p in store.named_parameters() if p.grad is not None}
    return float(loss), grads


@POLY.needed
@pytest.mark.parametrize("model", MODELS)
def test_forms_and_elbos_agree(model: str) -> None:
    pyro.clear_param_store()
    seqs, lens = _jsb_batch()
    music = Music(Config(model, hidden=3, nn_dim=5))
    # register the guide's parameters, then move them off their initial values
    TVE_ELBO(max_plate_nesting=2).loss(music.model, music.guide, seqs, lens)
    with torch.no_grad():
        for _, p in pyro.get_param_store().items():
            p.add_(0.3 * torch.randn_like(p))
    results = {
        "tve markov_plate": _loss_and_grads(TVE_ELBO(max_plate_nesting=2), music, seqs, lens,
                                            True),
        "tve loop": _loss_and_grads(TVE_ELBO(max_plate_nesting=2), music, seqs, lens, False),
        "pyro loop": _loss_and_grads(TraceEnum_ELBO(max_plate_nesting=2), music, seqs, lens,
                                     False),
    }
    ref_loss, ref_grads = results["pyro loop"]
    assert ref_grads and (model != "nnhmm" or any("tones_net" in k for k in ref_grads))
    for what, (loss, grads) in results.items():
        assert loss == pytest.approx(ref_loss, rel=1e-9), what
        assert grads.keys() == ref_grads.keys(), what
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-7, atol=1e-9,
                                       msg=f"{what}: gradient of {name}")


def _forward_nll(probs_x: torch.Tensor, probs_y: torch.Tensor, seqs: torch.Tensor,
                 lens: list[int]) -> float:
    """-log p(seqs) of the first-order HMM by a hand-written forward recursion (x_{-1} = 0)."""
    total = 0.0
    log_x = probs_x.log()
    for s, n in zip(seqs, lens, strict=True):
        y = s[:n]
        emit = (y.unsqueeze(1) * probs_y.log() + (1 - y.unsqueeze(1)) * torch.log1p(-probs_y)
                ).sum(-1)  # (T, K)
        alpha = log_x[0] + emit[0]
        for t in range(1, n):
            alpha = torch.logsumexp(alpha[:, None] + log_x, dim=0) + emit[t]
        total -= float(torch.logsumexp(alpha, 0))
    return total


def _map_values(music: Music, seqs: torch.Tensor, lens: list[int]) -> dict[str, torch.Tensor]:
    TVE_ELBO(max_plate_nesting=2).loss(music.model, music.guide, seqs[:1], lens[:1])
    return {k: v.detach() for k, v in music.guide.median().items()}


@POLY.needed
def test_nll_equals_forward_algorithm_on_jsb() -> None:
    pyro.clear_param_store()
    seqs, lengths = load_polyphonic("JSB_Chorales", "valid", data_dir=DATA, dtype=torch.float64)
    seqs, lens = seqs[:7], lengths[:7].tolist()
    music = Music(Config("hmm", hidden=4))
    values = _map_values(music, seqs, lens)
    ours = negative_log_likelihood(music, seqs, lens, batch_size=3)  # batched: 3 + 3 + 1
    ref = _forward_nll(values["probs_x"], values["probs_y"], seqs, lens)
    assert ours == pytest.approx(ref, rel=1e-10)


@POLY.needed
def test_longest_piano_midi_piece_runs_as_a_sequential_plate() -> None:
    pyro.clear_param_store()
    seqs, lengths = load_polyphonic("Piano_midi", "train", data_dir=DATA, dtype=torch.float64)
    i = int(lengths.argmax())
    t = int(lengths[i])
    assert t == 3857
    seq, lens = seqs[i:i + 1, :t], [t]
    music = Music(Config("hmm", hidden=3))
    values = _map_values(music, seq, lens)
    post = posterior(music.model, seq, lens, include_prior=False, guide=music.guide,
                     max_plate_nesting=2)
    time_plate = next(p for p in post.graph.plates if p.name == "time")
    assert time_plate.sequential and time_plate.size == t
    assert post.sites == ("x_prev", "x")  # the init site and one site for all 3,857 steps
    ref = _forward_nll(values["probs_x"], values["probs_y"], seq, lens)
    assert float(-post.log_likelihood().detach()) == pytest.approx(ref, rel=1e-10)
    assert negative_log_likelihood(music, seq, lens) == pytest.approx(ref, rel=1e-10)
    x = post.map()["x"].reshape(-1)
    assert x.shape == (t,) and int(x.min()) >= 0 and int(x.max()) < 3


def test_batches_cover_every_sequence_once() -> None:
    lengths = [5, 1, 9, 3, 3, 7, 2]
    out = batches(lengths, 3)
    assert sorted(i for b in out for i in b) == list(range(7))
    assert [[lengths[i] for i in b] for b in out] == [[1, 2, 3], [3, 5, 7], [9]]
    shuffled = batches(lengths, 3, torch.Generator().manual_seed(1))
    assert sorted(map(sorted, shuffled)) == sorted(map(sorted, out))


def _argv(out: Path, *extra: str, data: Path = DATA) -> list[str]:
    return ["--smoke-test", "--no-progress", "--data-dir", str(data), "--out-dir", str(out),
            "--batch-size", "4", "--dtype", "float64", *extra]


@POLY.needed
def test_resume_continues_exactly(tmp_path: Path) -> None:
    full = main(_argv(tmp_path / "full", "--steps", "3", "--checkpoint-every", "1"))
    main(_argv(tmp_path / "split", "--steps", "2", "--checkpoint-every", "1"))
    resumed = main(_argv(tmp_path / "split", "--steps", "3", "--checkpoint-every", "1",
                         "--resume"))
    a, b = full["runs"]["tve"], resumed["runs"]["tve"]
    assert len(b["loss_history"]) == 3
    assert b["loss_history"] == pytest.approx(a["loss_history"], rel=1e-12)
    assert b["nll_per_step"] == pytest.approx(a["nll_per_step"], rel=1e-12)
    with pytest.raises(ExampleError, match="not a checkpoint"):
        (tmp_path / "split" / "checkpoint_tve.pt").write_bytes(b"")
        torch.save({"x": 1}, tmp_path / "split" / "checkpoint_tve.pt")
        main(_argv(tmp_path / "split", "--steps", "3", "--resume"))


@POLY.needed
def test_smoke_run_with_pyro_comparison(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    cmd = [sys.executable, "-m", "examples.music", "--model", "fhmm", "--compare-pyro",
           "--threads", "1", *_argv(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["runs"]) == {"tve", "pyro"}
    ours, theirs = res["runs"]["tve"], res["runs"]["pyro"]
    assert (ours["form"], theirs["form"]) == ("markov_plate", "loop")
    assert ours["loss_history"] == pytest.approx(theirs["loss_history"], rel=1e-9)
    for split in ("train", "valid", "test"):
        assert ours["nll_per_step"][split] == pytest.approx(theirs["nll_per_step"][split],
                                                            rel=1e-9)
        assert 0 < ours["nll_per_step"][split] < 88 * 10
    sbs = res["side_by_side"]
    assert sbs["tve_ms"] > 0 and sbs["pyro_ms"] > 0 and sbs["repeats"] == 2
    assert sbs["pyro_over_tve"] == pytest.approx(sbs["pyro_ms"] / sbs["tve_ms"])
    for png in ("map_states.png", "marginals.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    help_ = subprocess.run([sys.executable, "-m", "examples.music", "--help"], capture_output=True,
                           text=True, env=env, cwd=REPO, timeout=120, check=False)
    assert help_.returncode == 0 and "--compare-pyro" in help_.stdout


def test_unknown_model_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown model 'hmm3'; choose one of hmm, arhmm"):
        Config("hmm3")


@POLY.needed
def test_padding_changes_no_map_state() -> None:
    """A short piece decodes the same alone and in a batch padded to a longer piece: past its
    end the chain stays put instead of moving freely. With uninformative emissions and these
    transitions a piece of 10 steps alone ends in the less sticky state 2 (0.9 * 0.8**9 beats
    0.1 * 0.9**9), but a free tail of 100 steps would pull its last state to state 1 (by
    (0.9 / 0.8)**100)."""
    pyro.clear_param_store()
    seqs, lengths = load_polyphonic("JSB_Chorales", "test", data_dir=DATA, dtype=torch.float64)
    long_ = int(lengths.argmax())
    music = Music(Config("hmm", hidden=3))
    TVE_ELBO(max_plate_nesting=2).loss(music.model, music.guide, seqs[:1], [int(lengths[0])])
    store = pyro.get_param_store()
    eps = 1e-6
    store["AutoDelta.probs_x"] = torch.tensor([[eps, 0.1, 0.9], [eps, 0.9, 0.1],
                                               [eps, 0.2, 0.8]]) + eps
    store["AutoDelta.probs_y"] = torch.full((3, 88), 0.3)
    short = torch.zeros(1, 10, 88)

    def decode(batch: torch.Tensor, lens: list[int]) -> torch.Tensor:
        post = posterior(music.model, batch, lens, include_prior=False, guide=music.guide,
                         max_plate_nesting=2)
        return post.map()["x"].reshape(len(lens), -1)

    alone = decode(short, [10])[0]
    assert alone.tolist() == [2] * 10
    t_long = int(lengths[long_])
    batch = torch.cat([seqs[long_:long_ + 1, :t_long],
                       torch.cat([short, torch.zeros(1, t_long - 10, 88)], dim=1)])
    padded = decode(batch, [t_long, 10])[1, :10]
    assert torch.equal(padded, alone)


# ----------------------------------------------------------------------------------------------
# the program as a command, on a synthetic data file of the real format


def _write_fake_data(folder: Path, seed: int = 0) -> Path:
    """``folder/polyphonic/JSB_Chorales.mat`` with six random piano rolls of 4 to 9 steps per
    split, as MATLAB cell arrays like the real file; returns ``folder``."""
    import scipy.io

    rng = np.random.default_rng(seed)
    mat = {}
    for var in ("traindata", "validdata", "testdata"):
        cells = np.empty((1, 6), dtype=object)
        for i in range(6):
            cells[0, i] = (rng.random((int(rng.integers(4, 10)), 88)) < 0.1).astype(np.float64)
        mat[var] = cells
    (folder / "polyphonic").mkdir(parents=True)
    scipy.io.savemat(str(folder / "polyphonic" / "JSB_Chorales.mat"), mat)
    return folder


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_fake_data(tmp_path_factory.mktemp("fake_data"))


def _fake_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--smoke-test", "--no-progress", "--threads", "1", "--data-dir", str(data),
            "--out-dir", str(out), *extra]


@pytest.fixture(scope="module")
def finished_run(fake_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The --out-dir of one finished smoke run (3 steps) on the synthetic data; tests copy it
    before they change anything."""
    out = tmp_path_factory.mktemp("finished") / "run"
    main(_fake_argv(fake_data, out))
    return out


def _copy_run(finished_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> SimpleNamespace:
    """Run the program in this process as ``python -m examples.music`` would (through
    ``run_cli``): its exit status and output, shaped like a finished ``run_example``."""
    capsys.readouterr()
    code = 0
    try:
        run_cli(PROG, main, list(argv))
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def test_truncated_mat_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a synthetic file, so that this runs without the real data; the real file is below
    data = _write_fake_data(tmp_path / "data")
    path = data / "polyphonic" / "JSB_Chorales.mat"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*truncated or damaged"):
        load_polyphonic("JSB_Chorales", "train", data_dir=data)
    r = _cli(capsys, *_fake_argv(data, tmp_path / "out"))
    assert_one_line_error(r, "examples.music", str(path), "truncated")
    assert not (tmp_path / "out").exists()


@POLY.needed
def test_truncated_real_mat_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "polyphonic").mkdir()
    real = (DATA / "polyphonic" / "JSB_Chorales.mat").read_bytes()
    path = tmp_path / "polyphonic" / "JSB_Chorales.mat"
    for size in (100, len(real) // 2, len(real) - 10):
        path.write_bytes(real[:size])
        with pytest.raises(DataError, match=re.escape(str(path)) + ".*truncated or damaged"):
            load_polyphonic("JSB_Chorales", "valid", data_dir=tmp_path)


def test_second_run_is_refused_and_keeps_the_first(finished_run: Path, fake_data: Path,
                                                   tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = _copy_run(finished_run, tmp_path)
    assert {p.name for p in out.iterdir()} == {"checkpoint_tve.pt", "results.json",
                                               "map_states.png", "marginals.png"}
    before = _snapshot(out)
    r = _cli(capsys, *_fake_argv(fake_data, out))
    assert_one_line_error(r, "examples.music", str(out / "checkpoint_tve.pt"), "--resume")
    assert _snapshot(out) == before


@pytest.mark.parametrize("name", ["checkpoint_pyro.pt", "results.json", "map_states.png",
                                  "marginals.png"])
def test_any_file_of_a_run_is_refused(name: str, fake_data: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / name).write_bytes(b"an earlier run's file")
    r = _cli(capsys, *_fake_argv(fake_data, out, "--compare-pyro"))
    assert_one_line_error(r, "examples.music", str(out / name), "--resume")
    assert [p.name for p in out.iterdir()] == [name]
    assert (out / name).read_bytes() == b"an earlier run's file"


def test_no_data_folder_is_one_line(tmp_path: Path) -> None:
    out = tmp_path / "new" / "run"
    r = run_example("examples.music", "--smoke-test", "--out-dir", str(out),
                    env={"PLATED_DATA": None}, timeout=300)
    assert_one_line_error(r, "examples.music", "PLATED_DATA", "--data-dir")
    assert not (tmp_path / "new").exists()


def test_wrong_data_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    out = tmp_path / "run"
    r = _cli(capsys, *_fake_argv(Path("/nonexistent"), out))
    assert_one_line_error(r, "examples.music", "/nonexistent")
    assert not out.exists()


@pytest.mark.parametrize("device", ["cuda", "gpu"])
def test_unusable_device_is_a_usage_error(device: str, tmp_path: Path, fake_data: Path,
                                          monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on this CPU machine
    out = tmp_path / "run"
    r = _cli(capsys, *_fake_argv(fake_data, out, "--device", device))
    assert_one_line_error(r, "examples.music", "--device", repr(device), "cpu", usage=True)
    assert not out.exists()


@pytest.mark.parametrize("option, value", [
    ("--batch-size", "0"), ("--batch-size", "-4"), ("--steps", "-5"), ("--steps", "0"),
    ("--hidden", "0"), ("--lr", "0"), ("--lr", "-0.1"), ("--eval-batch-size", "0"),
    ("--checkpoint-every", "0"), ("--time-repeats", "0"), ("--num-sequences", "0"),
    ("--threads", "0"), ("--steps", "many")])
def test_bad_numbers_are_usage_errors(option: str, value: str, tmp_path: Path, fake_data: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    r = _cli(capsys, *_fake_argv(fake_data, tmp_path / "run", option, value))
    assert_one_line_error(r, "examples.music", option, repr(value), usage=True)
    assert not (tmp_path / "run").exists()


def test_smoke_test_keeps_explicit_options_and_names_its_files(
        fake_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    figures: dict[str, Any] = {}
    real_save = examples.music.save_figure

    def capture(fig: Any, path: Any, *args: Any, **kwargs: Any) -> Path:
        figures[Path(path).name] = fig
        return real_save(fig, path, *args, **kwargs)

    monkeypatch.setattr(examples.music, "save_figure", capture)
    out = tmp_path / "run"
    r = _cli(capsys, *_fake_argv(fake_data, out, "--steps", "4", "--num-sequences", "5",
                                 "--hidden", "4", "--model", "fhmm"))
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "results.json").read_text())
    assert len(res["runs"]["tve"]["loss_history"]) == 4 and res["steps"] == 4
    assert res["num_sequences"] == {"train": 5, "valid": 5, "test": 5}
    assert res["config"]["hidden"] == 4
    assert load_checkpoint(out / "checkpoint_tve.pt")["extra"]["step"] == 4
    written = r.stdout[r.stdout.index("examples.music: wrote"):]
    for path in ("results.json", "checkpoint_tve.pt", "map_states.png", "marginals.png"):
        assert str(out / path) in written
    # the MAP states are whole numbers: so are the ticks of their axis
    ax2 = figures["map_states.png"].axes[1]
    assert ax2.get_ylabel() == "MAP state"
    ticks = list(ax2.get_yticks())
    assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_map_state_axis_has_whole_number_ticks(fake_data: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """With transitions 0 -> 1 -> 2 -> 1 -> 2 ... and uninformative keys the MAP states of a
    piece alternate between 1 and 2, where matplotlib's default ticks would be 1.0, 1.2, ..."""
    figures: dict[str, Any] = {}
    monkeypatch.setattr(examples.music, "save_figure",
                        lambda fig, path, *a, **k: figures.setdefault(Path(path).name, fig))
    pyro.clear_param_store()
    seqs, lengths = load_polyphonic("JSB_Chorales", "test", data_dir=fake_data,
                                    dtype=torch.float64)
    lens = lengths.tolist()
    music = Music(Config("hmm", hidden=3))
    TVE_ELBO(max_plate_nesting=2).loss(music.model, music.guide, seqs[:1], lens[:1])
    store = pyro.get_param_store()
    eps = 1e-4
    store["AutoDelta.probs_x"] = torch.tensor([[eps, 1 - 2 * eps, eps], [eps, eps, 1 - 2 * eps],
                                               [eps, 1 - 2 * eps, eps]])
    store["AutoDelta.probs_y"] = torch.full((3, 88), 0.3)
    examples.music._plots(music, seqs, lens, tmp_path)  # noqa: SLF001
    ax2 = figures["map_states.png"].axes[1]
    states = ax2.get_lines()[0].get_ydata()
    assert set(states.tolist()) == {1, 2}
    ticks = list(ax2.get_yticks())
    assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_resume_says_where_and_refuses_changed_options(
        finished_run: Path, fake_data: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = _copy_run(finished_run, tmp_path)
    ckpt = out / "checkpoint_tve.pt"
    before = _snapshot(out)
    for changed, needle in ((["--model", "arhmm"], "--model 'hmm' -> 'arhmm'"),
                            (["--hidden", "5"], "--hidden 3 -> 5"),
                            (["--lr", "0.1"], "--lr"), (["--dtype", "float64"], "--dtype"),
                            (["--num-sequences", "4"], "--num-sequences"),
                            (["--steps", "2"], "--steps 3 or more")):
        r = _cli(capsys, *_fake_argv(fake_data, out, "--resume", *changed))
        assert_one_line_error(r, "examples.music", str(ckpt), needle)
        assert _snapshot(out) == before
    r = _cli(capsys, *_fake_argv(fake_data, out, "--resume", "--steps", "5",
                                 "--checkpoint-every", "1", "--eval-batch-size", "2"))
    assert r.returncode == 0, r.stderr
    assert f"resumed from {ckpt}: step 3 of 5" in r.stdout.splitlines()
    res = json.loads((out / "results.json").read_text())
    assert len(res["runs"]["tve"]["loss_history"]) == 5


def test_damaged_checkpoint_is_named(finished_run: Path, fake_data: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = _copy_run(finished_run, tmp_path)
    ckpt = out / "checkpoint_tve.pt"
    real = ckpt.read_bytes()
    for damaged in (b"garbage, not a checkpoint", real[: len(real) // 2]):
        ckpt.write_bytes(damaged)
        r = _cli(capsys, *_fake_argv(fake_data, out, "--resume"))
        assert_one_line_error(r, "examples.music", str(ckpt), "delete it")
        assert ckpt.read_bytes() == damaged


def test_ctrl_c_keeps_a_resumable_checkpoint(fake_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    ckpt = out / "checkpoint_tve.pt"
    argv = _fake_argv(fake_data, out, "--steps", "100000", "--checkpoint-every", "1")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    code, stdout, stderr = interrupt_run([sys.executable, "-m", "examples.music", *argv],
                                         ckpt, env, settle=0.0)
    assert code == 130, (stdout, stderr)
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("examples.music: interrupted; the last checkpoint in --out-dir "
                                "is kept. Continue with: python -m examples.music "), stderr
    assert lines[-1].endswith(" --resume") and str(out) in lines[-1]
    done = load_checkpoint(ckpt)["extra"]["step"]
    assert done >= 1
    res = main(_fake_argv(fake_data, out, "--steps", str(done + 1), "--resume"))
    assert len(res["runs"]["tve"]["loss_history"]) == done + 1


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    actions = examples.music._parser()._actions  # noqa: SLF001 - argparse lists them nowhere else
    assert len(actions) >= 20
    for action in actions:
        assert action.help and action.help.strip(), action.option_strings
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text and ":math:" not in text and ":class:" not in text
    assert "DIR/polyphonic/*.mat" in " ".join(text.split())
    blocks = re.split(r"\n  (?=-)", text.split("options:", 1)[1])[1:]
    assert len(blocks) == len(actions)
    for block in blocks:
        assert block.count("(default:") <= 1, block
