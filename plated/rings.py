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

Exactness when operands peak apart: a contraction of two operands shifts each by its *own* max
over the eliminated dims, then multiplies the exponentials. When the two peak at different
positions every product may be tiny, and the sum underflows (to 0, or to a subnormal number that
has lost its precision) although the true value is finite: ``[0, -800]`` against ``[-800, 0]``
is ``-800 + log 2``, not ``-inf``. Each such contraction checks the smallest entry of its result
(one reduction and, for the branch, one host-device sync per step). An entry under
``tiny / eps`` of the dtype (``1e-292`` in float64, ``1e-31`` in float32), and not a true zero, is
*repaired*: recomputed from the broadcast sum of its operands' slices, shifted by its own joint
max (:func:`repair_entries`). Above that threshold the underflowed terms of the sum add at most
``tiny`` each, a relative error no larger than the sum's own rounding, so ordinary inputs keep
the fast path and hard ones stay exact. The repair costs, per repaired entry, the size of the
eliminated dims, in chunks of at most :data:`REPAIR_CHUNK` elements, each recomputed in the
backward pass rather than kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from .errors import GraphError
from .plan.ir import PairLayout
from .typing import RingName

__all__ = ["RingName", "Semiring", "LogRing", "MaxRing", "get_ring", "safe_log", "finite_shift",
           "repair_entries", "finite_indicator", "smallest_entry",
           "REPAIR_CHUNK"]

#: Elements of broadcast sum one chunk of a repair holds (see :func:`repair_entries`).
REPAIR_CHUNK = 2**20

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


def underflow_threshold(dtype: torch.dtype) -> float:
    """The smallest shifted sum a contraction trusts: ``tiny / eps`` of ``dtype`` (see the module
    docstring); an entry under it is recomputed by :func:`repair_entries`."""
    info = torch.finfo(dtype)
    return info.tiny / info.eps


def smallest_entry(raw: torch.Tensor) -> float:
    """The smallest entry of a shifted sum of products (``inf`` when it is empty): the one
    scalar each log-space contraction reads to decide whether to repair (a host-device sync on an
    accelerator). Tests that check a plan runs without syncs replace this function."""
    return float(raw.amin()) if raw.numel() else math.inf


def finite_indicator(x: torch.Tensor) -> torch.Tensor:
    """1 where ``x`` is finite (not a hard zero), else 0, in ``x``'s dtype (detached)."""
    return (x.detach() > -torch.inf).to(x.dtype)


def _lse_rows(joint: torch.Tensor) -> torch.Tensor:
    """``log sum exp`` of each row of ``joint`` ``(n, R)``, shifted by the row's own max: exact,
    ``-inf`` with a zero gradient for an all ``-inf`` row."""
    shift = finite_shift(joint.amax(dim=-1, keepdim=True))
    return safe_log((joint - shift).exp().sum(dim=-1)) + shift.squeeze(-1)


def _gather_rows(x: torch.Tensor, idx: torch.Tensor, kept: list[int], red: list[int]
                 ) -> torch.Tensor:
    """The slices of ``x`` (laid along the union of dims, extent 1 where it lacks one) at the
    output entries ``idx`` ``(n, len(kept))``: shape ``(n, *x's extents along red)``."""
    xp = x.permute(kept + red)
    cols = tuple(idx[:, j].clamp(max=xp.shape[j] - 1) for j in range(len(kept)))
    return xp[cols]


def _repaired_values(a: torch.Tensor, b: torch.Tensor, idx: torch.Tensor, red: tuple[int, ...]
                     ) -> torch.Tensor:
    """Exact ``log sum exp`` over ``red`` of ``a + b`` (both laid along the union of dims) at
    the output entries ``idx``, in chunks of at most :data:`REPAIR_CHUNK` elements."""
    nd = a.dim()
    red_list = [d % nd for d in red]
    kept = [d for d in range(nd) if d not in red_list]
    width = math.prod(max(a.shape[d], b.shape[d]) for d in red_list)
    rows = max(1, REPAIR_CHUNK // max(width, 1))
    grad = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)

    def chunk(part: torch.Tensor) -> torch.Tensor:
        ga = _gather_rows(a, part, kept, red_list)
        gb = _gather_rows(b, part, kept, red_list)
        return _lse_rows((ga + gb).reshape(part.shape[0], -1))

    parts = []
    for start in range(0, idx.shape[0], rows):  # chunks of repaired entries, not plate elements
        part = idx[start:start + rows]
        if grad and idx.shape[0] > rows:  # several chunks: recompute each in the backward pass
            parts.append(checkpoint(chunk, part, use_reentrant=False))
        else:
            parts.append(chunk(part))
    return torch.cat(parts)


