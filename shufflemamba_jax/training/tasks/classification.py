"""Image classification (SPEC §4): a Vision Mamba / ShuffleMamba with the DeiT recipe.

Train metrics: loss, train_top1, grad_norm, lr. Evaluation: top1, top5 and loss (means over the
split). `predict` prints each image's top-k classes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx

from shufflemamba_jax import checks
from shufflemamba_jax.data import device, pipeline
from shufflemamba_jax.models import vim
from shufflemamba_jax.training import mixup, optim, steps
from shufflemamba_jax.training.tasks import base
from shufflemamba_jax.weights import checkpoint as checkpoint_lib
from shufflemamba_jax.weights import params as params_lib

_PROGRESS_ABOVE = 8  # Images; fewer finish before a progress bar would say anything.

_LOGGER = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ClassificationTask:
  """The classification part of a run (configs/default.py documents each field)."""

  model: vim.VisionMambaConfig  # For the variant's number of classes until the data is known.
  mixup: mixup.MixupSettings
  batch_size: int
  grad_accum_steps: int

  name = "classification"
  ranking_metrics = ("top1", "top5")

  @classmethod
  def from_config(cls, config) -> ClassificationTask:
    if config.batch_size % config.grad_accum_steps:
      raise checks.SettingError(
        "config.grad_accum_steps", config.grad_accum_steps, f"must divide config.batch_size={config.batch_size}"
      )
    settings = mixup.MixupSettings.from_config(config)
    settings.check_batch(config.batch_size)
    return cls(base.backbone_config(config), settings, config.batch_size, config.grad_accum_steps)

  def model_config(self, num_classes: int) -> vim.VisionMambaConfig:
    return dataclasses.replace(self.model, num_classes=num_classes)

  def create_model(self, model_config, rngs: nnx.Rngs) -> vim.VisionMamba:
    return vim.VisionMamba(model_config, rngs=rngs)

  def check_data(self, num_classes: int, dataset: str) -> None:
    del num_classes, dataset  # Any number of classes: the head follows the data.

  def optimizer(self, settings: optim.OptimizerSettings, *, batch_size: int, epoch_steps: int, total_steps: int):
    schedule = optim.learning_rate_schedule(
      settings, batch_size=batch_size, steps_per_epoch=epoch_steps, total_steps=total_steps
    )
    return optim.create_optimizer(settings, schedule), schedule

  def warm_start(self, path: str, params: dict, model_config) -> dict:
    return init_params_from(path, params, model_config)

  def make_train_step(self, graphdef, rest, tx, schedule, *, batch_sharding=None, **common) -> Callable:
    if batch_sharding is not None:
      self.mixup.check_batch(self.batch_size, batch_sharding.mesh.size)
    return make_train_step(
      graphdef,
      rest,
      tx,
      schedule,
      mixup_settings=self.mixup,
      grad_accum_steps=self.grad_accum_steps,
      batch_sharding=batch_sharding,
      **common,
    )

  def evaluation(self, config, graphdef, rest, num_classes: int, transform: device.DeviceTransform, mesh, **options):
    """Batched sums of `eval_sums` over the split's global batches (`base.batched_evaluation`)."""
    options.pop("results_dir", None)  # Its numbers are the record: no files to write.
    return base.batched_evaluation(self.eval_sums(graphdef, rest, num_classes, transform), config, mesh, **options)

  def batch_shapes(self, config, global_batch: int, split: str) -> dict[str, jax.ShapeDtypeStruct]:
    """uint8 images (batch, size, size, 3) and int32 labels; evaluation adds a float32 mask."""
    size = config.image_size
    shapes = {
      "image": jax.ShapeDtypeStruct((global_batch, size, size, 3), jnp.uint8),
      "label": jax.ShapeDtypeStruct((global_batch,), jnp.int32),
    }
    if split == "eval":
      shapes["mask"] = jax.ShapeDtypeStruct((global_batch,), jnp.float32)
    return shapes

  def trace_evaluation(self, config, graphdef, rest, num_classes, transform, mesh, params, model_state):
    sums = self.eval_sums(graphdef, rest, num_classes, transform)
    return base.trace_batched_evaluation(self, sums, config, mesh, params, model_state)

  def eval_sums(self, graphdef, rest, num_classes: int, transform: device.DeviceTransform) -> Callable:
    """`sums(params, model_state, batch)`, traced under `jit` on a global batch."""
    del num_classes

    def sums(params, model_state, batch):
      """top1, top5 (correct counts) and loss (cross-entropy sum) of the real examples."""
      del model_state  # A classifier has none.
      logits = nnx.merge(graphdef, params, rest)(transform(batch["image"]), train=False)
      labels, mask = batch["label"], batch["mask"].astype(jnp.float32)
      _, top_k = jax.lax.top_k(logits, min(5, logits.shape[-1]))
      top1 = (top_k[:, 0] == labels).astype(jnp.float32)
      top5 = jnp.any(top_k == labels[:, None], axis=-1).astype(jnp.float32)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
      return {"top1": jnp.sum(top1 * mask), "top5": jnp.sum(top5 * mask), "loss": jnp.sum(loss * mask)}

    return sums

  def reduce(self, totals: dict) -> tuple[dict, dict]:
    count = max(float(totals["num_examples"]), 1.0)
    return {name: float(totals[name]) / count for name in ("top1", "top5", "loss")}, {}

  @staticmethod
  def predict(saved, paths: list[str], options) -> int:
    return predict(saved, paths, options)


