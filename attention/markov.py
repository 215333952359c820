"""A first-order Markov prior over latent alignments, eliminated exactly by the engine.

In latent-alignment attention (Deng et al., 2018, "Latent Alignment and Variational Attention")
the alignment :math:`z_t \\in \\{0, \\dots, S-1\\}` is the source position that explains target
word :math:`t`. Here consecutive alignments form a first-order Markov chain, so that attention
moves coherently over the source:

.. math::

    p(y \\mid x) = \\sum_{z_0, \\dots, z_{T-1}} p(z_0 \\mid x) \\prod_{t \\ge 1}
        p(z_t \\mid z_{t-1}, x) \\prod_t p(y_t \\mid x, z_t).

**The inputs.** :class:`MarkovAlignment` holds one batch's scores and masks, checked once, and
asks the engine each query (:meth:`~MarkovAlignment.log_marginal`, :meth:`~MarkovAlignment.elbo`,
:meth:`~MarkovAlignment.marginals`, :meth:`~MarkovAlignment.viterbi`,
:meth:`~MarkovAlignment.sample`, :meth:`~MarkovAlignment.graph`); the ``markov_alignment_*``
functions, which take the same arguments, are thin wrappers over it.

**The graph.** Every query builds one :class:`~plated.graph.PlatedFactorGraph` with an
independent plate ``"batch"`` (kept: one result per sentence) and a sequential plate
``"target"`` of size :math:`T` with ``prev={"z": "z_prev"}``, and factors

* ``start`` over ``("batch", "z_prev")``: :math:`0` at state 0 and :math:`-\\infty` elsewhere;
* ``transition`` over ``("batch", "target", "z_prev", "z")``: :math:`\\log p(z_t \\mid z_{t-1})`
  from :func:`markov_transition_log_probs`;
* ``likelihood`` over ``("batch", "target", "z")``: :math:`\\log p(y_t \\mid x, z_t)`.

**How** :math:`z_0` **enters (the start state).** The value the sequential plate gives ``z_prev`` at
:math:`t = 0` (the state before the chain) is a *dummy start state*, pinned to 0 by the ``start``
factor; it is not a source position. The transition out of it is the initial distribution: at the
first step, every row of the transition matrix is :math:`\\log p(z_0 \\mid x)`, so the row the dummy
picks is exactly the initial distribution and nothing else depends on the dummy. The sum over the
dummy has one nonzero term, so every result is exact.

**Padded target steps.** A step with ``tgt_mask[b, t] = False`` is a *stay* step: its transition
is the identity (:math:`0` on the diagonal, :math:`-\\infty` elsewhere) and its log-likelihood is
0, so the chain carries the alignment through it unchanged and it contributes a factor of exactly
1. The first real step of each sentence draws from ``init_logits`` (whatever its index), and each
later real step :math:`t` draws from ``trans_logits[:, t]`` given the alignment of the previous
*real* step. For the usual right-padded batch this is the plain chain over the real prefix, and
padding leaves every real step's result unchanged. Outputs at padded steps carry no information:
:func:`markov_alignment_viterbi` and :func:`markov_alignment_sample` fill them with 0 and
:func:`markov_alignment_marginals` with all-zero rows.

**Masked source positions** (``src_mask[b, s] = False``) get exactly zero probability as a state:
their logits are set to :math:`-\\infty` before each row is normalised, and their log-likelihoods
are ignored (they may be anything, even NaN). A sentence with a real target step but no real
source position has :math:`\\log p(y \\mid x) = -\\infty`.

**Numerics.** All work is engine calls on whole tensors: no Python loop over target steps or
sentences; the engine caches one plan per shape and eliminates the chain by a log-depth parallel
scan. ``validate=False`` (the default) skips the engine's NaN / ``+inf`` check, which costs one
host-device sync per call; pass ``validate=True`` while debugging.
"""

from __future__ import annotations

import math
from dataclasses import InitVar, dataclass, field

import torch
from torch import nn

from plated import Factor, Plate, PlatedFactorGraph

from .checks import shape_of

