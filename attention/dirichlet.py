r"""Relaxed (Dirichlet) variational attention: alignments on the simplex, in plain torch.

The relaxed alignment of Deng et al. (2018) is a reparameterised sample
:math:`w \sim \mathrm{Dir}(\alpha)` instead of a categorical :math:`z`; the objective is the
decoder's log-likelihood at the context :math:`\sum_z w_z v_z` plus a closed-form KL between two
Dirichlets. Nothing is enumerated, so these functions bypass the engine. Train them after a Jensen
warm-up (:class:`attention.estimators.JensenWarmup`), as the paper does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import check_mask, check_scores

__all__ = ["dirichlet_alignment", "dirichlet_concentration", "dirichlet_kl"]


def dirichlet_concentration(logits: Tensor, min_concentration: float = 1e-2) -> Tensor:
    r"""Concentrations :math:`\alpha = \mathrm{softplus}(\text{logits}) + \alpha_{\min}`.

    The map shared by :func:`dirichlet_alignment` and :func:`dirichlet_kl`.

    :raises ValueError: if ``min_concentration <= 0``.
    """
    if not min_concentration > 0.0:
        raise ValueError(f"min_concentration must be > 0, got {min_concentration}")
    return F.softplus(logits) + min_concentration


def dirichlet_alignment(
    concentration_logits: Tensor,
    mask: Tensor | None = None,
    min_concentration: float = 1e-2,
) -> Tensor:
    r"""A reparameterised sample :math:`w \sim \mathrm{Dir}(\alpha)` over the unmasked positions.

    :math:`\alpha` = :func:`dirichlet_concentration` of ``concentration_logits``. Drawn as
    normalised Gamma variates, :math:`w_z = G_z / \sum_{z'} G_{z'}`,
    :math:`G_z \sim \mathrm{Gamma}(\alpha_z, 1)` (``rsample``, so gradients flow to the logits),
    with :math:`G_z = 0` at masked positions: the sample is exactly a Dirichlet over the unmasked
    sub-vector, with exact zeros elsewhere. Uses torch's global RNG. This is the relaxed
    alignment of Deng et al. (2018); it bypasses the engine (nothing is enumerated).

    :param concentration_logits: ``(..., S)`` unconstrained scores.
    :param mask: ``(..., S)`` (broadcastable) bool, ``True`` for real source positions.
    :param min_concentration: :math:`\alpha_{\min} > 0`.
    :return: ``(..., S)`` weights on the simplex of the unmasked positions; all zeros for a query
        with no unmasked position.
    :raises ValueError: on bad shapes, a non-bool mask or ``min_concentration <= 0``.
    """
    check_scores("concentration_logits", concentration_logits, None, None)
    shape = concentration_logits.shape
    full_mask = check_mask(mask, shape, "concentration_logits")
    alpha = dirichlet_concentration(concentration_logits, min_concentration)
    if full_mask is not None:
        alpha = torch.where(full_mask, alpha, 1.0)  # a constant: masked logits get no gradient
    # torch's Gamma sampler has no bfloat16 / float16 kernel on every device: sample in float32
    work = alpha if alpha.dtype in (torch.float32, torch.float64) else alpha.float()
    gamma = torch.distributions.Gamma(work, torch.ones_like(work)).rsample().to(alpha.dtype)
    if full_mask is not None:
        gamma = torch.where(full_mask, gamma, 0.0)
    total = gamma.sum(-1, keepdim=True)
    return gamma / torch.where(total > 0, total, 1.0)


def dirichlet_kl(
    q_logits: Tensor,
    p_logits: Tensor,
    mask: Tensor | None = None,
    min_concentration: float = 1e-2,
) -> Tensor:
    r"""KL divergence of two Dirichlets over the unmasked positions, in closed form.

    With :math:`\alpha, \beta` = :func:`dirichlet_concentration` of ``q_logits``, ``p_logits``,
    :math:`\alpha_0 = \sum_z \alpha_z`, :math:`\beta_0 = \sum_z \beta_z` (sums over unmasked
    :math:`z`):

    .. math::

        \log\Gamma(\alpha_0) - \sum_z \log\Gamma(\alpha_z) - \log\Gamma(\beta_0)
        + \sum_z \log\Gamma(\beta_z) + \sum_z (\alpha_z - \beta_z)
        \big(\psi(\alpha_z) - \psi(\alpha_0)\big).

    :param q_logits: ``(..., S)`` scores of the variational Dirichlet.
    :param p_logits: ``(..., S)`` (broadcastable) scores of the prior Dirichlet, same dtype.
    :param mask: ``(..., S)`` (broadcastable) bool, ``True`` for real source positions.
    :param min_concentration: :math:`\alpha_{\min} > 0`, as in :func:`dirichlet_alignment`.
    :return: ``(...)`` KL per query; 0 for a query with no unmasked position (finite gradients).
    :raises ValueError: on bad shapes or dtypes.
    """
    check_scores("q_logits", q_logits, None, None)
    shape = q_logits.shape
    check_scores("p_logits", p_logits, shape, q_logits.dtype)
    full_mask = check_mask(mask, shape, "q_logits")
    alpha = dirichlet_concentration(q_logits, min_concentration)
    beta = dirichlet_concentration(p_logits.expand(shape), min_concentration)
    if full_mask is not None:
        alpha = torch.where(full_mask, alpha, 1.0)
        beta = torch.where(full_mask, beta, 1.0)

    def total(x: Tensor) -> Tensor:
        """The sum over the unmasked positions."""
        return x.sum(-1) if full_mask is None else torch.where(full_mask, x, 0.0).sum(-1)

    alpha0, beta0 = total(alpha), total(beta)
    row_ok = None if full_mask is None else full_mask.any(-1)
    if row_ok is not None:  # an empty row: sums of 0 would give lgamma(0) = inf
        alpha0 = torch.where(row_ok, alpha0, 1.0)
        beta0 = torch.where(row_ok, beta0, 1.0)
    kl = (torch.lgamma(alpha0) - torch.lgamma(beta0)
          + total(torch.lgamma(beta) - torch.lgamma(alpha)
                  + (alpha - beta) * (torch.digamma(alpha) - torch.digamma(alpha0).unsqueeze(-1))))
    if row_ok is not None:
        kl = torch.where(row_ok, kl, 0.0)
    return kl
