"""Beam search and alignment marginalisation (attention.decoding) against brute force."""

from __future__ import annotations

import itertools

import pytest
import torch

from attention.decoding import beam_search, marginal_log_probs, reorder_state

V, EOS, BOS = 4, 0, 3


def make_lm(batch: int, seed: int) -> torch.Tensor:
    """A random second-order "language model": next-word logits from the last two words."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, V, V, V, generator=g) * 2.0  # (sentence, prev2, prev1, next)


def lm_step(table: torch.Tensor, beam: int):
    def step(last: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
             ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        prev1, sent = state
        logits = table[sent, prev1, last]
        return torch.log_softmax(logits, -1), (last, sent)
    return step


def exhaustive(table: torch.Tensor, b: int, max_len: int) -> list[tuple[float, tuple[int, ...]]]:
    """All sequences of up to max_len words (ending at the first eos), scored exactly."""
    out: dict[tuple[int, ...], float] = {}
    for words in itertools.product(range(V), repeat=max_len):
        seq: list[int] = []
        for w in words:
            seq.append(w)
            if w == EOS:
                break
        key = tuple(seq)
        if key in out:
            continue
        score, p2, p1 = 0.0, BOS, BOS
        for w in seq:
            score += float(torch.log_softmax(table[b, p2, p1], -1)[w])
            p2, p1 = p1, w
        out[key] = score
    return sorted(((s, k) for k, s in out.items()), reverse=True)


@pytest.mark.parametrize("seed", range(5))
def test_wide_beam_finds_exhaustive_best(seed: int) -> None:
    batch, max_len = 3, 4
    table = make_lm(batch, seed)
    beam = V ** max_len  # wide enough never to prune the best hypothesis
    sent = torch.arange(batch).repeat_interleave(beam)
    state = (torch.full((batch * beam,), BOS), sent)
    res = beam_search(lm_step(table, beam), state, batch_size=batch, bos=BOS, eos=EOS,
                      beam_size=beam, max_len=max_len)
    for b in range(batch):
        ref = exhaustive(table, b, max_len)
        best_score, best_seq = ref[0]
        n = int(res.lengths[b, 0])
        assert tuple(res.tokens[b, 0, :n].tolist()) == best_seq
        assert float(res.scores[b, 0]) == pytest.approx(best_score, abs=1e-9)
        # the top five scores agree (distinct hypotheses, best first)
        top = [float(s) for s in res.scores[b, :5]]
        assert top == pytest.approx([s for s, _ in ref[:5]], abs=1e-9)


def test_batched_equals_one_sentence_at_a_time() -> None:
    batch, beam, max_len = 4, 3, 6
    table = make_lm(batch, 7)
    sent = torch.arange(batch).repeat_interleave(beam)
    res = beam_search(lm_step(table, beam), (torch.full((batch * beam,), BOS), sent),
                      batch_size=batch, bos=BOS, eos=EOS, beam_size=beam, max_len=max_len)
    for b in range(batch):
        one = beam_search(lm_step(table[b:b + 1], beam),
                          (torch.full((beam,), BOS), torch.zeros(beam, dtype=torch.long)),
                          batch_size=1, bos=BOS, eos=EOS, beam_size=beam, max_len=max_len)
        L = one.tokens.shape[-1]
        torch.testing.assert_close(res.scores[b], one.scores[0])
        assert torch.equal(res.tokens[b, :, :L], one.tokens[0])


def test_finished_hypotheses_keep_their_score_and_pad_with_eos() -> None:
    table = torch.full((1, V, V, V), -5.0)
    table[..., EOS] = 5.0  # eos is by far the most likely word everywhere
    res = beam_search(lm_step(table, 2), (torch.full((2,), BOS), torch.zeros(2, dtype=torch.long)),
                      batch_size=1, bos=BOS, eos=EOS, beam_size=2, max_len=5)
    assert res.tokens[0, 0].tolist()[0] == EOS and int(res.lengths[0, 0]) == 1
    lp = torch.log_softmax(table[0, BOS, BOS], -1)
    assert float(res.scores[0, 0]) == pytest.approx(float(lp[EOS]))


def test_length_penalty_prefers_longer_hypotheses() -> None:
    table = make_lm(1, 3)
    state = (torch.full((6,), BOS), torch.zeros(6, dtype=torch.long))
    plain = beam_search(lm_step(table, 6), state, batch_size=1, bos=BOS, eos=EOS, beam_size=6,
                        max_len=5)
    pen = beam_search(lm_step(table, 6), state, batch_size=1, bos=BOS, eos=EOS, beam_size=6,
                      max_len=5, length_penalty=2.0)
    assert float(pen.lengths[0].float().mean()) >= float(plain.lengths[0].float().mean())
    assert float(pen.lengths[0, 0]) >= float(plain.lengths[0, 0])


def test_marginal_log_probs_matches_brute_force() -> None:
    n, s, v = 5, 6, 7
    prior = torch.randn(n, s, requires_grad=True)
    logp = torch.randn(n, s, v, requires_grad=True)  # any values: each (n, v) is its own sum
    mask = torch.rand(n, s) > 0.3
    mask[:, 0] = True
    logp_nan = torch.where(mask.unsqueeze(-1), logp, torch.full_like(logp, float("nan")))
    out = marginal_log_probs(prior, logp_nan, mask)  # masked positions are ignored, even NaN
    ref = torch.stack([
        torch.logsumexp(torch.log_softmax(prior[i][mask[i]], -1).unsqueeze(-1)
                        + logp[i][mask[i]], dim=0) for i in range(n)])
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    normalized = marginal_log_probs(prior, torch.log_softmax(logp, -1), mask)
    assert torch.allclose(normalized.exp().sum(-1), torch.ones(n, dtype=out.dtype))
    g1 = torch.autograd.grad(out.sum(), [prior, logp])
    g2 = torch.autograd.grad(ref.sum(), [prior, logp])
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_errors_and_state_reordering() -> None:
    with pytest.raises(ValueError, match="prior_logits must be"):
        marginal_log_probs(torch.randn(2, 3), torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="mask must be"):
        marginal_log_probs(torch.randn(2, 3), torch.randn(2, 3, 5), torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="cannot reorder"):
        reorder_state({"x": 3}, torch.tensor([0]))
    st = {"h": (torch.arange(4.0), [torch.arange(4) * 2]), "none": None}
    out = reorder_state(st, torch.tensor([3, 0]))
    assert out["h"][0].tolist() == [3.0, 0.0] and out["h"][1][0].tolist() == [6, 0]
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(lambda t, s: (t, s), torch.zeros(1), batch_size=1, bos=0, eos=0,
                    beam_size=0)
