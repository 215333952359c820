"""Semirings: the few tensor operations the elimination algorithm is written against.

Each ring is a tiny stateless object. The elimination (:mod:`plated.contract`) and the sequential
scan (:mod:`plated.markov`) call only these methods, so sum-product, max-product and sampling share
one algorithm. All tensors are in log space.

Laws (for a ring with sum :math:`\\oplus` and product :math:`\\otimes`): both are associative and
commutative, :math:`\\otimes` distributes over :math:`\\oplus`, and plates reduce by
:math:`\\otimes`, which in log space is ordinary addition for every ring here.

Handling of ``-inf`` (a hard zero): the shift used before exponentiating is the detached max of
each slice, replaced by 0 where the whole slice is ``-inf``, so ``-inf - shift`` is ``-inf`` (never
``-inf - -inf = NaN``); logs of exact zeros go through :func:`safe_log`, whose gradient at 0 is 0.
"""

from __future__ import annotations

import torch

from .errors import GraphError
from .plan.ir import PairLayout
from .typing import RingName

__all__ = ["RingName", "Semiring", "LogRing", "MaxRing", "get_ring", "safe_log", "finite_shift"]

class _SafeLog(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.log()

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, *grads: torch.Tensor
                 ) -> torch.Tensor:
        (x,) = ctx.saved_tensors  # type: ignore[attr-defined]
        (g,) = grads
        return torch.where(x > 0, g / x, torch.zeros_like(g))


class _LogMatmul(torch.autograd.Function):
    r"""``C = log(exp(A) @ exp(B))`` with shifts, and a fused backward.

    With :math:`E_a = e^{A - s_a}`, :math:`E_b = e^{B - s_b}` (row maxima of ``A``, column maxima
    of ``B``) and :math:`P = E_a E_b`, the gradients are
    :math:`\partial A = E_a \odot ((G / P) E_b^\top)` and
    :math:`\partial B = E_b \odot (E_a^\top (G / P))`, with :math:`G / P := 0` where
    :math:`P = 0` (a hard zero), so no NaN appears.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, a: torch.Tensor, b: torch.Tensor
                ) -> torch.Tensor:
        sa = finite_shift(a.amax(dim=-1, keepdim=True))
        sb = finite_shift(b.amax(dim=-2, keepdim=True))
        ea = torch.sub(a, sa).exp_()  # in place on fresh temporaries: fewer large allocations
        eb = torch.sub(b, sb).exp_()
        p = torch.matmul(ea, eb)
        ctx.save_for_backward(a, b, ea, eb, p)
        return p.log().add_(sa).add_(sb)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, *grads: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        a, b, ea, eb, p = ctx.saved_tensors  # type: ignore[attr-defined]
        (g,) = grads
        if torch.is_grad_enabled():  # double backward: differentiate a differentiable twin
            with torch.enable_grad():
                ga, gb = torch.autograd.grad(_log_matmul_twin(a, b), (a, b), g,
                                             create_graph=True)
            return ga, gb
        q = torch.where(p > 0, g / p, torch.zeros_like(g))
        grad_a = torch.matmul(q, eb.transpose(-1, -2)).mul_(ea)
        grad_b = torch.matmul(ea.transpose(-1, -2), q).mul_(eb)
        return grad_a, grad_b


def _log_matmul_twin(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """:func:`log_matmul` from differentiable operations (for higher derivatives)."""
    sa = finite_shift(a.amax(dim=-1, keepdim=True))
    sb = finite_shift(b.amax(dim=-2, keepdim=True))
    return safe_log(torch.matmul((a - sa).exp(), (b - sb).exp())) + sa + sb


def log_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r"""Batched :math:`\log(e^A e^B)`: the log ring's matrix product (see ``_LogMatmul``)."""
    return _LogMatmul.apply(a, b)


def safe_log(x: torch.Tensor) -> torch.Tensor:
    """``log(x)`` for ``x >= 0`` with ``log(0) = -inf`` and a zero (not NaN) gradient at 0."""
    if x.requires_grad:
        return _SafeLog.apply(x)
    return x.log()


def finite_shift(m: torch.Tensor) -> torch.Tensor:
    """Detach a max used as a shift and replace ``-inf`` (an all-zero slice) by 0."""
    return torch.nan_to_num(m.detach(), nan=0.0, posinf=0.0, neginf=0.0)


