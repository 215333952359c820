"""Data types of a plated factor graph: :class:`Factor` and :class:`Plate`.

A factor is a log-space tensor whose dimensions carry names. A name is either a *plate* (declared
with :class:`Plate`) or a *variable* (every other name). The plates a factor's dims include are the
plates the factor is replicated over; a variable's plates (its *ordinal*) are the intersection of
the plates of all factors that mention it, as in :func:`pyro.ops.contract.einsum`.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from .errors import GraphError

__all__ = ["Factor", "Plate"]


@dataclass(frozen=True)
class Factor:
    """A log-space factor with named dims.

    :param tensor: log potentials, a floating tensor with one dim per name in ``dims``.
        ``-inf`` entries are hard zeros; NaN and ``+inf`` are rejected when the graph is checked.
    :param dims: the name of each dim of ``tensor``, in order. Names must be unique.
    :param name: an optional label used in error messages (defaults to the dims joined).
    :raises GraphError: if ``len(dims) != tensor.dim()``, a name repeats or a dim has size 0.
    """

    tensor: torch.Tensor
    dims: tuple[str, ...]
    name: str | None = None

    def __post_init__(self) -> None:
        dims = tuple(self.dims)
        object.__setattr__(self, "dims", dims)
        if not isinstance(self.tensor, torch.Tensor):
            raise GraphError(
                f"factor {self.label} holds a {type(self.tensor).__name__}, not a torch.Tensor"
            )
        for d in dims:
            if not isinstance(d, str) or not d:
                raise GraphError(f"factor {self.label} has dim name {d!r}; names are nonempty str")
        if len(dims) != self.tensor.dim():
            raise GraphError(
                f"factor {self.label} names {len(dims)} dims {dims} but its tensor has shape "
                f"{tuple(self.tensor.shape)} ({self.tensor.dim()} dims); give one name per dim"
            )
        if len(set(dims)) != len(dims):
            raise GraphError(f"factor {self.label} repeats a dim name in {dims}")
        for d, n in zip(dims, self.tensor.shape, strict=True):
            if n == 0:
                raise GraphError(
                    f"factor {self.label} has dim {d!r} of size 0 (shape "
                    f"{tuple(self.tensor.shape)}); a variable needs at least one value and a plate "
                    "at least one element: drop the dim or the factor"
                )

    @property
    def label(self) -> str:
        """The name used for this factor in error messages."""
        return self.name if self.name is not None else "(" + ",".join(map(str, self.dims)) + ")"


@dataclass(frozen=True)
class Plate:
    """A plate: a named, sized index over which factors are replicated.

    An *independent* plate (the default) is a product over its elements. A *sequential* plate is a
    first-order Markov chain along its elements: for each pair ``curr: prev`` in ``prev``, a factor
    inside the plate that names dim ``prev`` sees, at element ``t``, the value of variable ``curr``
    at element ``t - 1``. At ``t = 0`` it sees the variable named ``prev`` itself, the state before
    the chain starts, which factors outside the plate may also use (for example an initial
    distribution).

    :param name: the plate's dim name.
    :param size: the number of elements, an integer (``int``, a NumPy integer or a 0-dim integer
        tensor; not ``bool``, a float or a string) of at least 1.
    :param sequential: whether the plate is a Markov chain. Requires ``prev``.
    :param prev: for a sequential plate, a mapping from each chain variable to the dim name of its
        previous value.
    :raises GraphError: on a size that is not an integer or not positive, a sequential plate
        without ``prev``, or ``prev`` on an independent plate.
    """

    name: str
    size: int
    sequential: bool = False
    prev: tuple[tuple[str, str], ...] = field(default=())

    def __init__(
        self,
        name: str,
        size: int,
        sequential: bool = False,
        prev: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    ) -> None:
        pairs: tuple[tuple[str, str], ...]
        if prev is None:
            pairs = ()
        elif isinstance(prev, Mapping):
            pairs = tuple((str(k), str(v)) for k, v in prev.items())
        else:
            pairs = tuple((str(k), str(v)) for k, v in prev)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "size", _plate_size(name, size))
        object.__setattr__(self, "sequential", bool(sequential))
        object.__setattr__(self, "prev", pairs)
        if not isinstance(name, str) or not name:
            raise GraphError(f"plate name {name!r} must be a nonempty str")
        if self.size < 1:
            raise GraphError(f"plate {name!r} has size {size}; a plate needs at least one element")
        if self.sequential and not pairs:
            raise GraphError(
                f"sequential plate {name!r} needs prev={{var: prev_dim}} naming its chain variables"
            )
        if pairs and not self.sequential:
            raise GraphError(
                f"plate {name!r} is independent but has prev={dict(pairs)}; pass sequential=True"
            )
        names = [c for c, _ in pairs] + [p for _, p in pairs]
        if len(set(names)) != len(names):
            raise GraphError(f"sequential plate {name!r} has repeated names in prev={dict(pairs)}")
        if name in names:
            raise GraphError(
                f"plate {name!r} is used as a variable in its own prev={dict(pairs)}; "
                "chain variables must be variable names, not plate names"
            )


def _plate_size(name: object, size: object) -> int:
    """``size`` as an ``int``: anything with ``__index__`` (an ``int``, a NumPy integer, a 0-dim
    integer tensor) but ``bool``; a float or a string is refused, not truncated or parsed.

    :raises GraphError: naming the plate and the size given.
    """
    if not isinstance(size, bool):
        try:
            return operator.index(size)  # type: ignore[arg-type]
        except TypeError:
            pass
    raise GraphError(
        f"plate {name!r} has size {size!r} ({type(size).__name__}); a plate's size is an int "
        "(the number of its elements), e.g. Plate(name, int(n))"
    )
