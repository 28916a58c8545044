"""Keep freed host memory mapped, so a denoiser process stops page-faulting on every forward.

glibc's adaptive malloc hands large freed blocks back to the kernel (munmap, heap trimming) and
raises its thresholds only for the sizes it has just seen. A process that alternates activation
shapes - a denoiser serving batch 1 and batch 2, whole passes and pipeline stages - keeps getting
fresh pages, each zeroed by the kernel on first touch: thousands of minor faults per step. With
fixed thresholds the heap, once grown by the first request, is reused (figures: docs/performance.md).
(jemalloc or tcmalloc through LD_PRELOAD do the same job where they are installed.)
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt(3) parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

TRIM_THRESHOLD = 1 << 30  # never give the heap top back below 1 GiB free
TOP_PAD = 64 << 20  # grow the heap in 64 MiB steps
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed: blocks up to 32 MiB come from the (kept) heap


def keep_freed_memory() -> bool:
    """Fix glibc's malloc thresholds for this process; False where the C library is not glibc.

    Process-wide and idempotent; call it before the model's first forward. Memory is reused, not
    leaked: the process keeps its peak heap, which it would fault back in on the next forward anyway.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False  # musl and others: their allocators have their own knobs
    settings = ((M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD), (M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)
