r"""The input of every objective: the alignment graph's factors, checked, masked and normalised
once (:class:`AlignmentFactors`), and the two torch reductions the objectives share.

Masks. A masked position has probability exactly zero: its logits are ``-inf`` and its
log-likelihood is replaced by 0 with :func:`torch.where` (never multiplied), so NaN or ``inf``
there cannot leak into values or gradients. A query with no unmasked position has all-``-inf``
log-probabilities. Nothing turns that into NaN: the engine's normaliser leaves such a row all
``-inf`` with zero gradient, :func:`expect` reads only positions of positive probability
(:math:`0 \cdot x = 0`, even for :math:`x = -\infty - (-\infty)`), and the estimators draw from a
uniform stand-in row (:meth:`AlignmentFactors.sampling_logits`). Its loss is zeroed at the end
(:meth:`AlignmentFactors.finish`), so it is exactly 0 with zero gradients in every objective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .checks import check_mask, check_scores
from .queries import log_normalize, mask_values

__all__ = ["AlignmentFactors", "expect", "weighted_sum"]


@dataclass(frozen=True, eq=False)
class AlignmentFactors:
    r"""The factors :math:`\log p(z \mid x)`, :math:`\log p(y \mid x, z)` and, for the
    variational objectives, :math:`\log q(z)` of ``N`` queries, flattened to ``(N, S)``.

    Build it with :meth:`from_scores` (checks, masks and normalises raw scores) or
    :meth:`from_masked` (for scores a caller has masked already, such as the outputs of
    :class:`attention.modules.LatentAlignmentAttention`); each mask is applied once, there.

    :ivar log_prior: ``(N, S)`` :math:`\log p(z \mid x)`, normalised over each query's real
        positions; ``-inf`` at masked positions, all ``-inf`` for a query without real positions.
    :ivar log_lik: ``(N, S)`` :math:`\log p(y \mid x, z)`, 0 at masked positions.
    :ivar log_posterior: ``(N, S)`` :math:`\log q(z)`, normalised like ``log_prior``, or ``None``.
    :ivar row_ok: ``(N,)`` bool, ``True`` for a query with at least one real position; ``None``
        without a mask (every position real).
    :ivar shape: the query shape, the scores' shape without ``S``; ``N`` is its product.
    """

    log_prior: Tensor
    log_lik: Tensor
    log_posterior: Tensor | None
    row_ok: Tensor | None
    shape: torch.Size

    @classmethod
    def from_scores(cls, prior_logits: Tensor, log_lik: Tensor, mask: Tensor | None = None,
                    posterior_logits: Tensor | None = None) -> AlignmentFactors:
        r"""Check, mask and normalise raw scores (both normalisers are engine queries).

        :param prior_logits: ``(..., S)`` unnormalised scores of :math:`p(z \mid x)`.
        :param log_lik: ``(..., S)`` (broadcastable) :math:`\log p(y \mid x, z)`, same dtype.
            Values at masked positions are ignored, even NaN or ``inf``.
        :param mask: ``(..., S)`` (broadcastable) bool, ``True`` for real source positions.
        :param posterior_logits: ``(..., S)`` (broadcastable) unnormalised scores of
            :math:`q(z)`, or ``None``.
        :raises ValueError: on shape or dtype mismatches (naming the argument).
        """
        check_scores("prior_logits", prior_logits, None, None)
        shape = prior_logits.shape
        check_scores("log_lik", log_lik, shape, prior_logits.dtype)
        if posterior_logits is not None:
            check_scores("posterior_logits", posterior_logits, shape, prior_logits.dtype)
        full_mask = check_mask(mask, shape)
        posterior = None if posterior_logits is None else posterior_logits.expand(shape)
        if full_mask is not None:
            prior_logits = torch.where(full_mask, prior_logits, -math.inf)
            if posterior is not None:
                posterior = torch.where(full_mask, posterior, -math.inf)
        return cls.from_masked(prior_logits, log_lik.expand(shape), full_mask, posterior)

    @classmethod
    def from_masked(cls, prior_logits: Tensor, log_lik: Tensor, mask: Tensor | None,
                    posterior_logits: Tensor | None = None, *, prior_normalized: bool = False
                    ) -> AlignmentFactors:
        r"""Flatten scores that are masked already; mask ``log_lik`` and normalise what is not.

        No checks: the caller guarantees the shapes, a dtype and that the logits are ``-inf``
        wherever ``mask`` is ``False``.

        :param prior_logits: ``(..., S)`` scores of :math:`p(z \mid x)`, or its log-probabilities
            with ``prior_normalized=True`` (then not normalised again).
        :param log_lik: ``(..., S)`` :math:`\log p(y \mid x, z)`, any value where masked.
        :param mask: ``(..., S)`` bool or ``None`` (every position real).
        :param posterior_logits: ``(..., S)`` scores of :math:`q(z)`, or ``None``; normalised
            here by the engine.
        """
        shape = prior_logits.shape
        num_queries, size = math.prod(shape[:-1]), shape[-1]
        row_ok = None if mask is None else mask.any(-1).reshape(num_queries)
        prior = prior_logits.reshape(num_queries, size)
        return cls(
            log_prior=prior if prior_normalized else log_normalize(prior),
            log_lik=mask_values(log_lik, mask).reshape(num_queries, size),
            log_posterior=(None if posterior_logits is None
                           else log_normalize(posterior_logits.reshape(num_queries, size))),
            row_ok=row_ok,
            shape=shape[:-1],
        )

    @property
    def num_queries(self) -> int:
        """``N``, the number of queries."""
        return self.log_prior.shape[0]

    @property
    def log_sampled(self) -> Tensor:
        r"""``(N, S)`` the log-probabilities of the distribution :math:`r` that the estimators
        draw from: :math:`q` when there is a posterior, else :math:`p`."""
        return self.log_prior if self.log_posterior is None else self.log_posterior

    def sampling_logits(self) -> Tensor:
        """``(N, S)`` :attr:`log_sampled` with each query that has no real position replaced by
        zeros (uniform), so that every query has something to draw; such a query's loss is
        zeroed by :meth:`finish`."""
        if self.row_ok is None:
            return self.log_sampled
        return torch.where(self.row_ok.unsqueeze(-1), self.log_sampled, 0.0)

    def kl(self) -> Tensor:
        r"""``(N,)`` :math:`\mathrm{KL}(q \,\|\, p) = \sum_z q (\log q - \log p)`, with
        :math:`0 \log 0 = 0`; 0 without a posterior."""
        if self.log_posterior is None:
            return self.log_prior.new_zeros(self.num_queries)
        return expect(self.log_posterior.exp(), self.log_posterior - self.log_prior)

    def finish(self, loss: Tensor) -> Tensor:
        """The per-query ``loss`` ``(N,)`` with queries without real positions set to exactly 0
        (a :func:`torch.where`: zero gradient there), reshaped to :attr:`shape`."""
        if self.row_ok is not None:
            loss = torch.where(self.row_ok, loss, 0.0)
        return loss.reshape(self.shape)

    def empty(self) -> Tensor:
        """The per-query loss when there are no queries: ``(0,)``, still connected to the
        prior's autograd graph (so ``backward`` works on a sum of it)."""
        return self.log_prior.sum(-1) * 0.0


