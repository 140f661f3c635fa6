"""Multi-process settings: flags, environment variables and cluster detection."""

import pytest

from shufflemamba_jax.parallel import distributed


def test_single_process_initializes_nothing():
  assert distributed.initialize(environ={}) is False
  assert (
    distributed.initialize(num_processes=1, process_id=0, coordinator_address="127.0.0.1:1234", environ={}) is False
  )


def test_incomplete_settings_name_what_is_missing():
  with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
    distributed.initialize(environ={"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2"})


def test_bad_values_are_named():
  with pytest.raises(ValueError, match="num_processes"):
    distributed.initialize(coordinator_address="h:1", num_processes="two", process_id=0, environ={})
  with pytest.raises(ValueError, match="process_id 3 is outside"):
    distributed.initialize(coordinator_address="h:1", num_processes=2, process_id=3, environ={})


def test_cluster_detection():
  assert distributed.detected_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) == "slurm"
  assert distributed.detected_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
  assert distributed.detected_cluster({"TPU_WORKER_HOSTNAMES": "a,b,c,d"}) == "tpu"
  assert distributed.detected_cluster({}) is None
