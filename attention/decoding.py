"""Beam search with latent alignments.

A decoder with latent alignments predicts the next word by marginalising the alignment:

.. math::

    p(y_t \\mid y_{<t}, x)
    = \\sum_{s} p(z_t = s \\mid y_{<t}, x)\\, p(y_t \\mid y_{<t}, x, z_t = s).

:func:`marginal_log_probs` computes that sum for every word of the vocabulary with the engine
(the alignment a summed variable, hypotheses and words kept plates); under K-max
the caller passes the K best positions of the prior. :func:`beam_search` is a batched beam search
over sentences and beams: one ``step`` call per output position for all hypotheses at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from plated import Factor, Plate, PlatedFactorGraph

__all__ = ["BeamResult", "beam_search", "marginal_log_probs", "reorder_state"]

State = TypeVar("State")


def marginal_log_probs(prior_logits: torch.Tensor, log_probs: torch.Tensor,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """:math:`\\log \\sum_s p(z = s)\\, p(y \\mid z = s)` for every word ``y``.

    :param prior_logits: ``(N, S)`` unnormalised scores of the alignment prior of ``N``
        hypotheses (normalised here over the unmasked positions).
    :param log_probs: ``(N, S, V)`` log-probabilities of each word given each alignment.
    :param mask: optional ``(N, S)`` bool, ``True`` for real source positions.
    :return: ``(N, V)`` log-probabilities of the next word with the alignment summed out.
    :raises ValueError: on mismatched shapes.
    """
    if prior_logits.dim() != 2 or log_probs.dim() != 3 or log_probs.shape[:2] != prior_logits.shape:
        raise ValueError(
            f"prior_logits must be (N, S) and log_probs (N, S, V); got "
            f"{tuple(prior_logits.shape)} and {tuple(log_probs.shape)}"
        )
    if mask is not None:
        if mask.shape != prior_logits.shape:
            raise ValueError(f"mask must be (N, S) = {tuple(prior_logits.shape)}, got "
                             f"{tuple(mask.shape)}")
        prior_logits = prior_logits.masked_fill(~mask, -torch.inf)
        log_probs = torch.where(mask.unsqueeze(-1), log_probs, torch.zeros_like(log_probs))
    prior = torch.log_softmax(prior_logits, dim=-1)
    n, s, v = log_probs.shape
    # hypotheses n and words v are kept plates (one sum per pair), the alignment z is summed
    graph = PlatedFactorGraph(
        [Factor(prior.unsqueeze(-1).expand(n, s, v), ("n", "z", "v"), name="alignment prior"),
         Factor(log_probs, ("n", "z", "v"), name="word given alignment")],
        [Plate("n", n), Plate("v", v)], keep_plates=("n", "v"), validate=False)
    return graph.log_partition()


def reorder_state(state: Any, index: torch.Tensor) -> Any:
    """Select rows ``index`` of every tensor in a nested tuple / list / dict ``state``.

    The hypothesis dim must come first in every tensor: keep e.g. an ``nn.LSTM`` state
    ``(layers, N, H)`` as ``(N, layers, H)`` in the beam state and transpose it in ``step``.
    """
    if isinstance(state, torch.Tensor):
        return state.index_select(0, index)
    if isinstance(state, dict):
        return {k: reorder_state(v, index) for k, v in state.items()}
    if isinstance(state, (tuple, list)):
        return type(state)(reorder_state(v, index) for v in state)
    if state is None:
        return None
    raise TypeError(f"cannot reorder a beam state of type {type(state).__name__}; use tensors "
                    "in (nested) tuples, lists or dicts")


@dataclass(frozen=True)
class BeamResult:
    """Finished hypotheses, best first.

    :ivar tokens: ``(batch, beam, length)`` word ids (``eos`` then ``eos`` padding after a
        hypothesis ends).
    :ivar scores: ``(batch, beam)`` total log-probabilities (before the length penalty).
    :ivar lengths: ``(batch, beam)`` lengths including the first ``eos`` (``length`` when none).
    """

    tokens: torch.Tensor
    scores: torch.Tensor
    lengths: torch.Tensor


def beam_search(step: Callable[[torch.Tensor, State], tuple[torch.Tensor, State]],
                state: State, *, batch_size: int, bos: int, eos: int, beam_size: int = 5,
                max_len: int = 50, length_penalty: float = 0.0) -> BeamResult:
    """Batched beam search over ``batch_size`` sentences with ``beam_size`` beams each.

    :param step: ``step(last_tokens, state) -> (log_probs, state)``: ``last_tokens`` is
        ``(batch * beam,)``, ``log_probs`` ``(batch * beam, V)`` (e.g. from
        :func:`marginal_log_probs`), hypothesis ``b * beam + k`` being beam ``k`` of sentence
        ``b``. ``state`` is any nested tuple / list / dict of tensors with ``batch * beam`` rows;
        :func:`reorder_state` follows the surviving beams.
    :param state: the initial state, already repeated ``beam_size`` times per sentence.
    :param length_penalty: GNMT's :math:`\\alpha`: hypotheses are ranked by
        :math:`\\log p / ((5 + |y|) / 6)^\\alpha` (0 ranks by log-probability).
    :return: the hypotheses of each sentence, best first.
    """
    if beam_size < 1 or max_len < 1 or batch_size < 1:
        raise ValueError(f"beam_size, max_len and batch_size must be >= 1; got {beam_size}, "
                         f"{max_len}, {batch_size}")
    n = batch_size * beam_size
    device = _device_of(state)
    last = torch.full((n,), bos, dtype=torch.long, device=device)
    scores: torch.Tensor | None = None
    finished = torch.zeros(batch_size, beam_size, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch_size, beam_size, dtype=torch.long, device=device)
    tokens = torch.empty(batch_size, beam_size, 0, dtype=torch.long, device=device)
    base = torch.arange(batch_size, device=device).unsqueeze(-1) * beam_size
    for _ in range(max_len):
        log_probs, state = step(last, state)
        v = log_probs.shape[-1]
        if log_probs.shape != (n, v):
            raise ValueError(f"step returned log_probs of shape {tuple(log_probs.shape)}; "
                             f"expected ({n}, V)")
        lp = log_probs.view(batch_size, beam_size, v)
        if scores is None:  # all beams start equal: expand from the first only
            scores = torch.full((batch_size, beam_size), -torch.inf, dtype=lp.dtype,
                                device=device)
            scores[:, 0] = 0.0
        # a finished hypothesis only extends by eos, at no cost
        done_row = torch.full((v,), -torch.inf, dtype=lp.dtype, device=device)
        done_row[eos] = 0.0
        lp = torch.where(finished.unsqueeze(-1), done_row, lp)
        cand = (scores.unsqueeze(-1) + lp).view(batch_size, beam_size * v)
        scores, flat = cand.topk(beam_size, dim=-1)
        src = torch.div(flat, v, rounding_mode="floor")
        word = flat % v
        rows = (base + src).view(-1)
        tokens = torch.cat([tokens.gather(1, src.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])),
                            word.unsqueeze(-1)], dim=-1)
        was_done = finished.gather(1, src)
        lengths = lengths.gather(1, src) + (~was_done).long()
        finished = was_done | (word == eos)
        state = reorder_state(state, rows)
        last = word.view(-1)
        if bool(finished.all()):  # one host sync per output position, as any beam search
            break
    assert scores is not None
    ranked = scores / ((5.0 + lengths.to(scores.dtype)) / 6.0) ** length_penalty
    order = ranked.argsort(dim=-1, descending=True)
    return BeamResult(tokens.gather(1, order.unsqueeze(-1).expand_as(tokens)),
                      scores.gather(1, order), lengths.gather(1, order))


def _device_of(state: Any) -> torch.device:
    if isinstance(state, torch.Tensor):
        return state.device
    items = state.values() if isinstance(state, dict) else (
        state if isinstance(state, (tuple, list)) else ())
    for x in items:
        d = _device_of(x)
        if d.type != "cpu":
            return d
    return torch.device("cpu")
