r"""Chains by sequential recursion: a fused forward-backward that is its own autograd function.

A chain of transition log-matrices :math:`M_0, \dots, M_{n-1}` (batched, ``(batch, n, K, K)``,
each :math:`M_t[x_{t-1}, x_t]`) is eliminated from the right by the backward recursion

.. math::

    \beta_n = 0, \qquad \beta_t[i] = \log \sum_j \exp(M_t[i, j] + \beta_{t+1}[j]),

whose :math:`\beta_0` is the chain's result, a factor of the state before it. That is
:math:`K^2` work a step where the parallel scan (:mod:`plated.markov`) does :math:`K^3`, in
:math:`n` dependent steps instead of :math:`\log_2 n`; the blocked recursion
(:class:`_BlockedChain`) runs it within blocks of about :math:`\sqrt n` steps side by side, in
about :math:`2 \sqrt n` dependent steps of :math:`K^3` work. The plan chooses among the three by
its cost model (:func:`plated.plan.chains.chain_method`).

**Forward, exactly.** Each step exponentiates its matrix shifted by the matrix's max,
:math:`e^{M_t - r_t}`, and multiplies it by the vector :math:`e^{\beta_{t+1} - s}` shifted by
its own max, and takes the log. A step's entry underflows only where the peak of its row and the
peak of the vector sit apart (the trap of :func:`plated.rings.repair_entries`), or where a row
lies some 80 (float32) to 700 (float64) below its matrix's peak: every shifted sum under
``tiny / eps`` of the dtype is recorded, without a host-device sync, and checked once after the
loop. The batch elements with such an entry are recomputed by the exact recursion, each entry
shifted by its own max (:func:`exact_messages`). ``-inf`` entries (hard zeros) are allowed.

**Gradient, without autograd's graph.** With :math:`T_t[i, j] = \exp(M_t[i, j] + \beta_{t+1}[j]
- \beta_t[i])`, the conditional transition of the chain given the state before it (a stochastic
matrix), the gradient of :math:`\sum_i g[i]\,\beta_0[i]` is

.. math::

    \frac{\partial}{\partial M_t[i, j]} = q_{t-1}[i]\, T_t[i, j], \qquad q_{-1} = g, \quad
    q_t = q_{t-1} T_t,

the pairwise marginals weighted by ``g``: one forward recursion of vectors (run as the
recursion of :math:`z_t = q_{t-1} / p_t`, the shifted sums' own scaling, one vector-matrix
product a step; :func:`_grad_into`), then each step's exponentials (kept from the forward pass,
where a gradient is wanted) scaled in place into its gradient, all bounded (no underflow). Where
a higher
derivative is asked for (``create_graph``), the backward pass differentiates the exact recursion
written in differentiable operations instead.

**MAP and samples.** The max ring's recursion keeps its back-pointers (Viterbi); the log ring's
backward choice draws each state given the previous one from :math:`M_t[x_{t-1}, \cdot] +
\beta_{t+1}` (forward-filter backward-sample, the filter running from the right): both walk the
chain once, left to right, given its first state (:func:`recursion_descend`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import Any

import opt_einsum
import torch

from . import _memory
from .rings import Semiring, underflow_threshold

__all__ = ["recursion_forward", "recursion_descend", "exact_messages", "chain_messages",
           "blocked_chain_messages", "block_length", "factored_chain", "factored_messages",
           "factorial_chain", "compiled_steps"]


def _shifted(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(exp(x - s), s)`` with ``s`` the max of ``x`` along ``dim`` (kept), ``-inf`` slices
    shifted by the dtype's lowest finite value so that ``-inf - s`` stays ``-inf``."""
    s = x.amax(dim=dim, keepdim=True).clamp_(min=torch.finfo(x.dtype).min)
    return torch.sub(x, s).exp_(), s


# The messages are kept *local*: d_t = beta_t - O_t with O_t = mx_{t+1} + ... + mx_n, where
# mx_u = max_i d_u[i], so that no step forms (and rounds) a large number; a message is
# d_t[i] = log sum_j exp(M_t[i, j] + d_{t+1}[j] - mx_{t+1}), and beta_0 = d_0 + sum_u mx_u.


