"""The vectorized Markov construct: :class:`markov_plate`.

A ``pyro.markov`` loop runs the model body once per time step, and the trace holds one enumerated
variable per step. :class:`markov_plate` runs the body once for all steps: it is a
:class:`pyro.plate` whose elements form a Markov chain. Inside it, a chain site such as ``"x"``
has one value per step, and the tensor returned by :meth:`markov_plate.init` stands for the value of
``x`` at the previous step. :class:`~plated.pyro.TVE_ELBO` turns the plate into a sequential plate
of the engine, which eliminates it by a log-depth parallel scan.

The two forms of a first-order HMM side by side::

    # pyro.markov loop: T sample sites per chain
    x = 0
    for t in pyro.markov(range(T)):
        x = pyro.sample(f"x_{t}", dist.Categorical(probs_x[x]),
                        infer={"enumerate": "parallel"})
        pyro.sample(f"y_{t}", dist.Normal(locs[x], 1.0), obs=data[t])

    # markov_plate: one sample site per chain
    time = markov_plate("time", T, dim=-1)
    x_prev = time.init("x", 0, size=K)           # x at t - 1 (x at -1 is state 0)
    with time:
        x = pyro.sample("x", dist.Categorical(probs_x[x_prev]),
                        infer={"enumerate": "parallel"})
        pyro.sample("y", dist.Normal(locs[x], 1.0), obs=data)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import Message

from ..errors import GraphError

__all__ = ["markov_plate", "FIXED_INIT_KEY", "INIT_KEY", "MARKOV_KEY", "replayed_chains"]

#: ``infer`` key marking a sample site inside a :class:`markov_plate` (value: the plate names).
MARKOV_KEY = "_plated_markov"
#: ``infer`` key marking an initial-state site (value: ``(plate name, chain site, lag)``).
INIT_KEY = "_plated_markov_init"
#: ``infer`` key marking an initial-state site with a fixed initial state: its log-probability
#: table is made on the default dtype and device, and is converted to those of the model's other
#: factors when the trace is collected.
FIXED_INIT_KEY = "_plated_markov_fixed_init"


#: While a model is replayed with fixed chain values (:func:`replayed_chains`), the tensors that
#: :meth:`markov_plate.init` returns, by ``(plate name, chain site, lag)``: the chain's values
#: ``lag`` steps earlier at every step.
_REPLAYED: list[Mapping[tuple[str, str, int], torch.Tensor]] = []


@contextmanager
def replayed_chains(previous: Mapping[tuple[str, str, int], torch.Tensor]) -> Iterator[None]:
    """Within the block, :meth:`markov_plate.init` returns ``previous[(plate, chain, lag)]``,
    where given, in place of the sampled initial state.

    A model replayed with fixed values of its chain sites (``infer_discrete``) needs this: inside
    the plate, the tensor ``init`` returned stands for the chain's value at the previous step, so
    it must be the chain's values shifted by one step, while the initial site itself keeps the
    state before step 0. Blocks nest; the innermost one wins.
    """
    _REPLAYED.append(previous)
    try:
        yield
    finally:
        _REPLAYED.pop()


class _MarkInit(Messenger):
    """Marks an initial-state site after every other handler (``replay`` included) has seen it.

    The mark is set in place on the site's ``infer`` dict, which the trace shares.
    """

    def __init__(self, info: tuple[str, str, int]) -> None:
        super().__init__()
        self.info = info

    def _postprocess_message(self, msg: Message) -> None:
        """Mark a sample site with ``INIT_KEY``: ``(plate name, chain site, lag)``."""
        infer: Any = msg["infer"]
        if msg["type"] == "sample" and infer is not None:
            infer[INIT_KEY] = self.info


class markov_plate(pyro.plate):
    """A :class:`pyro.plate` whose elements form a Markov chain (a sequential plate).

    Declare each chain with :meth:`init` *before* entering the plate; it returns the tensor that,
    inside the plate, stands for the chain's value at the previous step (or, for ``history=2``,
    the previous two steps). Then, inside the plate, sample the chain site under the name given to
    :meth:`init`, with ``infer={"enumerate": "parallel"}``.

    Only :class:`~plated.pyro.TVE_ELBO` and the queries of :mod:`plated.pyro` understand the
    chain; Pyro's own ``TraceEnum_ELBO`` would treat this plate as independent.

    :param name: the plate name.
    :param size: the number of time steps.
    :param dim: the plate's batch dim, as for :class:`pyro.plate`.
    :param history: how many previous steps a chain site may depend on (1 for an HMM, 2 for a
        second-order HMM). A chain of ``K`` states then runs on ``K ** history`` joint states.
    """

    def __init__(self, name: str, size: int, dim: int | None = None, *,
                 history: int = 1) -> None:
        if history < 1:
            raise GraphError(f"markov_plate {name!r}: history must be >= 1, got {history}")
        super().__init__(name, size, dim=dim)
        self.history = int(history)
        self._active = False

    def __enter__(self) -> Any:
        """Enter the plate (as :class:`pyro.plate` does); :meth:`init` is refused inside."""
        self._active = True
        return super().__enter__()

    def __exit__(self, *args: Any) -> Any:
        """Leave the plate (as :class:`pyro.plate` does)."""
        self._active = False
        return super().__exit__(*args)

    def init(self, chain: str, initial: int | torch.distributions.Distribution, *,
             size: int | None = None) -> Any:
        """Declare chain site ``chain`` and sample its state(s) before the first step.

        Call this outside the plate. It adds one enumerated sample site per lag, named
        ``"{chain}_prev"`` (or ``"{chain}_prev1"``, ``"{chain}_prev2"``, ... when
        ``history > 1``): outside the plate it is the state before step 0; inside the plate it
        stands for the chain's value ``lag`` steps earlier.

        :param chain: the name of the sample site, inside this plate, that forms the chain.
        :param initial: a fixed initial state (an ``int``, with ``size``; its log-probability
            table takes the dtype and device of the model's other factors, while its enumerated
            values, like Pyro's plate indices, are made on torch's default device), or a discrete
            distribution with enumerable support over the initial state (used for every lag).
        :param size: the number of states; required when ``initial`` is an ``int``.
        :return: the previous-value tensor, or for ``history > 1`` a tuple of them, most recent
            first.
        :raises GraphError: if called inside the plate, or with an invalid initial state.
        """
        if self._active:
            raise GraphError(
                f"markov_plate {self.name!r}: call init({chain!r}, ...) before entering the "
                "plate; the initial state lives outside it"
            )
        fn: Any
        fixed = not isinstance(initial, torch.distributions.Distribution)
        if isinstance(initial, torch.distributions.Distribution):
            if not initial.has_enumerate_support:
                raise GraphError(
                    f"markov_plate {self.name!r}: the initial distribution of chain {chain!r} "
                    f"({type(initial).__name__}) has no enumerable support; use a discrete one"
                )
            fn = initial
        else:
            if size is None or not 0 <= int(initial) < size:
                raise GraphError(
                    f"markov_plate {self.name!r}: a fixed initial state of chain {chain!r} needs "
                    f"size= and 0 <= initial < size (got initial={initial!r}, size={size!r})"
                )
            logits = torch.full((size,), -float("inf"))
            logits[int(initial)] = 0.0
            fn = dist.Categorical(logits=logits)
        values = []
        for lag in range(1, self.history + 1):
            site = f"{chain}_prev" if self.history == 1 else f"{chain}_prev{lag}"
            infer: Any = {"enumerate": "parallel"}
            if fixed:
                infer[FIXED_INIT_KEY] = True
            with _MarkInit((self.name, chain, lag)):
                value = pyro.sample(site, fn, infer=infer)
            if _REPLAYED:
                value = _REPLAYED[-1].get((self.name, chain, lag), value)
            values.append(value)
        return values[0] if self.history == 1 else tuple(values)

    def _process_message(self, msg: Message) -> None:
        """Process a site as :class:`pyro.plate` does, and mark a sample site with
        ``MARKOV_KEY`` (the names of the markov_plates it is in)."""
        super()._process_message(msg)
        infer: Any = msg["infer"]
        if msg["type"] == "sample" and infer is not None:
            infer[MARKOV_KEY] = (*infer.get(MARKOV_KEY, ()), self.name)
