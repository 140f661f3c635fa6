"""The adapter segmenter: the ADE20K adapter recipe is the reference's, a tiny one trains,
checkpoints and evaluates on the embedded digits_seg set, warm-starts from a classifier, and an
official-layout mmseg checkpoint of it converts both ways."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from shufflemamba_jax.data import digits_seg
from shufflemamba_jax.models import SettingError, adapter, upernet, variants
from shufflemamba_jax.training import config_files, optim, trainer
from shufflemamba_jax.training import metrics as metrics_lib
from shufflemamba_jax.weights import checkpoint as checkpoint_lib
from shufflemamba_jax.weights import mmseg
from shufflemamba_jax.weights import params as params_lib

from digits_runs import ROOT, config_with

pytest.importorskip("tensorflow_datasets")

CONFIG = os.path.join(ROOT, "configs", "digits_seg.py")
# digits_seg with the adapter: 16-pixel patches (a 2x2 token grid on its 32x32 canvases), a
# narrow spatial prior module; four training steps, checkpointed and evaluated at the end.
ADAPTER_RUN = {
  "seg.adapter.enabled": True,
  "seg.adapter.conv_inplane": 8,
  "seg.adapter.deform_num_heads": 6,
  "model.patch_size": 16,
  "total_steps": 4,
  "log_every_steps": 2,
  "eval_every_steps": 4,
  "checkpoint_every_steps": 4,
  "async_checkpointing": False,
  "mesh.data": 1,
  "seg.warmup_steps": 1,
}


def test_ade20k_adapter_recipe_is_the_reference():
  config = config_files.get_config(os.path.join(ROOT, "configs", "ade20k.py"), "shufflemamba_base_adapter")
  settings = trainer.Settings.from_config(config)
  segmenter = settings.task.segmenter
  assert segmenter.adapter == adapter.AdapterConfig(
    conv_inplane=64, n_points=4, deform_num_heads=12, deform_ratio=0.5, cffn_ratio=0.25, init_values=0.0
  )
  backbone = segmenter.backbone
  assert (backbone.embed_dim, backbone.depth, backbone.norm, backbone.patch_size) == (768, 24, "layernorm", 16)
  assert (backbone.drop_path_rate, backbone.slws_max_prob, backbone.dtype) == (0.2, 0.0, "float32")
  assert adapter.interaction_spans(segmenter.resolved_out_indices) == ((0, 5), (6, 11), (12, 17), (18, 23))
  assert (segmenter.neck, segmenter.pos_grid, segmenter.channels, segmenter.aux_level) == ("none", (14, 14), 512, 3)
  optimizer = settings.optimizer
  assert (optimizer.lr, optimizer.weight_decay, optimizer.grad_clip) == (6e-5, 0.01, None)
  assert (settings.task.eval_crop, settings.task.eval_stride) == ((512, 512), (341, 341))
  # The recipe's substring decay rule, on the adapter's names: its LayerNorms and output
  # BatchNorms ("norm" in the name) and D do not decay; the SPM's BatchNorms (spm.stem.1), the
  # level embedding, gamma and the Extractors' convolutions do.
  decays = optim.segmentation_decays
  assert not decays(("backbone", "interactions", "0", "injector", "query_norm", "scale"), 1)
  assert not decays(("backbone", "norm3", "scale"), 1) and not decays(("backbone", "layers", "mixer", "D"), 2)
  assert decays(("backbone", "spm", "stem", "1", "scale"), 1) and decays(("backbone", "level_embed"), 2)
  assert decays(("backbone", "interactions", "3", "injector", "gamma"), 1)
  # Same-model sizes as the official module: the whole segmenter, abstractly.
  model = params_lib.abstract_model(settings.task.model_config(150))
  leaves = jax.tree.leaves(nnx.state(model.backbone, nnx.Param))
  adapter_only = sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model.backbone.interactions, nnx.Param)))
  assert sum(np.prod(x.shape) for x in leaves) > adapter_only > 0
  with pytest.raises(SettingError, match="config.seg.adapter.deform_num_heads"):
    trainer.Settings.from_config(
      config_with(CONFIG, "/nonexistent", {**ADAPTER_RUN, "seg.adapter.deform_num_heads": 5})
    )
  with pytest.raises(SettingError, match="config.seg.eval_crop"):
    trainer.Settings.from_config(config_with(CONFIG, "/nonexistent", {**ADAPTER_RUN, "seg.eval_crop": (48, 48)}))


@pytest.mark.slow  # A training run with an evaluation (about 40 s on 2 cores).
def test_adapter_segmenter_trains_checkpoints_evaluates_and_converts(tmp_path, digits_seg_data_dir):
  config = config_with(CONFIG, digits_seg_data_dir, ADAPTER_RUN)
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(config, workdir)
  records = metrics_lib.read_metrics(workdir)
  losses = [record["loss"] for record in records if "loss" in record]
  assert len(losses) == 2 and all(np.isfinite(losses))
  final = records[-1]
  assert final["step"] == 4 and 0.0 <= final["eval_miou"] <= 1.0

  saved = checkpoint_lib.read_weights(workdir, ema=False)
  assert saved.model_config.adapter is not None and saved.model_config == trainer.Settings.from_config(
    config
  ).task.model_config(digits_seg.NUM_CLASSES)
  # The adapter's BatchNorm statistics are model state, saved with the heads'.
  stats = params_lib.flatten(saved.model_state)
  assert "backbone.spm.stem.1.mean" in stats and "backbone.norm4.var" in stats
  assert not np.allclose(stats["backbone.norm4.var"], 1.0)  # Updated by training.

  # To the official mmseg layout and back, exactly; the config read back from the tensors.
  state_dict = mmseg.export_segmenter(saved.params, saved.model_state, pool_scales=saved.model_config.pool_scales)
  assert state_dict["backbone.interactions.3.extra_extractors.1.ffn.dwconv.dwconv.weight"].shape == (12, 1, 3, 3)
  assert state_dict["backbone.spm.stem.1.num_batches_tracked"].dtype == np.int64
  assert "backbone.norm_f.weight" not in state_dict and "decode_head.conv_seg.weight" in state_dict
  read = mmseg.segmenter_config(state_dict, {"img_size": 32})
  assert read.adapter == saved.model_config.adapter
  params, model_state = mmseg.import_segmenter(state_dict, saved.model_config, source="export")
  for ours, back in ((saved.params, params), (saved.model_state, model_state)):
    ours, back = params_lib.flatten(ours), params_lib.flatten(back)
    assert sorted(ours) == sorted(back)
    assert all(np.array_equal(ours[name], back[name]) for name in ours)


def test_adapter_warm_start_takes_the_classifier_blocks_and_keeps_the_adapter_fresh(tmp_path):
  config = config_with(CONFIG, "/nonexistent", ADAPTER_RUN)
  settings = trainer.Settings.from_config(config)
  segmenter_config = settings.task.model_config(digits_seg.NUM_CLASSES)
  backbone = segmenter_config.backbone
  sizes = {name: getattr(backbone, name) for name in ("patch_size", "embed_dim", "depth", "d_state", "norm")}
  classifier = variants.create_model("shufflemamba_tiny", rngs=nnx.Rngs(1), num_classes=10, img_size=64, **sizes)
  classifier_params = jax.tree.map(np.asarray, params_lib.param_tree(classifier))
  with checkpoint_lib.Checkpointer(str(tmp_path / "classifier" / "checkpoints"), async_save=False) as checkpointer:
    checkpointer.save(0, {"params": classifier_params}, model=classifier.config, force=True)
  fresh = params_lib.param_tree(upernet.create_segmenter(segmenter_config, rngs=nnx.Rngs(0)))
  filled = settings.task.warm_start(str(tmp_path / "classifier"), fresh, segmenter_config)
  np.testing.assert_array_equal(
    filled["backbone"]["layers"]["mixer"]["A_log"], classifier_params["layers"]["mixer"]["A_log"]
  )
  np.testing.assert_array_equal(filled["backbone"]["patch_embed"]["kernel"], classifier_params["patch_embed"]["kernel"])
  assert filled["backbone"]["pos_embed"].shape == (4, 48)  # The 4x4 table resized to pos_embed_size 32 (2x2).
  for part in adapter.ADAPTER_PARTS:
    jax.tree.map(np.testing.assert_array_equal, filled["backbone"][part], fresh["backbone"][part])
  assert "norm_f" not in filled["backbone"]


def test_convert_reads_and_writes_an_official_adapter_segmenter(tmp_path):
  """`convert --from-pytorch` of a reference-layout adapter segmenter (sizes from its tensors),
  then `--to-pytorch`: the same tensors, BatchNorm counters included."""
  import torch  # pylint: disable=g-import-not-at-top

  from shufflemamba_jax import convert  # pylint: disable=g-import-not-at-top

  settings = trainer.Settings.from_config(config_with(CONFIG, "/nonexistent", ADAPTER_RUN))
  model = upernet.create_segmenter(settings.task.model_config(digits_seg.NUM_CLASSES), rngs=nnx.Rngs(4))
  parts = [nnx.to_pure_dict(nnx.state(model, selector)) for selector in (nnx.Param, nnx.Not(nnx.Param))]
  state_dict = mmseg.export_segmenter(*parts, pool_scales=model.config.pool_scales)
  source = tmp_path / "upernet_adapter.pth"
  torch.save({"state_dict": {name: torch.from_numpy(np.array(v)) for name, v in state_dict.items()}}, source)
  workdir = str(tmp_path / "converted")
  assert convert.main(["--from-pytorch", str(source), "--out", workdir, "--set", "img_size=32"]) == 0
  loaded = checkpoint_lib.load_model(workdir)
  assert isinstance(loaded.backbone, adapter.VimAdapter) and loaded.config.adapter == model.config.adapter
  back = tmp_path / "back.pth"
  assert convert.main(["--to-pytorch", workdir, "--out", str(back)]) == 0
  written = torch.load(back, weights_only=True)["model"]
  assert sorted(written) == sorted(state_dict)
  assert all(np.array_equal(written[name].numpy(), state_dict[name]) for name in state_dict)


def test_layer_decay_scales_the_segmenters_updates():
  """config.seg.layer_decay: the first AdamW step (-lr * sign of the gradient) scaled per block,
  the embeddings below the first block, the adapter and the heads at the full rate."""
  overrides = {**ADAPTER_RUN, "seg.layer_decay": 0.5, "weight_decay": 0.0}
  settings = trainer.Settings.from_config(config_with(CONFIG, "/nonexistent", overrides))
  tx, schedule = settings.task.optimizer(settings.optimizer, batch_size=16, epoch_steps=1, total_steps=10)
  model = upernet.create_segmenter(settings.task.model_config(digits_seg.NUM_CLASSES), rngs=nnx.Rngs(0))
  params = jax.tree.map(np.asarray, params_lib.param_tree(model))
  grads = jax.tree.map(np.ones_like, params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  lr = float(schedule(0))
  # float32 Adam rounds its first step to about 1e-5 (bias corrections of 1 - beta).
  close = lambda update, scale: np.testing.assert_allclose(np.asarray(update), -lr * scale, rtol=5e-5)
  a_log = updates["backbone"]["layers"]["mixer"]["A_log"]
  for block in range(4):
    close(a_log[block], 0.5 ** (4 - block))
  close(updates["backbone"]["pos_embed"], 0.5**5)
  close(updates["backbone"]["patch_embed"]["kernel"], 0.5**5)
  close(updates["backbone"]["interactions"]["0"]["injector"]["gamma"], 1.0)
  close(updates["decode_head"]["classifier"]["kernel"], 1.0)
  with pytest.raises(SettingError, match="config.seg.layer_decay"):
    trainer.Settings.from_config(config_with(CONFIG, "/nonexistent", {**overrides, "seg.layer_decay": 1.5}))
