r"""Latent-alignment objectives and estimators as pure functions: the functional face of
:mod:`attention`.

The model of Deng et al. (2018), "Latent Alignment and Variational Attention" (NeurIPS), explains
each output :math:`y` (one target word, one answer) by a latent alignment :math:`z`, the source
position or frame it attends to:

.. math::

    p(y \mid x) = \sum_{z=1}^{S} p(z \mid x)\, p(y \mid x, z).

Every function takes per-alignment scores shaped ``(..., S)``: the leading dims are query
positions (batch, target position, head, ...), the last dim is :math:`z`. ``mask`` is a bool
tensor broadcastable to the scores, ``True`` for real source positions; a masked position gets
probability exactly zero and its ``log_lik`` is ignored (even NaN), and a query with no unmasked
position has loss exactly 0 and zero gradients.

This module gathers the public names of the modules that do the work, one job each:

* :mod:`attention.objectives` -- the losses: :func:`alignment_loss` dispatches by ``mode`` to one
  function per family (:func:`marginal_loss`, :func:`jensen_loss`, :func:`elbo_loss`,
  :func:`reinforce_loss`, :func:`gumbel_loss`), each with only its own options;
* :mod:`attention.queries` -- the engine face: the alignment graph (one plate ``"query"`` over
  the flattened leading dims, one variable ``"z"``) and its queries :func:`alignment_posterior`,
  :func:`alignment_map`, :func:`sample_alignments`;
* :mod:`attention.estimators` -- :class:`EMABaseline`, the REINFORCE and Gumbel-softmax
  estimators, :class:`JensenWarmup`;
* :mod:`attention.dirichlet` -- relaxed (Dirichlet) attention, plain torch:
  :func:`dirichlet_alignment`, :func:`dirichlet_concentration`, :func:`dirichlet_kl`;
* :mod:`attention.factors` -- the objectives' input, checked, masked and normalised once;
  :mod:`attention.checks` -- the argument checks; :mod:`attention.typing` -- the option types
  :data:`Mode`, :data:`BaselineName`, :data:`Phase` and their values :data:`MODES`,
  :data:`BASELINES`.

Which work is an engine query and which is plain torch: exact marginal likelihood
(``"marginal"``), the normalisation of :math:`p(z \mid x)` and :math:`q(z)`, posterior marginals,
MAP alignments and alignment samples are engine queries (``log_partition``, ``marginals``,
``map``, ``sample``); the expectations and KL of ``"hard-enum"`` / ``"variational-enum"``, the
REINFORCE surrogate, the Gumbel-softmax relaxation and the Dirichlet functions are plain torch.
"""

from __future__ import annotations

from .dirichlet import dirichlet_alignment, dirichlet_concentration, dirichlet_kl
from .estimators import EMABaseline, JensenWarmup
from .objectives import (
    alignment_loss,
    elbo_loss,
    gumbel_loss,
    jensen_loss,
    marginal_loss,
    reinforce_loss,
)
from .queries import alignment_map, alignment_posterior, sample_alignments
from .typing import BASELINES, MODES, BaselineName, Mode, Phase

__all__ = [
    "BASELINES",
    "MODES",
    "BaselineName",
    "EMABaseline",
    "JensenWarmup",
    "Mode",
    "Phase",
    "alignment_loss",
    "alignment_map",
    "alignment_posterior",
    "dirichlet_alignment",
    "dirichlet_concentration",
    "dirichlet_kl",
    "elbo_loss",
    "gumbel_loss",
    "jensen_loss",
    "marginal_loss",
    "reinforce_loss",
    "sample_alignments",
]
