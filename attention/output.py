r"""The output layer of a latent-alignment decoder, memory-bounded.

A latent-alignment decoder needs :math:`\log p(y_t \mid x, z_t = s)` for *every* alignment
:math:`s` (the marginal, enumerated and variational objectives sum over them). With the usual
Luong-style attentional output layer (Luong et al., 2015, eq. 5; the layer of Deng et al., 2018)

.. math::

    \tilde h_{t,s} = \tanh(W_c [h_t; v_s] + b_c) = \tanh(W_h h_t + W_v v_s + b_c), \qquad
    p(y_t \mid x, z_t = s) = \mathrm{softmax}(W_o \tilde h_{t,s} + b_o)_{y_t},

that is a ``(B, T, S, V)`` tensor of logits: 64 x 50 x 50 x 10,000 float32 is 6.4 GB, twice that
with its gradient. :class:`AlignedOutputLayer` never builds it:

* the pre-activation is factorized: :math:`W_h h_t + b_c` (``(B, T, P)``) and :math:`W_v v_s`
  (``(B, [H,] S, P)``) are computed once, so only the broadcast sum costs ``T x S``;
* the ``(pairs, V)`` logits are computed in chunks of ``(b, [h,] t, s)`` pairs, sized so that a
  chunk's working set (its logits and the few same-sized temporaries of the fused log-softmax
  and target pick and their backward, counted as :data:`WORK_FACTOR` copies) stays under
  ``max_bytes``;
* with a gradient, the chunks run in one autograd function whose backward pass recomputes a
  chunk's logits instead of keeping them and writes that chunk's gradients into one preallocated
  buffer per input (pre-activations, values, :math:`W_o`, :math:`b_o`): nothing of size ``V``
  per pair survives the forward pass, the backward pass handles one chunk at a time as well, and
  no chunk makes its own copy of a parameter's gradient. When the whole step fits
  under the cap with its logits kept (:data:`KEEP_FACTOR` copies of the ``(pairs, V)`` logits),
  it runs as one chunk and nothing is recomputed.

Only the chunks are capped: the inputs, the ``(B, [H,] T, S)`` result, the factorized
pre-activations and the parameters (and their gradients) come on top of ``max_bytes``.

**The log-linear layer.** :class:`LogLinearOutputLayer` is a product of two experts, one for the
decoder state and one for the aligned source vector,

.. math::

    \ell_{t,s} = A h_t + C v_s + b, \qquad
    \log p(y \mid x, z_t = s) = a_t[y] + c_s[y] - \log \textstyle\sum_w e^{a_t[w] + c_s[w]},

with :math:`a_t = A h_t + b` and :math:`c_s = C v_s` computed once each. The normaliser of every
``(t, s)`` pair at once is one log-space matrix product per sentence, ``(T, V)`` by ``(V, S)``:
``T S V`` work instead of the tanh layer's ``T S V P``, and nothing of shape ``(B, T, S, V)``
is held; its step costs about what soft attention's output layer costs (one more ``V``-way
projection, of the source side). Each expert is shifted by its own maximum over the vocabulary
before the product; where the two peak at different words the shifted product can underflow,
and those entries are recomputed exactly by the engine's repair
(:func:`plated.rings.repair_entries`).

**Which to choose.** The tanh layer is the paper's (Deng et al., 2018) and Luong's: the word
distribution of each alignment is a nonlinear function of :math:`[h_t; v_s]`, and exact
enumeration over ``S`` alignments costs ``S`` times soft attention's output layer (chunked to
stay in memory). The log-linear layer can only add the two experts' logits, so
:math:`h_t` and :math:`v_s` cannot interact inside the softmax, but every exact mode
(marginal, enumerated ELBO, Markov prior, beam search with the alignment summed out) costs
about as much as soft attention. Use the tanh layer to reproduce the paper or when the budget
allows; use the log-linear layer to train exact latent alignment at scale.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from plated.rings import finite_indicator, finite_shift, log_matmul, repair_entries

from .typing import OUTPUT_LAYERS, OutputLayerName

__all__ = ["DEFAULT_MAX_BYTES", "KEEP_FACTOR", "OUTPUT_LAYERS", "WORK_FACTOR",
           "AlignedOutputLayer", "LogLinearOutputLayer", "OutputLayer", "OutputLayerName",
           "make_output_layer"]

#: Default cap on a chunk's working set: 256 MiB.
DEFAULT_MAX_BYTES = 256 * 2**20
#: Same-sized ``(chunk, V)`` tensors counted per chunk: the logits, the log-softmax, the gradient
#: of the logits and a temporary, plus one for the allocator's slack
#: (with 4, a 4 GB cap peaked at 4.16 GB of resident memory at batch 64, lengths 50, vocabulary
#: 10k; see benchmarks/attention.py).
WORK_FACTOR = 5
#: Same-sized ``(pairs, V)`` tensors of one unchunked step that keeps its logits for the backward
#: pass (no recompute): logits, ``log_softmax``'s output, their gradient (the plain-torch
#: reference peaked at 2.9 times its logits' size in ``benchmarks/attention.py``).
KEEP_FACTOR = 3


def _shape(x: Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


class AlignedOutputLayer(nn.Module):
    r"""Luong's attentional output layer, evaluated for every alignment in bounded memory.

    :math:`p(y \mid h, v) = \mathrm{softmax}(W_o \tanh(W_h h + W_v v + b_c) + b_o)`: ``forward``
    is the ordinary layer on a (soft) context; :meth:`log_lik` scores a target word under every
    hard alignment; :meth:`log_probs` gives the alignment-marginal next-word distribution for
    decoding. See the module docstring for the memory bound.

    :param hidden_dim: ``Dh``, the decoder state size.
    :param memory_dim: ``D``, the size of the values (``LatentAlignmentAttention.value_dim``).
    :param vocab_size: ``V``.
    :param proj_dim: ``P``, the size of :math:`\tilde h` (default ``hidden_dim``).
    :param max_bytes: default cap on a chunk's working set (see the module docstring).
    """

    def __init__(self, hidden_dim: int, memory_dim: int, vocab_size: int, *,
                 proj_dim: int | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        super().__init__()
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        proj_dim = hidden_dim if proj_dim is None else proj_dim
        self.hidden_dim, self.memory_dim, self.vocab_size, self.proj_dim = (
            hidden_dim, memory_dim, vocab_size, proj_dim)
        self.max_bytes = max_bytes
        self.hidden_proj = nn.Linear(hidden_dim, proj_dim, bias=True)  # W_h, b_c
        self.memory_proj = nn.Linear(memory_dim, proj_dim, bias=False)  # W_v
        self.out = nn.Linear(proj_dim, vocab_size)  # W_o, b_o

    def extra_repr(self) -> str:
        return f"max_bytes={self.max_bytes}"

    def forward(self, dec_hidden: Tensor, context: Tensor) -> Tensor:
        """Logits ``(..., V)`` of the ordinary layer on a context ``(..., D)`` (soft attention,
        or the soft baseline of the paper)."""
        return self.out(torch.tanh(self.hidden_proj(dec_hidden) + self.memory_proj(context)))

    def chunk_rows(self, dtype: torch.dtype, max_bytes: int | None = None) -> int:
        """Pairs per chunk: ``max(1, max_bytes // (WORK_FACTOR * V * itemsize))``."""
        cap = self.max_bytes if max_bytes is None else max_bytes
        if cap < 1:
            raise ValueError(f"max_bytes must be >= 1, got {cap}")
        itemsize = torch.empty((), dtype=dtype).element_size()
        return max(1, cap // (WORK_FACTOR * self.vocab_size * itemsize))

    def _chunk(self, start: int, n: int, hid: Tensor, val: Tensor, target: Tensor, s: int, t: int,
               heads: int, gathered: bool) -> Tensor:
        """log p(y | pair) for flat pairs ``start .. start + n`` of ``(B, H, T, S)``."""
        row, vrow = _pair_rows(start, n, s, t, heads, gathered, hid.device)
        logits = self.out(torch.tanh(hid[row] + val[vrow]))  # (n, V)
        # fused log-softmax and pick, with a fused backward: fewer (n, V) temporaries than
        # picking and subtracting a logsumexp
        return -nn.functional.cross_entropy(logits, target[row], reduction="none")

    def log_lik(self, dec_hidden: Tensor, values: Tensor, target: Tensor, *,
                gathered: bool = False, max_bytes: int | None = None) -> Tensor:
        r""":math:`\log p(y_t \mid x, z_t = s)` for every alignment, in chunks.

        :param dec_hidden: ``(B, T, Dh)`` decoder states (or ``(B, Dh)``: one step, no ``T``).
        :param values: the vectors of each alignment: ``(B, [H,] S, D)`` per source position
            (``AttentionOutput.values``), or with ``gathered=True`` ``(B, [H,] T, K, D)`` per
            query (``AttentionOutput.topk_values`` of K-max).
        :param target: ``(B, T)`` (or ``(B,)``) word ids in ``[0, V)``, padding included (mask
            padded target positions out of the loss yourself).
        :param gathered: whether ``values`` is per query (see above).
        :param max_bytes: cap on a chunk's working set (default ``self.max_bytes``).
        :return: ``(B, [H,] T, S or K)`` (``T`` absent for one step).
        :raises ValueError: naming the arguments and shapes on a mismatch.
        """
        args = _check_log_lik(dec_hidden, values, target, gathered, self.hidden_dim,
                              self.memory_dim)
        h, v, y, gathered = args.hidden, args.values, args.target, args.gathered
        assert y is not None
        b, t = h.shape[0], h.shape[1]
        heads, s = v.shape[1], v.shape[-2]
        hid = self.hidden_proj(h).reshape(b * t, self.proj_dim)
        val = self.memory_proj(v).reshape(-1, self.proj_dim)
        flat_y = y.reshape(b * t)
        total = b * heads * t * s
        rows = self.chunk_rows(hid.dtype, max_bytes)
        cap = self.max_bytes if max_bytes is None else max_bytes
        itemsize = hid.element_size()
        if total * self.vocab_size * itemsize * KEEP_FACTOR <= cap:
            rows = max(total, 1)  # the whole step fits with its logits kept: one chunk
        # one chunk holds everything under the cap: keeping its logits for the backward pass is
        # within the cap too, and recomputing them would only cost time
        use_ckpt = total > rows and torch.is_grad_enabled() and (
            hid.requires_grad or val.requires_grad
            or any(p.requires_grad for p in self.out.parameters()))
        if use_ckpt:  # chunk by chunk, forward and backward, into preallocated buffers
            flat = _ChunkedLogLik.apply(self, (rows, s, t, heads, gathered), hid, val,
                                        self.out.weight, self.out.bias, flat_y)
        else:
            pieces = [self._chunk(start, min(rows, total - start), hid, val, flat_y, s, t, heads,
                                  gathered) for start in range(0, total, rows)]
            flat = torch.cat(pieces) if pieces else hid.new_zeros(0)
        return _finish_log_lik(flat.view(b, heads, t, s), args)

    def log_probs(self, dec_hidden: Tensor, values: Tensor, probs: Tensor | None = None, *,
                  log_prior: Tensor | None = None, gathered: bool = False,
                  max_bytes: int | None = None) -> Tensor:
        r""":math:`\log \sum_s p(z = s)\, p(y \mid x, z = s)` for every word ``y``, in chunks.

        The next-word distribution of a latent-alignment decoder (for beam search). Single head
        only: the heads-as-plate model is a product of experts with no per-word normaliser.

        :param dec_hidden: ``(B, T, Dh)`` or ``(B, Dh)``.
        :param values: ``(B, S, D)``, or with ``gathered=True`` ``(B, T, K, D)`` (K-max; for one
            step ``(B, K, D)`` is just ``(B, S, D)``).
        :param probs: ``(B, [T,] S or K)`` alignment probabilities (``AttentionOutput.probs``;
            for K-max the truncated prior over ``topk_indices``). Zeros drop a position.
        :param log_prior: instead of ``probs``, their logs (``AttentionOutput.log_probs``): exact
            where a probability underflows (a prior ``1e-48`` is 0 in float32, its log is not),
            so pass this one when you have it. ``-inf`` drops a position.
        :param max_bytes: cap on a chunk's working set (default ``self.max_bytes``); a chunk is a
            block of queries times a block of positions, reduced with a running ``logaddexp``.
        :return: ``(B, [T,] V)`` log-probabilities (``-inf`` rows where ``probs`` is all 0).
        :raises ValueError: on a shape mismatch, or unless exactly one of ``probs`` and
            ``log_prior`` is given.
        """
        h, values, log_p, gathered, step = _check_log_probs(
            dec_hidden, values, probs, log_prior, gathered, self.hidden_dim, self.memory_dim)
        b, t, s = log_p.shape
        hid = self.hidden_proj(h).reshape(b * t, 1, self.proj_dim)
        val = self.memory_proj(values)  # (B, S, P) or (B, T, K, P)
        val = val.reshape(b * t, s, self.proj_dim) if gathered else val
        log_p = log_p.reshape(b * t, s).unsqueeze(-1)
        cap = self.max_bytes if max_bytes is None else max_bytes
        per_pair = self.chunk_rows(hid.dtype, cap)
        sn = min(s, per_pair)
        qn = max(1, per_pair // sn)
        q_all = torch.arange(b * t, device=hid.device)
        outs = []
        for q0 in range(0, b * t, qn):
            q = q_all[q0:q0 + qn]
            vq = val[q] if gathered else val[torch.div(q, t, rounding_mode="floor")]
            acc: Tensor | None = None
            for s0 in range(0, s, sn):
                logits = self.out(torch.tanh(hid[q] + vq[:, s0:s0 + sn]))  # (qn, sn, V)
                term = torch.logsumexp(torch.log_softmax(logits, -1) + log_p[q, s0:s0 + sn], 1)
                acc = term if acc is None else torch.logaddexp(acc, term)
            assert acc is not None
            outs.append(acc)
        res = torch.cat(outs).view(b, t, self.vocab_size)
        return res.squeeze(1) if step else res


def _pair_rows(start: int, n: int, s: int, t: int, heads: int, gathered: bool,
               device: torch.device) -> tuple[Tensor, Tensor]:
    """For flat pairs ``start .. start + n`` of ``(B, H, T, S)``: their rows into the
    ``(B * T, P)`` hidden pre-activations and into the values' ``(B * H * S, P)`` (or, gathered,
    ``(B * H * T * K, P)``)."""
    i = torch.arange(start, start + n, device=device)
    b_h_t = torch.div(i, s, rounding_mode="floor")  # (b * H + h) * T + t
    t_idx = b_h_t % t
    b_idx = torch.div(b_h_t, t * heads, rounding_mode="floor")
    row = b_idx * t + t_idx  # into (B * T)
    if gathered:
        return row, i
    bh = torch.div(b_h_t, t, rounding_mode="floor")
    return row, bh * s + i % s  # into (B * H * S)


class _ChunkedLogLik(torch.autograd.Function):
    r""":meth:`AlignedOutputLayer.log_lik` over many chunks, with a backward pass that stays in
    the cap: it recomputes one chunk's logits at a time and writes that chunk's gradients into one
    preallocated buffer per input (the pre-activations, the values, :math:`W_o`, :math:`b_o`),
    so no per-chunk copy of a parameter's gradient is ever made. With
    :math:`\tilde h = \tanh(\cdot)`, logits :math:`\ell = W_o \tilde h + b_o` and the
    gradient :math:`g` of :math:`\log p(y)`, the logits' gradient is
    :math:`g\,(e_y - \mathrm{softmax}(\ell))`, computed in place on the logits. A second
    derivative differentiates the chunks through autograd instead, outside the cap.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, layer: AlignedOutputLayer,
                shape: tuple[int, int, int, int, bool], hid: Tensor, val: Tensor, weight: Tensor,
                bias: Tensor, target: Tensor) -> Tensor:
        rows, s, t, heads, gathered = shape
        total = hid.shape[0] * heads * s  # (B * T) * H * (S or K) pairs
        ctx.layer, ctx.shape = layer, shape  # type: ignore[attr-defined]
        ctx.save_for_backward(hid, val, weight, bias, target)
        out = hid.new_empty(total)
        for start in range(0, total, rows):  # chunks of (query, position) pairs, under the cap
            n = min(rows, total - start)
            out[start:start + n] = layer._chunk(start, n, hid, val, target, s, t, heads,
                                                gathered)
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, *grads: Tensor
                 ) -> tuple[Tensor | None, ...]:
        (g,) = grads
        layer: AlignedOutputLayer = ctx.layer  # type: ignore[attr-defined]
        rows, s, t, heads, gathered = ctx.shape  # type: ignore[attr-defined]
        hid, val, weight, bias, target = ctx.saved_tensors  # type: ignore[attr-defined]
        want = ctx.needs_input_grad  # type: ignore[attr-defined]
        total = g.shape[0]
        if torch.is_grad_enabled():  # a second derivative: the chunks through autograd
            with torch.enable_grad():
                flat = torch.cat([layer._chunk(start, min(rows, total - start), hid, val, target,
                                               s, t, heads, gathered)
                                  for start in range(0, total, rows)])
                inputs = [x for x, w in zip((hid, val, weight, bias), want[2:6], strict=True)
                          if w]
                got = iter(torch.autograd.grad(flat, inputs, g, create_graph=True))
            return (None, None, *(next(got) if w else None for w in want[2:6]), None)
        d_hid = torch.zeros_like(hid) if want[2] else None
        d_val = torch.zeros_like(val) if want[3] else None
        d_weight = torch.zeros_like(weight) if want[4] else None
        d_bias = torch.zeros_like(bias) if want[5] else None
        for start in range(0, total, rows):  # one chunk's logits at a time, under the cap
            n = min(rows, total - start)
            row, vrow = _pair_rows(start, n, s, t, heads, gathered, hid.device)
            th = torch.tanh(hid[row] + val[vrow])  # (n, P)
            logits = torch.addmm(bias, th, weight.t())  # (n, V)
            # d log p(y) / d logits = g (e_y - softmax), in place on the logits
            logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
            logits.div_(logits.sum(dim=-1, keepdim=True))
            g_n = g[start:start + n]
            logits.mul_(-g_n.unsqueeze(-1))
            logits[torch.arange(n, device=g.device), target[row]] += g_n
            if d_weight is not None:
                d_weight.addmm_(logits.t(), th)
            if d_bias is not None:
                d_bias.add_(logits.sum(dim=0))
            if d_hid is not None or d_val is not None:
                d_pre = (logits @ weight).mul_(1 - th * th)  # through tanh
                if d_hid is not None:
                    d_hid.index_add_(0, row, d_pre)
                if d_val is not None:
                    d_val.index_add_(0, vrow, d_pre)
            del logits, th
        return None, None, d_hid, d_val, d_weight, d_bias, None


# -- shared argument checks -----------------------------------------------------------------------


class _LogLikArgs(NamedTuple):
    """Checked inputs of a ``log_lik``: ``hidden (B, T, Dh)``, ``values`` with a heads dim,
    ``(B, H, S, D)`` (or ``(B, H, T, K, D)`` when ``gathered``), ``target (B, T)``, and how the
    ``(B, H, T, S or K)`` result is shaped back (:func:`_finish_log_lik`)."""

    hidden: Tensor
    values: Tensor
    target: Tensor | None
    gathered: bool
    step: bool
    has_heads: bool


def _check_log_lik(dec_hidden: Tensor, values: Tensor, target: Tensor | None, gathered: bool,
                   hidden_dim: int, memory_dim: int) -> _LogLikArgs:
    """The inputs of ``log_lik`` (either layer), checked and brought to one layout (``target``
    ``None``: not checked, for the normalisers alone).

    :raises ValueError: naming the arguments and shapes on a mismatch.
    """
    step = dec_hidden.dim() == 2
    h = dec_hidden.unsqueeze(1) if step else dec_hidden
    y = target.unsqueeze(1) if step and target is not None and target.dim() == 1 else target
    v = values
    if step and gathered:  # (B, [H,] K, D) per query of one step == per position
        gathered = False
    if h.dim() != 3 or h.shape[-1] != hidden_dim:
        raise ValueError(f"dec_hidden must be (B, T, {hidden_dim}) or (B, {hidden_dim}), got "
                         f"{_shape(dec_hidden)}")
    b, t = h.shape[0], h.shape[1]
    if target is not None and y is not None and (y.shape != (b, t) or y.dtype != torch.long):
        raise ValueError(f"target must be a long tensor {(b, t) if not step else (b,)} for "
                         f"dec_hidden {_shape(dec_hidden)}, got {_shape(target)} {target.dtype}")
    base = 4 if gathered else 3
    if v.dim() not in (base, base + 1) or v.shape[0] != b or v.shape[-1] != memory_dim \
            or (gathered and v.shape[-3] != t):
        want = (f"(B, [H,] T, K, {memory_dim}) with gathered=True" if gathered
                else f"(B, [H,] S, {memory_dim})")
        raise ValueError(f"values must be {want} for dec_hidden {_shape(dec_hidden)}, got "
                         f"{_shape(values)}")
    has_heads = v.dim() == base + 1
    if not has_heads:
        v = v.unsqueeze(1)
    return _LogLikArgs(h, v, y, gathered, step, has_heads)


def _finish_log_lik(out: Tensor, args: _LogLikArgs) -> Tensor:
    """``(B, H, T, S)`` back to the caller's layout: no ``H`` without heads, no ``T`` for one
    step."""
    if not args.has_heads:
        out = out.squeeze(1)
    return out.squeeze(-2) if args.step else out


def _check_log_probs(dec_hidden: Tensor, values: Tensor, probs: Tensor | None,
                     log_prior: Tensor | None, gathered: bool, hidden_dim: int, memory_dim: int
                     ) -> tuple[Tensor, Tensor, Tensor, bool, bool]:
    """The inputs of ``log_probs`` (either layer), checked: ``(hidden (B, T, Dh), values,
    log_prior (B, T, S or K), gathered, step)``, the log prior taken of ``probs`` if those were
    given.

    :raises ValueError: on a shape mismatch, or unless exactly one of ``probs`` and
        ``log_prior`` is given.
    """
    if (probs is None) == (log_prior is None):
        raise ValueError("give exactly one of probs (alignment probabilities) and log_prior "
                         "(their logs, exact where probabilities underflow)")
    given = log_prior if probs is None else probs
    name = "probs" if probs is not None else "log_prior"
    assert given is not None
    step = dec_hidden.dim() == 2
    h = dec_hidden.unsqueeze(1) if step else dec_hidden
    p = given.unsqueeze(1) if step else given
    if step:
        gathered = False
    if h.dim() != 3 or h.shape[-1] != hidden_dim:
        raise ValueError(f"dec_hidden must be (B, T, {hidden_dim}) or (B, {hidden_dim}), got "
                         f"{_shape(dec_hidden)}")
    b, t = h.shape[0], h.shape[1]
    want_dim = 4 if gathered else 3
    if values.dim() != want_dim or values.shape[0] != b \
            or values.shape[-1] != memory_dim or (gathered and values.shape[1] != t):
        want = f"(B, T, K, {memory_dim})" if gathered else f"(B, S, {memory_dim})"
        raise ValueError(f"values must be {want} (single head) for dec_hidden "
                         f"{_shape(dec_hidden)}, got {_shape(values)}")
    s = values.shape[-2]
    if p.shape != (b, t, s):
        raise ValueError(f"{name} must be {(b, s) if step else (b, t, s)} for values "
                         f"{_shape(values)}, got {_shape(given)}")
    return h, values, (p if probs is None else torch.log(p)), gathered, step


# -- the log-linear layer -------------------------------------------------------------------------


class _ExpertsLogMatmul(torch.autograd.Function):
    r""":math:`\log(e^A e^B)` for the two experts' logits, keeping only their exponentials.

    The same shifted product as :func:`plated.rings.log_matmul` (``A`` shifted by its row maxima,
    ``B`` by its column maxima; ``-inf`` slices shift by 0), with a leaner record for the backward
    pass: with :math:`E_a = e^{A - s_a}`, :math:`E_b = e^{B - s_b}` and :math:`P = E_a E_b`,
    :math:`\partial A = E_a \odot ((G / P) E_b^\top)` and :math:`\partial B = E_b \odot
    (E_a^\top (G / P))` (:math:`G / P := 0` where :math:`P = 0`) need :math:`E_a, E_b, P`
    only, so the logits ``A`` and ``B`` are not kept as well (the engine's keeps them for second
    derivatives). Here ``A`` and ``B`` are ``(B, T, V)`` and ``(B, V, S)``, the size of soft
    attention's logits each: two saved tensors of that size instead of four. Broadcasting batch
    dims are summed back in the backward pass. It returns ``C`` and (not differentiable) ``P``,
    which :func:`_experts_log_matmul` checks for underflow.

    Second derivatives are not implemented (the backward pass raises under ``create_graph``).
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, a: Tensor, b: Tensor
                ) -> tuple[Tensor, Tensor]:
        sa = finite_shift(a.amax(dim=-1, keepdim=True))
        sb = finite_shift(b.amax(dim=-2, keepdim=True))
        ea = torch.sub(a, sa).exp_()  # in place on fresh temporaries: one allocation each
        eb = torch.sub(b, sb).exp_()
        p = torch.matmul(ea, eb)
        ctx.save_for_backward(ea, eb, p)
        ctx.shapes = (a.shape, b.shape)  # type: ignore[attr-defined]
        ctx.mark_non_differentiable(p)
        return p.log().add_(sa).add_(sb), p

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, *grads: Tensor
                 ) -> tuple[Tensor | None, Tensor | None]:
        if torch.is_grad_enabled():
            raise RuntimeError("second derivatives of LogLinearOutputLayer's normaliser are not "
                               "implemented; differentiate once (no create_graph=True), or use "
                               "AlignedOutputLayer")
        ea, eb, p = ctx.saved_tensors  # type: ignore[attr-defined]
        a_shape, b_shape = ctx.shapes  # type: ignore[attr-defined]
        want = ctx.needs_input_grad  # type: ignore[attr-defined]
        g = grads[0]  # the raw product is not differentiable
        q = torch.where(p > 0, g / p, torch.zeros_like(g))
        grad_a = grad_b = None
        if want[0]:
            grad_a = torch.matmul(q, eb.transpose(-1, -2)).mul_(ea).sum_to_size(a_shape)
        if want[1]:
            grad_b = torch.matmul(ea.transpose(-1, -2), q).mul_(eb).sum_to_size(b_shape)
        return grad_a, grad_b


def _experts_log_matmul(a: Tensor, b: Tensor) -> Tensor:
    r"""Batched :math:`\log(e^A e^B)`, exact where the shifted product underflows: the entries
    whose shifted sum is under :func:`plated.rings.underflow_threshold` are recomputed by the
    engine's :func:`plated.rings.repair_entries` (a gather of their slices, each shifted by its
    own joint max)."""
    out, raw = _ExpertsLogMatmul.apply(a, b)
    return repair_entries(out, raw, a.unsqueeze(-1), b.unsqueeze(-3), (-2,),
                          lambda: torch.matmul(finite_indicator(a), finite_indicator(b)))


class LogLinearOutputLayer(nn.Module):
    r"""A log-linear output layer: a product of a decoder expert and an alignment expert.

    :math:`p(y \mid h, v) = \mathrm{softmax}(A h + C v + b)`: ``forward`` is the layer on a (soft)
    context; :meth:`log_lik` scores a target word under every hard alignment, with one log-space
    matrix product per sentence for all the normalisers (:meth:`log_normalizer`);
    :meth:`log_probs` gives the alignment-marginal next-word distribution for decoding. See the
    module docstring for the math, the cost and when to choose it over
    :class:`AlignedOutputLayer`.

    :param hidden_dim: ``Dh``, the decoder state size.
    :param memory_dim: ``D``, the size of the values (``LatentAlignmentAttention.value_dim``).
    :param vocab_size: ``V``.
    :param max_bytes: cap on a chunk's working set in :meth:`log_probs` (decoding, where every
        hypothesis has its own ``(S, V)`` alignment expert); training (:meth:`log_lik`) holds a
        few ``(B, T, V)`` and ``(B, H, S, V)`` tensors, the size of soft attention's logits, and
        is not chunked.
    """

    def __init__(self, hidden_dim: int, memory_dim: int, vocab_size: int, *,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        super().__init__()
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.hidden_dim, self.memory_dim, self.vocab_size = hidden_dim, memory_dim, vocab_size
        self.max_bytes = max_bytes
        self.hidden_out = nn.Linear(hidden_dim, vocab_size, bias=True)  # A, b
        self.memory_out = nn.Linear(memory_dim, vocab_size, bias=False)  # C

    def extra_repr(self) -> str:
        return f"max_bytes={self.max_bytes}"

    def forward(self, dec_hidden: Tensor, context: Tensor) -> Tensor:
        """Logits ``(..., V)`` of the layer on a context ``(..., D)``: ``A h + C c + b`` (soft
        attention, or the soft baseline of the paper)."""
        return self.hidden_out(dec_hidden) + self.memory_out(context)

    def _normalizer(self, a: Tensor, v: Tensor, gathered: bool) -> tuple[Tensor, Tensor]:
        r"""The alignment expert and the normaliser of every pair.

        :param a: ``(B, T, V)`` decoder expert :math:`A h_t + b`.
        :param v: ``(B, H, S, D)``, or gathered ``(B, H, T, K, D)``.
        :return: ``(c, log_z)``: the alignment expert laid out as the matrix product's right
            operand, ``(B, V, H * S)`` (gathered ``(B, T, V, H * K)``), and
            :math:`\log \sum_w e^{a_t[w] + c_s[w]}` ``(B, H, T, S or K)``.
        """
        b, heads = v.shape[0], v.shape[1]
        if gathered:
            t, k = v.shape[2], v.shape[3]
            # (B, T, H * K, D) -> (B, T, H * K, V) -> (B, T, V, H * K): no (.., V) copy
            c = self.memory_out(v.transpose(1, 2).reshape(b, t, heads * k, -1)).transpose(-1, -2)
            log_z = _experts_log_matmul(a.unsqueeze(-2), c)  # (B, T, 1, H * K)
            return c, log_z.view(b, t, heads, k).transpose(1, 2)
        s = v.shape[2]
        c = self.memory_out(v.reshape(b, heads * s, -1)).transpose(-1, -2)  # (B, V, H * S)
        log_z = _experts_log_matmul(a, c)  # (B, T, H * S)
        return c, log_z.view(b, -1, heads, s).transpose(1, 2)

    def log_normalizer(self, dec_hidden: Tensor, values: Tensor, *,
                       gathered: bool = False) -> Tensor:
        r""":math:`\log \sum_w \exp(a_t[w] + c_s[w])` for every alignment: one log-space matrix
        product ``(T, V)`` by ``(V, [H *] S)`` per sentence.

        :param dec_hidden: ``(B, T, Dh)`` (or ``(B, Dh)``: one step).
        :param values: as in :meth:`log_lik`.
        :return: ``(B, [H,] T, S or K)`` (``T`` absent for one step).
        :raises ValueError: naming the arguments and shapes on a mismatch.
        """
        args = _check_log_lik(dec_hidden, values, None, gathered, self.hidden_dim,
                              self.memory_dim)
        _, log_z = self._normalizer(self.hidden_out(args.hidden), args.values, args.gathered)
        return _finish_log_lik(log_z, args)

    def log_lik(self, dec_hidden: Tensor, values: Tensor, target: Tensor, *,
                gathered: bool = False) -> Tensor:
        r""":math:`\log p(y_t \mid x, z_t = s) = a_t[y_t] + c_s[y_t] - \log \sum_w
        e^{a_t[w] + c_s[w]}` for every alignment.

        Work: the two experts (``(B T + B H S) D V``), the normalisers (one ``(T, V)`` by
        ``(V, H S)`` log-space product per sentence, :meth:`log_normalizer`) and the target
        words' scores from the rows of :math:`A` and :math:`C` at the targets (``B H T S D``).
        Memory: the experts and their shifted exponentials (two tensors each, ``(B, T, V)``
        and ``(B, H S, V)``), the ``(B, H, T, S)`` results; nothing of shape
        ``(B, T, S, V)``.

        :param dec_hidden: ``(B, T, Dh)`` decoder states (or ``(B, Dh)``: one step, no ``T``).
        :param values: the vectors of each alignment: ``(B, [H,] S, D)`` per source position
            (``AttentionOutput.values``), or with ``gathered=True`` ``(B, [H,] T, K, D)`` per
            query (the sampled values of the REINFORCE step, or K-max's ``topk_values``; for
            K-max the full ``(B, [H,] T, S)`` result and ``AttentionOutput.gather_topk`` cost
            about the same here, since the normalisers of all ``S`` positions are one matrix
            product).
        :param target: ``(B, T)`` (or ``(B,)``) word ids in ``[0, V)``, padding included (mask
            padded target positions out of the loss yourself).
        :param gathered: whether ``values`` is per query (see above).
        :return: ``(B, [H,] T, S or K)`` (``T`` absent for one step).
        :raises ValueError: naming the arguments and shapes on a mismatch.
        """
        args = _check_log_lik(dec_hidden, values, target, gathered, self.hidden_dim,
                              self.memory_dim)
        h, v, y = args.hidden, args.values, args.target
        assert y is not None
        a = self.hidden_out(h)  # (B, T, V)
        _, log_z = self._normalizer(a, v, args.gathered)  # (B, H, T, S or K)
        # the target word's logits from the rows of A and C at y: no gather from (.., V)
        a_y = (nn.functional.embedding(y, self.hidden_out.weight) * h).sum(-1) \
            + self.hidden_out.bias[y]  # (B, T)
        c_rows = nn.functional.embedding(y, self.memory_out.weight)  # (B, T, D)
        if args.gathered:
            c_y = (v @ c_rows[:, None, :, :, None]).squeeze(-1)  # (B, H, T, K)
        else:
            c_y = c_rows.unsqueeze(1) @ v.transpose(-1, -2)  # (B, H, T, S)
        return _finish_log_lik(a_y[:, None, :, None] + c_y - log_z, args)

    def log_probs_and_normalizer(self, dec_hidden: Tensor, values: Tensor,
                                 probs: Tensor | None = None, *,
                                 log_prior: Tensor | None = None, gathered: bool = False,
                                 max_bytes: int | None = None) -> tuple[Tensor, Tensor]:
        r""":meth:`log_probs` and the normalisers :math:`\log Z_{t,s}` it computed on the way,
        ``(B, [T,] S or K)`` (what a Markov prior's filter needs next step)."""
        h, values, log_p, gathered, step = _check_log_probs(
            dec_hidden, values, probs, log_prior, gathered, self.hidden_dim, self.memory_dim)
        b, t, s = log_p.shape
        cap = self.max_bytes if max_bytes is None else max_bytes
        if cap < 1:
            raise ValueError(f"max_bytes must be >= 1, got {cap}")
        itemsize = h.element_size()
        per_row = WORK_FACTOR * ((t * s if gathered else s) + t) * self.vocab_size * itemsize
        rows = max(1, cap // per_row)  # sentences per chunk
        outs, norms = [], []
        for b0 in range(0, b, rows):
            hb, vb, lp = h[b0:b0 + rows], values[b0:b0 + rows], log_p[b0:b0 + rows]
            a = self.hidden_out(hb)  # (n, T, V)
            if gathered:  # c: (n, T, V, K), log_z: (n, 1, T, K)
                c, log_z = self._normalizer(a, vb.unsqueeze(1), True)
                mix = log_matmul((lp - log_z[:, 0]).unsqueeze(-2), c.transpose(-1, -2))
                mix = mix.squeeze(-2)  # (n, T, V)
            else:  # c: (n, V, S), log_z: (n, 1, T, S)
                c, log_z = self._normalizer(a, vb.unsqueeze(1), False)
                mix = log_matmul(lp - log_z[:, 0], c.transpose(-1, -2))  # (n, T, V)
            outs.append(a + mix)
            norms.append(log_z[:, 0])
        res, norm = torch.cat(outs), torch.cat(norms)
        return (res.squeeze(1), norm.squeeze(1)) if step else (res, norm)

    def log_probs(self, dec_hidden: Tensor, values: Tensor, probs: Tensor | None = None, *,
                  log_prior: Tensor | None = None, gathered: bool = False,
                  max_bytes: int | None = None) -> Tensor:
        r""":math:`\log \sum_s p(z = s)\, p(y \mid x, z = s)` for every word ``y``:
        :math:`a_t[y] + \log \sum_s e^{\log p(z = s) - \log Z_{t,s} + c_s[y]}`, a second
        log-space matrix product ``(T, S)`` by ``(S, V)`` per sentence (exact where it
        underflows: :func:`plated.rings.log_matmul`).

        The next-word distribution of a latent-alignment decoder (for beam search). Single head
        only, arguments, result and errors as for :meth:`AlignedOutputLayer.log_probs`;
        ``max_bytes`` caps a chunk of sentences (each with its ``(S, V)`` expert).
        """
        return self.log_probs_and_normalizer(dec_hidden, values, probs, log_prior=log_prior,
                                             gathered=gathered, max_bytes=max_bytes)[0]


#: Either per-alignment output layer.
OutputLayer = AlignedOutputLayer | LogLinearOutputLayer


def make_output_layer(kind: OutputLayerName, hidden_dim: int, memory_dim: int, vocab_size: int,
                      *, max_bytes: int = DEFAULT_MAX_BYTES) -> OutputLayer:
    """A per-alignment output layer by name.

    :param kind: one of :data:`~attention.typing.OUTPUT_LAYERS`: ``"luong"`` (the paper's tanh
        layer, :class:`AlignedOutputLayer`) or ``"log-linear"`` (:class:`LogLinearOutputLayer`);
        the module docstring says when to choose which.
    :raises ValueError: on an unknown name.
    """
    if kind == "luong":
        return AlignedOutputLayer(hidden_dim, memory_dim, vocab_size, max_bytes=max_bytes)
    if kind == "log-linear":
        return LogLinearOutputLayer(hidden_dim, memory_dim, vocab_size, max_bytes=max_bytes)
    raise ValueError(f"output layer must be one of {OUTPUT_LAYERS}, got {kind!r}")
