r"""The video-QA model: which frame answers the question, as a latent alignment.

A frame encoder turns each frame, seen together with its two neighbours (so that what moved,
appeared or left is visible; ``window`` sets how many frames it sees), into a vector
:math:`v_t`: a small CNN over pixels, or a linear map over precomputed features. A GRU
encodes the question into :math:`q`. Then

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
:mod:`plated` engine. ``"k-max"`` is the exact marginal likelihood under the prior truncated
to its ``k_max`` best frames (:class:`attention.LatentAlignmentAttention` with ``k_max``): the
answer model sees only those frames, at training and at test time. For every latent mode the
answer's predictive distribution is exact: the engine's marginal of an answer variable ``a`` in
the same graph. For videos too long to score at once, :mod:`examples.video_qa.chunked` gives
the same answers chunk by chunk.

``"markov"`` is for needles that span several frames. Its latent is not one frame but which
frames hold the needle: a first-order Markov chain :math:`h_1, \dots, h_T` over the states
*before*, *in* and *after* the needle (left to right, so the needle is one run of consecutive
frames), whose transitions depend on the frame's score :math:`s_t = \mathrm{score}(q, v_t)`
and on two learned biases :math:`\beta_{\mathrm{enter}}, \beta_{\mathrm{stay}}`:

.. math::

    p(h_t = \mathrm{in} \mid h_{t-1} = \mathrm{before}) = \sigma(s_t + \beta_{\mathrm{enter}}),
    \qquad p(h_t = \mathrm{in} \mid h_{t-1} = \mathrm{in}) = \sigma(s_t + \beta_{\mathrm{stay}})

(else *before* stays *before*, *in* goes *after*, *after* stays), with :math:`h_0` drawn from the
*before* row. The answer is the one every needle frame agrees on, a product of experts over the
run, and the run must not be empty:

.. math::

    p(a \mid x, q) = \frac{Z_a}{\sum_{a'} Z_{a'}}, \qquad
    Z_a = \sum_{h:\, \exists t\, h_t = \mathrm{in}} p(h \mid x, q)
        \prod_{t:\, h_t = \mathrm{in}} p(a \mid v_t, q).

Each :math:`Z_a` is the exact log marginal of an :class:`attention.markov.MarkovAlignment` chain
(the frames are its steps, the three states its "source positions", :math:`\log p(a \mid v_t,
q)` the emission of *in*, and :math:`-\infty` for *before* at the last frame), one engine call
for every answer at once (answers stacked on the batch). When every run has one frame this is
exactly ``"marginal"``'s :math:`\sum_z p(z \mid x, q)\, p(a \mid v_z, q)` (then
:math:`\sum_a Z_a = 1`); with longer runs the evidence of all the needle's frames is
multiplied, instead of one frame being picked. Why this and not one frame with a Markov prior:
a single answer has a single alignment, so there is no sequence of alignments for a Markov
prior to link; the needle's *frames* are the sequence. Its ``prior`` is :math:`p(h_t =
\mathrm{in} \mid x, q)` (the chain alone, without the non-empty condition), its
``posterior`` :math:`p(h_t = \mathrm{in} \mid x, q, a)`; both are engine marginals, and
neither sums to one over frames (their sum is the expected needle length).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from attention import (
    AlignmentInferenceNetwork,
    AttentionOutput,
    LatentAlignmentAttention,
    make_score,
)
from attention.markov import MarkovAlignment
from plated import Factor, Plate, PlatedFactorGraph

from .data import Batch

__all__ = ["MODES", "ModelConfig", "VideoQA", "needle_chain_logits", "needle_emission",
           "needle_log_evidence", "two_level_graph"]

MODES = ("soft", "marginal", "hard-enum", "hard-sample", "variational-enum",
         "variational-sample", "two-level", "k-max", "markov")
#: The states of ``"markov"`` mode's chain over frames.
BEFORE, IN, AFTER = 0, 1, 2
_VARIATIONAL = ("variational-enum", "variational-sample")
_SAMPLE = ("hard-sample", "variational-sample")


@dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes the model's architecture (checked when resuming).

    :ivar feature_dim: ``None`` for pixels (``image_size`` x ``image_size`` RGB), else the size
        of a precomputed per-frame feature vector.
    :ivar window: frames the encoder sees per frame (odd): 3 (the frame and its two neighbours,
        so that what moved, appeared or left is visible) or 1 (the frame alone, so that an
        answer readable at one frame is grounded at that frame only).
    :ivar k_max: the K of ``"k-max"`` mode (the exact marginal likelihood under the prior
        truncated to its K best frames, at training and at test time).
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
    window: int = 3
    k_max: int = 4

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.window < 1 or self.window % 2 == 0:
            raise ValueError(f"window must be an odd number of frames >= 1, got {self.window}")
        if self.k_max < 1:
            raise ValueError(f"k_max must be at least 1, got {self.k_max}")
        if self.feature_dim is None and self.image_size < 4:
            raise ValueError(f"image_size must be at least 4 pixels, got {self.image_size}")
        if self.mode in _SAMPLE and self.samples < 2:
            raise ValueError("the sampling modes use a leave-one-out baseline: samples >= 2")

    def as_dict(self) -> dict[str, Any]:
        """The fields, without those added after checkpoints were first written (``window``,
        ``k_max``) while they keep their defaults, so that older checkpoints still compare
        equal."""
        out = asdict(self)
        for name, default in _LATER_FIELDS.items():
            if out[name] == default:
                del out[name]
        return out


#: Fields of :class:`ModelConfig` added later, with the defaults older runs had implicitly.
_LATER_FIELDS: dict[str, Any] = {"window": 3, "k_max": 4}


class _MaxMeanPool(nn.Module):
    """``(N, C, H, W)`` -> ``(N, 2C)``: the spatial maximum and mean of each channel."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x.amax((2, 3)), x.mean((2, 3))], 1)


