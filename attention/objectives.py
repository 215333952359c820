r"""The latent-alignment objectives: one function per family, and :func:`alignment_loss`, the
dispatcher over them by ``mode``.

Each family takes only its own options and returns the loss of every query (negated objectives):

========================  ======================  =============================================
``mode``                  function                work
========================  ======================  =============================================
``"marginal"``            :func:`marginal_loss`   engine ``log_partition`` of
                                                  :math:`\{\log p(z), \ell_z\}`
``"hard-enum"``           :func:`jensen_loss`     torch: :math:`-\sum_z p(z)\, \ell_z`
``"variational-enum"``    :func:`elbo_loss`       torch: :math:`-\sum_z q(z)\, \ell_z
                                                  + \mathrm{KL}(q \,\|\, p)`
``"hard-sample"``,        :func:`reinforce_loss`  engine ``sample``, torch surrogate
``"variational-sample"``                          (:class:`~attention.estimators.Reinforce`)
``"gumbel"``              :func:`gumbel_loss`     torch (:class:`~attention.estimators.Gumbel`)
========================  ======================  =============================================

with :math:`\ell_z = \log p(y \mid x, z)`. Every function normalises the scores of :math:`p` and
:math:`q` it is given with one engine ``log_partition`` each
(:meth:`~attention.factors.AlignmentFactors.from_scores`).
:class:`~attention.modules.LatentAlignmentAttention` skips the prior's: it hands over the prior
that its ``forward`` normalised (:meth:`~attention.factors.AlignmentFactors.from_masked`), so in
``"variational-enum"`` the engine's only query is :math:`q`'s normaliser.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .checks import broadcasts_to, check_num_samples, check_scores, shape_of
from .estimators import EMABaseline, Gumbel, Reinforce
from .factors import AlignmentFactors, expect
from .queries import alignment_graph
from .typing import MODES, BaselineName, Mode

__all__ = [
    "alignment_loss",
    "elbo_loss",
    "gumbel_loss",
    "jensen_loss",
    "marginal_loss",
    "reinforce_loss",
]

_SAMPLE_MODES = ("hard-sample", "variational-sample")
_VARIATIONAL_MODES = ("variational-enum", "variational-sample")


# -- the exact objectives, typed ------------------------------------------------------------------


@dataclass(frozen=True)
class Marginal:
    r"""``"marginal"``: :math:`-\log \sum_z p(z)\, e^{\ell_z}`, an engine ``log_partition``."""

    def per_query(self, factors: AlignmentFactors) -> Tensor:
        """The loss of each query, ``(N,)``; ``+inf`` for a query without real positions (zeroed
        by :meth:`~attention.factors.AlignmentFactors.finish`, with zero gradient)."""
        if factors.num_queries == 0:
            return factors.empty()
        return -alignment_graph(factors.log_prior, factors.log_lik).log_partition()


@dataclass(frozen=True)
class Jensen:
    r"""``"hard-enum"``: the Jensen bound :math:`-\sum_z p(z)\, \ell_z`, in torch."""

    def per_query(self, factors: AlignmentFactors) -> Tensor:
        """The loss of each query, ``(N,)``."""
        return -expect(factors.log_prior.exp(), factors.log_lik)


@dataclass(frozen=True)
class Elbo:
    r"""``"variational-enum"``: the negative ELBO :math:`-\sum_z q(z)\, \ell_z +
    \mathrm{KL}(q \,\|\, p)`, in torch."""

    def per_query(self, factors: AlignmentFactors) -> Tensor:
        """The loss of each query, ``(N,)``.

        :raises ValueError: if ``factors`` has no posterior.
        """
        log_posterior = factors.log_posterior
        if log_posterior is None:
            raise ValueError("mode 'variational-enum' needs posterior_logits (..., S), the scores "
                             "of q(z)")
        return factors.kl() - expect(log_posterior.exp(), factors.log_lik)


#: One objective of one call: what :func:`evaluate` computes, dispatched by type.
Objective = Marginal | Jensen | Elbo | Reinforce | Gumbel


def evaluate(objective: Objective, factors: AlignmentFactors) -> Tensor:
    """``objective`` on every query of ``factors``: shaped ``factors.shape``, exactly 0 (with zero
    gradients) for a query without real positions."""
    return factors.finish(objective.per_query(factors))


# -- one function per family ----------------------------------------------------------------------


def marginal_loss(prior_logits: Tensor, log_lik: Tensor, mask: Tensor | None = None) -> Tensor:
    r"""The exact negative log marginal likelihood :math:`-\log \sum_z p(z \mid x)\, p(y \mid x,
    z)` of each query (``mode="marginal"`` of :func:`alignment_loss`).

    Two engine queries: the normaliser of :math:`p` and the ``log_partition`` of the graph
    :math:`\{\log p(z \mid x), \log p(y \mid x, z)\}`; differentiable in both inputs.

    :param prior_logits: ``(..., S)`` unnormalised scores of :math:`p(z \mid x)`.
    :param log_lik: ``(..., S)`` (broadcastable) :math:`\log p(y \mid x, z)`, same dtype; ignored
        at masked positions, even NaN or ``inf``.
    :param mask: ``(..., S)`` (broadcastable) bool, ``True`` for real source positions.
    :return: ``prior_logits.shape[:-1]``; exactly 0 for a query with no unmasked position.
    :raises ValueError: on shape or dtype mismatches.
    """
    return evaluate(Marginal(), AlignmentFactors.from_scores(prior_logits, log_lik, mask))


def jensen_loss(prior_logits: Tensor, log_lik: Tensor, mask: Tensor | None = None) -> Tensor:
    r"""The Jensen bound :math:`-\sum_z p(z \mid x) \log p(y \mid x, z) \ge` the marginal loss,
    enumerated (``mode="hard-enum"`` of :func:`alignment_loss`).

    The normaliser of :math:`p` is an engine query, the expectation plain torch. Arguments,
    result and errors as for :func:`marginal_loss`.
    """
    return evaluate(Jensen(), AlignmentFactors.from_scores(prior_logits, log_lik, mask))


def elbo_loss(prior_logits: Tensor, log_lik: Tensor, mask: Tensor | None = None, *,
              posterior_logits: Tensor) -> Tensor:
    r"""The negative ELBO :math:`-\sum_z q(z) \log p(y \mid x, z) + \mathrm{KL}(q \,\|\, p)`,
    enumerated (``mode="variational-enum"`` of :func:`alignment_loss`).

    The normalisers of :math:`p` and :math:`q` are engine queries, the expectation and the KL
    plain torch. It is :math:`\ge` the marginal loss, with equality when :math:`q` is the exact
    posterior.

    :param posterior_logits: ``(..., S)`` (broadcastable) unnormalised scores of :math:`q(z)`,
        same dtype. Other arguments, result and errors as for :func:`marginal_loss`.
    """
    factors = AlignmentFactors.from_scores(prior_logits, log_lik, mask, posterior_logits)
    return evaluate(Elbo(), factors)


def reinforce_loss(prior_logits: Tensor, log_lik: Tensor | None, mask: Tensor | None = None,
                   posterior_logits: Tensor | None = None, *, num_samples: int = 1,
                   baseline: BaselineName | None = None, baseline_log_lik: Tensor | None = None,
                   ema: EMABaseline | None = None, generator: torch.Generator | None = None,
                   samples: Tensor | None = None, sampled_log_lik: Tensor | None = None
                   ) -> Tensor:
    r"""The REINFORCE surrogate of the Jensen bound, or with ``posterior_logits`` of the ELBO
    (``mode="hard-sample"`` / ``"variational-sample"`` of :func:`alignment_loss`).

    Alignments are engine samples of :math:`r = q` (with ``posterior_logits``) or :math:`p`, the
    surrogate (:class:`~attention.estimators.Reinforce`) and the exact KL plain torch. Its value
    is a Monte Carlo estimate of :func:`jensen_loss` / :func:`elbo_loss` and its gradient an
    unbiased estimate of theirs.

    :param num_samples: :math:`K`, samples per query.
    :param baseline: ``None`` or one of :data:`~attention.typing.BASELINES`.
    :param baseline_log_lik: ``(...)`` soft-attention log-likelihood, for ``baseline="soft"``.
    :param ema: the running mean for ``baseline="ema"``; updated in place (a side effect).
    :param generator: random generator of the engine's sampler.
    :param samples: ``(K, ...)`` alignments already drawn from :math:`r`, each in ``[0, S)``.
    :param sampled_log_lik: ``(K, ...)``, the log-likelihood at ``samples`` only, in place of
        ``log_lik`` (which is then ``None``); see :func:`alignment_loss`.
    :return: ``prior_logits.shape[:-1]``; exactly 0 for a query with no unmasked position.
    :raises ValueError: as :class:`~attention.estimators.Reinforce` and :func:`marginal_loss`
        do, and as :func:`alignment_loss` does for ``log_lik`` and ``sampled_log_lik``.
    """
    full_log_lik = split_sampled(prior_logits, log_lik, samples, sampled_log_lik)
    objective = Reinforce(num_samples, baseline, baseline_log_lik, ema, generator, samples,
                          sampled_log_lik)
    factors = AlignmentFactors.from_scores(prior_logits, full_log_lik, mask, posterior_logits)
    return evaluate(objective, factors)


def gumbel_loss(prior_logits: Tensor, log_lik: Tensor, mask: Tensor | None = None,
                posterior_logits: Tensor | None = None, *, num_samples: int = 1,
                temperature: float = 1.0, straight_through: bool = False,
                generator: torch.Generator | None = None) -> Tensor:
    r"""The Gumbel-softmax relaxation of the Jensen bound, or with ``posterior_logits`` of the
    ELBO (``mode="gumbel"`` of :func:`alignment_loss`).

    The normalisers are engine queries, the relaxation (:class:`~attention.estimators.Gumbel`)
    plain torch. Its gradient w.r.t. the logits is biased for every temperature :math:`\tau > 0`.

    :param num_samples: relaxed draws per query.
    :param temperature: :math:`\tau > 0`.
    :param straight_through: hard forward, relaxed backward.
    :param generator: random generator of the Gumbel noise.
    :return: ``prior_logits.shape[:-1]``; exactly 0 for a query with no unmasked position.
    :raises ValueError: as :class:`~attention.estimators.Gumbel` and :func:`marginal_loss` do.
    """
    objective = Gumbel(num_samples, temperature, straight_through, generator)
    factors = AlignmentFactors.from_scores(prior_logits, log_lik, mask, posterior_logits)
    return evaluate(objective, factors)


# -- the dispatcher -------------------------------------------------------------------------------


def split_sampled(prior_logits: Tensor, log_lik: Tensor | None, samples: Tensor | None,
                  sampled_log_lik: Tensor | None) -> Tensor:
    """The full ``(..., S)`` log-likelihood the factors are built from: ``log_lik``, or, with
    ``sampled_log_lik`` (the log-likelihood at ``samples`` only), a zero stand-in read nowhere.

    The two are separate arguments because a shape cannot tell them apart: a ``(K, N)``
    ``sampled_log_lik`` and an ``(N, S)`` ``log_lik`` look alike when ``K = N = S``.

    :raises ValueError: if neither or both are given, if ``sampled_log_lik`` comes without
        ``samples``, or if ``log_lik`` is shaped like ``samples`` but not like the scores (the
        sampled log-likelihood passed in the wrong place); or if ``prior_logits`` is not a valid
        score tensor (the stand-in needs it).
    """
    if sampled_log_lik is None:
        if log_lik is None:
            raise ValueError(
                "log_lik is None: pass log_lik (..., S), the log-likelihood of every alignment, "
                "or, with samples=z, sampled_log_lik=(K, ...), the log-likelihood at z only"
            )
        if (isinstance(samples, Tensor) and isinstance(log_lik, Tensor)
                and isinstance(prior_logits, Tensor) and log_lik.shape == samples.shape
                and not broadcasts_to(log_lik.shape, prior_logits.shape)):
            raise ValueError(
                f"log_lik has shape {shape_of(log_lik)}, that of samples (K, ...), not of "
                f"prior_logits {shape_of(prior_logits)} (..., S); pass the log-likelihood at the "
                "samples as sampled_log_lik= (and log_lik=None)"
            )
        return log_lik
    if samples is None:
        raise ValueError(
            "sampled_log_lik (the log-likelihood at given alignments) needs samples=z, those "
            "alignments (K, ...); without samples pass log_lik (..., S)"
        )
    if log_lik is not None:
        raise ValueError(
            "give either log_lik (..., S), the log-likelihood of every alignment, or "
            "sampled_log_lik (K, ...), the log-likelihood at samples only, not both; pass "
            "log_lik=None with sampled_log_lik"
        )
    check_scores("prior_logits", prior_logits, None, None)
    return prior_logits.new_zeros(()).expand(prior_logits.shape)


def objective_for(mode: str, posterior: bool, num_samples: int, baseline: BaselineName | None,
                  baseline_log_lik: Tensor | None, ema: EMABaseline | None, temperature: float,
                  straight_through: bool, generator: torch.Generator | None,
                  samples: Tensor | None, sampled_log_lik: Tensor | None) -> Objective:
    """The objective of ``mode`` with its own options: the conversion of the flat options of
    :func:`alignment_loss` and :meth:`attention.modules.LatentAlignmentAttention.loss` (the
    same list, in the same order) into one typed objective, shared by both.

    :param posterior: whether posterior logits come with the call.
    :param sampled_log_lik: the log-likelihood at ``samples`` only (``(K, ...)``), else
        ``None``.
    :raises ValueError: on an unknown mode, a variational mode without a posterior, an option
        that ``mode`` would ignore (each error says which modes take it), or an invalid option of
        the mode's own (raised by :class:`~attention.estimators.Reinforce` /
        :class:`~attention.estimators.Gumbel`).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes are {', '.join(map(repr, MODES))}")
    if mode in _VARIATIONAL_MODES and not posterior:
        raise ValueError(
            f"mode {mode!r} needs posterior_logits (..., S), the scores of q(z); pass them or use "
            "mode='marginal' / 'hard-enum'"
        )
    check_num_samples(num_samples)
    sampling, exact = mode in _SAMPLE_MODES, mode not in _SAMPLE_MODES and mode != "gumbel"
    unused = [  # (given but not an option of this mode, the error)
        (samples is not None and not sampling,
         f"samples only apply to the modes 'hard-sample' and 'variational-sample', not mode "
         f"{mode!r}"),
        (posterior and mode not in _VARIATIONAL_MODES and mode != "gumbel",
         f"mode {mode!r} does not use posterior_logits; drop them or use a variational mode "
         "('variational-enum', 'variational-sample') or 'gumbel'"),
        (baseline is not None and not sampling,
         f"baseline={baseline!r} only applies to the REINFORCE modes 'hard-sample' and "
         f"'variational-sample', not mode {mode!r}"),
        (baseline_log_lik is not None and not sampling,
         "baseline_log_lik is only used with baseline='soft', not None"),
        (ema is not None and not sampling, "ema is only used with baseline='ema', not None"),
        (num_samples != 1 and exact,
         f"num_samples={num_samples} has no effect in the exact mode {mode!r}"),
        (generator is not None and exact, f"generator has no effect in the exact mode {mode!r}"),
        ((temperature != 1.0 or straight_through) and mode != "gumbel",
         f"temperature and straight_through only apply to mode='gumbel', not mode {mode!r}"),
    ]
    for given, message in unused:
        if given:
            raise ValueError(message)
    if sampling:
        return Reinforce(num_samples, baseline, baseline_log_lik, ema, generator, samples,
                         sampled_log_lik)
    if mode == "gumbel":
        return Gumbel(num_samples, temperature, straight_through, generator)
    if mode == "marginal":
        return Marginal()
    return Jensen() if mode == "hard-enum" else Elbo()