def repair_entries(
    out: torch.Tensor,
    raw: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    red: tuple[int, ...],
    support: Callable[[], torch.Tensor],
) -> torch.Tensor:
    """Recompute exactly the entries of a log-space contraction that underflowed.

    :param out: the fast result, ``log(raw) + shifts``, over the union of dims less ``red``.
    :param raw: the shifted sum of products behind ``out`` (same shape, nonnegative).
    :param a: the first operand laid along the union of dims (extent 1 where it lacks one);
        likewise ``b``. Either may have fewer leading dims (they broadcast).
    :param red: the eliminated positions in the union.
    :param support: computes the same contraction of the operands' indicators of finiteness
        (:func:`finite_indicator`), positive where some term is finite: called only when ``raw``
        has exact zeros, to tell a true zero from an underflow.
    :return: ``out`` with every entry whose ``raw`` is under :func:`underflow_threshold`, and
        whose true value is not ``-inf``, replaced by the log of its sum computed from the
        broadcast sum shifted by its own max. Without such entries ``out`` itself (one
        reduction and one host-device sync).
    """
    raw = raw.detach()
    smallest = smallest_entry(raw)  # the one scalar read: ordinary inputs stop here
    if smallest >= underflow_threshold(raw.dtype):
        return out
    threshold = underflow_threshold(raw.dtype)
    nd = max(a.dim(), b.dim())
    a = a.reshape((1,) * (nd - a.dim()) + tuple(a.shape))
    b = b.reshape((1,) * (nd - b.dim()) + tuple(b.shape))
    suspect = raw < threshold
    if smallest == 0.0:  # an exact zero is an underflow only where some term is finite
        with torch.no_grad():
            suspect &= (raw > 0) | (support() > 0)
    idx = suspect.nonzero()
    if idx.shape[0] == 0:
        return out
    values = _repaired_values(a, b, idx, red).to(out.dtype)
    if out.dim() == 0:  # a scalar result: the one entry is repaired
        return values.reshape(())
    return out.index_put(tuple(idx.t()), values)


