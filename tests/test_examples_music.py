"""The polyphonic-music example (:mod:`examples.music`) on the real data files.

- The four data sets load with their standard split sizes and longest pieces.
- Each of the six models gives the same loss and gradients under ``TVE_ELBO`` in its
  ``markov_plate`` form and in its ``pyro.markov`` loop form, and under Pyro's
  ``TraceEnum_ELBO`` (loop form), on a small batch of real JSB chorales.
- The exact negative log-likelihood equals a hand-written forward algorithm, also on Piano-midi's
  longest piece (3,857 steps), which the engine eliminates as a sequential plate.
- ``--resume`` continues a run exactly, and the script runs end to end (smoke mode).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyro
import pytest
import torch
from helpers import find_data
from pyro.infer import TraceEnum_ELBO

from examples.data import POLYPHONIC, load_polyphonic
from examples.music import MODELS, Config, Music, batches, main, negative_log_likelihood
from plated.pyro import TVE_ELBO, posterior

REPO = Path(__file__).resolve().parents[1]


DATA = find_data(*(f"polyphonic/{f}" for f in POLYPHONIC.values()))

SPLIT_SIZES = {"JSB_Chorales": (229, 76, 77), "Nottingham": (694, 173, 170),
               "MuseData": (524, 135, 124), "Piano_midi": (87, 12, 25)}
#: The longest piece of each split (the data README's "longest sequences" are the train column).
LONGEST = {"JSB_Chorales": (129, 144, 160), "Nottingham": (1788, 1473, 1793),
           "MuseData": (3457, 3723, 4273), "Piano_midi": (3857, 1637, 2645)}


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


def test_nll_equals_forward_algorithm_on_jsb() -> None:
    pyro.clear_param_store()
    seqs, lengths = load_polyphonic("JSB_Chorales", "valid", data_dir=DATA, dtype=torch.float64)
    seqs, lens = seqs[:7], lengths[:7].tolist()
    music = Music(Config("hmm", hidden=4))
    values = _map_values(music, seqs, lens)
    ours = negative_log_likelihood(music, seqs, lens, batch_size=3)  # batched: 3 + 3 + 1
    ref = _forward_nll(values["probs_x"], values["probs_y"], seqs, lens)
    assert ours == pytest.approx(ref, rel=1e-10)


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


def _argv(out: Path, *extra: str) -> list[str]:
    return ["--smoke-test", "--no-progress", "--data-dir", str(DATA), "--out-dir", str(out),
            "--batch-size", "4", "--dtype", "float64", *extra]


def test_resume_continues_exactly(tmp_path: Path) -> None:
    full = main(_argv(tmp_path / "full", "--steps", "3", "--checkpoint-every", "1"))
    main(_argv(tmp_path / "split", "--steps", "2", "--checkpoint-every", "1"))
    resumed = main(_argv(tmp_path / "split", "--steps", "3", "--checkpoint-every", "1",
                         "--resume"))
    a, b = full["runs"]["tve"], resumed["runs"]["tve"]
    assert len(b["loss_history"]) == 3
    assert b["loss_history"] == pytest.approx(a["loss_history"], rel=1e-12)
    assert b["nll_per_step"] == pytest.approx(a["nll_per_step"], rel=1e-12)
    with pytest.raises(ValueError, match="not a checkpoint"):
        (tmp_path / "split" / "checkpoint_tve.pt").write_bytes(b"")
        torch.save({"x": 1}, tmp_path / "split" / "checkpoint_tve.pt")
        main(_argv(tmp_path / "split", "--steps", "3", "--resume"))


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
