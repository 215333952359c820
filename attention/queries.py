r"""The engine face of latent alignment: the alignment graph and its queries.

Scores shaped ``(..., S)`` become a :class:`plated.PlatedFactorGraph` with one plate, ``"query"``,
over the flattened leading dims (``N`` queries), and one variable, ``"z"``, of size ``S``: a factor
``("query", "z")`` per tensor ``(N, S)``. Every function here is one engine query on that graph:

* :func:`alignment_posterior` -- ``marginals()`` of :math:`\{\log p(z \mid x), \log p(y \mid x,
  z)\}`;
* :func:`alignment_map` -- ``map()``;
* :func:`sample_alignments` -- ``sample()``;
* :func:`log_normalize` (internal, used by the objectives) -- ``log_partition()`` of one factor.

The graph is built with ``validate=False`` (no host-device sync); its plan comes from the
engine's plan cache, whose key holds the sizes ``(N, S)`` and the dtype. So a batch with a new
``N`` (for a decoder: a new batch size or target length) plans once, a fraction of a millisecond
on a CPU, and hits the cache afterwards. Declaring batch and target as two plates would not avoid
it (both sizes would be in the key); only padding ``N`` up to fixed sizes would, at the price of
work on padding rows, so it is not done.

Masks: a query with no unmasked position gets a constant row (all zeros, or all mass on index 0
for sampling) before any arithmetic, so it never meets ``-inf - -inf``, and a documented answer.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from plated import Factor, Plate, PlatedFactorGraph

from .checks import check_mask, check_num_samples, check_scores

__all__ = ["alignment_map", "alignment_posterior", "sample_alignments"]

#: The plate of queries and the alignment variable of the graph.
PLATE, VAR = "query", "z"
_DIMS = (PLATE, VAR)


def alignment_graph(*factors: Tensor) -> PlatedFactorGraph:
    """The alignment graph: plate ``query`` of size ``N``, variable ``z`` of size ``S``, one factor
    ``(query, z)`` per tensor ``(N, S)``; ``log_partition`` keeps the plate (one value a query).
    Cheap to build (the engine caches the plan, not this function)."""
    return PlatedFactorGraph(
        [Factor(factor, _DIMS) for factor in factors],
        [Plate(PLATE, factors[0].shape[0])],
        keep_plates=(PLATE,),
        validate=False,
    )


def log_normalize(logits: Tensor) -> Tensor:
    """``logits - log sum_z exp(logits)`` per query ``(N, S)``, the normaliser an engine
    ``log_partition``; a row that is all ``-inf`` stays all ``-inf`` (its probabilities are all 0,
    its gradient is 0) instead of becoming NaN. With no queries (``N = 0``) there is nothing to
    normalise and ``logits`` comes back."""
    if logits.shape[0] == 0:
        return logits
    log_norm = alignment_graph(logits).log_partition()
    return logits - torch.where(torch.isfinite(log_norm), log_norm, 0.0).unsqueeze(-1)


def engine_sample(logits: Tensor, num_samples: int, generator: torch.Generator | None) -> Tensor:
    """``(num_samples, N)`` draws of ``z`` from ``softmax(logits)`` ``(N, S)``: the engine's
    ``sample()`` (forward sum-product, backward sample), with ``generator`` (on ``logits``'
    device) or torch's global RNG."""
    out: Tensor = alignment_graph(logits).sample(num_samples, generator=generator)[VAR]
    return out


def mask_logits(logits: Tensor, mask: Tensor | None, row_ok: Tensor | None) -> Tensor:
    """Masked positions to ``-inf``; a query with no unmasked position (``row_ok`` False) to all
    zeros, a constant: it gets zero gradient and meets no ``-inf - -inf`` downstream."""
    if mask is None or row_ok is None:
        return logits
    return torch.where(row_ok, torch.where(mask, logits, -math.inf), 0.0)


def mask_values(values: Tensor, mask: Tensor | None) -> Tensor:
    """Masked positions to 0: their values, even NaN or ``inf``, reach neither the result nor
    the gradient (a :func:`torch.where`, never a product)."""
    if mask is None:
        return values
    return torch.where(mask, values, 0.0)


