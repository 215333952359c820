r"""Chains by sequential recursion: a fused forward-backward that is its own autograd function.

A chain of transition log-matrices :math:`M_0, \dots, M_{n-1}` (batched, ``(batch, n, K, K)``,
each :math:`M_t[x_{t-1}, x_t]`) is eliminated from the right by the backward recursion

.. math::

    \beta_n = 0, \qquad \beta_t[i] = \log \sum_j \exp(M_t[i, j] + \beta_{t+1}[j]),

whose :math:`\beta_0` is the chain's result, a factor of the state before it. That is
:math:`K^2` work a step where the parallel scan (:mod:`plated.markov`) does :math:`K^3`, in
:math:`n` dependent steps instead of :math:`\log_2 n`; the plan chooses between them by its cost
model (:func:`plated.plan.emit.chain_costs`).

**Forward, exactly.** Each step multiplies the row-shifted matrix :math:`e^{M_t - r_t}` (all
steps exponentiated at once) by the vector :math:`e^{\beta_{t+1} - s}` shifted by its own max,
and takes the log. A step's entry underflows only where the peak of its row and the peak of the
vector sit apart (the trap of :func:`plated.rings.repair_entries`): every shifted sum under
``tiny / eps`` of the dtype is recorded, without a host-device sync, and checked once after the
loop. The batch elements with such an entry are recomputed by the exact recursion, each entry
shifted by its own max (:func:`exact_messages`). ``-inf`` entries (hard zeros) are allowed.

**Gradient, without autograd's graph.** With :math:`T_t[i, j] = \exp(M_t[i, j] + \beta_{t+1}[j]
- \beta_t[i])`, the conditional transition of the chain given the state before it (a stochastic
matrix), the gradient of :math:`\sum_i g[i]\,\beta_0[i]` is

.. math::

    \frac{\partial}{\partial M_t[i, j]} = q_{t-1}[i]\, T_t[i, j], \qquad q_{-1} = g, \quad
    q_t = q_{t-1} T_t,

the pairwise marginals weighted by ``g``: one forward recursion of vectors, and a few passes over
the ``(batch, n, K, K)`` tensor, all bounded (no rescaling, no underflow). Where a higher
derivative is asked for (``create_graph``), the backward pass differentiates the exact recursion
written in differentiable operations instead.

**MAP and samples.** The max ring's recursion keeps its back-pointers (Viterbi); the log ring's
backward choice draws each state given the previous one from :math:`M_t[x_{t-1}, \cdot] +
\beta_{t+1}` (forward-filter backward-sample, the filter running from the right): both walk the
chain once, left to right, given its first state (:func:`recursion_descend`).
"""

from __future__ import annotations

import torch

from .rings import Semiring, underflow_threshold

__all__ = ["recursion_forward", "recursion_descend", "exact_messages", "chain_messages",
           "factored_chain", "factored_messages"]


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


def _fast_messages(m: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The local backward messages ``d``, ``mx`` (as :func:`exact_messages`) by row-shifted
    linear products; each step's row maxima ``r`` ``(n, batch, K, 1)`` and shifted sums ``p``
    ``(n, batch, K)``; and a ``(batch,)`` flag of the batch elements where some shifted sum fell
    under the underflow threshold (no host-device sync). Each step exponentiates its own
    ``(batch, K, K)`` slice, which stays in cache, instead of one pass over the whole chain."""
    batch, n, k, _ = m.shape
    lo = torch.finfo(m.dtype).min
    d = m.new_empty(n + 1, batch, k)
    d[n] = 0.0
    r = m.amax(dim=-1, keepdim=True).clamp_(min=lo).transpose(0, 1)  # one pass: (n, batch, K, 1)
    p = m.new_empty(n, batch, k, 1)
    steps = m.unbind(1)
    for t in range(n - 1, -1, -1):  # the plan chose the recursion by its cost model
        e = torch.sub(steps[t], r[t]).exp_()
        v, _ = _shifted(d[t + 1], -1)
        torch.bmm(e, v.unsqueeze(-1), out=p[t])
        torch.add(p[t].squeeze(-1).log(), r[t].squeeze(-1), out=d[t])
    mx = d.amax(dim=-1).clamp_(min=lo)
    p = p.squeeze(-1)
    suspect = p.amin(dim=(0, 2)) < underflow_threshold(m.dtype)
    return d, mx, r, p, suspect


def _beta0(d: torch.Tensor, mx: torch.Tensor) -> torch.Tensor:
    """``beta_0 = d_0 + mx_1 + ... + mx_n``, the offsets summed in float64."""
    offset = mx[1:].sum(dim=0, dtype=torch.float64)
    return (d[0].double() + offset.unsqueeze(-1)).to(d.dtype)


#: The dtype the exact recursion of flagged batch elements runs in, for each factor dtype: its
#: messages are differences of large log values, which float32 and bfloat16 would round.
_EXACT_DTYPE = {torch.float32: torch.float64, torch.bfloat16: torch.float64,
                torch.float16: torch.float64}


class _ChainMessages(torch.autograd.Function):
    r"""``m`` ``(batch, n, K, K)`` to ``beta_0`` ``(batch, K)`` and the local messages shifted to
    a max of 0 (time-major ``(n + 1, batch, K)``, not differentiable), with the fused backward
    of the module docstring.

    The fast path's flagged batch elements (one host-device sync) are recomputed by the exact
    recursion, in float64 for lower-precision factors; their gradient is computed from those
    messages, everyone else's from the fast path's linear quantities, in which each conditional
    transition :math:`T_t[i, j] = e^{M_t[i, j] - r_t[i]}\, v_{t+1}[j] / p_t[i]` has the relative
    rounding error of a few products.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, m: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        given, m = m, m.detach()
        d, mx, r, p, suspect = _fast_messages(m)
        beta0 = _beta0(d, mx)
        idx = suspect.nonzero().squeeze(-1)
        exact: tuple[torch.Tensor, torch.Tensor] | None = None
        if idx.numel():
            wide = _EXACT_DTYPE.get(m.dtype, m.dtype)
            exact = exact_messages(m[idx].to(wide))
            d[:, idx], mx[:, idx] = exact[0].to(m.dtype), exact[1].to(m.dtype)
            beta0[idx] = _beta0(*exact).to(m.dtype)
        ctx.exact = exact  # type: ignore[attr-defined]
        ctx.save_for_backward(given, d, mx, r, p, idx)
        w = d - mx.unsqueeze(-1)  # every message shifted to a max of 0 (for sampling)
        ctx.mark_non_differentiable(w)
        return beta0, w

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, *grads: torch.Tensor) -> torch.Tensor:
        m, d, mx, r, p, idx = ctx.saved_tensors  # type: ignore[attr-defined]
        g = grads[0]
        if torch.is_grad_enabled():  # a higher derivative: differentiate the exact twin
            with torch.enable_grad():
                d2, mx2 = exact_messages(m)
                (gm,) = torch.autograd.grad(_beta0(d2, mx2), (m,), g, create_graph=True)
            return gm
        m = m.detach()
        grad = _linear_grad(m, d, mx, r, p, g)
        exact = ctx.exact  # type: ignore[attr-defined]
        if exact is not None:  # the flagged elements, from their exact messages
            tr = _log_transitions(m[idx].to(exact[0].dtype), *exact)
            grad[idx] = _weighted(tr, g[idx].to(tr.dtype)).to(m.dtype)
        return grad


