"""Weight conversion from and to the official PyTorch checkpoints.

The forward-parity tests need torch (they run the independent float64 reference of
torch_reference.py); the file-format, round-trip and error tests run with numpy alone.
"""

import argparse
import math

import numpy as np
import pytest

import shufflemamba_jax as smj
from shufflemamba_jax import convert
from shufflemamba_jax.weights import checkpoint, params, pytorch

# Tiny stand-ins for each official token layout (16x16 images, patch 4: 16 patches).
TINY = dict(img_size=16, patch_size=4, embed_dim=48, depth=2, num_classes=10)
CASES = {
  "middle": ("vim_tiny", dict(TINY)),
  "head": ("shufflemamba_tiny", dict(TINY)),
  # 4 registers: groups of 16 // 5 = 3 patches, so 4 patches are left over at the end.
  "registers_neck": ("shufflemamba_reg_small", dict(TINY, num_registers=4, cls_reduce=2)),
  "registers_no_neck": ("shufflemamba_reg_tiny", dict(TINY, num_registers=3)),
  "layernorm": ("shufflemamba_middle", dict(TINY)),
}


def random_official_state_dict(config: smj.VisionMambaConfig, seed: int = 0) -> dict[str, np.ndarray]:
  """Random, non-trivial float32 weights with the official names and shapes (SPEC section 5).

  Every parameter matters: A_log spread around log(1..N), D and norm weights away from 1,
  dt biases giving softplus steps in [1e-3, 1e-1], non-zero conv, norm and head biases.
  """
  rng = np.random.default_rng(seed)
  D, E, N = config.embed_dim, config.expand * config.embed_dim, config.d_state
  R = config.dt_rank or math.ceil(D / 16)
  P = config.patch_size
  num_patches = (config.img_size // P) ** 2

  def normal(*shape, std):
    return (rng.standard_normal(shape) * std).astype(np.float32)

  def uniform(*shape, low, high):
    return rng.uniform(low, high, shape).astype(np.float32)

  sd = {"patch_embed.proj.weight": normal(D, 3, P, P, std=0.1), "patch_embed.proj.bias": normal(D, std=0.1)}
  if config.token_layout == "registers":
    n = config.num_registers
    sd.update(
      cls_token=normal(1, n, D, std=0.5),
      pos_embed=normal(1, num_patches, D, std=0.5),
      pos_embed_cls=normal(1, n, D, std=0.5),
    )
  else:
    sd.update(cls_token=normal(1, 1, D, std=0.5), pos_embed=normal(1, num_patches + 1, D, std=0.5))

  def add_norm(prefix, width):
    sd[f"{prefix}.weight"] = uniform(width, low=0.5, high=1.5)
    if config.norm == "layernorm":
      sd[f"{prefix}.bias"] = normal(width, std=0.1)

  for i in range(config.depth):
    p = f"layers.{i}.mixer."
    sd[p + "in_proj.weight"] = normal(2 * E, D, std=D**-0.5)
    sd[p + "out_proj.weight"] = normal(D, E, std=E**-0.5)
    for suffix in ("", "_b"):
      sd[p + f"conv1d{suffix}.weight"] = normal(E, 1, config.d_conv, std=0.4)
      sd[p + f"conv1d{suffix}.bias"] = normal(E, std=0.1)
      sd[p + f"x_proj{suffix}.weight"] = normal(R + 2 * N, E, std=E**-0.5)
      sd[p + f"dt_proj{suffix}.weight"] = uniform(E, R, low=-(R**-0.5), high=R**-0.5)
      dt = np.exp(rng.uniform(math.log(1e-3), math.log(1e-1), E))
      sd[p + f"dt_proj{suffix}.bias"] = (dt + np.log(-np.expm1(-dt))).astype(np.float32)  # softplus^-1
      a_log = np.log(np.arange(1, N + 1)) + rng.standard_normal((E, N)) * 0.3
      sd[p + ("A_b_log" if suffix else "A_log")] = a_log.astype(np.float32)
      sd[p + f"D{suffix}"] = uniform(E, low=0.5, high=1.5)
    add_norm(f"layers.{i}.norm", D)
  add_norm("norm_f", D)
  features = D
  if config.token_layout == "registers":
    features = config.num_registers * D // config.cls_reduce
    if config.cls_reduce > 1:
      sd["neck.weight"] = normal(D // config.cls_reduce, D, std=D**-0.5)
      sd["norm_neck.weight"] = uniform(features, low=0.5, high=1.5)
  sd["head.weight"] = normal(config.num_classes, features, std=features**-0.5)
  sd["head.bias"] = normal(config.num_classes, std=0.1)
  return sd


def case_config(case: str) -> smj.VisionMambaConfig:
  variant, overrides = CASES[case]
  return smj.model_config(variant, **overrides)


def assert_same_state_dict(actual, expected):
  assert list(actual) == list(expected) or sorted(actual) == sorted(expected)
  for name, value in expected.items():
    got = np.asarray(actual[name])
    assert got.dtype == value.dtype and got.shape == value.shape, name
    assert got.tobytes() == np.asarray(value).tobytes(), f"{name} differs"


# --------------------------------------------------------------------------------------------------
# Forward parity with the float64 PyTorch reference.
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images():
  return np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)  # NCHW


@pytest.mark.parametrize("case", list(CASES))
def test_imported_model_matches_pytorch_reference(case, images):
  torch = pytest.importorskip("torch")
  import torch_reference

  config = case_config(case)
  sd = random_official_state_dict(config)
  model = params.model_with_params(config, pytorch.import_params(sd, config, source="the state dict"))
  ours = np.asarray(model(np.transpose(images, (0, 2, 3, 1)), train=False))
  with torch.no_grad():
    reference = torch_reference.forward(
      {k: torch.from_numpy(v) for k, v in sd.items()}, torch.from_numpy(images), config.token_layout
    ).numpy()
  assert ours.shape == reference.shape == (2, config.num_classes)
  relative_error = np.abs(ours - reference).max() / np.abs(reference).max()
  assert relative_error < 1e-4, relative_error


# --------------------------------------------------------------------------------------------------
# Exact round trips through every file format.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extension", [".npz", ".safetensors", ".pth"])
@pytest.mark.parametrize("case", ["registers_neck", "layernorm"])
def test_import_then_export_is_bitwise_exact(case, extension, tmp_path):
  if extension == ".pth":
    pytest.importorskip("torch")
  config = case_config(case)
  sd = random_official_state_dict(config, seed=2)
  path = str(tmp_path / f"weights{extension}")
  pytorch.write_state_dict(path, sd)
  imported = pytorch.import_params(pytorch.read_state_dict(path), config, source=path)
  assert imported["layers"]["mixer"]["in_proj"]["kernel"].shape == (2, 48, 192)
  assert imported["layers"]["mixer"]["conv1d_b"]["kernel"].shape == (2, 4, 96)
  exported = pytorch.export_state_dict(imported)
  assert_same_state_dict(exported, sd)
  # Writing the export and reading it back changes nothing either.
  again = str(tmp_path / f"again{extension}")
  pytorch.write_state_dict(again, exported)
  assert_same_state_dict(pytorch.read_state_dict(again), sd)


def test_layouts_follow_the_contract():
  config = case_config("registers_neck")
  sd = random_official_state_dict(config, seed=3)
  imported = pytorch.import_params(sd, config, source="the state dict")
  mixer = imported["layers"]["mixer"]
  np.testing.assert_array_equal(mixer["in_proj"]["kernel"][1], sd["layers.1.mixer.in_proj.weight"].T)
  # conv1d.kernel[:, k, e] == torch conv1d.weight[e, 0, k]
  np.testing.assert_array_equal(mixer["conv1d"]["kernel"][0, 3, 5], sd["layers.0.mixer.conv1d.weight"][5, 0, 3])
  np.testing.assert_array_equal(mixer["A_b_log"][1], sd["layers.1.mixer.A_b_log"])
  np.testing.assert_array_equal(
    imported["patch_embed"]["kernel"][1, 2, 0, 7], sd["patch_embed.proj.weight"][7, 0, 1, 2]
  )
  np.testing.assert_array_equal(imported["pos_embed_cls"], sd["pos_embed_cls"][0])
  np.testing.assert_array_equal(imported["neck"]["kernel"], sd["neck.weight"].T)
  np.testing.assert_array_equal(imported["norm_neck"]["scale"], sd["norm_neck.weight"])
  np.testing.assert_array_equal(imported["layers"]["norm"]["scale"][0], sd["layers.0.norm.weight"])


def test_bfloat16_weights_round_trip_through_safetensors(tmp_path):
  import ml_dtypes

  weights = {"w": np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4).astype(ml_dtypes.bfloat16)}
  path = str(tmp_path / "w.safetensors")
  pytorch.write_state_dict(path, weights)
  assert_same_state_dict(pytorch.read_state_dict(path), weights)
  with pytest.raises(ValueError, match="cannot hold bfloat16"):
    pytorch.write_state_dict(str(tmp_path / "w.npz"), weights)


