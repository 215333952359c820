"""Attention's option types, in one place (as ``opt_einsum/typing.py`` and :mod:`plated.typing`
keep theirs).

Each ``Literal`` comes with the tuple of its values, the one list that the argument checks and the
error messages read. The modules that take these options re-export them under their old names
(``attention.functional.Mode``, ``attention.modules.ScoreKind``, ...).
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "ATTENTION_MODES",
    "AttentionMode",
    "BASELINES",
    "BaselineName",
    "MODES",
    "Mode",
    "OUTPUT_LAYERS",
    "OutputLayerName",
    "Phase",
    "SCORE_KINDS",
    "ScoreKind",
]

#: The objectives of :func:`attention.objectives.alignment_loss`: exact (``"marginal"``), the
#: Jensen bound (``"hard-enum"``), the enumerated ELBO (``"variational-enum"``), their REINFORCE
#: estimates (``"hard-sample"``, ``"variational-sample"``) and the Gumbel-softmax relaxation.
Mode = Literal[
    "marginal", "hard-enum", "variational-enum", "hard-sample", "variational-sample", "gumbel"
]
#: The REINFORCE baselines of :func:`attention.objectives.alignment_loss`.
BaselineName = Literal["soft", "ema", "loo"]
#: The phases of a :class:`attention.estimators.JensenWarmup` schedule.
Phase = Literal["jensen", "anneal", "relaxed"]
#: Score functions by name (:func:`attention.modules.make_score`).
ScoreKind = Literal["additive", "dot", "scaled-dot", "general", "bilinear"]
#: Modes of :class:`attention.modules.LatentAlignmentAttention`: ``"soft"`` plus the objectives
#: of :data:`Mode`.
AttentionMode = Literal[
    "soft", "marginal", "hard-enum", "variational-enum", "hard-sample", "variational-sample",
    "gumbel",
]

#: Per-alignment output layers by name (:func:`attention.output.make_output_layer`): the paper's
#: (Luong's) tanh layer :class:`~attention.output.AlignedOutputLayer` and the product of experts
#: :class:`~attention.output.LogLinearOutputLayer`.
OutputLayerName = Literal["luong", "log-linear"]

#: The values of :data:`Mode`.
MODES: tuple[str, ...] = get_args(Mode)
#: The values of :data:`BaselineName`.
BASELINES: tuple[str, ...] = get_args(BaselineName)
#: The values of :data:`ScoreKind`.
SCORE_KINDS: tuple[str, ...] = get_args(ScoreKind)
#: The values of :data:`OutputLayerName`.
OUTPUT_LAYERS: tuple[str, ...] = get_args(OutputLayerName)
#: The values of :data:`AttentionMode`.
ATTENTION_MODES: tuple[str, ...] = get_args(AttentionMode)
