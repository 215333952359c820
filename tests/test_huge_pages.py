"""Chain-sized CPU buffers advised onto huge pages (:mod:`plated._memory`).

* The buffer is an ordinary allocation of exactly its size: shape, dtype, no base, the bytes the
  profiler's memory events count (the measure of the memory caps).
* The advice covers the 2 MiB-aligned interior of a CPU buffer of the threshold or more, and
  nothing else (a spy in place of libc's ``madvise``).
* Where the kernel offers huge pages, a written buffer lies on them (``/proc/self/smaps``);
  where it does not, the module gives no advice.
* The chains that use it give bit-for-bit the results they give on ordinary pages.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from plated import _memory
from plated.recursion import blocked_chain_messages, chain_messages
from plated.testing import peak_allocated

BIG = _memory.HUGE_PAGE_MIN_BYTES
HUGE = 2 << 20


def test_an_ordinary_tensor_of_exactly_its_size() -> None:
    like = torch.zeros((), dtype=torch.float64)
    out, peak = peak_allocated(lambda: _memory.empty((3, BIG // 8 // 3 + 5), like))
    assert isinstance(out, torch.Tensor)
    assert out.shape == (3, BIG // 8 // 3 + 5) and out.dtype == torch.float64
    assert out.is_contiguous() and out._base is None and out.storage_offset() == 0
    assert out.untyped_storage().nbytes() == out.numel() * 8 == peak
    out.fill_(2.0)
    assert float(out.sum()) == 2.0 * out.numel()


class Spy:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int]] = []

    def __call__(self, addr: int, length: int, advice: int) -> int:
        self.calls.append((addr, length, advice))
        return 0


def test_the_advice_covers_the_aligned_interior_of_large_cpu_buffers_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    spy = Spy()
    monkeypatch.setattr(_memory, "_madvise", lambda: spy)
    like = torch.zeros((), dtype=torch.float32)
    small = _memory.empty((BIG // 4 - 1,), like)
    assert spy.calls == [] and small.numel() == BIG // 4 - 1
    meta = _memory.empty((BIG,), torch.zeros((), dtype=torch.float32, device="meta"))
    assert spy.calls == [] and meta.device.type == "meta"
    big = _memory.empty((BIG // 4 + 12345,), like)
    (addr, length, advice), = spy.calls
    lo, hi = big.data_ptr(), big.data_ptr() + big.numel() * 4
    assert advice == 14  # MADV_HUGEPAGE
    assert addr % HUGE == 0 and length % HUGE == 0 and length > 0
    assert lo <= addr < lo + HUGE and hi - HUGE < addr + length <= hi


def huge_kib(lo: int, hi: int) -> int:
    """``AnonHugePages`` of the mappings that overlap ``[lo, hi)``, from ``/proc/self/smaps``
    (the advice splits the buffer's mapping: its unadvised ends are mappings of their own)."""
    inside, total = False, 0
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if head:
            inside = int(head[1], 16) < hi and lo < int(head[2], 16)
        elif inside and line.startswith("AnonHugePages:"):
            total += int(line.split()[1])
    return total


def test_a_written_buffer_lies_on_huge_pages_where_the_kernel_offers_them() -> None:
    out = _memory.empty(((64 << 20) // 4,), torch.zeros((), dtype=torch.float32))
    out.fill_(1.0)
    if _memory._madvise() is None:  # no advice: say why
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
        assert not sys.platform.startswith("linux") or not thp.exists() \
            or "[never]" in thp.read_text()
        return
    assert huge_kib(out.data_ptr(), out.data_ptr() + (64 << 20)) >= 32 << 10  # half, or more


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("blocked", [False, True])
def test_chains_on_huge_pages_match_ordinary_pages(monkeypatch: pytest.MonkeyPatch,
                                                   dtype: torch.dtype, blocked: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    m = (3.0 * torch.randn(4, (BIG // (16 * 16 * 4)) // 4 + 7, 16, 16, generator=gen)
         ).to(dtype)
    assert m.numel() * m.element_size() >= BIG
    fn = blocked_chain_messages if blocked else chain_messages

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        x = m.clone().requires_grad_()
        beta0, _ = fn(x)
        (beta0 * torch.linspace(0.5, 1.5, 16, dtype=dtype)).sum().backward()
        assert x.grad is not None
        return beta0.detach(), x.grad

    spy_calls: list[int] = []
    real = _memory._madvise()
    if real is not None:
        monkeypatch.setattr(_memory, "_madvise",
                            lambda: (lambda *a: spy_calls.append(1) or real(*a)))
    huge = run()
    if real is not None:
        assert spy_calls, "the chain's buffers were not advised"
    monkeypatch.setattr(_memory, "HUGE_PAGE_MIN_BYTES", 1 << 62)
    plain = run()
    assert torch.equal(huge[0], plain[0]) and torch.equal(huge[1], plain[1])
