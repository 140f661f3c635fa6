"""Shared defaults for every training config (ImageNet recipes and the digits example).

Not a runnable experiment by itself: `configs/imagenet.py` and `configs/digits.py` start from
`get_config()` here and change what their recipe needs. Every field is documented below; the
config is locked, so a misspelled field (in a config file or on the command line) is an error.
A `None` model field means "keep the variant's own value" (see `shufflemamba_jax.VARIANTS`).
"""

import ml_collections
from ml_collections import config_dict

from shufflemamba_jax.data import IMAGENET_MEAN, IMAGENET_STD
from shufflemamba_jax.parallel.sharding import CHIPS


def get_config():
  """Returns the locked default ConfigDict (DeiT / ShuffleMamba-B style ImageNet training)."""
  config = ml_collections.ConfigDict()

  # ---- Run ---------------------------------------------------------------------------------
  config.seed = 0  # Seeds parameter init, data order and the per-step training keys.
  config.batch_size = 1024  # Global batch size (all devices and micro-batches together).
  config.num_epochs = 300  # Length of training in epochs of the train split.
  # If set, the number of optimizer steps, overriding num_epochs (warmup stays in epochs).
  config.total_steps = config_dict.placeholder(int)
  config.log_every_steps = 100  # Train metrics (loss, top-1, lr, grad norm, speed) period.
  config.eval_every_steps = 5000  # Evaluation (model and EMA) period; also at the end.
  config.checkpoint_every_steps = 5000  # Checkpoint period; also at the end.
  config.keep_checkpoints = 3  # How many recent checkpoints the manager keeps.
  # Besides those, how many of the best by `best_metric` to keep (every evaluation then saves).
  config.keep_best_checkpoints = 1
  config.best_metric = "eval_top1"  # "eval_top1" | "eval_top5" | "ema_eval_top1" | "ema_eval_top5".
  config.async_checkpointing = True  # Write checkpoints in the background (Orbax async).
  config.eval_batch_size = 1024  # Global batch size of evaluation.
  # Workdir (or checkpoint step folder) whose parameters initialise training (multi-stage
  # recipes); position embeddings are resized to the new resolution. None = random init.
  config.init_from = config_dict.placeholder(str)
  # "classification" | "segmentation"; None = the dataset's (segmentation for label maps).
  config.task = config_dict.placeholder(str)
  # (first, last): a jax.profiler trace of training steps first..last-1 in WORKDIR/profile
  # (TensorBoard's profile plugin or Perfetto reads it); None = no trace.
  config.profile_steps = config_dict.placeholder(tuple)

  # ---- Model -------------------------------------------------------------------------------
  config.model = ml_collections.ConfigDict()
  config.model.variant = "shufflemamba_base"  # A key of shufflemamba_jax.VARIANTS.
  # Overrides of VisionMambaConfig fields; None keeps the variant's value.
  config.model.patch_size = config_dict.placeholder(int)
  config.model.embed_dim = config_dict.placeholder(int)  # Width D.
  config.model.depth = config_dict.placeholder(int)  # Number of bidirectional Mamba blocks.
  config.model.d_state = config_dict.placeholder(int)  # SSM state size N.
  config.model.norm = config_dict.placeholder(str)  # "rmsnorm" | "layernorm" (blocks and norm_f).
  config.model.drop_path_rate = config_dict.placeholder(float)  # Stochastic depth (last block).
  # Selective-scan implementation: "associative" | "sequential" | "chunked" (None: chunked).
  config.model.scan_method = config_dict.placeholder(str)
  config.model.chunk_size = config_dict.placeholder(int)  # Chunk length of the chunked scan (None: 16).
  # Rematerialise blocks in the backward pass (None: True, what large models need; BENCHMARKS.md).
  config.model.remat = config_dict.placeholder(bool)
  config.model.dtype = "bfloat16"  # Computation dtype ("float32" | "bfloat16"); params float32.
  # Stochastic layer-wise shuffle (SPEC section 1); training only.
  config.model.slws = ml_collections.ConfigDict()
  # P: shuffle probability of the last layer, in [0, 1]; None = the variant's (0.5 ShuffleMamba,
  # 0.1 ShuffleMamba-Reg, 0 Vim).
  config.model.slws.max_prob = config_dict.placeholder(float)
  config.model.slws.schedule = "linear"  # "linear" (0 .. P over depth) | "constant" ([0, P, ..]).
  # Consecutive samples sharing one draw and one permutation (256 = reference per-GPU batch).
  config.model.slws.group_size = 256

  # ---- Data (read by shufflemamba_jax.data.pipeline) ---------------------------------------
  config.dataset = "imagenet2012"  # "digits" | "imagenet2012" (a TFDS name).
  config.data_dir = config_dict.placeholder(str)  # TFDS data_dir; None = TFDS default.
  config.train_split = "train"
  config.eval_split = "validation"
  config.image_size = 224  # Training (and default evaluation) resolution in pixels.
  config.shuffle_buffer = 16_384  # tf.data shuffle buffer of the training stream, in examples.
  config.data_shards = 0  # Train data shards, a multiple of the process count; 0 = one per process.

  config.aug = ml_collections.ConfigDict()
  config.aug.inception_crop = True  # RandomResizedCrop; False = plain resize (tiny images).
  config.aug.crop_area_min = 0.08  # Smallest crop area fraction.
  config.aug.crop_ratio_min = 3 / 4  # Crop aspect-ratio range.
  config.aug.crop_ratio_max = 4 / 3
  config.aug.hflip = True  # Random horizontal flip.
  config.aug.randaugment_num_ops = 2  # RandAugment ops per image; 0 = off.
  config.aug.randaugment_magnitude = 9
  config.aug.randaugment_magnitude_std = 0.5
  config.aug.color_jitter = 0.3  # Brightness/contrast/saturation strength; 0 = off.
  config.aug.random_erasing_prob = 0.25  # Random erasing (pixel mode) probability; on the device.
  config.aug.repeated_aug = 3  # Repeated augmentation count; 1 = off.
  config.aug.mean = IMAGENET_MEAN  # Per-channel normalisation of [0, 1] pixels, on the device.
  config.aug.std = IMAGENET_STD
  config.aug.eval_crop_ratio = 0.875  # Evaluation: resize to size / ratio, then center crop.
  # Applied inside the jitted train step (shufflemamba_jax.training.mixup), timm semantics.
  config.aug.mixup_alpha = 0.8  # Beta(alpha, alpha) for mixup; 0 = no mixup.
  config.aug.cutmix_alpha = 1.0  # Beta(alpha, alpha) for cutmix; 0 = no cutmix.
  config.aug.mixup_prob = 1.0  # Probability that a group is mixed at all.
  config.aug.mixup_switch_prob = 0.5  # Probability of cutmix instead of mixup when both on.
  # Consecutive samples mixed among themselves with one draw (128 = the reference per-GPU batch,
  # 8 x 128 = 1024). Must divide the batch; a divisor of each device's share stays on it.
  config.aug.mixup_group_size = 128
  config.aug.label_smoothing = 0.1  # Label smoothing of the (mixed) soft targets.

  # ---- Optimizer (shufflemamba_jax.training.optim) ----------------------------------------
  config.lr = 5e-4  # Base peak learning rate per 512 images.
  config.lr_scale_batch = True  # True: peak lr = lr * batch_size / 512; False: peak lr = lr.
  config.warmup_epochs = 5.0  # Linear warmup length in epochs (from warmup_lr to peak).
  config.warmup_lr = 1e-6  # Learning rate at step 0.
  config.min_lr = 1e-5  # Learning rate at the end of the cosine decay.
  config.weight_decay = 0.05  # AdamW decoupled weight decay (masked, see optim.py).
  config.b1 = 0.9  # AdamW betas and epsilon.
  config.b2 = 0.999
  config.eps = 1e-8
  config.grad_clip = config_dict.placeholder(float)  # Global-norm clipping; None = off.
  config.grad_accum_steps = 1  # Micro-batches per optimizer step (inside one jitted step).
  # The most examples one device of each chip computes at once (None: its whole share of the batch).
  # On a chip whose share is larger, the step accumulates gradients over more micro-batches than
  # grad_accum_steps, so that a recipe runs unchanged on chips with less memory
  # (`python -m shufflemamba_jax.compile` checks a run against a chip; BENCHMARKS.md).
  config.max_device_batch = ml_collections.ConfigDict({chip: config_dict.placeholder(int) for chip in CHIPS})
  config.ema_decay = 0.0  # EMA of the parameters, updated every step; 0 = off.

  # ---- Devices (shufflemamba_jax.parallel.sharding) -------------------------------------------
  # Mesh axes: the batch is split over data x fsdp; parameters and optimizer state are split
  # over fsdp. One size may be -1 (the rest of the devices); without -1, a smaller mesh uses the
  # first devices (data=1, fsdp=1 trains on one device).
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1
  config.mesh.fsdp = 1
  config.mesh.fsdp_min_size = 2**16  # Parameters with fewer elements stay replicated.

  config.lock()

  return config
