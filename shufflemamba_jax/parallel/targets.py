"""Accelerators to compile for from any host: TPU slices through libtpu, NVIDIA GPUs without a GPU.

`resolve("v5e:2x4")` or `resolve("h100:8")` gives the devices of a machine that need not exist here
(`jax.experimental.topologies`): a program traced with shardings on them and compiled
(`jax.jit(f).trace(...).lower().compile()`) goes through that chip's real compiler (XLA TPU with
Mosaic, or XLA GPU with Triton and ptxas), whose memory analysis is what the chip would need.

Target names:
- TPU, as libtpu names topologies: `v4:2x2x1`, `v5e:2x4`, `v5p:2x2x2`, `v6e:4x4`, ... Chips per host
  and the megacore mode of v4 and v5p follow MaxText's `accelerator_to_spec_map.py`, so that a slice
  has the processes (hosts) and devices it has in the cloud. Needs `libtpu` (requirements-compile.txt).
- NVIDIA: `h100`, `a100` (one GPU), `h100:8` (one host of 8), `h100:4x8` (4 hosts of 8). The GPU's
  description is a data file of gpu_targets/, with its source. Needs `jax-cuda12-plugin` and
  `nvidia-cuda-nvcc-cu12` (ptxas), and no GPU.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

from etils import epath

# libtpu's name of each TPU generation, the HBM its compiler lets one program use (what libtpu 0.0.42
# reports when it refuses a program: "exceeds available HBM (15.75G)" on v5e, whose chip has 16 GiB)
# and whether a chip is one megacore device (two TensorCores) rather than two devices.
_TPU = {
  "v4": ("v4", int(30.75 * 2**30), True),
  "v5e": ("v5e", int(15.75 * 2**30), False),
  "v5p": ("v5p", int(95.74 * 2**30), True),
  "v6e": ("v6e", int(31.25 * 2**30), False),
}
_GPU_TARGETS = epath.Path(__file__).parent / "gpu_targets"
# JAX's GPU client takes this fraction of the GPU's memory unless XLA_PYTHON_CLIENT_MEM_FRACTION says
# otherwise (or XLA_PYTHON_CLIENT_PREALLOCATE=false): what one process's programs can use.
GPU_MEMORY_FRACTION = 0.75
REQUIREMENTS = "requirements-compile.txt"


class TargetError(ValueError):
  """A target name that names no machine, or a compiler this host does not have."""


@dataclasses.dataclass(frozen=True)
class Target:
  """A machine to compile for: its devices (topology devices, not usable to run on)."""

  name: str
  platform: str  # "tpu" | "cuda"
  devices: tuple
  num_processes: int  # Hosts of the machine: processes of a run on it.
  device_memory_bytes: int  # What one device's programs may use.
  compiler_options: dict  # XLA debug options a compile for it needs (compile(compiler_options=...)).

  @property
  def device_kind(self) -> str:
    return self.devices[0].device_kind

  @property
  def num_devices(self) -> int:
    return len(self.devices)


def names() -> str:
  """The target names this module knows, for messages."""
  gpus = sorted(path.stem for path in _GPU_TARGETS.glob("*.txtpb"))
  tpus = ", ".join(f"{gen}:AxB[xC]" for gen in _TPU)
  return f"{tpus} (libtpu topologies); {', '.join(gpus)} with :N GPUs per host or :HxN hosts x GPUs"


def missing(platform: str) -> str | None:
  """Why this host cannot compile for `platform` ("tpu" | "cuda"), or None if it can."""
  needed = {"tpu": ("libtpu",), "cuda": ("jax_plugins.xla_cuda12", "nvidia.cuda_nvcc")}[platform]
  absent = [name for name in needed if _find_spec(name) is None]
  if not absent:
    return None
  return f"compiling for {platform} needs {', '.join(absent)}: pip install -r {REQUIREMENTS}"


def _find_spec(name: str):
  try:
    return importlib.util.find_spec(name)
  except ModuleNotFoundError:  # A parent package is absent.
    return None


def resolve(name: str) -> Target:
  """The Target of a name (see the module docstring); a TargetError names what is wrong."""
  generation, _, shape = name.strip().lower().partition(":")
  if generation in _TPU:
    return _tpu(name, generation, shape)
  if (_GPU_TARGETS / f"{generation}.txtpb").exists():
    return _gpu(name, generation, shape)
  raise TargetError(f"--target={name!r} names no machine; known: {names()}")


def _tpu(name: str, generation: str, shape: str) -> Target:
  if not re.fullmatch(r"\d+x\d+(x\d+)?", shape):
    raise TargetError(f"--target={name!r}: a TPU target is {generation}:AxB or {generation}:AxBxC (chips per axis)")
  _require("tpu")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  libtpu_name, hbm, megacore = _TPU[generation]
  chips = math.prod(int(n) for n in shape.split("x"))
  options = {"chip_config_name": "megacore" if megacore else "default"}
  # A one-chip slice has one chip per host; every other slice has 2x2x1 (MaxText's table).
  options["chips_per_host_bounds"] = (1, 1, 1) if chips == 1 else (2, 2, 1)
  try:
    topology = topologies.get_topology_desc(platform="tpu", topology_name=f"{libtpu_name}:{shape}", **options)
  except Exception as error:  # libtpu's own words: an impossible shape for this generation.
    raise TargetError(f"--target={name!r}: libtpu refuses the topology: {error}") from None
  devices = tuple(topology.devices)
  return Target(name, "tpu", devices, _processes(devices), hbm, {})


def _gpu(name: str, model: str, shape: str) -> Target:
  match = re.fullmatch(r"(?:(\d+)x)?(\d+)", shape or "1")
  if not match:
    raise TargetError(f"--target={name!r}: a GPU target is {model}, {model}:N (GPUs per host) or {model}:HxN")
  hosts, per_host = int(match[1] or 1), int(match[2])
  _require("cuda")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  config = (_GPU_TARGETS / f"{model}.txtpb").read_text()
  memory = int(re.search(r"device_memory_size:\s*(\d+)", config)[1])
  fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEMORY_FRACTION))
  if os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "").lower() in ("false", "0"):
    fraction = 1.0
  # "slices x hosts per slice x devices per host", as the GPU PJRT client parses it.
  topology = topologies.get_topology_desc(platform="cuda", target_config=config, topology=f"1x{hosts}x{per_host}")
  devices = tuple(topology.devices)
  # GEMM autotuning runs kernels on a device; without one, cuBLAS and XLA's own GEMMs are used. ptxas
  # and libdevice: the pinned nvidia-cuda-nvcc-cu12's, not whichever CUDA this host has installed.
  options = {"xla_gpu_enable_triton_gemm": False, "xla_gpu_cuda_data_dir": _cuda_nvcc_dir()}
  return Target(name, "cuda", devices, hosts, int(memory * fraction), options)


def _cuda_nvcc_dir() -> str:
  return str(epath.Path(_find_spec("nvidia.cuda_nvcc").submodule_search_locations[0]))


def _processes(devices) -> int:
  return len({device.process_index for device in devices})


def _require(platform: str) -> None:
  reason = missing(platform)
  if reason:
    raise TargetError(reason)
  if platform == "tpu":
    # libtpu locks /tmp/libtpu_lockfile for the process that drives the chips; compiling drives none,
    # and may run beside a training run on a TPU VM or beside another compile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # Off a TPU VM, libtpu would ask the cloud metadata server about this host and log an error
    # for each missing answer; compiling for a topology needs neither.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  if platform == "cuda":
    # The plugin checks the CUDA libraries of a GPU machine when JAX starts its backends; compiling
    # needs none of them, and no GPU is to be used even if one is present.
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
