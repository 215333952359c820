"""The plan cache: a pure recipe builder under :func:`functools.lru_cache`.

A plan depends only on a :class:`~plated.plan.ir.Structure` (names, shapes and options, no
values), so :func:`make_plan` is a pure function of it, cached as einops caches its recipes.
Factor labels take no part in the key (:class:`~plated.plan.ir.Structure` compares without them):
they only word error messages, so graphs that differ only in their factors' labels share one
plan. (Dim names are part of the key: Pyro models whose site names differ also differ in dims.)
Errors are never cached, so a structure that fails to plan fails with its own labels.
"""

from __future__ import annotations

import functools

import torch

from ..errors import GraphError
from .eliminate import build_plan
from .ir import Plan, Structure

__all__ = ["make_plan", "clear_plan_cache", "set_plan_cache_size", "plan_cache_info"]

_DEFAULT_SIZE = 256


_recipe = functools.lru_cache(maxsize=_DEFAULT_SIZE)(build_plan)


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
    return _recipe(structure)


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
    _recipe = functools.lru_cache(maxsize=size)(build_plan)


def plan_cache_info() -> dict[str, int]:
    """Return ``{"hits", "misses", "size", "maxsize"}`` of the plan cache."""
    info = _recipe.cache_info()
    return {"hits": info.hits, "misses": info.misses, "size": info.currsize,
            "maxsize": info.maxsize if info.maxsize is not None else -1}
