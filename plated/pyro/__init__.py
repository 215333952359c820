"""The Pyro front end: exact inference for Pyro models on the engine.

* :class:`TVE_ELBO` — a drop-in for :class:`pyro.infer.TraceEnum_ELBO` in :class:`pyro.infer.SVI`.
* :class:`JitTVE_ELBO` — the same, compiled, a drop-in for :class:`pyro.infer.JitTraceEnum_ELBO`.
* :class:`markov_plate` — the vectorized Markov construct: the model body runs once for all time
  steps and the engine eliminates the chain by parallel scan.
* :func:`infer_discrete` — a drop-in for :func:`pyro.infer.infer_discrete`: the model re-run with
  its enumerated sites fixed to MAP values or posterior samples from one engine pass.
* :func:`posterior` — exact queries for every enumerated site, each in one pass: log-likelihood,
  MAP values, posterior samples and marginals.
"""

from .elbo import TVE_ELBO, JitTVE_ELBO
from .markov import markov_plate
from .query import Posterior, infer_discrete, posterior

__all__ = ["JitTVE_ELBO", "TVE_ELBO", "Posterior", "infer_discrete", "markov_plate", "posterior"]
