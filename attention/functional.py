r"""Latent-alignment objectives and estimators as pure functions.

The model of Deng et al. (2018), "Latent Alignment and Variational Attention" (NeurIPS), explains
each output :math:`y` (one target word, one answer) by a latent alignment :math:`z`, the source
position or frame it attends to:

.. math::

    p(y \mid x) = \sum_{z=1}^{S} p(z \mid x)\, p(y \mid x, z).

Every function here takes per-alignment scores shaped ``(..., S)``: the leading dims are query
positions (batch, target position, head, ...), the last dim is :math:`z`. Inside, :math:`z` is a
variable of a :class:`plated.PlatedFactorGraph` with one plate, ``"query"``, over the flattened
leading dims, and two factors, :math:`\log p(z \mid x)` and :math:`\log p(y \mid x, z)`. Exact
marginal likelihood, the normalisation of :math:`p(z \mid x)` and :math:`q(z)`, posterior
marginals, MAP alignments and alignment samples are engine queries (``log_partition``,
``marginals``, ``map``, ``sample``); the graph is built with ``validate=False`` (no host-device
sync) and its plan comes from the engine's plan cache, keyed by ``(number of queries, S, dtype)``.
The relaxed estimators (Gumbel-softmax, Dirichlet) are not alignment enumeration and bypass the
engine.

Masks. ``mask`` is a bool tensor broadcastable to the scores, ``True`` for real source positions.
A masked position gets probability exactly zero: its logits become ``-inf`` and its ``log_lik`` is
replaced by 0 with :func:`torch.where` (never multiplied), so NaN or ``inf`` there cannot leak into
values or gradients. A query with no unmasked position has loss exactly 0 and zero gradients: its
scores are replaced by constants before any arithmetic (so no ``-inf - -inf``), and its result is
zeroed at the end.

Objectives (``mode`` of :func:`alignment_loss`, all returned as losses, i.e. negated):

* ``"marginal"`` -- :math:`-\log \sum_z p(z \mid x) p(y \mid x, z)`, exact (an engine
  ``log_partition``).
* ``"hard-enum"`` -- the Jensen bound :math:`-\sum_z p(z \mid x) \log p(y \mid x, z)`, enumerated.
* ``"variational-enum"`` -- the negative ELBO
  :math:`-\big(\sum_z q(z) \log p(y \mid x, z) - \mathrm{KL}(q \,\|\, p)\big)`, enumerated.
* ``"hard-sample"``, ``"variational-sample"`` -- REINFORCE surrogates of the two bounds above.
* ``"gumbel"`` -- Gumbel-softmax (concrete) relaxation of ``"hard-*"`` / ``"variational-*"``.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from plated import Factor, Plate, PlatedFactorGraph

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

# -- option types, in one place -------------------------------------------------------------------

#: The objectives of :func:`alignment_loss`.
Mode = Literal[
    "marginal", "hard-enum", "variational-enum", "hard-sample", "variational-sample", "gumbel"
]
#: The REINFORCE baselines of :func:`alignment_loss`.
BaselineName = Literal["soft", "ema", "loo"]
#: The phases of a :class:`JensenWarmup` schedule.
Phase = Literal["jensen", "anneal", "relaxed"]

MODES: tuple[str, ...] = get_args(Mode)
BASELINES: tuple[str, ...] = get_args(BaselineName)
_ENUM_MODES = ("marginal", "hard-enum", "variational-enum")
_SAMPLE_MODES = ("hard-sample", "variational-sample")
_VARIATIONAL_MODES = ("variational-enum", "variational-sample")

_PLATE = "query"
_VAR = "z"
_DIMS = (_PLATE, _VAR)


# -- the engine face ------------------------------------------------------------------------------


def _plate(n: int) -> Plate:
    return Plate(_PLATE, n)  # cheap; plans are cached by the engine, not here


def _graph(*tensors: Tensor) -> PlatedFactorGraph:
    """The alignment graph: one plate ``query`` of size ``N`` and ``z`` of size ``S``, with one
    factor ``(query, z)`` per tensor ``(N, S)``; ``log_partition`` keeps the plate."""
    return PlatedFactorGraph(
        [Factor(t, _DIMS) for t in tensors],
        [_plate(tensors[0].shape[0])],
        keep_plates=(_PLATE,),
        validate=False,
    )


def _log_normalize(logits: Tensor) -> Tensor:
    """``logits - log sum_z exp(logits)`` per query, the normaliser from the engine; a row that is
    all ``-inf`` stays all ``-inf`` (its probabilities are all 0) instead of becoming NaN."""
    logz = _graph(logits).log_partition()
    return logits - torch.where(torch.isfinite(logz), logz, 0.0).unsqueeze(-1)


def _engine_sample(logits: Tensor, num_samples: int, generator: torch.Generator | None) -> Tensor:
    """``(num_samples, N)`` draws of ``z`` from the engine (forward sum-product, backward sample),
    with ``generator`` (on ``logits``' device) or torch's global RNG."""
    out: Tensor = _graph(logits).sample(num_samples, generator=generator)[_VAR]
    return out


# -- argument checks ------------------------------------------------------------------------------


def _shape(x: Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def _check_scores(name: str, x: object, shape: torch.Size | None, dtype: torch.dtype | None
                  ) -> None:
    """``x`` must be a floating tensor ``(..., S)`` broadcastable to ``shape`` (when given)."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} must have a floating dtype, got {x.dtype}")
    if shape is None:
        if x.dim() < 1 or x.shape[-1] < 1:
            raise ValueError(
                f"{name} has shape {_shape(x)}; expected (..., S) with at least one source "
                "position S >= 1"
            )
        return
    if dtype is not None and x.dtype != dtype:
        raise ValueError(
            f"{name} has dtype {x.dtype} but prior_logits has {dtype}; convert them to one dtype"
        )
    if not _broadcasts_to(x.shape, shape):
        raise ValueError(
            f"{name} has shape {_shape(x)}, which does not broadcast to prior_logits' shape "
            f"{tuple(shape)} (..., S)"
        )


