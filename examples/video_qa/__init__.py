"""Video question answering with latent frame alignments (``python -m examples.video_qa --help``).

* :mod:`examples.video_qa.data`: the seeded grounded video-QA generator (with ground-truth
  evidence frames), the real-feature loader and batching.
* :mod:`examples.video_qa.model`: frame and question encoders, every attention mode, and the
  two-level segment-then-frame alignment eliminated by the plated engine.
* :mod:`examples.video_qa.train`: the training and evaluation program (checkpoints,
  ``--resume``, early stopping, grounding accuracy, figures, data parallelism through
  ``torchrun``).
* :mod:`examples.video_qa.report`: the results table and the alignment figure of several runs.
* :mod:`examples.video_qa.tgif`: the real-frame demo on the TGIF-QA GIFs.
"""