def _linear_grad(m: torch.Tensor, d: torch.Tensor, mx: torch.Tensor, r: torch.Tensor,
                 p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The gradient ``q_{t-1}[i] T_t[i, j]`` with ``T_t[i, j] = e^{M_t[i, j] - r_t[i]}
    v_{t+1}[j] / p_t[i]`` (a zero row, ``p = 0``, stays 0), step by step, each step's slice
    recomputed in cache and written once into the gradient."""
    n = m.shape[1]
    v = torch.sub(d[1:], mx[1:].unsqueeze(-1)).exp_()  # (n, batch, K)
    inv = torch.where(p > 0, p.reciprocal(), torch.zeros_like(p)).unsqueeze(-1)
    grad = m.new_empty(n, *m.shape[:1], *m.shape[2:])  # time-major: each step's slice contiguous
    steps, out = m.unbind(1), grad.unbind(0)
    q = g.unsqueeze(-2)  # (batch, 1, K): q_{-1}
    for t in range(n):  # the plan chose the recursion by its cost model
        tr = torch.sub(steps[t], r[t]).exp_().mul_(v[t].unsqueeze(-2)).mul_(inv[t])
        torch.mul(tr, q.transpose(-1, -2), out=out[t])
        if t + 1 < n:
            q = torch.bmm(q, tr)
    return grad.transpose(0, 1)


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


def chain_messages(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The log ring's exact backward messages of ``m`` ``(batch, n, K, K)``: ``beta_0``
    ``(batch, K)``, differentiable (see the module docstring), and every message shifted to a
    max of 0, ``(batch, n + 1, K)`` (not differentiable; for the backward choice)."""
    beta0, w = _ChainMessages.apply(m)
    return beta0, w.transpose(0, 1)


def recursion_forward(ring: Semiring, m: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    r"""Eliminate the chain ``m`` ``(batch, n, K, K)`` by recursion in ``ring``.

    :return: :math:`\beta_0` ``(batch, K)`` (the result, a factor of the state before the
        chain), every message ``(batch, n + 1, K)`` up to a constant per step (for the backward
        choice), and the max ring's back-pointers ``(batch, n, K)`` (``None`` for the log ring).
    """
    if ring.name == "log":
        beta0, beta = chain_messages(m)
        return beta0, beta, None
    batch, n, k, _ = m.shape
    b = m.new_zeros(batch, k)
    betas = [b]
    pointers = []
    steps = m.unbind(1)  # one view each (a select per step would each take a full gradient)
    for t in range(n - 1, -1, -1):  # the plan chose the recursion by its cost model
        b, arg = (steps[t] + b.unsqueeze(-2)).max(dim=-1)
        betas.append(b)
        pointers.append(arg)
    return b, torch.stack(betas[::-1], dim=1), torch.stack(pointers[::-1], dim=1)


def recursion_descend(ring: Semiring, m: torch.Tensor, beta: torch.Tensor,
                      pointers: torch.Tensor | None, b: torch.Tensor, first: torch.Tensor
                      ) -> torch.Tensor:
    """Choose every later state of chains given their first states.

    :param m: the transitions ``(batch, n, K, K)``; ``beta`` their messages and ``pointers``
        their back-pointers (max ring), from :func:`recursion_forward`.
    :param b: batch index of each chain, ``(S, P)``.
    :param first: the state before the first transition, ``(S, P)``.
    :return: all ``n + 1`` states, ``(S, P, n + 1)``.
    """
    n = m.shape[1]
    states = [first]
    x = first
    for t in range(n):  # the plan chose the recursion by its cost model
        if pointers is not None:
            x = pointers[b, t, x]
        else:
            x = ring.choose(m[b, t, x] + beta[b, t + 1])
        states.append(x)
    return torch.stack(states, dim=-1)


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

    The gradient is :func:`_linear_grad`'s in factored form: with :math:`z_t = q_{t-1} / p_t`,
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
