"""attention.modules and attention.output against hand-written references and brute force."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from attention.functional import alignment_loss, alignment_posterior, dirichlet_alignment
from attention.modules import (
    AdditiveScore,
    AlignmentInferenceNetwork,
    BilinearScore,
    DotScore,
    GeneralScore,
    LatentAlignmentAttention,
    make_score,
    topk_alignments,
)
from attention.output import WORK_FACTOR, AlignedOutputLayer

B, T, S, DQ, DM = 3, 4, 5, 6, 8
LATENT = ["marginal", "hard-enum", "variational-enum", "hard-sample", "variational-sample",
          "gumbel"]


def data(dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    query = torch.randn(B, T, DQ, generator=g).to(dtype)
    memory = torch.randn(B, S, DM, generator=g).to(dtype)
    lengths = torch.tensor([S, 3, 1])
    mask = torch.arange(S) < lengths[:, None]  # (B, S)
    return query, memory, mask


def ref_soft(scores: Tensor, memory: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Textbook masked soft attention: -inf fill, softmax, bmm."""
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.bmm(probs, memory), probs


def rand_log_lik(shape: tuple[int, ...], seed: int = 2) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(shape + (7,), generator=g), -1)[..., 0]


# -- scores ---------------------------------------------------------------------------------------


def test_scores_match_formulas() -> None:
    q, m, _ = data()
    add = AdditiveScore(DQ, DM, 5)
    ref = torch.empty(B, T, S)
    for b, t, s in itertools.product(range(B), range(T), range(S)):
        pre = add.query_proj.weight @ q[b, t] + add.memory_proj.weight @ m[b, s] \
            + add.memory_proj.bias
        ref[b, t, s] = add.v.weight[0] @ torch.tanh(pre)
    torch.testing.assert_close(add(q, m), ref, rtol=1e-12, atol=1e-12)

    gen = GeneralScore(DQ, DM)
    w = gen.proj.weight  # (Dq, Dm)
    torch.testing.assert_close(gen(q, m), torch.einsum("btq,qm,bsm->bts", q, w, m))

    bil = BilinearScore(DQ, DM)
    w = bil.proj.weight
    u, c = bil.query_bias.weight[0], bil.query_bias.bias[0]
    v = bil.memory_bias.weight[0]
    ref = (torch.einsum("btq,qm,bsm->bts", q, w, m) + (q @ u)[:, :, None]
           + (m @ v)[:, None, :] + c)
    torch.testing.assert_close(bil(q, m), ref)

    m2 = torch.randn(B, S, DQ)
    torch.testing.assert_close(DotScore(DQ)(q, m2), torch.einsum("btd,bsd->bts", q, m2))
    torch.testing.assert_close(make_score("scaled-dot", DQ, DQ)(q, m2),
                               torch.einsum("btd,bsd->bts", q, m2) / math.sqrt(DQ))
    # leading dims (heads) broadcast
    qh, mh = torch.randn(B, 2, T, DQ), torch.randn(B, 2, S, DM)
    torch.testing.assert_close(gen(qh, mh)[:, 1], gen(qh[:, 1], mh[:, 1]))
    torch.testing.assert_close(add(qh, mh)[:, 0], add(qh[:, 0], mh[:, 0]))


def test_make_score_errors() -> None:
    with pytest.raises(ValueError, match="score kind"):
        make_score("luong", DQ, DM)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="query_dim == memory_dim"):
        make_score("dot", DQ, DM)
    with pytest.raises(ValueError, match="hidden"):
        make_score("general", DQ, DM, hidden=3)
    with pytest.raises(ValueError, match="memory_dim=8"):
        GeneralScore(DQ, DM)(torch.randn(B, T, DQ), torch.randn(B, S, 3))


