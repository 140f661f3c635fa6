"""The fit-check command (`python -m shufflemamba_jax.compile`): a run's real steps compiled by the
real TPU and CUDA compilers on this CPU host, the per-device memory they report, the verdict and its
exit status, and the micro-batches a chip's config.max_device_batch asks for.

The compilers come from requirements-compile.txt; without them these tests skip and name it.
"""

import json
import subprocess
import sys

import jax
import pytest

from shufflemamba_jax import checks
from shufflemamba_jax import compile as compile_lib
from shufflemamba_jax.parallel import sharding, targets
from shufflemamba_jax.training import config_files, trainer

TPU = pytest.mark.skipif(bool(targets.missing("tpu")), reason=str(targets.missing("tpu")))
CUDA = pytest.mark.skipif(bool(targets.missing("cuda")), reason=str(targets.missing("cuda")))
KEYS = ("target", "device_kind", "num_devices", "per_device_bytes", "device_memory_bytes", "fits", "compile_s", "flops")


def digits_config(**overrides):
  return config_files.override(config_files.get_config("configs/digits.py"), overrides)


def _cli(*args: str) -> subprocess.CompletedProcess:
  command = [sys.executable, "-m", "shufflemamba_jax.compile", "--config=configs/digits.py", *args]
  return subprocess.run(command, capture_output=True, text=True, timeout=600)


@TPU
def test_cli_prints_the_record_of_a_tpu_slice():
  """The digits run on a v5e slice of 4 chips: one JSON object with the documented keys; the
  batch splits over the 4 chips, and the donated train state is aliased."""
  result = _cli("--target=v5e:2x2", "--json")
  assert result.returncode == 0, result.stderr[-3000:]
  record = json.loads(result.stdout.strip().splitlines()[-1])
  assert set(KEYS) <= set(record)
  assert (record["device_kind"], record["num_devices"], record["num_processes"]) == ("TPU v5 lite", 4, 1)
  assert record["mesh"] == {"data": 4, "fsdp": 1} and record["batch_per_device"] == 32 // 4
  assert record["fits"] is True and record["device_memory_bytes"] == int(15.75 * 2**30)
  train = record["train"]
  assert (
    train["per_device_bytes"]
    == train["argument_bytes"] + train["temp_bytes"] + train["output_bytes"] - (train["alias_bytes"])
  )
  # The train state (donated) is aliased to the new one; the argument also holds the batch.
  assert train["alias_bytes"] >= train["state_bytes"] > 0 and train["argument_bytes"] > train["state_bytes"]
  assert record["eval"]["per_device_bytes"] > train["state_bytes"]  # The state stays alive in evaluation.
  assert record["flops"] > 0  # The TPU compiler counts them.


@TPU
def test_a_step_the_chip_cannot_hold_exits_3_naming_target_bytes_and_knobs(tmp_path):
  """A batch far beyond a v5e chip's 16 GiB: the TPU compiler refuses it; one error line names the
  target, what is needed and available, and the settings that lower it; the compiler's own message
  is logged."""
  huge = ["--config.batch_size=32768", "--config.eval_batch_size=8", "--config.mesh.data=1", "--eval=false"]
  result = _cli("--target=v5e:1x1", *huge)
  assert result.returncode == compile_lib.EXIT_DOES_NOT_FIT, result.stderr[-3000:]
  error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(error_lines) == 1, result.stderr[-3000:]
  line = error_lines[0]
  assert "v5e:1x1" in line and "GiB available" in line and "config.grad_accum_steps" in line, line
  assert "config.batch_size=32768" in line and "config.model.scan_method=pallas" in line, line
  assert "RESOURCE_EXHAUSTED" in result.stderr  # The compiler's own words, logged.


@CUDA
def test_gpu_target_compiles_for_h100_without_a_gpu():
  """Two H100s of one host: XLA's GPU compiler (Triton, ptxas) runs here; the capacity is the
  memory JAX's client preallocates (75% of the card)."""
  record = compile_lib.check(digits_config(eval_batch_size=32), "h100:2")
  assert (record["platform"], record["num_devices"], record["device_kind"]) == ("cuda", 2, "NVIDIA H100 80GB HBM3")
  assert record["device_memory_bytes"] == int(84929347584 * targets.GPU_MEMORY_FRACTION)
  assert record["fits"] and 0 < record["train"]["per_device_bytes"] < 2**30


