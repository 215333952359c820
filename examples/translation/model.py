r"""The LSTM encoder-decoder with input feeding and a latent alignment (Deng et al., 2018).

* Encoder: embeddings, a bidirectional LSTM (``hidden / 2`` per direction), ``layers`` deep.
* Decoder: an LSTM whose input at step :math:`t` is the embedding of :math:`y_{t-1}` and the
  attentional vector of step :math:`t-1` (input feeding, Luong et al., 2015),

  .. math::

      \tilde h_t = \tanh(W_h h_t + W_v c_t + b), \qquad c_t = \textstyle\sum_s p(z_t = s)\, m_s,

  with :math:`p(z_t \mid x, y_{<t})` the attention of :class:`attention.LatentAlignmentAttention`
  (a general, bilinear score). Soft attention predicts :math:`y_t` from :math:`\tilde h_t`. The
  latent modes predict it from one source position, :math:`p(y_t \mid x, z_t = s) =
  \mathrm{softmax}(W_o \tanh(W_h h_t + W_v m_s + b))`, for every :math:`s`
  (:class:`attention.AlignedOutputLayer`), and the objective of the mode combines those with the
  prior; the input feed stays the prior-expected :math:`\tilde h_t`, as in the paper.
* ``output_layer="log-linear"`` replaces that layer by a product of experts,
  :math:`p(y_t \mid x, z_t = s) = \mathrm{softmax}(A h_t + C m_s + b)`
  (:class:`attention.LogLinearOutputLayer`), whose exact enumeration costs about what soft
  attention does; soft attention then predicts from :math:`A h_t + C c_t + b`, and the input feed
  is its own :math:`\tanh(W_f [h_t; c_t] + b_f)`.
* ``markov`` and ``variational-markov``: the alignments form a first-order Markov chain
  (:class:`attention.markov.MarkovAlignmentPrior`, a content score plus a learned jump bias),
  eliminated exactly by the engine; ``variational-markov`` trains with a chain-structured
  :math:`q` (the inference network's scores plus its own jump bias) and the exact ELBO of
  :func:`attention.markov.markov_alignment_elbo`.
* The variational modes' inference network :math:`q(z \mid x, y)` is
  :class:`attention.AlignmentInferenceNetwork` (a bidirectional LSTM over the target).

:meth:`Seq2Seq.forward` returns the training objective of a batch; :meth:`Seq2Seq.score`
the exact :math:`-\log p(y \mid x)` (perplexity) and the prior's entropy;
:meth:`Seq2Seq.translate` beam search (or greedy decoding) under the prior.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from attention import (
    OUTPUT_LAYERS,
    AlignedOutputLayer,
    AlignmentInferenceNetwork,
    AttentionMode,
    LatentAlignmentAttention,
    LogLinearOutputLayer,
    OutputLayerName,
    make_output_layer,
)
from attention.decoding import beam_search
from attention.functional import alignment_loss
from attention.markov import (
    MarkovAlignmentPrior,
    markov_alignment_elbo,
    markov_alignment_log_marginal,
    markov_alignment_marginals,
    markov_transition_log_probs,
)

from .data import BOS, EOS, PAD, Batch

__all__ = ["MODES", "OUTPUT_LAYERS", "ModelConfig", "Seq2Seq", "greedy_decode"]

#: ``--attention`` choices: the modes of :class:`attention.LatentAlignmentAttention` and the
#: Markov prior (exact marginal likelihood, or variational with a chain-structured ``q``).
MODES = ("soft", "marginal", "hard-enum", "hard-sample", "variational-enum",
         "variational-sample", "gumbel", "markov", "variational-markov")
_VARIATIONAL = ("variational-enum", "variational-sample", "gumbel", "variational-markov")
_MARKOV = ("markov", "variational-markov")
_SAMPLE = ("hard-sample", "variational-sample")


@dataclass(frozen=True)
class ModelConfig:
    """Sizes and the attention mode (saved in checkpoints)."""

    vocab_size: int
    mode: str = "soft"
    embed: int = 256
    hidden: int = 512
    layers: int = 2
    dropout: float = 0.3
    k_max: int | None = None
    max_jump: int = 4
    max_bytes: int = 256 * 2**20
    temperature: float = 1.0
    output_layer: OutputLayerName = "luong"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> ModelConfig:
        """The configuration a checkpoint saved (one written before ``output_layer`` existed
        used the tanh layer, ``"luong"``)."""
        return cls(**{"output_layer": "luong", **saved})


class ChainPosterior(nn.Module):
    """A chain-structured :math:`q(z \\mid x, y)` from per-step scores: ``init = scores[:, 0] +
    start bias``, ``trans[t, i, j] = scores[t, j] + jump bias(j - i)`` (as in
    :class:`~attention.markov.MarkovAlignmentPrior`)."""

    def __init__(self, max_jump: int) -> None:
        super().__init__()
        self.max_jump = max_jump
        self.jump_bias = nn.Parameter(torch.zeros(2 * max_jump + 1))
        self.start_bias = nn.Parameter(torch.zeros(max_jump + 1))

    def forward(self, scores: Tensor) -> tuple[Tensor, Tensor]:
        s = scores.shape[-1]
        pos = torch.arange(s, device=scores.device)
        j = self.max_jump
        jump = (pos[None, :] - pos[:, None]).clamp(-j, j) + j
        return (scores[:, 0] + self.start_bias[pos.clamp(max=j)],
                scores[:, :, None, :] + self.jump_bias[jump])


class Seq2Seq(nn.Module):
    """See the module docstring. ``config.mode`` is one of :data:`MODES`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.mode not in MODES:
            raise ValueError(f"unknown attention mode {config.mode!r}; choose one of {MODES}")
        if config.hidden % 2:
            raise ValueError(f"hidden must be even (two encoder directions), got {config.hidden}")
        if config.output_layer not in OUTPUT_LAYERS:
            raise ValueError(f"unknown output layer {config.output_layer!r}; choose one of "
                             f"{OUTPUT_LAYERS}")
        if config.k_max is not None and config.mode in ("soft",) + _MARKOV:
            raise ValueError(f"k_max (K-max) restricts an independent latent alignment; it does "
                             f"not apply to mode {config.mode!r}")
        self.config = c = config
        v, e, h = c.vocab_size, c.embed, c.hidden
        self.src_embed = nn.Embedding(v, e, padding_idx=PAD)
        self.tgt_embed = nn.Embedding(v, e, padding_idx=PAD)
        self.encoder = nn.LSTM(e, h // 2, num_layers=c.layers, batch_first=True,
                               bidirectional=True, dropout=c.dropout if c.layers > 1 else 0.0)
        self.bridge = nn.Linear(h, 2 * h)  # last encoder states -> decoder's initial (h, c)
        self.decoder = nn.LSTM(e + h, h, num_layers=c.layers, batch_first=True,
                               dropout=c.dropout if c.layers > 1 else 0.0)
        attn_mode = cast(AttentionMode, "marginal" if c.mode in _MARKOV else c.mode)
        self.attention = LatentAlignmentAttention(h, h, score="general", mode=attn_mode,
                                                  k_max=c.k_max)
        self.output = make_output_layer(c.output_layer, h, h, v, max_bytes=c.max_bytes)
        # the log-linear layer has no attentional vector of its own: the input feed gets one
        self.feed_proj: nn.Linear | None = (nn.Linear(2 * h, h) if c.output_layer == "log-linear"
                                            else None)
        self.drop = nn.Dropout(c.dropout)
        self.inference: AlignmentInferenceNetwork | None = None
        if c.mode in _VARIATIONAL:
            self.inference = AlignmentInferenceNetwork(e, h, h // 2)
        self.markov: MarkovAlignmentPrior | None = None
        self.q_chain: ChainPosterior | None = None
        if c.mode in _MARKOV:
            self.markov = MarkovAlignmentPrior(h, c.max_jump)
        if c.mode == "variational-markov":
            self.q_chain = ChainPosterior(c.max_jump)

    # -- encoder and teacher-forced decoder ----------------------------------------------------

    def encode(self, src: Tensor, src_mask: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Memory ``(B, S, H)`` and the decoder's initial state ``(layers, B, H)`` twice."""
        c = self.config
        lengths = src_mask.sum(-1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.drop(self.src_embed(src)), lengths,
                                                   batch_first=True, enforce_sorted=False)
        out, (hn, _) = self.encoder(packed)
        memory, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True,
                                                     total_length=src.shape[1])
        b = src.shape[0]
        last = hn.view(c.layers, 2, b, c.hidden // 2).transpose(1, 2).reshape(c.layers, b, -1)
        h0, c0 = torch.tanh(self.bridge(last)).chunk(2, dim=-1)
        return memory, (h0.contiguous(), c0.contiguous())

    def _feed(self, h: Tensor, context: Tensor) -> Tensor:
        """The attentional vector :math:`\\tilde h = \\tanh(W_h h + W_v c + b)` (the tanh
        layer's own; with the log-linear layer :math:`\\tanh(W_f [h; c] + b_f)`)."""
        if self.feed_proj is not None:
            return torch.tanh(self.feed_proj(torch.cat([h, context], -1)))
        out = self.output
        assert isinstance(out, AlignedOutputLayer)
        return torch.tanh(out.hidden_proj(h) + out.memory_proj(context))

    def _soft_logits(self, hs: Tensor, feeds: Tensor, contexts: Tensor) -> Tensor:
        """Soft attention's next-word logits: :math:`W_o \\tilde h + b_o` (the tanh layer on
        the soft context), or :math:`A h + C c + b` (the log-linear layer on it)."""
        if isinstance(self.output, LogLinearOutputLayer):
            return self.output(hs, contexts)
        return self.output.out(feeds)

    def decode(self, memory: Tensor, src_mask: Tensor, state: tuple[Tensor, Tensor],
               tgt_in: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Teacher-forced decoder states ``(B, T, H)``, attentional vectors ``(B, T, H)`` and
        soft contexts ``(B, T, H)``.

        The recurrence (input feeding) is a loop over target steps, as in any LSTM decoder with
        input feeding; every alignment computation after it runs on all steps at once."""
        emb = self.drop(self.tgt_embed(tgt_in))
        b, t = tgt_in.shape
        feed = memory.new_zeros(b, self.config.hidden)
        hs, feeds, ctxs = [], [], []
        for i in range(t):
            x = torch.cat([emb[:, i], feed], dim=-1).unsqueeze(1)
            out, state = self.decoder(x, state)
            h = out[:, 0]
            ctx = self.attention(h, memory, src_mask).context
            feed = self._feed(h, ctx)
            hs.append(h)
            feeds.append(feed)
            ctxs.append(ctx)
            feed = self.drop(feed)
        return torch.stack(hs, 1), torch.stack(feeds, 1), torch.stack(ctxs, 1)

    # -- objectives ----------------------------------------------------------------------------

    def _posterior_scores(self, batch: Batch, memory: Tensor) -> Tensor:
        assert self.inference is not None
        emb = self.drop(self.tgt_embed(batch.tgt_out))
        return self.inference(emb, memory, None, batch.tgt_mask)

    def forward(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """The training objective of ``batch``, summed over target tokens, and the figure to
        report: the negative log-likelihood (exact for soft, marginal and markov), its bound
        (hard-enum, the variational modes) or the REINFORCE estimate of that bound (the sampling
        modes, whose objective adds the soft-attention baseline's own cross-entropy, trained
        jointly as in the paper). Both are scalars; divide by ``batch.num_tokens``."""
        c = self.config
        memory, state = self.encode(batch.src, batch.src_mask)
        hs, feeds, ctxs = self.decode(memory, batch.src_mask, state, batch.tgt_in)
        y, tmask = batch.tgt_out, batch.tgt_mask
        if c.mode == "soft":
            nll = self._soft_nll(self.drop(hs), self.drop(feeds), ctxs, y)
            loss = nll.masked_fill(~tmask, 0.0).sum()
            return loss, loss.detach()
        hs = self.drop(hs)
        if c.mode in _MARKOV:
            per_sentence = self._markov_loss(batch, hs, memory)
            loss = per_sentence.sum()
            return loss, loss.detach()
        post = self._posterior_scores(batch, memory) if c.mode in _VARIATIONAL else None
        out = self.attention(hs, memory, batch.src_mask, posterior_logits=post)
        if c.mode in _SAMPLE:
            z, vals = self.attention.sample(out)  # (1, B, T), (1, B, T, D)
            ll = self.output.log_lik(hs, vals.permute(1, 2, 0, 3), y, gathered=True)
            soft = -self._soft_nll(hs, self.drop(feeds), ctxs, y)  # the soft baseline, jointly
            est = self.attention.loss(out, None, samples=z, sampled_log_lik=ll.permute(2, 0, 1),
                                      baseline="soft", baseline_log_lik=soft.detach())
            loss = (est - soft).masked_fill(~tmask, 0.0).sum()
            return loss, est.detach().masked_fill(~tmask, 0.0).sum()
        else:
            per_tok = self.attention.loss(out, self._log_lik(hs, out, y),
                                          temperature=c.temperature)
        loss = per_tok.masked_fill(~tmask, 0.0).sum()
        return loss, loss.detach()

    def _soft_nll(self, hs: Tensor, feeds: Tensor, ctxs: Tensor, y: Tensor) -> Tensor:
        logits = self._soft_logits(hs, feeds, ctxs)
        return nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none")

    def _log_lik(self, hs: Tensor, out: Any, y: Tensor) -> Tensor:
        """:math:`\\log p(y_t \\mid x, z_t)` per position, or per K-max pick (the log-linear
        layer scores every position and picks: all its normalisers are one matrix product)."""
        if out.topk_values is not None:
            if isinstance(self.output, LogLinearOutputLayer):
                return out.gather_topk(self.output.log_lik(hs, out.values, y))
            return self.output.log_lik(hs, out.topk_values, y, gathered=True)
        return self.output.log_lik(hs, out.values, y)

    def _markov_loss(self, batch: Batch, hs: Tensor, memory: Tensor) -> Tensor:
        assert self.markov is not None
        init, trans = self.markov(hs, memory)
        ll = self.output.log_lik(hs, memory, batch.tgt_out)
        if self.config.mode == "markov":
            return -markov_alignment_log_marginal(init, trans, ll, batch.src_mask, batch.tgt_mask)
        assert self.q_chain is not None
        q_init, q_trans = self.q_chain(self._posterior_scores(batch, memory))
        return -markov_alignment_elbo(init, trans, ll, q_init, q_trans, batch.src_mask,
                                      batch.tgt_mask)

    # -- evaluation ----------------------------------------------------------------------------

    @torch.no_grad()
    def score(self, batch: Batch) -> dict[str, Tensor]:
        """Exact evaluation sums over the batch's target tokens.

        :return: ``nll``: :math:`-\\sum \\log p(y \\mid x)` with the alignment summed out
            exactly under the prior (the truncated prior with K-max), the number perplexity is
            made of; ``entropy``: the sum over tokens of the prior's entropy (for the Markov
            prior, the chain's entropy :math:`H(z_{1:T})`, i.e. its entropy rate per token);
            ``tokens``.
        """
        c = self.config
        memory, state = self.encode(batch.src, batch.src_mask)
        hs, feeds, ctxs = self.decode(memory, batch.src_mask, state, batch.tgt_in)
        y, tmask = batch.tgt_out, batch.tgt_mask
        tokens = tmask.sum()
        out = self.attention(hs, memory, batch.src_mask)
        if c.mode == "soft":
            nll = self._soft_nll(hs, feeds, ctxs, y).masked_fill(~tmask, 0.0).sum()
            return {"nll": nll, "entropy": _entropy(out.probs, tmask), "tokens": tokens}
        if c.mode in _MARKOV:
            assert self.markov is not None
            init, trans = self.markov(hs, memory)
            ll = self.output.log_lik(hs, memory, y)
            nll = -markov_alignment_log_marginal(init, trans, ll, batch.src_mask, tmask).sum()
            return {"nll": nll, "entropy": _chain_entropy(init, trans, batch.src_mask, tmask),
                    "tokens": tokens}
        ll = self._log_lik(hs, out, y)
        if out.topk_indices is not None:
            prior, mask = out.gather_topk(out.prior_logits), out.topk_mask
        else:
            prior, mask = out.prior_logits, out.mask
        per_tok = alignment_loss(prior, ll, mask, "marginal")
        nll = per_tok.masked_fill(~tmask, 0.0).sum()
        probs = torch.softmax(prior, -1) if out.topk_indices is not None else out.probs
        return {"nll": nll, "entropy": _entropy(probs, tmask), "tokens": tokens}

    @torch.no_grad()
    def alignments(self, batch: Batch) -> dict[str, Tensor]:
        """Per sentence ``(B, T, S)``: the prior :math:`p(z_t \\mid x, y_{<t})` (for the Markov
        prior, its marginals), and in the latent modes the exact posterior
        :math:`p(z_t \\mid x, y)` (the engine's marginals for the Markov prior)."""
        memory, state = self.encode(batch.src, batch.src_mask)
        hs, _, _ = self.decode(memory, batch.src_mask, state, batch.tgt_in)
        out = self.attention(hs, memory, batch.src_mask)
        if self.config.mode == "soft":
            return {"attention": out.probs}
        ll = self.output.log_lik(hs, out.values, batch.tgt_out)
        if self.config.mode in _MARKOV:
            assert self.markov is not None
            init, trans = self.markov(hs, memory)
            prior = markov_alignment_marginals(init, trans, torch.zeros_like(ll), batch.src_mask,
                                               batch.tgt_mask)
            post = markov_alignment_marginals(init, trans, ll, batch.src_mask, batch.tgt_mask)
            return {"prior": prior, "posterior": post}
        post = torch.softmax(out.prior_logits + ll.masked_fill(~out.mask, 0.0), -1)
        return {"prior": out.probs, "posterior": post}

    @torch.no_grad()
    def translate(self, src: Tensor, src_mask: Tensor, *, beam_size: int = 5, max_len: int = 100,
                  length_penalty: float = 0.0) -> Tensor:
        """Beam search under the prior: the next word's distribution sums the alignment out,
        :math:`p(y_t \\mid y_{<t}, x) = \\sum_s p(z_t = s \\mid \\cdot)\\, p(y_t \\mid z_t = s)`
        (exact; over the K-max positions with K-max; for the Markov prior, the alignment's
        distribution given the words so far is filtered forward through the chain).

        :return: ``(B, L)`` ids of the best hypothesis of each sentence (``</s>`` then padding).
        """
        b = src.shape[0]
        memory, (h0, c0) = self.encode(src, src_mask)
        rep = torch.arange(b, device=src.device).repeat_interleave(beam_size)
        state = self._initial_state(memory[rep], src_mask[rep], h0[:, rep], c0[:, rep])
        res = beam_search(self._step, state, batch_size=b, bos=BOS, eos=EOS, beam_size=beam_size,
                          max_len=max_len, length_penalty=length_penalty)
        return res.tokens[:, 0]

    def _initial_state(self, memory: Tensor, mask: Tensor, h0: Tensor, c0: Tensor
                       ) -> dict[str, Tensor]:
        n, s = mask.shape
        state = {"memory": memory, "mask": mask, "h": h0.transpose(0, 1), "c": c0.transpose(0, 1),
                 "feed": memory.new_zeros(n, self.config.hidden),
                 "t": torch.zeros(n, dtype=torch.long, device=memory.device)}
        if self.config.mode in _MARKOV:
            # filtered log p(z_{t-1} | x, y_{<t}) up to its word factor: the last step's predictive
            # alignment distribution, its projected decoder state and per-position normalisers
            state["pred"] = memory.new_zeros(n, s)
            if isinstance(self.output, AlignedOutputLayer):
                state["hproj"] = memory.new_zeros(n, self.output.proj_dim)
            state["lse"] = memory.new_zeros(n, s)
        return state

    def _step(self, last: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """One decoding step for every hypothesis (``beam_search``'s ``step``)."""
        memory, mask = state["memory"], state["mask"]
        x = torch.cat([self.tgt_embed(last), state["feed"]], -1).unsqueeze(1)
        out, (h, c) = self.decoder(x, (state["h"].transpose(0, 1).contiguous(),
                                       state["c"].transpose(0, 1).contiguous()))
        hq = out[:, 0]
        att = self.attention(hq, memory, mask)
        feed = self._feed(hq, att.context)
        new = dict(state, h=h.transpose(0, 1), c=c.transpose(0, 1), feed=feed, t=state["t"] + 1)
        mode = self.config.mode
        if mode == "soft":
            return torch.log_softmax(self._soft_logits(hq, feed, att.context), -1), new
        if mode in _MARKOV:
            return self._markov_step(last, hq, memory, mask, state, new)
        if att.topk_indices is not None:
            assert att.topk_values is not None and att.topk_mask is not None
            prior = att.gather_topk(att.prior_logits).masked_fill(~att.topk_mask, -math.inf)
            return self.output.log_probs(hq, att.topk_values,
                                         log_prior=torch.log_softmax(prior, -1)), new
        return self.output.log_probs(hq, att.values, log_prior=att.log_probs), new

    def _markov_step(self, last: Tensor, hq: Tensor, memory: Tensor, mask: Tensor,
                     state: dict[str, Tensor], new: dict[str, Tensor]
                     ) -> tuple[Tensor, dict[str, Tensor]]:
        assert self.markov is not None
        init, trans = self.markov(hq.unsqueeze(1), memory)  # (N, S), (N, 1, S, S)
        first = state["t"] == 0
        # log p(z_{t-1} | x, y_{<t}): the last predictive distribution times the chosen word's
        # probability under each alignment, normalised
        output = self.output
        if isinstance(output, LogLinearOutputLayer):
            # log p(last | z = s) = a[last] + c_s[last] - log Z_s; a[last] is the same for
            # every s and cancels in the normalisation below
            c_last = output.memory_out.weight[last]  # (N, D)
            word_lp = (memory @ c_last.unsqueeze(-1)).squeeze(-1) - state["lse"]  # (N, S)
        else:
            w = output.out.weight[last]  # (N, P)
            bias = output.out.bias[last].unsqueeze(-1)
            feats = torch.tanh(state["hproj"].unsqueeze(1) + output.memory_proj(memory))
            word_lp = (feats @ w.unsqueeze(-1)).squeeze(-1) + bias - state["lse"]  # (N, S)
        filt = torch.log_softmax((state["pred"] + word_lp).masked_fill(~mask, -math.inf), -1)
        trans_lp = torch.log_softmax(trans[:, 0].masked_fill(~mask[:, None, :], -math.inf), -1)
        pred = torch.logsumexp(filt.unsqueeze(-1) + trans_lp, 1)
        init_lp = torch.log_softmax(init.masked_fill(~mask, -math.inf), -1)
        pred = torch.where(first.unsqueeze(-1), init_lp, pred)
        if isinstance(output, LogLinearOutputLayer):
            word, lse = output.log_probs_and_normalizer(hq, memory, log_prior=pred)
            new.update(pred=pred.masked_fill(~mask, -math.inf), lse=lse)
            return word, new
        hproj = output.hidden_proj(hq)
        logits = output.out(torch.tanh(hproj.unsqueeze(1) + output.memory_proj(memory)))
        lse = torch.logsumexp(logits, -1)  # (N, S)
        word = torch.logsumexp(pred.unsqueeze(-1) + logits - lse.unsqueeze(-1), 1)
        new.update(pred=pred.masked_fill(~mask, -math.inf), hproj=hproj, lse=lse)
        return word, new


def greedy_decode(model: Seq2Seq, src: Tensor, src_mask: Tensor, max_len: int = 100) -> Tensor:
    """The most probable next word at every step (the reference beam search of width 1 must
    reproduce): ``(B, L)`` ids, ``</s>`` then ``</s>`` padding after a sentence ends."""
    with torch.no_grad():
        memory, (h0, c0) = model.encode(src, src_mask)
        state = model._initial_state(memory, src_mask, h0, c0)
        last = torch.full((src.shape[0],), BOS, dtype=torch.long, device=src.device)
        done = torch.zeros_like(last, dtype=torch.bool)
        words = []
        for _ in range(max_len):
            lp, state = model._step(last, state)
            word = torch.where(done, torch.full_like(last, EOS), lp.argmax(-1))
            words.append(word)
            done = done | (word == EOS)
            last = word
            if bool(done.all()):
                break
        return torch.stack(words, 1)


def _entropy(probs: Tensor, tmask: Tensor) -> Tensor:
    """Sum over real target steps of :math:`-\\sum_s p \\log p`."""
    ent = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
    return ent.masked_fill(~tmask, 0.0).sum()


def _chain_entropy(init: Tensor, trans: Tensor, src_mask: Tensor, tmask: Tensor) -> Tensor:
    """Sum over sentences of the prior chain's entropy
    :math:`H(z_1) + \\sum_{t>1} \\mathbb{E}_{z_{t-1}} H(z_t \\mid z_{t-1})`, with the prior's own
    marginals (the engine, no emissions)."""
    trans_lp = markov_transition_log_probs(init, trans, src_mask)  # (B, T, S, S), row 0 = init
    zeros = torch.zeros(trans.shape[:3], dtype=trans.dtype, device=trans.device)
    marg = markov_alignment_marginals(init, trans, zeros, src_mask, tmask)  # (B, T, S)
    row_ent = -(trans_lp.exp() * trans_lp.clamp_min(-1e30)).nan_to_num(0.0).sum(-1)  # (B,T,S)
    prev = torch.cat([torch.zeros_like(marg[:, :1]), marg[:, :-1]], 1)
    prev[:, 0, 0] = 1.0  # the first step's rows all hold the initial distribution
    ent = (prev * row_ent).sum(-1)
    return ent.masked_fill(~tmask, 0.0).sum()
