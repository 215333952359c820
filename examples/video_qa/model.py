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

Each :math:`Z_a` is the exact log marginal of this chain (the frames are its steps, :math:`\log
p(a \mid v_t, q)` the emission of *in*, and :math:`-\infty` for *before* at the last frame), for
every answer at once (answers stacked on the batch). Since the chain only moves right, its
forward messages are prefix sums and ``logcumsumexp``\ s (:func:`needle_forward`, which the
chunked scorer uses), and the loss's :math:`Z_a` is one sum over the needle's first and last
frames (:func:`needle_log_evidence`); :meth:`VideoQA.analyse`'s prior and posterior marginals
are the same chain's :class:`attention.markov.MarkovAlignment` (the engine), and the tests hold
the two against each other and against enumeration of every state path. When every run has one
frame this is exactly ``"marginal"``'s :math:`\sum_z p(z \mid x, q)\, p(a \mid v_z, q)` (then
:math:`\sum_a Z_a = 1`); with longer runs the evidence of all the needle's frames is multiplied,
instead of one frame being picked. Why this and not one frame with a Markov prior: a single
answer has a single alignment, so there is no sequence of alignments for a Markov prior to link;
the needle's *frames* are the sequence. Its ``prior`` is :math:`p(h_t = \mathrm{in} \mid x, q)`
(the chain alone, without the non-empty condition), its ``posterior`` :math:`p(h_t = \mathrm{in}
\mid x, q, a)`; both are engine marginals, and neither sums to one over frames (their sum is the
expected needle length).
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
#: The frame encoder's activations (:attr:`ModelConfig.frame_activation`).
FRAME_ACTIVATIONS = ("relu", "leaky-relu")
#: The negative slope of ``"leaky-relu"``.
LEAKY_SLOPE = 0.1
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
    :ivar frame_activation: the frame encoder's activations: ``"relu"`` (as the first runs
        were trained) or ``"leaky-relu"`` (negative slope :data:`LEAKY_SLOPE`). ReLUs there can
        die for good: once a whole layer maps every frame to zero, every frame has the same
        vector, the prior is uniform, the answer model is blind to the frames, and no gradient
        reaches the encoder again. A leaky ReLU always passes a gradient.
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
    frame_activation: str = "relu"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.window < 1 or self.window % 2 == 0:
            raise ValueError(f"window must be an odd number of frames >= 1, got {self.window}")
        if self.k_max < 1:
            raise ValueError(f"k_max must be at least 1, got {self.k_max}")
        if self.frame_activation not in FRAME_ACTIVATIONS:
            raise ValueError(f"frame_activation must be one of {FRAME_ACTIVATIONS}, got "
                             f"{self.frame_activation!r}")
        if self.feature_dim is None and self.image_size < 4:
            raise ValueError(f"image_size must be at least 4 pixels, got {self.image_size}")
        if self.mode in _SAMPLE and self.samples < 2:
            raise ValueError("the sampling modes use a leave-one-out baseline: samples >= 2")

    def as_dict(self) -> dict[str, Any]:
        """The fields, without those added after checkpoints were first written (``window``,
        ``k_max``, ``frame_activation``) while they keep their defaults, so that older checkpoints
        still compare equal."""
        out = asdict(self)
        for name, default in _LATER_FIELDS.items():
            if out[name] == default:
                del out[name]
        return out


#: Fields of :class:`ModelConfig` added later, with the defaults older runs had implicitly.
_LATER_FIELDS: dict[str, Any] = {"window": 3, "k_max": 4, "frame_activation": "relu"}


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
        def act() -> nn.Module:
            return (nn.ReLU() if config.frame_activation == "relu"
                    else nn.LeakyReLU(LEAKY_SLOPE))

        if self.pixels:
            # convolutions, then max- and mean-pooling over space: the features say what is
            # where in the window (any position), and how much of it
            self.net: nn.Module = nn.Sequential(
                nn.Conv2d(3 * w, 32, 3, stride=2, padding=1), act(),
                nn.Conv2d(32, 64, 3, padding=1), act(),
                nn.Conv2d(64, 64, 3, stride=2, padding=1), act(),
                _MaxMeanPool(), nn.Linear(128, d), act())
        else:
            assert config.feature_dim is not None
            self.net = nn.Sequential(nn.Linear(w * config.feature_dim, d), act(),
                                     nn.Linear(d, d), act())

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


