"""Command line of training and evaluation.

  python -m shufflemamba_jax.main --config=configs/digits.py --workdir=/tmp/digits
  python -m shufflemamba_jax.main --config=configs/imagenet.py:shufflemamba_base --workdir=DIR \
      --config.batch_size=1024 --config.model.remat=True
  python -m shufflemamba_jax.main --config=configs/digits.py --workdir=/tmp/digits \
      --mode=evaluate --eval_split=validation --eval_image_size=32

`shufflemamba-train` (console script) is the same as `python -m shufflemamba_jax.main`.
The config is locked: a misspelled `--config.field` is an error; values are checked by
`validate_config` before anything is built.
"""

import math

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Training config file, optionally with an argument: configs/imagenet.py:vim_tiny.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'evaluate'],
                          'train: train (resuming from WORKDIR); evaluate: score a checkpoint.')
_CHECKPOINT = flags.DEFINE_string(
    'checkpoint', None, 'evaluate mode: a checkpoint step folder or workdir (default: --workdir).')
_EVAL_SPLIT = flags.DEFINE_string('eval_split', None, 'evaluate mode: split (default config.eval_split).')
_EVAL_IMAGE_SIZE = flags.DEFINE_integer(
    'eval_image_size', None, 'evaluate mode: resolution (default config.image_size).')

_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'Multi-process: HOST:PORT of process 0 (or JAX_COORDINATOR_ADDRESS); '
    'not needed on TPU VMs and SLURM, where it is detected.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-process: number of processes (or JAX_NUM_PROCESSES).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Multi-process: this process, 0-based (or JAX_PROCESS_ID).')

_SCAN_METHODS = ('auto', 'associative', 'sequential', 'chunked')
_DTYPES = ('float32', 'bfloat16')
# Evaluation metrics that rank checkpoints for keep_best_checkpoints (higher is better).
_BEST_METRICS = ('eval_top1', 'eval_top5', 'ema_eval_top1', 'ema_eval_top5')


def _fail(field: str, value, requirement: str):
  raise ValueError(f'config.{field}={value!r}: {requirement}.')


