"""The plan cache: a pure recipe builder under :func:`functools.lru_cache`.

A plan depends only on a :class:`~plated.plan.ir.Structure` (names, shapes and options, no
values), so :func:`make_plan` is a pure function of it, cached as einops caches its recipes.
Factor labels are left out of the key: they only word error messages, so graphs that differ only in
their factors' labels (Pyro models that differ only in site names) share one plan. A structure that
fails to plan is planned again with its labels, so the error names the user's factors.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from ..errors import GraphError, PlatedError
from .eliminate import build_plan
from .ir import Plan, Structure

__all__ = ["make_plan", "clear_plan_cache", "set_plan_cache_size", "plan_cache_info"]

_DEFAULT_SIZE = 256


def _unlabelled(structure: Structure) -> Plan:
    """:func:`build_plan` of a structure whose labels are stand-ins (the cache's key)."""
    n = len(structure.inputs)
    return build_plan(dataclasses.replace(structure, labels=tuple(f"#{k}" for k in range(n))))


_recipe = functools.lru_cache(maxsize=_DEFAULT_SIZE)(_unlabelled)


def make_plan(structure: Structure) -> Plan:
    """Return the plan for ``structure``, building it on a cache miss.

    :raises GraphError: if the structure is malformed.
    :raises IntractableError: if the graph has no polynomial-time elimination.
    :raises MemoryCapError: if a step cannot be made to fit ``structure.memory_cap``.
    """
    if torch.compiler.is_compiling():
        # Dynamo traces plain Python once, the plan's values becoming constants of the compiled
        # graph, but it cannot call through an lru_cache wrapper (it warns, and ignores the cache)
        return build_plan(structure)
    try:
        return _recipe(dataclasses.replace(structure, labels=()))
    except PlatedError:
        pass
    return build_plan(structure)  # fails again, and the error names the factors by their labels


def clear_plan_cache() -> None:
    """Drop every cached plan and reset the hit/miss counters."""
    _recipe.cache_clear()


def set_plan_cache_size(size: int) -> None:
    """Bound the plan cache to ``size`` plans (least recently used are dropped first).

    Resizing starts a new, empty cache with fresh counters.

    :raises GraphError: if ``size`` is negative (a :class:`ValueError`).
    """
    global _recipe
    if size < 0:
        raise GraphError(f"plan cache size must be >= 0, got {size}")
    _recipe.cache_clear()
    _recipe = functools.lru_cache(maxsize=size)(_unlabelled)


def plan_cache_info() -> dict[str, int]:
    """Return ``{"hits", "misses", "size", "maxsize"}`` of the plan cache."""
    info = _recipe.cache_info()
    return {"hits": info.hits, "misses": info.misses, "size": info.currsize,
            "maxsize": info.maxsize if info.maxsize is not None else -1}
