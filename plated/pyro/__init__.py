"""The Pyro front end: exact inference for Pyro models on the engine.

* :class:`TVE_ELBO` — a drop-in for :class:`pyro.infer.TraceEnum_ELBO` in :class:`pyro.infer.SVI`.
* :class:`markov_plate` — the vectorized Markov construct: the model body runs once for all time
  steps and the engine eliminates the chain by parallel scan.
* :func:`posterior` — exact queries for every enumerated site, each in one pass: log-likelihood,
  MAP values, posterior samples and marginals.
"""

from .elbo import TVE_ELBO
from .markov import markov_plate
from .query import Posterior, posterior

__all__ = ["TVE_ELBO", "Posterior", "markov_plate", "posterior"]
