"""Test-session setup: eight simulated CPU devices for the sharding tests.

XLA reads the flag once, when JAX initializes its backend, so it is set before any test imports
jax. Unsharded computations still run on one device.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