def _revlcse(x: Tensor) -> Tensor:
    """``logcumsumexp`` from the right along the last dim."""
    return torch.logcumsumexp(x.flip(-1), -1).flip(-1)


def _needle_moves(trans_lp: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four moves of the before / in / after chain that are not ``-inf``, from its
    transition log-probabilities ``(N, C, 3, 3)``: stay before, enter, stay in, leave (each
    ``(N, C)``; staying after has probability 1)."""
    return (trans_lp[..., BEFORE, BEFORE], trans_lp[..., BEFORE, IN], trans_lp[..., IN, IN],
            trans_lp[..., IN, AFTER])


#: What a ``-inf`` move (a stay made impossible, e.g. by a ``-inf`` bias) counts as inside the
#: closed form's prefix sums, which subtract one prefix from another: ``e^{-10^4}`` is exactly 0
#: in float64 beside any log-probability above -9,000, and the prefix sums stay finite (their
#: rounding, ``|c| * 1e-16``, is some 1e-9 for a chunk of 6,000 frames that all take it).
_IMPOSSIBLE = -1.0e4


def _finite(x: Tensor) -> Tensor:
    """``x`` with ``-inf`` replaced by :data:`_IMPOSSIBLE`."""
    return torch.where(torch.isneginf(x), _IMPOSSIBLE, x)


def needle_forward(alpha: Tensor, trans_lp: Tensor, e_in: Tensor, e_before: Tensor) -> Tensor:
    r"""``"markov"``: the forward messages :math:`\alpha_t(h) = \log p(h_t = h, \text{evidence
    up to } t)` ``(N, C, 3)`` of a chunk in closed form, from the message ``alpha`` ``(N, 3)``
    of the frame before it, the chunk's transition log-probabilities ``(N, C, 3, 3)`` and the
    emissions of *in* and *before* ``(N, C)`` (*after*'s is 0).

    The chain only moves right, so each state's message is a prefix sum, or the
    ``logcumsumexp`` of the earlier states' messages with a prefix sum taken out:
    :math:`\alpha_t(\text{in}) = c_t + \log \sum_{s \le t} e^{\alpha_{s-1}(\text{before}) +
    \text{enter}_s + e_s - c_s}` with :math:`c_t` the prefix sum of *stay in* plus *in*'s
    emission; O(C) vectorised work, in float64 (prefix sums of long videos are large)."""
    bb, bi, ii, ia = (x.double() for x in _needle_moves(trans_lp))
    e_in, e_before, alpha = e_in.double(), e_before.double(), alpha.double()
    a_b = alpha[:, BEFORE, None] + torch.cumsum(bb + e_before, -1)
    b_prev = torch.cat([alpha[:, BEFORE, None], a_b[:, :-1]], -1)
    c = torch.cumsum(_finite(ii + e_in), -1)
    a_i = c + torch.logaddexp(alpha[:, IN, None], torch.logcumsumexp(b_prev + bi + e_in - c, -1))
    i_prev = torch.cat([alpha[:, IN, None], a_i[:, :-1]], -1)
    a_a = torch.logaddexp(alpha[:, AFTER, None], torch.logcumsumexp(i_prev + ia, -1))
    return torch.stack([a_b, a_i, a_a], -1)


def needle_backward(beta: Tensor, trans_lp: Tensor, e_in: Tensor, e_before: Tensor) -> Tensor:
    r"""``"markov"``: the backward messages :math:`\beta_t(h) = \log p(\text{evidence after }
    t \mid h_t = h)` ``(N, C, 3)`` of a chunk in closed form (as :func:`needle_forward`), from
    the message ``beta`` ``(N, 3)`` of its last frame (which the chunk after it gives)."""
    bb, bi, ii, ia = (x.double() for x in _needle_moves(trans_lp))
    e_in, e_before, beta = e_in.double(), e_before.double(), beta.double()
    n, steps = e_in.shape
    b_a = beta[:, AFTER, None].expand(n, steps)
    c = torch.cumsum(_finite(ii + e_in), -1)
    # stay in through e, then leave at e + 1 (or stay in to the chunk's last frame)
    w = torch.cat([c[:, :-1] + ia[:, 1:] + beta[:, AFTER, None],
                   c[:, -1:] + beta[:, IN, None]], -1)
    b_i = _revlcse(w) - c
    # stay before through s - 1, then enter at s > t (or stay before to the last frame)
    cb = torch.cumsum(_finite(bb) + e_before, -1)
    v = torch.cat([cb[:, :-1] + bi[:, 1:] + e_in[:, 1:] + b_i[:, 1:],
                   cb[:, -1:] + beta[:, BEFORE, None]], -1)
    b_b = torch.cat([_revlcse(v)[:, :-1] - cb[:, :-1], beta[:, BEFORE, None]], -1)
    return torch.stack([b_b, b_i, b_a], -1)


def needle_message_before(trans_lp: Tensor, e_in: Tensor, e_before: Tensor, beta: Tensor) -> Tensor:
    """The backward message ``(N, 3)`` of the frame before a chunk, from its first frame's
    transitions, emissions and backward message ``(N, 3)``."""
    first = torch.stack([e_before[:, 0], e_in[:, 0], torch.zeros_like(e_in[:, 0])], -1)
    return (trans_lp[:, 0].double() + (first.double() + beta.double())[:, None]).logsumexp(-1)


def needle_log_evidence(init_logits: Tensor, trans_logits: Tensor, logp: Tensor, mask: Tensor,
                        last: Tensor | None = None) -> Tensor:
    """``"markov"``: :math:`\\log Z_a` ``(B, A)`` for every answer (module docstring), the exact
    log marginal of the chain over the batch of (question, answer) pairs, in closed form: a
    sum over the needle's first and last frames, as prefix sums and one ``logcumsumexp``
    (differentiable, in float64), up to each video's last real frame. ``init_logits``
    ``(B, 3)``, ``trans_logits`` ``(B, T, 3, 3)``, ``logp`` ``(B, T, A)``, ``mask`` ``(B, T)``
    the real frames (right padded), ``last`` as :func:`needle_emission`. Padded frames are
    zeroed before the prefix sums, so that nothing they hold (``-inf`` scores) reaches a
    gradient."""
    b, t, a = logp.shape
    end = mask.sum(-1) - 1  # each video's last real frame
    if last is None:
        last = torch.arange(t, device=mask.device) == end[:, None]
    # (B, 1, T) moves against (B, A, T) emissions: nothing repeated per answer
    lp = torch.where(mask[..., None, None], trans_logits.log_softmax(-1), 0.0)[:, None]
    bb, bi, ii, ia = (x.double() for x in _needle_moves(lp))
    e_in = torch.where(mask[..., None], logp, 0.0).transpose(1, 2).double()
    e_before = torch.where(last & mask, -math.inf, 0.0)[:, None].double()
    init = init_logits.log_softmax(-1).double()
    # Z = sum over the needle's first frame s <= last frame e of
    #     p(before up to s - 1, enter at s) e^{c_e - c_s + e_s} p(leave at e + 1, or the end)
    # with c the prefix sum of stay-in plus in's emission from frame 1: one logcumsumexp
    stay_b = torch.cat([(init[:, BEFORE, None] + e_before[..., 0]).unsqueeze(-1),
                        bb[..., 1:] + e_before[..., 1:]], -1)
    before = torch.cat([torch.zeros_like(stay_b[..., :1]),
                        torch.cumsum(stay_b, -1)[..., :-1]], -1)  # log p(before to s - 1)
    enter = torch.cat([init[:, None, IN, None], bi[..., 1:]], -1)
    c = torch.cumsum(torch.cat([torch.zeros_like(e_in[..., :1]),
                                _finite(ii[..., 1:] + e_in[..., 1:])], -1), -1)
    starts = torch.logcumsumexp(before + enter + e_in - c, -1)  # over s <= e
    steps = torch.arange(t, device=mask.device)
    leave = torch.cat([ia[..., 1:], torch.zeros_like(ia[..., :1])], -1).expand(b, a, t)
    leave = torch.where(steps == end[:, None, None], 0.0, leave)  # the video ends in the needle
    leave = torch.where(steps > end[:, None, None], -math.inf, leave)  # padding
    return (c + leave + starts).logsumexp(-1).to(logp.dtype)


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