def exact_messages(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The local backward messages of ``m`` ``(batch, n, K, K)``, every entry's sum shifted by
    its own max: exact, in differentiable operations (the reference of the fast path, its
    fallback, and the twin its higher derivatives differentiate).

    :return: ``d`` ``(n + 1, batch, K)`` and its maxima ``mx`` ``(n + 1, batch)`` (detached),
        time-major (see the comment above).
    """
    batch, n, k, _ = m.shape
    lo = torch.finfo(m.dtype).min
    d = m.new_zeros(batch, k)
    ds, mxs = [d], [m.new_zeros(batch)]
    for t in range(n - 1, -1, -1):  # the plan chose the recursion by its cost model
        mx = ds[-1].detach().amax(dim=-1).clamp(min=lo)
        joint = m[:, t] + (d - mx.unsqueeze(-1)).unsqueeze(-2)
        s = joint.detach().amax(dim=-1, keepdim=True).clamp(min=lo)
        d = (joint - s).exp().sum(dim=-1).log() + s.squeeze(-1)
        ds.append(d)
        mxs[-1] = mx
        mxs.append(m.new_zeros(batch))
    mxs[-1] = d.detach().amax(dim=-1).clamp(min=lo)
    return torch.stack(ds[::-1]), torch.stack(mxs[::-1])


def _fast_messages(steps: torch.Tensor | Sequence[torch.Tensor],
                   e: torch.Tensor | Sequence[torch.Tensor] | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward messages of the chain ``steps`` (time-major: a tensor ``(n, batch, K, K)``,
    or ``n`` tensors ``(batch, K, K)``) by shifted linear products: each step's matrix max ``r``
    ``(n, batch, 1, 1)``; every message's exponential ``v`` ``(n + 1, batch, K, 1)``, shifted to
    a max of 1, and the max ``top`` ``(n, batch, 1, 1)`` it was divided by, so that step ``t``'s
    shifted sums are ``p_t = v_t top_t`` and its local message (see :func:`exact_messages`) is
    ``d_t = log v_t + mx_t`` with ``mx_t = log top_t + r_t``; those maxima ``mx`` ``(n + 1,
    batch)``; and a ``(batch,)`` flag of the batch elements where some shifted sum fell under
    the underflow threshold, or is NaN (:func:`_flagged`; no host-device sync). Each step
    exponentiates its own matrix while it is in cache, into ``e[t]`` (kept for the gradient) or,
    with ``e`` ``None``, into one scratch buffer.

    A matrix is shifted by its own max, not row by row (a reduction over a short last dim costs
    as much as the exponentials): a row far below its matrix's peak keeps its relative precision
    in the floating-point sum, down to the underflow threshold, where its batch element is
    flagged for the exact recursion like any other.

    With both ``steps`` and ``e`` one tensor, every matrix's max and exponential are taken in
    two passes over the whole chain before the loop, which then runs three operations a step.
    The loops index the chain's tensors as they go rather than hold a view of every step: ``n``
    live views would each be tracked by Python's garbage collector, whose collections would
    then cost more than the views."""
    n = len(steps)
    x = steps[0]
    batch, k, _ = x.shape
    lo = torch.finfo(x.dtype).min
    r = x.new_empty(n, batch, 1, 1)
    top = x.new_empty(n, batch, 1, 1)
    v = x.new_empty(n + 1, batch, k, 1)
    v[n] = 1.0
    v_next = v[n]
    if isinstance(e, torch.Tensor) and isinstance(steps, torch.Tensor):
        torch.amax(steps, dim=(-2, -1), keepdim=True, out=r).clamp_(min=lo)
        torch.sub(steps, r, out=e).exp_()
        light = _step("forward_exp", _forward_step_exp)
        for t in range(n - 1, -1, -1):  # the plan chose the recursion by its cost model
            vt = v[t]
            light(e[t], v_next, top[t], vt)
            v_next = vt
    else:
        scratch = x.new_empty(batch, k, k) if e is None else None
        step = _step("forward", _forward_step)
        for t in range(n - 1, -1, -1):  # the plan chose the recursion by its cost model
            vt = v[t]
            step(steps[t], v_next, scratch if e is None else e[t], r[t], top[t], vt)
            v_next = vt
    mx = x.new_zeros(n + 1, batch)
    torch.add(top.view(n, batch).log(), r.view(n, batch), out=mx[:n])
    p = v[:n].view(n, batch, k) * top.view(n, batch, 1)
    suspect = _flagged(p.amin(dim=0).amin(dim=-1), x.dtype)
    return r, v, top, mx, suspect


def _flagged(smallest: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Where the smallest shifted sum ``smallest`` fell under the underflow threshold of
    ``dtype``, or is NaN: a step whose sums were all 0 (an impossible batch element) divides 0
    by 0 rather than pay a clamp every step, and the NaN it leaves flags the element."""
    return ~(smallest >= underflow_threshold(dtype))


def _plus_offsets(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``x`` ``(batch, K)`` plus the sum of ``offsets`` ``(n, batch)``, summed in float64."""
    offset = offsets.sum(dim=0, dtype=torch.float64)
    return (x.double() + offset.unsqueeze(-1)).to(x.dtype)


def _beta0(d: torch.Tensor, mx: torch.Tensor) -> torch.Tensor:
    """``beta_0 = d_0 + mx_1 + ... + mx_n``, the offsets summed in float64."""
    return _plus_offsets(d[0], mx[1:])


#: The dtype the exact recursion of flagged batch elements runs in, for each factor dtype: its
#: messages are differences of large log values, which float32 and bfloat16 would round.
_EXACT_DTYPE = {torch.float32: torch.float64, torch.bfloat16: torch.float64,
                torch.float16: torch.float64}


def _needs(ctx: torch.autograd.function.FunctionCtx) -> tuple[bool, ...]:
    """Which inputs of an autograd function want a gradient."""
    return ctx.needs_input_grad  # type: ignore[attr-defined]


def _chain_forward(ctx: torch.autograd.function.FunctionCtx, given: Sequence[torch.Tensor],
                   steps: torch.Tensor | Sequence[torch.Tensor],
                   e: torch.Tensor | Sequence[torch.Tensor] | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward of :class:`_ChainMessages` and :class:`_ChainSteps` on the detached
    ``steps`` (time-major, as :func:`_fast_messages` takes them): each ``e[t]`` ``(batch, K,
    K)`` receives its step's shifted exponential (where a gradient is wanted) and becomes the
    step's gradient in place (:func:`_grad_into`); the inputs ``given`` are saved first.

    ``beta_0 = d_0 + mx_1 + ... + mx_n = log v_0 + mx_0 + ... + mx_{n-1}``, the offsets summed
    in float64, and the messages shifted to a max of 0 are ``log v``, taken from the linear
    quantities rather than as differences of large local messages."""
    r, v, top, mx, suspect = _fast_messages(steps, e)
    w = v.squeeze(-1).log()  # every message shifted to a max of 0 (for sampling)
    beta0 = _plus_offsets(w[0], mx)
    idx = suspect.nonzero().squeeze(-1)
    exact: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    if idx.numel():
        wide = _EXACT_DTYPE.get(beta0.dtype, beta0.dtype)
        if isinstance(steps, torch.Tensor):
            m = steps[:, idx].transpose(0, 1).to(wide)
        else:
            m = torch.stack([s[idx] for s in steps], dim=1).to(wide)
        de, mxe = exact_messages(m)
        exact = (m, de, mxe)
        w[:, idx] = (de - mxe.unsqueeze(-1)).to(w.dtype)
        beta0[idx] = _beta0(de, mxe).to(beta0.dtype)
    ctx.exact = exact  # type: ignore[attr-defined]
    ctx.e = e  # type: ignore[attr-defined]  # not saved: the backward overwrites them
    ctx.save_for_backward(*given, r, v, top, idx)
    ctx.mark_non_differentiable(w)
    return beta0, w


def _chain_backward(ctx: torch.autograd.function.FunctionCtx,
                    steps: torch.Tensor | Sequence[torch.Tensor], g: torch.Tensor,
                    out: torch.Tensor | None = None) -> torch.Tensor | Sequence[torch.Tensor]:
    """The gradient of :func:`_chain_forward`'s ``beta0`` (weights ``g`` ``(batch, K)``) with
    respect to every step: ``out`` ``(n, batch, K, K)`` where it is given (the chain's buffer;
    with ``steps`` one tensor), or one ``(batch, K, K)`` tensor a step. A second backward pass
    (``retain_graph``) recomputes the exponentials the first consumed."""
    r, v, top, idx = ctx.saved_tensors[-4:]  # type: ignore[attr-defined]
    e = ctx.e  # type: ignore[attr-defined]
    ctx.e = None  # type: ignore[attr-defined]  # consumed: a second backward recomputes them
    if e is None:
        if out is not None and isinstance(steps, torch.Tensor):
            e = torch.sub(steps, r, out=out).exp_()
        else:
            e = [torch.sub(s.detach(), r[t]).exp_() for t, s in enumerate(steps)]
    grad = _grad_into(e, v, top, g)
    exact = ctx.exact  # type: ignore[attr-defined]
    if exact is not None:  # the flagged elements, from their exact messages
        tr = _log_transitions(*exact)
        fix = _weighted(tr, g[idx].to(tr.dtype)).to(g.dtype)
        if isinstance(grad, torch.Tensor):
            grad[:, idx] = fix.transpose(0, 1)
        else:
            for t, gt in enumerate(grad):
                gt[idx] = fix[:, t]
    return grad


class _ChainMessages(torch.autograd.Function):
    r"""``m`` ``(batch, n, K, K)`` to ``beta_0`` ``(batch, K)`` and the local messages shifted to
    a max of 0 (time-major ``(n + 1, batch, K)``, not differentiable), with the fused backward
    of the module docstring.

    The fast path's flagged batch elements (one host-device sync) are recomputed by the exact
    recursion, in float64 for lower-precision factors; their gradient is computed from those
    messages, everyone else's from the fast path's linear quantities, in which each conditional
    transition :math:`T_t[i, j] = e^{M_t[i, j] - r_t}\, v_{t+1}[j] / p_t[i]` has the relative
    rounding error of a few products. The exponentials :math:`e^{M_t - r_t}` are kept from the
    forward pass and turned into the gradient in place: the gradient costs no chain-sized
    tensor of its own.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, m: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        x = m.detach()
        buf = (_memory.empty((x.shape[1], x.shape[0], *x.shape[2:]), x) if _needs(ctx)[0]
               else None)
        ctx.buf = buf  # type: ignore[attr-defined]
        return _chain_forward(ctx, (m,), x.transpose(0, 1), buf)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, *grads: torch.Tensor) -> torch.Tensor:
        m = ctx.saved_tensors[0]  # type: ignore[attr-defined]
        if torch.is_grad_enabled():  # a higher derivative: differentiate the exact twin
            with torch.enable_grad():
                (gm,) = torch.autograd.grad(_beta0(*exact_messages(m)), (m,), grads[0],
                                            create_graph=True)
            return gm
        buf = ctx.buf  # type: ignore[attr-defined]
        ctx.buf = None  # type: ignore[attr-defined]
        if buf is None:
            buf = _memory.empty((m.shape[1], m.shape[0], *m.shape[2:]), m)
        _chain_backward(ctx, m.detach().transpose(0, 1), grads[0], buf)
        return buf.transpose(0, 1)


class _ChainSteps(torch.autograd.Function):
    """:class:`_ChainMessages` on the chain's steps as separate tensors, each ``(batch, K, K)``
    (a chain of variables, one factor a step): nothing is stacked, and each step's gradient is
    its own kept exponential (one allocation a step, which the allocator reuses from call to
    call, where one chain-sized buffer may be mapped afresh each time)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, *steps: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        xs = [s.detach() for s in steps]
        e = [x.new_empty(x.shape) for x in xs] if any(_needs(ctx)) else None
        return _chain_forward(ctx, steps, xs, e)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, *grads: torch.Tensor
                 ) -> tuple[torch.Tensor | None, ...]:
        steps = ctx.saved_tensors[:-4]  # type: ignore[attr-defined]
        if torch.is_grad_enabled():  # a higher derivative: differentiate the exact twin
            wanted = [s for s, need in zip(steps, _needs(ctx), strict=True) if need]
            with torch.enable_grad():
                m = torch.stack(steps, dim=1)
                got = iter(torch.autograd.grad(_beta0(*exact_messages(m)), wanted, grads[0],
                                               create_graph=True))
            return tuple(next(got) if need else None for need in _needs(ctx))
        return tuple(_chain_backward(ctx, steps, grads[0]))


def _grad_into(e: torch.Tensor | Sequence[torch.Tensor], v: torch.Tensor, top: torch.Tensor,
               g: torch.Tensor) -> torch.Tensor | Sequence[torch.Tensor]:
    r"""The gradient ``q_{t-1}[i] T_t[i, j]``, with ``T_t[i, j] = e_t[i, j]\, v_{t+1}[j] /
    p_t[i]``, ``e`` the steps' shifted exponentials (one tensor ``(n, batch, K, K)`` or ``n``
    tensors ``(batch, K, K)``; overwritten and returned) and ``v``, ``top`` (``p_t = v_t
    top_t``) as :func:`_fast_messages` gives them.

    With :math:`z_t = q_{t-1} / p_t` the gradient is :math:`z_t[i]\, e_t[i, j]\, v_{t+1}[j]`,
    whose column sums are :math:`q_t`, so that, as :math:`v_{t+1} = p_{t+1} / top_{t+1}`,

    .. math::

        z_0 = g / p_0, \qquad z_{t+1} = (z_t\, e_t) / top_{t+1}:

    one vector-matrix product and one scaling a step (the backward pass of a scaled
    forward-backward), and the gradient formed after the loop, in two passes over the chain.
    That is for narrow steps, whose loop is bound by its launches; a step of
    :data:`_WIDE_STEP_BYTES` or more (or steps given as separate tensors) is scaled into its
    gradient in the loop, while it is in cache, and :math:`z_{t+1} = q_t / p_{t+1}` taken from
    its column sums. Every shifted sum of a batch element the fast path keeps is at least
    the underflow threshold, so nothing here divides by 0; a flagged element's entries, whatever
    they are, are overwritten from its exact messages."""
    n = len(e)
    batch, k = g.shape
    z = g.new_empty(n, batch, 1, k)  # z_t, time-major
    torch.div(g, v[0].view(batch, k) * top[0].view(batch, 1), out=z[0].view(batch, k))
    z_t = z[0]
    if isinstance(e, torch.Tensor) and e[0].numel() * e.element_size() < _WIDE_STEP_BYTES:
        # narrow steps (the loop is bound by its launches): one product a step, and the
        # gradient formed after the loop, in two passes over the chain
        step = _step("backward", _backward_step)
        for t in range(n - 1):  # the plan chose the recursion by its cost model
            z_next = z[t + 1]
            step(z_t, e[t], top[t + 1], z_next)
            z_t = z_next
        e.mul_(z.transpose(-2, -1)).mul_(v[1:].transpose(-2, -1))
        return e
    # wide steps: each step's exponentials scaled into its gradient while they are in cache,
    # and z_{t+1} = q_t / p_t+1 from its column sums q_t (a reduction is cheaper than a wide
    # batch of vector-matrix products)
    p = v[1:n].transpose(-2, -1) * top[1:]  # (n - 1, batch, 1, K)
    for t in range(n):  # the plan chose the recursion by its cost model
        et = e[t]
        et.mul_(z_t.transpose(-2, -1)).mul_(v[t + 1].transpose(-2, -1))
        if t < n - 1:
            z_next = z[t + 1]
            torch.sum(et, dim=-2, keepdim=True, out=z_next).div_(p[t])
            z_t = z_next
    return e


#: A step of at least this many bytes of exponentials (``batch K K``) is scaled into its
#: gradient inside the backward loop, while it is in cache; smaller steps after the loop.
_WIDE_STEP_BYTES = 64 * 1024


def _forward_step(m: torch.Tensor, v_next: torch.Tensor, e: torch.Tensor, r: torch.Tensor,
                  top: torch.Tensor, v: torch.Tensor) -> None:
    """One step of :func:`_fast_messages`: the matrix ``m`` ``(batch, K, K)`` shifted by its
    max ``r`` ``(batch, 1, 1)`` and exponentiated into ``e``, then :func:`_forward_step_exp`;
    every output written in place."""
    torch.amax(m, dim=(-2, -1), keepdim=True, out=r).clamp_(min=torch.finfo(m.dtype).min)
    torch.sub(m, r, out=e).exp_()
    _forward_step_exp(e, v_next, top, v)


def _forward_step_exp(e: torch.Tensor, v_next: torch.Tensor, top: torch.Tensor, v: torch.Tensor
                      ) -> None:
    """A step of :func:`_fast_messages` with the matrix's exponential ``e`` ``(batch, K, K)``
    taken: its product with the next message's shifted exponential ``v_next`` ``(batch, K,
    1)``, the product's max ``top`` ``(batch, 1, 1)``, and this message's shifted exponential,
    the product divided by ``top``, in ``v`` ``(batch, K, 1)``; in place. A product of zeros
    divides 0 by 0: the NaN flags its batch element (:func:`_flagged`), which costs no clamp a
    step."""
    torch.bmm(e, v_next, out=v)
    torch.amax(v, dim=-2, keepdim=True, out=top)
    torch.div(v, top, out=v)


def _backward_step(z: torch.Tensor, e: torch.Tensor, top: torch.Tensor, z_next: torch.Tensor
                   ) -> None:
    """One step of :func:`_grad_into`: ``z_next = (z e) / top``, with ``z`` and ``z_next``
    ``(batch, 1, K)``, ``e`` ``(batch, K, K)`` and ``top`` ``(batch, 1, 1)``, in place."""
    torch.bmm(z, e, out=z_next).div_(top)


_COMPILE: list[bool] = [False]
_COMPILED: dict[str, Any] = {}


@contextlib.contextmanager
def compiled_steps(enabled: bool = True) -> Iterator[None]:
    """Run the recursion's steps (forward and gradient) through :func:`torch.compile` inside
    the block: each step's handful of operations becomes one or two fused kernels, compiled
    once per shape of a step (``(batch, K, K)``), whatever the chain's length. Off by default:
    the first call of each shape pays the compilation (seconds), which pays off over many
    calls of the same shapes, as in training. ``benchmarks/compile.py`` measures it."""
    _COMPILE.append(enabled)
    try:
        yield
    finally:
        _COMPILE.pop()


def _step(name: str, fn: Any) -> Any:
    """``fn``, or its compiled twin inside :func:`compiled_steps`."""
    if not _COMPILE[-1]:
        return fn
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=False)
    return _COMPILED[name]


def _log_transitions(m: torch.Tensor, d: torch.Tensor, mx: torch.Tensor) -> torch.Tensor:
    """``T_t[i, j] = exp(M_t[i, j] + d_{t+1}[j] - mx_{t+1} - d_t[i])`` from the local messages
    (an impossible row is all 0)."""
    lo = torch.finfo(m.dtype).min
    dt = d.transpose(0, 1)  # (batch, n + 1, K)
    tr = torch.add(m, (dt[:, 1:] - mx[1:].t().unsqueeze(-1)).unsqueeze(-2))
    return tr.sub_(dt[:, :-1].clamp(min=lo).unsqueeze(-1)).exp_()


def _weighted(tr: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The gradient ``q_{t-1}[i] T_t[i, j]`` (in place in ``tr``), with ``q_{-1} = g`` and
    ``q_t = q_{t-1} T_t``."""
    n = tr.shape[1]
    q = tr.new_empty(n, g.shape[0], 1, g.shape[-1])  # q_{t-1}, time-major
    q[0, :, 0] = g
    for t in range(n - 1):  # the plan chose the recursion by its cost model
        torch.bmm(q[t], tr[:, t], out=q[t + 1])
    return tr.mul_(q.squeeze(-2).transpose(0, 1).unsqueeze(-1))