class Semiring:
    """Interface of a semiring over log-space tensors.

    ``pair`` contracts two tensors, ``reduce`` eliminates dims of one tensor, ``matmul`` is the
    batched matrix product used by the sequential scan, and ``choose`` is the backward step of the
    ring: given unnormalised log weights over the last dim it picks an index per batch element.
    """

    name: RingName

    def pair(
        self, a: torch.Tensor, b: torch.Tensor, spec: PairLayout
    ) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def reduce(self, x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - interface

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - interface

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - interface

    def level(self, m: torch.Tensor) -> torch.Tensor:
        """One level of the scan's product tree: ``(batch, n, K, K)`` to
        ``(batch, ceil(n / 2), K, K)``, multiplying neighbours and carrying an odd last matrix."""
        batch, n, k, _ = m.shape
        h = n // 2
        even, odd = m[:, : 2 * h].reshape(batch, h, 2, k, k).unbind(2)
        p = self.matmul(even, odd)
        return torch.cat([p, m[:, 2 * h:]], dim=1) if n % 2 else p

    @staticmethod
    def product(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        """Product over plate dims: addition in log space for every ring."""
        return x.sum(dim=dims) if dims else x

    def identity(self, k: int, like: torch.Tensor) -> torch.Tensor:
        """The ``k x k`` multiplicative identity matrix (0 on the diagonal, ``-inf`` elsewhere)."""
        eye = torch.full((k, k), -torch.inf, dtype=like.dtype, device=like.device)
        return eye.fill_diagonal_(0.0)


class LogRing(Semiring):
    """The log sum-product semiring :math:`(\\mathrm{logsumexp}, +, -\\infty, 0)`.

    Its backward step (``choose``) draws an index from the categorical distribution with the given
    logits (Gumbel-max), so running an elimination plan backward with it gives exact joint posterior
    samples (forward-filter backward-sample). Gradients of its results give marginals.

    :param generator: the random number generator of ``choose`` (default: torch's global one).
    """

    name: RingName = "log"

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def pair(self, a: torch.Tensor, b: torch.Tensor, spec: PairLayout) -> torch.Tensor:
        if not spec.red_a and not spec.red_b:
            # nothing is eliminated: a broadcast product, exact in log space
            return a.reshape(spec.view_a) + b.reshape(spec.view_b)
        sa = finite_shift(a.amax(dim=spec.red_a, keepdim=True) if spec.red_a else a)
        sb = finite_shift(b.amax(dim=spec.red_b, keepdim=True) if spec.red_b else b)
        out = torch.einsum(spec.equation, (a - sa).exp(), (b - sb).exp())
        return safe_log(out) + sa.reshape(spec.shift_a) + sb.reshape(spec.shift_b)

    def reduce(self, x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        if not dims:
            return x
        s = finite_shift(x.amax(dim=dims, keepdim=True))
        return safe_log((x - s).exp().sum(dim=dims)) + s.squeeze(dims)

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return log_matmul(a, b)

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        u = torch.rand(logits.shape, dtype=logits.dtype, device=logits.device,
                       generator=self.generator)
        tiny = torch.finfo(logits.dtype).tiny
        gumbel = -(-u.clamp(min=tiny, max=1 - torch.finfo(logits.dtype).eps).log()).log()
        return (logits + gumbel).argmax(dim=-1)


class MaxRing(Semiring):
    """The max-product (Viterbi) semiring :math:`(\\max, +, -\\infty, 0)`.

    Its backward step (``choose``) is ``argmax``, so running a plan backward gives a MAP assignment.
    Among tied maxima the first index wins.
    """

    name: RingName = "max"

    def pair(self, a: torch.Tensor, b: torch.Tensor, spec: PairLayout) -> torch.Tensor:
        joint = a.reshape(spec.view_a) + b.reshape(spec.view_b)
        return joint.amax(dim=spec.red_union) if spec.red_union else joint

    def reduce(self, x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        return x.amax(dim=dims) if dims else x

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a.unsqueeze(-1) + b.unsqueeze(-3)).amax(dim=-2)

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(dim=-1)


LOG = LogRing()
MAX = MaxRing()


def get_ring(name: str) -> Semiring:
    """Return the ring called ``name`` (``"log"`` or ``"max"``).

    :raises GraphError: for any other name (a :class:`ValueError`).
    """
    if name == "log":
        return LOG
    if name == "max":
        return MAX
    raise GraphError(f"unknown ring {name!r}; use 'log' (sum-product) or 'max' (max-product)")
