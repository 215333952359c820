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
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["DEFAULT_MAX_BYTES", "KEEP_FACTOR", "WORK_FACTOR", "AlignedOutputLayer"]

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
        step = dec_hidden.dim() == 2
        h = dec_hidden.unsqueeze(1) if step else dec_hidden
        y = target.unsqueeze(1) if step and target.dim() == 1 else target
        v = values
        if step and gathered:  # (B, [H,] K, D) per query of one step == per position
            gathered = False
        if h.dim() != 3 or h.shape[-1] != self.hidden_dim:
            raise ValueError(f"dec_hidden must be (B, T, {self.hidden_dim}) or "
                             f"(B, {self.hidden_dim}), got {_shape(dec_hidden)}")
        b, t = h.shape[0], h.shape[1]
        if y.shape != (b, t) or y.dtype != torch.long:
            raise ValueError(f"target must be a long tensor {(b, t) if not step else (b,)} for "
                             f"dec_hidden {_shape(dec_hidden)}, got {_shape(target)} "
                             f"{target.dtype}")
        base = 4 if gathered else 3
        if v.dim() not in (base, base + 1) or v.shape[0] != b or v.shape[-1] != self.memory_dim \
                or (gathered and v.shape[-3] != t):
            want = (f"(B, [H,] T, K, {self.memory_dim}) with gathered=True" if gathered
                    else f"(B, [H,] S, {self.memory_dim})")
            raise ValueError(f"values must be {want} for dec_hidden {_shape(dec_hidden)}, got "
                             f"{_shape(values)}")
        has_heads = v.dim() == base + 1
        if not has_heads:
            v = v.unsqueeze(1)
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
        out = flat.view(b, heads, t, s)
        if not has_heads:
            out = out.squeeze(1)
        return out.squeeze(-2) if step else out

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
        if h.dim() != 3 or h.shape[-1] != self.hidden_dim:
            raise ValueError(f"dec_hidden must be (B, T, {self.hidden_dim}) or "
                             f"(B, {self.hidden_dim}), got {_shape(dec_hidden)}")
        b, t = h.shape[0], h.shape[1]
        want_dim = 4 if gathered else 3
        if values.dim() != want_dim or values.shape[0] != b \
                or values.shape[-1] != self.memory_dim or (gathered and values.shape[1] != t):
            want = (f"(B, T, K, {self.memory_dim})" if gathered
                    else f"(B, S, {self.memory_dim})")
            raise ValueError(f"values must be {want} (single head) for dec_hidden "
                             f"{_shape(dec_hidden)}, got {_shape(values)}")
        s = values.shape[-2]
        if p.shape != (b, t, s):
            raise ValueError(f"{name} must be {(b, s) if step else (b, t, s)} for values "
                             f"{_shape(values)}, got {_shape(given)}")
        hid = self.hidden_proj(h).reshape(b * t, 1, self.proj_dim)
        val = self.memory_proj(values)  # (B, S, P) or (B, T, K, P)
        val = val.reshape(b * t, s, self.proj_dim) if gathered else val
        log_p = (p if probs is None else torch.log(p)).reshape(b * t, s).unsqueeze(-1)
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