def test_bfloat16_weights_round_trip_through_pth(tmp_path):
  torch = pytest.importorskip("torch")
  import ml_dtypes

  weights = {"w": np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4).astype(ml_dtypes.bfloat16)}
  path = str(tmp_path / "w.pth")
  pytorch.write_state_dict(path, weights)
  assert torch.load(path)["model"]["w"].dtype == torch.bfloat16
  assert_same_state_dict(pytorch.read_state_dict(path), weights)


# --------------------------------------------------------------------------------------------------
# Errors, wrappers, resizing, head re-initialization, command line.
# --------------------------------------------------------------------------------------------------


def test_every_missing_unused_and_misshaped_tensor_in_one_error():
  config = case_config("middle")
  sd = random_official_state_dict(config)
  del sd["layers.1.mixer.A_b_log"]
  del sd["norm_f.weight"]
  sd["layers.0.mixer.in_proj.bias"] = np.zeros(192, np.float32)
  sd["layers.1.mixer.x_proj_b.weight"] = sd["layers.1.mixer.x_proj_b.weight"][:, :-1]
  with pytest.raises(ValueError) as error:
    pytorch.import_params(sd, config, source="bad.pth")
  message = str(error.value)
  # Named as the file names them: official names and PyTorch layouts.
  for fragment in (
    "bad.pth",
    "2 missing",
    "layers.1.mixer.A_b_log",
    "norm_f.weight",
    "1 not in the model",
    "layers.0.mixer.in_proj.bias",
    "1 with another shape",
    "layers.1.mixer.x_proj_b.weight: (35, 95) in the checkpoint, (35, 96)",
  ):
    assert fragment in message, (fragment, message)


