"""Latent sentiment: word-level sentiment classes learned from sentence labels alone, on the
Stanford Sentiment Treebank.

``python -m examples.sentiment --help``

**Data** (:mod:`examples.data.sst`): the SST's standard splits (train 8,544, dev 1,101, test
2,210 sentences). Training uses the sentences' words and their *sentence* labels (0 very
negative .. 4 very positive) only; the gold labels of the words and phrases inside each tree are
never used in training, and serve only to check the latent word classes afterwards. Words are
lower-cased; the vocabulary is the training words seen at least ``--min-count`` times, plus
``<unk>``.

**Model.** Each sentence :math:`n` has a latent class :math:`c_n \\in \\{0..5m-1\\}`, ``m =
--classes-per-label`` classes per sentence label, and its label is the label of its class,
:math:`y_n = \\ell(c_n) = \\lfloor c_n / m \\rfloor` (an observed ``Categorical`` site whose
table is 1 at :math:`\\ell(c)` and 0 elsewhere). Each word :math:`i` has a latent sentiment class
:math:`z_{n,i}` in {negative, neutral, positive}, drawn given :math:`c_n`, and the word is drawn
from its class's distribution over the vocabulary:

.. math::

    c_n \\sim \\mathrm{Cat}(\\pi), \\quad y_n = \\ell(c_n), \\quad
    z_{n,i} \\mid c_n \\sim \\mathrm{Cat}(\\theta_{c_n}), \\quad
    w_{n,i} \\mid z_{n,i} \\sim \\mathrm{Cat}(\\phi_{z_{n,i}}).

Sentences form the plate ``sentences`` (subsampled for SVI), words the plate ``words`` inside it;
padding past a sentence's end is masked (``poutine.mask``). Both :math:`c` and :math:`z` are
enumerated, and :class:`plated.pyro.TVE_ELBO` sums them out exactly.

*What makes the word classes mean sentiment* (the structure, not any word-level label):

- a sentence of a negative label (0, 1) may use only the negative and neutral word classes, one
  of a positive label (3, 4) only the positive and neutral ones, a neutral sentence (2) all three
  (the other entries of :math:`\\theta_c` are fixed at zero). With one polar class per polarity,
  shared by two labels, no label can keep a word distribution of its own, which would let the
  classes collapse into "the sentence's label" (naive Bayes);
- the polar classes' word distributions are the neutral one's plus deviations,
  :math:`\\log \\phi_{\\pm} = \\log \\phi_{\\mathrm{neu}} + \\eta_{\\pm}` renormalised, with a
  Laplace prior on :math:`\\eta` (sparse additive deviations, as in SAGE, Eisenstein et al.
  2011): the polar classes differ from the neutral one only in words for which the sentence
  labels give evidence;
- optionally, ``--max-polar`` below 1 caps the share of a sentence class's words that the polar
  classes may take (the rest of :math:`\\theta_c` goes to the neutral class), saying that most
  words carry no sentiment. The mixture weights are otherwise only weakly identified: without
  the cap (the default, which has the better dev accuracy) the words of a polar sentence lean
  to its polarity, so the argmax class of most words is polar even where their gold label is
  neutral; with it, most words come out neutral. Which of two polar classes a word leans to
  is much the same either way (the ``binary`` agreement below).

**Estimation** is MAP: :math:`\\pi, \\theta, \\phi_{\\mathrm{neu}}, \\eta` are ``pyro.param``
values (the guide is empty) with priors added as a ``pyro.factor`` term: symmetric Dirichlet
with concentration ``1 + --class-prior`` on :math:`\\pi` and on the allowed entries of each
:math:`\\theta_c`, ``1 + --word-prior`` on :math:`\\phi_{\\mathrm{neu}}` (add-``word_prior``
smoothing), and Laplace with rate ``--deviation-penalty`` on :math:`\\eta`. SVI with Adam minimises
``TVE_ELBO``'s loss, exactly :math:`-\\log p(y, w) - \\log p(\\text{parameters})` up to a constant
(the likelihood scaled from the minibatch to the corpus). The parameters of the best dev
accuracy (5-class) among the evaluations every ``--eval-every`` steps are kept (model selection
on dev; ``--patience`` stops early).

**Prediction** is exact: the engine's posterior marginals (:func:`plated.pyro.posterior`) of the
model without the label site give :math:`p(c_n \\mid w_n)`, hence
:math:`p(y_n = l \\mid w_n) = \\sum_{c : \\ell(c) = l} p(c_n = c \\mid w_n)`; the 5-class
prediction is its argmax, the binary one compares :math:`p(y \\in \\{3, 4\\})` with
:math:`p(y \\in \\{0, 1\\})` on the non-neutral sentences. The same pass gives every word's class
posterior :math:`p(z_{n,i} \\mid w_n)`, from the sentence's words alone.

**Reported** (``results.json``): sentence accuracy, 5-class and binary, on dev and test; the
baselines (chance, the training set's most frequent label, and multinomial naive Bayes on the
same vocabulary); and the agreement of the latent word classes with the gold labels of the words
(leaves) and phrases (inner nodes of two or more words, roots excluded) of dev and test. A node's
class posterior is the mean of its words' :math:`p(z \\mid \\cdot)`, read two ways:
*in context* (the words' posteriors given the whole sentence) and *isolated* (the node's words
given as a sentence of their own, which is how SST's annotators saw each phrase). Agreement is
given as 3-way polarity (0-1 negative, 2 neutral, 3-4 positive; accuracy and balanced accuracy,
i.e. mean recall over the gold classes, since most words are neutral), as binary polarity on the
non-neutral nodes (:math:`p(\\text{positive}) \\ge p(\\text{negative})`, as for sentences), and,
with the classes read as labels 1, 2, 3, against the 5 labels; each beside the baselines of the
most frequent gold class and of chance. ``phrase_label`` is the sentence classifier's label
:math:`p(y \\mid \\text{phrase})` for each isolated phrase, on the same scales.

**Files** (in ``--out-dir``): ``checkpoint.pt`` (atomic, every ``--checkpoint-every`` steps and at
the end; ``--resume`` continues from it, refusing other options than the run's), ``results.json``,
``confusion.png`` (test confusion matrices of the sentences and of the words' classes),
``word_classes.png`` (the word-class posteriors of a few test sentences beside their gold word
polarities) and ``training.png`` (loss and dev accuracy). Without ``--resume``, a run refuses to
start in a folder that holds any of these files.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import SVI
from pyro.ops.indexing import Vindex
from pyro.optim import PyroOptim
from pyro.poutine.runtime import InferDict

from plated.pyro import TVE_ELBO, posterior

from .common import (
    ExampleError,
    apply_smoke,
    check_resume_options,
    example_parser,
    load_checkpoint,
    load_pyro_checkpoint,
    nonnegative_float,
    nonnegative_int,
    out_dir_guard,
    positive_float,
    positive_int,
    print_written,
    progress,
    resolve_device,
    resume_or_refuse,
    run_cli,
    run_options,
    save_figure,
    save_pyro_checkpoint,
    set_seed,
    write_json,
)
from .data.sst import NUM_LABELS, Treebank, Vocab, binary_labels, build_vocab, load_sst, pad_ids

__all__ = [
    "Config",
    "Sentiment",
    "allowed_word_classes",
    "main",
    "class_agreement",
    "isolated_posteriors",
    "label_agreement",
    "naive_bayes",
    "negative_log_likelihood",
    "sentence_accuracy",
    "span_means",
]

ENUM: InferDict = {"enumerate": "parallel"}
#: The word classes: negative, neutral, positive.
WORD_CLASSES = 3
WORD_CLASS_NAMES = ("negative", "neutral", "positive")
#: The polarity of each sentiment label 0-4 (0 negative, 1 neutral, 2 positive): the word class
#: named like it.
POLARITY = (0, 0, 1, 2, 2)


def allowed_word_classes(label: torch.Tensor) -> torch.Tensor:
    """Which word classes a sentence of each label may use: negative sentences (labels 0, 1) the
    negative and neutral classes, positive ones (3, 4) the neutral and positive classes, neutral
    ones (2) all three.

    :param label: ``(...)`` long labels 0-4.
    :return: ``(..., 3)`` bool.
    """
    polarity = torch.tensor(POLARITY, device=label.device)[label].unsqueeze(-1)
    k = torch.arange(WORD_CLASSES, device=label.device)
    return (k == polarity) | (k == 1) | (polarity == 1)


@dataclass(frozen=True)
class Config:
    """The model's sizes and priors (see the module docstring)."""

    vocab_size: int
    classes_per_label: int = 2
    word_prior: float = 0.1
    class_prior: float = 1.0
    deviation_penalty: float = 1.0
    max_polar: float = 1.0

    def __post_init__(self) -> None:
        if self.vocab_size < 1 or self.classes_per_label < 1:
            raise ValueError(f"vocab_size ({self.vocab_size}) and classes_per_label "
                             f"({self.classes_per_label}) must be positive")
        if not 0 < self.max_polar <= 1:
            raise ValueError(f"max_polar ({self.max_polar}) must be in (0, 1]")
        if min(self.word_prior, self.class_prior, self.deviation_penalty) < 0:
            raise ValueError(f"word_prior ({self.word_prior}), class_prior ({self.class_prior}) "
                             f"and deviation_penalty ({self.deviation_penalty}) must be "
                             "non-negative")

    @property
    def sentence_classes(self) -> int:
        return NUM_LABELS * self.classes_per_label


