"""Vision Mamba and ShuffleMamba (stochastic layer-wise shuffle) in JAX / Flax NNX.

Layers, each a subpackage: `checks` (settings errors), then `models` (needs only jax, flax and
numpy) and `parallel` at the bottom; `data` (tf.data over TFDS), `weights` (checkpoints, PyTorch
import and export) and `training` on top of them; the command-line entry points (`main`, `predict`, `convert`,
`prepare`, `benchmark`, `ablation`) above everything, imported by nothing. The package's API is
the model layer's (`create_model`, `VARIANTS`, `VisionMamba`, ...) and `load_model`.
"""

import os

# gs:// paths (workdirs, checkpoints, metrics, weights) go through etils.epath. Its backend is
# chosen here, explicitly: gcsfs (fsspec), with or without TensorFlow installed, rather than
# tf.io.gfile, which epath would pick whenever TensorFlow is importable. TensorFlow's own reads
# (TFDS records) and TensorBoard files keep using TensorFlow's client. Set EPATH_USE_TF=true to
# choose otherwise.
os.environ.setdefault("EPATH_USE_TF", "false")

from shufflemamba_jax import models  # noqa: E402
from shufflemamba_jax.models import *  # noqa: E402, F403  (the model layer's API is the package's)

__version__ = "0.1.0"
__all__ = [*models.__all__, "load_model"]


def load_model(path: str, step: int | str | None = None, ema: bool = True) -> models.VisionMamba:
  """The model saved at `path` (a training workdir or converted weights); see `weights.load_model`."""
  from shufflemamba_jax import weights  # Lazy: reading checkpoints needs Orbax.

  return weights.load_model(path, step=step, ema=ema)
