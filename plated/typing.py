"""The engine's option and kind types, in one place (as ``opt_einsum/typing.py`` keeps them).

:data:`RingName` names a semiring (:func:`plated.rings.get_ring`); :data:`ChainRole` is the role
of one input of a chain found inside a contraction (:class:`plated.plan.ir.ChainLayout`);
:data:`ChainMethod` is how a plan eliminates a chain.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["RingName", "ChainRole", "ChainMethod"]

#: A semiring: ``"log"`` is sum-product (log Z, sampling, marginals), ``"max"`` max-product (MAP).
RingName = Literal["log", "max"]

#: How one input of a chain enters the scan: an ``"edge"`` between ``v_t`` and ``v_{t+1}``, a
#: unary factor of ``v_{t+1}`` (``"next"``) or of ``v_0`` (``"start"``), or a ``"const"``.
ChainRole = Literal["edge", "next", "start", "const"]

#: How a plan eliminates a chain (a sequential plate's, or one found inside a contraction):
#: ``"recursion"``, the sequential forward-backward of :mod:`plated.recursion` (``K^2`` work a
#: step, ``n`` dependent steps); ``"blocked"``, the same recursion run within blocks of about
#: :math:`\sqrt n` steps, all blocks at once, and across the blocks by their products (``K^3``
#: work a step, about :math:`2 \sqrt n` dependent steps; log ring only); or ``"scan"``, the
#: log-depth parallel scan of :mod:`plated.markov` (``K^3`` work a step, ``log2 n`` levels). The
#: plan chooses by its cost model (:func:`plated.plan.chains.chain_method`).
ChainMethod = Literal["recursion", "blocked", "scan"]
