"""Test-session setup: eight simulated CPU devices, one compilation cache for the session, and
the prepared datasets of data_fixtures.py for every test that asks for them.

XLA reads its flags once, when JAX initializes its backend, so they are set before any test
imports jax. Unsharded computations still run on one device. The tests' tiny models spend most
of their time in XLA's compiler, which LLVM optimization level 0 halves (measured: 4.8 s -> 2.5 s
for a width-48 training gradient). SHUFFLEMAMBA_TEST_OPT_LEVEL=default keeps XLA's default level,
as in production: test_production_flags.py reruns the numerics that must hold there (mesh
equivalence, bitwise resume, the Pallas model step) that way. Many tests (and the training runs
they start as subprocesses, which inherit the environment) compile the same digits train step:
JAX's persistent compilation cache, in a fresh folder per session, compiles each program once.
"""

import atexit
import os
import shutil
import tempfile

FAST_COMPILE = "--xla_backend_optimization_level=0"
OPT_LEVEL = os.environ.setdefault("SHUFFLEMAMBA_TEST_OPT_LEVEL", "fast")
if OPT_LEVEL not in ("fast", "default"):
  raise ValueError(f"SHUFFLEMAMBA_TEST_OPT_LEVEL must be 'fast' or 'default', not {OPT_LEVEL!r}")
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
if OPT_LEVEL == "default":  # Also strips the flag that a parent test session's environment passed down.
  os.environ["XLA_FLAGS"] = " ".join(flag for flag in os.environ["XLA_FLAGS"].split() if flag != FAST_COMPILE)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The tests run on the CPU. With requirements-compile.txt installed, JAX would otherwise also start
# the TPU and CUDA backends of libtpu and the CUDA plugin (and log their failure on a CPU host);
# compiling for those chips needs only their topologies (shufflemamba_jax.parallel.targets).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# OpenCV (the mmseg oracles' cv2) picks its SIMD code by CPU, and its HSV-to-RGB rounds the last bit
# differently on AVX-512 hosts than on AVX2 ones; segment_augment reproduces the AVX2 dispatch (that
# of most training hosts), so the oracles run it on every host.
os.environ.setdefault("OPENCV_CPU_DISABLE", "AVX512-COMMON,AVX512-SKX,AVX512-CLX,AVX512-CNL,AVX512-ICL")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="shufflemamba_jax_test_cache_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# Session fixtures digits_data_dir and imagenet_data (prepared on first use).
pytest_plugins = ("data_fixtures",)


def pytest_collection_modifyitems(config, items):
  """At level 0, the slow tests that test_production_flags.py reruns at the default level are
  skipped: the slow tier runs each of them once, compiled as production compiles it."""
  del config
  if OPT_LEVEL != "fast":
    return
  import pytest  # pylint: disable=g-import-not-at-top
  from test_production_flags import PRODUCTION_NUMERICS  # pylint: disable=g-import-not-at-top

  for item in items:
    if item.get_closest_marker("slow") and item.nodeid in PRODUCTION_NUMERICS:
      item.add_marker(pytest.mark.skip(reason="runs at XLA's default level in test_production_flags.py"))