def alignment_posterior(prior_logits: Tensor, log_lik: Tensor, mask: Tensor | None = None
                        ) -> Tensor:
    r"""Posterior marginals :math:`p(z \mid x, y) \propto p(z \mid x)\, p(y \mid x, z)`.

    Computed by the engine's ``marginals()`` (the gradient of :math:`\log Z`), differentiable in
    both inputs.

    :param prior_logits: ``(..., S)`` unnormalised scores of :math:`p(z \mid x)`.
    :param log_lik: ``(..., S)`` (broadcastable) :math:`\log p(y \mid x, z)`, same dtype.
    :param mask: ``(..., S)`` (broadcastable) bool, ``True`` for real source positions.
    :return: ``(..., S)`` probabilities summing to 1 over the unmasked positions, exactly 0 at
        masked ones; all zeros for a query with no unmasked position.
    :raises ValueError: on shape or dtype mismatches.
    """
    check_scores("prior_logits", prior_logits, None, None)
    shape = prior_logits.shape
    check_scores("log_lik", log_lik, shape, prior_logits.dtype)
    full_mask = check_mask(mask, shape)
    num_queries, size = math.prod(shape[:-1]), shape[-1]
    if num_queries == 0:
        return prior_logits * 0.0
    row_ok = None if full_mask is None else full_mask.any(-1, keepdim=True)
    prior = mask_logits(prior_logits, full_mask, row_ok).reshape(num_queries, size)
    lik = mask_values(log_lik.expand(shape), full_mask).reshape(num_queries, size)
    post = alignment_graph(prior, lik).marginals()[VAR].reshape(shape)
    if row_ok is not None:
        post = torch.where(row_ok, post, 0.0)
    return post


def alignment_map(prior_logits: Tensor, log_lik: Tensor | None = None,
                  mask: Tensor | None = None) -> Tensor:
    r"""The MAP alignment :math:`\arg\max_z p(z \mid x)\, p(y \mid x, z)` (engine ``map()``).

    Without ``log_lik`` it is the prior's mode :math:`\arg\max_z p(z \mid x)` (decoding, before
    :math:`y` is known). Ties go to the first index.

    :param prior_logits: ``(..., S)`` unnormalised scores of :math:`p(z \mid x)`.
    :param log_lik: optional ``(..., S)`` (broadcastable) :math:`\log p(y \mid x, z)`.
    :param mask: ``(..., S)`` (broadcastable) bool, ``True`` for real source positions.
    :return: ``(...)`` long indices into ``S``; never a masked position, except 0 for a query
        with no unmasked position.
    :raises ValueError: on shape or dtype mismatches.
    """
    check_scores("prior_logits", prior_logits, None, None)
    shape = prior_logits.shape
    if log_lik is not None:
        check_scores("log_lik", log_lik, shape, prior_logits.dtype)
    full_mask = check_mask(mask, shape)
    num_queries, size = math.prod(shape[:-1]), shape[-1]
    if num_queries == 0:
        return torch.zeros(shape[:-1], dtype=torch.long, device=prior_logits.device)
    row_ok = None if full_mask is None else full_mask.any(-1, keepdim=True)
    factors = [mask_logits(prior_logits.detach(), full_mask, row_ok).reshape(num_queries, size)]
    if log_lik is not None:
        factors.append(
            mask_values(log_lik.detach().expand(shape), full_mask).reshape(num_queries, size))
    best = alignment_graph(*factors).map()[VAR]
    return best.reshape(shape[:-1])


def sample_alignments(
    logits: Tensor,
    mask: Tensor | None = None,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Exact samples :math:`z \sim \mathrm{softmax}(\text{logits})` over unmasked positions.

    Drawn by the engine's ``sample()`` (forward sum-product, backward Gumbel-max) with
    ``generator`` (on ``logits``' device; the draw is then reproducible from it and torch's
    global RNG is not touched), or with torch's global RNG. Pass posterior scores
    (``prior_logits + log_lik``) to sample from :math:`p(z \mid x, y)`.

    :param logits: ``(..., S)`` unnormalised scores (not differentiated).
    :param mask: ``(..., S)`` (broadcastable) bool, ``True`` for real source positions.
    :param num_samples: samples per query, ``>= 1``.
    :param generator: optional random generator.
    :return: ``(num_samples, ...)`` long indices; never a masked position, except 0 for a query
        with no unmasked position.
    :raises ValueError: on bad shapes or ``num_samples < 1``.
    """
    check_scores("logits", logits, None, None)
    check_num_samples(num_samples)
    shape = logits.shape
    full_mask = check_mask(mask, shape, "logits")
    num_queries, size = math.prod(shape[:-1]), shape[-1]
    if num_queries == 0:
        return torch.zeros((num_samples,) + tuple(shape[:-1]), dtype=torch.long,
                           device=logits.device)
    scores = logits.detach()
    if full_mask is not None:
        # a query with no unmasked position: all mass on index 0 (deterministic, documented)
        row_ok = full_mask.any(-1, keepdim=True)
        first = torch.arange(size, device=scores.device) == 0
        scores = torch.where(full_mask, scores, -math.inf)
        scores = torch.where(row_ok, scores,
                             torch.where(first, 0.0, -math.inf).to(scores.dtype))
    drawn = engine_sample(scores.reshape(num_queries, size), num_samples, generator)
    return drawn.reshape((num_samples,) + tuple(shape[:-1]))