def _broadcasts_to(src: torch.Size, dst: torch.Size) -> bool:
    try:
        return torch.broadcast_shapes(src, dst) == dst
    except RuntimeError:
        return False


def _check_baseline_log_lik(x: object, shape: torch.Size) -> None:
    """``x`` must be a floating tensor broadcastable to the query shape ``shape[:-1]``."""
    if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
        what = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"baseline_log_lik must be a floating tensor, got {what}")
    if not _broadcasts_to(x.shape, shape[:-1]):
        raise ValueError(
            f"baseline_log_lik has shape {_shape(x)}, which does not broadcast to the query shape "
            f"{tuple(shape[:-1])} (prior_logits' shape {tuple(shape)} without S)"
        )


def _check_mask(mask: Tensor | None, shape: torch.Size, arg: str = "prior_logits"
                ) -> Tensor | None:
    """The mask broadcast to ``shape`` (a view), or ``None``."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        what = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a bool tensor (True = real source position), got {what}")
    if not _broadcasts_to(mask.shape, shape):
        raise ValueError(
            f"mask has shape {_shape(mask)}, which does not broadcast to {arg}' shape "
            f"{tuple(shape)} (..., S)"
        )
    return mask.expand(shape)


# -- masking --------------------------------------------------------------------------------------


def _mask_logits(logits: Tensor, mask: Tensor | None, row_ok: Tensor | None) -> Tensor:
    """Masked positions to ``-inf``; a query with no unmasked position to all zeros (a constant,
    so it gets zero gradient and no ``-inf - -inf`` downstream)."""
    if mask is None or row_ok is None:
        return logits
    return torch.where(row_ok, torch.where(mask, logits, -math.inf), 0.0)


def _mask_values(values: Tensor, mask: Tensor | None) -> Tensor:
    """Masked positions to 0 (their values, even NaN or ``inf``, are ignored)."""
    if mask is None:
        return values
    return torch.where(mask, values, 0.0)


def _expect(probs: Tensor, values: Tensor) -> Tensor:
    """``sum_z probs * values`` with the convention ``0 * anything = 0`` (values where the
    probability is 0, such as ``-inf`` or a masked NaN, touch neither value nor gradient)."""
    return (probs * torch.where(probs > 0, values, 0.0)).sum(-1)


def _kl(log_q: Tensor, log_p: Tensor) -> Tensor:
    """``KL(q || p) = sum_z q (log q - log p)`` over the last dim, with ``0 log 0 = 0``."""
    q = log_q.exp()
    return _expect(q, log_q - log_p)


def _pick(x: Tensor, z: Tensor) -> Tensor:
    """``x (N, S)`` at samples ``z (K, N)``: ``(N, K)``."""
    return x.gather(-1, z.transpose(0, 1))


# -- baselines and schedules ----------------------------------------------------------------------


class EMABaseline:
    """A running mean of the REINFORCE reward, for ``baseline="ema"`` of :func:`alignment_loss`.

    Each call of :func:`alignment_loss` with ``ema=self`` first reads :attr:`value` (the baseline
    for that call's samples, so it does not depend on them and the gradient stays unbiased), then
    updates it in place with that call's detached mean reward :math:`\\bar r` over the queries with
    at least one unmasked position:

    .. math::

        v \\leftarrow \\bar r \\ \\text{(first update)}, \\qquad
        v \\leftarrow \\text{decay}\\, v + (1 - \\text{decay})\\, \\bar r \\ \\text{(later)}.

    Before the first update the baseline is 0. :attr:`value` stays a tensor on the reward's
    device (no host-device sync).

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
        r = mean_reward.detach()
        if self.value is None:
            self.value = r.clone()
        else:
            self.value = self.decay * self.value.to(r) + (1.0 - self.decay) * r
        self.num_updates += 1

    def __repr__(self) -> str:
        return f"EMABaseline(decay={self.decay}, num_updates={self.num_updates})"


class JensenWarmup:
    """The pretraining schedule of relaxed (Dirichlet) variational attention.

    Deng et al. (2018) found the relaxed objective hard to train from scratch: train first with
    the Jensen bound (``mode="hard-enum"`` of :func:`alignment_loss`), then switch, or anneal
    linearly over ``anneal_steps``, to the relaxed objective:

    .. math::

        \\mathcal{L}_t = w_t\\, \\mathcal{L}_{\\text{Jensen}} + (1 - w_t)\\,
        \\mathcal{L}_{\\text{relaxed}}, \\qquad
        w_t = \\begin{cases} 1 & t < \\text{steps} \\\\
        1 - (t - \\text{steps} + 1) / (\\text{anneal\\_steps} + 1)
        & \\text{steps} \\le t < \\text{steps} + \\text{anneal\\_steps} \\\\
        0 & \\text{otherwise.} \\end{cases}

    >>> from attention.functional import JensenWarmup
    >>> s = JensenWarmup(2, anneal_steps=1)
    >>> [s.weight(t) for t in range(4)], [s.mode(t) for t in range(4)]
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
        k = step - self.steps + 1
        if k <= self.anneal_steps:
            return 1.0 - k / (self.anneal_steps + 1)
        return 0.0

    def mode(self, step: int) -> Phase:
        """``"jensen"`` while :math:`w_t = 1`, ``"anneal"`` while :math:`0 < w_t < 1`, then
        ``"relaxed"``."""
        w = self.weight(step)
        if w >= 1.0:
            return "jensen"
        return "anneal" if w > 0.0 else "relaxed"

    def __repr__(self) -> str:
        return f"JensenWarmup(steps={self.steps}, anneal_steps={self.anneal_steps})"


# -- the objective --------------------------------------------------------------------------------


def alignment_loss(
    prior_logits: Tensor,
    log_lik: Tensor,
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

    ``"marginal"`` is an engine ``log_partition`` of the graph :math:`\{\log p(z), \ell_z\}`; the
    normalisers of :math:`p` and :math:`q` are engine ``log_partition`` calls too.
    ``hard-enum >= marginal`` and ``variational-enum >= marginal`` (Jensen), with equality for
    ``variational-enum`` when :math:`q` is the exact posterior.

    ``"hard-sample"`` / ``"variational-sample"`` draw :math:`K` = ``num_samples`` alignments
    :math:`z_k` from :math:`p` / :math:`q` with :func:`sample_alignments` and return the
    REINFORCE surrogate

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
    * ``"ema"``: :math:`b` = ``ema.value`` (see :class:`EMABaseline`, updated in place);
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
        dtype. Values at masked positions are ignored, even NaN or ``inf``.
    :param mask: ``(..., S)`` (broadcastable) bool, ``True`` for real source positions.
    :param mode: one of :data:`MODES`.
    :param posterior_logits: ``(..., S)`` (broadcastable) unnormalised scores of :math:`q(z)`;
        required by the variational modes, optional for ``"gumbel"``, rejected otherwise.
    :param num_samples: :math:`K`, samples per query (sampling modes and ``"gumbel"``).
    :param baseline: ``None`` or one of :data:`BASELINES` (sampling modes only).
    :param baseline_log_lik: ``(...)`` (broadcastable) soft-attention log-likelihood, for
        ``baseline="soft"``.
    :param ema: the running mean for ``baseline="ema"``; updated in place (a side effect).
    :param temperature: :math:`\tau > 0` of ``"gumbel"``.
    :param straight_through: hard forward, relaxed backward (``"gumbel"``).
    :param generator: random generator for the sampling modes and ``"gumbel"`` (see
        :func:`sample_alignments` for how the engine's sampler uses it).
    :param samples: sampling modes only: ``(K, ...)`` alignments already drawn from :math:`r`
        (with :func:`sample_alignments` on the same scores; ``K`` replaces ``num_samples``).
        ``log_lik`` may then be ``(K, ...)``, the log-likelihood at those alignments only, so
        the output layer runs for ``K`` alignments instead of all ``S``; given as ``(..., S)``
        it is read at the samples only.
    :return: the loss per query, shape ``prior_logits.shape[:-1]``, differentiable; exactly 0 for
        a query with no unmasked position.
    :raises ValueError: on shape or dtype mismatches, an unknown mode or baseline, a variational
        mode without ``posterior_logits``, ``"loo"`` with ``num_samples < 2``, ``"soft"`` without
        ``baseline_log_lik``, ``"ema"`` without ``ema``, or an argument the mode would ignore.
    """
    _check_scores("prior_logits", prior_logits, None, None)
    shape = prior_logits.shape
    gathered = None
    if samples is not None:
        if mode not in _SAMPLE_MODES:
            raise ValueError(f"samples only apply to the modes 'hard-sample' and "
                             f"'variational-sample', not mode {mode!r}")
        if samples.dtype != torch.long or samples.dim() < 1 or samples.shape[1:] != shape[:-1]:
            raise ValueError(f"samples must be a long tensor (K, *prior_logits.shape[:-1]) = "
                             f"(K, *{tuple(shape[:-1])}), got {samples.dtype} "
                             f"{tuple(samples.shape)}")
        if generator is not None or num_samples not in (1, samples.shape[0]):
            raise ValueError("with samples given, draw them with your generator and leave "
                             "num_samples and generator unset")
        num_samples = samples.shape[0]
        if log_lik.shape == samples.shape:
            gathered = log_lik
            log_lik = prior_logits.new_zeros(()).expand(shape)  # read nowhere
    _check_options(mode, posterior_logits, num_samples, baseline, baseline_log_lik, ema,
                   temperature, straight_through, generator)
    _check_scores("log_lik", log_lik, shape, prior_logits.dtype)
    if posterior_logits is not None:
        _check_scores("posterior_logits", posterior_logits, shape, prior_logits.dtype)
    if baseline_log_lik is not None:
        _check_baseline_log_lik(baseline_log_lik, shape)
    m = _check_mask(mask, shape)

    batch, s = shape[:-1], shape[-1]
    n = math.prod(batch)
    if n == 0:
        return prior_logits.sum(-1) * 0.0
    row_ok = None if m is None else m.any(-1, keepdim=True)
    prior = _mask_logits(prior_logits, m, row_ok).reshape(n, s)
    ll = _mask_values(log_lik.expand(shape), m).reshape(n, s)
    log_p = _log_normalize(prior)
    log_q = None
    if posterior_logits is not None:
        post = _mask_logits(posterior_logits.expand(shape), m, row_ok).reshape(n, s)
        log_q = _log_normalize(post)

    if mode == "marginal":
        loss = -_graph(log_p, ll).log_partition()
    elif mode == "hard-enum":
        loss = -_expect(log_p.exp(), ll)
    elif mode == "variational-enum":
        assert log_q is not None
        loss = _kl(log_q, log_p) - _expect(log_q.exp(), ll)
    elif mode in _SAMPLE_MODES:
        ok = None if row_ok is None else row_ok.reshape(n, 1)
        base = None
        if baseline_log_lik is not None:
            base = baseline_log_lik.detach().to(ll.dtype).expand(batch).reshape(n, 1)
        log_r = log_p if log_q is None else log_q
        z = None if samples is None else samples.reshape(num_samples, n)
        ll_z = None if gathered is None else gathered.reshape(num_samples, n).transpose(0, 1)
        loss = -_reinforce(log_r, ll, num_samples, baseline, base, ema, ok, generator, z, ll_z)
        if log_q is not None:
            loss = loss + _kl(log_q, log_p)
    else:
        log_r = log_p if log_q is None else log_q
        w = _gumbel_weights(log_r, num_samples, temperature, straight_through, generator)
        loss = -(w * ll).sum(-1).mean(0)
        if log_q is not None:
            loss = loss + _kl(log_q, log_p)

    if row_ok is not None:
        loss = torch.where(row_ok.reshape(n), loss, 0.0)
    return loss.reshape(batch)


def _check_options(
    mode: str,
    posterior_logits: Tensor | None,
    num_samples: int,
    baseline: str | None,
    baseline_log_lik: Tensor | None,
    ema: EMABaseline | None,
    temperature: float,
    straight_through: bool,
    generator: torch.Generator | None,
) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes are {', '.join(map(repr, MODES))}")
    sampling = mode in _SAMPLE_MODES or mode == "gumbel"
    if mode in _VARIATIONAL_MODES and posterior_logits is None:
        raise ValueError(
            f"mode {mode!r} needs posterior_logits (..., S), the scores of q(z); pass them or use "
            "mode='marginal' / 'hard-enum'"
        )
    if posterior_logits is not None and mode not in _VARIATIONAL_MODES and mode != "gumbel":
        raise ValueError(
            f"mode {mode!r} does not use posterior_logits; drop them or use a variational mode "
            "('variational-enum', 'variational-sample') or 'gumbel'"
        )
    if baseline is not None and mode not in _SAMPLE_MODES:
        raise ValueError(
            f"baseline={baseline!r} only applies to the REINFORCE modes 'hard-sample' and "
            f"'variational-sample', not mode {mode!r}"
        )
    if baseline is not None and baseline not in BASELINES:
        raise ValueError(
            f"unknown baseline {baseline!r}; valid baselines are None, "
            f"{', '.join(map(repr, BASELINES))}"
        )
    if baseline == "soft" and baseline_log_lik is None:
        raise ValueError(
            "baseline='soft' needs baseline_log_lik (...), the log-likelihood of y under soft "
            "attention for each query"
        )
    if baseline_log_lik is not None and baseline != "soft":
        raise ValueError(f"baseline_log_lik is only used with baseline='soft', not {baseline!r}")
    if baseline == "ema" and ema is None:
        raise ValueError("baseline='ema' needs ema=EMABaseline(...), the running mean it updates")
    if ema is not None and baseline != "ema":
        raise ValueError(f"ema is only used with baseline='ema', not {baseline!r}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    if num_samples != 1 and not sampling:
        raise ValueError(f"num_samples={num_samples} has no effect in the exact mode {mode!r}")
    if baseline == "loo" and num_samples < 2:
        raise ValueError(
            f"baseline='loo' (leave-one-out) needs num_samples >= 2, got num_samples={num_samples}"
        )
    if generator is not None and not sampling:
        raise ValueError(f"generator has no effect in the exact mode {mode!r}")
    if mode != "gumbel" and (temperature != 1.0 or straight_through):
        raise ValueError(
            f"temperature and straight_through only apply to mode='gumbel', not mode {mode!r}"
        )
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _reinforce(
    log_r: Tensor,
    ll: Tensor,
    num_samples: int,
    baseline: str | None,
    base: Tensor | None,
    ema: EMABaseline | None,
    ok: Tensor | None,
    generator: torch.Generator | None,
    z: Tensor | None = None,
    ll_z: Tensor | None = None,
) -> Tensor:
    """The REINFORCE surrogate of :math:`E_r[\\ell_z]` per query: ``(N,)``, with samples ``z``
    ``(K, N)`` drawn here unless given, and ``ll_z`` ``(N, K)`` read from ``ll`` unless given."""
    if z is None:
        z = _engine_sample(log_r.detach(), num_samples, generator)  # (K, N)
    if ll_z is None:
        ll_z = _pick(ll, z)  # (N, K)
    lr_z = _pick(log_r, z)
    reward = ll_z.detach()
    b: Tensor | float
    if baseline is None:
        b = 0.0
    elif baseline == "soft":
        assert base is not None
        b = base
    elif baseline == "ema":
        assert ema is not None
        b = 0.0 if ema.value is None else ema.value.to(reward)
        if ok is None:
            mean = reward.mean()
        else:
            w = ok.to(reward.dtype)
            mean = (reward * w).sum() / (w.sum() * num_samples).clamp(min=1.0)
        ema.update(mean)
    else:
        b = (reward.sum(-1, keepdim=True) - reward) / (num_samples - 1)
    score = lr_z - lr_z.detach()  # value 0, gradient of log r(z)
    return (ll_z + (reward - b) * score).mean(-1)


def _gumbel_weights(
    log_r: Tensor, num_samples: int, temperature: float, straight_through: bool,
    generator: torch.Generator | None,
) -> Tensor:
    """``(K, N, S)`` relaxed one-hot weights (hard forward if ``straight_through``)."""
    k = (num_samples,) + tuple(log_r.shape)
    u = torch.rand(k, dtype=log_r.dtype, device=log_r.device, generator=generator)
    fi = torch.finfo(log_r.dtype)
    g = -(-u.clamp(min=fi.tiny, max=1.0 - fi.eps).log()).log()
    w = torch.softmax((log_r + g) / temperature, dim=-1)
    if not straight_through:
        return w
    # not F.one_hot: it checks the index range on the host (a device sync)
    hard = torch.zeros_like(w).scatter_(-1, w.argmax(-1, keepdim=True), 1.0)
    return hard + (w - w.detach())


# -- engine-backed helpers ------------------------------------------------------------------------


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
    _check_scores("prior_logits", prior_logits, None, None)
    shape = prior_logits.shape
    _check_scores("log_lik", log_lik, shape, prior_logits.dtype)
    m = _check_mask(mask, shape)
    n, s = math.prod(shape[:-1]), shape[-1]
    if n == 0:
        return prior_logits * 0.0
    row_ok = None if m is None else m.any(-1, keepdim=True)
    prior = _mask_logits(prior_logits, m, row_ok).reshape(n, s)
    ll = _mask_values(log_lik.expand(shape), m).reshape(n, s)
    post = _graph(prior, ll).marginals()[_VAR].reshape(shape)
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
    _check_scores("prior_logits", prior_logits, None, None)
    shape = prior_logits.shape
    if log_lik is not None:
        _check_scores("log_lik", log_lik, shape, prior_logits.dtype)
    m = _check_mask(mask, shape)
    n, s = math.prod(shape[:-1]), shape[-1]
    if n == 0:
        return torch.zeros(shape[:-1], dtype=torch.long, device=prior_logits.device)
    row_ok = None if m is None else m.any(-1, keepdim=True)
    factors = [_mask_logits(prior_logits.detach(), m, row_ok).reshape(n, s)]
    if log_lik is not None:
        factors.append(_mask_values(log_lik.detach().expand(shape), m).reshape(n, s))
    z = _graph(*factors).map()[_VAR]
    return z.reshape(shape[:-1])


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
    _check_scores("logits", logits, None, None)
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    shape = logits.shape
    m = _check_mask(mask, shape, "logits")
    n, s = math.prod(shape[:-1]), shape[-1]
    if n == 0:
        return torch.zeros((num_samples,) + tuple(shape[:-1]), dtype=torch.long,
                           device=logits.device)
    x = logits.detach()
    if m is not None:
        # a query with no unmasked position: all mass on index 0 (deterministic, documented)
        row_ok = m.any(-1, keepdim=True)
        first = torch.arange(s, device=x.device) == 0
        x = torch.where(m, x, -math.inf)
        x = torch.where(row_ok, x, torch.where(first, 0.0, -math.inf).to(x.dtype))
    z = _engine_sample(x.reshape(n, s), num_samples, generator)
    return z.reshape((num_samples,) + tuple(shape[:-1]))


# -- relaxed (Dirichlet) variational attention ----------------------------------------------------


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
    _check_scores("concentration_logits", concentration_logits, None, None)
    shape = concentration_logits.shape
    m = _check_mask(mask, shape, "concentration_logits")
    alpha = dirichlet_concentration(concentration_logits, min_concentration)
    if m is not None:
        alpha = torch.where(m, alpha, 1.0)  # a constant: masked logits get no gradient
    # torch's Gamma sampler has no bfloat16 / float16 kernel on every device: sample in float32
    work = alpha if alpha.dtype in (torch.float32, torch.float64) else alpha.float()
    g = torch.distributions.Gamma(work, torch.ones_like(work)).rsample().to(alpha.dtype)
    if m is not None:
        g = torch.where(m, g, 0.0)
    total = g.sum(-1, keepdim=True)
    return g / torch.where(total > 0, total, 1.0)


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
    _check_scores("q_logits", q_logits, None, None)
    shape = q_logits.shape
    _check_scores("p_logits", p_logits, shape, q_logits.dtype)
    m = _check_mask(mask, shape, "q_logits")
    a = dirichlet_concentration(q_logits, min_concentration)
    b = dirichlet_concentration(p_logits.expand(shape), min_concentration)
    if m is not None:
        a = torch.where(m, a, 1.0)
        b = torch.where(m, b, 1.0)

    def total(x: Tensor) -> Tensor:
        return x.sum(-1) if m is None else torch.where(m, x, 0.0).sum(-1)

    a0, b0 = total(a), total(b)
    row_ok = None if m is None else m.any(-1)
    if row_ok is not None:  # an empty row: sums of 0 would give lgamma(0) = inf
        a0 = torch.where(row_ok, a0, 1.0)
        b0 = torch.where(row_ok, b0, 1.0)
    kl = (torch.lgamma(a0) - torch.lgamma(b0)
          + total(torch.lgamma(b) - torch.lgamma(a)
                  + (a - b) * (torch.digamma(a) - torch.digamma(a0).unsqueeze(-1))))
    if row_ok is not None:
        kl = torch.where(row_ok, kl, 0.0)
    return kl
