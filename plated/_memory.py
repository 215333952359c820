"""Chain-sized CPU buffers on transparent huge pages.

A buffer of hundreds of megabytes that the allocator maps afresh on every call (glibc returns a
large block to the system when it is freed) costs one page fault per 4 KiB page on its first
write: 164 MB, the exponentials of a 16 × 10,000 chain of 16 × 16 matrices, took 80 ms to fill
where the same write into touched memory took 25 ms. :func:`empty`
asks the kernel for 2 MiB pages on such a buffer (``madvise(MADV_HUGEPAGE)``, what PyTorch
does for every allocation under ``THP_MEM_ALLOC_ENABLE=1``), before anything touches it: 34 ms.

The buffer is an ordinary PyTorch allocation of exactly its size, so the profiler's memory
events (:func:`plated.testing.peak_allocated`, the measure the memory caps are tested against)
and the plan's cost model count it as before. On another device, another system, a kernel with
huge pages off, or a buffer under :data:`HUGE_PAGE_MIN_BYTES`, no advice is given.
(``benchmarks/huge_pages.py`` measures the fill; the chains' paired figures are in
``benchmarks/README.md``.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import lru_cache

import torch

__all__ = ["empty", "HUGE_PAGE_MIN_BYTES"]

#: Buffers of at least this many bytes are advised onto huge pages (a few page faults saved on
#: a smaller one do not pay for the system call).
HUGE_PAGE_MIN_BYTES = 16 << 20

_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


@lru_cache(maxsize=1)
def _madvise() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """libc's ``madvise`` where the kernel offers transparent huge pages on request, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            if "[never]" in f.read():
                return None
        fn = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def empty(shape: tuple[int, ...] | torch.Size, like: torch.Tensor) -> torch.Tensor:
    """``like.new_empty(shape)``, advised onto huge pages where it is a CPU buffer of
    :data:`HUGE_PAGE_MIN_BYTES` or more: the advice covers the 2 MiB-aligned interior of the
    buffer (its first and last partial huge page keep 4 KiB pages), so the tensor is an
    ordinary allocation of exactly its size."""
    out = like.new_empty(shape)
    nbytes = out.numel() * out.element_size()
    madvise = _madvise() if out.device.type == "cpu" else None
    if madvise is not None and nbytes >= HUGE_PAGE_MIN_BYTES:
        start = out.data_ptr() + (-out.data_ptr() % _HUGE_PAGE)
        end = (out.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        # advice the kernel declines leaves ordinary pages: the buffer is the same either way
        madvise(start, end - start, _MADV_HUGEPAGE)
    return out
