"""Every bad input of issue 15 (section 4) gets a named error, or the right answer where one is
defined: one test per input.

Errors are matched by the names their messages must contain (the factor, dim, plate or argument,
and the way out), not by their wording; answers are checked against a brute force written here.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import plated
from attention.functional import alignment_loss, sample_alignments
from attention.markov import markov_alignment_elbo, markov_alignment_log_marginal
from attention.modules import LatentAlignmentAttention
from plated import Factor, GraphError, Plate, PlatedFactorGraph


def naming(*names: str) -> str:
    """A ``match=`` pattern requiring every one of ``names`` somewhere in the message."""
    return "(?s)" + "".join(f"(?=.*{re.escape(n)})" for n in names)


def graph_1d() -> PlatedFactorGraph:
    return PlatedFactorGraph([Factor(torch.randn(3), ("x",), name="fx")])


# -- the engine ---------------------------------------------------------------------------------


def test_factor_with_a_dim_of_size_zero_is_named() -> None:
    with pytest.raises(GraphError, match=naming("f0", "'y'", "size 0")):
        Factor(torch.randn(2, 0), ("x", "y"), name="f0")
    with pytest.raises(GraphError, match=naming("operand 1", "'b'", "size 0")):
        plated.einsum("a,ab->", torch.randn(2), torch.randn(2, 0))


def test_marginals_of_a_graph_without_variables_is_empty() -> None:
    g = PlatedFactorGraph([Factor(torch.randn(3), ("i",))], [Plate("i", 3)])
    assert g.marginals() == {}
    assert g.map() == {} and g.sample() == {}  # as map() and sample() already give
    logz, by_factor = g.log_partition_and_factor_marginals([])
    assert by_factor == {}
    assert_close(logz, g.log_partition())


def _wide(names: list[str], sizes: dict[str, int]) -> Factor:
    return Factor(torch.randn(tuple(sizes[d] for d in names)), tuple(names))


def _brute_joint(factors: list[Factor]) -> tuple[list[str], torch.Tensor]:
    """The joint log density over the union of every factor's dims, by broadcast sums."""
    union = sorted({d for f in factors for d in f.dims})
    joint = torch.zeros(())
    for f in factors:
        view = f.tensor.permute(sorted(range(f.tensor.dim()), key=lambda k: union.index(f.dims[k])))
        shape = [f.tensor.shape[f.dims.index(d)] if d in f.dims else 1 for d in union]
        joint = joint + view.reshape(shape)
    return union, joint


def _brute_logz(factors: list[Factor], keep: tuple[str, ...] = ()) -> torch.Tensor:
    """log Z by one broadcast sum over the union of every factor's dims (no einsum)."""
    union, joint = _brute_joint(factors)
    elim = [k for k, d in enumerate(union) if d not in keep]
    out = joint.logsumexp(elim) if elim else joint
    kept = [d for d in union if d in keep]
    return out.permute([kept.index(d) for d in keep])


def test_more_than_52_dims_in_one_step_works() -> None:
    # two factors over 30 dims each, 5 shared: one pairwise step over 55 dims; a few have size 2
    names = [f"v{k}" for k in range(55)]
    sizes = {d: 2 if k % 9 == 0 else 1 for k, d in enumerate(names)}
    a, b = _wide(names[:30], sizes), _wide(names[25:], sizes)
    g = PlatedFactorGraph([a, b])
    assert_close(g.log_partition(), _brute_logz([a, b]))
    assert_close(g.max_log_density(), _brute_joint([a, b])[1].amax())
    # a step that keeps more than 52 dims and eliminates one they share: still one einsum-free
    # broadcast, then the elimination
    shared = "s"
    sizes[shared] = 3
    keep = tuple(names)
    a = _wide(names[:28] + [shared], sizes)
    b = _wide(names[28:] + [shared], sizes)
    g = PlatedFactorGraph([a, b], keep_vars=keep)
    assert_close(g.log_partition(), _brute_logz([a, b], keep))
    marg = PlatedFactorGraph([a, b]).marginals()
    joint = _brute_logz([a, b], (shared,))
    assert_close(marg[shared], (joint - joint.logsumexp(0)).exp())
    union, full = _brute_joint([a, b])
    best = torch.unravel_index(full.argmax(), full.shape)
    assert {d: int(v) for d, v in PlatedFactorGraph([a, b]).map().items()} == {
        d: int(best[k]) for k, d in enumerate(union)}
    # the functional face, with more than 52 distinct letters (any characters name dims)
    letters = [chr(0x100 + k) for k in range(60)]
    x = torch.randn((2,) * 3 + (1,) * 27)
    y = torch.randn((1,) * 27 + (2,) * 3)
    (z,) = plated.einsum("".join(letters[:30]) + "," + "".join(letters[30:]) + "->", x, y)
    assert_close(z, x.logsumexp(tuple(range(30))) + y.logsumexp(tuple(range(30))))


