"""Host-memory allocator settings for CPU vLLM engines.

A weight sync makes an engine allocate and free the model's size in buffers several times (the
joined pieces, vLLM's materialised layers, the repacked GEMM weights). glibc serves blocks that
big with a fresh mmap and unmaps them on free, so every sync page-faults that memory in again:
on the CI machine a 64 MB allocate-and-copy runs at 2.2 GB/s that way and at 6-7 GB/s from
memory the process kept. vLLM's CPU guide preloads tcmalloc for the same reason; mallopt does it
with the C library every Linux machine has. Not for the ZeRO-3 trainers: their kept heap
fragments (the 100M critic grew to 6.1 GB) and a 24 GB machine runs out.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
KEEP_BYTES = 1 << 30


def keep_freed_memory(keep_bytes: int = KEEP_BYTES) -> bool:
    """Serve big blocks from the heap and return freed memory to the OS only when more than
    `keep_bytes` of it sits at the heap's top. Applies to the calling thread's arena, the main
    thread's: where Ray runs an actor's methods. False where the C library has no mallopt."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, keep_bytes) and mallopt(_M_TRIM_THRESHOLD, keep_bytes))
