r"""``nn.Module`` faces of latent-alignment attention (Deng et al., 2018): drop-in soft attention.

The modules are thin: they compute scores, mask and normalise them and hand them, with the
decoder's per-alignment log-likelihoods, to :mod:`attention.objectives`, where the math lives.

* **Scores** map a query ``(B, T, Dq)`` and a memory ``(B, S, Dm)`` to scores ``(B, T, S)``
  (any leading dims, as long as they broadcast): :class:`AdditiveScore` (Bahdanau et al., 2015),
  :class:`DotScore` and :class:`GeneralScore` (Luong et al., 2015), :class:`BilinearScore`;
  :func:`make_score` builds one by name.
* :class:`LatentAlignmentAttention` is the attention layer of a seq2seq decoder. In ``"soft"``
  mode it *is* soft attention. In the latent modes it exposes the alignment prior
  :math:`p(z \mid x)`, the vectors :math:`v_s` whose selection forms the context of a hard
  alignment, the posterior and the loss of :func:`attention.objectives.alignment_loss`.
* :class:`AlignmentInferenceNetwork` is the paper's :math:`q(z \mid x, y)`: a bidirectional LSTM
  over the target, bilinear scores against the source memory.
* :func:`topk_alignments` is K-max: the K best positions under the prior.

**Plain torch or engine.** ``forward`` is plain torch in every mode: scores, the masks, the
prior's normalisation (``probs``; in the latent modes also ``log_probs``, which the loss reuses)
and the soft context. ``"soft"`` mode is plain torch throughout. In the latent modes
:meth:`LatentAlignmentAttention.loss` applies no mask to the prior or the posterior (``forward``
did) and one to the log-likelihoods, and then:

* ``"marginal"`` -- one engine query, the ``log_partition`` of :math:`\{\log p(z), \ell_z\}`;
* ``"hard-enum"`` -- plain torch (the expectation under ``forward``'s prior);
* ``"variational-enum"`` -- one engine query, the normaliser of :math:`q`; the expectation and
  the KL are plain torch;
* ``"hard-sample"``, ``"variational-sample"`` -- the engine's ``sample`` (and :math:`q`'s
  normaliser), a plain-torch surrogate;
* ``"gumbel"`` -- plain torch (and :math:`q`'s normaliser when given);
* with ``k_max`` the truncated prior is renormalised by one more engine query.

:meth:`LatentAlignmentAttention.posterior` is an engine ``marginals`` query,
:meth:`LatentAlignmentAttention.sample` an engine ``sample`` and
:meth:`LatentAlignmentAttention.relaxed_context` plain torch.

Shapes: ``B`` batch, ``T`` target (query) positions, ``S`` source (memory) positions, ``H``
heads, ``K`` the K of K-max. ``[H,]`` is present only when ``heads > 1``; ``[T,]`` is absent when
the query is one decoding step ``(B, Dq)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .checks import check_scores, shape_of
from .dirichlet import dirichlet_alignment, dirichlet_kl
from .estimators import EMABaseline
from .factors import AlignmentFactors
from .objectives import evaluate, objective_for, split_sampled
from .queries import alignment_posterior, sample_alignments
from .typing import ATTENTION_MODES, SCORE_KINDS, AttentionMode, BaselineName, ScoreKind

__all__ = [
    "ATTENTION_MODES",
    "SCORE_KINDS",
    "AdditiveScore",
    "AlignmentInferenceNetwork",
    "AttentionMode",
    "AttentionOutput",
    "BilinearScore",
    "DotScore",
    "GeneralScore",
    "LatentAlignmentAttention",
    "ScoreKind",
    "make_score",
    "topk_alignments",
]

_VARIATIONAL = ("variational-enum", "variational-sample")


def _check_pair(query: Tensor, memory: Tensor, query_dim: int, memory_dim: int) -> None:
    """Check a score's inputs: ``query (..., T, query_dim)`` and ``memory (..., S, memory_dim)``.

    :raises ValueError: naming both shapes.
    """
    if query.dim() < 2 or memory.dim() < 2:
        raise ValueError(f"query must be (..., T, {query_dim}) and memory (..., S, {memory_dim}); "
                         f"got query {shape_of(query)} and memory {shape_of(memory)}")
    if query.shape[-1] != query_dim or memory.shape[-1] != memory_dim:
        raise ValueError(f"query must end in query_dim={query_dim} and memory in "
                         f"memory_dim={memory_dim}; got query {shape_of(query)} and memory "
                         f"{shape_of(memory)}")


# -- scores ---------------------------------------------------------------------------------------


class AdditiveScore(nn.Module):
    r"""Bahdanau (additive, "concat") score :math:`v^\top \tanh(W_q q_t + W_m m_s + b)`.

    Materialises a ``(..., T, S, hidden)`` tensor.

    :param query_dim: ``Dq``. :param memory_dim: ``Dm``. :param hidden: the size of the tanh layer.
    """

    def __init__(self, query_dim: int, memory_dim: int, hidden: int) -> None:
        super().__init__()
        self.query_dim, self.memory_dim, self.hidden = query_dim, memory_dim, hidden
        self.query_proj = nn.Linear(query_dim, hidden, bias=False)
        self.memory_proj = nn.Linear(memory_dim, hidden, bias=True)
        self.v = nn.Linear(hidden, 1, bias=False)

    def forward(self, query: Tensor, memory: Tensor) -> Tensor:
        """``query (..., T, Dq)``, ``memory (..., S, Dm)`` -> scores ``(..., T, S)``."""
        _check_pair(query, memory, self.query_dim, self.memory_dim)
        q = self.query_proj(query).unsqueeze(-2)  # (..., T, 1, h)
        m = self.memory_proj(memory).unsqueeze(-3)  # (..., 1, S, h)
        return self.v(torch.tanh(q + m)).squeeze(-1)


class DotScore(nn.Module):
    r"""Luong dot score :math:`q_t^\top m_s`, or :math:`q_t^\top m_s / \sqrt{d}` with ``scale``.

    :param dim: ``Dq = Dm = d``. :param scale: divide by :math:`\sqrt{d}` (Vaswani et al., 2017).
    """

    def __init__(self, dim: int, scale: bool = False) -> None:
        super().__init__()
        self.query_dim = self.memory_dim = dim
        self.scale = scale
        self.factor = 1.0 / math.sqrt(dim) if scale else 1.0

    def forward(self, query: Tensor, memory: Tensor) -> Tensor:
        """``query (..., T, d)``, ``memory (..., S, d)`` -> scores ``(..., T, S)``."""
        _check_pair(query, memory, self.query_dim, self.memory_dim)
        scores = query @ memory.transpose(-1, -2)
        return scores * self.factor if self.scale else scores


class GeneralScore(nn.Module):
    r"""Luong general score :math:`q_t^\top W m_s`, :math:`W \in \mathbb{R}^{D_q \times D_m}`
    (stored as ``self.proj``, an ``nn.Linear(Dm, Dq, bias=False)``: ``proj(m) = W m``)."""

    def __init__(self, query_dim: int, memory_dim: int) -> None:
        super().__init__()
        self.query_dim, self.memory_dim = query_dim, memory_dim
        self.proj = nn.Linear(memory_dim, query_dim, bias=False)

    def forward(self, query: Tensor, memory: Tensor) -> Tensor:
        """``query (..., T, Dq)``, ``memory (..., S, Dm)`` -> scores ``(..., T, S)``."""
        _check_pair(query, memory, self.query_dim, self.memory_dim)
        return query @ self.proj(memory).transpose(-1, -2)


class BilinearScore(nn.Module):
    r"""Full bilinear score :math:`q_t^\top W m_s + u^\top q_t + v^\top m_s + b`.

    ``self.proj`` holds :math:`W` (as in :class:`GeneralScore`), ``self.query_bias`` holds
    :math:`u` and :math:`b` (``nn.Linear(Dq, 1)``), ``self.memory_bias`` holds :math:`v`.
    """

    def __init__(self, query_dim: int, memory_dim: int) -> None:
        super().__init__()
        self.query_dim, self.memory_dim = query_dim, memory_dim
        self.proj = nn.Linear(memory_dim, query_dim, bias=False)
        self.query_bias = nn.Linear(query_dim, 1, bias=True)
        self.memory_bias = nn.Linear(memory_dim, 1, bias=False)

    def forward(self, query: Tensor, memory: Tensor) -> Tensor:
        """``query (..., T, Dq)``, ``memory (..., S, Dm)`` -> scores ``(..., T, S)``."""
        _check_pair(query, memory, self.query_dim, self.memory_dim)
        scores = query @ self.proj(memory).transpose(-1, -2)
        return scores + self.query_bias(query) + self.memory_bias(memory).transpose(-1, -2)


def make_score(kind: ScoreKind, query_dim: int, memory_dim: int,
               hidden: int | None = None) -> nn.Module:
    """A score module by name.

    :param kind: one of :data:`~attention.typing.SCORE_KINDS`: ``"additive"``
        (:class:`AdditiveScore`, ``hidden`` defaults to ``memory_dim``), ``"dot"`` /
        ``"scaled-dot"`` (:class:`DotScore`, needs ``query_dim == memory_dim``), ``"general"``
        (:class:`GeneralScore`), ``"bilinear"`` (:class:`BilinearScore`).
    :param hidden: the tanh layer of ``"additive"``; must be ``None`` for the others.
    :raises ValueError: on an unknown kind, a ``hidden`` the kind does not use, or mismatched
        dims for a dot score.
    """
    if kind not in SCORE_KINDS:
        raise ValueError(f"score kind must be one of {SCORE_KINDS}, got {kind!r}")
    if hidden is not None and kind != "additive":
        raise ValueError(f"hidden={hidden} is only used by the 'additive' score, not {kind!r}; "
                         "leave it None")
    if kind == "additive":
        return AdditiveScore(query_dim, memory_dim, memory_dim if hidden is None else hidden)
    if kind in ("dot", "scaled-dot"):
        if query_dim != memory_dim:
            raise ValueError(f"a {kind!r} score needs query_dim == memory_dim, got {query_dim} "
                             f"and {memory_dim}; use 'general' or 'bilinear', or project first")
        return DotScore(query_dim, scale=kind == "scaled-dot")
    if kind == "general":
        return GeneralScore(query_dim, memory_dim)
    return BilinearScore(query_dim, memory_dim)


# -- K-max ----------------------------------------------------------------------------------------


def topk_alignments(prior_logits: Tensor, mask: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
    """K-max: the ``k`` most probable positions under the prior, best first.

    :param prior_logits: ``(..., S)`` unnormalised prior scores.
    :param mask: ``(..., S)`` (broadcastable) bool, ``True`` for real positions, or ``None``.
    :param k: ``K >= 1``; clamped to ``S`` (so a short batch just enumerates everything).
    :return: ``indices (..., K)`` long and ``kmask (..., K)`` bool, ``False`` where a query has
        fewer than ``K`` real positions (those indices point at masked positions; ignore them).
    :raises ValueError: on ``k < 1`` or a mask that does not broadcast.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    k = min(k, prior_logits.shape[-1])
    logits = prior_logits.detach()
    if mask is None:
        return logits.topk(k, dim=-1).indices, torch.ones(
            logits.shape[:-1] + (k,), dtype=torch.bool, device=logits.device)
    try:
        mask = mask.expand(logits.shape)
    except RuntimeError as e:
        raise ValueError(f"mask {shape_of(mask)} does not broadcast to prior_logits "
                         f"{shape_of(logits)}") from e
    indices = logits.masked_fill(~mask, -math.inf).topk(k, dim=-1).indices
    return indices, mask.gather(-1, indices)


