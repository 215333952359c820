"""The ``"markov"`` mode of the video-QA model (a Markov chain over the needle's frames): its
exact predictive, loss, marginals and gradients against brute force over every state sequence,
the chunked long-video scorer against the unchunked model, and a smoke run of the needle task
with a needle of three frames."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

from examples.video_qa.chunked import analyse_long
from examples.video_qa.data import Batch
from examples.video_qa.model import (
    AFTER,
    BEFORE,
    IN,
    ModelConfig,
    VideoQA,
    needle_backward,
    needle_chain_logits,
    needle_forward,
    needle_message_before,
)
from examples.video_qa.train import main

QUIET = ["--no-progress", "--device", "cpu", "--threads", "1"]


def _model(num_answers: int = 3, window: int = 3) -> VideoQA:
    config = ModelConfig(vocab_size=10, num_answers=num_answers, mode="markov", feature_dim=5,
                         dim=8, embed=4, window=window)
    model = VideoQA(config).eval()
    with torch.no_grad():
        assert model.needle_bias is not None
        model.needle_bias.copy_(torch.tensor([-0.7, 0.9]))  # not the symmetric start
    return model


def _batch(lengths: list[int], t: int) -> Batch:
    """Two videos of ``lengths`` frames (padded to ``t``), one question about each and a third
    about the first."""
    videos = torch.randn(2, t, 5)
    video_mask = torch.arange(t)[None] < torch.tensor(lengths)[:, None]
    videos = videos * video_mask[..., None]
    index = torch.tensor([0, 1, 0])
    words, word_lengths = torch.randint(1, 10, (3, 4)), torch.tensor([4, 2, 3])
    answers = torch.tensor([2, 0, 1])
    return Batch(videos, video_mask, index, video_mask[index], words, word_lengths, answers,
                 torch.zeros(3, t, dtype=torch.bool), [0, 1, 2])


def _brute_force(model: VideoQA, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
    """``(log p(a | x, q) (B, A), p(h_t = in) (B, T), p(h_t = in | a) (B, T))`` by summing over
    every state sequence of every question's real frames, from the chain's definition (module
    docstring of :mod:`examples.video_qa.model`), differentiable in the model's parameters."""
    mem, q = model.encode(batch)
    scores = model.attention.score(q.unsqueeze(1), mem).squeeze(1)  # (B, T)
    logp = model.answer_log_probs(mem, q)  # (B, T, A)
    assert model.needle_bias is not None
    enter, stay = model.needle_bias
    log_pred, prior, posterior = [], [], []
    for i in range(len(batch)):
        t = int(batch.frame_mask[i].sum())
        log_terms: list[Tensor] = []  # log p(h) + log prod p(a | in frames), per h, per a
        in_prior = torch.zeros(batch.frame_mask.shape[1])
        weights = []
        for h in itertools.product((BEFORE, IN, AFTER), repeat=t):
            log_ph = torch.zeros(())
            prev = BEFORE
            for step, state in enumerate(h):
                s = scores[i, step]
                if prev == BEFORE and state in (BEFORE, IN):
                    p_in = torch.sigmoid(s + enter)
                    log_ph = log_ph + torch.log(p_in if state == IN else 1 - p_in)
                elif prev == IN and state in (IN, AFTER):
                    p_in = torch.sigmoid(s + stay)
                    log_ph = log_ph + torch.log(p_in if state == IN else 1 - p_in)
                elif not (prev == AFTER and state == AFTER):
                    log_ph = None  # type: ignore[assignment]  # a forbidden move
                    break
                prev = state
            if log_ph is None:
                continue
            frames = [step for step, state in enumerate(h) if state == IN]
            in_prior[frames] += float(log_ph.detach().exp())
            if frames:  # the needle is never empty
                log_terms.append(log_ph + logp[i, frames].sum(0))
                weights.append(frames)
        joint = torch.stack(log_terms)  # (sequences, A)
        log_z = joint.logsumexp(0)
        log_pred.append(log_z - log_z.logsumexp(0))
        a = int(batch.answers[i])
        post = torch.softmax(joint[:, a], 0)
        in_post = torch.zeros(batch.frame_mask.shape[1])
        for w, frames in zip(post, weights, strict=True):
            in_post[frames] += float(w.detach())
        prior.append(in_prior)
        posterior.append(in_post)
    return torch.stack(log_pred), torch.stack(prior), torch.stack(posterior)