def chain_messages(m: torch.Tensor | Sequence[torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The log ring's exact backward messages of the chain ``m``, one tensor ``(batch, n, K,
    K)`` or its ``n`` steps ``(batch, K, K)`` as separate tensors: ``beta_0`` ``(batch, K)``,
    differentiable (see the module docstring), and every message shifted to a max of 0,
    ``(batch, n + 1, K)`` (not differentiable; for the backward choice)."""
    if isinstance(m, torch.Tensor):
        beta0, w = _ChainMessages.apply(m)
    else:
        beta0, w = _ChainSteps.apply(*m)
    return beta0, w.transpose(0, 1)


def recursion_forward(ring: Semiring, m: torch.Tensor | Sequence[torch.Tensor],
                      blocked: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    r"""Eliminate the chain ``m`` ``(batch, n, K, K)``, or its ``n`` steps ``(batch, K, K)`` as
    separate tensors, by recursion in ``ring`` (``blocked``: by :class:`_BlockedChain`, in
    blocks of :func:`block_length`; the log ring only).

    :return: :math:`\beta_0` ``(batch, K)`` (the result, a factor of the state before the
        chain), every message ``(batch, n + 1, K)`` up to a constant per step (for the backward
        choice), and the max ring's back-pointers ``(batch, n, K)`` (``None`` for the log ring).
    """
    if ring.name == "log":
        beta0, beta = blocked_chain_messages(m) if blocked else chain_messages(m)
        return beta0, beta, None
    if blocked:
        raise ValueError(f"the blocked recursion is for the log ring; not {ring.name!r}")
    tensors = [m] if isinstance(m, torch.Tensor) else list(m)
    if not (torch.is_grad_enabled() and any(x.requires_grad for x in tensors)):
        return _max_recursion(m)
    # one view each (a select per step would each take a full gradient)
    steps = m.unbind(1) if isinstance(m, torch.Tensor) else m
    n = len(steps)
    batch, k, _ = steps[0].shape
    b = steps[0].new_zeros(batch, k)
    betas = [b]
    pointers = []
    for t in range(n - 1, -1, -1):  # the plan chose the recursion by its cost model
        b, arg = (steps[t] + b.unsqueeze(-2)).max(dim=-1)
        betas.append(b)
        pointers.append(arg)
    return b, torch.stack(betas[::-1], dim=1), torch.stack(pointers[::-1], dim=1)


def _max_recursion(m: torch.Tensor | Sequence[torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The max ring's recursion of :func:`recursion_forward` where no gradient is wanted: every
    message and back-pointer written into one time-major buffer each, so that no step's result
    stays alive as a tensor of its own (``n`` of them would each be tracked by Python's garbage
    collector, whose collections then cost a third of a long chain's time)."""
    steps = m.transpose(0, 1) if isinstance(m, torch.Tensor) else m
    n = len(steps)
    batch, k, _ = steps[0].shape
    betas = steps[0].new_empty(n + 1, batch, k)
    pointers = torch.empty(n, batch, k, dtype=torch.long, device=betas.device)
    betas[n] = 0.0
    for t in range(n - 1, -1, -1):  # the plan chose the recursion by its cost model
        torch.max(steps[t] + betas[t + 1].unsqueeze(-2), dim=-1, out=(betas[t], pointers[t]))
    return betas[0], betas.transpose(0, 1), pointers.transpose(0, 1)


def recursion_descend(ring: Semiring, m: torch.Tensor | Sequence[torch.Tensor],
                      beta: torch.Tensor,
                      pointers: torch.Tensor | None, b: torch.Tensor, first: torch.Tensor
                      ) -> torch.Tensor:
    """Choose every later state of chains given their first states.

    :param m: the transitions ``(batch, n, K, K)`` (or their steps, as for
        :func:`recursion_forward`); ``beta`` their messages and ``pointers``
        their back-pointers (max ring), from :func:`recursion_forward`.
    :param b: batch index of each chain, ``(S, P)``.
    :param first: the state before the first transition, ``(S, P)``.
    :return: all ``n + 1`` states, ``(S, P, n + 1)``.
    """
    steps = m.transpose(0, 1) if isinstance(m, torch.Tensor) else m
    n = len(steps)
    states = first.new_empty(n + 1, *first.shape)  # time-major: no live tensor a step
    states[0] = first
    x = first
    for t in range(n):  # the plan chose the recursion by its cost model
        if pointers is not None:
            x = pointers[b, t, x]
        else:
            x = ring.choose(steps[t][b, x] + beta[b, t + 1])
        states[t + 1] = x
    return states.movedim(0, -1).contiguous()


# -- blocked: the recursion within blocks, the blocks side by side -----------------------------


def block_length(length: int, state: int) -> int:
    """The block length :class:`_BlockedChain` uses for a chain of ``length`` steps: about
    :math:`\\sqrt{4 n / 11}`, which balances its two kinds of dependent step (eleven tensor
    operations for each position within a block, all blocks at once; four for each block, one
    block after another); at least 2. ``state`` is for the signature of a cost model that may
    weigh the products' size."""
    del state
    return max(2, round(math.sqrt(4 * length / 11)))


def _block_views(x: torch.Tensor, blocked: torch.Tensor, pad: int
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The pairs (a view of ``x`` ``(batch, n, ...)``, the same entries of ``blocked`` ``(L,
    batch, B, ...)``, position within the block first) that together cover the chain: block 0's
    last ``L - pad`` positions (its first ``pad`` are the identity matrices that round the
    chain up to whole blocks), and the other blocks."""
    length, batch, nb = blocked.shape[:3]
    rest = x.shape[2:]
    pairs = [(x[:, :length - pad].transpose(0, 1), blocked[pad:, :, 0])]
    if nb > 1:
        body = x[:, length - pad:].reshape(batch, nb - 1, length, *rest)
        pairs.append((body.permute(2, 0, 1, *range(3, 3 + len(rest))), blocked[:, :, 1:]))
    return pairs


def _blocked_exps(x: torch.Tensor, r: torch.Tensor, length: int) -> torch.Tensor:
    """Every matrix of ``x`` ``(batch, n, K, K)`` shifted by its max ``r`` ``(batch, n, 1, 1)``
    and exponentiated, laid out ``(L, batch, B, K, K)`` (:func:`_block_views`) after the
    ``pad`` identity matrices that round the chain up to ``B`` whole blocks of ``length``: one
    position of every block is one contiguous batch of matrices."""
    batch, n, k, _ = x.shape
    pad = -n % length
    e = _memory.empty((length, batch, (pad + n) // length, k, k), x)
    if pad:
        e[:pad, :, 0] = torch.eye(k, dtype=x.dtype, device=x.device)
    for (xs, es), (rs, _) in zip(_block_views(x, e, pad), _block_views(r, e, pad), strict=True):
        torch.sub(xs, rs, out=es).exp_()
    return e


class _BlockedChain(torch.autograd.Function):
    r""":class:`_ChainMessages` by blocks: the chain, rounded up with identity matrices at its
    start, split into ``B`` blocks of ``L`` consecutive steps, and every dependent step run on
    all blocks at once.

    **Forward.** (1) Each block's product :math:`P_b = E_{s_b} \cdots E_{s_b + L - 1}` of the
    shifted exponentials, all blocks at once, each product rescaled to a max of 1 after each of
    its ``L - 1`` matrix products; (2) the backward recursion across the blocks, :math:`v_{s_b}
    \propto P_b\, v_{s_{b + 1}}`, one block after another (``B`` steps); (3) within every block
    at once, the recursion of :func:`_fast_messages` from the block's end vector (``L`` steps),
    which gives every step's shifted sum and message. A product loses relative precision only
    where its entries underflow, so each block's first message from (3) is checked against the
    one (2) gave the block before it: a batch element where one entry differs by more than
    :math:`L K \epsilon` (relative), or where a shifted sum of (3) fell under the underflow
    threshold, is recomputed by the exact recursion, as in :class:`_ChainMessages`.

    **Gradient.** Each step's exponential becomes its conditional transition :math:`T_t` in
    place (two passes over the chain); each block's product :math:`Q_b = T_{s_b} \cdots T_{s_b +
    L - 1}` (stochastic: no rescaling) carries :math:`q` across the blocks, :math:`q_{s_b + L -
    1} = q_{s_b - 1} Q_b`; then within every block at once :math:`q_{t-1}[i]\, T_t[i, j]`
    overwrites :math:`T_t`, and is copied into the gradient, in the chain's ``(batch, n, K, K)``
    layout. The exponentials are laid out position first, ``(L, batch, B, K, K)``
    (:func:`_blocked_exps`), so that one position of every block is one contiguous batch of
    matrices (strided batches cost more in the products than the layout's two copies). Products
    of matrices cost :math:`K` times the recursion's work; the plan chooses this method where
    its fewer dependent steps pay for that (a long chain with a small batch,
    :func:`~plated.plan.chains.chain_times`). A second backward pass (``retain_graph``)
    recomputes the exponentials; a higher derivative differentiates the exact twin.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, m: torch.Tensor, length: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        x = m.detach()
        batch, n, k, _ = x.shape
        pad = -n % length
        nb = (pad + n) // length
        bb = batch * nb
        lo = torch.finfo(x.dtype).min
        tiny = torch.finfo(x.dtype).tiny
        r = x.amax(dim=(-2, -1), keepdim=True).clamp_(min=lo)  # (batch, n, 1, 1)
        e = _blocked_exps(x, r, length)
        flat = e.view(length, bb, k, k)  # flat[j]: position j of every block
        # (1) every block's product, rescaled to a max of 1 after each matrix product
        w, w2 = flat[length - 1].clone(), x.new_empty(bb, k, k)
        s = x.new_empty(bb, 1, 1)
        for j in range(length - 2, -1, -1):  # the plan chose the blocked recursion by cost
            torch.bmm(flat[j], w, out=w2)
            torch.amax(w2, dim=(-2, -1), keepdim=True, out=s).clamp_(min=tiny)
            torch.div(w2, s, out=w)
        prods = w.view(batch, nb, k, k)
        # (2) across the blocks: each block's end vector
        vs = x.new_empty(nb + 1, batch, k)
        vs[nb] = 1.0
        ta = x.new_empty(batch, 1, 1)
        for b in range(nb - 1, 0, -1):  # the plan chose the blocked recursion by cost
            _forward_step_exp(prods[:, b], vs[b + 1].unsqueeze(-1), ta, vs[b].unsqueeze(-1))
        # (3) within every block at once, from its end vector
        vb = x.new_empty(length + 1, batch, nb, k)
        vb[length] = vs[1:].transpose(0, 1)
        tb = x.new_empty(length, batch, nb, 1, 1)
        for j in range(length - 1, -1, -1):  # the plan chose the blocked recursion by cost
            _forward_step_exp(flat[j], vb[j + 1].view(bb, k, 1), tb[j].view(bb, 1, 1),
                              vb[j].view(bb, k, 1))
        pb = vb[:length].unsqueeze(-1) * tb  # the shifted sums, (L, batch, B, K, 1)
        # each step's shifted sum and its max, in the chain's layout
        p = x.new_empty(batch, n, k)
        top = x.new_empty(batch, n)
        for (ps, pbs), (ts, tbs) in zip(_block_views(p, pb.squeeze(-1), pad),
                                        _block_views(top, tb.view(length, batch, nb), pad),
                                        strict=True):
            ps.copy_(pbs)
            ts.copy_(tbs)
        # the local messages and their maxima (time-major, as _fast_messages gives them)
        d = x.new_empty(n + 1, batch, k)
        d[n] = 0.0
        torch.add(p.log(), r.view(batch, n, 1), out=d[:n].transpose(0, 1))
        mx = x.new_zeros(n + 1, batch)
        torch.add(top.log(), r.view(batch, n), out=mx[:n].t())
        eps = torch.finfo(x.dtype).eps
        start = vb[0, :, 1:]  # (batch, B - 1, K): each later block's first message, from (3)
        drift = (vs[1:nb].transpose(0, 1) - start).abs() > (length * k * eps) * start
        suspect = (_flagged(p.amin(dim=(1, 2)), x.dtype)
                   | drift.flatten(1).any(dim=-1))
        beta0 = _beta0(d, mx)
        idx = suspect.nonzero().squeeze(-1)  # the one host-device sync
        exact: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        if idx.numel():
            wide = _EXACT_DTYPE.get(beta0.dtype, beta0.dtype)
            me = x[idx].to(wide)
            de, mxe = exact_messages(me)
            exact = (me, de, mxe)
            d[:, idx], mx[:, idx] = de.to(d.dtype), mxe.to(d.dtype)
            beta0[idx] = _beta0(de, mxe).to(beta0.dtype)
        ctx.exact = exact  # type: ignore[attr-defined]
        ctx.e = e if _needs(ctx)[0] else None  # type: ignore[attr-defined]
        ctx.save_for_backward(m, r, vb, pb, idx)
        w_out = d - mx.unsqueeze(-1)
        ctx.mark_non_differentiable(w_out)
        return beta0, w_out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, *grads: torch.Tensor
                 ) -> tuple[torch.Tensor | None, None]:
        m, r, vb, pb, idx = ctx.saved_tensors  # type: ignore[attr-defined]
        g = grads[0]
        if torch.is_grad_enabled():  # a higher derivative: differentiate the exact twin
            with torch.enable_grad():
                (gm,) = torch.autograd.grad(_beta0(*exact_messages(m)), (m,), g,
                                            create_graph=True)
            return gm, None
        x = m.detach()
        batch, n, k, _ = x.shape
        length, _, nb = pb.shape[:3]
        pad = -n % length
        bb = batch * nb
        e = ctx.e  # type: ignore[attr-defined]
        ctx.e = None  # type: ignore[attr-defined]  # consumed: a second backward recomputes it
        if e is None:
            e = _blocked_exps(x, r, length)
        # every exponential into its conditional transition T_t, in place (the padding's
        # identity matrices pass q on unchanged)
        e.mul_(vb[1:].unsqueeze(-2)).mul_(torch.where(pb > 0, pb.reciprocal(), 0.0))
        flat = e.view(length, bb, k, k)
        w, w2 = flat[0].clone(), x.new_empty(bb, k, k)
        for j in range(1, length):  # the plan chose the blocked recursion by cost
            torch.bmm(w, flat[j], out=w2)
            w, w2 = w2, w
        prods = w.view(batch, nb, k, k)
        qs = x.new_empty(nb, batch, 1, k)
        qs[0, :, 0] = g
        for b in range(nb - 1):  # the plan chose the blocked recursion by cost
            torch.bmm(qs[b], prods[:, b], out=qs[b + 1])
        qc = qs.view(nb, batch, k).transpose(0, 1).reshape(bb, k)
        for j in range(length):  # the plan chose the blocked recursion by cost
            qc = flat[j].mul_(qc.unsqueeze(-1)).sum(dim=-2)
        grad = _memory.empty(x.shape, x)
        for gs, es in _block_views(grad, e, pad):
            gs.copy_(es)
        exact = ctx.exact  # type: ignore[attr-defined]
        if exact is not None:  # the flagged elements, from their exact messages
            tr = _log_transitions(*exact)
            grad[idx] = _weighted(tr, g[idx].to(tr.dtype)).to(e.dtype)
        return grad, None


def blocked_chain_messages(m: torch.Tensor | Sequence[torch.Tensor], length: int | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`chain_messages` by :class:`_BlockedChain`, with blocks of ``length`` steps
    (default :func:`block_length`); steps given as separate tensors are stacked first."""
    x = m if isinstance(m, torch.Tensor) else torch.stack(list(m), dim=1)
    n, k = x.shape[1], x.shape[-1]
    length = block_length(n, k) if length is None else length
    if not 1 <= length <= n:
        raise ValueError(f"a block length of {length} for a chain of {n} steps; give 1 to {n}")
    beta0, w = _BlockedChain.apply(x, length)
    return beta0, w.transpose(0, 1)


# -- a factored transition: M_t[i, j] = A[i, j] + u_t[j] ------------------------------------------


def factored_messages(a: torch.Tensor, u: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                 torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""The local backward messages of the chain ``M_t[i, j] = a[i, j] + u[t, :, j]`` (``a``
    ``(K, K)``, shared by every batch element and step; ``u`` time-major ``(n, batch, K)``),
    without forming ``M``: each step is one ``(batch, K) x (K, K)`` matrix product,

    .. math::

        p_t[i] = \sum_j e^{a[i, j] - r[i]}\, e^{u_t[j] - \rho_t}\, v_{t+1}[j], \qquad
        d_t[i] = \log p_t[i] + r[i] + \rho_t,

    with :math:`r` the row maxima of ``a``, :math:`\rho_t` the max of ``u_t`` and
    :math:`v_{t+1} = e^{d_{t+1} - mx_{t+1}}`. A shifted sum under the underflow threshold (the
    row of ``a`` and the step's ``u`` peak apart) flags its batch element for the exact
    recursion, as in :func:`_fast_messages`.

    :return: ``d`` ``(n + 1, batch, K)``, ``mx`` ``(n + 1, batch)``, ``p`` ``(n, batch, K)``, the
        shifted factors ``ea`` ``(K, K)`` and ``eu`` ``(n, batch, K)``, ``w`` ``(n, batch, K)``
        (``eu * v``) and the ``(batch,)`` flag.
    """
    n, batch, k = u.shape
    lo = torch.finfo(u.dtype).min
    r = a.amax(dim=-1, keepdim=True).clamp_(min=lo)
    ea_t = torch.sub(a, r).exp_().t().contiguous()  # (K_j, K_i): p = w @ ea^T
    rho = u.amax(dim=-1, keepdim=True).clamp_(min=lo)  # (n, batch, 1)
    eu = torch.sub(u, rho).exp_()
    d = u.new_empty(n + 1, batch, k)
    d[n] = 0.0
    p = u.new_empty(n, batch, k)
    w = u.new_empty(n, batch, k)
    offset = rho + r.squeeze(-1)  # (n, batch, K)
    for t in range(n - 1, -1, -1):  # the plan chose the recursion by its cost model
        v, _ = _shifted(d[t + 1], -1)
        torch.mul(eu[t], v, out=w[t])
        torch.mm(w[t], ea_t, out=p[t])
        torch.add(p[t].log(), offset[t], out=d[t])
    mx = d.amax(dim=-1).clamp_(min=lo)
    suspect = p.amin(dim=(0, 2)) < underflow_threshold(u.dtype)
    return d, mx, p, ea_t.t(), eu, w, suspect


class _FactoredChain(torch.autograd.Function):
    r"""``a`` ``(K, K)`` and ``u`` ``(n, batch, K)`` to :math:`\beta_0` ``(batch, K)`` of the
    chain ``M_t = a + u_t`` (rows the state before), by :func:`factored_messages`.

    The gradient is :func:`_grad_into`'s in factored form: with :math:`z_t = q_{t-1} / p_t`,
    :math:`\partial / \partial u_t = w_t \odot (z_t\, e^{a - r})`, which is also :math:`q_t`, and
    :math:`\partial / \partial a = e^{a - r} \odot \sum_{t, b} z_t^\top w_t`: one small matrix
    product a step and one large one at the end. Flagged batch elements are recomputed by the
    exact recursion on their materialised ``M`` (in float64 for lower precisions); a higher
    derivative differentiates the exact twin on the materialised ``M``.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, a: torch.Tensor, u: torch.Tensor
                ) -> torch.Tensor:
        a_in, u_in = a, u
        a, u = a.detach(), u.detach()
        d, mx, p, ea, eu, w, suspect = factored_messages(a, u)
        beta0 = _beta0(d, mx)
        idx = suspect.nonzero().squeeze(-1)
        exact: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        if idx.numel():
            wide = _EXACT_DTYPE.get(u.dtype, u.dtype)
            m = (a.to(wide) + u[:, idx].to(wide).unsqueeze(-2)).transpose(0, 1)
            de, mxe = exact_messages(m)
            exact = (m, de, mxe)
            beta0[idx] = _beta0(de, mxe).to(u.dtype)
        ctx.exact = exact  # type: ignore[attr-defined]
        ctx.save_for_backward(a_in, u_in, p, ea, w, idx)
        return beta0

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, *grads: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        a, u, p, ea, w, idx = ctx.saved_tensors  # type: ignore[attr-defined]
        g = grads[0]
        if torch.is_grad_enabled():  # a higher derivative: differentiate the exact twin
            with torch.enable_grad():  # an input without a graph gets a leaf of its own
                a, u = (x if x.requires_grad else x.detach().requires_grad_() for x in (a, u))
                m = (a + u.unsqueeze(-2)).transpose(0, 1)
                ga, gu = torch.autograd.grad(_beta0(*exact_messages(m)), (a, u), g,
                                             create_graph=True)
            return ga, gu
        n = u.shape[0]
        inv = torch.where(p > 0, p.reciprocal(), torch.zeros_like(p))
        z = torch.empty_like(p)
        gu = torch.empty_like(p)
        q = g
        for t in range(n):  # the plan chose the recursion by its cost model
            torch.mul(q, inv[t], out=z[t])
            torch.mm(z[t], ea, out=gu[t]).mul_(w[t])
            q = gu[t]
        k = ea.shape[0]
        exact = ctx.exact  # type: ignore[attr-defined]
        if exact is not None:  # the flagged elements' fast-path terms are not trusted
            z[:, idx] = 0.0
        ga = (z.reshape(-1, k).t() @ w.reshape(-1, k)).mul_(ea)
        if exact is not None:  # ... and come from their exact messages instead
            m, de, mxe = exact
            gm = _weighted(_log_transitions(m, de, mxe), g[idx].to(m.dtype))
            ga = ga + gm.sum(dim=(0, 1)).to(ga.dtype)
            gu[:, idx] = gm.sum(dim=-2).transpose(0, 1).to(gu.dtype)
        return ga, gu


def factored_chain(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    r""":math:`\beta_0` ``(batch, K)`` of the log ring's chain ``M_t[i, j] = a[i, j] +
    u[t, :, j]`` (``a`` ``(K, K)``, ``u`` time-major ``(n, batch, K)``), exact and
    differentiable (see :class:`_FactoredChain`)."""
    return _FactoredChain.apply(a, u)


# -- a factorial transition: the state is several variables, no part spans them all -------------

_PREV, _CURR = "abcdefgh", "ijklmnop"


@lru_cache(maxsize=256)
def _step_expression(subscripts: tuple[str, ...], out: str, shapes: tuple[tuple[int, ...], ...]
                     ) -> Any:
    """The contraction of one step of :func:`factorial_chain`, its order found once by
    opt_einsum for these shapes."""
    return opt_einsum.contract_expression(",".join(subscripts) + "->" + out, *shapes,
                                          optimize="optimal")


def factorial_chain(parts: Sequence[torch.Tensor], sizes: tuple[int, ...],
                    length: int | None = None) -> torch.Tensor:
    r""":math:`\beta_0` ``(batch, *sizes)`` of the log ring's chain over a state of several
    variables of ``sizes`` whose transition at step ``t`` is the broadcast sum of ``parts``,
    each ``(batch or 1, n or 1, *prev, *curr)`` (extent 1 where it lacks a dim), without forming
    it: each step contracts the parts' exponentials (each shifted by its own max) with the
    message's, one by one in the order opt_einsum finds, for example
    :math:`\beta_t[w', x'] = \log \sum_w e^{A[w', w]} \sum_x e^{B[x', x]}\,
    e^{C[w, x] + \beta_{t+1}[w, x]}` for a factorial HMM. Differentiable (to every order) by
    autograd through the steps. ``length``: the number of steps ``n`` (default: the longest
    part's; give it where every part may be shared by all steps).

    Exact: a step's entry under the underflow threshold (the parts' peaks apart) flags its
    batch element, recomputed by :func:`exact_messages` on its materialised transitions (in
    float64 for lower precisions), as in the recursion's fast path.
    """
    nv = len(sizes)
    if nv > len(_PREV):
        raise ValueError(f"a factorial chain of {nv} variables; at most {len(_PREV)}")
    batch = max(p.shape[0] for p in parts)
    n = max(p.shape[1] for p in parts) if length is None else length
    x0 = parts[0]
    lo, tiny = torch.finfo(x0.dtype).min, torch.finfo(x0.dtype).tiny
    live = [k for k in range(nv) if sizes[k] > 1]
    exps, offsets, subscripts = [], x0.new_zeros(batch, n), []
    for p in parts:
        state = tuple(range(2, p.dim()))
        shift = p.detach().amax(dim=state, keepdim=True).clamp(min=lo)
        exps.append(torch.sub(p, shift).exp())
        offsets = offsets + shift.reshape(shift.shape[:2])
        has = [p.shape[2 + k] > 1 for k in range(nv)] + [p.shape[2 + nv + k] > 1 for k in range(nv)]
        subscripts.append(("z" if p.shape[0] > 1 else "")
                          + "".join(_PREV[k] for k in live if has[k])
                          + "".join(_CURR[k] for k in live if has[nv + k]))
    out = "z" + "".join(_PREV[k] for k in live)
    message = "z" + "".join(_CURR[k] for k in live)

    def squeezed(sl: torch.Tensor) -> torch.Tensor:
        """A step's slice ``(batch or 1, *prev, *curr)`` without its extent-1 dims (and
        without the batch dim where it is 1), as the step's subscripts have it."""
        keep = [1 + d for d in range(2 * nv) if sl.shape[1 + d] > 1]
        return sl.reshape(([sl.shape[0]] if sl.shape[0] > 1 else []) + [sl.shape[d] for d in keep])

    # one view a step (a select per step would each take a gradient the size of the whole part)
    slices = [[squeezed(sl) for sl in e.unbind(1)] for e in exps]

    beta = x0.new_zeros(batch, *(sizes[k] for k in live))
    curr_dims = tuple(range(1, beta.dim()))
    flag = torch.zeros(batch, dtype=torch.bool, device=x0.device)
    thr = underflow_threshold(x0.dtype)
    shapes: tuple[tuple[int, ...], ...] | None = None
    expr = None
    for t in range(n - 1, -1, -1):  # the plan chose the recursion by its cost model
        mx = beta.detach().amax(dim=curr_dims, keepdim=True).clamp(min=lo) if curr_dims else (
            beta.detach().clamp(min=lo))
        ops = [sl[t if len(sl) > 1 else 0] for sl in slices] + [torch.sub(beta, mx).exp()]
        if expr is None:
            shapes = tuple(tuple(o.shape) for o in ops)
            expr = _step_expression(tuple(subscripts) + (message,), out, shapes)
        r = expr(*ops, backend="torch")
        low = r.detach() < thr
        flag = flag | (low.flatten(1).any(-1) if r.dim() > 1 else low)
        beta = torch.log(r.clamp(min=tiny)) + mx + offsets[:, t].reshape(
            (batch,) + (1,) * len(curr_dims))
    beta0 = beta.reshape(batch, *sizes)
    idx = flag.nonzero().squeeze(-1)  # the one host-device sync
    if idx.numel():
        wide = _EXACT_DTYPE.get(x0.dtype, x0.dtype)
        k = math.prod(sizes)
        full = (len(idx), n, *sizes, *sizes)
        rows = [(p[idx] if p.shape[0] > 1 else p).to(wide).expand(full) for p in parts]
        m = rows[0]
        for row in rows[1:]:
            m = m + row
        d, mx = exact_messages(m.reshape(len(idx), n, k, k))
        beta0 = beta0.clone()
        beta0[idx] = _beta0(d, mx).to(x0.dtype).reshape(len(idx), *sizes)
    return beta0
