"""attention.output.LogLinearOutputLayer against the dense (B, [H,] T, S, V) computation written
plainly, in every attention mode; peaked experts; gradients."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
from test_attention_modules import MaxNumel
from torch import Tensor

from attention import (
    OUTPUT_LAYERS,
    AlignedOutputLayer,
    LatentAlignmentAttention,
    LogLinearOutputLayer,
    make_output_layer,
)
from attention.decoding import beam_search, marginal_log_probs
from attention.functional import alignment_loss
from attention.markov import MarkovAlignmentPrior, markov_alignment_log_marginal

B, T, S, D, V = 3, 4, 5, 6, 11
LATENT = ["marginal", "hard-enum", "variational-enum", "hard-sample", "variational-sample",
          "gumbel"]


def make(dtype: torch.dtype = torch.float64, seed: int = 0, d: int = D, v: int = V,
         memory_dim: int | None = None) -> LogLinearOutputLayer:
    torch.manual_seed(seed)
    layer = LogLinearOutputLayer(d, d if memory_dim is None else memory_dim, v).to(dtype)
    with torch.no_grad():  # logits of a few nats, not the near-uniform ones of a fresh layer
        for p in layer.parameters():
            p.normal_(0.0, 1.0)
    return layer


def dense_logits(layer: LogLinearOutputLayer, h: Tensor, vals: Tensor, gathered: bool = False
                 ) -> Tensor:
    """``(B, H, T, S, V)`` logits ``A h_t + C v_s + b``, every pair written out (``vals`` with a
    heads dim; gathered ``(B, H, T, K, D)``)."""
    a = h @ layer.hidden_out.weight.T + layer.hidden_out.bias  # (B, T, V)
    c = vals @ layer.memory_out.weight.T  # (B, H, S, V) or (B, H, T, K, V)
    if gathered:
        return a[:, None, :, None, :] + c
    return a[:, None, :, None, :] + c[:, :, None, :, :]


def dense_log_lik(layer: LogLinearOutputLayer, h: Tensor, vals: Tensor, y: Tensor,
                  gathered: bool = False) -> Tensor:
    """``log_softmax`` of the dense logits at the target: ``(B, H, T, S)``."""
    lp = torch.log_softmax(dense_logits(layer, h, vals, gathered), -1)
    idx = y[:, None, :, None, None].expand(*lp.shape[:-1], 1)
    return lp.gather(-1, idx).squeeze(-1)


def inputs(dtype: torch.dtype, heads: int = 1, seed: int = 1, grad: bool = False
           ) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g, dtype=torch.float64).to(dtype)
    shape = (B, heads, S, D) if heads > 1 else (B, S, D)
    vals = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(V, (B, T), generator=g)
    return h.requires_grad_(grad), vals.requires_grad_(grad), y


def tol(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-10,
                                                                         "atol": 1e-10}


# -- the layer against the dense computation ------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("heads", [1, 3])
def test_log_lik_matches_dense(dtype: torch.dtype, heads: int) -> None:
    layer = make(dtype)
    h, vals, y = inputs(dtype, heads, grad=True)
    got = layer.log_lik(h, vals, y)
    vh = vals if heads > 1 else vals.unsqueeze(1)
    want = dense_log_lik(layer, h, vh, y)
    want = want if heads > 1 else want[:, 0]
    assert got.shape == want.shape == ((B, heads, T, S) if heads > 1 else (B, T, S))
    torch.testing.assert_close(got, want, **tol(dtype))
    # gradients w.r.t. the inputs and every parameter, under a random upstream gradient
    w = torch.randn(want.shape, dtype=dtype)
    params = [h, vals, *layer.parameters()]
    g_got = torch.autograd.grad((got * w).sum(), params)
    g_want = torch.autograd.grad((want * w).sum(), params)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, **tol(dtype))
    # the normalisers alone, and the soft-context face
    z = layer.log_normalizer(h, vals)
    torch.testing.assert_close(z, torch.logsumexp(dense_logits(layer, h, vh), -1).reshape(
        z.shape), **tol(dtype))
    ctx = torch.randn(B, T, D, dtype=dtype)
    torch.testing.assert_close(layer(h, ctx), h @ layer.hidden_out.weight.T
                               + layer.hidden_out.bias + ctx @ layer.memory_out.weight.T)


@pytest.mark.parametrize("heads", [1, 2])
def test_gathered_and_one_step(heads: int) -> None:
    layer = make()
    h, vals, y = inputs(torch.float64, heads)
    vh = vals if heads > 1 else vals.unsqueeze(1)
    k = 3
    g = torch.Generator().manual_seed(4)
    idx = torch.randint(S, (B, heads, T, k), generator=g)
    picked = vh[:, :, None].expand(B, heads, T, S, D).gather(3, idx[..., None].expand(
        B, heads, T, k, D))  # (B, H, T, K, D)
    got = layer.log_lik(h, picked if heads > 1 else picked[:, 0], y, gathered=True)
    want = dense_log_lik(layer, h, picked, y, gathered=True)
    torch.testing.assert_close(got, want if heads > 1 else want[:, 0])
    # the same as the full result gathered at the picks
    full = dense_log_lik(layer, h, vh, y)
    torch.testing.assert_close(got, (full.gather(-1, idx) if heads > 1
                                     else full[:, 0].gather(-1, idx[:, 0])))
    # one decoding step: (B, Dh), (B,) -> (B, [H,] S)
    step = layer.log_lik(h[:, 2], vals, y[:, 2])
    torch.testing.assert_close(step, full[:, :, 2] if heads > 1 else full[:, 0, 2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_peaked_experts_at_different_words(dtype: torch.dtype) -> None:
    """The decoder expert is sure of word 0, the alignment expert of word 1 (each gap 800 nats
    in float64, 100 in float32): every shifted product underflows (to 0, or to a subnormal),
    although the true normaliser is finite: ``-gap + log 2``. The repair makes it exact, with
    exact gradients."""
    gap = 800.0 if dtype == torch.float64 else 100.0
    v_size, d = 6, 2
    layer = LogLinearOutputLayer(d, d, v_size).to(dtype)
    with torch.no_grad():
        layer.hidden_out.weight.zero_()
        layer.hidden_out.bias.copy_(torch.tensor([0.0] + [-gap] * (v_size - 1)))
        # c_s = C v_s with v_s = (1, x_s): word 1 at 0, every other word at -gap (+ small x_s)
        weight = torch.full((v_size, d), 0.0)
        weight[:, 0] = -gap
        weight[1, 0] = 0.0
        weight[:, 1] = torch.linspace(-1.0, 1.0, v_size)
        layer.memory_out.weight.copy_(weight)
    h = torch.randn(2, 3, d, dtype=dtype, requires_grad=True)
    x = torch.randn(2, 4, dtype=dtype)
    vals = torch.stack([torch.ones_like(x), 0.1 * x], -1).requires_grad_()
    y = torch.tensor([[0, 1, 2], [1, 0, 3]])
    got = layer.log_lik(h, vals, y)
    want = dense_log_lik(layer, h, vals.unsqueeze(1), y)[:, 0]
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-6 if dtype == torch.float32 else 1e-12,
                               atol=1e-3 if dtype == torch.float32 else 1e-9)
    # the normaliser is -gap + log(e^{c_s[0]} + e^{c_s[1] - ...}) ~ -gap + log 2, not -inf
    z = layer.log_normalizer(h, vals)
    ref_z = torch.logsumexp(dense_logits(layer, h, vals.unsqueeze(1))[:, 0], -1)
    torch.testing.assert_close(z, ref_z, rtol=1e-6, atol=1e-3 if dtype == torch.float32
                               else 1e-9)
    assert (z - (-gap + math.log(2))).abs().max() < 0.5
    w = torch.randn(got.shape, dtype=dtype)
    for a, b in zip(torch.autograd.grad((got * w).sum(), [h, vals, *layer.parameters()]),
                    torch.autograd.grad((want * w).sum(), [h, vals, *layer.parameters()]),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4 if dtype == torch.float32 else 1e-9,
                                   atol=1e-3 if dtype == torch.float32 else 1e-9)


class _LogLik(torch.nn.Module):
    """``layer.log_lik`` as a module's forward (for ``torch.func.functional_call``)."""

    def __init__(self, layer: LogLinearOutputLayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, h: Tensor, vals: Tensor, y: Tensor) -> Tensor:
        return self.layer.log_lik(h, vals, y)


