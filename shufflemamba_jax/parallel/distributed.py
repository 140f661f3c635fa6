"""Joins the processes of a multi-host run with `jax.distributed.initialize`.

Explicit settings (flags, else the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
environment variables) win; otherwise a TPU pod slice or a multi-task SLURM job is detected by
JAX itself; otherwise the run is a single process and nothing is initialized.
"""

from __future__ import annotations

import logging
import os
import urllib.request

import jax

_ENV = {
  "coordinator_address": "JAX_COORDINATOR_ADDRESS",
  "num_processes": "JAX_NUM_PROCESSES",
  "process_id": "JAX_PROCESS_ID",
}


def _settings(coordinator_address, num_processes, process_id, environ) -> dict:
  given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
  for name, variable in _ENV.items():
    if given[name] is None and environ.get(variable):
      given[name] = environ[variable]
  for name in ("num_processes", "process_id"):
    if given[name] is not None:
      try:
        given[name] = int(given[name])
      except ValueError:
        raise ValueError(f"{name} ({_ENV[name]}) must be an integer, got {given[name]!r}") from None
  return given


def detected_cluster(environ=None) -> str | None:
  """Names the cluster JAX can auto-detect here ("slurm" or "tpu"), or None."""
  environ = os.environ if environ is None else environ
  if int(environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in environ:
    return "slurm"
  if environ.get("TPU_WORKER_HOSTNAMES") and "," in environ["TPU_WORKER_HOSTNAMES"]:
    return "tpu"
  if environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu"
  if environ is os.environ and _on_cloud_tpu_vm():
    return "tpu"
  return None


def _on_cloud_tpu_vm(timeout_s: float = 1.0) -> bool:
  """Whether this is a Cloud TPU VM: plain TPU VMs set no telling variable, so ask the GCE
  metadata server for the accelerator type, as JAX's own TPU detection does (public HTTP, not
  JAX's private module). Off Google Cloud the name does not resolve and this is False."""
  host = os.environ.get("GCE_METADATA_IP", "metadata.google.internal")
  request = urllib.request.Request(
    f"http://{host}/computeMetadata/v1/instance/attributes/accelerator-type", headers={"Metadata-Flavor": "Google"}
  )
  try:
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
      return response.status == 200 and bool(response.read().strip())
  except (OSError, ValueError):
    return False


def initialize(
  coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None, environ=None
) -> bool:
  """Initializes jax.distributed when the run spans processes; returns whether it did."""
  environ = os.environ if environ is None else environ
  settings = _settings(coordinator_address, num_processes, process_id, environ)
  explicit = [name for name, value in settings.items() if value is not None]
  if explicit:
    missing = [f"--{name} or {_ENV[name]}" for name, value in settings.items() if value is None]
    if missing:
      raise ValueError(f"multi-process settings are incomplete: got {explicit}, missing {missing}")
    if not 0 <= settings["process_id"] < settings["num_processes"]:
      raise ValueError(f"process_id {settings['process_id']} is outside [0, {settings['num_processes']})")
    if settings["num_processes"] == 1:
      return False
    jax.distributed.initialize(**settings)
  elif detected_cluster(environ):
    jax.distributed.initialize()
  else:
    return False
  logging.info(
    "process %d of %d, %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  return True
