"""The Markov alignment prior (attention.markov) and its Pyro face (attention.distributions).

References are written here from the documented semantics, independently of the library: a
brute-force enumeration of every alignment sequence over the *real* target steps and *real*
source positions of each sentence (the first real step draws from ``init_logits``, each later one
from ``trans_logits[:, t]`` given the previous real step's alignment).
"""

from __future__ import annotations

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from helpers import chi2_pvalue
from pyro.infer import TraceEnum_ELBO
from pyro.ops.indexing import Vindex
from torch.testing import assert_close

from attention.distributions import AlignmentCategorical, markov_alignment_site
from attention.functional import alignment_loss
from attention.markov import (
    MarkovAlignmentPrior,
    markov_alignment_elbo,
    markov_alignment_log_marginal,
    markov_alignment_marginals,
    markov_alignment_sample,
    markov_alignment_viterbi,
    markov_transition_log_probs,
)
from plated.pyro import TVE_ELBO, markov_plate

# -- brute force -------------------------------------------------------------------------------


def enumerate_row(init: torch.Tensor, trans: torch.Tensor, ll: torch.Tensor, src: torch.Tensor,
                  tgt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
    """All alignment sequences of one sentence and their log joint ``log p(y, z)``.

    :return: ``(seqs (N, k) in source positions, log_joint (N,), real steps, real sources)``.
    """
    steps = [t for t in range(tgt.shape[0]) if tgt[t]]
    srcs = [s for s in range(src.shape[0]) if src[s]]
    k = len(steps)
    if k == 0:  # one empty sequence, of probability 1
        return torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, dtype=init.dtype), steps, srcs
    seqs = torch.tensor(list(itertools.product(srcs, repeat=k)), dtype=torch.long)
    sidx = torch.tensor(srcs, dtype=torch.long)
    # normalise over the real source positions only
    init_lp = torch.full_like(init, -math.inf).index_copy(0, sidx, init[sidx].log_softmax(-1))
    tr = trans[:, :, sidx]
    tr_lp = torch.full_like(trans, -math.inf).index_copy(2, sidx, tr.log_softmax(-1))
    score = init_lp[seqs[:, 0]] + ll[steps[0], seqs[:, 0]]
    for m in range(1, k):
        score = score + tr_lp[steps[m], seqs[:, m - 1], seqs[:, m]] + ll[steps[m], seqs[:, m]]
    return seqs, score, steps, srcs