def test_gradcheck_float64() -> None:
    layer = make(d=3, v=5)
    g = torch.Generator().manual_seed(5)
    h = torch.randn(2, 3, 3, generator=g, requires_grad=True)
    vals = torch.randn(2, 2, 4, 3, generator=g, requires_grad=True)  # two heads
    y = torch.randint(5, (2, 3), generator=g)
    wrapper = _LogLik(layer)
    names = [f"layer.{n}" for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())

    def f(h: Tensor, vals: Tensor, *ps: Tensor) -> Tensor:
        return torch.func.functional_call(wrapper, dict(zip(names, ps, strict=True)),
                                          (h, vals, y))

    assert torch.autograd.gradcheck(f, (h, vals, *params))
    probs = torch.softmax(torch.randn(2, 3, 4, generator=g), -1).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda hh, vv, pp: layer.log_probs(hh, vv, log_prior=pp.log()),
        (h, vals[:, 0].detach().clone().requires_grad_(), probs))


def test_second_derivative_is_refused() -> None:
    layer = make()
    h, vals, y = inputs(torch.float64, grad=True)
    out = layer.log_lik(h, vals, y).sum()
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.grad(out, h, create_graph=True)
    (gh,) = torch.autograd.grad(layer.log_lik(h, vals, y).sum(), h)  # once is fine
    assert torch.isfinite(gh).all()