def test_a_checkpoint_of_another_variant_is_rejected():
  sd = random_official_state_dict(case_config("middle"))
  with pytest.raises(ValueError, match="missing.*pos_embed_cls"):
    pytorch.import_params(sd, case_config("registers_neck"), source="vim.pth")


@pytest.mark.parametrize("case", ["middle", "registers_neck"])
def test_position_embeddings_are_resized_for_another_image_size(case):
  config = case_config(case)
  sd = random_official_state_dict(config)
  bigger = smj.model_config(CASES[case][0], **dict(CASES[case][1], img_size=32))
  rows = 16 + (case == "middle")
  with pytest.raises(ValueError, match=rf"pos_embed: \(1, {rows}, 48\) in the checkpoint, \(1, {rows + 48}, 48\)"):
    pytorch.import_params(sd, bigger, source="small.pth")  # only on request
  imported = pytorch.import_params(sd, bigger, source="small.pth", resize_positions=True)
  if case == "middle":
    assert imported["pos_embed"].shape == (8 * 8 + 1, 48)
    # The cls slot (index num_patches // 2) is carried over, not interpolated.
    np.testing.assert_array_equal(imported["pos_embed"][32], sd["pos_embed"][0, 8])
  else:
    assert imported["pos_embed"].shape == (8 * 8, 48)
    np.testing.assert_array_equal(imported["pos_embed_cls"], sd["pos_embed_cls"][0])
  # Everything else is untouched.
  np.testing.assert_array_equal(imported["cls_token"], sd["cls_token"][0])


