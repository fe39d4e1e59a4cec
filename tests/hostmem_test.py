"""medcode_jax.hostmem: freed step buffers are reused instead of page-faulted in again."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from medcode_jax import hostmem

# A fresh interpreter: tune (or not), then allocate and free 64 MiB blocks on worker threads,
# as XLA's thread pool does with a step's temporaries, and count the page faults of the
# rounds after the first.
_PROBE = r"""
import ctypes, json, resource, threading
from medcode_jax import hostmem
message = hostmem.tune_malloc()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
SIZE = 64 << 20

def round_():
    blocks = [libc.malloc(SIZE) for _ in range(3)]  # 3 x 64 MiB, every page touched
    for b in blocks:
        ctypes.memset(b, 1, SIZE)
    for b in blocks:
        libc.free(b)

def on_thread():
    t = threading.Thread(target=round_)
    t.start()
    t.join()

on_thread()  # first round: the pages come in once
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    on_thread()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"message": message, "faults": faults}))
"""


def _probe(choice: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != hostmem.ENV}
    if choice is not None:
        env[hostmem.ENV] = choice
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                         text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc malloc only")
def test_tuned_malloc_reuses_freed_blocks():
    tuned, system, default = _probe("tuned"), _probe("system"), _probe(None)
    assert "one arena" in tuned["message"] and "glibc defaults" in system["message"]
    assert default["message"] == system["message"]  # opt-in
    pages = 3 * 3 * (64 << 20) // 4096  # what re-faulting every block would cost
    assert system["faults"] > pages // 2, system   # glibc's defaults: fresh pages every round
    assert tuned["faults"] < pages // 50, tuned    # tuned: the same pages again


def test_bad_choice_names_the_variable(monkeypatch):
    monkeypatch.setattr(hostmem, "_applied", None)
    monkeypatch.setenv(hostmem.ENV, "jemalloc")
    with pytest.raises(SystemExit, match="MEDCODE_JAX_MALLOC='jemalloc'.*tuned, system"):
        hostmem.tune_malloc()