def test_no_tensor_of_every_pair_and_word() -> None:
    """Forward and backward never build a (B, T, S, V) tensor: the largest is one expert."""
    bsz, t, s, d, v_size = 4, 6, 7, 5, 300
    layer = LogLinearOutputLayer(d, d, v_size)
    h = torch.randn(bsz, t, d, requires_grad=True)
    vals = torch.randn(bsz, s, d, requires_grad=True)
    y = torch.randint(v_size, (bsz, t))
    rec = MaxNumel()
    with rec:
        layer.log_lik(h, vals, y).sum().backward()
    assert rec.max <= bsz * max(t, s) * v_size, rec.max
    rec2 = MaxNumel()
    with rec2:
        dense_log_lik(layer, h, vals.unsqueeze(1), y).sum().backward()
    assert rec2.max >= bsz * t * s * v_size  # the plain computation does


# -- decoding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("cap", [1, 4000, None])
def test_log_probs_marginalizes_alignment(cap: int | None) -> None:
    layer = make()
    g = torch.Generator().manual_seed(8)
    h, vals = torch.randn(B, T, D, generator=g), torch.randn(B, S, D, generator=g)
    probs = torch.softmax(torch.randn(B, T, S, generator=g), -1)
    probs[1, :, 3:] = 0.0
    probs = probs / probs.sum(-1, keepdim=True)
    got = layer.log_probs(h, vals, probs, max_bytes=cap)
    ref = torch.empty(B, T, V)
    for b, t in itertools.product(range(B), range(T)):
        p = sum(probs[b, t, s] * torch.softmax(layer(h[b, t], vals[b, s]), -1) for s in range(S))
        ref[b, t] = torch.log(p)  # type: ignore[arg-type]
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(got.exp().sum(-1), torch.ones(B, T))
    lp2, z = layer.log_probs_and_normalizer(h, vals, log_prior=probs.log(), max_bytes=cap)
    torch.testing.assert_close(lp2, ref)
    torch.testing.assert_close(z, torch.logsumexp(dense_logits(layer, h, vals.unsqueeze(1))[:, 0],
                                                  -1))
    # the engine's marginal over the dense (N, S, V) word distributions agrees
    dense = torch.log_softmax(dense_logits(layer, h, vals.unsqueeze(1))[:, 0], -1)  # (B,T,S,V)
    eng = marginal_log_probs(probs.log().reshape(B * T, S), dense.reshape(B * T, S, V),
                             (probs > 0).reshape(B * T, S))
    torch.testing.assert_close(got.reshape(B * T, V), eng)
    # one step, and K-max gathered values
    torch.testing.assert_close(layer.log_probs(h[:, 2], vals, probs[:, 2], max_bytes=cap),
                               ref[:, 2])
    idx = probs.topk(2, -1).indices
    gv = vals[:, None].expand(B, T, S, D).gather(2, idx[..., None].expand(B, T, 2, D))
    pk = probs.gather(-1, idx)
    pk = pk / pk.sum(-1, keepdim=True)
    got_k = layer.log_probs(h, gv, pk, gathered=True, max_bytes=cap)
    for b, t in itertools.product(range(B), range(T)):
        p = sum(pk[b, t, j] * torch.softmax(layer(h[b, t], gv[b, t, j]), -1) for j in range(2))
        torch.testing.assert_close(got_k[b, t], torch.log(p))  # type: ignore[arg-type]
    # a query without any alignment: -inf everywhere, no NaN
    none = layer.log_probs(h[:, 0], vals, torch.zeros(B, S))
    assert torch.isneginf(none).all()