# -- the attention layer --------------------------------------------------------------------------


class AttentionOutput(NamedTuple):
    """What :meth:`LatentAlignmentAttention.forward` returns (``[T,]`` absent for a one-step query).

    :ivar context: ``(B, [T,] Dout)``: the attention context. Soft mode: the softmax-weighted
        memory. Latent modes: the same prior-expected context :math:`\\sum_s p(z=s) v_s` (the
        soft-attention baseline of the paper, and what input feeding uses).
    :ivar probs: ``(B, [H,] [T,] S)`` alignment probabilities :math:`p(z \\mid x)`; exactly 0 at
        masked positions, all 0 for a query without any real position.
    :ivar prior_logits: ``(B, [H,] [T,] S)`` scores, ``-inf`` at masked positions.
    :ivar mask: ``(B, [H,] [T,] S)`` bool, ``True`` for real positions.
    :ivar values: ``(B, [H,] S, D)``: the vector :math:`v_s` whose selection is the context of the
        hard alignment :math:`z = s` (the memory itself when ``heads == 1``; per-head value
        projections otherwise). Score each alignment with e.g.
        :meth:`attention.output.AlignedOutputLayer.log_lik` or
        :meth:`attention.output.LogLinearOutputLayer.log_lik`.
    :ivar posterior_logits: ``(B, [H,] [T,] S)`` scores of :math:`q(z)` (``-inf`` where masked),
        when given to ``forward``.
    :ivar topk_indices: K-max only: ``(B, [H,] [T,] K)`` the K best positions under the prior.
    :ivar topk_mask: K-max only: ``(B, [H,] [T,] K)`` bool, ``False`` for padding picks.
    :ivar topk_values: K-max only: ``(B, [H,] [T,] K, D)`` the values at ``topk_indices``.
    :ivar log_probs: latent modes: ``(B, [H,] [T,] S)`` :math:`\\log p(z \\mid x)`, normalised
        by ``forward`` in torch (``probs`` is its ``exp``): ``-inf`` at masked positions, all
        ``-inf`` for a query without any real position. :meth:`LatentAlignmentAttention.loss`
        uses it as the prior instead of normalising ``prior_logits`` again. ``None`` in
        ``"soft"`` mode and in an output built without it (whose loss then normalises
        ``prior_logits``).
    """

    context: Tensor
    probs: Tensor
    prior_logits: Tensor
    mask: Tensor
    values: Tensor
    posterior_logits: Tensor | None = None
    topk_indices: Tensor | None = None
    topk_mask: Tensor | None = None
    topk_values: Tensor | None = None
    log_probs: Tensor | None = None

    def gather_topk(self, x: Tensor) -> Tensor:
        """Select the K-max positions of ``x (..., S)`` -> ``(..., K)`` (e.g. a ``log_lik``
        computed over every position)."""
        if self.topk_indices is None:
            raise ValueError("gather_topk needs an output of a module with k_max set")
        idx = self.topk_indices
        return x.expand(idx.shape[:-1] + x.shape[-1:]).gather(-1, idx)


