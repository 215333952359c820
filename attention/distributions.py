"""A Pyro face for latent alignments: :class:`AlignmentCategorical` and
:func:`markov_alignment_site`.

Declare the alignment :math:`z_t` as an enumerated Pyro sample site and train with
:class:`plated.pyro.TVE_ELBO` (or Pyro's ``TraceEnum_ELBO`` for independent alignments); the
engine then sums :math:`z` out exactly. Independent alignments, one per target position::

    with pyro.plate("batch", B, dim=-2), pyro.plate("target", T, dim=-1):
        z = pyro.sample("z", AlignmentCategorical(prior_logits, mask=src_mask[:, None, :]),
                        infer={"enumerate": "parallel"})             # prior_logits (B, T, S)
        pyro.sample("y", dist.Categorical(logits=Vindex(vocab_logits)[..., z, :]), obs=y)

A first-order Markov prior over the alignments (the model of :mod:`attention.markov`), with
:class:`plated.pyro.markov_plate` over target positions::

    time = markov_plate("target", T, dim=-1)
    with pyro.plate("batch", B, dim=-2):
        z = markov_alignment_site("z", time, init_logits, trans_logits, src_mask, tgt_mask)
        with time, poutine.mask(mask=tgt_mask):
            pyro.sample("y", dist.Categorical(logits=Vindex(vocab_logits)[..., z, :]), obs=y)

``TVE_ELBO(max_plate_nesting=2)`` with an empty guide then gives
``-markov_alignment_log_marginal(init_logits, trans_logits, log_lik, src_mask, tgt_mask).sum()``.
"""

from __future__ import annotations

import math
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.ops.indexing import Vindex

from plated.pyro import markov_plate

from .markov import markov_transition_log_probs

__all__ = ["AlignmentCategorical", "markov_alignment_site"]


class AlignmentCategorical(dist.Categorical):
    """A categorical distribution over source positions ``0 .. S-1`` with a source mask.

    Masked positions (``mask`` False) have probability exactly 0: their logits are set to
    ``-inf`` before normalisation, so ``log_prob`` there is ``-inf`` and they are never sampled.
    :meth:`enumerate_support` (inherited) still lists all ``S`` positions, so that enumeration
    dims have the same size across a batch; the masked ones carry weight 0 in every sum. Every
    row needs at least one real position (an all-masked row has no distribution).
    :meth:`expand` keeps the class and the mask, so the distribution works under
    :class:`pyro.plate`.

    :param logits: ``(*batch, S)`` unnormalised log-probabilities.
    :param mask: optional bool tensor broadcastable to ``logits``' shape, True at real positions.
    :param validate_args: as for :class:`torch.distributions.Distribution`.
    :raises ValueError: if ``mask`` is not a bool tensor broadcastable to ``logits``.

    The mask is kept as :attr:`source_mask` (``None`` without one; not ``mask``, which is
    Pyro's :meth:`~pyro.distributions.torch_distribution.TorchDistributionMixin.mask`).
    """

    source_mask: torch.Tensor | None

    def __init__(self, logits: torch.Tensor, mask: torch.Tensor | None = None,
                 validate_args: bool | None = None) -> None:
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(f"mask must be a bool tensor (True = real position), got {got}")
            try:
                shape = torch.broadcast_shapes(logits.shape, mask.shape)
            except RuntimeError:
                shape = None
            if shape is None or shape[-1] != logits.shape[-1]:
                raise ValueError(
                    f"mask of shape {tuple(mask.shape)} must broadcast to logits of shape "
                    f"{tuple(logits.shape)} (last dim = source positions)"
                )
            mask = mask.expand(shape)
            logits = logits.expand(shape).masked_fill(~mask, -math.inf)
        self.source_mask = mask
        super().__init__(logits=logits, validate_args=validate_args)

    def expand(self, batch_shape: Any, _instance: Any = None) -> AlignmentCategorical:
        new = self._get_checked_instance(AlignmentCategorical, _instance)
        batch_shape = torch.Size(batch_shape)
        super().expand(batch_shape, _instance=new)
        mask = self.source_mask
        new.source_mask = None if mask is None else mask.expand(batch_shape + mask.shape[-1:])
        return new


def markov_alignment_site(
    name: str,
    time: markov_plate,
    init_logits: torch.Tensor,
    trans_logits: torch.Tensor,
    src_mask: torch.Tensor | None = None,
    tgt_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Declare a Markov chain of alignments on ``time`` and sample it (enumerated).

    Call it inside the batch plate (at dim ``-2``) and *outside* ``time`` (a
    :class:`~plated.pyro.markov_plate` of size ``T`` at dim ``-1``); then put the observation
    sites inside ``time``, under ``poutine.mask(mask=tgt_mask)`` when there is padding. It adds
    two enumerated sites:

    * ``f"{name}_prev"``, the state before the chain: the *dummy start state* 0 of
      :mod:`attention.markov` (``time.init(name, 0, size=S)``), not a source position;
    * ``name`` inside ``time``: :class:`AlignmentCategorical` with logits
      ``Vindex(F)[..., z_prev, :]`` (the source mask is already in ``F``), where ``F``
      ``(B, T, S, S)`` is :func:`~attention.markov.markov_transition_log_probs`: at the first
      real step every row is the initial distribution, so
      :math:`z_0 \\sim \\mathrm{softmax}(\\text{init\\_logits})` exactly; at padded steps
      the transition is the identity, so padding adds nothing.

    The chain site itself needs no ``poutine.mask``: the identity transition already makes a
    padded step contribute exactly 1 and carry the alignment through (mask the observations).

    :param name: the chain site's name.
    :param time: the markov plate over target positions.
    :param init_logits: ``(B, S)``; ``trans_logits``: ``(B, T, S, S)``; ``src_mask``: ``(B, S)``;
        ``tgt_mask``: ``(B, T)`` — as for :func:`~attention.markov.markov_alignment_log_marginal`.
    :return: the value of ``name`` inside ``time`` (under enumeration, all ``S`` values along its
        enumeration dim).
    :raises ValueError: on a wrong shape (names the argument), or if ``time`` has a size other
        than ``T``.
    """
    trans_lp = markov_transition_log_probs(init_logits, trans_logits, src_mask, tgt_mask)
    b, t, s, _ = trans_lp.shape
    if time.size != t:
        raise ValueError(
            f"time (markov_plate {time.name!r}) has size {time.size}, but trans_logits has "
            f"T = {t} target positions"
        )
    z_prev = time.init(name, 0, size=s)
    with time:
        # no mask= here: F's columns are already -inf at masked positions, and a padded step's
        # row out of a masked (unreachable) state is the identity, which a mask would empty
        z: torch.Tensor = pyro.sample(name, AlignmentCategorical(Vindex(trans_lp)[..., z_prev, :]),
                                      infer={"enumerate": "parallel"})
    return z