def test_repeated_index_in_one_einsum_input_is_named() -> None:
    with pytest.raises(GraphError, match=naming("operand 0", "'aa'", "'a'", "diagonal")):
        plated.einsum("aa->", torch.randn(3, 3))
    with pytest.raises(GraphError, match=naming("operand 1", "'bb'", "'b'")):
        plated.einsum("ab,bb->a", torch.randn(3, 3), torch.randn(3, 3))


def test_meta_factor_with_validation_skips_the_value_check() -> None:
    t = torch.empty(3, 4, device="meta")
    g = PlatedFactorGraph([Factor(t, ("x", "y"))], validate=True)
    out = g.log_partition()
    assert out.device.type == "meta" and out.shape == ()
    (z,) = plated.einsum("ab->a", t, validate=True)
    assert z.device.type == "meta" and z.shape == (3,)


def test_marginals_inside_inference_mode_is_named() -> None:
    g = graph_1d()
    with torch.inference_mode(), pytest.raises(GraphError, match=naming("inference_mode",
                                                                        "no_grad")):
        g.marginals()
    with torch.inference_mode(), pytest.raises(GraphError, match=naming("inference_mode")):
        g.factor_marginals()
    with torch.no_grad():  # the way out the error names
        assert_close(g.marginals()["x"], g.factors[0].tensor.softmax(0))


def test_sample_with_a_float_count_is_named() -> None:
    with pytest.raises(GraphError, match=naming("num_samples", "2.5")):
        graph_1d().sample(2.5)  # type: ignore[arg-type]
    with pytest.raises(GraphError, match=naming("num_samples", "True")):
        graph_1d().sample(True)
    assert graph_1d().sample(np.int64(2))["x"].shape == (2,)


def test_sample_with_a_generator_that_is_not_one_is_named() -> None:
    with pytest.raises(GraphError, match=naming("generator", "torch.Generator", "int")):
        graph_1d().sample(2, generator=5)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [2.7, "3", True, 3.0])
def test_plate_size_must_be_an_int(size: Any) -> None:
    with pytest.raises(GraphError, match=naming("plate 'i'", repr(size), "int")):
        Plate("i", size)


def test_plate_size_accepts_integers() -> None:
    assert Plate("i", np.int64(3)).size == 3
    assert type(Plate("i", np.int64(3)).size) is int
    assert Plate("i", torch.tensor(4)).size == 4


def test_cost_with_an_unknown_ring_is_named_as_einsum_does() -> None:
    g = graph_1d()
    with pytest.raises(GraphError, match=naming("'sum'", "'log'", "'max'")):
        g.cost("sum")  # type: ignore[arg-type]
    with pytest.raises(GraphError, match=naming("'sum'", "'log'", "'max'")):
        plated.einsum("a->", torch.randn(3), ring="sum")  # type: ignore[arg-type]
    with pytest.raises(GraphError, match=naming("'sum'")):
        g.plan("sum")  # type: ignore[arg-type]
    assert g.cost("max").flops > 0


def test_sample_of_a_graph_with_log_z_minus_inf_raises() -> None:
    # checked under validation (the default), in the one sync a validated query costs anyway
    validate = True
    dead = PlatedFactorGraph([Factor(torch.full((3,), -math.inf), ("x",), name="fx")],
                             validate=validate)
    with pytest.raises(GraphError, match=naming("-inf", "sample", "fx")):
        dead.sample(2)
    # with kept plates: the element without a distribution is named
    t = torch.randn(4, 3)
    t[2] = -math.inf
    g = PlatedFactorGraph([Factor(t, ("n", "x"), name="fnx")], [Plate("n", 4)],
                          keep_plates=("n",), validate=validate)
    with pytest.raises(GraphError, match=naming("-inf", "'n'", "2")):
        g.sample(1)
    t[2] = 0.0
    assert g.sample(5)["x"].shape == (5, 4)
    # a NaN is still named first, from the same sync
    t[1, 1] = math.nan
    with pytest.raises(GraphError, match=naming("fnx", "NaN")):
        g.sample(1)


# -- attention ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["hard-sample", "variational-sample"])
def test_alignment_loss_reads_a_square_log_lik_as_full(mode: str) -> None:
    # samples (K, N) = (3, 3) and log_lik (N, S) = (3, 3): the same shape, two meanings
    prior = torch.randn(3, 3)
    post = torch.randn(3, 3) if mode == "variational-sample" else None
    ll = torch.randn(3, 3)
    r = prior if post is None else post
    z = sample_alignments(r, None, 3)
    got = alignment_loss(prior, ll, None, mode, post, samples=z)
    at_samples = ll.gather(-1, z.T)  # (N, K): the reward of each sample
    kl = 0.0
    if post is not None:
        q, p = post.log_softmax(-1), prior.log_softmax(-1)
        kl = (q.exp() * (q - p)).sum(-1)
    assert_close(got, -at_samples.mean(-1) + kl)
    # the log-likelihood at the samples only is its own argument
    given = alignment_loss(prior, None, None, mode, post, samples=z, sampled_log_lik=at_samples.T)
    assert_close(given, got)
    with pytest.raises(ValueError, match=naming("sampled_log_lik", "samples")):
        alignment_loss(prior, None, None, mode, post, sampled_log_lik=at_samples.T)
    with pytest.raises(ValueError, match=naming("log_lik", "sampled_log_lik")):
        alignment_loss(prior, ll, None, mode, post, samples=z, sampled_log_lik=at_samples.T)


