"""Video question answering with latent frame alignments (``python -m examples.video_qa --help``).

* :mod:`examples.video_qa.data`: the seeded grounded video-QA generator (with ground-truth
  evidence frames), the real-feature loader and batching.
* :mod:`examples.video_qa.model`: frame and question encoders, every attention mode, and the
  two-level segment-then-frame alignment eliminated by the plated engine.
* :mod:`examples.video_qa.train`: the training and evaluation program (checkpoints,
  ``--resume``, early stopping, grounding accuracy, figures, data parallelism through
  ``torchrun``).
* :mod:`examples.video_qa.needle`: the needle-in-a-haystack task (``--task needle``): its
  seeded generator over feature vectors, the recall grid of video length by needle depth and
  its figure.
* :mod:`examples.video_qa.chunked`: questions about one long video answered in chunks of frames
  under a memory cap, exactly.
* :mod:`examples.video_qa.speed`: inference time and peak memory on a 100,000-frame video, and
  training-step times per mode.
* :mod:`examples.video_qa.report`: the results table and the alignment figure of several runs
  (and the needle runs' recall grids).
* :mod:`examples.video_qa.tgif`: the real-frame demo on the TGIF-QA GIFs.
"""
