"""plated: exact inference in discrete latent-variable models by tensor variable elimination.

The engine of Obermeyer et al. (2019), "Tensor Variable Elimination for Plated Factor Graphs":
given log-space factors over named dims, independent plates and sequential (Markov) plates, it
computes log partition functions and their gradients, MAP assignments, exact posterior samples and
marginals with batched einsum contractions.

Two faces:

* :func:`~plated.contract.einsum` — the functional face, with the semantics of
  :func:`pyro.ops.contract.einsum`;
* :class:`~plated.graph.PlatedFactorGraph` — the graph face, with
  :meth:`~plated.graph.PlatedFactorGraph.log_partition`,
  :meth:`~plated.graph.PlatedFactorGraph.map`, :meth:`~plated.graph.PlatedFactorGraph.sample`,
  :meth:`~plated.graph.PlatedFactorGraph.marginals` and
  :meth:`~plated.graph.PlatedFactorGraph.cost`.

:mod:`plated.naive` is the brute-force twin used to check both.
"""

from . import naive, testing
from .contract import einsum
from .errors import GraphError, IntractableError, MemoryCapError, PlatedError
from .factor import Factor, Plate
from .graph import PlatedFactorGraph
from .plan import CostReport, clear_plan_cache, plan_cache_info, set_plan_cache_size
from .rings import LogRing, MaxRing, Semiring

__version__ = "0.1.0"

__all__ = [
    "CostReport",
    "Factor",
    "GraphError",
    "IntractableError",
    "LogRing",
    "MaxRing",
    "MemoryCapError",
    "Plate",
    "PlatedError",
    "PlatedFactorGraph",
    "Semiring",
    "clear_plan_cache",
    "einsum",
    "naive",
    "plan_cache_info",
    "set_plan_cache_size",
    "testing",
]