def test_log_probs_exact_on_peaked_prior_and_experts() -> None:
    """A prior of 1e-300 on the one position whose expert likes word 3 (and 1 elsewhere): the
    mixture's log-probability of word 3 is about -690 - gap, not -inf."""
    layer = make(d=2, v=4)
    with torch.no_grad():
        layer.hidden_out.weight.zero_()
        layer.hidden_out.bias.zero_()
        layer.memory_out.weight.copy_(torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0],
                                                    [0.0, 400.0]]))
    vals = torch.tensor([[[1.0, -1.0], [1.0, 1.0]]])  # position 1 likes word 3 (c = 400)
    h = torch.zeros(1, 2)
    log_prior = torch.tensor([[0.0, -690.0]])
    got = layer.log_probs(h, vals, log_prior=log_prior)[0]
    dense = torch.log_softmax(layer(h[:, None], vals)[0], -1)  # (S, V)
    want = torch.logsumexp(log_prior[0, :, None] + dense, 0)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-9)


def test_beam_search_sums_out_the_alignment() -> None:
    """Beam search whose step is the layer's log_probs equals one whose step is the engine's
    marginal over the dense per-alignment word distributions."""
    layer = make()
    g = torch.Generator().manual_seed(3)
    mem = torch.randn(2, S, D, generator=g)
    emb = torch.randn(V, D, generator=g)
    prior_w = torch.randn(D, D, generator=g)
    beam = 3

    def make_step(dense: bool) -> Any:
        def step(last: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
            hq = torch.tanh(emb[last] + state["h"])
            prior = (hq @ prior_w).unsqueeze(1) @ state["mem"].transpose(-1, -2)
            prior = prior.squeeze(1)  # (N, S)
            if dense:
                lp = torch.log_softmax(layer(hq[:, None], state["mem"]), -1)  # (N, S, V)
                out = marginal_log_probs(prior, lp)
            else:
                out = layer.log_probs(hq, state["mem"], log_prior=torch.log_softmax(prior, -1))
            return out, dict(state, h=hq)
        return step

    rep = torch.arange(2).repeat_interleave(beam)
    state = {"mem": mem[rep], "h": torch.zeros(2 * beam, D)}
    a = beam_search(make_step(False), state, batch_size=2, bos=0, eos=1, beam_size=beam,
                    max_len=6)
    b = beam_search(make_step(True), state, batch_size=2, bos=0, eos=1, beam_size=beam,
                    max_len=6)
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.scores, b.scores)


# -- every attention mode on the layer ------------------------------------------------------------


def _attention_setup(mode: Any, heads: int = 1, k_max: int | None = None
                     ) -> tuple[LatentAlignmentAttention, Any, Tensor, Tensor, Tensor]:
    torch.manual_seed(2)
    attn = LatentAlignmentAttention(D, D, mode=mode, heads=heads, k_max=k_max)
    g = torch.Generator().manual_seed(6)
    q = torch.randn(B, T, D, generator=g)
    mem = torch.randn(B, S, D, generator=g)
    mask = torch.arange(S) < torch.tensor([S, 3, 1])[:, None]
    post = torch.randn((B, heads, T, S) if heads > 1 else (B, T, S), generator=g)
    variational = mode in ("variational-enum", "variational-sample", "gumbel")
    out = attn(q, mem, mask, posterior_logits=post if variational else None)
    return attn, out, q, mem, mask


