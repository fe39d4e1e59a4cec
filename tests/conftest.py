import atexit
import os
import shutil
import sys
import tempfile

# Tests never reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# JAX on CPU, quiet, fp32 matmuls exact enough for parity tests.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, os.path.dirname(__file__))

# One persistent compilation cache per pytest run, shared by both xdist workers and by the
# processes the tests start (they inherit the environment): many tests compile the same tiny
# train / eval steps, and on CPU compiling dominates the suite. The key is the program itself,
# so a hit is the same executable. Removed when the run ends; set JAX_COMPILATION_CACHE_DIR to
# keep your own.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="medcode_jax_test_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