def brute_log_marginal(init: torch.Tensor, trans: torch.Tensor, ll: torch.Tensor,
                       src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    out = []
    for b in range(init.shape[0]):
        _, score, _, _ = enumerate_row(init[b], trans[b], ll[b], src[b], tgt[b])
        out.append(score.logsumexp(0))
    return torch.stack(out)


def brute_elbo(init: torch.Tensor, trans: torch.Tensor, ll: torch.Tensor, q_init: torch.Tensor,
               q_trans: torch.Tensor, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    out = []
    for b in range(init.shape[0]):
        _, logp, _, _ = enumerate_row(init[b], trans[b], ll[b], src[b], tgt[b])
        _, logq, _, _ = enumerate_row(q_init[b], q_trans[b], torch.zeros_like(ll[b]), src[b],
                                      tgt[b])
        out.append((logq.exp() * (logp - logq)).sum())
    return torch.stack(out)


def random_case(gen: torch.Generator, B: int, T: int, S: int, requires_grad: bool = False
                ) -> tuple[torch.Tensor, ...]:
    init = (2 * torch.randn(B, S, generator=gen)).requires_grad_(requires_grad)
    trans = (2 * torch.randn(B, T, S, S, generator=gen)).requires_grad_(requires_grad)
    ll = torch.randn(B, T, S, generator=gen).requires_grad_(requires_grad)
    src = torch.rand(B, S, generator=gen) < 0.75
    src[torch.arange(B), torch.randint(S, (B,), generator=gen)] = True  # >= 1 real source
    tgt = torch.rand(B, T, generator=gen) < 0.75
    return init, trans, ll, src, tgt


CASES = [(seed, 1 + seed % 3, 1 + seed % 4, 1 + (seed // 2) % 3) for seed in range(24)]


# -- exact log marginal, gradients, the independent special case --------------------------------


@pytest.mark.parametrize("seed,B,T,S", CASES)
def test_log_marginal_and_grads_vs_brute_force(seed: int, B: int, T: int, S: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    init, trans, ll, src, tgt = random_case(gen, B, T, S, requires_grad=True)
    if seed % 2:  # values at masked source positions must not matter, even NaN
        with torch.no_grad():
            ll.masked_fill_(~src[:, None, :], math.nan)
    w = torch.randn(B, generator=gen)
    ours = markov_alignment_log_marginal(init, trans, ll, src, tgt)
    ref = brute_log_marginal(init, trans, ll, src, tgt)
    assert ours.shape == (B,)
    assert_close(ours, ref, rtol=1e-9, atol=1e-10)
    g_ours = torch.autograd.grad((w * ours).sum(), (init, trans, ll))
    g_ref = torch.autograd.grad((w * ref).sum(), (init, trans, ll), materialize_grads=True)
    for a, r in zip(g_ours, g_ref, strict=True):
        assert_close(a, torch.nan_to_num(r), rtol=1e-8, atol=1e-10)


def test_padding_is_invisible_and_empty_rows() -> None:
    """Right padding leaves every real step's result unchanged; a sentence without real target
    steps has log p(y | x) = 0; one without real source positions has -inf."""
    gen = torch.Generator().manual_seed(7)
    init, trans, ll, _, _ = random_case(gen, 2, 5, 3)
    src = torch.ones(2, 3, dtype=torch.bool)
    tgt = torch.tensor([[True] * 3 + [False] * 2, [False] * 5])
    padded = markov_alignment_log_marginal(init, trans, ll, src, tgt)
    short = markov_alignment_log_marginal(init, trans[:, :3], ll[:, :3])
    assert_close(padded[0], short[0], rtol=1e-12, atol=1e-12)
    assert padded[1].item() == 0.0
    no_src = torch.tensor([[False] * 3, [True] * 3])
    out = markov_alignment_log_marginal(init, trans, ll, no_src)
    assert out[0].item() == -math.inf and math.isfinite(out[1].item())


@pytest.mark.parametrize("seed", range(4))
def test_independent_transitions_reduce_to_independent_model(seed: int) -> None:
    gen = torch.Generator().manual_seed(100 + seed)
    B, T, S = 3, 6, 5
    prior = torch.randn(B, T, S, generator=gen)
    ll = torch.randn(B, T, S, generator=gen)
    trans = prior[:, :, None, :].expand(B, T, S, S)  # every row the per-step prior
    ours = markov_alignment_log_marginal(prior[:, 0], trans, ll)
    ref = (prior.log_softmax(-1) + ll).logsumexp(-1).sum(-1)
    assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    # and a Markov prior that is *not* independent differs (the check can fail)
    other = markov_alignment_log_marginal(prior[:, 0], torch.randn(B, T, S, S, generator=gen), ll)
    assert (other - ref).abs().max() > 1e-3


# -- the ELBO -----------------------------------------------------------------------------------


def exact_posterior_logits(init: torch.Tensor, trans: torch.Tensor, ll: torch.Tensor,
                           src: torch.Tensor, tgt: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the posterior as a Markov chain, from brute-force pairwise marginals:
    ``q_init = log q(z_first)``, ``q_trans[t, i, j] = log q(z_prev_real = i, z_t = j)``."""
    B, T, S = ll.shape
    q_init = torch.zeros(B, S)
    q_trans = torch.zeros(B, T, S, S)
    for b in range(B):
        seqs, score, steps, _ = enumerate_row(init[b], trans[b], ll[b], src[b], tgt[b])
        post = (score - score.logsumexp(0)).exp()
        if not steps:
            continue
        q_init[b] = torch.zeros(S).index_add(0, seqs[:, 0], post).log()
        for m in range(1, len(steps)):
            flat = seqs[:, m - 1] * S + seqs[:, m]
            q_trans[b, steps[m]] = torch.zeros(S * S).index_add(0, flat, post).log().view(S, S)
    # rows of unreachable states are all -inf: give them any finite logits
    q_trans = torch.where(q_trans.isinf().all(-1, keepdim=True), torch.zeros_like(q_trans),
                          q_trans)
    return q_init, q_trans


@pytest.mark.parametrize("seed,B,T,S", CASES[::2])
def test_elbo_bound_exact_posterior_and_grads(seed: int, B: int, T: int, S: int) -> None:
    gen = torch.Generator().manual_seed(1000 + seed)
    init, trans, ll, src, tgt = random_case(gen, B, T, S, requires_grad=True)
    logm = markov_alignment_log_marginal(init, trans, ll, src, tgt)
    # a random Markov q: a lower bound, equal to brute force in value and gradients
    q_init = torch.randn(B, S, generator=gen).requires_grad_()
    q_trans = torch.randn(B, T, S, S, generator=gen).requires_grad_()
    elbo = markov_alignment_elbo(init, trans, ll, q_init, q_trans, src, tgt)
    ref = brute_elbo(init, trans, ll, q_init, q_trans, src, tgt)
    assert elbo.shape == (B,)
    assert_close(elbo, ref, rtol=1e-9, atol=1e-10)
    assert (elbo <= logm + 1e-10).all()
    params = (init, trans, ll, q_init, q_trans)
    w = torch.rand(B, generator=gen)
    g_ours = torch.autograd.grad((w * elbo).sum(), params)
    g_ref = (torch.autograd.grad((w * ref).sum(), params, materialize_grads=True)
             if ref.requires_grad else tuple(torch.zeros_like(p) for p in params))
    for a, r in zip(g_ours, g_ref, strict=True):
        assert torch.isfinite(a).all()
        assert_close(a, torch.nan_to_num(r), rtol=1e-7, atol=1e-9)
    if tgt.sum(1).gt(0).any() and src.sum(1).gt(1).any():  # q has something to learn
        assert g_ours[3].abs().sum() + g_ours[4].abs().sum() > 1e-6
    # the exact posterior: the ELBO is the log marginal
    p_init, p_trans = exact_posterior_logits(init.detach(), trans.detach(), ll.detach(), src,
                                             tgt)
    exact = markov_alignment_elbo(init, trans, ll, p_init, p_trans, src, tgt)
    assert_close(exact, logm, rtol=0, atol=1e-9)


def test_elbo_is_strictly_below_for_a_wrong_q_and_trains_q() -> None:
    """A few gradient steps on q's logits raise the ELBO toward the log marginal."""
    gen = torch.Generator().manual_seed(5)
    init, trans, ll, src, tgt = random_case(gen, 2, 4, 4)
    logm = markov_alignment_log_marginal(init, trans, ll, src, tgt)
    q_init = torch.zeros(2, 4, requires_grad=True)
    q_trans = torch.zeros(2, 4, 4, 4, requires_grad=True)
    opt = torch.optim.Adam([q_init, q_trans], lr=0.3)
    gaps = []
    for _ in range(40):
        opt.zero_grad()
        gap = (logm - markov_alignment_elbo(init, trans, ll, q_init, q_trans, src, tgt)).sum()
        gap.backward()
        opt.step()
        gaps.append(gap.item())
    assert gaps[0] > 0.05 and gaps[-1] < 0.1 * gaps[0]


# -- Viterbi, marginals, samples ----------------------------------------------------------------


@pytest.mark.parametrize("seed,B,T,S", CASES)
def test_viterbi_and_marginals_vs_brute_force(seed: int, B: int, T: int, S: int) -> None:
    gen = torch.Generator().manual_seed(2000 + seed)
    init, trans, ll, src, tgt = random_case(gen, B, T, S)
    vit = markov_alignment_viterbi(init, trans, ll, src, tgt)
    marg = markov_alignment_marginals(init, trans, ll, src, tgt)
    assert vit.shape == (B, T) and vit.dtype == torch.long and marg.shape == (B, T, S)
    for b in range(B):
        seqs, score, steps, _ = enumerate_row(init[b], trans[b], ll[b], src[b], tgt[b])
        best = torch.zeros(T, dtype=torch.long)
        ref = torch.zeros(T, S)
        if steps:
            best[steps] = seqs[score.argmax()]
            post = (score - score.logsumexp(0)).exp()
            for m, t in enumerate(steps):
                ref[t] = torch.zeros(S).index_add(0, seqs[:, m], post)
        assert torch.equal(vit[b], best)
        assert_close(marg[b], ref, rtol=0, atol=1e-9)
    assert (marg[~src[:, None, :].expand(B, T, S)] == 0).all()  # masked: exactly zero


def test_samples_chi_squared_over_sequences() -> None:
    gen = torch.Generator().manual_seed(3)
    init, trans, ll, _, _ = random_case(gen, 2, 4, 3)
    src = torch.tensor([[True, True, True], [True, False, True]])
    tgt = torch.tensor([[True, True, True, False], [True, False, True, True]])
    n = 3000
    z = markov_alignment_sample(init, trans, ll, src, tgt, num_samples=n)
    assert z.shape == (n, 2, 4) and z.dtype == torch.long
    assert (z[:, ~tgt] == 0).all()
    for b in range(2):
        seqs, score, steps, srcs = enumerate_row(init[b], trans[b], ll[b], src[b], tgt[b])
        assert torch.isin(z[:, b, steps], torch.tensor(srcs)).all()  # never a masked source
        # row of each sample in the row-major enumeration (mixed radix over the real sources)
        rank = torch.full((3,), -1, dtype=torch.long)
        rank[torch.tensor(srcs)] = torch.arange(len(srcs))
        rows = torch.zeros(n, dtype=torch.long)
        for t in steps:
            rows = rows * len(srcs) + rank[z[:, b, t]]
        assert torch.equal(seqs[rows], z[:, b, steps])
        counts = torch.bincount(rows, minlength=seqs.shape[0])
        p, dof = chi2_pvalue(counts, (score - score.logsumexp(0)).exp())
        assert dof >= 5 and p > 1e-4, (b, p, dof)


# -- the module ---------------------------------------------------------------------------------


def test_prior_module_shapes_jump_bias_and_state_dict() -> None:
    B, T, S, H = 2, 3, 5, 4
    prior = MarkovAlignmentPrior(H, max_jump=2)
    query, memory = torch.randn(B, T, H), torch.randn(B, S, H)
    init, trans = prior(query, memory)
    assert init.shape == (B, S) and trans.shape == (B, T, S, S)
    with torch.no_grad():
        prior.jump_bias.copy_(torch.arange(5.0))  # bias index = clip(j - i, -2, 2) + 2
    _, trans2 = prior(query, memory)
    d = trans2 - trans
    assert d[0, 0, 3, 4].item() == 3.0 and d[0, 0, 4, 0].item() == 0.0
    assert d[1, 2, 0, 4].item() == 4.0 and d[1, 2, 2, 2].item() == 2.0
    ll = torch.randn(B, T, S)
    loss = -markov_alignment_log_marginal(init, trans2, ll).sum()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prior.parameters())
    other = MarkovAlignmentPrior(H, max_jump=2)
    other.load_state_dict(prior.state_dict())
    for a, b in zip(other(query, memory), prior(query, memory), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="memory"):
        prior(query, torch.randn(B, S, H + 1))
    with pytest.raises(ValueError, match="max_jump"):
        MarkovAlignmentPrior(H, max_jump=-1)


# -- errors -------------------------------------------------------------------------------------


def test_shape_errors_name_the_argument() -> None:
    B, T, S = 2, 3, 4
    init, trans, ll = torch.randn(B, S), torch.randn(B, T, S, S), torch.randn(B, T, S)
    src, tgt = torch.ones(B, S, dtype=torch.bool), torch.ones(B, T, dtype=torch.bool)
    f = markov_alignment_log_marginal
    with pytest.raises(ValueError, match=r"init_logits must have shape \(B, S\)"):
        f(torch.randn(B, 1, S), trans, ll)
    with pytest.raises(ValueError, match=r"trans_logits must have shape \(B, T, S, S\)"):
        f(init, torch.randn(B, T, S, S + 1), ll)
    with pytest.raises(ValueError, match=r"log_lik must have shape \(B, T, S\)"):
        f(init, trans, torch.randn(B, T + 1, S))
    with pytest.raises(ValueError, match="src_mask must have shape"):
        f(init, trans, ll, src[:, :-1], tgt)
    with pytest.raises(ValueError, match="tgt_mask must be a bool tensor"):
        f(init, trans, ll, src, tgt.long())
    with pytest.raises(ValueError, match="posterior_trans_logits"):
        markov_alignment_elbo(init, trans, ll, init, trans[:, :-1])
    with pytest.raises(ValueError, match="num_samples"):
        markov_alignment_sample(init, trans, ll, num_samples=0)
    with pytest.raises(ValueError, match="mask"):
        AlignmentCategorical(torch.randn(B, S), mask=torch.ones(B, S))
    with pytest.raises(ValueError, match="mask"):
        AlignmentCategorical(torch.randn(B, S), mask=torch.ones(B, S + 1, dtype=torch.bool))


# -- the Pyro face ------------------------------------------------------------------------------

ENUM = {"enumerate": "parallel"}
B, T, S, H, V = 3, 4, 5, 6, 7


def seq2seq_params() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed random encoder / decoder states and output layer, as pyro.params."""
    query = pyro.param("query", lambda: torch.randn(B, T, H))
    memory = pyro.param("memory", lambda: torch.randn(B, S, H))
    out = pyro.param("out", lambda: torch.randn(H, V))
    return query, memory, out


def vocab_logits(query: torch.Tensor, memory: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """(B, T, S, V): a tiny output layer on the decoder state plus the aligned source state."""
    return (query[:, :, None, :] + memory[:, None, :, :]) @ out


def direct_log_lik(y: torch.Tensor) -> torch.Tensor:
    query, memory, out = seq2seq_params()
    lp = vocab_logits(query, memory, out).log_softmax(-1)
    return lp.gather(-1, y[:, :, None, None].expand(B, T, S, 1))[..., 0]  # (B, T, S)


def independent_model(y: torch.Tensor, src: torch.Tensor) -> None:
    query, memory, out = seq2seq_params()
    prior = query @ memory.transpose(-1, -2)  # (B, T, S) dot scores
    logits = vocab_logits(query, memory, out)
    with pyro.plate("batch", B, dim=-2), pyro.plate("target", T, dim=-1):
        z = pyro.sample("z", AlignmentCategorical(prior, mask=src[:, None, :]), infer=ENUM)
        pyro.sample("y", dist.Categorical(logits=Vindex(logits)[..., z, :]), obs=y)


def markov_model(y: torch.Tensor, src: torch.Tensor, tgt: torch.Tensor,
                 trans_logits: torch.Tensor) -> None:
    query, memory, out = seq2seq_params()
    init_logits = torch.einsum("bh,bsh->bs", query[:, 0], memory)
    logits = vocab_logits(query, memory, out)
    time = markov_plate("target", T, dim=-1)
    with pyro.plate("batch", B, dim=-2):
        z = markov_alignment_site("z", time, init_logits, trans_logits, src, tgt)
        with time, pyro.poutine.mask(mask=tgt):
            pyro.sample("y", dist.Categorical(logits=Vindex(logits)[..., z, :]), obs=y)


def empty_guide(*args: object) -> None:
    pass


def test_alignment_categorical_masking_expand_and_support() -> None:
    logits = torch.randn(2, 4)
    mask = torch.tensor([[True, False, True, True], [False, True, True, False]])
    d = AlignmentCategorical(logits, mask=mask)
    assert (d.probs[~mask] == 0).all() and torch.isinf(d.log_prob(torch.tensor([1, 0]))).all()
    assert_close(d.probs.sum(-1), torch.ones(2))
    assert_close(d.log_prob(torch.tensor([2, 2])),
                 logits.masked_fill(~mask, -math.inf).log_softmax(-1)[:, 2])
    e = d.expand((3, 2))
    assert isinstance(e, AlignmentCategorical) and e.batch_shape == (3, 2)
    assert e.source_mask is not None and e.source_mask.shape == (3, 2, 4)
    assert (e.sample((100,))[..., 0] != 1).all() and (e.sample((100,))[..., 1] % 3 != 0).all()
    support = d.enumerate_support(expand=False)
    assert support.shape == (4, 1)
    assert torch.isinf(d.log_prob(support)[1, 0]) and torch.isfinite(d.log_prob(support)[1, 1])
    plain = AlignmentCategorical(logits)
    assert plain.source_mask is None
    assert_close(plain.probs, logits.softmax(-1))


def test_pyro_independent_model_matches_direct_and_trace_enum() -> None:
    pyro.clear_param_store()
    gen = torch.Generator().manual_seed(11)
    y = torch.randint(V, (B, T), generator=gen)
    src = torch.rand(B, S, generator=gen) < 0.6
    src[:, 0] = True
    loss = TVE_ELBO(max_plate_nesting=2).differentiable_loss(independent_model, empty_guide, y, src)
    query, memory, _ = seq2seq_params()
    prior = (query @ memory.transpose(-1, -2)).masked_fill(~src[:, None, :], -math.inf)
    ll = direct_log_lik(y)
    # masked positions contribute exp(-inf) = 0 whatever their log-lik (here NaN)
    ll_masked = ll.masked_fill(~src[:, None, :], math.nan)
    terms = prior.log_softmax(-1) + ll_masked
    direct = -torch.where(src[:, None, :], terms, -math.inf).logsumexp(-1).sum()
    assert_close(loss, direct, rtol=1e-10, atol=1e-10)
    # ... and equals the functional face's exact "marginal" mode on the same scores
    functional = alignment_loss(query @ memory.transpose(-1, -2), ll,
                                src[:, None, :].expand(B, T, S), mode="marginal").sum()
    assert_close(loss, functional, rtol=1e-10, atol=1e-10)
    ref = TraceEnum_ELBO(max_plate_nesting=2).differentiable_loss(independent_model, empty_guide,
                                                                  y, src)
    assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    params = [pyro.param(n) for n in ("query", "memory", "out")]
    for a, r in zip(torch.autograd.grad(loss, params), torch.autograd.grad(ref, params),
                    strict=True):
        assert_close(a, r, rtol=1e-8, atol=1e-10)
    # a masked source position never gets posterior probability
    post = TraceEnum_ELBO(max_plate_nesting=2).compute_marginals(independent_model, empty_guide,
                                                                 y, src)
    probs = post["z"].probs if hasattr(post["z"], "probs") else post["z"].logits.exp()
    assert (probs[~src[:, None, :].expand(B, T, S)] == 0).all()
    pyro.clear_param_store()


def test_pyro_markov_model_matches_markov_alignment_log_marginal() -> None:
    pyro.clear_param_store()
    gen = torch.Generator().manual_seed(12)
    y = torch.randint(V, (B, T), generator=gen)
    src = torch.tensor([[True] * 5, [True, True, False, True, False],
                        [False, True, True, True, True]])
    tgt = torch.tensor([[True] * 4, [True, True, True, False], [True, False, True, True]])
    trans_logits = torch.randn(B, T, S, S, generator=gen).requires_grad_()
    loss = TVE_ELBO(max_plate_nesting=2).differentiable_loss(markov_model, empty_guide, y, src,
                                                             tgt, trans_logits)
    query, memory, _ = seq2seq_params()
    init_logits = torch.einsum("bh,bsh->bs", query[:, 0], memory)
    direct = -markov_alignment_log_marginal(init_logits, trans_logits, direct_log_lik(y), src,
                                            tgt).sum()
    assert_close(loss, direct, rtol=1e-10, atol=1e-10)
    params = [pyro.param(n) for n in ("query", "memory", "out")] + [trans_logits]
    for a, r in zip(torch.autograd.grad(loss, params, retain_graph=True),
                    torch.autograd.grad(direct, params), strict=True):
        assert_close(a, r, rtol=1e-8, atol=1e-10)
    # the transition tables the site uses are markov_transition_log_probs'
    rows = markov_transition_log_probs(init_logits, trans_logits, src, tgt)
    masked = (~src[:, None, None, :] & tgt[:, :, None, None]).expand(B, T, S, S)
    assert (rows.masked_select(masked) == -math.inf).all()
    pyro.clear_param_store()