# -- soft mode ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("score", ["general", "additive", "bilinear"])
def test_soft_equals_reference(dtype: torch.dtype, score: Any) -> None:
    q, m, mask = data(dtype)
    att = LatentAlignmentAttention(DQ, DM, score=score).to(dtype)
    scores = att.score(q, m)
    for mk in (None, mask):
        out = att(q, m, mk)
        ctx, probs = ref_soft(scores, m, None if mk is None else mk[:, None, :])
        torch.testing.assert_close(out.context, ctx, rtol=0, atol=1e-6)
        torch.testing.assert_close(out.probs, probs, rtol=0, atol=1e-6)
        assert out.context.dtype == dtype
    # per-query mask (B, T, S)
    m3 = mask[:, None, :].expand(B, T, S).clone()
    m3[0, 1, 2:] = False
    ctx, _ = ref_soft(scores, m, m3)
    torch.testing.assert_close(att(q, m, m3).context, ctx, rtol=0, atol=1e-6)
    # one decoding step (B, Dq): T squeezed away
    step = att(q[:, 2], m, mask)
    ctx, probs = ref_soft(scores[:, 2:3], m, mask[:, None, :])
    assert step.context.shape == (B, DM) and step.probs.shape == (B, S)
    torch.testing.assert_close(step.context, ctx[:, 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(step.probs, probs[:, 0], rtol=0, atol=1e-6)


def test_forward_errors() -> None:
    q, m, mask = data()
    att = LatentAlignmentAttention(DQ, DM)
    with pytest.raises(ValueError, match="query"):
        att(q[..., :3], m)
    with pytest.raises(ValueError, match="mask must be"):
        att(q, m, mask[:, :3])
    with pytest.raises(ValueError, match="bool"):
        att(q, m, mask.long())
    with pytest.raises(ValueError, match="soft"):
        att.loss(att(q, m), torch.zeros(B, T, S))
    with pytest.raises(ValueError, match="k_max"):
        LatentAlignmentAttention(DQ, DM, k_max=2)
    lat = LatentAlignmentAttention(DQ, DM, mode="variational-enum")
    with pytest.raises(ValueError, match="posterior_logits"):
        lat.loss(lat(q, m), torch.zeros(B, T, S))
    with pytest.raises(ValueError, match="posterior_logits must be"):
        lat(q, m, posterior_logits=torch.zeros(B, S))
    with pytest.raises(ValueError, match="log_lik must be"):
        lat.loss(lat(q, m), torch.zeros(B, S))


# -- latent modes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", LATENT)
def test_latent_loss_is_alignment_loss(mode: Any) -> None:
    q, m, mask = data()
    att = LatentAlignmentAttention(DQ, DM, mode=mode)
    post = torch.randn(B, T, S)
    out = att(q, m, mask, posterior_logits=post)
    ll = rand_log_lik((B, T, S))
    sampling = mode.endswith("sample") or mode == "gumbel"

    def gen() -> torch.Generator | None:
        return torch.Generator().manual_seed(3) if sampling else None

    got = att.loss(out, ll, generator=gen())
    prior = att.score(q, m)
    want = alignment_loss(prior, ll, mask[:, None, :], mode,
                          post if mode.startswith("variational") or mode == "gumbel" else None,
                          generator=gen())
    assert got.shape == (B, T)
    torch.testing.assert_close(got, want)
    # the latent modes still give the soft context (prior expectation)
    torch.testing.assert_close(out.context, ref_soft(prior, m, mask[:, None, :])[0])
    got.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in att.parameters())
    torch.testing.assert_close(att.posterior(out, ll),
                               alignment_posterior(prior, ll, mask[:, None, :]))


def test_one_step_loss() -> None:
    q, m, mask = data()
    att = LatentAlignmentAttention(DQ, DM, mode="marginal")
    full = att.loss(att(q, m, mask), rand_log_lik((B, T, S)))
    step = att.loss(att(q[:, 1], m, mask), rand_log_lik((B, T, S))[:, 1])
    assert step.shape == (B,)
    torch.testing.assert_close(step, full[:, 1])


# -- heads as a plate -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["marginal", "hard-enum", "variational-enum"])
def test_heads_loss_is_sum_of_single_head_losses(mode: Any) -> None:
    q, m, mask = data()
    h = 2
    att = LatentAlignmentAttention(DQ, DM, heads=h, mode=mode)
    post = torch.randn(B, h, T, S)
    out = att(q, m, mask, posterior_logits=post)
    assert out.prior_logits.shape == (B, h, T, S) and out.values.shape == (B, h, S, DM // h)
    assert out.context.shape == (B, T, DM)
    ll = rand_log_lik((B, h, T, S))
    loss = att.loss(out, ll)
    assert loss.shape == (B, h, T)
    # each head alone, from the module's own projections
    for k in range(h):
        qk = att.q_proj(q).view(B, T, h, -1)[:, :, k]  # type: ignore[misc]
        mk = att.k_proj(m).view(B, S, h, -1)[:, :, k]  # type: ignore[misc]
        single = alignment_loss(att.score(qk, mk), ll[:, k], mask[:, None, :], mode,
                                post[:, k] if mode == "variational-enum" else None)
        torch.testing.assert_close(loss[:, k], single)


def test_heads_marginal_matches_joint_brute_force() -> None:
    """Tiny case: the joint over (z_1, ..., z_H) in S^H with a head-factorized likelihood."""
    h, s = 3, 3
    g = torch.Generator().manual_seed(5)
    q, m = torch.randn(2, 1, DQ, generator=g), torch.randn(2, s, 6, generator=g)
    mask = torch.tensor([[True, True, True], [True, False, True]])
    att = LatentAlignmentAttention(DQ, 6, heads=h, mode="marginal")
    out = att(q, m, mask)
    ll = rand_log_lik((2, h, 1, s))
    ours = att.loss(out, ll).sum(1)  # (B, T) heads-as-plate loss
    log_p = torch.log_softmax(out.prior_logits, -1)
    for b in range(2):
        terms = []
        for z in itertools.product(range(s), repeat=h):
            if not all(mask[b, zk] for zk in z):
                continue
            terms.append(sum(log_p[b, k, 0, zk] + ll[b, k, 0, zk] for k, zk in enumerate(z)))
        joint = -torch.logsumexp(torch.stack(terms), 0)  # type: ignore[arg-type]
        torch.testing.assert_close(ours[b, 0], joint)


# -- inference network ----------------------------------------------------------------------------


@pytest.mark.parametrize("heads", [1, 2])
def test_inference_network(heads: int) -> None:
    _, m, mask = data()
    g = torch.Generator().manual_seed(4)
    tgt = torch.randn(B, T, 5, generator=g)
    tmask = torch.arange(T) < torch.tensor([T, 2, 3])[:, None]
    net = AlignmentInferenceNetwork(5, DM, 7, heads=heads)
    logits = net(tgt, m, mask, tmask)
    shape = (B, T, S) if heads == 1 else (B, heads, T, S)
    assert logits.shape == shape
    mk = mask[:, None, :] if heads == 1 else mask[:, None, None, :]
    assert torch.isneginf(logits[~mk.expand(shape)]).all()
    assert torch.isfinite(logits[mk.expand(shape)]).all()
    # padding of the target never reaches the real positions (both LSTM directions)
    tgt2 = tgt.clone()
    tgt2[~tmask] = 100.0
    logits2 = net(tgt2, m, mask, tmask)
    real = tmask[:, :, None].expand(B, T, S) & mask[:, None, :]
    if heads > 1:
        real = real[:, None].expand(shape)
    torch.testing.assert_close(logits2[real], logits[real])
    # trained through a variational loss, gradients reach every parameter
    att = LatentAlignmentAttention(DQ, DM, heads=heads, mode="variational-enum")
    q, _, _ = data()
    out = att(q, m, mask, posterior_logits=logits)
    loss = att.loss(out, rand_log_lik(shape))
    loss[tmask if heads == 1 else tmask[:, None].expand(B, heads, T)].sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


# -- K-max ----------------------------------------------------------------------------------------


def test_topk_alignments() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 1.0, 4.0, 0.0]])
    mask = torch.tensor([[True, True, True, True], [True, False, False, False]])
    idx, kmask = topk_alignments(logits, mask, 2)
    assert idx[0].tolist() == [1, 3] and kmask[0].tolist() == [True, True]
    assert idx[1, 0].item() == 0 and kmask[1].tolist() == [True, False]
    assert topk_alignments(logits, None, 9)[0].shape == (2, 4)  # clamped to S
    with pytest.raises(ValueError, match="k must be"):
        topk_alignments(logits, mask, 0)