def expect(probs: Tensor, values: Tensor) -> Tensor:
    """``sum_z probs * values`` over the last dim, with the convention ``0 * anything = 0``:
    values where the probability is 0 (``-inf``, a masked NaN) touch neither the value nor the
    gradient.

    A row where a positive probability meets an infinite value (a log-likelihood of ``-inf``
    where the prior is positive) is that infinity, as a constant: zero gradients in that row,
    never ``0 * inf = NaN`` in the backward pass, so a row left out of a summed loss stays out.
    """
    return weighted_sum(probs, values, probs > 0)


def weighted_sum(weights: Tensor, values: Tensor, support: Tensor) -> Tensor:
    """``sum_z weights * values`` over the last dim, reading ``values`` only on ``support``.

    A row where ``support`` meets a value that is not finite is the sum of those values (``inf``
    or ``-inf``, NaN if both or a NaN), as a constant with zero gradients; elsewhere the product
    is the plain one, and ``weights`` get the gradient ``values`` on ``support``.
    """
    finite = torch.isfinite(values)
    inner = (weights * torch.where(support & finite, values, 0.0)).sum(-1)
    infinite = support & ~finite
    constant = torch.where(infinite, values.detach(), 0.0).sum(-1)
    return torch.where(infinite.any(-1), constant, inner)
