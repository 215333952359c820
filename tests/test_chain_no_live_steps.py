"""The recursions' loops keep no tensor alive per step, and their fast path pays no clamp a step.

Each live ``torch.Tensor`` is tracked by Python's garbage collector: a loop that keeps one per
step (a list of views, of messages, of states) makes the collector run every few hundred steps,
and its full collections cost a third of a long chain's time. These tests count the collections
during one call on a long chain (a loop that kept one tensor a step would trigger one at least
every 700 steps, the collector's first threshold), and check the max ring's buffered recursion
against its differentiable twin. Without a clamp, an impossible step divides 0 by 0: the last
test checks that the NaN flags its batch element for the exact recursion, and only it.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch

from plated.recursion import chain_messages, recursion_descend, recursion_forward
from plated.rings import LOG, MAX

STEPS = 20_000


@contextmanager
def collections() -> Iterator[list[int]]:
    """The generations of the garbage collections that run inside the block."""
    seen: list[int] = []

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            seen.append(info["generation"])

    gc.collect()
    gc.callbacks.append(callback)
    try:
        yield seen
    finally:
        gc.callbacks.remove(callback)


def _chain(batch: int = 2, n: int = STEPS, k: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, k, k, generator=g, dtype=torch.float64)


def _count(fn: Callable[[], object]) -> int:
    fn()  # warm-up: first-call allocations and caches
    with collections() as seen:
        fn()
    return len(seen)


def test_log_recursion_and_its_gradient_keep_no_tensor_a_step() -> None:
    m = _chain().requires_grad_()

    def run() -> None:
        beta0, _ = chain_messages(m)
        torch.autograd.grad(beta0.sum(), (m,))

    assert _count(run) < STEPS // 2000


def test_max_recursion_and_descent_keep_no_tensor_a_step() -> None:
    m = _chain()

    def run() -> None:
        top, beta, pointers = recursion_forward(MAX, m)
        b = torch.arange(2).unsqueeze(-1)
        recursion_descend(MAX, m, beta, pointers, b, top.argmax(-1, keepdim=True))

    assert _count(run) < STEPS // 2000


def test_log_descent_keeps_no_tensor_a_step() -> None:
    m = _chain(n=5_000)
    _, beta, _ = recursion_forward(LOG, m)
    b = torch.arange(2).unsqueeze(-1)
    first = torch.zeros(2, 1, dtype=torch.long)
    assert _count(lambda: recursion_descend(LOG, m, beta, None, b, first)) < 5_000 // 2000


@pytest.mark.parametrize("as_steps", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_buffered_max_recursion_equals_the_differentiable_one(seed: int, as_steps: bool
                                                               ) -> None:
    """Without a gradient the max ring writes into buffers; with one it keeps autograd's
    graph. Both give the same messages and back-pointers, with ``-inf`` entries too."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(3, 7, 4, 4, generator=g, dtype=torch.float64)
    m[torch.rand(m.shape, generator=g) < 0.3] = -torch.inf
    m[..., 0] = torch.randn(3, 7, 4, generator=g, dtype=torch.float64)  # every row possible
    given = list(m.unbind(1)) if as_steps else m
    top, beta, pointers = recursion_forward(MAX, given)
    leaf = m.clone().requires_grad_()
    given_grad = list(leaf.unbind(1)) if as_steps else leaf
    top_g, beta_g, pointers_g = recursion_forward(MAX, given_grad)
    assert top_g.requires_grad
    assert torch.equal(top, top_g.detach())
    assert torch.equal(beta, beta_g.detach())
    assert torch.equal(pointers, pointers_g)
    # and the descent from either gives the same states
    b = torch.arange(3).unsqueeze(-1)
    first = top.argmax(-1, keepdim=True)
    got = recursion_descend(MAX, given, beta, pointers, b, first)
    assert got.shape == (3, 1, 8) and got.is_contiguous()
    assert torch.equal(got, recursion_descend(MAX, m, beta_g.detach(), pointers_g, b, first))


@pytest.mark.parametrize("blocked", [False, True])
@pytest.mark.parametrize("as_steps", [False, True])
def test_an_impossible_step_flags_its_element_and_only_it(blocked: bool, as_steps: bool
                                                           ) -> None:
    """A step whose matrix is all ``-inf`` makes the fast path divide 0 by 0 (it pays no clamp
    a step): the NaN must flag that batch element for the exact recursion, and leave the others
    untouched. log Z, the messages and the gradient equal the exact recursion's, NaN-free."""
    from plated.recursion import _beta0, blocked_chain_messages, exact_messages

    g = torch.Generator().manual_seed(5)
    m = torch.randn(4, 40, 3, 3, generator=g, dtype=torch.float64)
    m[1, 17] = -torch.inf  # element 1: impossible from step 17 on
    m[2, 5, 0] = -torch.inf  # element 2: one impossible row only
    leaf = m.clone().requires_grad_()
    given = list(leaf.unbind(1)) if as_steps else leaf
    if blocked:
        beta0, w = blocked_chain_messages(given, 6)
    else:
        beta0, w = chain_messages(given)
    # the reference: the exact recursion with every -inf replaced by -1e4, whose exponential
    # is an exact 0 beside the others (autograd through -inf - -inf would give NaN)
    ref_leaf = m.masked_fill(torch.isneginf(m), -1e4).requires_grad_()
    ref = _beta0(*exact_messages(ref_leaf))
    others = [0, 2, 3]
    assert torch.isneginf(beta0[1]).all()
    torch.testing.assert_close(beta0[others], ref[others], rtol=1e-12, atol=1e-12)
    assert not torch.isnan(w).any()
    weights = torch.rand(4, 3, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((beta0 * weights)[others].sum(), (leaf,))
    (grad_ref,) = torch.autograd.grad((ref * weights)[others].sum(), (ref_leaf,))
    assert not torch.isnan(grad).any()
    # element 1 takes no part in the loss: its gradient is 0; the others equal the reference's
    # (0 at element 2's impossible row, whose state before has probability 0)
    assert torch.equal(grad[1], torch.zeros_like(grad[1]))
    assert torch.equal(grad[2, 5, 0], torch.zeros_like(grad[2, 5, 0]))
    torch.testing.assert_close(grad[others], grad_ref[others], rtol=1e-10, atol=1e-12)
