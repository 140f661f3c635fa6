"""Checkpoints: restore onto other meshes, the save and keep policies, and a kill during a save."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("orbax.checkpoint")

from shufflemamba_jax.models import VisionMambaConfig  # pylint: disable=g-import-not-at-top
from shufflemamba_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
from shufflemamba_jax.weights import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top

MODEL = VisionMambaConfig()  # The model item every checkpoint carries.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state():
  """A train-state-like tree: FSDP-sized matrices, small replicated vectors, scalars."""
  rng = np.random.default_rng(0)
  return {
    "step": np.int32(7),
    "rng": np.array([0, 42], np.uint32),
    "params": {
      "in_proj": rng.standard_normal((48, 192), np.float32),
      "A_log": rng.standard_normal((4, 96, 16), np.float32),
      "norm": rng.standard_normal((48,), np.float32),
    },
    "opt_state": {"mu": rng.standard_normal((48, 192), np.float32)},
  }


def _placed(tree, mesh):
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)
  shardings = sharding.state_shardings(abstract, mesh, min_size=256)
  return jax.device_put(tree, shardings), shardings


@pytest.mark.parametrize("data, fsdp", [(1, 4), (2, 2), (1, 1)])
def test_a_checkpoint_saved_on_8_devices_restores_on_4_and_on_1(tmp_path, data, fsdp):
  assert jax.device_count() >= 8
  state = _state()
  saved, saved_shardings = _placed(state, sharding.create_mesh(data=1, fsdp=8))
  assert saved["params"]["in_proj"].sharding.spec == saved_shardings["params"]["in_proj"].spec
  assert len(saved["params"]["in_proj"].sharding.device_set) == 8  # Really split over 8.
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), async_save=False)
  checkpointer.save(7, saved, meta={"step": 7}, model=MODEL, force=True)

  mesh = sharding.create_mesh(data=data, fsdp=fsdp)
  target = jax.tree.map(
    lambda x, where: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=where),
    state,
    _placed(state, mesh)[1],
  )
  restored, meta = checkpointer.restore(target)
  checkpointer.close()
  assert meta["step"] == 7
  for path, value in jax.tree_util.tree_flatten_with_path(restored)[0]:
    want = dict(jax.tree_util.tree_flatten_with_path(target)[0])[path]
    assert value.sharding.is_equivalent_to(want.sharding, value.ndim), path
    assert value.sharding.device_set == set(mesh.devices.flat)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), state)


def device_bytes() -> int:
  """Bytes held on the devices: every distinct buffer of every live array, once."""
  buffers = {}
  for array in jax.live_arrays():
    for shard in array.addressable_shards:
      buffers[shard.device.id, shard.data.unsafe_buffer_pointer()] = shard.data.nbytes
  return sum(buffers.values())


def test_an_async_save_of_live_arrays_survives_donation_and_copies_nothing_on_device(tmp_path):
  """The trainer saves its live train state and donates it to the next step at once: what is
  written is the state at the save, and the save makes no device copy of the state (Orbax's
  replica-parallel write slices 1/8 of each 8-way replicated array, then copies to host)."""
  mesh = sharding.create_mesh(data=8, fsdp=1)
  shardings = sharding.state_shardings({"w": jax.ShapeDtypeStruct((1024, 1024), np.float32)}, mesh)
  state = jax.jit(lambda: {"w": jnp.ones((1024, 1024))}, out_shardings=shardings)()
  update = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), out_shardings=shardings, donate_argnums=0)
  state = update(state)
  expected = jax.tree.map(np.array, state)
  state_bytes = 8 * expected["w"].nbytes  # Replicated on 8 devices.

  before = device_bytes()
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), async_save=True)
  checkpointer.save(1, state, model=MODEL, force=True)
  assert device_bytes() - before <= state_bytes // 8  # A copy of the state would add state_bytes.
  for _ in range(3):
    state = update(state)  # Donates the buffers the save was given.
  jax.block_until_ready(state)
  checkpointer.wait()
  written = checkpointer.restore_parts(("w",))
  checkpointer.close()
  np.testing.assert_array_equal(written["w"], expected["w"])


def test_keeps_the_latest_and_the_best_across_restarts(tmp_path):
  def manager():
    return checkpoint_lib.Checkpointer(str(tmp_path), keep=2, keep_best=1, save_every_steps=2, async_save=False)

  state = {"x": np.zeros(3, np.float32)}
  checkpointer = manager()
  # The policy: every 2nd step (and what JAX's preemption service asks for).
  assert [s for s in range(1, 7) if checkpointer.should_save(s)] == [2, 4, 6]
  for step, top1 in ((2, 0.4), (4, 0.9), (6, 0.5), (8, None), (10, 0.3)):
    metrics = None if top1 is None else {"eval_top1": top1, "eval_top5": 1.0}
    checkpointer.save(step, state, meta={"step": step}, model=MODEL, metrics=metrics, force=True)
  assert checkpointer.all_steps() == [4, 8, 10]  # The 2 latest, and the best (step 4).
  assert checkpointer.step("best") == 4 and checkpointer.latest_step() == 10
  checkpointer.close()
  checkpointer = manager()  # The ranking is stored with the checkpoints.
  assert checkpointer.step("best") == 4
  checkpointer.save(12, state, meta={"step": 12}, model=MODEL, metrics={"eval_top1": 0.1}, force=True)
  assert checkpointer.all_steps() == [4, 10, 12]
  with pytest.raises(ValueError, match="best_metric"):
    checkpointer.save(14, state, meta={"step": 14}, model=MODEL, metrics={"loss": 1.0}, force=True)
  checkpointer.close()
  with pytest.raises(ValueError, match="keep_checkpoints"):
    checkpoint_lib.Checkpointer(str(tmp_path), keep=0)


def test_restore_parts_reads_only_the_named_entries(tmp_path):
  state = _state()
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), async_save=False)
  checkpointer.save(7, dict(state, ema=None), meta={"step": 7}, model=MODEL, force=True)
  parts = checkpointer.restore_parts(("params", "ema"))  # No EMA in this run: left out.
  checkpointer.close()
  assert set(parts) == {"params"}
  jax.tree.map(np.testing.assert_array_equal, parts["params"], state["params"])
  assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(parts))


def test_best_step_ranks_by_the_runs_own_metric(tmp_path):
  checkpointer = checkpoint_lib.Checkpointer(
    str(tmp_path), keep=3, keep_best=1, best_metric="eval_top5", async_save=False
  )
  config = {"best_metric": "eval_top5"}
  for step, (top1, top5) in ((1, (0.9, 0.2)), (2, (0.1, 0.8)), (3, (0.5, 0.5))):
    checkpointer.save(
      step,
      {"x": np.zeros(2, np.float32)},
      meta={"step": step},
      model=MODEL,
      config=config,
      metrics={"eval_top1": top1, "eval_top5": top5},
      force=True,
    )
  checkpointer.close()
  reader = checkpoint_lib.Checkpointer(str(tmp_path))  # Opened without keep_best.
  assert reader.step("best") == 2
  reader.close()

  unranked = tmp_path / "unranked"
  checkpointer = checkpoint_lib.Checkpointer(str(unranked), async_save=False)
  checkpointer.save(1, {"x": np.zeros(2, np.float32)}, meta={"step": 1}, model=MODEL, force=True)
  checkpointer.close()
  reader = checkpoint_lib.Checkpointer(str(unranked))
  with pytest.raises(FileNotFoundError, match="keep_best_checkpoints"):
    reader.step("best")
  reader.close()


_KILLED_DURING_SAVE = textwrap.dedent("""
    import os, sys
    import numpy as np
    from shufflemamba_jax.models import VisionMambaConfig
    from shufflemamba_jax.weights import checkpoint as checkpoint_lib
    MODEL = VisionMambaConfig()
    checkpointer = checkpoint_lib.Checkpointer(sys.argv[1], async_save=True)
    small = {'x': np.full((4,), 1.0, np.float32)}
    checkpointer.save(1, small, meta={'step': 1}, model=MODEL, force=True)
    checkpointer.wait()
    # 512 MiB: its asynchronous write is still running when the process dies.
    large = {'x': np.full((128, 1024, 1024), 2.0, np.float32)}
    checkpointer.save(2, large, meta={'step': 2}, model=MODEL, force=True)
    print('SAVE STARTED', flush=True)
    os.kill(os.getpid(), 9)
