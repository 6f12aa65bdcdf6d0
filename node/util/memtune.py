"""glibc malloc settings for processes that move multi-megabyte frames.

By default glibc serves an allocation above its (dynamic) mmap threshold with a fresh mmap and
unmaps it on free, and trims the heap's free top back to the kernel at a low threshold. Every
large frame, such as the hidden states of a prefill (4 MB for 1,820 tokens of SmolLM2) or the
msgpack buffer that encodes them, is then built in pages the kernel must fault in again: on this
2-core VM encoding such a Step ran at 0.6 GB/s. With allocations up to 32 MiB kept on the heap
and the heap trimmed only past 256 MiB free, the same encode runs at 6-9 GB/s (`shiza bench`,
codec table). Every `shiza` command calls ``tune_malloc`` first; a program that embeds the
client may call it too. ``SHIZA_NO_MALLOC_TUNING=1`` turns it off.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD_BYTES = 256 << 20


def tune_malloc() -> bool:
    """Apply the settings above; True if glibc took both (False elsewhere, or when disabled)."""
    if os.environ.get("SHIZA_NO_MALLOC_TUNING") or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
                and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
