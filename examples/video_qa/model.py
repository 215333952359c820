r"""The video-QA model: which frame answers the question, as a latent alignment.

A frame encoder turns each frame, seen together with its two neighbours (so that what moved,
appeared or left is visible), into a vector :math:`v_t`: a small CNN over pixels, or a linear
map over precomputed features. A GRU encodes the question into :math:`q`. Then

* the prior :math:`p(z \mid x, q) = \mathrm{softmax}_t\, \mathrm{score}(q, v_t)` over frames
  (:class:`attention.LatentAlignmentAttention`, additive scores);
* the answer model :math:`p(a \mid x, q, z) = \mathrm{softmax}\, \mathrm{MLP}([v_z; q])`;
* the inference network :math:`q(z \mid x, q, a)` (:class:`attention.AlignmentInferenceNetwork`
  over the question vector and the answer's embedding), for the variational modes.

Modes (:data:`MODES`): ``"soft"`` classifies the soft-attention context
:math:`\sum_t p(z = t) v_t`; ``"marginal"``, ``"hard-enum"``, ``"variational-enum"`` and the
REINFORCE modes ``"hard-sample"`` / ``"variational-sample"`` train the latent model with
:meth:`attention.LatentAlignmentAttention.loss`. ``"two-level"`` picks a segment :math:`z_1`
of ``segment_len`` frames, then a frame :math:`z_2` inside it:

.. math::

    p(a \mid x, q) = \sum_{z_1} p(z_1 \mid x, q) \sum_{z_2} p(z_2 \mid z_1, x, q)\,
    p(a \mid v_{z_1 L + z_2}, q),

a plated factor graph (plate ``batch``; variables ``z1``, ``z2``) whose log partition function
(the exact log marginal likelihood), MAP grounding and posterior marginals come from the
:mod:`plated` engine. For every latent mode the answer's predictive distribution is exact: the
engine's marginal of an answer variable ``a`` in the same graph.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from attention import AlignmentInferenceNetwork, LatentAlignmentAttention, make_score
from plated import Factor, Plate, PlatedFactorGraph

from .data import Batch

__all__ = ["MODES", "ModelConfig", "VideoQA", "two_level_graph"]

MODES = ("soft", "marginal", "hard-enum", "hard-sample", "variational-enum",
         "variational-sample", "two-level")
_VARIATIONAL = ("variational-enum", "variational-sample")
_SAMPLE = ("hard-sample", "variational-sample")


@dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes the model's architecture (checked when resuming).

    :ivar feature_dim: ``None`` for pixels (``image_size`` x ``image_size`` RGB), else the size
        of a precomputed per-frame feature vector.
    """

    vocab_size: int
    num_answers: int
    mode: str = "soft"
    feature_dim: int | None = None
    image_size: int = 32
    dim: int = 128
    embed: int = 64
    samples: int = 4
    segment_len: int = 4
    score: str = "general"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.feature_dim is None and self.image_size < 4:
            raise ValueError(f"image_size must be at least 4 pixels, got {self.image_size}")
        if self.mode in _SAMPLE and self.samples < 2:
            raise ValueError("the sampling modes use a leave-one-out baseline: samples >= 2")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _MaxMeanPool(nn.Module):
    """``(N, C, H, W)`` -> ``(N, 2C)``: the spatial maximum and mean of each channel."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x.amax((2, 3)), x.mean((2, 3))], 1)


class FrameEncoder(nn.Module):
    """Each frame with its neighbours -> ``(B, T, dim)``; padded frames are zeros, and the
    frames before the first and after the last are blank."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.dim
        self.pixels = config.feature_dim is None
        if self.pixels:
            # convolutions, then max- and mean-pooling over space: the features say what is
            # where in the window (any position), and how much of it
            self.net: nn.Module = nn.Sequential(
                nn.Conv2d(9, 32, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),
                _MaxMeanPool(), nn.Linear(128, d), nn.ReLU())
        else:
            assert config.feature_dim is not None
            self.net = nn.Sequential(nn.Linear(3 * config.feature_dim, d), nn.ReLU(),
                                     nn.Linear(d, d), nn.ReLU())

    def forward(self, videos: Tensor, mask: Tensor) -> Tensor:
        dtype = next(self.net.parameters()).dtype
        if self.pixels:
            x = videos.permute(0, 1, 4, 2, 3).to(dtype) / 255.0  # (B, T, 3, H, W)
        else:
            x = videos.to(dtype)
        x = x * mask.reshape(mask.shape + (1,) * (x.dim() - 2))
        blank = torch.zeros_like(x[:, :1])
        prev = torch.cat([blank, x[:, :-1]], 1)
        nxt = torch.cat([x[:, 1:], blank], 1)
        window = torch.cat([prev, x, nxt], 2)  # channels / features of t-1, t, t+1
        b, t = window.shape[:2]
        return self.net(window.flatten(0, 1)).view(b, t, -1)