def test_markov_mode_equals_brute_force_with_gradients() -> None:
    model = _model()
    batch = _batch([5, 3], 5)
    ref_pred, ref_prior, ref_post = _brute_force(model, batch)
    got = model.analyse(batch)
    torch.testing.assert_close(got["log_pred"], ref_pred, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got["log_pred"].exp().sum(-1), torch.ones(3))
    torch.testing.assert_close(got["prior"], ref_prior, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got["posterior"], ref_post, rtol=1e-10, atol=1e-12)
    assert torch.equal(got["posterior_map"], ref_post.argmax(-1))
    assert torch.equal(got["prior_map"], ref_prior.argmax(-1))
    assert not got["prior"][1, 3:].any() and not got["posterior"][1, 3:].any()  # padding
    # the loss is the exact negative log predictive of the true answer, and so are its
    # gradients with respect to every parameter
    rows = torch.arange(3)
    loss = model.losses(batch)
    ref_loss = -ref_pred[rows, batch.answers]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss.sum(), params, allow_unused=True)
    ref_grads = torch.autograd.grad(ref_loss.sum(), params, allow_unused=True)
    checked = 0
    for g, r in zip(grads, ref_grads, strict=True):
        if r is None:
            assert g is None or not g.any()
            continue
        assert g is not None
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10)
        checked += int(r.abs().sum() > 0)
    assert checked >= 5  # the encoders, the score, the classifier and the chain's biases
    assert model.needle_bias is not None
    bias_grad = grads[[id(p) for p in params].index(id(model.needle_bias))]
    assert bias_grad is not None and bool(bias_grad.abs().min() > 0)