class FrameEncoder(nn.Module):
    """Each frame with its neighbours (``window`` frames centred on it) -> ``(B, T, dim)``;
    padded frames are zeros, and the frames before the first and after the last are blank."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, w = config.dim, config.window
        self.pixels = config.feature_dim is None
        self.reach = w // 2
        if self.pixels:
            # convolutions, then max- and mean-pooling over space: the features say what is
            # where in the window (any position), and how much of it
            self.net: nn.Module = nn.Sequential(
                nn.Conv2d(3 * w, 32, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),
                _MaxMeanPool(), nn.Linear(128, d), nn.ReLU())
        else:
            assert config.feature_dim is not None
            self.net = nn.Sequential(nn.Linear(w * config.feature_dim, d), nn.ReLU(),
                                     nn.Linear(d, d), nn.ReLU())

    def _inputs(self, videos: Tensor) -> Tensor:
        """Pixels ``(B, T, H, W, 3)`` uint8 as ``(B, T, 3, H, W)`` in ``[0, 1]``, or features
        ``(B, T, F)`` in the encoder's dtype."""
        dtype = next(self.net.parameters()).dtype
        if self.pixels:
            return videos.permute(0, 1, 4, 2, 3).to(dtype) / 255.0
        return videos.to(dtype)

    def _windows(self, x: Tensor, t: int) -> Tensor:
        """``x`` ``(B, t + 2 * reach, ...)`` (frames ``-reach .. t + reach - 1``) -> the
        encoding of its ``t`` central frames, each with its ``reach`` neighbours on either side:
        ``(B, t, dim)``."""
        window = torch.cat([x[:, k:k + t] for k in range(2 * self.reach + 1)], 2)
        b = window.shape[0]
        return self.net(window.flatten(0, 1)).view(b, t, -1)

    def forward(self, videos: Tensor, mask: Tensor) -> Tensor:
        x = self._inputs(videos)
        x = x * mask.reshape(mask.shape + (1,) * (x.dim() - 2))
        blank = x.new_zeros((x.shape[0], self.reach) + x.shape[2:])
        return self._windows(torch.cat([blank, x, blank], 1), x.shape[1])

    def encode_span(self, video: Tensor, start: int, stop: int) -> Tensor:
        """The encoding of frames ``start .. stop - 1`` of one unpadded video ``(T, ...)``,
        reading only the frames their windows see: ``(stop - start, dim)``, equal to
        ``forward(video[None], all-True mask)[0, start:stop]``."""
        t = video.shape[0]
        lo, hi = max(start - self.reach, 0), min(stop + self.reach, t)
        x = self._inputs(video[lo:hi].unsqueeze(0))
        before = x.new_zeros((1, self.reach - (start - lo)) + x.shape[2:])
        after = x.new_zeros((1, self.reach - (hi - stop)) + x.shape[2:])
        return self._windows(torch.cat([before, x, after], 1), stop - start)[0]


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
            mode="marginal" if mode in ("two-level", "k-max", "markov")
            else mode,  # type: ignore[arg-type]
            k_max=config.k_max if mode == "k-max" else None)
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
        self.needle_bias: nn.Parameter | None = None
        if mode == "markov":  # (enter, stay)
            self.needle_bias = nn.Parameter(torch.zeros(2))

    # -- encoders ---------------------------------------------------------------------------------

    def encode(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """``(memory (B, T, D), question (B, D))``."""
        mem = self.frames(batch.videos, batch.video_mask)[batch.video_index]
        return mem, self.encode_question(batch.words, batch.word_lengths)

    def encode_question(self, words: Tensor, lengths: Tensor) -> Tensor:
        """The question vectors ``(B, D)`` of ``words`` ``(B, L)`` (0-padded, ``lengths``)."""
        packed = pack_padded_sequence(self.embed(words), lengths.cpu(), batch_first=True,
                                      enforce_sorted=False)
        _, h = self.question(packed)
        out: Tensor = h[-1]
        return out

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

    # -- the Markov chain over needle frames ------------------------------------------------------

    def needle_chain(self, mem: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
        """``"markov"``: ``(init_logits (B, 3), trans_logits (B, T, 3, 3))`` of the chain over
        the frames ``mem`` ``(B, T, D)`` (:func:`needle_chain_logits`)."""
        assert self.needle_bias is not None
        scores = self.attention.score(q.unsqueeze(1), mem).squeeze(1)
        trans = needle_chain_logits(scores, self.needle_bias)
        return trans[:, 0, BEFORE], trans

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
        if mode == "markov":
            init, trans = self.needle_chain(mem, q)
            log_z = needle_log_evidence(init, trans, self.answer_log_probs(mem, q), mask)
            return log_z.logsumexp(-1) - log_z.gather(1, batch.answers[:, None]).squeeze(1)
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
        if mode == "k-max":
            assert out.topk_values is not None
            ll_top = self._gather_answer(self.answer_log_probs(out.topk_values, q), batch.answers)
            return self.attention.loss(out, ll_top)
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
        if mode == "markov":
            init, trans = self.needle_chain(mem, q)
            logp = self.answer_log_probs(mem, q)
            log_z = needle_log_evidence(init, trans, logp, mask)
            res["log_pred"] = log_z - log_z.logsumexp(-1, keepdim=True)
            zero = mem.new_zeros(mem.shape[0], t, 3)
            prior = MarkovAlignment(init, trans, zero, tgt_mask=mask).marginals()[..., IN]
            emit = needle_emission(self._gather_answer(logp, batch.answers)[..., None], mask)
            marg = MarkovAlignment(init, trans, emit[:, :, 0], tgt_mask=mask).marginals()
            res["prior"], res["prior_map"] = prior, prior.argmax(-1)
            res["posterior"], res["posterior_map"] = marg[..., IN], marg[..., IN].argmax(-1)
            return res
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
        if mode == "k-max":
            return self._analyse_kmax(out, q, batch.answers, res)
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


    def _analyse_kmax(self, out: AttentionOutput, q: Tensor, answers: Tensor,
                      res: dict[str, Tensor]) -> dict[str, Tensor]:
        """:meth:`analyse` of ``"k-max"``: the predictive and the posterior of the prior
        truncated to its K best frames (the prior's mode is their first); the posterior is
        scattered back to ``(B, T)``, zero off the K frames."""
        assert out.topk_values is not None and out.topk_indices is not None
        assert out.topk_mask is not None
        logp = self.answer_log_probs(out.topk_values, q)  # (B, K, A)
        top = out.gather_topk(out.prior_logits).masked_fill(~out.topk_mask, -math.inf)
        res["log_pred"] = _predictive(
            [Factor(top, ("batch", "z")), Factor(logp, ("batch", "z", "a"))], logp.shape[0])
        res["prior_map"] = out.topk_indices[:, 0]
        post = self.attention.posterior(out, self._gather_answer(logp, answers))  # (B, K)
        res["posterior"] = torch.zeros_like(out.probs).scatter_add(
            -1, out.topk_indices, post * out.topk_mask)
        res["posterior_map"] = out.topk_indices.gather(-1, post.argmax(-1, keepdim=True))[:, 0]
        return res


def needle_chain_logits(scores: Tensor, bias: Tensor) -> Tensor:
    """The transition logits of ``"markov"`` mode's chain (module docstring): ``scores`` ``(B,
    T)`` and ``bias`` ``(2,)`` (enter, stay) -> ``(B, T, 3, 3)``, ``[b, t, i, j]`` scoring
    :math:`h_t = j` given :math:`h_{t-1} = i` (``-inf`` for the moves the chain forbids)."""
    zero = torch.zeros_like(scores)
    never = torch.full_like(scores, -math.inf)
    enter, stay = scores + bias[0], scores + bias[1]
    rows = [(zero, enter, never), (never, stay, zero), (never, never, zero)]
    return torch.stack([torch.stack(row, -1) for row in rows], -2)


def needle_emission(logp: Tensor, mask: Tensor, last: Tensor | None = None) -> Tensor:
    """``"markov"``: the chain's log-likelihoods ``(B, T, A, 3)`` from :math:`\\log p(a \\mid
    v_t, q)` ``logp`` ``(B, T, A)``: 0 for *before* and *after*, ``logp`` for *in*, and
    ``-inf`` for *before* at the video's last frame (``last`` ``(B, T)`` bool; default: the
    last ``True`` frame of the right-padded ``mask`` ``(B, T)``)."""
    if last is None:
        steps = torch.arange(mask.shape[1], device=mask.device)
        last = steps == (mask.sum(-1, keepdim=True) - 1)
    zero = torch.zeros_like(logp)
    before = torch.where(last[..., None], -math.inf, zero)
    return torch.stack([before, logp, zero], -1)


def needle_log_evidence(init_logits: Tensor, trans_logits: Tensor, logp: Tensor, mask: Tensor,
                        last: Tensor | None = None) -> Tensor:
    """``"markov"``: :math:`\\log Z_a` ``(B, A)`` for every answer (module docstring), one
    :class:`~attention.markov.MarkovAlignment` log marginal over the batch of (question,
    answer) pairs. ``init_logits`` ``(B, 3)``, ``trans_logits`` ``(B, T, 3, 3)``, ``logp``
    ``(B, T, A)``, ``mask`` ``(B, T)`` the real frames, ``last`` as :func:`needle_emission`."""
    b, t, a = logp.shape
    emit = needle_emission(logp, mask, last).transpose(1, 2).reshape(b * a, t, 3)
    chain = MarkovAlignment(init_logits.repeat_interleave(a, 0),
                            trans_logits.repeat_interleave(a, 0), emit,
                            tgt_mask=mask.repeat_interleave(a, 0))
    return chain.log_marginal().view(b, a)


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