__all__ = [
    "MarkovAlignment",
    "MarkovAlignmentPrior",
    "markov_alignment_elbo",
    "markov_alignment_graph",
    "markov_alignment_log_marginal",
    "markov_alignment_marginals",
    "markov_alignment_sample",
    "markov_alignment_viterbi",
    "markov_transition_log_probs",
]

#: Names of the plates and variables of the graph (see the module docstring).
BATCH, TARGET, Z, Z_PREV = "batch", "target", "z", "z_prev"


# -- argument checks ---------------------------------------------------------------------------


def _check_float(name: str, x: object, dims: int, expected: str) -> torch.Tensor:
    """``x`` itself, checked to be a floating tensor with ``dims`` dims.

    :raises ValueError: naming ``name`` and the ``expected`` shape.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor {expected}, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating tensor {expected}, got dtype {x.dtype}")
    if x.dim() != dims:
        raise ValueError(f"{name} must have shape {expected}, got shape {shape_of(x)}")
    return x


def _check_mask(name: str, mask: torch.Tensor | None, shape: tuple[int, ...], expected: str,
                like: torch.Tensor) -> torch.Tensor:
    """``mask`` checked to be bool and shaped exactly ``shape``, or all ``True`` (on ``like``'s
    device) when ``None``.

    :raises ValueError: naming ``name`` and the ``expected`` shape.
    """
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=like.device)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a bool tensor {expected} (True = real), got {got}")
    if shape_of(mask) != shape:
        raise ValueError(f"{name} must have shape {expected} = {shape}, got {shape_of(mask)}")
    return mask


def _check_prior(init_logits: torch.Tensor, trans_logits: torch.Tensor,
                 names: tuple[str, str] = ("init_logits", "trans_logits"),
                 ) -> tuple[int, int, int]:
    """Check ``init_logits`` ``(B, S)`` and ``trans_logits`` ``(B, T, S, S)`` (one dtype and
    device); return ``(B, T, S)``.

    :raises ValueError: naming the argument (by ``names``) and the shapes.
    """
    init_name, trans_name = names
    _check_float(init_name, init_logits, 2, "(B, S)")
    batch, size = shape_of(init_logits)
    _check_float(trans_name, trans_logits, 4, "(B, T, S, S)")
    if size < 1:
        raise ValueError(f"{init_name} has shape {shape_of(init_logits)}: S must be at least 1")
    trans_batch, steps, size_prev, size_next = shape_of(trans_logits)
    if trans_batch != batch or size_prev != size or size_next != size:
        raise ValueError(
            f"{trans_name} must have shape (B, T, S, S) = ({batch}, T, {size}, {size}) to match "
            f"{init_name} of shape (B, S) = {(batch, size)}, got {shape_of(trans_logits)}"
        )
    if steps < 1:
        raise ValueError(
            f"{trans_name} has shape {shape_of(trans_logits)}: T must be at least 1")
    if trans_logits.dtype != init_logits.dtype or trans_logits.device != init_logits.device:
        raise ValueError(
            f"{trans_name} ({trans_logits.dtype} on {trans_logits.device}) must share the dtype "
            f"and device of {init_name} ({init_logits.dtype} on {init_logits.device})"
        )
    return batch, steps, size


def _check_log_lik(log_lik: torch.Tensor, shape: tuple[int, int, int], like: torch.Tensor
                   ) -> None:
    """Check ``log_lik`` against the chain's ``(B, T, S)`` and ``like``'s dtype and device.

    :raises ValueError: naming ``log_lik`` and the shapes.
    """
    _check_float("log_lik", log_lik, 3, "(B, T, S)")
    if shape_of(log_lik) != shape:
        raise ValueError(
            f"log_lik must have shape (B, T, S) = {shape} to match init_logits (B, S) and "
            f"trans_logits (B, T, S, S), got {shape_of(log_lik)}"
        )
    if log_lik.dtype != like.dtype or log_lik.device != like.device:
        raise ValueError(
            f"log_lik ({log_lik.dtype} on {log_lik.device}) must share the dtype and device of "
            f"init_logits ({like.dtype} on {like.device})"
        )


# -- factors -----------------------------------------------------------------------------------


def _masked_log_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``log_softmax`` over the last dim with masked entries exactly ``-inf``.

    A row with no finite entry stays all ``-inf`` (instead of ``-inf - -inf = NaN``); its
    gradient is zero.
    """
    masked = logits.masked_fill(~mask, -math.inf)
    log_norm = masked.logsumexp(-1, keepdim=True)
    log_norm = torch.where(torch.isfinite(log_norm), log_norm, torch.zeros_like(log_norm))
    return masked - log_norm