def test_one_frame_needles_reduce_to_the_marginal_likelihood() -> None:
    """When the chain can never stay in the needle (``stay`` bias ``-inf``), the needle is one
    frame and the predictive is ``sum_z p(z) p(a | v_z, q)``, with ``p(z)`` the chain's
    probability of entering at ``z`` given that it enters at all."""
    model = _model()
    assert model.needle_bias is not None
    with torch.no_grad():
        model.needle_bias[1] = -math.inf
    batch = _batch([4, 4], 4)
    got = model.analyse(batch)
    with torch.no_grad():
        mem, q = model.encode(batch)
        scores = model.attention.score(q.unsqueeze(1), mem).squeeze(1)
        p_enter = torch.sigmoid(scores + model.needle_bias[0])
        stay_out = torch.cumprod(1 - p_enter, -1)
        first = p_enter * torch.cat([torch.ones(3, 1), stay_out[:, :-1]], -1)
        p_z = first / first.sum(-1, keepdim=True)
        pred = (p_z[..., None] * model.answer_log_probs(mem, q).exp()).sum(1)
    torch.testing.assert_close(got["log_pred"], pred.log(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("window", [1, 3])
def test_chunked_markov_equals_the_unchunked_model(window: int) -> None:
    """The chunked scorer's forward and backward passes: the same predictive, prior mode and
    posterior mode as :meth:`VideoQA.analyse`, chunks of one frame, of a few not dividing the
    video, and of more frames than it has."""
    model = _model(num_answers=4, window=window)
    t = 17
    video = torch.randn(t, 5)
    words, lengths = torch.randint(1, 10, (3, 4)), torch.tensor([4, 2, 3])
    answers = torch.tensor([3, 0, 1])
    batch = Batch(video[None], torch.ones(1, t, dtype=torch.bool), torch.zeros(3, dtype=torch.long),
                  torch.ones(3, t, dtype=torch.bool), words, lengths, answers,
                  torch.zeros(3, t, dtype=torch.bool), [0, 1, 2])
    ref = model.analyse(batch)
    for chunk in (1, 4, 6, 100):
        got = analyse_long(model, video, words, lengths, answers, chunk=chunk)
        assert got.chunks == math.ceil(t / chunk)
        torch.testing.assert_close(got.log_pred, ref["log_pred"], rtol=0, atol=1e-12)
        assert torch.equal(got.prior_map, ref["prior_map"])
        assert got.posterior_map is not None
        assert torch.equal(got.posterior_map, ref["posterior_map"])
        assert got.q_map is None and got.segment_map is None


def _brute_chain(trans_lp: Tensor, e_in: Tensor, e_before: Tensor) -> tuple[Tensor, Tensor]:
    """log Z ``(N,)`` and log p(in at t) ``(N, T)`` of the before / in / after chain by
    enumerating every state path (the state before the first frame is *before*)."""
    n, t = e_in.shape
    emit = torch.stack([e_before, e_in, torch.zeros_like(e_in)], -1)  # (N, T, 3)
    joints, ins = [], []
    for path in itertools.product(range(3), repeat=t):
        prev = [BEFORE, *path[:-1]]
        lj = sum(trans_lp[:, k, prev[k], path[k]] + emit[:, k, path[k]] for k in range(t))
        joints.append(lj)
        ins.append(torch.tensor([h == IN for h in path]))
    lj = torch.stack(joints, -1)  # (N, paths)
    log_z = lj.logsumexp(-1)
    mask = torch.stack(ins, 0).T  # (T, paths)
    marg = torch.stack([lj.masked_fill(~mask[k], -math.inf).logsumexp(-1) for k in range(t)], -1)
    return log_z, marg - log_z[:, None]


@pytest.mark.parametrize("scale,stay", [(1.0, 0.5), (40.0, 0.5), (1.0, -math.inf)])
def test_closed_form_chain_messages_equal_brute_force(scale: float, stay: float) -> None:
    """The chunked scorer's closed-form forward and backward messages, chunk by chunk with
    messages carried between chunks of 1, 2, 3 and 7 frames: log Z, the posterior marginals of
    *in* (forward times backward) and the prior's marginals (forward alone) against enumeration
    of every state path, with ordinary and with peaked (x40) scores and emissions, and the
    last frame barred from *before*; and with the needle unable to last (``stay`` -inf, every
    needle one frame)."""
    gen = torch.Generator().manual_seed(int(scale))
    n, t = 3, 7
    scores = scale * torch.randn(n, t, generator=gen, dtype=torch.float64)
    bias = torch.tensor([-1.0, stay], dtype=torch.float64)
    trans_lp = needle_chain_logits(scores, bias).log_softmax(-1)
    e_in = scale * torch.randn(n, t, generator=gen, dtype=torch.float64)
    e_before = torch.zeros(n, t, dtype=torch.float64)
    e_before[:, -1] = -math.inf
    log_z, marg = _brute_chain(trans_lp, e_in, e_before)
    _, prior = _brute_chain(trans_lp, torch.zeros_like(e_in), torch.zeros_like(e_in))
    start = torch.tensor([0.0, -math.inf, -math.inf], dtype=torch.float64).expand(n, 3)
    for size in (1, 2, 3, 7):
        cuts = list(range(0, t, size))
        alpha, palpha, fwd, pf = start, start, [], []
        for c in cuts:
            part = slice(c, c + size)
            fa = needle_forward(alpha, trans_lp[:, part], e_in[:, part], e_before[:, part])
            pa = needle_forward(palpha, trans_lp[:, part], torch.zeros_like(e_in[:, part]),
                                torch.zeros_like(e_in[:, part]))
            fwd.append(fa)
            pf.append(pa)
            alpha, palpha = fa[:, -1], pa[:, -1]
        got_z = alpha.logsumexp(-1)
        torch.testing.assert_close(got_z, log_z, rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(torch.cat(pf, 1)[..., IN].exp(), prior.exp(), rtol=0,
                                   atol=1e-12)
        beta, bwd = torch.zeros(n, 3, dtype=torch.float64), []
        for c in reversed(cuts):
            part = slice(c, c + size)
            ba = needle_backward(beta, trans_lp[:, part], e_in[:, part], e_before[:, part])
            bwd.insert(0, ba)
            beta = needle_message_before(trans_lp[:, part], e_in[:, part], e_before[:, part],
                                         ba[:, 0])
        got = torch.cat(fwd, 1)[..., IN] + torch.cat(bwd, 1)[..., IN] - got_z[:, None]
        torch.testing.assert_close(got.exp(), marg.exp(), rtol=0, atol=1e-12)
        # the message before the first frame is log Z given the start state before
        torch.testing.assert_close(beta[:, BEFORE], log_z, rtol=1e-12, atol=1e-10)


@pytest.fixture
def float32_default() -> None:
    """The program runs under torch's default dtype, float32, as users run it."""
    torch.set_default_dtype(torch.float32)


@pytest.mark.usefixtures("float32_default")
def test_needle_smoke_run_with_three_frame_needles(tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = main(["--task", "needle", "--mode", "markov", "--needle-span", "3", "--smoke-test",
                "--out-dir", str(out)] + QUIET)
    assert res["task"] == "needle" and res["config"]["mode"] == "markov"
    assert math.isfinite(res["test"]["nll"]) and 0.0 <= res["test"]["accuracy"] <= 1.0
    grid = res["recall_grid"]
    assert all(0.0 <= r <= 1.0 for row in grid["recall"] for r in row)
    assert (out / "results.json").is_file() and (out / "recall.png").is_file()