@pytest.mark.parametrize("mode", LATENT)
@pytest.mark.parametrize("heads", [1, 2])
def test_every_mode_matches_dense(mode: Any, heads: int) -> None:
    """The loss of each mode with the layer's log-likelihoods equals the loss on the dense
    log-likelihoods, value and gradient (heads as a plate: one alignment per head)."""
    attn, out, q, mem, mask = _attention_setup(mode, heads)
    layer = make(memory_dim=attn.value_dim)
    y = torch.randint(V, (B, T), generator=torch.Generator().manual_seed(9))
    ll = layer.log_lik(q, out.values, y)
    vh = out.values if heads > 1 else out.values.unsqueeze(1)
    dense = dense_log_lik(layer, q, vh, y)
    dense = dense if heads > 1 else dense[:, 0]
    torch.testing.assert_close(ll, dense)
    kw: dict[str, Any] = {}
    if mode in ("hard-sample", "variational-sample", "gumbel"):
        kw["generator"] = torch.Generator().manual_seed(11)
    got = attn.loss(out, ll, **kw)
    if "generator" in kw:
        kw["generator"] = torch.Generator().manual_seed(11)
    want = attn.loss(out, dense, **kw)
    torch.testing.assert_close(got, want)
    params = list(layer.parameters())
    for a, b in zip(torch.autograd.grad(got.sum(), params, retain_graph=True),
                    torch.autograd.grad(want.sum(), params, retain_graph=True), strict=True):
        torch.testing.assert_close(a, b)
    if mode == "marginal":  # and against brute force, per head
        prior = out.prior_logits.masked_fill(~out.mask, -math.inf).log_softmax(-1)
        ref = -torch.logsumexp(prior + dense.masked_fill(~out.mask, 0.0), -1)
        torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("mode", ["marginal", "variational-enum"])
def test_kmax_on_the_layer(mode: Any) -> None:
    """K-max: the layer on the K-max values (gathered) equals its full result at the picks, and
    the loss equals alignment_loss on the truncated dense log-likelihoods."""
    attn, out, q, mem, mask = _attention_setup(mode, k_max=2)
    layer = make()
    y = torch.randint(V, (B, T), generator=torch.Generator().manual_seed(9))
    ll_k = layer.log_lik(q, out.topk_values, y, gathered=True)
    torch.testing.assert_close(ll_k, out.gather_topk(layer.log_lik(q, out.values, y)))
    dense_k = out.gather_topk(dense_log_lik(layer, q, out.values.unsqueeze(1), y)[:, 0])
    post = None if out.posterior_logits is None else out.gather_topk(out.posterior_logits)
    want = alignment_loss(out.gather_topk(out.prior_logits), dense_k, out.topk_mask, mode, post)
    torch.testing.assert_close(attn.loss(out, ll_k), want)


@pytest.mark.parametrize("heads", [1, 2])
def test_sampled_alignments_on_the_layer(heads: int) -> None:
    """The cheap REINFORCE step: the layer at the sampled values only equals its full result at
    the samples, and the loss with sampled_log_lik equals the loss with the full one."""
    attn, out, q, mem, mask = _attention_setup("variational-sample", heads)
    layer = make(memory_dim=attn.value_dim)
    y = torch.randint(V, (B, T), generator=torch.Generator().manual_seed(9))
    z, vals = attn.sample(out, 2, generator=torch.Generator().manual_seed(1))
    ll_z = layer.log_lik(q, vals.movedim(0, -2), y, gathered=True)  # (B, [H,] T, K)
    full = layer.log_lik(q, out.values, y)  # (B, [H,] T, S)
    torch.testing.assert_close(ll_z.movedim(-1, 0), full.unsqueeze(0).expand(
        2, *full.shape).gather(-1, z.unsqueeze(-1)).squeeze(-1))
    got = attn.loss(out, None, samples=z, sampled_log_lik=ll_z.movedim(-1, 0))
    want = attn.loss(out, full, samples=z)
    torch.testing.assert_close(got, want)


