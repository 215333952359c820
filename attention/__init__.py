"""Latent-alignment attention (Deng et al., NeurIPS 2018) on the :mod:`plated` engine.

* :mod:`attention.functional` holds the math as pure functions, gathered from the modules that do
  the work: the losses (:mod:`attention.objectives`: the exact marginal likelihood, the Jensen
  bound, the enumerated ELBO, REINFORCE and Gumbel-softmax, one function each, and
  :func:`~attention.objectives.alignment_loss` dispatching over them by ``mode``), the estimators
  with their baselines (:mod:`attention.estimators`), the engine queries: posterior marginals, MAP
  alignments and alignment samples (:mod:`attention.queries`), and the relaxed (Dirichlet)
  variational attention helpers (:mod:`attention.dirichlet`). The option types live in
  :mod:`attention.typing`.
* :mod:`attention.modules` holds the ``nn.Module`` faces: score functions,
  :class:`LatentAlignmentAttention` (a drop-in for soft attention, multi-head with heads as a
  plate, K-max) and the inference network :class:`AlignmentInferenceNetwork`;
  :mod:`attention.output` the per-alignment output layers: the paper's tanh layer (memory-capped)
  and the log-linear layer whose exact enumeration costs about what soft attention does.
* :mod:`attention.markov` is the first-order Markov alignment prior
  (:class:`~attention.markov.MarkovAlignment`: one batch's inputs, checked once, and its engine
  queries); :mod:`attention.distributions` the Pyro face; :mod:`attention.decoding` beam search
  with latent alignments; :mod:`attention.plotting` alignment heatmaps.
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
    elbo_loss,
    gumbel_loss,
    jensen_loss,
    marginal_loss,
    reinforce_loss,
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
from .output import (
    DEFAULT_MAX_BYTES,
    KEEP_FACTOR,
    OUTPUT_LAYERS,
    WORK_FACTOR,
    AlignedOutputLayer,
    LogLinearOutputLayer,
    OutputLayerName,
    make_output_layer,
)

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
    "LogLinearOutputLayer",
    "OUTPUT_LAYERS",
    "OutputLayerName",
    "SCORE_KINDS",
    "ScoreKind",
    "WORK_FACTOR",
    "make_output_layer",
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
    "elbo_loss",
    "gumbel_loss",
    "jensen_loss",
    "marginal_loss",
    "reinforce_loss",
    "sample_alignments",
]
