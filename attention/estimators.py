r"""The estimators of the sampling objectives, and their baselines and schedules.

* :class:`Reinforce` -- the score-function (REINFORCE) surrogate of
  :math:`\mathbb{E}_r[\log p(y \mid x, z)]`, with the baselines of
  :data:`~attention.typing.BASELINES` (:class:`EMABaseline` keeps the running mean of ``"ema"``);
  its alignments are engine samples.
* :class:`Gumbel` -- the Gumbel-softmax (concrete) relaxation, plain torch.
* :class:`JensenWarmup` -- the Jensen-bound warm-up schedule of relaxed (Dirichlet) attention.

:class:`Reinforce` and :class:`Gumbel` are the typed options of one call of
:func:`attention.objectives.reinforce_loss` / :func:`attention.objectives.gumbel_loss`: each
constructor checks its own options, and :meth:`Reinforce.per_query` / :meth:`Gumbel.per_query`
compute the loss of every query of an :class:`attention.factors.AlignmentFactors`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .checks import check_baseline_log_lik, check_num_samples, shape_of
from .factors import AlignmentFactors, weighted_sum
from .queries import engine_sample
from .typing import BASELINES, BaselineName, Phase

__all__ = ["EMABaseline", "Gumbel", "JensenWarmup", "Reinforce"]


class EMABaseline:
    """A running mean of the REINFORCE reward, for ``baseline="ema"`` of
    :func:`~attention.objectives.alignment_loss` (and :class:`Reinforce`).

    Each call with ``ema=self`` first reads :attr:`value` (the baseline for that call's samples,
    so it does not depend on them and the gradient stays unbiased), then
    updates it in place with that call's detached mean reward :math:`\\bar r` over the queries with
    at least one unmasked position:

    .. math::

        v \\leftarrow \\bar r \\ \\text{(first update)}, \\qquad
        v \\leftarrow \\text{decay}\\, v + (1 - \\text{decay})\\, \\bar r \\ \\text{(later)}.

    Before the first update the baseline is 0. :attr:`value` stays a tensor on the reward's
    device (no host-device sync). A reward of :math:`-\\infty` (a sample where the
    log-likelihood is :math:`-\\infty`) is left out of :math:`\\bar r`, so one such sample cannot
    make the baseline :math:`-\\infty` for every later call.

    :param decay: the weight of the old value, in ``[0, 1)``.
    :raises ValueError: if ``decay`` is outside ``[0, 1)``.
    """

    def __init__(self, decay: float = 0.99) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMABaseline decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        #: the running mean (a 0-dim tensor), or ``None`` before the first update.
        self.value: Tensor | None = None
        #: how many updates have been made.
        self.num_updates = 0

    def update(self, mean_reward: Tensor) -> None:
        """Fold one detached mean reward (a 0-dim tensor) into :attr:`value`."""
        reward = mean_reward.detach()
        if self.value is None:
            self.value = reward.clone()
        else:
            self.value = self.decay * self.value.to(reward) + (1.0 - self.decay) * reward
        self.num_updates += 1

    def __repr__(self) -> str:
        return f"EMABaseline(decay={self.decay}, num_updates={self.num_updates})"


class JensenWarmup:
    """The pretraining schedule of relaxed (Dirichlet) variational attention.

    Deng et al. (2018) found the relaxed objective hard to train from scratch: train first with
    the Jensen bound (``mode="hard-enum"`` of :func:`~attention.objectives.alignment_loss`), then
    switch, or anneal linearly over ``anneal_steps``, to the relaxed objective:

    .. math::

        \\mathcal{L}_t = w_t\\, \\mathcal{L}_{\\text{Jensen}} + (1 - w_t)\\,
        \\mathcal{L}_{\\text{relaxed}}, \\qquad
        w_t = \\begin{cases} 1 & t < \\text{steps} \\\\
        1 - (t - \\text{steps} + 1) / (\\text{anneal\\_steps} + 1)
        & \\text{steps} \\le t < \\text{steps} + \\text{anneal\\_steps} \\\\
        0 & \\text{otherwise.} \\end{cases}

    >>> from attention.functional import JensenWarmup
    >>> schedule = JensenWarmup(2, anneal_steps=1)
    >>> [schedule.weight(step) for step in range(4)], [schedule.mode(step) for step in range(4)]
    ([1.0, 1.0, 0.5, 0.0], ['jensen', 'jensen', 'anneal', 'relaxed'])

    :param steps: number of pure Jensen steps (``>= 0``).
    :param anneal_steps: number of mixed steps after them (``>= 0``; 0 switches at once).
    :raises ValueError: on negative step counts.
    """

    def __init__(self, steps: int, anneal_steps: int = 0) -> None:
        if steps < 0 or anneal_steps < 0:
            raise ValueError(
                f"JensenWarmup needs steps >= 0 and anneal_steps >= 0, got steps={steps}, "
                f"anneal_steps={anneal_steps}"
            )
        self.steps = int(steps)
        self.anneal_steps = int(anneal_steps)

    def weight(self, step: int) -> float:
        """The weight :math:`w_t \\in [0, 1]` of the Jensen objective at ``step`` (from 0)."""
        if step < self.steps:
            return 1.0
        into_anneal = step - self.steps + 1
        if into_anneal <= self.anneal_steps:
            return 1.0 - into_anneal / (self.anneal_steps + 1)
        return 0.0

    def mode(self, step: int) -> Phase:
        """``"jensen"`` while :math:`w_t = 1`, ``"anneal"`` while :math:`0 < w_t < 1`, then
        ``"relaxed"``."""
        weight = self.weight(step)
        if weight >= 1.0:
            return "jensen"
        return "anneal" if weight > 0.0 else "relaxed"

    def __repr__(self) -> str:
        return f"JensenWarmup(steps={self.steps}, anneal_steps={self.anneal_steps})"



@dataclass(frozen=True, eq=False)
class Reinforce:
    r"""The REINFORCE surrogate of :math:`\mathbb{E}_r[\ell_z]`, :math:`\ell_z = \log p(y \mid
    x, z)`, :math:`r = q` with a posterior, else :math:`p`: the options of one call, checked once.

    With :math:`K` alignments :math:`z_k \sim r` (engine samples, or ``samples``), the surrogate
    of each query is

    .. math::

        \frac{1}{K} \sum_k \Big[\ell_{z_k} + \mathrm{sg}(\ell_{z_k} - b_k)\,
        \big(\log r(z_k) - \mathrm{sg}(\log r(z_k))\big)\Big]

    (``sg`` = stop-gradient): its value is the Monte Carlo estimate of :math:`\mathbb{E}_r[\ell_z]`
    and its gradient an unbiased estimate of that expectation's gradient. Baselines :math:`b_k`:
    ``None`` (0), ``"soft"`` (``baseline_log_lik``, detached), ``"ema"`` (``ema.value``, then
    ``ema`` is updated in place) and ``"loo"`` (the mean reward of the other :math:`K - 1`).

    :ivar num_samples: :math:`K`, ``>= 1``; with ``samples`` it must be 1 or ``samples``' ``K``.
    :ivar baseline: ``None`` or one of :data:`~attention.typing.BASELINES`.
    :ivar baseline_log_lik: ``(...)`` (broadcastable to the queries) soft-attention
        log-likelihood, for ``baseline="soft"`` only.
    :ivar ema: the running mean for ``baseline="ema"`` only.
    :ivar generator: the random generator of the engine's sampler, or ``None`` (torch's global
        RNG); not with ``samples``.
    :ivar samples: ``(K, ...)`` long alignments already drawn from :math:`r`, or ``None``.
    :ivar sampled_log_lik: ``(K, ...)`` :math:`\ell` at ``samples`` only, or ``None`` (read from
        the factors' full ``log_lik``).
    :raises ValueError: on an unknown baseline, a baseline without the data it needs, data for a
        baseline not chosen, ``num_samples < 1``, ``"loo"`` with :math:`K < 2`, ``samples``
        that are not long or come with ``num_samples`` or ``generator``, or a
        ``sampled_log_lik`` without ``samples`` or not shaped like them.

    A sample whose reward :math:`\ell_{z_k}` is :math:`-\infty` gives the query a loss of
    :math:`+\infty`; its score-function term (whose weight :math:`\ell_{z_k} - b_k` is not
    finite) is dropped, so that the loss is :math:`+\infty`, not NaN, and a row left out of the
    summed loss gets zero gradients.
    """

    num_samples: int = 1
    baseline: BaselineName | None = None
    baseline_log_lik: Tensor | None = None
    ema: EMABaseline | None = None
    generator: torch.Generator | None = None
    samples: Tensor | None = None
    sampled_log_lik: Tensor | None = None

    def __post_init__(self) -> None:
        samples = self.samples
        if samples is not None:
            if samples.dtype != torch.long or samples.dim() < 1:
                raise ValueError(f"samples must be a long tensor (K, *prior_logits.shape[:-1]), "
                                 f"got {samples.dtype} {shape_of(samples)}")
            if self.generator is not None or self.num_samples not in (1, samples.shape[0]):
                raise ValueError("with samples given, draw them with your generator and leave "
                                 "num_samples and generator unset")
        sampled = self.sampled_log_lik
        if sampled is not None:
            if samples is None:
                raise ValueError("sampled_log_lik (the log-likelihood at given alignments) needs "
                                 "samples=z, those alignments (K, ...)")
            if not isinstance(sampled, Tensor) or not sampled.dtype.is_floating_point:
                what = sampled.dtype if isinstance(sampled, Tensor) else type(sampled).__name__
                raise ValueError(f"sampled_log_lik must be a floating tensor, got {what}")
            if sampled.shape != samples.shape:
                raise ValueError(f"sampled_log_lik has shape {shape_of(sampled)}; it must be "
                                 f"shaped like samples {shape_of(samples)} (K, ...)")
        baseline = self.baseline
        if baseline is not None and baseline not in BASELINES:
            raise ValueError(
                f"unknown baseline {baseline!r}; valid baselines are None, "
                f"{', '.join(map(repr, BASELINES))}"
            )
        if baseline == "soft" and self.baseline_log_lik is None:
            raise ValueError(
                "baseline='soft' needs baseline_log_lik (...), the log-likelihood of y under soft "
                "attention for each query"
            )
        if self.baseline_log_lik is not None and baseline != "soft":
            raise ValueError(
                f"baseline_log_lik is only used with baseline='soft', not {baseline!r}")
        if baseline == "ema" and self.ema is None:
            raise ValueError(
                "baseline='ema' needs ema=EMABaseline(...), the running mean it updates")
        if self.ema is not None and baseline != "ema":
            raise ValueError(f"ema is only used with baseline='ema', not {baseline!r}")
        check_num_samples(self.num_samples)
        if baseline == "loo" and self.draws < 2:
            raise ValueError(
                f"baseline='loo' (leave-one-out) needs num_samples >= 2, got "
                f"num_samples={self.draws}"
            )

    @property
    def draws(self) -> int:
        """:math:`K`: the number of ``samples`` when given, else ``num_samples``."""
        return self.num_samples if self.samples is None else self.samples.shape[0]

    def per_query(self, factors: AlignmentFactors) -> Tensor:
        r"""The REINFORCE loss of each query, ``(N,)``: minus the surrogate, plus the exact
        :math:`\mathrm{KL}(q \,\|\, p)` when ``factors`` has a posterior.

        :raises ValueError: if ``samples`` or ``baseline_log_lik`` do not fit the queries of
            ``factors``.
        """
        num_queries, draws = factors.num_queries, self.draws
        if self.samples is not None and self.samples.shape[1:] != factors.shape:
            raise ValueError(f"samples must be a long tensor (K, *prior_logits.shape[:-1]) = "
                             f"(K, *{tuple(factors.shape)}), got {self.samples.dtype} "
                             f"{shape_of(self.samples)}")
        if self.baseline_log_lik is not None:
            size = factors.log_prior.shape[-1]
            check_baseline_log_lik(self.baseline_log_lik, torch.Size(factors.shape + (size,)))
        if num_queries == 0:
            return factors.empty()
        log_sampled = factors.sampling_logits()
        if self.samples is None:
            drawn = engine_sample(log_sampled.detach(), draws, self.generator)  # (K, N)
        else:
            drawn = self.samples.reshape(draws, num_queries)
        try:
            if self.sampled_log_lik is None:
                reward_log_lik = _pick(factors.log_lik, drawn)  # (N, K)
            else:
                reward_log_lik = self.sampled_log_lik.reshape(draws, num_queries).transpose(0, 1)
            log_sampled_at = _pick(log_sampled, drawn)
        except RuntimeError as err:  # gather's own bounds check (on the CPU): name the culprit
            if self.samples is None or "out of bounds" not in str(err):
                raise
            raise _out_of_range(self.samples, log_sampled.shape[-1]) from err
        reward = reward_log_lik.detach()
        baseline = self._baseline(reward, factors)
        score = log_sampled_at - log_sampled_at.detach()  # value 0, gradient of log r(z)
        # a reward of -inf makes the loss +inf whatever the weight; its weight (inf or NaN)
        # would turn score's value 0 into NaN, so it is dropped
        advantage = reward - baseline
        advantage = torch.where(torch.isfinite(advantage), advantage, 0.0)
        loss = -(reward_log_lik + advantage * score).mean(-1)
        return loss if factors.log_posterior is None else loss + factors.kl()

    def _baseline(self, reward: Tensor, factors: AlignmentFactors) -> Tensor | float:
        """The baseline :math:`b` of the rewards ``(N, K)``. Dispatched on the data the
        constructor tied to each baseline: ``baseline_log_lik`` is given exactly for ``"soft"``,
        ``ema`` exactly for ``"ema"``. For ``"ema"`` it reads ``ema.value`` first and then folds
        in this call's mean reward over the queries with a real position."""
        baseline_log_lik, ema = self.baseline_log_lik, self.ema
        if baseline_log_lik is not None:  # "soft"
            return (baseline_log_lik.detach().to(reward.dtype).expand(factors.shape)
                    .reshape(factors.num_queries, 1))
        if ema is not None:  # "ema"
            value: Tensor | float = 0.0 if ema.value is None else ema.value.to(reward)
            counted = torch.isfinite(reward)  # a -inf reward would poison every later baseline
            if factors.row_ok is not None:
                counted = counted & factors.row_ok.unsqueeze(-1)
            weight = counted.to(reward.dtype)
            mean = (torch.where(counted, reward, 0.0).sum()
                    / weight.sum().clamp(min=1.0))
            ema.update(mean)
            return value
        if self.baseline == "loo":
            return (reward.sum(-1, keepdim=True) - reward) / (self.draws - 1)
        return 0.0


@dataclass(frozen=True, eq=False)
class Gumbel:
    r"""The Gumbel-softmax (concrete) relaxation: the options of one call, checked once.

    Draws ``num_samples`` relaxed one-hot vectors :math:`w = \mathrm{softmax}((\log r + g) /
    \tau)`, :math:`g` i.i.d. Gumbel, :math:`r = q` with a posterior, else :math:`p`, and scores
    :math:`-\sum_z w_z \ell_z` (:math:`+ \mathrm{KL}(q \,\|\, p)` with a posterior). With
    ``straight_through`` the forward value uses the hard one-hot :math:`\arg\max_z w_z` and the
    backward pass the relaxed :math:`w`. Plain torch (no engine query).

    :ivar num_samples: draws per query, ``>= 1``.
    :ivar temperature: :math:`\tau > 0`.
    :ivar straight_through: hard forward, relaxed backward.
    :ivar generator: random generator of the Gumbel noise, or ``None`` (torch's global RNG).
    :raises ValueError: if ``num_samples < 1`` or ``temperature <= 0``.

    The weighted sum reads the log-likelihood only where a draw's weight is not exactly 0
    (``0 * anything = 0``; the straight-through weights still get the gradient
    :math:`\ell_z` everywhere it is finite), and a :math:`-\infty` log-likelihood at a weighted
    position makes the loss :math:`+\infty`, a constant with zero gradients
    (:func:`~attention.factors.weighted_sum`), not NaN.
    """

    num_samples: int = 1
    temperature: float = 1.0
    straight_through: bool = False
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        check_num_samples(self.num_samples)
        if not self.temperature > 0.0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    def weights(self, log_sampled: Tensor) -> Tensor:
        """``(K, N, S)`` relaxed one-hot weights of ``log_sampled`` ``(N, S)`` (hard forward
        with ``straight_through``)."""
        noise_shape = (self.num_samples,) + tuple(log_sampled.shape)
        uniform = torch.rand(noise_shape, dtype=log_sampled.dtype, device=log_sampled.device,
                             generator=self.generator)
        finfo = torch.finfo(log_sampled.dtype)
        gumbel = -(-uniform.clamp(min=finfo.tiny, max=1.0 - finfo.eps).log()).log()
        relaxed = torch.softmax((log_sampled + gumbel) / self.temperature, dim=-1)
        if not self.straight_through:
            return relaxed
        # not F.one_hot: it checks the index range on the host (a device sync)
        hard = torch.zeros_like(relaxed).scatter_(-1, relaxed.argmax(-1, keepdim=True), 1.0)
        return hard + (relaxed - relaxed.detach())

    def per_query(self, factors: AlignmentFactors) -> Tensor:
        r"""The relaxed loss of each query, ``(N,)``: the mean over draws of
        :math:`-\sum_z w_z \ell_z`, plus the exact :math:`\mathrm{KL}(q \,\|\, p)` with a
        posterior."""
        weights = self.weights(factors.sampling_logits())
        log_lik = factors.log_lik
        support = (weights != 0) | torch.isfinite(log_lik)
        loss = -weighted_sum(weights, log_lik, support).mean(0)
        return loss if factors.log_posterior is None else loss + factors.kl()


def _out_of_range(samples: Tensor, size: int) -> ValueError:
    """The error for given alignments outside ``[0, size)``, naming the first such alignment and
    its position. Built only once :func:`torch.gather` has refused them (on the CPU, where its
    bounds check is free): checking beforehand would cost a host-device sync on every call, and
    on an accelerator gather's own check is a device-side assert."""
    bad = (samples < 0) | (samples >= size)
    where = tuple(int(i) for i in bad.nonzero()[0])
    return ValueError(
        f"samples[{', '.join(map(str, where))}] = {int(samples[where])} is not a source "
        f"position: alignments must lie in [0, {size}) (S = {size}, prior_logits' last dim); "
        "draw them with sample_alignments on the same scores"
    )


def _pick(values: Tensor, drawn: Tensor) -> Tensor:
    """``values`` ``(N, S)`` at the alignments ``drawn`` ``(K, N)``: ``(N, K)``."""
    return values.gather(-1, drawn.transpose(0, 1))