@pytest.mark.parametrize("mode", ["marginal", "hard-enum", "variational-enum"])
def test_kmax_with_k_equal_s_is_full_enumeration(mode: Any) -> None:
    q, m, mask = data()
    full = LatentAlignmentAttention(DQ, DM, mode=mode)
    kmax = LatentAlignmentAttention(DQ, DM, mode=mode, k_max=S)
    kmax.load_state_dict(full.state_dict())
    post = torch.randn(B, T, S)
    ll = rand_log_lik((B, T, S))
    out_f, out_k = full(q, m, mask, post), kmax(q, m, mask, post)
    torch.testing.assert_close(kmax.loss(out_k, out_k.gather_topk(ll)), full.loss(out_f, ll))
    # with the output layer: log_lik over the gathered values == log_lik over all positions
    layer = AlignedOutputLayer(DQ, DM, 11)
    y = torch.randint(11, (B, T))
    ll_full = layer.log_lik(q, out_f.values, y)
    assert out_k.topk_values is not None
    ll_k = layer.log_lik(q, out_k.topk_values, y, gathered=True)
    torch.testing.assert_close(ll_k, out_k.gather_topk(ll_full))
    torch.testing.assert_close(kmax.loss(out_k, ll_k), full.loss(out_f, ll_full))


def test_kmax_truncated_prior_and_gathered_positions() -> None:
    q, m, mask = data()
    k = 2
    att = LatentAlignmentAttention(DQ, DM, mode="marginal", k_max=k)
    out = att(q, m, mask)
    assert out.topk_indices is not None and out.topk_values is not None
    assert out.topk_mask is not None
    assert out.topk_indices.shape == (B, T, k) and out.topk_values.shape == (B, T, k, DM)
    for b, t, j in itertools.product(range(B), range(T), range(k)):
        s = int(out.topk_indices[b, t, j])
        torch.testing.assert_close(out.topk_values[b, t, j], m[b, s])
        assert bool(out.topk_mask[b, t, j]) == (j < int(mask[b].sum()))
    # the chosen positions are the prior's best
    best = out.probs.topk(k, -1).values
    got = out.probs.gather(-1, out.topk_indices)
    torch.testing.assert_close(got[out.topk_mask], best[out.topk_mask])
    # the loss is the marginal under the prior renormalised over the K positions
    ll = rand_log_lik((B, T, k))
    p_k = torch.where(out.topk_mask, got, 0.0)
    want = -torch.log((p_k / p_k.sum(-1, keepdim=True) * ll.exp()).sum(-1))
    torch.testing.assert_close(att.loss(out, ll), want)
    # output layer evaluates exactly the gathered positions
    layer = AlignedOutputLayer(DQ, DM, 9)
    y = torch.randint(9, (B, T))
    ll_all = layer.log_lik(q, out.values, y)
    torch.testing.assert_close(layer.log_lik(q, out.topk_values, y, gathered=True),
                               ll_all.gather(-1, out.topk_indices))


