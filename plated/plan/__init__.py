"""Planning: from the structure of a plated factor graph to a cached, reusable elimination plan.

A plan is a straight-line program of typed steps over numbered *slots*. It is made once per
(structure, shapes, ring, options), cached, and run many times by :mod:`plated.contract`. Making a
plan performs every structural check (including tractability), chooses contraction paths with
:func:`opt_einsum.contract_path`, predicts FLOPs and peak memory, and splits contractions that
would exceed a memory cap. Running it does tensor work only.

The package follows the planner's jobs:

* :mod:`~plated.plan.ir`: the intermediate representation: :class:`Structure` (the cache key),
  slots, layouts and one frozen dataclass per step, and :class:`Plan`;
* :mod:`~plated.plan.analysis`: sizes and ordinals, computed once and shared by every face;
* :mod:`~plated.plan.emit`: emission of steps, opt_einsum path folding and memory slicing;
* :mod:`~plated.plan.chains`: chain recognition and the sequential scan's layout;
* :mod:`~plated.plan.eliminate`: the elimination loop, Algorithm 1 of Obermeyer et al. (2019),
  "Tensor Variable Elimination for Plated Factor Graphs";
* :mod:`~plated.plan.cost`: the cost model;
* :mod:`~plated.plan.cache`: the plan cache.
"""

from __future__ import annotations

from .cache import clear_plan_cache, make_plan, plan_cache_info, set_plan_cache_size
from .chains import CHAIN_MIN_LENGTH
from .cost import CAP_MARGIN, CostReport, check_query_memory
from .ir import (
    ChainLayout,
    ChainPart,
    ChainStep,
    NormalizeStep,
    PairLayout,
    PairStep,
    Plan,
    PlateProduct,
    ReduceStep,
    ScanLayout,
    ScanStep,
    Slot,
    Step,
    Structure,
)

__all__ = [
    "CAP_MARGIN",
    "CHAIN_MIN_LENGTH",
    "ChainLayout",
    "ChainPart",
    "ChainStep",
    "CostReport",
    "NormalizeStep",
    "PairLayout",
    "PairStep",
    "Plan",
    "PlateProduct",
    "ReduceStep",
    "ScanLayout",
    "ScanStep",
    "Slot",
    "Step",
    "Structure",
    "check_query_memory",
    "clear_plan_cache",
    "make_plan",
    "plan_cache_info",
    "set_plan_cache_size",
]
