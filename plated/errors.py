"""Exceptions raised by :mod:`plated`.

Every error names the offending factor, dimension, variable or plate and says what to do.
"""

from __future__ import annotations

__all__ = ["PlatedError", "GraphError", "IntractableError", "MemoryCapError"]


class PlatedError(Exception):
    """Base class of every error raised by :mod:`plated`."""


class GraphError(PlatedError, ValueError):
    """A plated factor graph or einsum equation is malformed.

    Raised before any tensor work for: a dim with two sizes, a plate dim whose size differs from
    the plate's, a plate used as a variable, unknown names, NaN or ``+inf`` in a factor, and
    factors of mixed dtypes or devices.
    """


class IntractableError(PlatedError, NotImplementedError):
    """Tensor variable elimination would cost time exponential in a plate size.

    Raised by the planner before any tensor work. Subclasses :class:`NotImplementedError`, which is
    what :func:`pyro.ops.contract.einsum` raises in the same situation.
    """


class MemoryCapError(PlatedError, MemoryError):
    """A contraction cannot be sliced to fit under the user-set memory cap."""