def test_markov_prior_on_the_layer() -> None:
    torch.manual_seed(4)
    prior = MarkovAlignmentPrior(D, max_jump=2)
    layer = make()
    g = torch.Generator().manual_seed(6)
    hs, mem = torch.randn(B, T, D, generator=g), torch.randn(B, S, D, generator=g)
    y = torch.randint(V, (B, T), generator=g)
    src_mask = torch.arange(S) < torch.tensor([S, 3, 1])[:, None]
    init, trans = prior(hs, mem)
    ll = layer.log_lik(hs, mem, y)
    dense = dense_log_lik(layer, hs, mem.unsqueeze(1), y)[:, 0]
    got = markov_alignment_log_marginal(init, trans, ll, src_mask)
    want = markov_alignment_log_marginal(init, trans, dense, src_mask)
    torch.testing.assert_close(got, want)
    # brute force over every alignment path of the first sentence (S^T = 625 paths)
    lp0 = torch.log_softmax(init[0], -1)
    lt = torch.log_softmax(trans[0], -1)  # (T, S, S)
    total = []
    for path in itertools.product(range(S), repeat=T):
        v = lp0[path[0]] + dense[0, 0, path[0]]
        for t in range(1, T):
            v = v + lt[t, path[t - 1], path[t]] + dense[0, t, path[t]]
        total.append(v)
    torch.testing.assert_close(got[0], torch.logsumexp(torch.stack(total), 0))
    w = list(layer.parameters())
    for a, b in zip(torch.autograd.grad(got.sum(), w), torch.autograd.grad(want.sum(), w),
                    strict=True):
        torch.testing.assert_close(a, b)


# -- names, errors, state ------------------------------------------------------------------------


def test_make_output_layer_and_errors() -> None:
    assert OUTPUT_LAYERS == ("luong", "log-linear")
    assert isinstance(make_output_layer("luong", 4, 5, 7), AlignedOutputLayer)
    lay = make_output_layer("log-linear", 4, 5, 7, max_bytes=1000)
    assert isinstance(lay, LogLinearOutputLayer) and lay.max_bytes == 1000
    with pytest.raises(ValueError, match="output layer must be one of"):
        make_output_layer("tanh", 4, 5, 7)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_bytes"):
        LogLinearOutputLayer(4, 5, 7, max_bytes=0)
    layer = LogLinearOutputLayer(5, 4, 7)
    with pytest.raises(ValueError, match="values must be"):
        layer.log_lik(torch.randn(2, 3, 5), torch.randn(2, 6, 3), torch.zeros(2, 3).long())
    with pytest.raises(ValueError, match="target must be"):
        layer.log_lik(torch.randn(2, 3, 5), torch.randn(2, 6, 4), torch.zeros(2, 4).long())
    with pytest.raises(ValueError, match="dec_hidden must be"):
        layer.log_normalizer(torch.randn(2, 3, 4), torch.randn(2, 6, 4))
    with pytest.raises(ValueError, match="probs must be"):
        layer.log_probs(torch.randn(2, 3, 5), torch.randn(2, 6, 4), torch.ones(2, 3, 5))
    with pytest.raises(ValueError, match="exactly one of probs"):
        layer.log_probs(torch.randn(2, 3, 5), torch.randn(2, 6, 4))
    with pytest.raises(ValueError, match="max_bytes"):
        layer.log_probs(torch.randn(2, 5), torch.randn(2, 6, 4), torch.ones(2, 6), max_bytes=0)


def test_state_dict_round_trip() -> None:
    a, b = make(seed=1), LogLinearOutputLayer(D, D, V)
    b.load_state_dict(a.state_dict())
    h, vals, y = inputs(torch.float64)
    torch.testing.assert_close(a.log_lik(h, vals, y), b.log_lik(h, vals, y))
    assert "max_bytes" in repr(a)