def init_params_from(path: str, params, config: vim.VisionMambaConfig, *, option: str = "config.init_from"):
  """`params` (a nested dict) holding the parameters saved at `path` (a workdir, a step folder or
  converted weights): position embeddings resized to `config`'s grid, and the head of `params`
  kept when the number of classes differs. Anything else that does not fit is one error naming
  `option`, the setting that gave `path`, and every difference."""
  source = f"{option}={path}"
  saved = checkpoint_lib.read_weights(path, ema=False)
  flat = params_lib.adapt(params_lib.flatten(saved.params), params, config, source=source)
  return params_lib.fill(params, flat, source=source)


def make_train_step(
  graphdef,
  rest,
  tx: optax.GradientTransformation,
  schedule: Callable,
  *,
  num_classes: int,
  seed: int,
  mixup_settings: mixup.MixupSettings,
  input_transform: device.DeviceTransform = device.IMAGENET,
  grad_accum_steps: int = 1,
  ema_decay: float = 0.0,
  donate: bool = True,
  state_shardings=None,
  batch_sharding=None,
):
  """Returns `train_step(state, batch) -> (state, metrics)`, one jitted pure function.

  batch: {"image": (batch, H, W, 3) uint8, "label": (batch,) int32} (global batch on the
  leading axis), normalized and randomly erased by `input_transform` on the device, then mixed
  (`mixup_settings`). One call is one optimizer update: with `grad_accum_steps` = A > 1 the
  batch is mixed as a whole, split into A equal micro-batches (every A-th sample, so each takes
  its share of every device's samples) and their gradients averaged in a scan, which equals one
  big-batch step for a deterministic model. Micro-batch m uses fold_in(model key, m).
  metrics: float32 scalars loss, train_top1 (against the unmixed labels), grad_norm, lr.
  """

  def loss_fn(params, images, targets, key):
    model = nnx.merge(graphdef, params, rest)
    logits = model(images, train=True, key=key)
    return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)), logits

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state, batch):
    step = state["step"]
    mix_key, model_key, erase_key = jax.random.split(jax.random.fold_in(jax.random.key(seed), step), 3)
    labels = batch["label"]
    images = input_transform(batch["image"], erase_key)
    images, targets, _ = mixup.mix_batch(mix_key, images, labels, num_classes=num_classes, settings=mixup_settings)
    params = state["params"]

    if grad_accum_steps == 1:
      (loss, logits), grads = grad_fn(params, images, targets, model_key)
    else:
      batch_size = images.shape[0]

      def to_micro_batches(x):
        # Micro-batch m takes rows m, m + A, m + 2A, ... (A = grad_accum_steps): an equal share of
        # every device's rows, so no micro-batch has to move between devices.
        return jnp.swapaxes(x.reshape((batch_size // grad_accum_steps, grad_accum_steps) + x.shape[1:]), 0, 1)

      micro_batches = [to_micro_batches(x) for x in (images, targets)]

      def accumulate(carry, xs):
        grad_sum, loss_sum = carry
        index, image, target = xs
        (loss, logits), grads = grad_fn(params, image, target, jax.random.fold_in(model_key, index))
        return (jax.tree.map(jnp.add, grad_sum, grads), loss_sum + loss), logits

      zeros = jax.tree.map(jnp.zeros_like, params)
      (grad_sum, loss_sum), logits = jax.lax.scan(
        accumulate, (zeros, jnp.zeros((), jnp.float32)), (jnp.arange(grad_accum_steps), *micro_batches)
      )
      grads = jax.tree.map(lambda g: g / grad_accum_steps, grad_sum)
      loss = loss_sum / grad_accum_steps
      logits = jnp.swapaxes(logits, 0, 1).reshape((batch_size,) + logits.shape[2:])

    new_params, opt_state, ema, nonfinite_step = steps.apply_gradients(state, grads, loss, tx, ema_decay)
    new_state = dict(
      state, step=step + 1, params=new_params, opt_state=opt_state, ema=ema, nonfinite_step=nonfinite_step
    )
    metrics = {
      "loss": loss,
      "train_top1": jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)),
      "grad_norm": optax.tree.norm(grads),
      "lr": schedule(step),
    }
    return new_state, metrics

  return steps.jit_train_step(train_step, donate, state_shardings, batch_sharding)


# ---- predict ------------------------------------------------------------------------------


def image_batches(paths: list[str], image_size: int, crop_ratio: float = 0.875, batch_size: int = 32):
  """Yields (uint8 (batch, image_size, image_size, 3), bool (batch,) ok) batches of the files.

  Each image goes through evaluation's own transform; one that fails to decode has ok False (and
  a warning naming it). Every batch has min(batch_size, len(paths)) rows: the last is padded.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (only for reading images)

  from shufflemamba_jax.data import decodable  # pylint: disable=g-import-not-at-top

  def encoded():
    for path in paths:
      data = epath.Path(path).read_bytes()
      # Checked here, in Python: a few files, not a stream of millions.
      error = decodable.decode_error(data)
      if error:
        _LOGGER.warning("Cannot decode %s (%s): it gets no prediction.", path, error)
      yield data, error is None

  signature = (tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.bool))
  zeros = tf.zeros([image_size, image_size, 3], tf.uint8)
  dataset = tf.data.Dataset.from_generator(encoded, output_signature=signature)
  dataset = dataset.map(
    lambda data, ok: (tf.cond(ok, lambda: pipeline.eval_image(data, image_size, crop_ratio), lambda: zeros), ok)
  )
  batch_size = min(batch_size, len(paths))
  for images, ok in dataset.batch(batch_size).prefetch(1).as_numpy_iterator():
    padding = batch_size - len(images)
    yield np.pad(images, [(0, padding), (0, 0), (0, 0), (0, 0)]), np.pad(ok, [(0, padding)])


class Predictor:
  """Class probabilities of uint8 image batches, jitted once per input shape.

  The weights are an argument of the jitted function, not constants baked into it, so calls
  with new images (of a shape seen before) reuse the compiled program.
  """

  def __init__(self, model, transform: device.DeviceTransform = device.IMAGENET, top_k: int = 5):
    self.graphdef, self.state = nnx.split(model)
    self.top_k = min(top_k, model.config.num_classes)

    def probabilities(state, images):
      logits = nnx.merge(self.graphdef, state)(transform(images))
      return jax.lax.top_k(jax.nn.softmax(logits.astype(np.float32), axis=-1), self.top_k)

    self.function = jax.jit(probabilities)

  def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (batch, H, W, 3) -> top-k (probabilities float32, class indices int32), each (batch, k)."""
    top_probs, top_indices = self.function(self.state, images)
    return np.asarray(top_probs), np.asarray(top_indices)


def predict(saved: checkpoint_lib.SavedWeights, paths: list[str], options) -> int:
  """Prints the top `options.top_k` classes of each image (one JSON object per image with
  `options.json`), in batches of `options.batch_size` at `options.image_size` (None: the model's);
  returns 1 if an image could not be read, else 0."""
  model, run_config = saved.model(), saved.run_config
  aug = run_config.get("aug", {})
  transform = device.DeviceTransform.of_run(run_config)
  predictor = Predictor(model, transform, options.top_k)
  try:
    names = pipeline.class_names(run_config.get("dataset", "imagenet2012"))
  except Exception:  # Names are a convenience: fall back to indices.
    names = ()
  if len(names) != model.config.num_classes:
    names = [str(index) for index in range(model.config.num_classes)]
  progress = None
  if len(paths) > _PROGRESS_ABOVE:
    import tqdm  # pylint: disable=g-import-not-at-top

    progress = tqdm.tqdm(total=len(paths), unit="image", file=sys.stderr)
  unreadable = []
  size = options.image_size or model.config.img_size
  remaining = iter(paths)
  for images, ok in image_batches(paths, size, aug.get("eval_crop_ratio", 0.875), options.batch_size):
    probs, indices = predictor(images)
    for row_probs, row_indices, row_ok, path in zip(probs, indices, ok, remaining):
      if not row_ok:
        unreadable.append(path)
        continue
      top = [{"class": names[i], "index": int(i), "probability": float(p)} for p, i in zip(row_probs, row_indices)]
      if options.json:
        print(json.dumps({"image": path, "top": top}))
      else:
        print(path)
        for entry in top:
          print(f"  {entry['probability']:7.2%}  {entry['class']} ({entry['index']})")
    if progress is not None:
      progress.update(int(min(len(images), progress.total - progress.n)))
  if progress is not None:
    progress.close()
  for path in unreadable:
    print(f"error: cannot read image {path}", file=sys.stderr)
  return 1 if unreadable else 0