""")


@pytest.mark.slow
def test_kill_9_during_an_asynchronous_save_keeps_the_previous_checkpoint(tmp_path):
  directory = str(tmp_path / "checkpoints")
  result = subprocess.run(
    [sys.executable, "-c", _KILLED_DURING_SAVE, directory], cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == -9, result.stderr[-3000:]
  assert "SAVE STARTED" in result.stdout
  leftovers = sorted(os.listdir(directory))
  assert "1" in leftovers and "2" not in leftovers, leftovers  # Step 2 never became final...
  assert any(name.startswith("2.") for name in leftovers), leftovers  # ...it was cut mid-write.

  checkpointer = checkpoint_lib.Checkpointer(directory, async_save=False)
  assert checkpointer.latest_step() == 1
  state, meta = checkpointer.restore({"x": jax.ShapeDtypeStruct((4,), np.float32)})
  np.testing.assert_array_equal(state["x"], np.ones(4, np.float32))
  assert meta["step"] == 1
  # The run goes on: step 2 can be saved again over the debris of the killed save.
  checkpointer.save(2, {"x": np.zeros(4, np.float32)}, meta={"step": 2}, model=MODEL, force=True)
  assert checkpointer.all_steps() == [1, 2]
  checkpointer.close()


def test_relative_paths_work_as_given(tmp_path, monkeypatch):
  """Orbax needs absolute paths; a workdir given relative to the current folder still works."""
  monkeypatch.chdir(tmp_path)
  params = {"x": np.arange(3, dtype=np.float32)}
  with checkpoint_lib.Checkpointer(checkpoint_lib.checkpoint_directory("run"), async_save=False) as checkpointer:
    checkpointer.save(0, {"params": params}, model=MODEL, force=True)
  saved = checkpoint_lib.read_weights("run")
  assert saved.step == 0 and saved.directory == tmp_path / "run" / "checkpoints"
  np.testing.assert_array_equal(saved.params["x"], params["x"])