class VideoQA(nn.Module):
    """The model of one attention mode (see the module docstring)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d, mode = config.dim, config.mode
        self.frames = FrameEncoder(config)
        self.embed = nn.Embedding(config.vocab_size, config.embed, padding_idx=0)
        self.question = nn.GRU(config.embed, d, batch_first=True)
        hidden = d if config.score == "additive" else None
        self.attention = LatentAlignmentAttention(
            d, d, score=config.score, score_hidden=hidden,  # type: ignore[arg-type]
            mode="marginal" if mode == "two-level" else mode)  # type: ignore[arg-type]
        self.classifier = nn.Sequential(nn.Linear(3 * d, d), nn.ReLU(),
                                        nn.Linear(d, config.num_answers))
        self.answer_embed: nn.Embedding | None = None
        self.infer: AlignmentInferenceNetwork | None = None
        if mode in _VARIATIONAL:
            self.answer_embed = nn.Embedding(config.num_answers, config.embed)
            self.infer = AlignmentInferenceNetwork(d + config.embed, d, d // 2)
        self.segment_score: nn.Module | None = None
        if mode == "two-level":
            self.segment_score = make_score(config.score, d, d, hidden)  # type: ignore[arg-type]

    # -- encoders ---------------------------------------------------------------------------------

    def encode(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """``(memory (B, T, D), question (B, D))``."""
        mem = self.frames(batch.videos, batch.video_mask)[batch.video_index]
        packed = pack_padded_sequence(self.embed(batch.words), batch.word_lengths.cpu(),
                                      batch_first=True, enforce_sorted=False)
        _, h = self.question(packed)
        return mem, h[-1]

    def answer_log_probs(self, mem: Tensor, q: Tensor) -> Tensor:
        """:math:`\\log p(a \\mid v_t, q)` for every frame: ``(B, T, A)``."""
        return F.log_softmax(self.classify(mem, q.unsqueeze(1).expand(-1, mem.shape[1], -1)), -1)

    def classify(self, v: Tensor, q: Tensor) -> Tensor:
        r"""Answer logits from a frame (or context) vector and the question: an MLP over
        :math:`[v; q; v \odot q]`."""
        out: Tensor = self.classifier(torch.cat([v, q, v * q], -1))
        return out

    def posterior_logits(self, mem: Tensor, q: Tensor, answers: Tensor, mask: Tensor
                         ) -> Tensor:
        """Scores of :math:`q(z \\mid x, q, a)`: ``(B, T)``."""
        assert self.infer is not None and self.answer_embed is not None
        target = torch.cat([q, self.answer_embed(answers)], -1).unsqueeze(1)
        out: Tensor = self.infer(target, mem, mask).squeeze(1)
        return out

    # -- the two-level graph ----------------------------------------------------------------------

    def two_level_factors(self, mem: Tensor, q: Tensor, mask: Tensor
                          ) -> tuple[Tensor, Tensor, Tensor]:
        """``(log p(z1) (B, G), log p(z2 | z1) (B, G, L), frame mask (B, G, L))``, with the
        frames padded to ``G * L``."""
        assert self.segment_score is not None
        b, t, d = mem.shape
        seg = self.config.segment_len
        g = math.ceil(t / seg)
        pad = g * seg - t
        if pad:
            mem = F.pad(mem, (0, 0, 0, pad))
            mask = F.pad(mask, (0, pad))
        m3 = mask.view(b, g, seg)
        seg_ok = m3.any(-1)  # (B, G)
        mf = m3.unsqueeze(-1).to(mem.dtype)
        seg_mem = (mem.view(b, g, seg, d) * mf).sum(2) / mf.sum(2).clamp(min=1.0)
        seg_logits = self.segment_score(q.unsqueeze(1), seg_mem).squeeze(1)
        log_p1 = torch.log_softmax(seg_logits.masked_fill(~seg_ok, -math.inf), -1)
        frame_logits = self.attention(q, mem, mask).prior_logits.view(b, g, seg)
        # padded frames score -inf; an empty segment (padding only) keeps a finite, uniform z2
        # row instead, since log p(z1) is -inf there
        live = torch.where(seg_ok.unsqueeze(-1), frame_logits, 0.0)
        return log_p1, torch.log_softmax(live, -1), m3

    # -- training ---------------------------------------------------------------------------------

    def forward(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """``(loss to minimise summed over the batch, the same loss detached)``."""
        loss = self.losses(batch)
        total = loss.sum()
        return total, total.detach()

    def losses(self, batch: Batch) -> Tensor:
        """The training loss of each question ``(B,)``: the soft-attention cross-entropy, the
        exact negative log marginal likelihood, or the mode's bound / surrogate."""
        mem, q = self.encode(batch)
        mask, mode = batch.frame_mask, self.config.mode
        if mode == "two-level":
            log_p1, log_p2, m3 = self.two_level_factors(mem, q, mask)
            ll = self._gather_answer(self.answer_log_probs(mem, q), batch.answers)
            ll = F.pad(ll, (0, m3.numel() // m3.shape[0] - ll.shape[1]))
            ll = ll.masked_fill(~mask_pad(m3), 0.0).view_as(log_p2)
            return -two_level_graph(log_p1, log_p2, ll).log_partition()
        post = self.posterior_logits(mem, q, batch.answers, mask) if self.infer else None
        out = self.attention(q, mem, mask, posterior_logits=post)
        if mode == "soft":
            logits = self.classify(out.context, q)
            return F.cross_entropy(logits, batch.answers, reduction="none")
        ll = self._gather_answer(self.answer_log_probs(out.values, q), batch.answers)
        if mode in _SAMPLE:
            return self.attention.loss(out, ll, num_samples=self.config.samples, baseline="loo")
        return self.attention.loss(out, ll)

    @staticmethod
    def _gather_answer(log_probs: Tensor, answers: Tensor) -> Tensor:
        idx = answers.view(-1, 1, 1).expand(-1, log_probs.shape[1], 1)
        return log_probs.gather(-1, idx).squeeze(-1)

    # -- evaluation -------------------------------------------------------------------------------

    @torch.no_grad()
    def analyse(self, batch: Batch) -> dict[str, Tensor]:
        """Exact predictions and alignments of a batch.

        :return: ``log_pred`` ``(B, A)``: :math:`\\log p(a \\mid x, q)` (exact for the latent
            modes); ``prior`` ``(B, T)``: :math:`p(z \\mid x, q)` (two-level: of the frame
            :math:`z_1 L + z_2`); ``prior_map`` ``(B,)``: its mode (two-level: the engine's MAP
            of :math:`(z_1, z_2)`); ``posterior`` ``(B, T)`` and ``posterior_map`` ``(B,)``:
            the exact posterior :math:`p(z \\mid x, q, a)` given the true answer and its mode
            (latent modes); ``q`` ``(B, T)`` and ``q_map``: the inference network's
            :math:`q(z \\mid x, q, a)` (variational modes); two-level also ``segment_posterior``
            ``(B, G)``, the engine's marginal of :math:`z_1`.
        """
        mem, q = self.encode(batch)
        mask, mode = batch.frame_mask, self.config.mode
        t = mem.shape[1]
        res: dict[str, Tensor] = {}
        if mode == "two-level":
            log_p1, log_p2, m3 = self.two_level_factors(mem, q, mask)
            b, g, seg = log_p2.shape
            logp = F.pad(self.answer_log_probs(mem, q), (0, 0, 0, g * seg - t))
            logp = logp.masked_fill(~mask_pad(m3).unsqueeze(-1), 0.0)
            res["log_pred"] = _predictive(
                [Factor(log_p1, ("batch", "z1")), Factor(log_p2, ("batch", "z1", "z2")),
                 Factor(logp.view(b, g, seg, -1), ("batch", "z1", "z2", "a"))], b)
            prior = (log_p1.unsqueeze(-1) + log_p2).view(b, -1)[:, :t]
            res["prior"] = prior.exp()
            res["prior_map"] = _frame(two_level_graph(log_p1, log_p2).map(), seg)
            ll = self._gather_answer(logp, batch.answers).view(b, g, seg)
            graph = two_level_graph(log_p1, log_p2, ll)
            joint = (log_p1.unsqueeze(-1) + log_p2 + ll).view(b, -1)[:, :t]
            res["posterior"] = (joint - graph.log_partition().unsqueeze(-1)).exp()
            res["posterior_map"] = _frame(graph.map(), seg)
            res["segment_posterior"] = graph.marginals()["z1"]
            return res
        post = self.posterior_logits(mem, q, batch.answers, mask) if self.infer else None
        out = self.attention(q, mem, mask, posterior_logits=post)
        res["prior"] = out.probs
        res["prior_map"] = out.probs.argmax(-1)
        if mode == "soft":
            logits = self.classify(out.context, q)
            res["log_pred"] = F.log_softmax(logits, -1)
            return res
        logp = self.answer_log_probs(out.values, q)
        res["log_pred"] = _predictive(
            [Factor(out.prior_logits, ("batch", "z")), Factor(logp, ("batch", "z", "a"))],
            logp.shape[0])
        exact = self.attention.posterior(out, self._gather_answer(logp, batch.answers))
        res["posterior"], res["posterior_map"] = exact, exact.argmax(-1)
        if post is not None:
            qz = torch.softmax(out.posterior_logits, -1)
            res["q"], res["q_map"] = qz, qz.argmax(-1)
        return res


def mask_pad(m3: Tensor) -> Tensor:
    """``(B, G, L)`` -> ``(B, G * L)``."""
    return m3.reshape(m3.shape[0], -1)


def two_level_graph(log_p1: Tensor, log_p2: Tensor, log_lik: Tensor | None = None
                    ) -> PlatedFactorGraph:
    """The segment-then-frame graph: plate ``batch``, variables ``z1`` (segment) and ``z2``
    (frame in the segment), factors :math:`\\log p(z_1)` ``(B, G)``, :math:`\\log p(z_2 \\mid
    z_1)` ``(B, G, L)`` and, if given, :math:`\\log p(a \\mid x, q, z_1, z_2)` ``(B, G, L)``.
    Its ``log_partition()`` is one log marginal likelihood per batch element."""
    factors = [Factor(log_p1, ("batch", "z1"), "log p(z1)"),
               Factor(log_p2, ("batch", "z1", "z2"), "log p(z2|z1)")]
    if log_lik is not None:
        factors.append(Factor(log_lik, ("batch", "z1", "z2"), "log p(a|z1,z2)"))
    return PlatedFactorGraph(factors, [Plate("batch", log_p1.shape[0])], keep_plates=("batch",),
                             validate=False)


def _predictive(factors: list[Factor], b: int) -> Tensor:
    """:math:`\\log p(a \\mid x, q)`: the engine's posterior marginal of the answer variable
    ``a`` in the graph of the prior and the answer model (the normaliser is 1)."""
    graph = PlatedFactorGraph(factors, [Plate("batch", b)], keep_plates=("batch",),
                              validate=False)
    return graph.marginals()["a"].clamp(min=torch.finfo(factors[0].tensor.dtype).tiny).log()


def _frame(assignment: dict[str, Tensor], seg: int) -> Tensor:
    return assignment["z1"] * seg + assignment["z2"]
