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


def test_a_plain_cloud_tpu_vm_is_detected_through_the_metadata_server(monkeypatch):
  """The GCE metadata server (here a local stand-in) names the accelerator of a TPU VM."""
  import http.server
  import threading

  class Metadata(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
      found = self.path.endswith("/attributes/accelerator-type") and self.headers["Metadata-Flavor"] == "Google"
      self.send_response(200 if found else 404)
      self.end_headers()
      self.wfile.write(b"v5litepod-16" if found else b"")

    def log_message(self, *args):
      pass

  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metadata)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    monkeypatch.setenv("GCE_METADATA_IP", f"127.0.0.1:{server.server_address[1]}")
    assert distributed.detected_cluster() == "tpu"
  finally:
    server.shutdown()
  assert not distributed._on_cloud_tpu_vm()  # Nothing answers any more.