def validate_config(config) -> None:
  """Raises ValueError naming the field for any invalid value of a training config."""
  import shufflemamba_jax  # The model package knows the variants.

  def positive_int(field, allow_none=False):
    value = config
    for part in field.split('.'):
      value = value[part]
    if value is None and allow_none:
      return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      _fail(field, value, 'must be an integer >= 1')

  def number_in(field, low, high, allow_none=False):
    value = config
    for part in field.split('.'):
      value = value[part]
    if value is None and allow_none:
      return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
      _fail(field, value, 'must be a number')
    if not low <= value <= high:
      _fail(field, value, f'must be in [{low}, {high}]')

  for field in ('batch_size', 'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
                'keep_checkpoints', 'eval_batch_size', 'grad_accum_steps', 'image_size',
                'shuffle_buffer', 'model.slws.group_size'):
    positive_int(field)
  positive_int('total_steps', allow_none=True)
  shards = config.data_shards
  if not isinstance(shards, int) or isinstance(shards, bool) or shards < 0:
    _fail('data_shards', shards, 'must be an integer >= 0 (0 = one shard per process)')
  if shards and config.batch_size % shards:
    _fail('data_shards', shards, f'must divide config.batch_size={config.batch_size}')
  if not isinstance(config.keep_best_checkpoints, int) or config.keep_best_checkpoints < 0:
    _fail('keep_best_checkpoints', config.keep_best_checkpoints, 'must be an integer >= 0')
  if config.best_metric not in _BEST_METRICS:
    _fail('best_metric', config.best_metric, f'must be one of {_BEST_METRICS}')
  if config.best_metric.startswith('ema_') and config.keep_best_checkpoints and not config.ema_decay:
    _fail('best_metric', config.best_metric, 'needs the EMA (config.ema_decay > 0)')
  number_in('num_epochs', 0, math.inf)
  if config.total_steps is None and config.num_epochs <= 0:
    _fail('num_epochs', config.num_epochs, 'must be > 0 when total_steps is not set')
  for field in ('lr', 'warmup_lr', 'min_lr', 'weight_decay', 'warmup_epochs', 'eps'):
    number_in(field, 0, math.inf)
  number_in('grad_clip', 0, math.inf, allow_none=True)
  for field in ('b1', 'b2'):
    number_in(field, 0, 1)
  number_in('ema_decay', 0, 1)
  if config.ema_decay == 1:
    _fail('ema_decay', config.ema_decay, 'must be < 1 (1 would freeze the EMA); 0 turns it off')
  if config.batch_size % config.grad_accum_steps:
    _fail('grad_accum_steps', config.grad_accum_steps,
          f'must divide config.batch_size={config.batch_size}')

  if config.model.variant not in shufflemamba_jax.VARIANTS:
    _fail('model.variant', config.model.variant,
          f'unknown variant; choose one of {sorted(shufflemamba_jax.VARIANTS)}')
  number_in('model.slws.max_prob', 0, 1, allow_none=True)
  if config.model.slws.schedule not in ('linear', 'constant'):
    _fail('model.slws.schedule', config.model.slws.schedule, 'must be "linear" or "constant"')
  number_in('model.drop_path_rate', 0, 1, allow_none=True)
  if config.model.scan_method is not None and config.model.scan_method not in _SCAN_METHODS:
    _fail('model.scan_method', config.model.scan_method, f'must be one of {_SCAN_METHODS}')
  if config.model.dtype not in _DTYPES:
    _fail('model.dtype', config.model.dtype, f'must be one of {_DTYPES}')
  for field in ('patch_size', 'embed_dim', 'depth', 'd_state', 'chunk_size'):
    positive_int(f'model.{field}', allow_none=True)

  aug = config.aug
  for field in ('mixup_prob', 'mixup_switch_prob', 'label_smoothing', 'random_erasing_prob',
                'crop_area_min', 'eval_crop_ratio', 'color_jitter'):
    number_in(f'aug.{field}', 0, 1)
  for field in ('mixup_alpha', 'cutmix_alpha', 'randaugment_magnitude',
                'randaugment_magnitude_std'):
    number_in(f'aug.{field}', 0, math.inf)
  if aug.eval_crop_ratio == 0:
    _fail('aug.eval_crop_ratio', aug.eval_crop_ratio, 'must be > 0')
  if aug.crop_ratio_min > aug.crop_ratio_max or aug.crop_ratio_min <= 0:
    _fail('aug.crop_ratio_min', aug.crop_ratio_min,
          f'must be > 0 and <= aug.crop_ratio_max={aug.crop_ratio_max}')
  for field in ('randaugment_num_ops', 'repeated_aug'):
    value = aug[field]
    if not isinstance(value, int) or value < (0 if field == 'randaugment_num_ops' else 1):
      _fail(f'aug.{field}', value, 'must be an integer >= ' + ('0' if field == 'randaugment_num_ops' else '1'))

  # Building the model config runs the model's own checks (e.g. shapes that do not fit).
  from shufflemamba_jax import train  # pylint: disable=g-import-not-at-top
  patch_size = config.model.patch_size or _model_default('patch_size')
  if config.image_size % patch_size:
    _fail('image_size', config.image_size, f'must be divisible by the patch size {patch_size}')
  try:
    shufflemamba_jax.model_config(
        config.model.variant, img_size=config.image_size, **train.model_overrides(config))
  except ValueError as error:
    raise ValueError(f'config.model: {error}') from error


def _model_default(field: str):
  import dataclasses  # pylint: disable=g-import-not-at-top
  import shufflemamba_jax  # pylint: disable=g-import-not-at-top
  return {f.name: f.default for f in dataclasses.fields(shufflemamba_jax.VisionMambaConfig)}[field]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _WORKDIR.value is None and not (_MODE.value == 'evaluate' and _CHECKPOINT.value):
    raise app.UsageError('--workdir is required.')
  config = _CONFIG.value
  if config is None:
    raise app.UsageError('--config is required, e.g. --config=configs/digits.py.')
  validate_config(config)

  import jax  # pylint: disable=g-import-not-at-top
  from shufflemamba_jax import distributed  # pylint: disable=g-import-not-at-top
  from shufflemamba_jax import train  # pylint: disable=g-import-not-at-top

  # Before anything touches the devices: joins the processes of a multi-host run.
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)

  logging.info('JAX devices: %s', jax.devices())
  if _MODE.value == 'train':
    train.train_and_evaluate(config, _WORKDIR.value)
  else:
    record = train.evaluate(config, _CHECKPOINT.value or config.init_from or _WORKDIR.value,
                            split=_EVAL_SPLIT.value, image_size=_EVAL_IMAGE_SIZE.value)
    print(record)


def run():
  """Console-script entry point (`shufflemamba-train`)."""
  app.run(main)


if __name__ == '__main__':
  run()