class UnsafeObject:
  """Stands for anything the weights-only unpickler must not construct."""


def test_reads_official_training_checkpoints(tmp_path):
  torch = pytest.importorskip("torch")
  config = case_config("head")
  sd = random_official_state_dict(config)
  path = str(tmp_path / "checkpoint.pth")
  # What the official training scripts save: the weights under "model" (here with a DataParallel
  # prefix), next to the optimizer state, the epoch and the argparse arguments.
  torch.save(
    {
      "model": {f"module.{k}": torch.from_numpy(v) for k, v in sd.items()},
      "optimizer": {"state": {}},
      "epoch": 299,
      "args": argparse.Namespace(lr=1e-3),
      "max_accuracy": np.float64(76.1),
    },
    path,
  )
  assert_same_state_dict(pytorch.read_state_dict(path), sd)
  # Arbitrary pickled objects are refused unless the caller trusts the file.
  torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}, "hook": UnsafeObject()}, path)
  with pytest.raises(ValueError, match="allow-pickle"):
    pytorch.read_state_dict(path)
  assert_same_state_dict(pytorch.read_state_dict(path, allow_pickle=True), sd)
  torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}}, path)
  assert_same_state_dict(pytorch.read_state_dict(path), sd)


def test_other_num_classes_reinitializes_only_the_head(tmp_path):
  variant, overrides = CASES["head"]
  sd = random_official_state_dict(case_config("head"))
  path = str(tmp_path / "weights.npz")
  pytorch.write_state_dict(path, sd)
  config = smj.model_config(variant, **dict(overrides, num_classes=3))
  imported = pytorch.import_params(pytorch.read_state_dict(path), config, source=path, new_head_seed=0)
  assert imported["head"]["kernel"].shape == (48, 3)
  assert 0.01 < imported["head"]["kernel"].std() < 0.03 and not imported["head"]["bias"].any()  # SPEC §2 init
  exported = pytorch.export_state_dict(imported)
  assert_same_state_dict(
    {k: v for k, v in exported.items() if not k.startswith("head.")},
    {k: v for k, v in sd.items() if not k.startswith("head.")},
  )


@pytest.mark.slow
def test_command_line_round_trip_on_full_size_vim_tiny(tmp_path, capsys):
  config = smj.model_config("vim_tiny")
  sd = random_official_state_dict(config, seed=4)
  assert sum(v.size for v in sd.values()) == 7_148_008  # SPEC section 2
  source = str(tmp_path / "vim_tiny.safetensors")
  pytorch.write_state_dict(source, sd)
  out = str(tmp_path / "converted")
  assert convert.main(["--from-pytorch", source, "--variant", "vim_tiny", "--out", out]) == 0
  saved = checkpoint.read_weights(out)
  assert saved.step == 0 and saved.model_config == config and saved.ema is None and saved.run_config == {}
  model = smj.load_model(out)
  np.testing.assert_array_equal(model.layers.mixer.A_b_log[...][23], sd["layers.23.mixer.A_b_log"])
  exported = str(tmp_path / "exported.npz")
  assert convert.main(["--to-pytorch", out, "--out", exported]) == 0
  assert_same_state_dict(pytorch.read_state_dict(exported), sd)
  with pytest.raises(SystemExit):  # Never over an existing checkpoint.
    convert.main(["--from-pytorch", source, "--variant", "vim_tiny", "--out", out])
  assert "already holds a checkpoint" in capsys.readouterr().err
