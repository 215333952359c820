"""Latent-alignment attention (Deng et al., NeurIPS 2018) on the :mod:`plated` engine.

:mod:`attention.functional` holds the math as pure functions: the exact marginal likelihood, the
Jensen bound, the enumerated ELBO, REINFORCE and Gumbel-softmax estimators with their baselines
(:func:`alignment_loss`), engine-backed posterior marginals, MAP alignments and alignment samples,
and the relaxed (Dirichlet) variational attention helpers. The ``nn.Module`` faces and decoding
land in later issues.
"""

from .functional import (
    BASELINES,
    MODES,
    BaselineName,
    EMABaseline,
    JensenWarmup,
    Mode,
    Phase,
    alignment_loss,
    alignment_map,
    alignment_posterior,
    dirichlet_alignment,
    dirichlet_concentration,
    dirichlet_kl,
    sample_alignments,
)

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
    "sample_alignments",
]