def test_module_loss_reads_a_square_log_lik_as_full() -> None:
    att = LatentAlignmentAttention(4, 4, mode="hard-sample")
    q, m = torch.randn(3, 1, 4), torch.randn(3, 3, 4)  # B = S = 3, one target step: (B, T, S)
    out = att(q.squeeze(1), m)
    ll = torch.randn(out.prior_logits.shape)  # (B, S) = (3, 3)
    z, _ = att.sample(out, 3)  # (K, B) = (3, 3)
    got = att.loss(out, ll, samples=z)
    assert_close(got, -ll.gather(-1, z.T).mean(-1))
    given = att.loss(out, None, samples=z, sampled_log_lik=ll.gather(-1, z.T).T)
    assert_close(given, got)


def test_markov_elbo_without_real_source_positions_is_minus_inf() -> None:
    b, t, s = 3, 4, 3
    leaves = [torch.randn(b, s, requires_grad=True), torch.randn(b, t, s, s, requires_grad=True),
              torch.randn(b, t, s, requires_grad=True), torch.randn(b, s, requires_grad=True),
              torch.randn(b, t, s, s, requires_grad=True)]
    src = torch.ones(b, s, dtype=torch.bool)
    src[1] = False
    tgt = torch.ones(b, t, dtype=torch.bool)
    tgt[2] = False  # no real target step either: log p(y | x) = 0
    src[2] = False
    elbo = markov_alignment_elbo(*leaves, src, tgt)
    logp = markov_alignment_log_marginal(*leaves[:3], src, tgt)
    assert elbo[1].item() == -math.inf and logp[1].item() == -math.inf
    assert elbo[2].item() == 0.0 and logp[2].item() == 0.0
    assert bool(torch.isfinite(elbo[0])) and elbo[0] <= logp[0] + 1e-9
    grads = torch.autograd.grad(torch.where(torch.isfinite(elbo), elbo, 0.0).sum(), leaves)
    for g in grads:
        assert bool(torch.isfinite(g).all())
        assert bool((g[1] == 0).all())


@pytest.mark.parametrize("bad", [3, -1])
def test_samples_out_of_range_are_named(bad: int) -> None:
    prior, ll = torch.randn(2, 3), torch.randn(2, 3)
    z = torch.zeros(1, 2, dtype=torch.long)
    z[0, 1] = bad
    with pytest.raises(ValueError, match=naming("samples", str(bad), "[0, 3)")):
        alignment_loss(prior, ll, None, "hard-sample", samples=z)


@pytest.mark.parametrize("mode", ["marginal", "hard-enum", "variational-enum", "hard-sample",
                                  "variational-sample", "gumbel"])
def test_infinite_loss_row_has_zero_gradients(mode: str) -> None:
    prior = torch.randn(3, 4, requires_grad=True)
    post = (torch.randn(3, 4, requires_grad=True)
            if mode.startswith("variational") or mode == "gumbel" else None)
    ll = torch.randn(3, 4, requires_grad=True)
    dead = torch.tensor([False, True, False])[:, None]
    log_lik = torch.where(dead, -math.inf, ll)  # prior > 0 where log-likelihood is -inf
    kw: dict[str, Any] = {}
    if mode.endswith("sample") or mode == "gumbel":
        kw["num_samples"] = 3
    loss = alignment_loss(prior, log_lik, None, mode, post, **kw)
    assert loss[1].item() == math.inf
    assert bool(torch.isfinite(loss[[0, 2]]).all())
    leaves = [x for x in (prior, ll, post) if x is not None]
    grads = torch.autograd.grad(torch.where(torch.isfinite(loss), loss, 0.0).sum(), leaves)
    for g in grads:
        assert bool(torch.isfinite(g).all())
        assert bool((g[1] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_value_check_sums_in_the_factor_dtype_without_false_errors(dtype: torch.dtype) -> None:
    """The value check sums each factor in its own dtype (float32 for float16): a sum that
    overflows to +inf although every entry is finite is a false alarm that the entry-by-entry
    check clears, so the call succeeds; a real +inf or NaN is still named."""
    big = torch.finfo(dtype).max / 4
    x = torch.full((64,), big, dtype=dtype)
    x[0] = -math.inf
    (z,) = plated.einsum("a->", x)  # every entry finite or -inf, the sum overflows
    assert z.dtype == dtype and torch.isfinite(z.float())
    assert_close(z.double(), torch.logsumexp(x.double(), 0), rtol=1e-2, atol=0)
    for bad, word in ((math.inf, r"\+inf"), (math.nan, "NaN")):
        y = x.clone()
        y[5] = bad
        with pytest.raises(GraphError, match=word):
            plated.einsum("a->", y)