def markov_transition_log_probs(
    init_logits: torch.Tensor,
    trans_logits: torch.Tensor,
    src_mask: torch.Tensor | None = None,
    tgt_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The transition log-probabilities of the chain, start state and padding folded in.

    ``out[b, t, i, j]`` is :math:`\\log p(z_t = j \\mid z_{t-1} = i)`, normalised over ``j``:

    * at the first real step of sentence ``b``: :math:`\\mathrm{log\\_softmax}` of
      ``init_logits[b]`` in every row ``i`` (the row of the dummy start state 0 is the one used);
    * at a later real step: :math:`\\mathrm{log\\_softmax}` of ``trans_logits[b, t, i]``;
    * at a padded step (``tgt_mask[b, t] = False``): the identity, ``0`` if ``i == j`` else
      ``-inf`` ("stay").

    Masked source positions get ``-inf`` columns before normalisation.

    :param init_logits: ``(B, S)`` scores of :math:`z_0`.
    :param trans_logits: ``(B, T, S, S)`` scores of :math:`z_t` (last dim) given :math:`z_{t-1}`
        (third dim).
    :param src_mask: ``(B, S)`` bool, True at real source positions; default all True.
    :param tgt_mask: ``(B, T)`` bool, True at real target positions; default all True.
    :return: ``(B, T, S, S)`` log-probabilities, differentiable in both logits.
    :raises ValueError: on a wrong shape, dtype or device (names the argument).
    """
    batch, steps, size = _check_prior(init_logits, trans_logits)
    source = _check_mask("src_mask", src_mask, (batch, size), "(B, S)", init_logits)
    target = _check_mask("tgt_mask", tgt_mask, (batch, steps), "(B, T)", init_logits)
    return _transitions(init_logits, trans_logits, source, target)


def _transitions(init_logits: torch.Tensor, trans_logits: torch.Tensor, source: torch.Tensor,
                 target: torch.Tensor) -> torch.Tensor:
    """:func:`markov_transition_log_probs` of checked inputs (masks given, shaped right)."""
    size = init_logits.shape[-1]
    init_lp = _masked_log_softmax(init_logits, source)  # (B, S)
    trans_lp = _masked_log_softmax(trans_logits, source[:, None, None, :])  # (B, T, S, S)
    real_before = target.long().cumsum(1) - target.long()  # real steps strictly before t
    first = target & (real_before == 0)
    stay = torch.full((size, size), -math.inf, dtype=init_logits.dtype,
                      device=init_logits.device)
    stay = stay.fill_diagonal_(0.0)
    step = torch.where(first[:, :, None, None], init_lp[:, None, None, :], trans_lp)
    return torch.where(target[:, :, None, None], step, stay)


#: The index of the ``transition`` factor among the graph's factors (see :func:`_graph`).
_TRANSITION = 1


def _graph(trans_lp: torch.Tensor, emit: torch.Tensor | None, validate: bool
           ) -> PlatedFactorGraph:
    """The chain's graph (module docstring): ``start``, ``transition`` and, when ``emit`` is
    given, ``likelihood``, in that order."""
    batch, _, size, _ = trans_lp.shape
    start = torch.full((batch, size), -math.inf, dtype=trans_lp.dtype, device=trans_lp.device)
    start[:, 0] = 0.0
    factors = [Factor(start, (BATCH, Z_PREV), name="start"),
               Factor(trans_lp, (BATCH, TARGET, Z_PREV, Z), name="transition")]
    if emit is not None:
        factors.append(Factor(emit, (BATCH, TARGET, Z), name="likelihood"))
    plates = [Plate(BATCH, batch), Plate(TARGET, trans_lp.shape[1], sequential=True,
                                         prev={Z: Z_PREV})]
    return PlatedFactorGraph(factors, plates, keep_plates=(BATCH,), validate=validate)


# -- the chain's inputs, and its queries -------------------------------------------------------


@dataclass(frozen=True, eq=False)
class MarkovAlignment:
    """The inputs of the Markov alignment model for one batch, checked once, and its queries.

    Construct it as the ``markov_alignment_*`` functions are called; each query below is one
    engine call on :meth:`graph` (see the module docstring for the graph, the start state and
    the padding). The functions ``markov_alignment_log_marginal(init_logits, ...)`` and so on
    are thin wrappers that build one and ask it.

    :param init_logits: ``(B, S)`` scores of the first alignment.
    :param trans_logits: ``(B, T, S, S)``; ``trans_logits[b, t, i, j]`` scores :math:`z_t = j`
        given :math:`z_{t-1} = i`, normalised over ``j`` after masking. ``trans_logits[:, 0]`` is
        never used (the first step draws from ``init_logits``).
    :param log_lik: ``(B, T, S)``, :math:`\\log p(y_t \\mid x, z_t = s)`; ignored (even NaN) at
        masked source positions and padded steps.
    :param src_mask: ``(B, S)`` bool, True at real source positions (default: all real).
    :param tgt_mask: ``(B, T)`` bool, True at real target positions (default: all real).
    :ivar source_mask: ``(B, S)`` bool, ``src_mask`` or all ``True``.
    :ivar target_mask: ``(B, T)`` bool, ``tgt_mask`` or all ``True``.
    :raises ValueError: on a wrong shape, dtype or device (names the argument).
    """

    init_logits: torch.Tensor
    trans_logits: torch.Tensor
    log_lik: torch.Tensor
    src_mask: InitVar[torch.Tensor | None] = None
    tgt_mask: InitVar[torch.Tensor | None] = None
    source_mask: torch.Tensor = field(init=False)
    target_mask: torch.Tensor = field(init=False)

    def __post_init__(self, src_mask: torch.Tensor | None, tgt_mask: torch.Tensor | None
                      ) -> None:
        batch, steps, size = _check_prior(self.init_logits, self.trans_logits)
        _check_log_lik(self.log_lik, (batch, steps, size), self.init_logits)
        # frozen: the checked masks are set once, here
        object.__setattr__(self, "source_mask", _check_mask(
            "src_mask", src_mask, (batch, size), "(B, S)", self.init_logits))
        object.__setattr__(self, "target_mask", _check_mask(
            "tgt_mask", tgt_mask, (batch, steps), "(B, T)", self.init_logits))

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(B, T, S)``: sentences, target steps, source positions."""
        batch, steps, size = self.log_lik.shape
        return batch, steps, size

    def transition_log_probs(self) -> torch.Tensor:
        """``(B, T, S, S)`` :func:`markov_transition_log_probs` of this chain."""
        return _transitions(self.init_logits, self.trans_logits, self.source_mask,
                            self.target_mask)

    def emission(self) -> torch.Tensor:
        """``(B, T, S)`` the ``likelihood`` factor: ``log_lik`` with 0 at masked source positions
        and padded steps (a :func:`torch.where`, so NaN there does not leak)."""
        keep = self.target_mask[:, :, None] & self.source_mask[:, None, :]
        return torch.where(keep, self.log_lik, torch.zeros_like(self.log_lik))

    def graph(self, *, validate: bool = False) -> PlatedFactorGraph:
        """The plated factor graph of the model (see the module docstring for its factors).

        Its variables are ``"z"`` (plates ``batch``, ``target``) and the dummy ``"z_prev"``
        (plate ``batch``); use it for queries not wrapped here, e.g. ``graph.cost()`` or
        ``graph.max_log_density()``.

        :param validate: run the engine's NaN / ``+inf`` check on the factors (one host sync
            per query).
        """
        return _graph(self.transition_log_probs(), self.emission(), validate)

    def log_marginal(self, *, validate: bool = False) -> torch.Tensor:
        """Exact :math:`\\log p(y \\mid x)`, summing over every alignment sequence.

        .. math::

            \\log p(y \\mid x) = \\log \\sum_{z} \\prod_t p(z_t \\mid z_{t-1}, x)\\,
                p(y_t \\mid x, z_t)

        (one engine ``log_partition``; gradients by autograd through the parallel scan).

        :return: ``(B,)``; ``0`` for a sentence without real target steps.
        """
        return self.graph(validate=validate).log_partition()

    def elbo(self, posterior_init_logits: torch.Tensor, posterior_trans_logits: torch.Tensor,
             *, validate: bool = False) -> torch.Tensor:
        """The exact ELBO with a chain-structured variational posterior :math:`q(z \\mid x, y)`.

        :math:`q` is a Markov chain of the same form as the prior (same masks, same start state
        and padding), with logits ``posterior_init_logits`` ``(B, S)`` and
        ``posterior_trans_logits`` ``(B, T, S, S)``. With :math:`F^p_t, F^q_t` the transition
        log-probabilities of :func:`markov_transition_log_probs`, :math:`e_t` the
        log-likelihoods and :math:`Z_q` the normaliser of :math:`q` (1 up to rounding),

        .. math::

            \\mathrm{ELBO} = \\mathbb{E}_q[\\log p(y, z) - \\log q(z)]
              = \\sum_{t,i,j} \\mu_t(i, j) \\big(F^p_t(i, j) - F^q_t(i, j)\\big)
              + \\sum_{t,j} \\nu_t(j)\\, e_t(j) + \\log Z_q
              = \\mathbb{E}_q[\\log p(y \\mid z)] - \\mathrm{KL}(q \\,\\|\\, p),

        where :math:`\\mu_t(i, j) = q(z_{t-1} = i, z_t = j) = \\partial \\log Z_q / \\partial
        F^q_t(i, j)` are :math:`q`'s pairwise marginals (the engine's ``factor_marginals`` of
        the transition factor, one backward pass) and :math:`\\nu_t(j) = \\sum_i \\mu_t(i, j)`.
        The pairwise marginals are differentiable (``create_graph``) when :math:`q`'s logits
        require grad, so gradients reach :math:`q`'s parameters through them (the exact
        gradient, not a score-function estimate). Terms where :math:`q` has zero mass count as 0
        (:math:`0 \\log 0 = 0`); where :math:`q` puts mass on a transition the prior forbids, the
        ELBO is :math:`-\\infty`. The ELBO equals :meth:`log_marginal` exactly when :math:`q` is
        the exact posterior, and is below it otherwise.

        :return: ``(B,)``; :math:`-\\infty`, as :meth:`log_marginal`, with zero gradients for a
            sentence with a real target step but no real source position (no alignment exists).
        :raises ValueError: on a wrong shape, dtype or device of the posterior's logits.
        """
        batch, steps, size = self.shape
        _check_prior(posterior_init_logits, posterior_trans_logits,
                     ("posterior_init_logits", "posterior_trans_logits"))
        if shape_of(posterior_trans_logits) != (batch, steps, size, size):
            raise ValueError(
                f"posterior_trans_logits must have shape (B, T, S, S) = "
                f"{(batch, steps, size, size)} like trans_logits, got "
                f"{shape_of(posterior_trans_logits)}"
            )
        if posterior_init_logits.dtype != self.init_logits.dtype:
            raise ValueError(
                f"posterior_init_logits has dtype {posterior_init_logits.dtype}; it must match "
                f"init_logits ({self.init_logits.dtype})"
            )
        # a sentence with a real target step and no real source position has no alignment: its
        # ELBO is -inf. Its chains would be all -inf (NaN in the terms below), so they are
        # computed on a constant stand-in (zero logits, every position real) and replaced.
        target = self.target_mask
        dead = target.any(1) & ~self.source_mask.any(1)
        source = self.source_mask | dead[:, None]

        def alive(x: torch.Tensor) -> torch.Tensor:
            return torch.where(dead.view((-1,) + (1,) * (x.dim() - 1)), 0.0, x)

        p_trans = _transitions(alive(self.init_logits), alive(self.trans_logits), source, target)
        emit = self.emission()  # 0 at every masked source position, so in dead sentences
        q_trans = _transitions(alive(posterior_init_logits), alive(posterior_trans_logits),
                               source, target)
        mu, log_z_q = _pairwise_marginals(q_trans, target, validate)
        support = mu > 0
        diff = torch.where(support, p_trans - q_trans, torch.zeros_like(p_trans))
        nu = mu.sum(-2)
        emit_on_support = torch.where(nu > 0, emit, torch.zeros_like(emit))
        elbo = (mu * diff).sum((1, 2, 3)) + (nu * emit_on_support).sum((1, 2)) + log_z_q
        return torch.where(dead, -math.inf, elbo)

    def marginals(self, *, validate: bool = False) -> torch.Tensor:
        """Posterior marginals :math:`p(z_t = s \\mid x, y)` (engine ``marginals``, by autograd).

        :return: ``(B, T, S)``, each real row summing to one; all-zero rows at padded target
            steps and for sentences with :math:`p(y \\mid x) = 0`. Differentiable in the inputs.
        """
        marg = self.graph(validate=validate).marginals()[Z]
        return torch.where(self.target_mask[:, :, None], marg, torch.zeros_like(marg))

    def viterbi(self, *, validate: bool = False) -> torch.Tensor:
        """The most probable alignment sequence :math:`\\arg\\max_z p(z \\mid x, y)` (engine
        ``map``). Ties go to the lower source position.

        :return: a LongTensor ``(B, T)``; 0 at padded target steps.
        """
        best = self.graph(validate=validate).map()[Z]
        return best.masked_fill(~self.target_mask, 0)

    def sample(self, num_samples: int = 1, *, validate: bool = False) -> torch.Tensor:
        """Exact joint samples of alignment sequences from :math:`p(z \\mid x, y)`.

        Engine ``sample`` (forward filter, backward sample, in log depth); not differentiable.

        :return: a LongTensor ``(num_samples, B, T)``; 0 at padded target steps.
        :raises ValueError: if ``num_samples < 1``.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        drawn = self.graph(validate=validate).sample(num_samples)[Z]
        return drawn.masked_fill(~self.target_mask, 0)


def _pairwise_marginals(q_trans: torch.Tensor, target: torch.Tensor, validate: bool
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """:math:`q`'s pairwise marginals ``mu`` ``(B, T, S, S)`` (zero at padded steps) and
    :math:`\\log Z_q` ``(B,)``, both differentiable (``mu`` by ``create_graph``) when ``q_trans``
    requires grad: the engine's log partition function and factor marginals of the
    transition factor, from one pass (``log_partition_and_factor_marginals``).

    The gradient of ``mu`` is a second derivative of :math:`\\log Z_q`, which is NaN wherever the
    scan meets a hard zero: ``-inf`` entries (``exp(-inf - -inf)`` in the double backward, as in
    plain torch), and, in the engine's log-matmul, products that underflow to 0, which a stay
    step (an identity matrix) after a masked source column produces. So the chain given to the
    engine here has neither: its real steps are moved to the front (a stable sort; stay steps
    are identities, so the chain over real steps is unchanged), the now trailing padded steps
    become all-zero log-matrices (each multiplies :math:`Z_q` by ``S`` whatever the state, which
    is subtracted), and ``-inf`` becomes a finite stand-in whose ``exp`` underflows to exactly 0
    against every finite path, which leaves :math:`\\log Z_q` and ``mu`` exact. (The stand-in
    keeps :math:`\\log Z_q` finite, so the engine's zeros where :math:`\\log Z = -\\infty` never
    apply here.)
    """
    batch, steps, size, _ = q_trans.shape
    log_zero = torch.finfo(q_trans.dtype).min / (4 * (steps + 2))
    stand_in = torch.where(q_trans == -math.inf, torch.full_like(q_trans, log_zero), q_trans)
    pad = ~target
    order = torch.argsort(pad.long(), dim=1, stable=True)  # real steps first, in order
    back = torch.argsort(order, dim=1)
    sorted_q = stand_in.gather(1, order[:, :, None, None].expand(batch, steps, size, size))
    sorted_q = torch.where(pad.gather(1, order)[:, :, None, None], torch.zeros_like(sorted_q),
                           sorted_q)
    graph = _graph(sorted_q, None, validate)
    log_z, marginals = graph.log_partition_and_factor_marginals([_TRANSITION])
    mu = marginals[_TRANSITION]
    mu = mu.gather(1, back[:, :, None, None].expand(batch, steps, size, size))
    mu = torch.where(pad[:, :, None, None], torch.zeros_like(mu), mu)
    return mu, log_z - pad.sum(1).to(log_z.dtype) * math.log(size)


# -- the functions: thin wrappers over MarkovAlignment -----------------------------------------


def markov_alignment_graph(
    init_logits: torch.Tensor,
    trans_logits: torch.Tensor,
    log_lik: torch.Tensor,
    src_mask: torch.Tensor | None = None,
    tgt_mask: torch.Tensor | None = None,
    *,
    validate: bool = False,
) -> PlatedFactorGraph:
    """:meth:`MarkovAlignment.graph` of ``MarkovAlignment(init_logits, trans_logits, log_lik,
    src_mask, tgt_mask)``: the model's plated factor graph."""
    chain = MarkovAlignment(init_logits, trans_logits, log_lik, src_mask, tgt_mask)
    return chain.graph(validate=validate)


def markov_alignment_log_marginal(
    init_logits: torch.Tensor,
    trans_logits: torch.Tensor,
    log_lik: torch.Tensor,
    src_mask: torch.Tensor | None = None,
    tgt_mask: torch.Tensor | None = None,
    *,
    validate: bool = False,
) -> torch.Tensor:
    """:meth:`MarkovAlignment.log_marginal`: exact :math:`\\log p(y \\mid x)` ``(B,)``, one
    engine ``log_partition``. Arguments as for :class:`MarkovAlignment`.

    :raises ValueError: on a wrong shape, dtype or device (names the argument).
    """
    chain = MarkovAlignment(init_logits, trans_logits, log_lik, src_mask, tgt_mask)
    return chain.log_marginal(validate=validate)


def markov_alignment_elbo(
    init_logits: torch.Tensor,
    trans_logits: torch.Tensor,
    log_lik: torch.Tensor,
    posterior_init_logits: torch.Tensor,
    posterior_trans_logits: torch.Tensor,
    src_mask: torch.Tensor | None = None,
    tgt_mask: torch.Tensor | None = None,
    *,
    validate: bool = False,
) -> torch.Tensor:
    """:meth:`MarkovAlignment.elbo`: the exact ELBO ``(B,)`` with a chain-structured posterior
    :math:`q` of logits ``posterior_init_logits`` ``(B, S)`` and ``posterior_trans_logits``
    ``(B, T, S, S)``. Other arguments as for :class:`MarkovAlignment`.

    :raises ValueError: on a wrong shape, dtype or device (names the argument).
    """
    chain = MarkovAlignment(init_logits, trans_logits, log_lik, src_mask, tgt_mask)
    return chain.elbo(posterior_init_logits, posterior_trans_logits, validate=validate)


def markov_alignment_marginals(
    init_logits: torch.Tensor,
    trans_logits: torch.Tensor,
    log_lik: torch.Tensor,
    src_mask: torch.Tensor | None = None,
    tgt_mask: torch.Tensor | None = None,
    *,
    validate: bool = False,
) -> torch.Tensor:
    """:meth:`MarkovAlignment.marginals`: posterior marginals :math:`p(z_t = s \\mid x, y)`
    ``(B, T, S)``, all-zero rows at padded steps. Arguments as for :class:`MarkovAlignment`.

    :raises ValueError: on a wrong shape, dtype or device (names the argument).
    """
    chain = MarkovAlignment(init_logits, trans_logits, log_lik, src_mask, tgt_mask)
    return chain.marginals(validate=validate)


def markov_alignment_viterbi(
    init_logits: torch.Tensor,
    trans_logits: torch.Tensor,
    log_lik: torch.Tensor,
    src_mask: torch.Tensor | None = None,
    tgt_mask: torch.Tensor | None = None,
    *,
    validate: bool = False,
) -> torch.Tensor:
    """:meth:`MarkovAlignment.viterbi`: the MAP alignment sequence, a LongTensor ``(B, T)``, 0
    at padded steps. Arguments as for :class:`MarkovAlignment`.

    :raises ValueError: on a wrong shape, dtype or device (names the argument).
    """
    chain = MarkovAlignment(init_logits, trans_logits, log_lik, src_mask, tgt_mask)
    return chain.viterbi(validate=validate)


def markov_alignment_sample(
    init_logits: torch.Tensor,
    trans_logits: torch.Tensor,
    log_lik: torch.Tensor,
    src_mask: torch.Tensor | None = None,
    tgt_mask: torch.Tensor | None = None,
    *,
    num_samples: int = 1,
    validate: bool = False,
) -> torch.Tensor:
    """:meth:`MarkovAlignment.sample`: ``num_samples`` exact joint samples from
    :math:`p(z \\mid x, y)`, a LongTensor ``(num_samples, B, T)``, 0 at padded steps. Arguments
    as for :class:`MarkovAlignment`.

    :raises ValueError: on a wrong shape, dtype or device (names the argument), or if
        ``num_samples < 1``.
    """
    chain = MarkovAlignment(init_logits, trans_logits, log_lik, src_mask, tgt_mask)
    return chain.sample(num_samples, validate=validate)


class MarkovAlignmentPrior(nn.Module):
    """Scores for the Markov alignment prior from decoder queries and encoder memory.

    A content score per (target step, source position) plus a learned bias on the jump
    :math:`z_t - z_{t-1}`, clipped to ``[-max_jump, max_jump]`` (so one bias covers every jump of
    at least ``max_jump`` each way), and a learned bias on the first alignment's position, clipped
    to ``max_jump``:

    .. math::

        c_{t,s} = \\frac{(W q_t)^\\top m_s}{\\sqrt{H}}, \\qquad
        \\mathrm{init}_s = c_{0,s} + \\beta_{\\min(s,\\, J)}, \\qquad
        \\mathrm{trans}_{t,i,j} = c_{t,j} + \\gamma_{\\mathrm{clip}(j - i,\\, -J,\\, J)}.

    Both biases start at zero, so an untrained prior is the content-only (independent) one. Feed
    the outputs to the ``markov_alignment_*`` functions, which apply the masks.

    :param hidden: the size :math:`H` of query and memory states.
    :param max_jump: :math:`J \\ge 0`.
    """

    def __init__(self, hidden: int, max_jump: int = 4) -> None:
        super().__init__()
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        if max_jump < 0:
            raise ValueError(f"max_jump must be >= 0, got {max_jump}")
        self.hidden = int(hidden)
        self.max_jump = int(max_jump)
        self.query_proj = nn.Linear(hidden, hidden, bias=False)
        self.jump_bias = nn.Parameter(torch.zeros(2 * max_jump + 1))
        self.start_bias = nn.Parameter(torch.zeros(max_jump + 1))
        self.scale = 1.0 / math.sqrt(hidden)

    def forward(self, query: torch.Tensor, memory: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute ``(init_logits (B, S), trans_logits (B, T, S, S))``.

        :param query: ``(B, T, H)`` decoder states.
        :param memory: ``(B, S, H)`` encoder states.
        :raises ValueError: on a wrong shape (names the argument).
        """
        hidden = self.hidden
        _check_float("query", query, 3, f"(B, T, H={hidden})")
        _check_float("memory", memory, 3, f"(B, S, H={hidden})")
        if query.shape[-1] != hidden:
            raise ValueError(f"query must have shape (B, T, H={hidden}), got {shape_of(query)}")
        if memory.shape[-1] != hidden or memory.shape[0] != query.shape[0]:
            raise ValueError(
                f"memory must have shape (B={query.shape[0]}, S, H={hidden}) to match query "
                f"{shape_of(query)}, got {shape_of(memory)}"
            )
        content = self.query_proj(query) @ memory.transpose(-1, -2) * self.scale  # (B, T, S)
        pos = torch.arange(memory.shape[1], device=memory.device)
        max_jump = self.max_jump
        # the clipped jump z_t - z_{t-1} as an index into jump_bias: (S prev, S next)
        jump = (pos[None, :] - pos[:, None]).clamp(-max_jump, max_jump) + max_jump
        trans_logits = content[:, :, None, :] + self.jump_bias[jump]
        init_logits = content[:, 0, :] + self.start_bias[pos.clamp(max=max_jump)]
        return init_logits, trans_logits

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, max_jump={self.max_jump}"
