"""Training-step benchmark: compile time, XLA memory and FLOPs, step time, images/s and MFU.

Builds the real training step (`training.tasks.classification.make_train_step`: mixup/cutmix, soft-target loss, masked
AdamW with clipping, EMA) for a named variant on synthetic in-memory data, compiles it ahead of
time from abstract shapes (so `--compile_only` of a large model never allocates its state), and
reads XLA's compiled memory and cost analyses. It needs only jax, flax and optax; no TensorFlow.

  python -m shufflemamba_jax.benchmark --variant shufflemamba_tiny --img_size 224 --batch_size 8 \
      --steps 10 --json
  python -m shufflemamba_jax.benchmark --variant shufflemamba_base --batch_size 256 \
      --dtype bfloat16 --compile_only --json
  python -m shufflemamba_jax.benchmark --variant shufflemamba_tiny --batch_size 8 --compare_slws

`--compare_slws` compiles P = 0 and P = `--slws_prob` (0.5 when not given) and times their steps
alternately in one process, so slow drifts of a shared machine hit both equally.

JSON keys: compile_s (tracing, lowering and XLA compilation) and lower_s (its first two parts);
temp_bytes, argument_bytes, output_bytes, alias_bytes (XLA's compiled memory analysis) and
peak_bytes = temp + argument + output - alias; flops_xla (XLA's
cost analysis, which counts a while-loop body once, so the lax.scan over layers is counted as one
layer) and flops_analytic (`analytic_train_flops`); step_time_median_s, step_times_s and
images_per_s (None with --compile_only); mfu with --peak_tflops; slws_overhead_ratio (median P>0
step / median P=0 step), slws_pair_ratio_median and the *_p0 timings with --compare_slws; and
the settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from shufflemamba_jax.data import device
from shufflemamba_jax.models import ssm, variants, vim
from shufflemamba_jax.training import mixup, optim, steps
from shufflemamba_jax.training.tasks import classification

REMAT_CHOICES = ("none",) + tuple(vim.REMAT_POLICIES)
NUM_CLASSES = 1000

# SPEC §4 recipe values that shape the step's work: AdamW with clipping, EMA, mixup/cutmix.
_OPTIMIZER = optim.OptimizerSettings(
  lr=2e-3,
  lr_scale_batch=False,
  warmup_epochs=1.0,
  warmup_lr=5e-7,
  min_lr=5e-6,
  weight_decay=0.1,
  b1=0.9,
  b2=0.95,
  eps=1e-8,
  grad_clip=3.0,
  ema_decay=0.9999,
)
# The recipe's mixup over the benchmark's whole (one-device) batch, and its random erasing.
_MIXUP = mixup.MixupSettings(
  mixup_alpha=0.8, cutmix_alpha=1.0, mixup_prob=1.0, mixup_switch_prob=0.5, label_smoothing=0.1, mixup_group_size=1
)
_INPUT = device.DeviceTransform(random_erasing_prob=0.25)

MARKDOWN_HEADER = (
  "| variant | px | batch | method | chunk | remat | dtype | P | compile s | temp GiB | arg GiB "
  "| out GiB | peak GiB | GFLOP/step XLA | GFLOP/step analytic | step s (median) | img/s | MFU |\n"
  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


@dataclasses.dataclass(frozen=True)
class Settings:
  """One benchmark configuration (the command-line flags)."""

  variant: str = "shufflemamba_tiny"
  img_size: int = 224
  batch_size: int = 8
  method: str = ssm.DEFAULT_SCAN_METHOD
  chunk_size: int = ssm.DEFAULT_CHUNK_SIZE
  remat: str = "nothing_saveable"  # A rematerialization policy, or "none"
  dtype: str = "float32"
  slws_prob: float | None = None  # None: the variant's own max shuffle probability
  overrides: tuple = ()  # extra VisionMambaConfig overrides as (name, value) pairs

  def model_overrides(self, slws_prob: float | None = None) -> dict:
    prob = self.slws_prob if slws_prob is None else slws_prob
    settings = dict(self.overrides)
    settings.update(scan_method=self.method, chunk_size=self.chunk_size, dtype=self.dtype)
    if self.remat == "none":
      settings["remat"] = False
    else:
      settings.update(remat=True, remat_policy=self.remat)
    if prob is not None:
      settings["slws_max_prob"] = float(prob)
    return settings


# ----------------------------------------------------------------------------------------------
# Analytic FLOP count
# ----------------------------------------------------------------------------------------------
# Scan work per (token, channel, state) element and direction: discretization 3 (delta*A, exp,
# (delta*u)*B), recurrence 2 (multiply, add), readout 2 (multiply by C, sum over state).
SCAN_FLOPS_PER_ELEMENT = 7
# Per (token, channel) and direction: softplus(delta + bias) 2, D*u + y 2, silu(z) gate 2, silu(x) 1.
SCAN_FLOPS_PER_CHANNEL = 7


def analytic_forward_flops(config: vim.VisionMambaConfig, img_size: int) -> int:
  """Forward FLOPs of one image: matmuls (2 per multiply-add) plus the scan's elementwise work.

  Counted: patch embedding, per layer in_proj and out_proj and per direction conv1d, x_proj,
  dt_proj and the scan (see SCAN_FLOPS_PER_ELEMENT), the register neck and the head. Norms,
  residual adds and the SLWS gathers are left out (a few FLOPs per activation).
  """
  dim, depth, state = config.embed_dim, config.depth, config.d_state
  inner = config.expand * dim
  rank = config.dt_rank or math.ceil(dim / 16)
  patches = (img_size // config.patch_size) ** 2
  length = patches + config.num_extra_tokens
  flops = 2 * patches * config.patch_size**2 * 3 * dim
  per_direction = (
    2 * length * inner * config.d_conv  # depthwise conv
    + 2 * length * inner * (rank + 2 * state)  # x_proj
    + 2 * length * rank * inner  # dt_proj
    + SCAN_FLOPS_PER_ELEMENT * length * inner * state
    + SCAN_FLOPS_PER_CHANNEL * length * inner
  )
  per_layer = 2 * length * dim * 2 * inner + 2 * length * inner * dim + 2 * per_direction
  flops += depth * per_layer
  head_in = dim
  if config.token_layout == "registers":
    reduced = dim // config.cls_reduce
    head_in = config.num_extra_tokens * reduced
    if config.has_neck:
      flops += 2 * config.num_extra_tokens * dim * reduced
  return flops + 2 * head_in * config.num_classes


def analytic_train_flops(config: vim.VisionMambaConfig, img_size: int, batch_size: int) -> int:
  """Model FLOPs of one training step: 3x the forward (backward = 2x forward), rematerialization excluded."""
  return 3 * batch_size * analytic_forward_flops(config, img_size)


# ----------------------------------------------------------------------------------------------
# Building and compiling the step
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CompiledStep:
  config: vim.VisionMambaConfig
  compiled: object
  init_state: object  # () -> the train state (jitted, allocates)
  abstract_batch: dict
  compile_s: float
  lower_s: float


def build_step(settings: Settings, slws_prob: float | None = None) -> CompiledStep:
  """Lowers and compiles the real training step from abstract state and batch shapes."""
  overrides = settings.model_overrides(slws_prob)

  config = variants.model_config(settings.variant, num_classes=NUM_CLASSES, img_size=settings.img_size, **overrides)

  def new_model():
    return vim.VisionMamba(config, rngs=nnx.Rngs(0))

  graphdef, _, rest = steps.split_model(nnx.eval_shape(new_model))
  schedule = optim.learning_rate_schedule(
    _OPTIMIZER, batch_size=settings.batch_size, steps_per_epoch=100, total_steps=1000
  )
  tx = optim.create_optimizer(_OPTIMIZER, schedule)

  def init_state():
    _, params, _ = steps.split_model(new_model())
    return steps.init_train_state(params, tx, ema_decay=_OPTIMIZER.ema_decay)

  step = classification.make_train_step(
    graphdef,
    rest,
    tx,
    schedule,
    num_classes=NUM_CLASSES,
    seed=0,
    mixup_settings=dataclasses.replace(_MIXUP, mixup_group_size=settings.batch_size),
    input_transform=_INPUT,
    ema_decay=_OPTIMIZER.ema_decay,
  )
  abstract_state = jax.eval_shape(init_state)
  abstract_batch = {
    "image": jax.ShapeDtypeStruct((settings.batch_size, settings.img_size, settings.img_size, 3), jnp.uint8),
    "label": jax.ShapeDtypeStruct((settings.batch_size,), jnp.int32),
  }
  start = time.perf_counter()
  lowered = step.lower(abstract_state, abstract_batch)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  done = time.perf_counter()
  return CompiledStep(
    config, compiled, jax.jit(init_state), abstract_batch, compile_s=done - start, lower_s=lowered_at - start
  )


def _xla_flops(compiled) -> float | None:
  analysis = compiled.cost_analysis()
  if not analysis or "flops" not in analysis:
    return None
  return float(analysis["flops"])


def _synthetic_batch(abstract_batch: dict, seed: int = 0) -> dict:
  image_key, label_key = jax.random.split(jax.random.key(seed))
  image = abstract_batch["image"]
  return {
    "image": jax.random.randint(image_key, image.shape, 0, 256).astype(image.dtype),
    "label": jax.random.randint(label_key, abstract_batch["label"].shape, 0, NUM_CLASSES, jnp.int32),
  }


def _timed_step(compiled, state, batch):
  start = time.perf_counter()
  state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  return state, time.perf_counter() - start


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------
def run(
  settings: Settings,
  *,
  steps: int = 10,
  warmup: int = 2,
  compile_only: bool = False,
  compare_slws: bool = False,
  peak_tflops: float | None = None,
) -> dict:
  """Measures one setting; returns the JSON record (keys in the module docstring)."""
  if compare_slws and compile_only:
    raise ValueError("--compare_slws times steps; it cannot be combined with --compile_only")
  if steps < 1 or warmup < 0:
    raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}")
  slws_prob = settings.slws_prob
  if compare_slws and not slws_prob:
    slws_prob = 0.5
  main = build_step(settings, slws_prob)
  print(f"compiled in {main.compile_s:.1f} s", file=sys.stderr, flush=True)
  config = main.config
  memory = main.compiled.memory_analysis()
  record = {
    "variant": settings.variant,
    "img_size": settings.img_size,
    "batch_size": settings.batch_size,
    "method": config.scan_method,
    "chunk_size": config.chunk_size,
    "remat": settings.remat,
    "dtype": settings.dtype,
    "slws_prob": config.slws_max_prob,
    "sequence_length": (settings.img_size // config.patch_size) ** 2 + config.num_extra_tokens,
    "backend": jax.default_backend(),
    "device": jax.devices()[0].device_kind,
    "lower_s": main.lower_s,
    "compile_s": main.compile_s,
    **{
      f"{part}_bytes": int(getattr(memory, f"{part}_size_in_bytes")) for part in ("temp", "argument", "output", "alias")
    },
    "flops_xla": _xla_flops(main.compiled),
    "flops_analytic": analytic_train_flops(config, settings.img_size, settings.batch_size),
    "step_time_median_s": None,
    "images_per_s": None,
  }
  # Live at once: inputs, outputs not written in place of a donated input, and scratch.
  record["peak_bytes"] = (
    record["temp_bytes"] + record["argument_bytes"] + record["output_bytes"] - record["alias_bytes"]
  )
  if peak_tflops:
    record["peak_tflops"] = peak_tflops
    record["mfu"] = None
  if compile_only:
    return record

  batch = _synthetic_batch(main.abstract_batch)
  runs = [(main, main.init_state())]
  if compare_slws:
    baseline = build_step(settings, 0.0)
    record["compile_s_p0"] = baseline.compile_s
    runs.insert(0, (baseline, baseline.init_state()))
  states = [state for _, state in runs]
  times = [[] for _ in runs]
  for index in range(warmup + steps):
    # Alternating the settings step by step spreads machine noise evenly over both.
    for which, (compiled_step, _) in enumerate(runs):
      states[which], seconds = _timed_step(compiled_step.compiled, states[which], batch)
      print(
        f"step {index} ({'warm-up' if index < warmup else 'timed'}), P={compiled_step.config.slws_max_prob}: "
        f"{seconds:.3f} s",
        file=sys.stderr,
        flush=True,
      )
      if index >= warmup:
        times[which].append(seconds)
  median = statistics.median(times[-1])
  record.update(step_time_median_s=median, images_per_s=settings.batch_size / median, step_times_s=times[-1])
  if compare_slws:
    median_p0 = statistics.median(times[0])
    # The median of step-by-step ratios is a second estimate, robust to slow drifts in load.
    pair_ratios = [shuffled / plain for shuffled, plain in zip(times[1], times[0])]
    record.update(
      step_time_median_s_p0=median_p0,
      step_times_s_p0=times[0],
      slws_overhead_ratio=median / median_p0,
      slws_pair_ratio_median=statistics.median(pair_ratios),
    )
  if peak_tflops:
    record["mfu"] = record["flops_analytic"] / median / (peak_tflops * 1e12)
  return record


def markdown_row(record: dict) -> str:
  """One BENCHMARKS.md table row for a record from `run`."""
  gib = lambda key: f"{record[key] / 2**30:.2f}"
  gflop = lambda value: "n/a" if value is None else f"{value / 1e9:.1f}"
  step = record["step_time_median_s"]
  cells = [
    record["variant"],
    record["img_size"],
    record["batch_size"],
    record["method"],
    record["chunk_size"],
    record["remat"],
    record["dtype"],
    record["slws_prob"],
    f"{record['compile_s']:.1f}",
    gib("temp_bytes"),
    gib("argument_bytes"),
    gib("output_bytes"),
    gib("peak_bytes"),
    gflop(record["flops_xla"]),
    gflop(record["flops_analytic"]),
    "-" if step is None else f"{step:.3f}",
    "-" if step is None else f"{record['images_per_s']:.2f}",
    f"{record['mfu']:.3f}" if record.get("mfu") is not None else "-",
  ]
  row = "| " + " | ".join(map(str, cells)) + " |"
  if "slws_overhead_ratio" in record:
    row += (
      f" SLWS overhead ratio {record['slws_overhead_ratio']:.4f} (P=0 step {record['step_time_median_s_p0']:.3f} s)"
    )
  return row


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m shufflemamba_jax.benchmark",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("--variant", default="shufflemamba_tiny", choices=sorted(variants.VARIANTS))
  parser.add_argument("--img_size", type=int, default=224)
  parser.add_argument("--batch_size", type=int, default=8, help="images per step (one device)")
  parser.add_argument("--method", default=Settings.method, choices=ssm.SCAN_METHODS, help="selective-scan method")
  parser.add_argument("--chunk_size", type=int, default=Settings.chunk_size, help="chunk length of the chunked scan")
  parser.add_argument(
    "--remat", default=Settings.remat, choices=REMAT_CHOICES, help="block rematerialization: a policy name, or none"
  )
  parser.add_argument("--dtype", default="float32", choices=tuple(vim.DTYPES), help="computation dtype")
  parser.add_argument(
    "--slws_prob", type=float, default=None, help="SLWS max shuffle probability P (default: the variant's)"
  )
  parser.add_argument("--depth", type=int, default=None, help="override the variant's depth")
  parser.add_argument("--embed_dim", type=int, default=None, help="override the variant's width")
  parser.add_argument("--patch_size", type=int, default=None, help="override the variant's patch size")
  parser.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup steps)")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument(
    "--peak_tflops", type=float, default=None, help="the device's peak TFLOP/s for the chosen dtype; adds mfu"
  )
  parser.add_argument("--compile_only", action="store_true", help="compile and analyze; no state, no steps")
  parser.add_argument(
    "--compare_slws",
    action="store_true",
    help="time P = 0 and P = --slws_prob (default 0.5) interleaved; adds slws_overhead_ratio",
  )
  parser.add_argument("--json", action="store_true", help="print one JSON object instead of a markdown row")
  parser.add_argument("--header", action="store_true", help="print the markdown table header first")
  return parser.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  overrides = tuple(
    (name, getattr(args, name)) for name in ("depth", "embed_dim", "patch_size") if getattr(args, name) is not None
  )
  fields = [field.name for field in dataclasses.fields(Settings) if field.name != "overrides"]
  settings = Settings(**{name: getattr(args, name) for name in fields}, overrides=overrides)
  timing = ("steps", "warmup", "compile_only", "compare_slws", "peak_tflops")
  record = run(settings, **{name: getattr(args, name) for name in timing})
  record["command"] = "python -m shufflemamba_jax.benchmark " + " ".join(sys.argv[1:] if argv is None else argv)
  record["date_utc"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
  record["host"] = f"{platform.machine()}, {jax.local_device_count()} {jax.default_backend()} device(s)"
  if args.json:
    print(json.dumps(record))
  else:
    if args.header:
      print(MARKDOWN_HEADER)
    print(markdown_row(record))
  return record


if __name__ == "__main__":
  main()