# -- the output layer -----------------------------------------------------------------------------


def ref_log_lik(layer: AlignedOutputLayer, h: Tensor, v: Tensor, y: Tensor) -> Tensor:
    """Unchunked: (B, [H,] T, S, V) logits via concatenation [h; v]."""
    heads = v.dim() == 4
    vv = v if heads else v[:, None]
    bsz, hh, s, _ = vv.shape
    t = h.shape[1]
    cat = torch.cat([h[:, None, :, None, :].expand(bsz, hh, t, s, -1),
                     vv[:, :, None].expand(bsz, hh, t, s, -1)], -1)
    w_c = torch.cat([layer.hidden_proj.weight, layer.memory_proj.weight], 1)
    logits = layer.out(torch.tanh(cat @ w_c.T + layer.hidden_proj.bias))
    lp = torch.log_softmax(logits, -1)
    out = lp.gather(-1, y[:, None, :, None, None].expand(bsz, hh, t, s, 1)).squeeze(-1)
    return out if heads else out[:, 0]


class MaxNumel(TorchDispatchMode):
    """The largest output of any op dispatched while active (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.max = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, Tensor):
                self.max = max(self.max, x.numel())
        return out


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("cap", [1, 2000, 30_000, None])
def test_chunked_log_lik_equals_unchunked(heads: int, cap: int | None) -> None:
    v_size, dh, dv = 13, 5, 4
    layer = AlignedOutputLayer(dh, dv, v_size, proj_dim=6)
    g = torch.Generator().manual_seed(7)
    h = torch.randn(B, T, dh, generator=g, requires_grad=True)
    vals = torch.randn((B, heads, S, dv) if heads > 1 else (B, S, dv), generator=g,
                       requires_grad=True)
    y = torch.randint(v_size, (B, T), generator=g)
    got = layer.log_lik(h, vals, y, max_bytes=cap)
    want = ref_log_lik(layer, h, vals, y)
    torch.testing.assert_close(got, want)
    w = torch.randn(want.shape, generator=g)
    params = [h, vals, *layer.parameters()]
    g_got = torch.autograd.grad((got * w).sum(), params)
    g_want = torch.autograd.grad((want * w).sum(), params)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b)


def test_log_lik_memory_is_bounded_forward_and_backward() -> None:
    """Chunking and checkpointing are used: no op builds more than a chunk of (pairs, V)
    logits, in the forward or the backward pass, and the forward pass saves nothing of size V
    per pair for the backward one."""
    bsz, t, s, v_size, d = 4, 6, 7, 500, 8
    layer = AlignedOutputLayer(d, d, v_size)
    h = torch.randn(bsz, t, d, requires_grad=True)
    vals = torch.randn(bsz, s, d, requires_grad=True)
    y = torch.randint(v_size, (bsz, t))
    cap = 40_000  # bytes: float64 -> rows = 40_000 // (WORK_FACTOR * 500 * 8) = 2 pairs
    rows = layer.chunk_rows(torch.float64, cap)
    assert rows == 40_000 // (WORK_FACTOR * v_size * 8) and rows < bsz * t * s
    saved: dict[tuple[int, int], int] = {}

    def pack(x: Tensor) -> Tensor:
        saved[(x.untyped_storage().data_ptr(), x.numel())] = x.numel()
        return x

    rec = MaxNumel()
    with rec, torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = layer.log_lik(h, vals, y, max_bytes=cap)
        out.sum().backward()
    assert rec.max <= max(rows * v_size, v_size * d), (rec.max, rows * v_size)
    # saved outside the checkpointed chunks (distinct tensors): inputs, parameters, no logits
    assert sum(saved.values()) < bsz * t * s * v_size / 10, saved
    # the unchunked reference does build the whole (B, T, S, V) tensor
    rec2 = MaxNumel()
    with rec2:
        ref_log_lik(layer, h, vals, y).sum().backward()
    assert rec2.max >= bsz * t * s * v_size


@pytest.mark.parametrize("cap", [1, 3000, None])
def test_log_probs_marginalizes_alignment(cap: int | None) -> None:
    v_size, d = 9, 4
    layer = AlignedOutputLayer(d, d, v_size)
    g = torch.Generator().manual_seed(8)
    h, vals = torch.randn(B, T, d, generator=g), torch.randn(B, S, d, generator=g)
    probs = torch.softmax(torch.randn(B, T, S, generator=g), -1)
    probs[1, :, 3:] = 0.0
    probs = probs / probs.sum(-1, keepdim=True)
    got = layer.log_probs(h, vals, probs, max_bytes=cap)
    ref = torch.empty(B, T, v_size)
    for b, t in itertools.product(range(B), range(T)):
        p = sum(probs[b, t, s] * torch.softmax(layer(h[b, t], vals[b, s]), -1) for s in range(S))
        ref[b, t] = torch.log(p)  # type: ignore[arg-type]
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(got.exp().sum(-1), torch.ones(B, T))
    # one step, and K-max gathered values
    torch.testing.assert_close(layer.log_probs(h[:, 2], vals, probs[:, 2], max_bytes=cap),
                               ref[:, 2])
    idx = probs.topk(2, -1).indices
    gv = vals[:, None].expand(B, T, S, d).gather(2, idx[..., None].expand(B, T, 2, d))
    pk = probs.gather(-1, idx)
    pk = pk / pk.sum(-1, keepdim=True)
    got_k = layer.log_probs(h, gv, pk, gathered=True, max_bytes=cap)
    for b, t in itertools.product(range(B), range(T)):
        p = sum(pk[b, t, j] * torch.softmax(layer(h[b, t], gv[b, t, j]), -1) for j in range(2))
        torch.testing.assert_close(got_k[b, t], torch.log(p))  # type: ignore[arg-type]


def test_output_layer_errors() -> None:
    layer = AlignedOutputLayer(5, 4, 7)
    with pytest.raises(ValueError, match="values must be"):
        layer.log_lik(torch.randn(2, 3, 5), torch.randn(2, 6, 3), torch.zeros(2, 3).long())
    with pytest.raises(ValueError, match="target must be"):
        layer.log_lik(torch.randn(2, 3, 5), torch.randn(2, 6, 4), torch.zeros(2, 4).long())
    with pytest.raises(ValueError, match="probs must be"):
        layer.log_probs(torch.randn(2, 3, 5), torch.randn(2, 6, 4), torch.ones(2, 3, 5))


# -- state_dict, compile, low precision -----------------------------------------------------------


def test_state_dict_round_trip() -> None:
    q, m, mask = data()
    for kwargs in ({"score": "additive"}, {"heads": 2, "mode": "marginal", "k_max": 3}):
        a = LatentAlignmentAttention(DQ, DM, **kwargs)
        torch.manual_seed(99)
        b = LatentAlignmentAttention(DQ, DM, **kwargs)
        assert not torch.equal(a(q, m, mask).probs, b(q, m, mask).probs)
        b.load_state_dict(a.state_dict())
        for x, y in zip(a(q, m, mask), b(q, m, mask), strict=True):
            assert (x is None and y is None) or torch.equal(x, y)
    la, lb = AlignedOutputLayer(DQ, DM, 6), AlignedOutputLayer(DQ, DM, 6)
    lb.load_state_dict(la.state_dict())
    yy = torch.randint(6, (B, T))
    assert torch.equal(la.log_lik(q, m, yy), lb.log_lik(q, m, yy))
    na, nb = AlignmentInferenceNetwork(5, DM, 4), AlignmentInferenceNetwork(5, DM, 4)
    nb.load_state_dict(na.state_dict())
    tgt = torch.randn(B, T, 5)
    assert torch.equal(na(tgt, m, mask), nb(tgt, m, mask))


# torch's own inductor import path calls the deprecated torch.jit.script_method (torch 2.13);
# not our code, so ignored here only.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
# Dynamo (torch 2.13) itself instantiates every custom autograd.Function it traces (here the
# engine's plated.rings._SafeLog) and so triggers torch's own "should not be instantiated"
# DeprecationWarning; a 10-line Function of its own reproduces it.
@pytest.mark.filterwarnings(
    "ignore:<class 'torch.autograd.function.Function'> should not be instantiated:"
    "DeprecationWarning")
@pytest.mark.parametrize("mode", ["soft", "variational-enum"])
def test_torch_compile_matches_eager(mode: Any) -> None:
    torch._dynamo.reset()
    q, m, mask = data(torch.float32)
    att = LatentAlignmentAttention(DQ, DM, mode=mode).float()
    post = torch.randn(B, T, S, dtype=torch.float32)
    ll = rand_log_lik((B, T, S)).float()

    def step(q: Tensor, m: Tensor, mask: Tensor, post: Tensor, ll: Tensor) -> Tensor:
        out = att(q, m, mask, posterior_logits=post)
        if mode == "soft":
            return out.context.square().sum(-1)
        return att.loss(out, ll)

    compiled = torch.compile(step, fullgraph=True)  # no graph breaks either
    got = compiled(q, m, mask, post, ll)
    torch.testing.assert_close(got, step(q, m, mask, post, ll), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["soft", "marginal", "hard-enum", "variational-enum"])
def test_masks_never_nan(dtype: torch.dtype, mode: Any) -> None:
    q, m, mask = data(dtype)
    mask = mask.clone()
    mask[2] = False  # one sentence with no real source position at all
    att = LatentAlignmentAttention(DQ, DM, mode=mode, heads=2).to(dtype)
    post = torch.randn(B, 2, T, S, dtype=dtype, requires_grad=True)
    q.requires_grad_(True)
    out = att(q, m, mask, posterior_logits=post)
    assert torch.isfinite(out.context).all() and torch.isfinite(out.probs).all()
    assert (out.probs[2] == 0).all()
    if mode == "soft":
        loss = out.context.float().square().sum()
    else:
        ll = torch.full((B, 2, T, S), -2.0, dtype=dtype).masked_fill(
            ~mask[:, None, None, :], float("nan"))  # garbage at masked positions is ignored
        loss = att.loss(out, ll).float().sum()
    assert torch.isfinite(loss)
    loss.backward()
    grads = [q.grad, post.grad, *(p.grad for p in att.parameters())]
    assert all(gr is None or torch.isfinite(gr).all() for gr in grads)


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("one_step", [False, True])
def test_relaxed_dirichlet_context(heads: int, one_step: bool) -> None:
    torch.manual_seed(3)
    b, t, s, dq, dm = 3, 4, 5, 6, 8
    att = LatentAlignmentAttention(dq, dm, heads=heads, mode="variational-enum")
    q = torch.randn(b, dq) if one_step else torch.randn(b, t, dq)
    m = torch.randn(b, s, dm, requires_grad=True)
    mask = torch.rand(b, s) > 0.3
    mask[:, 0] = True
    out = att(q, m, mask)
    post = torch.randn(out.prior_logits.shape, requires_grad=True)
    ctx, kl = att.relaxed_context(out, post)
    assert ctx.shape == out.context.shape
    assert kl.shape == out.prior_logits.shape[:-1] and bool((kl >= -1e-9).all())
    # KL to itself is zero: sampling from the prior's own Dirichlet
    _, kl0 = att.relaxed_context(out)
    assert torch.allclose(kl0, torch.zeros_like(kl0), atol=1e-10)
    # one head: the context is a convex combination of the real memory rows
    if heads == 1:
        torch.manual_seed(0)
        c1, _ = att.relaxed_context(out, post)
        torch.manual_seed(0)
        w = dirichlet_alignment(post.masked_fill(~out.mask, 0.0), out.mask)
        ref = (w.unsqueeze(-2) @ m).squeeze(-2) if one_step else w @ m
        torch.testing.assert_close(c1, ref)
        assert bool((w.masked_select(~out.mask.expand_as(w)) == 0).all())
    (ctx.sum() + kl.sum()).backward()
    assert post.grad is not None and m.grad is not None
    assert torch.isfinite(post.grad).all() and post.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="posterior_logits must be"):
        att.relaxed_context(out, torch.randn(2, 2))


@pytest.mark.parametrize("heads", [1, 2])
def test_sampled_values_give_the_cheap_reinforce_step(heads: int) -> None:
    """``sample`` + the log-likelihood at the sampled values only == the loss reading a full
    ``(..., S)`` log-likelihood at the same samples."""
    torch.manual_seed(4)
    b, t, s, dq, dm, v = 2, 3, 5, 6, 8, 11
    att = LatentAlignmentAttention(dq, dm, heads=heads, mode="variational-sample")
    q, m = torch.randn(b, t, dq), torch.randn(b, s, dm)
    mask = torch.rand(b, s) > 0.3
    mask[:, 0] = True
    out = att(q, m, mask, posterior_logits=torch.randn(b, heads, t, s).squeeze(1)
              if heads == 1 else torch.randn(b, heads, t, s))
    layer = AlignedOutputLayer(dq, att.value_dim, v)
    h, y = torch.randn(b, t, dq), torch.randint(v, (b, t))
    full_ll = layer.log_lik(h, out.values, y)  # (B, [H,] T, S)
    z, vals = att.sample(out, num_samples=3, generator=torch.Generator().manual_seed(1))
    assert z.shape == (3,) + out.prior_logits.shape[:-1]
    # score only the sampled values: K next to T, as K-max's gathered layout
    k_last = vals.movedim(0, -2)  # (B, [H,] T, K, D)
    ll_z = layer.log_lik(h, k_last, y, gathered=True).movedim(-1, 0)  # (K, B, [H,] T)
    ref = full_ll.unsqueeze(0).expand((3,) + full_ll.shape).gather(-1, z.unsqueeze(-1))
    torch.testing.assert_close(ll_z, ref.squeeze(-1), rtol=1e-10, atol=1e-10)
    cheap = att.loss(out, None, samples=z, sampled_log_lik=ll_z, baseline="loo")
    full = att.loss(out, full_ll, samples=z, baseline="loo")
    torch.testing.assert_close(cheap, full, rtol=1e-12, atol=1e-12)


def test_log_lik_recomputes_only_when_chunked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunked, each chunk's logits are computed twice (forward, then again in backward); when
    one chunk holds every pair the logits are kept and computed once. Values and gradients
    agree."""
    import attention.output

    bsz, t, s, v_size, d = 2, 3, 4, 50, 5
    layer = AlignedOutputLayer(d, d, v_size)
    calls = {"n": 0}
    inner = attention.output._pair_rows

    def counted(*args: Any) -> tuple[Tensor, Tensor]:
        calls["n"] += 1
        return inner(*args)

    monkeypatch.setattr(attention.output, "_pair_rows", counted)
    h = torch.randn(bsz, t, d, requires_grad=True)
    vals = torch.randn(bsz, s, d, requires_grad=True)
    y = torch.randint(v_size, (bsz, t))
    grads = []
    for cap, expect in ((10**9, 1), (WORK_FACTOR * v_size * 8 * 6, 2 * 4)):  # 1 chunk; 4 chunks
        calls["n"] = 0
        out = layer.log_lik(h, vals, y, max_bytes=cap)
        g = torch.autograd.grad(out.sum(), [h, vals])
        assert calls["n"] == expect, (cap, calls["n"])
        grads.append((out.detach(), g))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(a, b)
