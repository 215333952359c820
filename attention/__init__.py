"""Latent-alignment attention (Deng et al., NeurIPS 2018) on the :mod:`plated` engine.

* :mod:`attention.functional` holds the math as pure functions: the exact marginal likelihood, the
  Jensen bound, the enumerated ELBO, REINFORCE and Gumbel-softmax estimators with their baselines
  (:func:`alignment_loss`), engine-backed posterior marginals, MAP alignments and alignment
  samples, and the relaxed (Dirichlet) variational attention helpers.
* :mod:`attention.modules` holds the ``nn.Module`` faces: score functions,
  :class:`LatentAlignmentAttention` (a drop-in for soft attention, multi-head with heads as a
  plate, K-max) and the inference network :class:`AlignmentInferenceNetwork`;
  :mod:`attention.output` the memory-capped per-alignment output layer.
* :mod:`attention.markov` is the first-order Markov alignment prior; :mod:`attention.distributions`
  the Pyro face; :mod:`attention.decoding` beam search with latent alignments;
  :mod:`attention.plotting` alignment heatmaps.
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
from .modules import (
    ATTENTION_MODES,
    SCORE_KINDS,
    AdditiveScore,
    AlignmentInferenceNetwork,
    AttentionMode,
    AttentionOutput,
    BilinearScore,
    DotScore,
    GeneralScore,
    LatentAlignmentAttention,
    ScoreKind,
    make_score,
    topk_alignments,
)
from .output import DEFAULT_MAX_BYTES, KEEP_FACTOR, WORK_FACTOR, AlignedOutputLayer

__all__ = [
    "ATTENTION_MODES",
    "AdditiveScore",
    "AlignedOutputLayer",
    "AlignmentInferenceNetwork",
    "AttentionMode",
    "AttentionOutput",
    "BilinearScore",
    "DEFAULT_MAX_BYTES",
    "DotScore",
    "KEEP_FACTOR",
    "GeneralScore",
    "LatentAlignmentAttention",
    "SCORE_KINDS",
    "ScoreKind",
    "WORK_FACTOR",
    "make_score",
    "topk_alignments",
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
