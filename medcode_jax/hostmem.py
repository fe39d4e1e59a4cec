"""Host memory allocation (opt-in): keep freed step buffers instead of unmapping them.

XLA:CPU allocates every temporary of a jitted step with ``malloc`` and frees it when the step
ends. With glibc's defaults each large buffer is a fresh ``mmap`` (and big allocations made on
XLA's worker threads always are, in their per-thread arenas), so every step page-faults all of
its temporaries in again: measured on the 2-core CPU benchmark (``bench/throughput.py --preset
cpu``), ~220,000 minor faults per train step, a fifth of the CPU time in the kernel and a step
~20 % slower than with the buffers kept. ``tune_malloc`` sets glibc's ``mallopt`` so that
large blocks come from one heap that keeps what is freed: the step then reuses the same pages
(0 faults per step; with one step shape the peak RSS stayed the same, 1.6-2.3 vs 1.8-1.9 GB,
but nothing freed is returned to the system).

The price is memory when shapes vary. A training run alternates its length buckets batch by
batch (the epoch's batches are shuffled), each bucket's step wants a differently sized block,
and blocks freed between long-lived ones cannot go back: the whole-run benchmark
(``bench/whole_run.py --set epochs=1``, 4 buckets) peaked at 8.0 GiB RSS with this setting
against 3.8 GiB with glibc's defaults, for 192 s against 200 s. So it is off by default and
worth it where a step's shape stays the same (one length bucket, benchmarks, prediction over
same-length inputs): ``MEDCODE_JAX_MALLOC=tuned``.

Transparent huge pages (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, read by glibc only at
process start) were tried as a default instead: a fixed-shape step had ~5,000 faults instead of
~360,000 (3.0 s against 3.8 s), but the whole-run epoch took 364 s against 183 s with glibc's
defaults on the same machine (probably direct compaction for huge pages), so neither is set.

It must run before the process starts threads (glibc fixes the arena count when threads first
allocate), so ``medcode_jax.main`` and the benchmarks call it before importing JAX. It changes
nothing on other C libraries or platforms, and nothing unless ``MEDCODE_JAX_MALLOC=tuned``
(default ``system``: glibc's defaults; also the choice when preloading jemalloc / tcmalloc).
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys

ENV = "MEDCODE_JAX_MALLOC"
CHOICES = ("tuned", "system")
# glibc <malloc.h> parameter numbers
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
SETTINGS = ((M_ARENA_MAX, 1),                # one arena: worker threads never get a private,
                                             # mmap-only heap for large blocks
            (M_MMAP_MAX, 0),                 # large blocks from the heap, not fresh mappings
            (M_TRIM_THRESHOLD, -1))          # never shrink the heap (glibc reads the int as
                                             # size_t: -1 = no threshold). A 1 GiB threshold
                                             # still re-faulted 120,000 pages per step.
_applied: str | None = None


def tune_malloc() -> str:
    """Apply the settings above once per process; returns what was done (for the log)."""
    global _applied
    if _applied is not None:
        return _applied
    choice = os.environ.get(ENV, "system").strip().lower() or "system"
    if choice not in CHOICES:
        raise SystemExit(f"environment variable {ENV}={os.environ[ENV]!r}: use one of "
                         f"{', '.join(CHOICES)} (system = glibc's default allocation)")
    if choice == "system":
        _applied = f"host malloc: glibc defaults ({ENV}=tuned keeps step buffers for reuse)"
    elif not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        _applied = "host malloc: unchanged (not glibc)"
    else:
        mallopt = ctypes.CDLL(None).mallopt
        mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
        failed = [param for param, value in SETTINGS if mallopt(param, value) != 1]
        _applied = ("host malloc: one arena, no per-buffer mmap, freed memory kept for reuse "
                    f"({ENV}=tuned)" if not failed else
                    f"host malloc: mallopt refused parameters {failed}; glibc defaults kept")
    return _applied
