"""Exceptions raised by :mod:`plated`.

Every error names the offending factor, dimension, variable or plate and says what to do. Errors
that an outer layer re-words carry their facts as attributes (see :class:`IntractableError`), so
the outer layer re-wraps them without parsing their text.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["PlatedError", "GraphError", "IntractableError", "MemoryCapError"]


class PlatedError(Exception):
    """Base class of every error raised by :mod:`plated`."""


class GraphError(PlatedError, ValueError):
    """A plated factor graph or einsum equation is malformed.

    Raised before any tensor work for: a dim with two sizes or of size 0, a plate dim whose size
    differs from the plate's, a plate size that is not an int, a plate used as a variable,
    unknown names or rings, an einsum input that repeats an index, NaN or ``+inf`` in a factor,
    factors of mixed dtypes or devices, and bad query arguments (``sample``'s ``num_samples``
    and ``generator``, marginals under :func:`torch.inference_mode`). Also raised by ``sample``
    where log Z is -inf (checked with validation, after the forward pass): there is
    no distribution to sample.
    """


class IntractableError(PlatedError, NotImplementedError):
    """Tensor variable elimination would cost time exponential in a plate size.

    Raised by the planner before any tensor work. Subclasses :class:`NotImplementedError`, which is
    what :func:`pyro.ops.contract.einsum` raises in the same situation.

    The message is ``problem``, then ``". Way out: "`` and the remedies joined by ``", or "``.
    With a ``context`` (a front end's, such as ``"In a Pyro model"``) it is ``problem`` and a
    full stop, then on a new line ``"{context} the ways out are: "`` and the remedies as a list.

    :ivar problem: what cannot be eliminated and why, without the remedies.
    :ivar plates: the plates involved, sorted.
    :ivar variables: the variables involved, sorted.
    :ivar remedies: the ways out, each a short imperative sentence fragment.
    :ivar context: where the remedies apply (empty: to the engine's own graphs).
    """

    def __init__(
        self,
        problem: str,
        *,
        plates: Iterable[str] = (),
        variables: Iterable[str] = (),
        remedies: Iterable[str] = (),
        context: str = "",
    ) -> None:
        self.problem = problem
        self.plates = tuple(sorted(plates))
        self.variables = tuple(sorted(variables))
        self.remedies = tuple(remedies)
        self.context = context
        super().__init__(self._message())

    def _message(self) -> str:
        ways = self.remedies
        if not ways:
            return self.problem
        if not self.context:
            return f"{self.problem}. Way out: {', or '.join(ways)}"
        listed = ways[0] if len(ways) == 1 else ", ".join(ways[:-1]) + ", or " + ways[-1]
        return f"{self.problem}.\n{self.context} the ways out are: {listed}."

    def __reduce__(self) -> tuple[object, ...]:  # keep the fields through pickling
        return (_rebuild_intractable,
                (self.problem, self.plates, self.variables, self.remedies, self.context))

    def with_remedies(self, remedies: Iterable[str], context: str = "") -> IntractableError:
        """The same problem with other ways out: a front end's own remedies, which apply in
        ``context`` (e.g. ``"In a Pyro model"``)."""
        return IntractableError(self.problem, plates=self.plates, variables=self.variables,
                                remedies=remedies, context=context)


def _rebuild_intractable(problem: str, plates: tuple[str, ...], variables: tuple[str, ...],
                         remedies: tuple[str, ...], context: str) -> IntractableError:
    return IntractableError(problem, plates=plates, variables=variables, remedies=remedies,
                            context=context)


class MemoryCapError(PlatedError, MemoryError):
    """A query would exceed the user-set memory cap even with its steps sliced: raised when the
    plan is made or when the query is asked, always before any tensor work."""
