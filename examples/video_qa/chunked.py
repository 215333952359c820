r"""Questions about one long video, answered in chunks of frames under a memory cap.

:meth:`examples.video_qa.model.VideoQA.analyse` scores every frame of a batch at once: its
largest tensors are ``(questions, frames, 3 * dim)`` (the answer model's input) and
``(questions, frames, answers)``. For a video of 100,000 frames that is too much. Here the frames
are read in chunks of ``C`` consecutive frames, and each chunk's contribution to every quantity
is folded into a running summary that is exact:

* the log normaliser of the prior, :math:`\log \sum_t e^{s_t}` (a running ``logaddexp``);
* the unnormalised log predictive, :math:`\log \sum_t e^{s_t} p(a \mid v_t, q)` for every
  answer :math:`a` (so :math:`\log p(a \mid x, q)` is their difference);
* the prior's mode and the exact posterior's mode given the answer (a running max and argmax);
* soft attention's context :math:`\sum_t \mathrm{softmax}(s)_t v_t` (a running max, the sum of
  :math:`e^{s_t - m}` and the sum of :math:`e^{s_t - m} v_t`, rescaled when the max grows);
* K-max's K best frames with their answer log-probabilities (a running top-K);
* the two-level model's sums over segments (chunks hold whole segments; the segment prior is
  normalised by a running ``logaddexp`` of the segment scores, the frame prior within each
  segment by the chunk itself);
* the inference network's mode (variational modes);
* ``"markov"``: the chain over needle frames is carried across chunks by its forward message,
  for every answer (the log probability of each state at the chunk's last frame, with the
  evidence so far), from which the next chunk's chain starts. The chain only moves right
  (*before*, *in*, *after*), so a chunk's messages are prefix sums and ``logcumsumexp``\ s of
  its frames' transition log-probabilities and emissions (:func:`needle_forward`): O(C)
  vectorised work, no step-by-step recursion and no matrix products. The posterior's mode needs
  the evidence after a frame too, so a second pass reads the chunks backwards (encoding them
  again), carrying the backward message of the true answer (:func:`needle_backward`); between
  the passes only one ``(B, 3)`` message per chunk is kept.

**The memory cap.** ``C`` is chosen (:func:`chunk_frames`) so that the tensors one chunk
creates, counted by :func:`bytes_per_frame` (the encoder's window input and hidden layers, the
score, and per question the answer model's input, hidden layer and outputs), stay under
``max_bytes`` (default :data:`DEFAULT_CHUNK_BYTES`, 64 MiB): no tensor of size (questions x
frames x features) is made beyond the cap, whatever the video's length, and the running summary
is of size (questions x answers). The video itself (its precomputed features or pixels) is the
caller's and is read a chunk at a time.

The result equals :meth:`~examples.video_qa.model.VideoQA.analyse` on the whole video (the
tests compare them for every mode, with chunks smaller than the video and not aligned to it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .model import (
    BEFORE,
    IN,
    VideoQA,
    needle_backward,
    needle_chain_logits,
    needle_forward,
    needle_message_before,
)

__all__ = ["DEFAULT_CHUNK_BYTES", "LongVideoAnswer", "analyse_long", "bytes_per_frame",
           "chunk_frames"]

#: The default cap on the memory one chunk of frames may take (64 MiB).
DEFAULT_CHUNK_BYTES = 64 * 2 ** 20


@dataclass(frozen=True)
class LongVideoAnswer:
    """What :func:`analyse_long` found for ``B`` questions about one video of ``T`` frames.

    :ivar log_pred: ``(B, A)`` :math:`\\log p(a \\mid x, q)` (exact for the latent modes; the
        classifier's log-softmax at the soft context for ``"soft"``).
    :ivar prior_map: ``(B,)`` the prior's most probable frame (two-level: of the engine's MAP
        of :math:`(z_1, z_2)`, as :meth:`VideoQA.analyse` gives it).
    :ivar posterior_map: ``(B,)`` the exact posterior's mode given the true answer (latent
        modes; ``None`` for ``"soft"``).
    :ivar q_map: ``(B,)`` the inference network's mode (variational modes, else ``None``).
    :ivar segment_map: ``(B,)`` two-level: the segment of the largest posterior marginal.
    :ivar chunk: the frames per chunk used; :ivar chunks: how many chunks.
    :ivar log_norm: ``(B,)`` :math:`\\log \\sum_t e^{s_t}` of the prior's frame scores (every
        mode but two-level, whose prior is not a softmax of frame scores; ``None`` there), so
        that :math:`p(z = t) = e^{s_t - \\text{log_norm}}`. For ``"markov"``, whose prior is the
        chain over needle frames, it is still the normaliser of the frame scores :math:`s_t`
        (so a recall grid's needle mass there is the softmax of the scores, not the chain's
        probability), and ``prior_map`` / ``posterior_map`` are the frames most probably in the
        needle, a priori and given the true answer.
    """

    log_pred: Tensor
    prior_map: Tensor
    posterior_map: Tensor | None
    q_map: Tensor | None
    segment_map: Tensor | None
    chunk: int
    chunks: int
    log_norm: Tensor | None = None


def bytes_per_frame(model: VideoQA, questions: int) -> int:
    """The bytes that one frame of a chunk costs, summed over every tensor a chunk creates (an
    upper bound on what is alive at once): the encoder's copy of the chunk's frames, its window
    input and its four hidden tensors (the CNN's activations for pixels), the score's projection
    of the frame, and per question its score, :math:`v \\odot q`, the answer model's input
    ``[v; q; v * q]``, its two hidden tensors and three ``(answers,)`` rows (logits,
    log-softmax, the joint with the prior); two-level adds its padded copies and per-segment
    rows, the variational modes the inference network's scores."""
    c = model.config
    elem = torch.finfo(next(model.parameters()).dtype).bits // 8
    w, d, a = c.window, c.dim, c.num_answers
    if c.feature_dim is None:
        h = c.image_size
        encoder = (3 * (w + 1) * h * h + 2 * (32 + 64) * (h // 2) ** 2
                   + 2 * 64 * (h // 4) ** 2 + 4 * d)
    else:
        encoder = (w + 1) * c.feature_dim + 4 * d
    per_question = 1 + 6 * d + 3 * a
    if c.mode == "two-level":
        per_question += 2 * a + 3
    elif c.mode.startswith("variational"):
        per_question += d
    elif c.mode == "markov":  # the chain's factors and the engine's work, for every answer
        per_question += 60 * a + 60
    return elem * (encoder + d + questions * per_question)


def chunk_frames(model: VideoQA, questions: int, max_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Frames per chunk under the cap ``max_bytes``: at least one (two-level: one segment), and
    a whole number of segments for ``"two-level"``.

    :raises ValueError: if one frame (two-level: one segment) alone exceeds the cap; the
        message gives the bytes it needs.
    """
    per = bytes_per_frame(model, questions)
    unit = model.config.segment_len if model.config.mode == "two-level" else 1
    frames = (max_bytes // per) // unit * unit
    if frames < 1:
        raise ValueError(f"a chunk of {unit} frame(s) for {questions} question(s) needs "
                         f"{unit * per} bytes, above the cap of {max_bytes}; raise max_bytes or "
                         "ask fewer questions at once")
    return int(frames)


class _RunningMax:
    """A running maximum and its position over chunks of ``(B, C)`` values."""

    def __init__(self) -> None:
        self.value: Tensor | None = None
        self.index: Tensor | None = None

    def add(self, values: Tensor, offset: int) -> None:
        best, at = values.max(-1)
        at = at + offset
        if self.value is None or self.index is None:
            self.value, self.index = best, at
        else:
            better = best > self.value
            self.value = torch.where(better, best, self.value)
            self.index = torch.where(better, at, self.index)

    def result(self) -> Tensor:
        assert self.index is not None
        return self.index


def _logaddexp(a: Tensor | None, b: Tensor) -> Tensor:
    return b if a is None else torch.logaddexp(a, b)


@torch.no_grad()
def analyse_long(model: VideoQA, video: Tensor, words: Tensor, word_lengths: Tensor,
                 answers: Tensor, max_bytes: int = DEFAULT_CHUNK_BYTES,
                 chunk: int | None = None) -> LongVideoAnswer:
    """Answer ``B`` questions about one video, reading its frames in chunks (module docstring).

    :param video: ``(T, F)`` features or ``(T, H, W, 3)`` uint8 pixels, unpadded.
    :param words: ``(B, L)`` long question words, 0-padded; :param word_lengths: ``(B,)``.
    :param answers: ``(B,)`` the true answers (for the posterior's and q's modes only).
    :param max_bytes: the memory cap of one chunk (:func:`chunk_frames`).
    :param chunk: frames per chunk instead of the cap's (two-level: a multiple of the segment
        length); for tests.
    :raises ValueError: on an empty video, a ``chunk`` that is not a whole number of segments in
        two-level mode, or a cap too small for one frame.
    """
    model.eval()
    c = model.config
    t, b = int(video.shape[0]), int(words.shape[0])
    if t < 1:
        raise ValueError("the video has no frames")
    if chunk is None:
        chunk = chunk_frames(model, b, max_bytes)
    elif chunk < 1 or (c.mode == "two-level" and chunk % c.segment_len):
        raise ValueError(f"chunk must be a positive number of frames (two-level: a multiple of "
                         f"segment_len={c.segment_len}), got {chunk}")
    q = model.encode_question(words, word_lengths)
    if c.mode == "markov":
        return _analyse_markov(model, video, q, answers, chunk)
    state = _State(model, q, answers)
    starts = range(0, t, chunk)
    for start in starts:
        stop = min(start + chunk, t)
        state.add(model.frames.encode_span(video, start, stop), start)
    return state.result(chunk, len(starts))


class _State:
    """The running summary of :func:`analyse_long` (its module docstring lists what it holds)."""

    def __init__(self, model: VideoQA, q: Tensor, answers: Tensor) -> None:
        self.model, self.q, self.answers = model, q, answers
        self.mode = model.config.mode
        self.log_norm: Tensor | None = None  # (B,) log sum of exp prior (segment) scores
        self.log_joint: Tensor | None = None  # (B, A) log sum of exp score + log p(a | frame)
        self.prior = _RunningMax()
        self.posterior = _RunningMax()
        self.q_mode = _RunningMax()
        self.segment = _RunningMax()
        # soft attention's context: running max, sum of weights and weighted sum of vectors
        self.soft: tuple[Tensor, Tensor, Tensor] | None = None
        # K-max: the best scores so far, their frames and their answer log-probabilities
        self.top: tuple[Tensor, Tensor, Tensor] | None = None

    def _answer_log_probs(self, mem: Tensor) -> Tensor:
        """``(B, C, A)`` log p(a | v_t, q) of the chunk's frames ``mem (C, D)``."""
        return self.model.answer_log_probs(mem.expand(self.q.shape[0], -1, -1), self.q)

    def _scores(self, mem: Tensor) -> Tensor:
        """``(B, C)`` the prior's frame scores."""
        out: Tensor = self.model.attention.score(self.q.unsqueeze(1), mem.unsqueeze(0))
        return out.squeeze(1)

    def add(self, mem: Tensor, offset: int) -> None:
        """Fold in the chunk of frames ``offset .. offset + C - 1``, encoded as ``mem (C, D)``."""
        if self.mode == "two-level":
            self._add_two_level(mem, offset)
            return
        scores = self._scores(mem)
        self.prior.add(scores, offset)
        self.log_norm = _logaddexp(self.log_norm, scores.logsumexp(-1))
        if self.mode == "soft":
            self._add_soft(scores, mem)
            return
        logp = self._answer_log_probs(mem)
        if self.mode == "k-max":
            self._add_top(scores, logp, offset)
            return
        self.log_joint = _logaddexp(self.log_joint,
                                    (scores.unsqueeze(-1) + logp).logsumexp(1))
        self.posterior.add(scores + _gather(logp, self.answers), offset)
        if self.model.infer is not None:
            mask = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
            qs = self.model.posterior_logits(mem.expand(scores.shape[0], -1, -1), self.q,
                                             self.answers, mask)
            self.q_mode.add(qs, offset)

    def _add_soft(self, scores: Tensor, mem: Tensor) -> None:
        top = scores.max(-1).values
        if self.soft is not None:
            top = torch.maximum(top, self.soft[0])
        w = (scores - top.unsqueeze(-1)).exp()  # (B, C)
        total, ctx = w.sum(-1), w @ mem
        if self.soft is not None:
            m0, total0, ctx0 = self.soft
            scale = (m0 - top).exp()
            total, ctx = total + scale * total0, ctx + scale.unsqueeze(-1) * ctx0
        self.soft = (top, total, ctx)

    def _add_top(self, scores: Tensor, logp: Tensor, offset: int) -> None:
        frames = torch.arange(offset, offset + scores.shape[1], device=scores.device)
        frames = frames.expand(scores.shape)
        if self.top is not None:
            s0, f0, l0 = self.top
            scores, frames, logp = (torch.cat([s0, scores], 1), torch.cat([f0, frames], 1),
                                    torch.cat([l0, logp], 1))
        k = min(self.model.config.k_max, scores.shape[1])
        best, at = scores.topk(k, dim=-1)
        self.top = (best, frames.gather(1, at),
                    logp.gather(1, at.unsqueeze(-1).expand(-1, -1, logp.shape[-1])))

    def _add_two_level(self, mem: Tensor, offset: int) -> None:
        model = self.model
        assert model.segment_score is not None
        seg = model.config.segment_len
        frames, dim = mem.shape
        groups = math.ceil(frames / seg)
        pad = groups * seg - frames
        real = F.pad(torch.ones(frames, dtype=torch.bool, device=mem.device), (0, pad))
        real = real.view(groups, seg)
        padded = F.pad(mem, (0, 0, 0, pad)).view(groups, seg, dim)
        weights = real.unsqueeze(-1).to(mem.dtype)
        seg_mem = (padded * weights).sum(1) / weights.sum(1)  # means over real frames
        seg_scores = model.segment_score(self.q.unsqueeze(1), seg_mem.unsqueeze(0)).squeeze(1)
        frame_scores = F.pad(self._scores(mem), (0, pad)).view(-1, groups, seg)
        log_p2 = frame_scores.masked_fill(~real, -math.inf).log_softmax(-1)  # (B, G, L)
        logp = F.pad(self._answer_log_probs(mem), (0, 0, 0, pad))
        logp = logp.view(logp.shape[0], groups, seg, -1)  # (B, G, L, A)
        self.log_norm = _logaddexp(self.log_norm, seg_scores.logsumexp(-1))
        joint = seg_scores[..., None, None] + log_p2.unsqueeze(-1) + logp
        self.log_joint = _logaddexp(self.log_joint, joint.flatten(1, 2).logsumexp(1))
        prior = (seg_scores.unsqueeze(-1) + log_p2).flatten(1)
        self.prior.add(prior, offset)
        ll = logp.gather(-1, self.answers.view(-1, 1, 1, 1).expand(-1, groups, seg, 1))
        post = seg_scores.unsqueeze(-1) + log_p2 + ll.squeeze(-1)  # (B, G, L)
        self.posterior.add(post.flatten(1), offset)
        self.segment.add(post.logsumexp(-1), offset // seg)

    def result(self, chunk: int, chunks: int) -> LongVideoAnswer:
        mode = self.mode
        prior_map = self.prior.result()
        posterior_map = q_map = segment_map = None
        if mode == "soft":
            assert self.soft is not None
            _, total, ctx = self.soft
            logits = self.model.classify(ctx / total.unsqueeze(-1), self.q)
            log_pred = F.log_softmax(logits, -1)
        elif mode == "k-max":
            assert self.top is not None
            scores, frames, logp = self.top
            joint = scores.unsqueeze(-1) + logp
            log_pred = joint.logsumexp(1) - scores.logsumexp(-1, keepdim=True)
            prior_map = frames[:, 0]
            post = scores + _gather(logp, self.answers)
            posterior_map = frames.gather(1, post.argmax(-1, keepdim=True)).squeeze(1)
        else:
            assert self.log_joint is not None and self.log_norm is not None
            log_pred = self.log_joint - self.log_norm.unsqueeze(-1)
            posterior_map = self.posterior.result()
            if self.model.infer is not None:
                q_map = self.q_mode.result()
            if mode == "two-level":
                segment_map = self.segment.result()
        return LongVideoAnswer(log_pred, prior_map, posterior_map, q_map, segment_map, chunk,
                               chunks, None if mode == "two-level" else self.log_norm)


def _gather(logp: Tensor, answers: Tensor) -> Tensor:
    """``(B, C, A)`` -> ``(B, C)``: each question's true answer's log-probability."""
    return logp.gather(-1, answers.view(-1, 1, 1).expand(-1, logp.shape[1], 1)).squeeze(-1)


def _analyse_markov(model: VideoQA, video: Tensor, q: Tensor, answers: Tensor, chunk: int
                    ) -> LongVideoAnswer:
    """:func:`analyse_long` of ``"markov"`` mode (module docstring): a forward pass for the
    predictive and the prior, a backward pass for the posterior's mode, each chunk's chain in
    closed form (:func:`needle_forward`, :func:`needle_backward`)."""
    assert model.needle_bias is not None
    t, b, a = int(video.shape[0]), int(q.shape[0]), model.config.num_answers
    starts = list(range(0, t, chunk))
    rows = torch.arange(b, device=q.device)
    dtype = q.dtype

    def chunk_chain(start: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(scores (B, C), transition log-probabilities (B, C, 3, 3), the answers'
        log-likelihoods (B, C, A), before's emission (B, C))`` of the chunk at ``start``."""
        stop = min(start + chunk, t)
        mem = model.frames.encode_span(video, start, stop)
        scores = model.attention.score(q.unsqueeze(1), mem.unsqueeze(0)).squeeze(1)
        assert model.needle_bias is not None
        trans_lp = needle_chain_logits(scores, model.needle_bias).log_softmax(-1)
        logp = model.answer_log_probs(mem.expand(b, -1, -1), q)
        last = (torch.arange(start, stop, device=q.device) == t - 1).expand(b, -1)
        e_before = torch.where(last, -math.inf, torch.zeros_like(scores))
        return scores, trans_lp, logp, e_before

    start_state = torch.full((3,), -math.inf, dtype=torch.float64, device=video.device)
    start_state[BEFORE] = 0.0
    alpha = start_state.expand(b * a, 3)  # every (question, answer) pair's forward message
    prior_alpha = start_state.expand(b, 3)
    log_norm: Tensor | None = None
    prior = _RunningMax()
    before_chunk: list[Tensor] = []  # the true answer's forward message before each chunk
    for start in starts:
        scores, trans_lp, logp, e_before = chunk_chain(start)
        log_norm = _logaddexp(log_norm, scores.logsumexp(-1))
        # the prior: no evidence, so every backward message is 0 and alpha is the marginal
        pa = needle_forward(prior_alpha, trans_lp, torch.zeros_like(scores),
                            torch.zeros_like(scores))
        prior.add(pa[..., IN], start)
        prior_alpha = pa[:, -1]
        before_chunk.append(alpha.view(b, a, 3)[rows, answers])
        steps = scores.shape[1]
        fa = needle_forward(alpha, trans_lp.repeat_interleave(a, 0),
                            logp.transpose(1, 2).reshape(b * a, steps),
                            e_before.repeat_interleave(a, 0))
        alpha = fa[:, -1]
    joint = alpha.logsumexp(-1).view(b, a)
    log_pred = (joint - joint.logsumexp(-1, keepdim=True)).to(dtype)
    log_z = joint[rows, answers]
    # the backward pass: the true answer's posterior marginals, chunk by chunk from the end
    beta = torch.zeros(b, 3, dtype=torch.float64, device=video.device)
    best: list[tuple[Tensor, Tensor]] = []
    for start, before in zip(reversed(starts), reversed(before_chunk), strict=True):
        scores, trans_lp, logp, e_before = chunk_chain(start)
        own = logp[rows, :, answers]  # (B, C)
        fa = needle_forward(before, trans_lp, own, e_before)
        ba = needle_backward(beta, trans_lp, own, e_before)
        post = fa[..., IN] + ba[..., IN] - log_z[:, None]
        value, at = post.max(-1)
        best.append((value, at + start))
        beta = needle_message_before(trans_lp, own, e_before, ba[:, 0])
    posterior_map = best[-1][1]
    top = best[-1][0]
    for value, at in reversed(best[:-1]):  # in the frames' order: ties go to the first frame
        better = value > top
        top, posterior_map = torch.where(better, value, top), torch.where(better, at,
                                                                           posterior_map)
    return LongVideoAnswer(log_pred, prior.result(), posterior_map, None, None, chunk,
                           len(starts), log_norm)