class LatentAlignmentAttention(nn.Module):
    r"""Attention with a latent alignment, drop-in for soft attention in a seq2seq decoder.

    The model (Deng et al., 2018, eq. 1): target word :math:`y_t` is explained by one source
    position :math:`z_t`, drawn from the attention distribution,

    .. math::

        p(z_t = s \mid x) = \mathrm{softmax}_s\, \mathrm{score}(q_t, m_s), \qquad
        p(y \mid x) = \prod_t \sum_s p(z_t = s \mid x)\, p(y_t \mid x, z_t = s).

    ``forward`` computes the prior and the soft context; the decoder computes
    :math:`\ell_{t,s} = \log p(y_t \mid x, z_t = s)` from ``values`` (e.g. with
    :class:`attention.output.AlignedOutputLayer`, or the cheaper
    :class:`attention.output.LogLinearOutputLayer`) and :meth:`loss` turns it into the objective of
    ``mode``. In ``"soft"`` mode the layer is exactly soft attention (masked softmax, then the
    weighted sum of the memory) and its loss is the decoder's ordinary cross-entropy.

    **Heads are a plate.** With ``heads = H > 1`` the query and memory are projected per head
    (as in :class:`torch.nn.MultiheadAttention`: ``q_proj``, ``k_proj``, ``v_proj`` to
    ``head_dim`` each, ``out_proj`` for the context) and each head :math:`h` has its own
    alignment :math:`z_{t,h}` with prior :math:`p_h(z \mid x)`. The model the loss is exact for
    is

    .. math::

        p(y_t, z_{t,1..H} \mid x) \propto \prod_h p_h(z_{t,h} \mid x)\, p_h(y_t \mid x, z_{t,h}),

    i.e. a likelihood that *factorizes over heads* (each head's value explains :math:`y_t` by its
    own output distribution, a product of experts). Alignments are then independent across heads
    given :math:`(x, y)`, the joint sum over :math:`S^H` alignments factorizes into :math:`H`
    sums over :math:`S`, and :math:`-\log` of the (unnormalised over :math:`y`) joint marginal
    is :math:`\sum_h -\log \sum_s p_h(z=s)\, p_h(y_t \mid z=s)`: ``loss(...).sum(1)``. Every
    objective is the sum of its per-head versions (cost :math:`H \cdot S`, not :math:`S^H`).
    The standard multi-head *soft* attention (one softmax over the concatenated head contexts)
    does not factorize this way and is only available in ``"soft"`` mode.

    **K-max** (``k_max = K``): the loss and the output layer see only the :math:`K` most probable
    positions under the prior (:func:`topk_alignments`, at training and test time), and the
    prior is *truncated*: renormalised over those :math:`K`,
    :math:`\tilde p(z) = p(z) / \sum_{z' \in \text{top-}K} p(z')`. Variational posteriors are
    truncated to the same :math:`K` positions. The output layer then costs :math:`K` instead of
    :math:`S` per target word; with :math:`K = S` everything equals full enumeration. The
    objective under the truncated prior is neither a bound on nor equal to the full one (it is
    the full objective of a model whose prior is :math:`\tilde p`). ``context`` and ``probs``
    stay those of the full prior.

    :param query_dim: ``Dq``, the decoder state size.
    :param memory_dim: ``Dm``, the encoder state size.
    :param score: a name of :data:`~attention.typing.SCORE_KINDS` or a score module (maps
        ``(..., T, Dq')`` and ``(..., S, Dm')`` to ``(..., T, S)``, where
        ``Dq' = Dm' = head_dim`` when ``heads > 1``).
    :param heads: ``H``.
    :param mode: one of :data:`~attention.typing.ATTENTION_MODES`.
    :param score_hidden: the tanh layer of an ``"additive"`` score.
    :param head_dim: per-head size of the query/key/value projections (``heads > 1`` only;
        default ``memory_dim // heads``).
    :param out_dim: size of the multi-head context (``out_proj``; default ``memory_dim``).
    :param k_max: K of K-max (latent modes only), or ``None`` to enumerate every position.
    :raises ValueError: on an unknown mode, bad sizes or ``k_max`` with ``"soft"``.
    """

    def __init__(self, query_dim: int, memory_dim: int, *, score: ScoreKind | nn.Module = "general",
                 heads: int = 1, mode: AttentionMode = "soft", score_hidden: int | None = None,
                 head_dim: int | None = None, out_dim: int | None = None,
                 k_max: int | None = None) -> None:
        super().__init__()
        if mode not in ATTENTION_MODES:
            raise ValueError(f"mode must be one of {ATTENTION_MODES}, got {mode!r}")
        if not isinstance(heads, int) or heads < 1:
            raise ValueError(f"heads must be an int >= 1, got {heads!r}")
        if k_max is not None and (not isinstance(k_max, int) or k_max < 1):
            raise ValueError(f"k_max must be None or an int >= 1, got {k_max!r}")
        if k_max is not None and mode == "soft":
            raise ValueError("k_max restricts the latent alignment; it has no meaning with "
                             "mode='soft' (use a latent mode such as 'marginal')")
        self.query_dim, self.memory_dim, self.heads = query_dim, memory_dim, heads
        self.mode: AttentionMode = mode
        self.k_max = k_max
        if heads == 1:
            if head_dim is not None or out_dim is not None:
                raise ValueError("head_dim and out_dim are for heads > 1; with heads=1 the "
                                 "values and the context are the memory itself")
            self.head_dim, self.value_dim, self.out_dim = 0, memory_dim, memory_dim
            score_dims = (query_dim, memory_dim)
            self.q_proj: nn.Linear | None = None
            self.k_proj: nn.Linear | None = None
            self.v_proj: nn.Linear | None = None
            self.out_proj: nn.Linear | None = None
        else:
            if head_dim is None:
                if memory_dim % heads:
                    raise ValueError(f"memory_dim={memory_dim} is not divisible by heads={heads}; "
                                     "pass head_dim")
                head_dim = memory_dim // heads
            self.head_dim = self.value_dim = head_dim
            self.out_dim = memory_dim if out_dim is None else out_dim
            score_dims = (head_dim, head_dim)
            self.q_proj = nn.Linear(query_dim, heads * head_dim)
            self.k_proj = nn.Linear(memory_dim, heads * head_dim)
            self.v_proj = nn.Linear(memory_dim, heads * head_dim)
            self.out_proj = nn.Linear(heads * head_dim, self.out_dim)
        if isinstance(score, nn.Module):
            self.score: nn.Module = score
        else:
            self.score = make_score(score, *score_dims, hidden=score_hidden)

    def extra_repr(self) -> str:
        return (f"query_dim={self.query_dim}, memory_dim={self.memory_dim}, heads={self.heads}, "
                f"mode={self.mode!r}, k_max={self.k_max}")

    def _split(self, x: Tensor, proj: nn.Linear) -> Tensor:
        """Project ``x`` ``(B, L, D)`` by ``proj``, split into heads: ``(B, H, L, head_dim)``."""
        batch, length, _ = x.shape
        return proj(x).view(batch, length, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, query: Tensor, memory: Tensor, mask: Tensor | None = None,
                posterior_logits: Tensor | None = None) -> AttentionOutput:
        """Attend from ``query`` to ``memory``.

        :param query: ``(B, T, Dq)``, or ``(B, Dq)`` for one decoding step (then every output
            drops its ``T`` dim).
        :param memory: ``(B, S, Dm)``.
        :param mask: ``(B, S)`` or ``(B, T, S)`` bool, ``True`` for real source positions.
        :param posterior_logits: scores of :math:`q(z \\mid x, y)` (e.g. from
            :class:`AlignmentInferenceNetwork`), shaped like the output's ``prior_logits``
            (``(B, [H,] [T,] S)``); masked here. Required by the variational modes' loss.
        :return: an :class:`AttentionOutput`.
        :raises ValueError: naming the argument and the shapes on any mismatch.
        """
        if query.dim() not in (2, 3) or memory.dim() != 3:
            raise ValueError(f"query must be (B, T, Dq) or (B, Dq) and memory (B, S, Dm); got "
                             f"query {shape_of(query)} and memory {shape_of(memory)}")
        step = query.dim() == 2
        queries = query.unsqueeze(1) if step else query  # (B, T, Dq)
        batch, tgt_len, src_len = queries.shape[0], queries.shape[1], memory.shape[1]
        if queries.shape[-1] != self.query_dim or memory.shape[-1] != self.memory_dim \
                or memory.shape[0] != batch:
            raise ValueError(f"query must be (B, [T,] {self.query_dim}) and memory "
                             f"(B, S, {self.memory_dim}) with the same B; got query "
                             f"{shape_of(query)} and memory {shape_of(memory)}")
        # scores (B, [H,] T, S) and values (B, [H,] S, D)
        if self.heads == 1:
            scores = self.score(queries, memory)
            values = memory
        else:
            assert self.q_proj is not None and self.k_proj is not None
            assert self.v_proj is not None
            scores = self.score(self._split(queries, self.q_proj), self._split(memory, self.k_proj))
            values = self._split(memory, self.v_proj)
        if mask is None:
            full_mask = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
        else:
            full_mask = self._expand_mask(mask, query, batch, tgt_len, src_len).expand(scores.shape)
        masked = ~full_mask
        logits = scores.masked_fill(masked, -math.inf)
        # Normalise without NaN for rows with no real position: masked scores at the most
        # negative finite value (exp underflows to exactly 0 next to any real score; a row
        # without one is normalised over constants), so no -inf - -inf, forward or backward.
        finite = scores.masked_fill(masked, torch.finfo(scores.dtype).min)
        log_probs: Tensor | None = None
        if self.mode == "soft":  # soft attention, exactly: probs all 0 in a row without one
            probs = torch.softmax(finite, dim=-1) * full_mask
        else:  # the prior normalised once, here; the loss reuses it
            log_probs = torch.log_softmax(finite, dim=-1).masked_fill(masked, -math.inf)
            probs = log_probs.exp()
        context = probs @ values  # (B, [H,] T, D)
        if self.heads > 1:
            assert self.out_proj is not None
            context = self.out_proj(context.transpose(1, 2).reshape(batch, tgt_len, -1))
        post = None
        if posterior_logits is not None:
            want = logits.shape[:-2] + logits.shape[-1:] if step else logits.shape
            if posterior_logits.shape != want:
                raise ValueError(f"posterior_logits must be {tuple(want)} (like prior_logits), got "
                                 f"{shape_of(posterior_logits)}")
            posterior = posterior_logits.unsqueeze(-2) if step else posterior_logits
            post = posterior.masked_fill(masked, -math.inf)
        topk_idx = topk_mask = topk_values = None
        if self.k_max is not None:
            topk_idx, topk_mask = topk_alignments(logits, full_mask, self.k_max)
            value_dim = values.shape[-1]
            # (B, [H,] S, D) -> (B, [H,] T, K, D), gathering from a broadcast view
            spread = values.unsqueeze(-3).expand(values.shape[:-2] + (tgt_len, src_len, value_dim))
            topk_values = spread.gather(
                -2, topk_idx.unsqueeze(-1).expand(topk_idx.shape + (value_dim,)))
        out = AttentionOutput(context, probs, logits, full_mask, values, post, topk_idx,
                              topk_mask, topk_values, log_probs)
        return self._squeeze_step(out) if step else out

    def _expand_mask(self, mask: Tensor, query: Tensor, batch: int, tgt_len: int, src_len: int
                     ) -> Tensor:
        """The user's mask ``(B, S)`` or ``(B, T, S)`` as ``(B, [1,] T or 1, S)``, broadcastable
        to the scores.

        :raises ValueError: if it is not bool or has another shape.
        """
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor (True = real position), got {mask.dtype}")
        if mask.shape == (batch, src_len):
            expanded = mask.unsqueeze(1)
        elif query.dim() == 3 and mask.shape == (batch, tgt_len, src_len):
            expanded = mask
        else:
            allowed = f"({batch}, {src_len})" + (
                f" or ({batch}, {tgt_len}, {src_len})" if query.dim() == 3 else "")
            raise ValueError(f"mask must be {allowed} for query {shape_of(query)}, got "
                             f"{shape_of(mask)}")
        return expanded.unsqueeze(1) if self.heads > 1 else expanded

    @staticmethod
    def _squeeze_step(out: AttentionOutput) -> AttentionOutput:
        """``out`` of a one-step query ``(B, Dq)`` without its ``T = 1`` dim, field by field."""
        def sq(x: Tensor | None, dim: int) -> Tensor | None:
            """``x`` without ``dim``, or ``None``."""
            return None if x is None else x.squeeze(dim)

        return AttentionOutput(
            out.context.squeeze(1), out.probs.squeeze(-2), out.prior_logits.squeeze(-2),
            out.mask.squeeze(-2), out.values, sq(out.posterior_logits, -2),
            sq(out.topk_indices, -2), sq(out.topk_mask, -2), sq(out.topk_values, -3),
            sq(out.log_probs, -2))

    # -- latent faces -----------------------------------------------------------------------------

    def _factors(self, out: AttentionOutput, log_lik: Tensor | None,
                 samples: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """(prior_logits, mask, posterior_logits) over the positions ``log_lik`` is given for
        (every position when it is ``None``: ``sampled_log_lik`` stands in for it)."""
        if out.topk_indices is None:
            if log_lik is not None and log_lik.shape != out.prior_logits.shape:
                hint = ("; the log-likelihood at samples (K, ...) goes in sampled_log_lik= "
                        "(with log_lik=None)"
                        if samples is not None and log_lik.shape == samples.shape else "")
                raise ValueError(f"log_lik must be {shape_of(out.prior_logits)} (like "
                                 f"prior_logits), got {shape_of(log_lik)}{hint}")
            return out.prior_logits, out.mask, out.posterior_logits
        assert out.topk_mask is not None
        if log_lik is None:
            raise ValueError(f"with k_max, log_lik must be {shape_of(out.topk_indices)} (one value "
                             "per K-max position, in the order of topk_indices), got None")
        if log_lik.shape != out.topk_indices.shape:
            raise ValueError(f"with k_max, log_lik must be {shape_of(out.topk_indices)} (one value "
                             f"per K-max position, in the order of topk_indices; use "
                             f"out.gather_topk on a full (..., S) log_lik), got "
                             f"{shape_of(log_lik)}")
        prior = out.gather_topk(out.prior_logits)
        post = None if out.posterior_logits is None else out.gather_topk(out.posterior_logits)
        return prior, out.topk_mask, post

    def loss(self, out: AttentionOutput, log_lik: Tensor | None, *, num_samples: int = 1,
             baseline: BaselineName | None = None, baseline_log_lik: Tensor | None = None,
             ema: EMABaseline | None = None, temperature: float = 1.0,
             straight_through: bool = False, generator: torch.Generator | None = None,
             samples: Tensor | None = None, sampled_log_lik: Tensor | None = None) -> Tensor:
        """The loss of ``self.mode`` per query position and head (latent modes).

        Equal to :func:`attention.objectives.alignment_loss` of ``out``'s scores, without its
        repeated work: the prior is ``out.log_probs`` (normalised once, by ``forward``; with
        ``k_max`` the truncated prior is renormalised), the prior and posterior are not masked
        again, and the mask is applied once, to ``log_lik``. The module docstring says which
        modes are engine queries.

        :param out: this module's output.
        :param log_lik: :math:`\\log p(y_t \\mid x, z = s)`, shaped like ``out.prior_logits``
            ``(B, [H,] [T,] S)``, or like ``out.topk_indices`` ``(B, [H,] [T,] K)`` with
            ``k_max``. Values at masked positions are ignored. ``None`` exactly when
            ``sampled_log_lik`` is given.
        :return: ``(B, [H,] [T])``; with heads, ``.sum(1)`` is the heads-as-plate loss.
            Keyword options are those of :func:`attention.objectives.alignment_loss`;
            ``out.posterior_logits`` is used by the variational modes and ``"gumbel"`` (which
            then samples from :math:`q`) and ignored by the others. In the sampling modes,
            ``samples`` from :meth:`sample` with ``sampled_log_lik`` ``(K, B, [H,] [T])``, the
            log-likelihood at the sampled alignments only, replace ``log_lik`` (pass ``None``;
            see :meth:`sample`).
        :raises ValueError: in ``"soft"`` mode (train soft attention with the decoder's
            cross-entropy on ``out.context``), without ``posterior_logits`` in a variational
            mode, or on shape mismatches.
        """
        if self.mode == "soft":
            raise ValueError("mode='soft' has no latent alignment to marginalise: train with the "
                             "decoder's cross-entropy on out.context, or build the module with a "
                             "latent mode")
        if samples is not None and out.topk_indices is not None:
            raise ValueError("samples are not supported together with k_max")
        prior, mask, post = self._factors(out, log_lik, samples)
        if self.mode in _VARIATIONAL and post is None:
            raise ValueError(f"mode={self.mode!r} needs posterior_logits: pass the inference "
                             "network's scores to forward(..., posterior_logits=...)")
        if self.mode not in _VARIATIONAL and self.mode != "gumbel":
            post = None  # kept on the output for inspection; these objectives do not use q
        full_log_lik = split_sampled(prior, log_lik, samples, sampled_log_lik)
        check_scores("log_lik", full_log_lik, prior.shape, prior.dtype)
        objective = objective_for(self.mode, post is not None, num_samples, baseline,
                                  baseline_log_lik, ema, temperature, straight_through,
                                  generator, samples, sampled_log_lik)
        # forward's normalised prior, unless K-max truncates it (then the engine renormalises)
        log_probs = out.log_probs if out.topk_indices is None else None
        factors = AlignmentFactors.from_masked(
            prior if log_probs is None else log_probs, full_log_lik, mask, post,
            prior_normalized=log_probs is not None)
        return evaluate(objective, factors)

    def sample(self, out: AttentionOutput, num_samples: int = 1,
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Alignments for the sampling modes, and the values to score them with.

        The cheap REINFORCE step: draw ``z`` from :math:`q` (variational modes, with
        ``out.posterior_logits``) or :math:`p`, evaluate the output layer at the sampled values
        only (e.g. ``AlignedOutputLayer.log_lik(h, values, y, gathered=True)`` after moving ``K``
        next to ``T``), and pass ``samples=z`` with that ``(K, B, [H,] [T])`` log-likelihood as
        ``sampled_log_lik`` to :meth:`loss` (``log_lik=None``).

        :return: ``(z, values)``: ``z`` ``(K, B, [H,] [T])`` long and the sampled values
            ``(K, B, [H,] [T,] D)``.
        """
        logits = out.posterior_logits if (self.mode in _VARIATIONAL and
                                          out.posterior_logits is not None) else out.prior_logits
        z = sample_alignments(logits, out.mask, num_samples, generator)
        vals = out.values  # (B, [H,] S, D)
        value_dim = vals.shape[-1]
        step = logits.dim() < vals.dim()
        drawn = z.unsqueeze(-1) if step else z  # (K, B, [H,] T', ) with T' = 1 for a step
        idx = drawn.unsqueeze(-1).expand(*drawn.shape, value_dim)  # (K, B, [H,] T', D)
        spread = vals.unsqueeze(0).expand((num_samples,) + tuple(vals.shape))
        picked = spread.gather(-2, idx)
        return z, (picked.squeeze(-2) if step else picked)

    def relaxed_context(self, out: AttentionOutput, posterior_logits: Tensor | None = None, *,
                        min_concentration: float = 1e-2) -> tuple[Tensor, Tensor]:
        r"""Relaxed (Dirichlet) variational attention: an alignment on the simplex.

        The alignment is a reparameterised sample :math:`w \sim \mathrm{Dir}(\alpha_q)` over
        the unmasked positions, with :math:`\alpha = \mathrm{softplus}(\text{scores}) +
        \alpha_{\min}` (:func:`attention.dirichlet.dirichlet_alignment`); the context is
        :math:`\sum_s w_s v_s`. The objective is :math:`-\log p(y \mid x, c) +
        \mathrm{KL}(\mathrm{Dir}(\alpha_q) \,\|\, \mathrm{Dir}(\alpha_p))`, with the
        decoder's log-likelihood at this context and the returned KL; warm it up with the Jensen
        bound first, as the paper does (:class:`attention.estimators.JensenWarmup`).

        :param out: this module's output (its prior scores give :math:`\alpha_p`).
        :param posterior_logits: scores of :math:`q`, shaped like ``out.prior_logits``; without
            them the sample is from the prior's Dirichlet and the KL is 0.
        :return: ``(context, kl)``: the context shaped like ``out.context`` and the KL per query
            position and head, ``(B, [H,] [T])``.
        """
        mask = out.mask
        prior = out.prior_logits.masked_fill(~mask, 0.0)
        if posterior_logits is None:
            q = prior
        else:
            if posterior_logits.shape != out.prior_logits.shape:
                raise ValueError(f"posterior_logits must be {tuple(out.prior_logits.shape)} (like "
                                 f"prior_logits), got {shape_of(posterior_logits)}")
            q = posterior_logits.masked_fill(~mask, 0.0)
        w = dirichlet_alignment(q, mask, min_concentration)
        kl = dirichlet_kl(q, prior, mask, min_concentration)
        step = w.dim() < out.values.dim()
        ctx = (w.unsqueeze(-2) @ out.values).squeeze(-2) if step else w @ out.values
        if self.heads > 1:
            assert self.out_proj is not None
            ctx = self.out_proj(ctx.transpose(1, 2).flatten(2) if not step else ctx.flatten(1))
        return ctx, kl

    def posterior(self, out: AttentionOutput, log_lik: Tensor) -> Tensor:
        """Exact posterior :math:`p(z \\mid x, y) \\propto p(z \\mid x)\\, p(y \\mid x, z)`.

        :param log_lik: as in :meth:`loss`.
        :return: shaped like ``log_lik`` (over the K-max positions with ``k_max``).
        """
        prior, mask, _ = self._factors(out, log_lik)
        return alignment_posterior(prior, log_lik, mask)


# -- inference network ----------------------------------------------------------------------------


class AlignmentInferenceNetwork(nn.Module):
    r"""The variational posterior :math:`q(z_t \mid x, y)` of Deng et al. (2018), section 3.

    A bidirectional LSTM reads the embedded target :math:`y` (so :math:`q` sees the whole
    target, including future words), and each target state :math:`e_t` is scored against each
    source state :math:`m_s` bilinearly:

    .. math::

        \log q(z_{t,h} = s) = e_t^\top W_h m_s + b_h^\top m_s + \text{const}_t
        \quad (\text{softmax over real } s).

    Padded target positions are handled with :func:`~torch.nn.utils.rnn.pack_padded_sequence`
    (their logits are whatever the padded LSTM output gives; mask them out of the loss).

    :param target_dim: ``E``, the target embedding size.
    :param memory_dim: ``Dm``.
    :param hidden: LSTM state size per direction.
    :param heads: ``H``: one posterior per head of a multi-head :class:`LatentAlignmentAttention`
        (whose posterior logits are ``(B, H, T, S)``).
    :param num_layers: LSTM layers.
    """

    def __init__(self, target_dim: int, memory_dim: int, hidden: int, *, heads: int = 1,
                 num_layers: int = 1) -> None:
        super().__init__()
        if not isinstance(heads, int) or heads < 1:
            raise ValueError(f"heads must be an int >= 1, got {heads!r}")
        self.target_dim, self.memory_dim, self.hidden, self.heads = (
            target_dim, memory_dim, hidden, heads)
        self.lstm = nn.LSTM(target_dim, hidden, num_layers=num_layers, batch_first=True,
                            bidirectional=True)
        self.proj = nn.Linear(2 * hidden, heads * memory_dim)  # W_h e_t + b_h, per head

    def forward(self, target: Tensor, memory: Tensor, memory_mask: Tensor | None = None,
                target_mask: Tensor | None = None) -> Tensor:
        """Posterior logits.

        :param target: ``(B, T, E)`` embedded target words.
        :param memory: ``(B, S, Dm)`` source states.
        :param memory_mask: ``(B, S)`` bool, ``True`` for real source positions.
        :param target_mask: ``(B, T)`` bool, ``True`` for real target positions, a prefix of
            each row (lengths are its row sums, at least 1; read on the host).
        :return: ``(B, [H,] T, S)`` logits, ``-inf`` at masked source positions.
        """
        if target.dim() != 3 or target.shape[-1] != self.target_dim:
            raise ValueError(f"target must be (B, T, {self.target_dim}), got {shape_of(target)}")
        batch, tgt_len, _ = target.shape
        if memory.dim() != 3 or memory.shape[0] != batch or memory.shape[-1] != self.memory_dim:
            raise ValueError(f"memory must be ({batch}, S, {self.memory_dim}) for target "
                             f"{shape_of(target)}, got {shape_of(memory)}")
        src_len = memory.shape[1]
        if memory_mask is not None and (memory_mask.shape != (batch, src_len)
                                        or memory_mask.dtype != torch.bool):
            raise ValueError(f"memory_mask must be a bool ({batch}, {src_len}), got "
                             f"{shape_of(memory_mask)} {memory_mask.dtype}")
        if target_mask is None:
            enc, _ = self.lstm(target)
        else:
            if target_mask.shape != (batch, tgt_len) or target_mask.dtype != torch.bool:
                raise ValueError(f"target_mask must be a bool ({batch}, {tgt_len}), got "
                                 f"{shape_of(target_mask)} {target_mask.dtype}")
            lengths = target_mask.sum(-1).clamp(min=1).cpu()
            packed = pack_padded_sequence(target, lengths, batch_first=True, enforce_sorted=False)
            enc_packed, _ = self.lstm(packed)
            enc, _ = pad_packed_sequence(enc_packed, batch_first=True, total_length=tgt_len)
        states = self.proj(enc).view(batch, tgt_len, self.heads, self.memory_dim).transpose(1, 2)
        logits = states @ memory.unsqueeze(1).transpose(-1, -2)  # (B, H, T, S)
        if memory_mask is not None:
            logits = logits.masked_fill(~memory_mask[:, None, None, :], -math.inf)
        return logits.squeeze(1) if self.heads == 1 else logits
