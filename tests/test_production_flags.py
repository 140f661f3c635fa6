"""The slow tier's check that the numerics hold at XLA's default optimization level, as in production.

conftest.py compiles every test at LLVM level 0 for speed, and XLA reads its flags once per process,
so the tests whose claims are bit-level or cross-mesh run again in a pytest subprocess with
SHUFFLEMAMBA_TEST_OPT_LEVEL=default.
"""

import os
import re
import subprocess
import sys

import pytest

FAST_COMPILE = "--xla_backend_optimization_level=0"  # conftest.py's.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRODUCTION_NUMERICS = (
  "tests/test_production_flags.py::test_flags_match_the_tier",
  # Mesh equivalence: 8 devices compute what 1 does (the mixed 2x4 mesh splits batch and parameters);
  # the segmenter's (150 s at this level) runs at level 0 only, for time.
  "tests/test_sharding.py::test_model_output_does_not_depend_on_the_mesh[shape1]",
  "tests/test_train.py::test_meshes_give_the_losses_of_one_device[2-4]",
  # Bitwise resume (the segmentation run's, 85-112 s alone at level 0, is left out for time).
  # The slow ones of these run only here (conftest.py skips them at level 0).
  "tests/test_train.py::test_sigterm_then_resume_equals_an_uninterrupted_run_bitwise",
  # The Pallas kernels in the model's training step, and batch-sharded.
  "tests/test_pallas_scan.py::test_model_training_step_matches_chunked",
  "tests/test_pallas_scan.py::test_batch_sharded_scan_runs_per_device_and_matches",
)


def test_flags_match_the_tier():
  assert os.environ["SHUFFLEMAMBA_TEST_OPT_LEVEL"] in ("fast", "default")
  assert (FAST_COMPILE in os.environ["XLA_FLAGS"].split()) == (os.environ["SHUFFLEMAMBA_TEST_OPT_LEVEL"] == "fast")
  assert "--xla_force_host_platform_device_count=8" in os.environ["XLA_FLAGS"].split()


@pytest.mark.slow
def test_numerics_hold_at_the_default_optimization_level():
  env = {**os.environ, "SHUFFLEMAMBA_TEST_OPT_LEVEL": "default"}
  command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *PRODUCTION_NUMERICS]
  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
  summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
  expected = len(PRODUCTION_NUMERICS)
  assert result.returncode == 0 and re.search(rf"\b{expected} passed\b", summary), (
    result.stdout[-5000:] + result.stderr[-3000:]
  )
