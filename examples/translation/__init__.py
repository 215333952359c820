"""Translation with latent alignments on Multi30k German->English (``python -m
examples.translation --help``).

* :mod:`examples.translation.data`: the joint BPE tokenizer (sentencepiece, cached) and batching.
* :mod:`examples.translation.model`: the LSTM encoder-decoder with input feeding and every
  attention mode, exact scoring, and beam search under the prior.
* :mod:`examples.translation.train`: the training and evaluation program (checkpoints,
  ``--resume``, early stopping, BLEU, figures, data parallelism through ``torchrun``).
"""