class _LogMatmul(torch.autograd.Function):
    r"""``C = log(exp(A) @ exp(B))`` with shifts, and a fused backward.

    With :math:`E_a = e^{A - s_a}`, :math:`E_b = e^{B - s_b}` (row maxima of ``A``, column maxima
    of ``B``) and :math:`P = E_a E_b`, the gradients are
    :math:`\partial A = E_a \odot ((G / P) E_b^\top)` and
    :math:`\partial B = E_b \odot (E_a^\top (G / P))`, with :math:`G / P := 0` where
    :math:`P = 0` (a hard zero), so no NaN appears. It returns ``C`` and (not differentiable)
    ``P``, which :func:`log_matmul` checks for underflow.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, a: torch.Tensor, b: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        sa = finite_shift(a.amax(dim=-1, keepdim=True))
        sb = finite_shift(b.amax(dim=-2, keepdim=True))
        ea = torch.sub(a, sa).exp_()  # in place on fresh temporaries: fewer large allocations
        eb = torch.sub(b, sb).exp_()
        p = torch.matmul(ea, eb)
        ctx.save_for_backward(a, b, ea, eb, p)
        ctx.mark_non_differentiable(p)
        return p.log().add_(sa).add_(sb), p

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, *grads: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        a, b, ea, eb, p = ctx.saved_tensors  # type: ignore[attr-defined]
        g = grads[0]  # the raw product is not differentiable
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
    r"""Batched :math:`\log(e^A e^B)`: the log ring's matrix product (see ``_LogMatmul``), exact
    where the shifted product underflows (:func:`repair_entries`)."""
    out, raw = _LogMatmul.apply(a, b)
    return repair_entries(out, raw, a.unsqueeze(-1), b.unsqueeze(-3), (-2,),
                          lambda: torch.matmul(finite_indicator(a), finite_indicator(b)))


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

    def choose(self, logits: torch.Tensor, num_samples: int | None = None) -> torch.Tensor:
        """Pick an index per batch element from logits ``(S, *batch, K)``; with
        ``num_samples`` the logits may instead be ``(1, *batch, K)``, shared by the ``S`` samples
        (and are not copied ``S`` times). Returns ``(S, *batch)``."""
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
        # exps in place on fresh temporaries: one allocation per operand
        raw = torch.einsum(spec.equation, torch.sub(a, sa).exp_(), torch.sub(b, sb).exp_())
        out = safe_log(raw).add_(sa.reshape(spec.shift_a)).add_(sb.reshape(spec.shift_b))
        return repair_entries(out, raw, a.reshape(spec.view_a), b.reshape(spec.view_b),
                              spec.red_union,
                              lambda: torch.einsum(spec.equation, finite_indicator(a),
                                                   finite_indicator(b)))

    def reduce(self, x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        if not dims:
            return x
        s = finite_shift(x.amax(dim=dims, keepdim=True))
        return safe_log(torch.sub(x, s).exp_().sum(dim=dims)).add_(s.squeeze(dims))

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return log_matmul(a, b)

    def choose(self, logits: torch.Tensor, num_samples: int | None = None) -> torch.Tensor:
        if num_samples is not None and logits.shape[0] != num_samples:
            return self._draw(logits, num_samples)
        # Gumbel noise -log(-log u), in place on one logits-sized tensor
        noise = torch.rand(logits.shape, dtype=logits.dtype, device=logits.device,
                           generator=self.generator)
        info = torch.finfo(logits.dtype)
        noise.clamp_(min=info.tiny, max=1 - info.eps).log_().neg_().log_().neg_()
        return noise.add_(logits).argmax(dim=-1)

    def _draw(self, logits: torch.Tensor, num_samples: int) -> torch.Tensor:
        """``num_samples`` draws from logits ``(1, *batch, K)`` shared by every sample, without
        materialising ``num_samples`` copies of them: ``(num_samples, *batch)``."""
        batch, k = logits.shape[1:-1], logits.shape[-1]
        if k > _MULTINOMIAL_MAX_CATEGORIES:  # torch.multinomial's limit: Gumbel-max on copies
            return self.choose(logits.expand((num_samples,) + tuple(logits.shape[1:])))
        rows = logits.reshape(-1, k)
        weights = (rows - finite_shift(rows.amax(dim=-1, keepdim=True))).exp_()
        # a row of zero weight (log Z = -inf) draws index 0, as Gumbel-max would
        weights[:, :1] += weights.sum(dim=-1, keepdim=True) == 0
        draws = torch.multinomial(weights, num_samples, replacement=True,
                                  generator=self.generator)
        return draws.t().reshape((num_samples,) + tuple(batch))


class MaxRing(Semiring):
    """The max-product (Viterbi) semiring :math:`(\\max, +, -\\infty, 0)`.

    Its backward step (``choose``) is ``argmax``, so running a plan backward gives a MAP assignment.
    Among tied maxima the first index wins.
    """

    name: RingName = "max"

    def pair(self, a: torch.Tensor, b: torch.Tensor, spec: PairLayout) -> torch.Tensor:
        # eliminate the dims private to one operand first (as the sum ring's einsum does), so
        # the broadcast sum spans only the dims the two share or keep
        ja, jb = a.reshape(spec.view_a), b.reshape(spec.view_b)
        own_a = tuple(u for u in spec.red_union if spec.view_b[u] == 1 and spec.view_a[u] > 1)
        own_b = tuple(u for u in spec.red_union if spec.view_a[u] == 1 and spec.view_b[u] > 1)
        if own_a:
            ja = ja.amax(dim=own_a, keepdim=True)
        if own_b:
            jb = jb.amax(dim=own_b, keepdim=True)
        joint = ja + jb
        return joint.amax(dim=spec.red_union) if spec.red_union else joint

    def reduce(self, x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        return x.amax(dim=dims) if dims else x

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a.unsqueeze(-1) + b.unsqueeze(-3)).amax(dim=-2)

    def choose(self, logits: torch.Tensor, num_samples: int | None = None) -> torch.Tensor:
        best = logits.argmax(dim=-1)
        if num_samples is not None and best.shape[0] != num_samples:
            best = best.expand((num_samples,) + tuple(best.shape[1:]))
        return best


#: the most categories :func:`torch.multinomial` draws from
_MULTINOMIAL_MAX_CATEGORIES = 2**24


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
