"""Freed memory kept for the next tensor instead of handed back to the system.

glibc serves every allocation over its mmap threshold (128 KiB at first, at most 32 MiB) with
fresh pages from the kernel and returns them on free, so each large tensor of an iteration
(a 1 mm brain level is 6-40 MB a volume) costs a page fault per 4 KiB on first touch: on 2 cores
of an AMD EPYC Zen 4 one refinement iteration on a 1.7 M voxel level took 231 ms with glibc's
defaults and 165 ms with its memory kept (docs/experiments.md, 2026-12-05); a training step
6-12 % less. :func:`keep_freed_memory` tells glibc (``mallopt``) to serve large blocks from
its heap and never trim it: the process keeps its peak memory until it exits, which a
registration or a workflow job does soon after. No effect on any number computed.

Elsewhere than glibc (macOS, musl) it does nothing. ``LDREG_KEEP_FREED_MEMORY=0`` turns it off
(A/B measurements, a long-lived host process that must give memory back).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

log = logging.getLogger(__name__)

ENV = "LDREG_KEEP_FREED_MEMORY"
# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Large allocations from glibc's heap, freed blocks kept for reuse (once per process);
    True where it took effect."""
    if os.environ.get(ENV, "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    applied = (mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
               and mallopt(_M_TOP_PAD, 64 << 20) == 1)
    log.debug("glibc keeps freed memory for reuse: %s", applied)
    return applied