@CUDA
def test_hosts_of_a_target_must_split_the_batch():
  """h100:3x1 has 3 hosts (processes): a batch of 32 does not split over them."""
  with pytest.raises(checks.SettingError, match=r"config.batch_size=32: must divide by the 3 hosts"):
    compile_lib.check(digits_config(), "h100:3x1")


def test_unknown_target_is_named():
  with pytest.raises(targets.TargetError, match=r"--target='v9x:2x2' names no machine; known: v4:AxB"):
    targets.resolve("v9x:2x2")
  with pytest.raises(targets.TargetError, match=r"a GPU target is h100, h100:N"):
    targets.resolve("h100:eight")


def test_missing_compiler_names_the_requirements_file(monkeypatch):
  monkeypatch.setattr(targets, "_find_spec", lambda name: None)
  assert targets.missing("tpu") == "compiling for tpu needs libtpu: pip install -r requirements-compile.txt"
  with pytest.raises(
    targets.TargetError, match="jax_plugins.xla_cuda12, nvidia.cuda_nvcc: pip install -r requirements"
  ):
    targets.resolve("a100:8")


def test_chip_names():
  names = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5": "v5p", "TPU v6 lite": "v6e", "cpu": None}
  names.update({"NVIDIA H100 80GB HBM3": "h100", "NVIDIA A100-SXM4-80GB": "a100", "NVIDIA GeForce RTX 4090": None})
  for kind, name in names.items():
    assert sharding.chip_name(kind) == name, kind


def test_micro_batches_split_each_device_share_evenly():
  mesh = sharding.create_mesh(data=8, fsdp=1)
  assert sharding.micro_batches(2048, mesh, None) == 1
  assert sharding.micro_batches(2048, mesh, 128) == 2  # 256 per device.
  assert sharding.micro_batches(2048, mesh, 100) == 4  # 3 does not divide 256.
  assert sharding.micro_batches(2048, mesh, 128, at_least=4) == 4
  assert sharding.micro_batches(96, mesh, 5) == 3  # 12 per device: 3 micro-batches of 4.


@TPU
def test_max_device_batch_of_the_chip_sets_the_micro_batches():
  """config.max_device_batch.v5e applies on v5e chips only; the CPU (no chip name) keeps the config."""
  config = digits_config(**{"max_device_batch.v5e": 2})
  v5e = trainer.mesh_of(config, devices=targets.resolve("v5e:2x2").devices)
  assert trainer.for_devices(config, v5e).grad_accum_steps == 4  # 8 per chip, 2 at once.
  assert config.grad_accum_steps == 1  # Unchanged: a copy.
  assert trainer.for_devices(config, trainer.mesh_of(config, devices=jax.devices()[:4])) is config
  record = compile_lib.check(config, "v5e:2x2", evaluate=False)
  assert record["grad_accum_steps"] == 4 and record["fits"]


@TPU
def test_a_segmentation_run_compiles_its_window_evaluation():
  """digits_seg: the segmenter's train step (BatchNorm statistics in the state) and its
  evaluation, the model on one window per device of the first host, parameters replicated there."""
  config = config_files.get_config("configs/digits_seg.py")
  record = compile_lib.check(config, "v5e:2x2")
  assert record["fits"] and record["num_devices"] == 4
  assert 0 < record["eval"]["argument_bytes"] and record["eval"]["per_device_bytes"] > record["train"]["state_bytes"]


@pytest.mark.slow  # Two libtpu compilations of the detector: about 2.5 min on 2 cores.
@TPU
def test_a_detection_run_compiles_its_predict_evaluation():
  """digits_det: the detector's train step (padded ground truth, BatchNorm statistics in the state)
  and its evaluation, `predict` on a global batch of canvases sharded over the slice."""
  config = config_files.get_config("configs/digits_det.py")
  record = compile_lib.check(config, "v5e:2x2")
  assert record["fits"] and record["num_devices"] == 4
  assert 0 < record["eval"]["argument_bytes"] and record["train"]["per_device_bytes"] > record["train"]["state_bytes"]
