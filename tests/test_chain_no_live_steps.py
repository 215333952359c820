"""The recursions' loops keep no tensor alive per step.

Each live ``torch.Tensor`` is tracked by Python's garbage collector: a loop that keeps one per
step (a list of views, of messages, of states) makes the collector run every few hundred steps,
and its full collections cost a third of a long chain's time. These tests count the collections
during one call on a long chain (a loop that kept one tensor a step would trigger one at least
every 700 steps, the collector's first threshold), and check the max ring's buffered recursion
against its differentiable twin.
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