class Sentiment:
    """The latent-sentiment model, its (empty) guide and exact prediction.

    :param config: sizes and priors.
    :param init_word_logits: ``(vocab,)`` initial log-frequencies of the words (e.g. the training
        unigram), where the background logits start (default: zeros).
    :param device: where the parameters live.
    :param dtype: their floating-point type.
    """

    def __init__(self, config: Config, init_word_logits: torch.Tensor | None = None,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        self.config = config
        self.device = device or torch.device("cpu")
        self.dtype = dtype or torch.get_default_dtype()
        c = config.sentence_classes
        #: ``(C,)`` the label of each sentence class
        self.class_label = torch.arange(c, device=self.device) // config.classes_per_label
        #: ``(C, 5)`` log p(y | c): 0 at the class's label, -inf elsewhere
        self.label_logits = torch.full((c, NUM_LABELS), -math.inf, dtype=self.dtype,
                                       device=self.device)
        self.label_logits[torch.arange(c, device=self.device), self.class_label] = 0.0
        #: ``(C, 3)`` the word classes each sentence class may use
        self.allowed = allowed_word_classes(self.class_label)
        if init_word_logits is not None and init_word_logits.shape != (config.vocab_size,):
            raise ValueError(f"init_word_logits has shape {tuple(init_word_logits.shape)}, "
                             f"expected ({config.vocab_size},)")
        self._init_word = init_word_logits

    # ------------------------------------------------------------------------------------------
    # parameters

    def _init(self, *shape: int, scale: float) -> torch.Tensor:
        return scale * torch.randn(shape, dtype=self.dtype, device=self.device)

    def tables(self) -> dict[str, torch.Tensor]:
        """The model's normalised log-probability tables (registering the ``pyro.param`` sites on
        first use).

        :return: ``"class"`` ``(C,)`` :math:`\\log \\pi`; ``"word_class"`` ``(C, 3)``
            :math:`\\log \\theta` (``-inf`` where not allowed); ``"word"`` ``(3, vocab)``
            :math:`\\log \\phi`; ``"deviation"`` ``(2, vocab)`` :math:`\\eta`.
        """
        cfg = self.config
        c, v = cfg.sentence_classes, cfg.vocab_size

        def init_background() -> torch.Tensor:
            if self._init_word is None:
                return torch.zeros(v, dtype=self.dtype, device=self.device)
            return self._init_word.to(self.device, self.dtype).clone()

        class_logits = pyro.param("class_logits", lambda: self._init(c, scale=0.1))
        word_class_logits = pyro.param("word_class_logits",
                                       lambda: self._init(c, WORD_CLASSES, scale=0.1))
        background = pyro.param("background_logits", init_background)
        deviation = pyro.param("deviation", lambda: torch.zeros(
            2, v, dtype=self.dtype, device=self.device))
        word = torch.stack([background + deviation[0], background, background + deviation[1]])
        theta = word_class_logits.masked_fill(~self.allowed, -math.inf).softmax(-1)
        if cfg.max_polar < 1:
            neutral = torch.zeros(WORD_CLASSES, dtype=theta.dtype, device=theta.device)
            neutral[1] = 1.0
            theta = (1 - cfg.max_polar) * neutral + cfg.max_polar * theta
        return {
            "class": class_logits.log_softmax(-1),
            # log only where allowed: log(0) would give NaN gradients through masked_fill
            "word_class": theta.masked_fill(~self.allowed, 1.0).log().masked_fill(
                ~self.allowed, -math.inf),
            "word": word.log_softmax(-1),
            "deviation": deviation,
        }

    def log_prior(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """The log density of the priors at ``t`` (up to a constant), a scalar: Dirichlet on
        :math:`\\pi`, the allowed entries of each :math:`\\theta_c` and the neutral class's
        :math:`\\phi_1`; Laplace on the deviations :math:`\\eta`."""
        cfg = self.config
        theta = t["word_class"].masked_fill(~self.allowed, 0.0)
        return (cfg.class_prior * (t["class"].sum() + theta.sum())
                + cfg.word_prior * t["word"][1].sum()
                - cfg.deviation_penalty * t["deviation"].abs().sum())

    # ------------------------------------------------------------------------------------------
    # the model

    def model(self, words: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None = None,
              batch_size: int | None = None, include_prior: bool = True) -> None:
        """The model of ``words`` ``(N, L)`` (vocabulary ids) with ``mask`` ``(N, L)`` (true on
        real words) and sentence ``labels`` ``(N,)``.

        :param labels: ``None`` leaves the label site out (for predicting it).
        :param batch_size: subsample this many sentences (``pyro.plate``'s ``subsample_size``,
            which scales their log-likelihood by ``N / batch_size``); ``None``: all of them.
        :param include_prior: with ``False`` the priors are left out, so ``TVE_ELBO``'s loss is
            exactly :math:`-\\log p(y, w)`.
        """
        if words.shape != mask.shape or words.dim() != 2:
            raise ValueError(f"words {tuple(words.shape)} and mask {tuple(mask.shape)} must both "
                             "be (sentences, max_words)")
        if labels is not None and labels.shape != words.shape[:1]:
            raise ValueError(f"labels has shape {tuple(labels.shape)}, expected "
                             f"({words.shape[0]},)")
        t = self.tables()
        if include_prior:
            pyro.factor("prior", self.log_prior(t))
        n, width = words.shape
        with pyro.plate("sentences", n, subsample_size=batch_size, dim=-2) as idx:
            w, m = words[idx], mask[idx]
            c = pyro.sample("c", dist.Categorical(logits=t["class"]), infer=ENUM)
            if labels is not None:
                pyro.sample("y", dist.Categorical(logits=self.label_logits[c]),
                            obs=labels[idx].unsqueeze(-1))
            emit = t["word"].T[w]  # (batch, L, 3): log p(w_{n,i} | z = k)
            with pyro.plate("words", width, dim=-1), poutine.mask(mask=cast(torch.BoolTensor, m)):
                z = pyro.sample("z", dist.Categorical(logits=t["word_class"][c]), infer=ENUM)
                pyro.factor("w", Vindex(emit)[..., z])

    def guide(self, *args: Any, **kwargs: Any) -> None:
        """The empty guide: every latent variable is enumerated in the model."""

    # ------------------------------------------------------------------------------------------
    # prediction

    def predict(self, words: torch.Tensor, mask: torch.Tensor, batch_size: int = 1024
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact posteriors given the words alone, by the engine, ``batch_size`` sentences at a
        time.

        :return: ``p(y | w)`` ``(N, 5)`` and each word's ``p(z | w)`` ``(N, L, 3)`` (zero on
            padding).
        """
        n, width = words.shape
        label_probs = torch.zeros(n, NUM_LABELS, dtype=self.dtype, device=self.device)
        word_probs = torch.zeros(n, width, WORD_CLASSES, dtype=self.dtype, device=self.device)
        onehot = torch.nn.functional.one_hot(self.class_label, NUM_LABELS).to(self.dtype)
        lengths = mask.sum(-1).tolist()
        for lo in range(0, n, batch_size):
            hi = min(n, lo + batch_size)
            lmax = max(lengths[lo:hi])
            w, m = words[lo:hi, :lmax], mask[lo:hi, :lmax]
            post = posterior(self.model, w, m, None, include_prior=False, max_plate_nesting=2)
            with torch.no_grad():
                marg = post.marginals()
            pc = marg["c"].detach().reshape(hi - lo, -1)  # (batch, C)
            label_probs[lo:hi] = pc @ onehot
            word_probs[lo:hi, :lmax] = marg["z"].detach().reshape(hi - lo, lmax, -1) * m[..., None]
        return label_probs, word_probs


# ----------------------------------------------------------------------------------------------
# evaluation


def negative_log_likelihood(model: Sentiment, words: torch.Tensor, mask: torch.Tensor,
                            labels: torch.Tensor, batch_size: int = 1024) -> float:
    """Exact :math:`-\\log p(y, w)` (nats, summed over sentences) under the current parameters:
    ``TVE_ELBO``'s loss of the model without priors, ``batch_size`` sentences at a time."""
    elbo = TVE_ELBO(max_plate_nesting=2)
    total = 0.0
    with torch.no_grad():
        for lo in range(0, words.shape[0], batch_size):
            sl = slice(lo, lo + batch_size)
            total += elbo.loss(model.model, model.guide, words[sl], mask[sl], labels[sl],
                               include_prior=False)
    return total


def sentence_accuracy(label_probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """5-class accuracy (argmax) and binary accuracy (``p(3, 4) >= p(0, 1)`` on the sentences
    whose label is not neutral).

    :param label_probs: ``(N, 5)``. :param labels: ``(N,)`` gold labels 0-4.
    """
    keep, binary = binary_labels(labels)
    pos = label_probs[:, 3:].sum(-1) >= label_probs[:, :2].sum(-1)
    return {"five": float((label_probs.argmax(-1) == labels).double().mean()),
            "binary": float((pos.long() == binary)[keep].double().mean()),
            "sentences": len(labels), "binary_sentences": int(keep.sum())}


def _agreement(pred: torch.Tensor, gold: torch.Tensor, classes: int) -> dict[str, Any]:
    """Accuracy and balanced accuracy of ``pred`` against ``gold`` (both ``(M,)`` in
    ``0..classes-1``), with the most-frequent-gold-class and chance baselines."""
    counts = torch.bincount(gold, minlength=classes)
    present = counts > 0
    recall = torch.bincount(gold[pred == gold], minlength=classes).double() / counts.clamp(min=1)
    return {"accuracy": float((pred == gold).double().mean()),
            "balanced_accuracy": float(recall[present].mean()),
            "majority_baseline": float(counts.max() / counts.sum()),
            "majority_label": int(counts.argmax()),
            "chance_balanced": 1.0 / int(present.sum()),
            "count": int(counts.sum()),
            "gold_distribution": counts.tolist(),
            "predicted_distribution": torch.bincount(pred, minlength=classes).tolist()}


def span_means(word_probs: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
    """The mean of the words' class posteriors over each node's span.

    :param word_probs: ``(N, L, K)`` per-word posteriors (zero on padding).
    :param nodes: ``(M, 4)`` rows ``(sentence, start, end, label)`` (see
        :meth:`examples.data.sst.Treebank.nodes`).
    :return: ``(M, K)``.
    """
    cum = torch.nn.functional.pad(word_probs.cumsum(1), (0, 0, 1, 0))  # (N, L + 1, K)
    s, start, end, _ = nodes.to(word_probs.device).unbind(-1)
    return (cum[s, end] - cum[s, start]) / (end - start).unsqueeze(-1).to(cum.dtype)


def class_agreement(class_probs: torch.Tensor, gold: torch.Tensor) -> dict[str, Any]:
    """Agreement of latent word classes with gold labels.

    :param class_probs: ``(M, 3)`` a posterior over the word classes (negative, neutral,
        positive) for each of ``M`` gold-labelled words or phrases.
    :param gold: ``(M,)`` their gold labels 0-4.
    :return: ``"polarity"``: the argmax class against the gold label's polarity (0-1 negative,
        2 neutral, 3-4 positive); ``"binary"``: on the nodes whose gold label is not neutral,
        whether the positive class's probability is at least the negative one's (as the binary
        sentence task); ``"five"``: the argmax class read as label 1, 2 or 3 against the 5-class
        gold label (labels 0 and 4 are never predicted); each as :func:`_agreement` gives it.
    """
    if gold.numel() == 0:
        raise ValueError("no gold labels to compare with")
    gold = gold.to(class_probs.device)
    pred = class_probs.argmax(-1)
    polarity = torch.tensor(POLARITY, device=pred.device)[gold]
    keep = polarity != 1
    positive = class_probs[:, 2] >= class_probs[:, 0]
    return {"polarity": _agreement(pred, polarity, WORD_CLASSES),
            "binary": _agreement(positive[keep].long(), (polarity[keep] == 2).long(), 2),
            "five": _agreement(pred + 1, gold, NUM_LABELS)}


def label_agreement(label_probs: torch.Tensor, gold: torch.Tensor) -> dict[str, Any]:
    """Agreement of a predicted label distribution ``(M, 5)`` with gold labels ``(M,)``:
    ``"five"`` (argmax), ``"polarity"`` (argmax of the negative, neutral and positive totals)
    and ``"binary"`` (non-neutral gold only), each as :func:`_agreement` gives it."""
    gold = gold.to(label_probs.device)
    polar = torch.stack([label_probs[:, :2].sum(-1), label_probs[:, 2],
                         label_probs[:, 3:].sum(-1)], -1)
    out = class_agreement(polar, gold)
    out["five"] = _agreement(label_probs.argmax(-1), gold, NUM_LABELS)
    return out


def naive_bayes(words: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A multinomial naive Bayes classifier (add-``alpha`` smoothing), fitted by counting.

    :param words, mask: ``(N, L)`` training sentences; :param labels: ``(N,)``.
    :return: ``log p(y)`` ``(5,)`` and ``log p(w | y)`` ``(5, vocab)``.
    """
    y = labels.unsqueeze(-1).expand_as(words)[mask]
    counts = torch.bincount(y * vocab_size + words[mask], minlength=NUM_LABELS * vocab_size)
    counts = counts.reshape(NUM_LABELS, vocab_size).double() + alpha
    prior = torch.bincount(labels, minlength=NUM_LABELS).double()
    return prior.log() - prior.sum().log(), counts.log() - counts.sum(-1, keepdim=True).log()


def naive_bayes_probs(log_prior: torch.Tensor, log_word: torch.Tensor, words: torch.Tensor,
                      mask: torch.Tensor) -> torch.Tensor:
    """``p(y | w)`` ``(N, 5)`` under :func:`naive_bayes`'s tables."""
    scores = (log_word.T[words] * mask[..., None]).sum(1) + log_prior  # (N, 5)
    return scores.softmax(-1)


# ----------------------------------------------------------------------------------------------
# data


@dataclass
class Split:
    """A split as tensors: ``words`` and ``mask`` ``(N, L)``, ``labels`` ``(N,)``, and the
    treebank it came from."""

    words: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    bank: Treebank
    count: int

    @staticmethod
    def make(bank: Treebank, vocab: Vocab, count: int | None, device: torch.device) -> Split:
        n = len(bank) if count is None else min(count, len(bank))
        sentences = bank.sentences[:n]
        words, mask = pad_ids(sentences, vocab)
        return Split(words.to(device), mask.to(device), bank.labels[:n].to(device), bank, n)


def isolated_posteriors(model: Sentiment, split: Split, nodes: torch.Tensor, vocab: Vocab,
                        batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's posteriors for each node's words taken as a sentence of their own, as SST's
    annotators saw each phrase (out of context). Distinct spans are computed once, sorted by
    length so that batches carry little padding.

    :param nodes: ``(M, 4)`` rows ``(sentence, start, end, label)`` of ``split``.
    :return: ``p(y | span)`` ``(M, 5)`` and the mean over the span's words of ``p(z | span)``
        ``(M, 3)``.
    """
    spans: dict[tuple[str, ...], int] = {}
    index = [spans.setdefault(split.bank.trees[s].tokens[a:b], len(spans))
             for s, a, b, _ in nodes.tolist()]
    distinct = list(spans)
    order = sorted(range(len(distinct)), key=lambda i: len(distinct[i]))
    words, mask = pad_ids([distinct[i] for i in order], vocab)
    words, mask = words.to(model.device), mask.to(model.device)
    label_probs, word_probs = model.predict(words, mask, batch_size)
    class_probs = word_probs.sum(1) / mask.sum(-1, keepdim=True).to(word_probs.dtype)
    rank = torch.empty(len(order), dtype=torch.long)
    rank[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    idx = rank[torch.tensor(index, dtype=torch.long)].to(model.device)
    return label_probs[idx], class_probs[idx]


def _unigram_logits(split: Split, vocab_size: int, dtype: torch.dtype) -> torch.Tensor:
    counts = torch.bincount(split.words[split.mask].cpu(), minlength=vocab_size).to(dtype) + 0.5
    return counts.log() - counts.sum().log()


# ----------------------------------------------------------------------------------------------
# training


def _evaluate(model: Sentiment, split: Split, batch_size: int) -> dict[str, Any]:
    probs, _ = model.predict(split.words, split.mask, batch_size)
    return sentence_accuracy(probs, split.labels)


def _snapshot() -> dict[str, Any]:
    """A copy of Pyro's parameter store state (``get_state`` alone shares the tensors, which the
    optimizer then changes in place)."""
    state = pyro.get_param_store().get_state()
    return {"params": {k: v.detach().clone().requires_grad_(v.requires_grad)
                       for k, v in state["params"].items()},
            "constraints": dict(state["constraints"])}


#: The options that may differ between a run and its resumption (besides where and how fast it
#: runs): how long it trains, how often it checkpoints, and the prediction batch size.
MAY_CHANGE = ("steps", "checkpoint_every", "eval_batch_size")
#: The figures a run writes in ``--out-dir`` (beside ``checkpoint.pt`` and ``results.json``).
FIGURES = ("confusion.png", "word_classes.png", "training.png")


def _saved_run(path: Path) -> dict[str, Any] | None:
    """The checkpoint at ``path`` as saved (its ``"extra"`` values hold the run's options, step
    and model sizes, its ``"params"`` the parameter store), read without touching Pyro's
    parameter store; ``None`` if the file is not such a checkpoint (then
    :func:`~examples.common.load_pyro_checkpoint` says so, naming it).

    :raises ExampleError: if the file cannot be read (damaged, truncated, not a torch file).
    """
    state = load_checkpoint(path, map_location="cpu")
    if not isinstance(state, dict) or not isinstance(state.get("extra"), dict):
        return None
    return state


def _check_config(saved: dict[str, Any] | None, config: Config, path: Path) -> None:
    """Refuse to resume a checkpoint whose model has other sizes than ``config``, before its
    parameters are restored: the sizes it recorded, and the shapes of its parameters (which a
    checkpoint from before the sizes were recorded has too). Other sizes under the same options
    come from other data in ``--data-dir`` (another vocabulary).

    :raises ExampleError: naming the checkpoint, what differs and the options that set it.
    """
    if saved is None:
        return
    wrote = saved["extra"].get("config")
    now = asdict(config)
    changed = []
    if isinstance(wrote, dict):
        changed = [f"{k} {wrote.get(k)!r} -> {now.get(k)!r}"
                   for k in sorted(set(wrote) | set(now)) if wrote.get(k) != now.get(k)]
    store = saved.get("params")
    params = store.get("params") if isinstance(store, dict) else None
    if not changed and isinstance(params, dict):
        c, v = config.sentence_classes, config.vocab_size
        expected = {"class_logits": (c,), "word_class_logits": (c, WORD_CLASSES),
                    "background_logits": (v,), "deviation": (2, v)}
        changed = [f"{name} {tuple(params[name].shape)} -> {shape}"
                   for name, shape in expected.items()
                   if isinstance(params.get(name), torch.Tensor)
                   and tuple(params[name].shape) != shape]
    if changed:
        raise ExampleError(
            f"the checkpoint {str(path)!r} holds a model of other sizes ({'; '.join(changed)});"
            " resume with that run's --classes-per-label, --min-count, --num-sentences and "
            "--data-dir, or choose another --out-dir for a new run")


def _train(model: Sentiment, train: Split, dev: Split, args: Any, path: Path, resume: bool,
           options: dict[str, Any]) -> dict[str, Any]:
    """SVI with ``TVE_ELBO`` for ``args.steps`` steps, resuming from the checkpoint at ``path``
    when ``resume``; evaluates on dev every ``args.eval_every`` steps and keeps the best
    parameters. Each checkpoint also records the run's ``options`` and the model's sizes, which
    a resumption checks (:func:`_saved_run`, :func:`_check_config`) before it restores anything.

    :return: the training state: losses (per training sentence), dev history, best parameters.
    """
    optim = cast(PyroOptim, pyro.optim.Adam({"lr": args.lr}))  # type: ignore[attr-defined]
    svi = SVI(model.model, model.guide, optim, TVE_ELBO(max_plate_nesting=2))
    state: dict[str, Any] = {"step": 0, "losses": [], "dev": [], "best": None,
                             "best_step": 0, "best_dev_five": -1.0, "since_best": 0,
                             "stopped_early": False, "train_seconds": 0.0}
    if resume:
        saved = load_pyro_checkpoint(path, optim, map_location=model.device)
        missing = sorted(state.keys() - saved.keys())
        if missing:
            raise ExampleError(f"the checkpoint {str(path)!r} lacks {', '.join(missing)}: it was "
                               "not written by examples.sentiment; delete it or choose another "
                               "--out-dir")
        state = {k: saved[k] for k in state}
        print(f"resumed from {path}: step {state['step']} of {args.steps}", flush=True)
    written = {"run_options": options, "config": asdict(model.config)}
    n = train.count
    batch = min(args.batch_size, n)
    bar = progress(range(state["step"], args.steps), total=args.steps, initial=state["step"],
                   desc="sentiment", disable=args.no_progress)
    for step in bar:
        if state["stopped_early"]:
            break
        t0 = time.perf_counter()
        loss = svi.step(train.words[:n], train.mask[:n], train.labels[:n], batch_size=batch)
        state["train_seconds"] += time.perf_counter() - t0
        state["losses"].append(loss / n)
        state["step"] = step + 1
        bar.set_postfix(loss=f"{loss / n:.2f}")
        last = state["step"] == args.steps
        if state["step"] % args.eval_every == 0 or last:
            acc = _evaluate(model, dev, args.eval_batch_size)
            state["dev"].append({"step": state["step"], **acc})
            if acc["five"] > state["best_dev_five"]:
                state["best_dev_five"] = acc["five"]
                state["best_step"] = state["step"]
                state["best"] = _snapshot()
                state["since_best"] = 0
            else:
                state["since_best"] += 1
                if args.patience and state["since_best"] >= args.patience:
                    state["stopped_early"] = True
            bar.set_postfix(loss=f"{loss / n:.2f}", dev=f"{acc['five']:.3f}")
        if (state["step"] % args.checkpoint_every == 0 or last or state["stopped_early"]):
            save_pyro_checkpoint(path, optim, **state, **written)
    bar.close()
    return state


# ----------------------------------------------------------------------------------------------
# figures


def _figures(test: Split, probs: torch.Tensor, word_probs: torch.Tensor, out_dir: Path,
             num_examples: int = 4) -> list[str]:
    """``confusion.png`` (test sentences: gold vs predicted label; test words: gold label vs
    latent class) and ``word_classes.png`` (``p(z | w)`` of a few short test sentences)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["0 --", "1 -", "2 0", "3 +", "4 ++"]
    classes = list(WORD_CLASS_NAMES)
    paths = []
    leaves = test.bank.nodes(max_len=1)
    leaves = leaves[leaves[:, 0] < test.count]
    word_pred = word_probs[leaves[:, 0], leaves[:, 1]].argmax(-1).cpu()
    mats = [(test.labels.cpu(), probs.argmax(-1).cpu(), labels,
             "test sentences: predicted label"),
            (leaves[:, 3], word_pred, classes, "test words: latent class, argmax p(z | words)")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, (gold, pred, cols, title) in zip(axes, mats, strict=True):
        mat = torch.zeros(NUM_LABELS, len(cols))
        mat.index_put_((gold, pred), torch.ones(len(gold)), accumulate=True)
        norm = mat / mat.sum(1, keepdim=True).clamp(min=1)
        ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto")
        for i in range(NUM_LABELS):
            for j in range(len(cols)):
                ax.text(j, i, f"{int(mat[i, j])}", ha="center", va="center", fontsize=8,
                        color="white" if norm[i, j] > 0.6 else "black")
        ax.set_xticks(range(len(cols)), cols)
        ax.set_yticks(range(NUM_LABELS), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("gold label")
        ax.set_title(title, fontsize=10)
    fig.suptitle("test set; colour: fraction of the row, numbers: counts")
    paths.append(str(save_figure(fig, out_dir / "confusion.png")))

    # the word-class posteriors of a few short test sentences with sentiment-bearing words
    pick: list[int] = []
    for s in range(test.count):
        tree = test.bank.trees[s]
        polar = sum(n.label != 2 for n in tree.nodes if n.end - n.start == 1)
        if 6 <= len(tree.tokens) <= 14 and polar >= 2:
            pick.append(s)
        if len(pick) == num_examples:
            break
    pick = pick or list(range(min(num_examples, test.count)))
    fig, axes = plt.subplots(len(pick), 1, figsize=(10, 2.0 * len(pick)), squeeze=False)
    polarity = torch.tensor(POLARITY)
    for ax, s in zip(axes[:, 0], pick, strict=True):
        tree = test.bank.trees[s]
        n = len(tree.tokens)
        gold_polarity = [int(polarity[nd.label]) for nd in tree.nodes if nd.end - nd.start == 1]
        ax.imshow(word_probs[s, :n].T.cpu().numpy(), aspect="auto", origin="lower",
                  cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.scatter(range(n), gold_polarity, marker="x", color="red", label="gold word polarity")
        ax.set_xticks(range(n), list(tree.tokens), rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(WORD_CLASSES), classes, fontsize=7)
        ax.set_title(f"test sentence {s}: gold label {tree.label}, predicted "
                     f"{int(probs[s].argmax())} (p = {float(probs[s].max()):.2f})", fontsize=9)
    axes[0, 0].legend(loc="upper right", fontsize=7)
    fig.suptitle("latent word class p(z_i | words) (colour) and gold word polarity (x)")
    fig.tight_layout()
    paths.append(str(save_figure(fig, out_dir / "word_classes.png")))
    return paths


def _training_figure(state: dict[str, Any], out_dir: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    losses = torch.tensor(state["losses"], dtype=torch.float64)
    ax1.plot(range(1, len(losses) + 1), losses.numpy(), lw=0.5, alpha=0.5, label="step")
    k = max(1, len(losses) // 50)
    if len(losses) >= k:
        smooth = losses.unfold(0, k, 1).mean(-1)
        ax1.plot(range(k, len(losses) + 1), smooth.numpy(), label=f"mean of {k}")
    ax1.set_xlabel("SVI step")
    ax1.set_ylabel("loss per training sentence (nats)")
    ax1.legend()
    steps = [d["step"] for d in state["dev"]]
    ax2.plot(steps, [d["five"] for d in state["dev"]], marker=".", label="5-class")
    ax2.plot(steps, [d["binary"] for d in state["dev"]], marker=".", label="binary")
    ax2.axvline(state["best_step"], color="grey", ls=":", label="selected")
    ax2.set_xlabel("SVI step")
    ax2.set_ylabel("dev accuracy")
    ax2.legend()
    return str(save_figure(fig, out_dir / "training.png"))


# ----------------------------------------------------------------------------------------------
# the script


def _top_words(model: Sentiment, vocab: Vocab, count: int = 15, among: int = 2000
               ) -> dict[str, list[str]]:
    """The words most specific to each polar word class: the largest ``p(z = k | w)`` under the
    class prior :math:`\\sum_c \\pi_c \\theta_{c,k}`, among the ``among`` most frequent
    training words (the vocabulary is sorted by frequency)."""
    with torch.no_grad():
        t = model.tables()
        prior_z = torch.logsumexp(t["class"][:, None] + t["word_class"], 0)  # (3,)
        post = (t["word"][:, 1:among + 1] + prior_z[:, None]).log_softmax(0)  # log p(z | w)
    top = min(count, post.shape[1])
    return {WORD_CLASS_NAMES[k]: [vocab.tokens[i + 1] for i in post[k].topk(top).indices.tolist()]
            for k in (0, 2)}


def _share(text: str) -> float:
    """argparse type of ``--max-polar``: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number in (0, 1]")
    return value


_share.__name__ = "a number in (0, 1]"

PROG = "python -m examples.sentiment"

#: ``--smoke-test``'s values of the options the user did not give.
SMOKE = {"steps": 6, "num_sentences": 300, "batch_size": 64, "eval_every": 3,
         "checkpoint_every": 3}


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m examples.sentiment``."""
    p = example_parser(
        PROG,
        "Learn latent word-level sentiment classes from sentence labels alone on the Stanford "
        "Sentiment Treebank (a Pyro model with enumerated sentence and word classes, trained "
        "with TVE_ELBO); report sentence accuracy (5-class, binary) and the agreement of the "
        "latent word classes with the treebank's word and phrase labels.",
        out_dir="runs/sentiment", data_example="sst/*.txt")
    p.add_argument("--classes-per-label", type=positive_int, default=2,
                   help="latent sentence classes per sentence label")
    p.add_argument("--min-count", type=positive_int, default=2,
                   help="keep training words seen at least this often (others: <unk>)")
    p.add_argument("--word-prior", type=nonnegative_float, default=0.1,
                   help="Dirichlet concentration minus one on each class's word distribution")
    p.add_argument("--class-prior", type=nonnegative_float, default=1.0,
                   help="Dirichlet concentration minus one on the class tables")
    p.add_argument("--deviation-penalty", type=nonnegative_float, default=1.0,
                   help="Laplace prior (L1 penalty) on the polar classes' word logits' "
                        "deviations from the neutral class's")
    p.add_argument("--max-polar", type=_share, default=1.0,
                   help="the largest share, in (0, 1], of a sentence class's words that the "
                        "polar word classes may have (1: no cap)")
    p.add_argument("--steps", type=positive_int, default=1500,
                   help="SVI steps (may be raised on --resume)")
    p.add_argument("--batch-size", type=positive_int, default=256,
                   help="sentences per SVI step")
    p.add_argument("--lr", type=positive_float, default=0.02, help="Adam learning rate")
    p.add_argument("--eval-every", type=positive_int, default=25,
                   help="SVI steps between dev evaluations (model selection)")
    p.add_argument("--patience", type=nonnegative_int, default=20,
                   help="stop after this many dev evaluations without improvement (0: never)")
    p.add_argument("--eval-batch-size", type=positive_int, default=1024,
                   help="sentences per engine call when predicting")
    p.add_argument("--checkpoint-every", type=positive_int, default=100,
                   help="SVI steps between checkpoints (one is also written at the end)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="floating-point type of the parameters")
    p.add_argument("--num-sentences", type=positive_int, default=None,
                   help="use the first N sentences of each split (default: all)")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train, evaluate and write the results (see the module docstring); returns the results.

    :raises ExampleError: a run in ``--out-dir`` that ``--resume`` was not asked to continue, a
        checkpoint that is damaged or was written with other options.
    :raises DataError: if the treebank's files are missing or malformed.
    """
    p = parser()
    args = apply_smoke(p, p.parse_args(argv), argv, SMOKE)
    out_dir = Path(args.out_dir)
    with out_dir_guard(out_dir):
        return _run(args, out_dir)


def _run(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    path = out_dir / "checkpoint.pt"
    resume = resume_or_refuse(args.resume, path, others=[
        out_dir / name for name in ("results.json", *FIGURES)])
    options = run_options(args, may_change=MAY_CHANGE)
    saved = None
    if resume:  # before anything is built: a changed option must not end in a size mismatch
        saved = _saved_run(path)
        extra = {} if saved is None else saved["extra"]
        check_resume_options(extra.get("run_options"), options, path)
        done = extra.get("step", 0)
        if isinstance(done, int) and done > args.steps:
            raise ExampleError(f"the checkpoint {str(path)!r} is at step {done}, past --steps "
                               f"{args.steps}; resume with --steps {done} or more")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    set_seed(args.seed)
    pyro.clear_param_store()

    t_load = time.perf_counter()
    banks = {s: load_sst(s, data_dir=args.data_dir) for s in ("train", "dev", "test")}
    count = args.num_sentences
    vocab = build_vocab(banks["train"].sentences[:count], min_count=args.min_count)
    splits = {s: Split.make(b, vocab, count, device) for s, b in banks.items()}
    load_s = time.perf_counter() - t_load
    train, dev, test = splits["train"], splits["dev"], splits["test"]
    config = Config(len(vocab), args.classes_per_label, args.word_prior, args.class_prior,
                    args.deviation_penalty, args.max_polar)
    if resume:
        _check_config(saved, config, path)
    model = Sentiment(config, _unigram_logits(train, len(vocab), dtype), device, dtype)

    state = _train(model, train, dev, args, path, resume, options)
    final_dev = state["dev"][-1] if state["dev"] else None
    # model selection: the parameters of the best dev evaluation
    pyro.get_param_store().set_state(state["best"])
    results: dict[str, Any] = {
        "config": asdict(config), "args": {k: v for k, v in vars(args).items()},
        "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "vocab_size": len(vocab), "load_seconds": load_s,
        "sentences": {s: sp.count for s, sp in splits.items()},
        "steps_run": state["step"], "stopped_early": state["stopped_early"],
        "best_step": state["best_step"], "train_seconds": state["train_seconds"],
        "final_dev": final_dev, "dev_history": state["dev"], "loss_history": state["losses"]}

    accuracy: dict[str, Any] = {}
    agreement: dict[str, Any] = {}
    word_probs: dict[str, torch.Tensor] = {}
    label_probs: dict[str, torch.Tensor] = {}
    t0 = time.perf_counter()
    for name, split in (("dev", dev), ("test", test)):
        label_probs[name], word_probs[name] = model.predict(split.words, split.mask,
                                                            args.eval_batch_size)
        accuracy[name] = sentence_accuracy(label_probs[name], split.labels)
    results["predict_seconds"] = time.perf_counter() - t0
    results["accuracy"] = accuracy
    results["nll_per_sentence"] = {
        name: negative_log_likelihood(model, sp.words, sp.mask, sp.labels,
                                      args.eval_batch_size) / sp.count
        for name, sp in splits.items()}
    # the latent word classes against the gold word and phrase labels (never used in training)
    t0 = time.perf_counter()
    for name, split in (("dev", dev), ("test", test)):
        agreement[name] = {"in_context": {}, "isolated": {}, "phrase_label": {}}
        for kind, nodes in (("words", split.bank.nodes(max_len=1)),
                            ("phrases", split.bank.nodes(min_len=2, roots=False))):
            nodes = nodes[nodes[:, 0] < split.count]
            gold = nodes[:, 3]
            agreement[name]["in_context"][kind] = class_agreement(
                span_means(word_probs[name], nodes), gold)
            alone_labels, alone_classes = isolated_posteriors(model, split, nodes, vocab,
                                                              args.eval_batch_size)
            agreement[name]["isolated"][kind] = class_agreement(alone_classes, gold)
            agreement[name]["phrase_label"][kind] = label_agreement(alone_labels, gold)
    results["phrase_agreement"] = agreement
    results["agreement_seconds"] = time.perf_counter() - t0

    # baselines
    majority = int(torch.bincount(train.labels, minlength=NUM_LABELS).argmax())
    keep_train, bin_train = binary_labels(train.labels)
    majority_bin = int(bin_train[keep_train].double().mean() >= 0.5)
    nb = naive_bayes(train.words, train.mask, train.labels, len(vocab))
    baselines: dict[str, Any] = {"chance": {"five": 1 / NUM_LABELS, "binary": 0.5},
                                 "majority_label": majority, "majority_binary": majority_bin,
                                 "majority": {}, "naive_bayes": {}}
    for name, split in (("dev", dev), ("test", test)):
        keep, binary = binary_labels(split.labels)
        baselines["majority"][name] = {
            "five": float((split.labels == majority).double().mean()),
            "binary": float((binary[keep] == majority_bin).double().mean())}
        baselines["naive_bayes"][name] = sentence_accuracy(
            naive_bayes_probs(*nb, split.words, split.mask), split.labels)
    results["baselines"] = baselines

    results["top_words"] = _top_words(model, vocab)
    results["figures"] = _figures(test, label_probs["test"], word_probs["test"], out_dir)
    results["figures"].append(_training_figure(state, out_dir))
    if not all(math.isfinite(v) for v in state["losses"]):
        raise ExampleError(f"a training loss is not finite (the last ones: "
                           f"{state['losses'][-5:]}); try a smaller --lr or --dtype float64 in "
                           "a new --out-dir")
    write_json(results, out_dir / "results.json")
    _print_summary(results)
    print_written(PROG, {"results": out_dir / "results.json", "checkpoint": path,
                         "figures": results["figures"]})
    return results


def _print_summary(r: dict[str, Any]) -> None:
    acc, base = r["accuracy"], r["baselines"]
    print(f"trained {r['steps_run']} steps in {r['train_seconds']:.1f} s; selected step "
          f"{r['best_step']} (best dev 5-class accuracy)")
    for split in ("dev", "test"):
        print(f"{split:4s} accuracy: 5-class {acc[split]['five']:.4f}  binary "
              f"{acc[split]['binary']:.4f}   | majority {base['majority'][split]['five']:.4f} / "
              f"{base['majority'][split]['binary']:.4f}  naive Bayes "
              f"{base['naive_bayes'][split]['five']:.4f} / "
              f"{base['naive_bayes'][split]['binary']:.4f}")
    for readout, by_kind in r["phrase_agreement"]["test"].items():
        for kind, ag in by_kind.items():
            for scheme in ("polarity", "binary"):
                a = ag[scheme]
                print(f"test {readout:12s} {kind:7s} {scheme:8s} agreement {a['accuracy']:.4f} "
                      f"(majority {a['majority_baseline']:.4f}), balanced "
                      f"{a['balanced_accuracy']:.4f} (chance {a['chance_balanced']:.4f}), "
                      f"n = {a['count']}")


if __name__ == "__main__":
    run_cli(PROG, main)