def alignment_loss(
    prior_logits: Tensor,
    log_lik: Tensor | None,
    mask: Tensor | None = None,
    mode: Mode = "marginal",
    posterior_logits: Tensor | None = None,
    *,
    num_samples: int = 1,
    baseline: BaselineName | None = None,
    baseline_log_lik: Tensor | None = None,
    ema: EMABaseline | None = None,
    temperature: float = 1.0,
    straight_through: bool = False,
    generator: torch.Generator | None = None,
    samples: Tensor | None = None,
    sampled_log_lik: Tensor | None = None,
) -> Tensor:
    r"""The latent-alignment loss of each query position (Deng et al., 2018).

    With :math:`p(z) = \mathrm{softmax}(\text{prior\_logits})`,
    :math:`q(z) = \mathrm{softmax}(\text{posterior\_logits})` (both over unmasked positions) and
    :math:`\ell_z = \log p(y \mid x, z)` = ``log_lik``:

    .. math::

        \text{marginal:}\quad & -\log \textstyle\sum_z p(z)\, e^{\ell_z} \\
        \text{hard-enum:}\quad & -\textstyle\sum_z p(z)\, \ell_z \\
        \text{variational-enum:}\quad & -\textstyle\sum_z q(z)\, \ell_z
            + \mathrm{KL}(q \,\|\, p)

    ``alignment_loss`` is a dispatcher: it rejects the options ``mode`` would ignore and calls
    the mode's own function, :func:`marginal_loss`, :func:`jensen_loss`, :func:`elbo_loss`,
    :func:`reinforce_loss` (``"hard-sample"``; ``"variational-sample"`` with
    ``posterior_logits``) or :func:`gumbel_loss`; their docstrings say which work is an engine
    query and which is plain torch.

    ``hard-enum >= marginal`` and ``variational-enum >= marginal`` (Jensen), with equality for
    ``variational-enum`` when :math:`q` is the exact posterior.

    ``"hard-sample"`` / ``"variational-sample"`` draw :math:`K` = ``num_samples`` alignments
    :math:`z_k` from :math:`p` / :math:`q` with :func:`~attention.queries.sample_alignments` and
    return the REINFORCE surrogate

    .. math::

        -\frac{1}{K} \sum_k \Big[\ell_{z_k} + \mathrm{sg}(\ell_{z_k} - b_k)\,
        \big(\log r(z_k) - \mathrm{sg}(\log r(z_k))\big)\Big]
        \ \big(+\, \mathrm{KL}(q \,\|\, p) \text{ exact, variational}\big)

    (``sg`` = stop-gradient, :math:`r = p` or :math:`q`): its *value* is the Monte Carlo estimate
    of the ``*-enum`` loss and its *gradient* is an unbiased estimate of that loss's gradient
    (score-function term plus the pathwise term through ``log_lik``). Baselines :math:`b_k`:

    * ``None``: :math:`b = 0`;
    * ``"soft"``: :math:`b` = ``baseline_log_lik`` (detached), the log-likelihood under soft
      attention, as in the paper; add ``-baseline_log_lik`` to your loss to train that model;
    * ``"ema"``: :math:`b` = ``ema.value`` (see :class:`~attention.estimators.EMABaseline`;
      updated in place);
    * ``"loo"``: :math:`b_k = \frac{1}{K - 1} \sum_{j \ne k} \ell_{z_j}` (needs :math:`K \ge 2`).

    ``"gumbel"`` draws ``num_samples`` relaxed one-hot vectors
    :math:`w = \mathrm{softmax}((\log r + g) / \tau)`, :math:`g` i.i.d. Gumbel, :math:`r = q`
    when ``posterior_logits`` is given, else :math:`p`, and returns the average of
    :math:`-\sum_z w_z \ell_z` (:math:`+ \mathrm{KL}(q \,\|\, p)` with a posterior). With
    ``straight_through=True`` the forward value uses the hard one-hot :math:`\arg\max_z w_z` (an
    exact sample of :math:`r`, so the value and the gradient w.r.t. ``log_lik`` are unbiased) and
    the backward pass the relaxed :math:`w`. The gradient w.r.t. the logits is biased for every
    :math:`\tau > 0`; the bias shrinks as :math:`\tau \to 0` while the variance grows.

    :param prior_logits: ``(..., S)`` unnormalised scores of :math:`p(z \mid x)`.
    :param log_lik: ``(..., S)`` (broadcastable) :math:`\log p(y \mid x, z)` per alignment, same
        dtype. Values at masked positions are ignored, even NaN or ``inf``. ``None`` exactly
        when ``sampled_log_lik`` is given.
    :param mask: ``(..., S)`` (broadcastable) bool, ``True`` for real source positions.
    :param mode: one of :data:`~attention.typing.MODES`.
    :param posterior_logits: ``(..., S)`` (broadcastable) unnormalised scores of :math:`q(z)`;
        required by the variational modes, optional for ``"gumbel"``, rejected otherwise.
    :param num_samples: :math:`K`, samples per query (sampling modes and ``"gumbel"``).
    :param baseline: ``None`` or one of :data:`~attention.typing.BASELINES` (sampling modes only).
    :param baseline_log_lik: ``(...)`` (broadcastable) soft-attention log-likelihood, for
        ``baseline="soft"``.
    :param ema: the running mean for ``baseline="ema"``; updated in place (a side effect).
    :param temperature: :math:`\tau > 0` of ``"gumbel"``.
    :param straight_through: hard forward, relaxed backward (``"gumbel"``).
    :param generator: random generator for the sampling modes and ``"gumbel"`` (see
        :func:`~attention.queries.sample_alignments` for how the engine's sampler uses it).
    :param samples: sampling modes only: ``(K, ...)`` alignments in ``[0, S)`` already drawn
        from :math:`r` (with :func:`~attention.queries.sample_alignments` on the same scores;
        ``K`` replaces ``num_samples``). ``log_lik`` ``(..., S)`` is then read at the samples
        only. An alignment outside ``[0, S)`` is named by a :class:`ValueError` on the CPU; on an
        accelerator it trips :func:`torch.gather`'s device-side assert (checking beforehand
        would cost a host-device sync on every call).
    :param sampled_log_lik: with ``samples`` only: ``(K, ...)``, the log-likelihood at those
        alignments, given in place of ``log_lik`` (pass ``log_lik=None``), so the output layer
        runs for ``K`` alignments instead of all ``S``. A separate argument because shapes
        cannot tell the two apart (``(K, N)`` and ``(N, S)`` when ``K = N = S``).
    :return: the loss per query, shape ``prior_logits.shape[:-1]``, differentiable; exactly 0 for
        a query with no unmasked position.
    :raises ValueError: on shape or dtype mismatches, an unknown mode or baseline, a variational
        mode without ``posterior_logits``, ``"loo"`` with ``num_samples < 2``, ``"soft"`` without
        ``baseline_log_lik``, ``"ema"`` without ``ema``, an argument the mode would ignore,
        neither or both of ``log_lik`` and ``sampled_log_lik``, or ``samples`` outside
        ``[0, S)`` (named with the first bad value).
    """
    full_log_lik = split_sampled(prior_logits, log_lik, samples, sampled_log_lik)
    objective = objective_for(mode, posterior_logits is not None, num_samples, baseline,
                              baseline_log_lik, ema, temperature, straight_through, generator,
                              samples, sampled_log_lik)
    factors = AlignmentFactors.from_scores(prior_logits, full_log_lik, mask, posterior_logits)
    return evaluate(objective, factors)
