"""The named model variants of SPEC §2 and `create_model`, the one way to build them."""

from __future__ import annotations

import dataclasses

from flax import nnx

from shufflemamba_jax import checks
from shufflemamba_jax.models.vim import VisionMamba, VisionMambaConfig

_VIM = dict(token_layout="middle")
_SHUFFLE = dict(token_layout="head", slws_max_prob=0.5)
_REG = dict(token_layout="registers", slws_max_prob=0.1)

VARIANTS: dict[str, dict] = {
  "vim_tiny": dict(embed_dim=192, depth=24, **_VIM),
  "vim_small": dict(embed_dim=384, depth=24, **_VIM),
  "vim_base": dict(embed_dim=768, depth=24, **_VIM),
  "shufflemamba_tiny": dict(embed_dim=192, depth=24, **_SHUFFLE),
  "shufflemamba_small": dict(embed_dim=384, depth=24, **_SHUFFLE),
  "shufflemamba_middle": dict(embed_dim=576, depth=32, norm="layernorm", **_SHUFFLE),
  "shufflemamba_base": dict(embed_dim=768, depth=24, **_SHUFFLE),
  "shufflemamba_large": dict(embed_dim=1024, depth=48, **_SHUFFLE),
  "shufflemamba_reg_tiny": dict(embed_dim=192, depth=24, num_registers=12, cls_reduce=1, **_REG),
  "shufflemamba_reg_small": dict(embed_dim=384, depth=24, num_registers=12, cls_reduce=2, **_REG),
  "shufflemamba_reg_base": dict(embed_dim=768, depth=24, num_registers=12, cls_reduce=4, **_REG),
  "shufflemamba_reg_large": dict(embed_dim=1024, depth=48, num_registers=16, cls_reduce=8, **_REG),
}

CONFIG_FIELDS = tuple(field.name for field in dataclasses.fields(VisionMambaConfig))


def model_config(variant: str, *, num_classes: int = 1000, img_size: int = 224, **overrides) -> VisionMambaConfig:
  """Returns the VisionMambaConfig of a named variant with `overrides` applied.

  ShuffleMamba variants default to the paper's max shuffle rate (0.5, or 0.1 with registers);
  Vim variants to 0 (no shuffle).
  """
  if variant not in VARIANTS:
    raise checks.SettingError("variant", variant, f"unknown model variant; choose one of {sorted(VARIANTS)}")
  for name, value in overrides.items():
    if name not in CONFIG_FIELDS:
      raise checks.SettingError(name, value, f"unknown model setting; the settings are {list(CONFIG_FIELDS)}")
  settings = {**VARIANTS[variant], "num_classes": num_classes, "img_size": img_size, **overrides}
  return VisionMambaConfig(**settings)


def create_model(
  variant: str, *, rngs: nnx.Rngs, num_classes: int = 1000, img_size: int = 224, **overrides
) -> VisionMamba:
  """Builds a named variant (see VARIANTS), e.g. `create_model("shufflemamba_base", rngs=nnx.Rngs(0))`.

  `overrides` change any VisionMambaConfig field (depth, embed_dim, patch_size, num_registers,
  drop_path_rate, slws_max_prob, slws_schedule, slws_group_size, scan_method, chunk_size, remat,
  dtype, ...); an unknown or invalid setting raises a `checks.SettingError` (a ValueError) that
  names it.
  """
  return _build(model_config(variant, num_classes=num_classes, img_size=img_size, **overrides), rngs)


@nnx.jit(static_argnums=0)
def _build(config: VisionMambaConfig, rngs: nnx.Rngs) -> VisionMamba:
  # One compiled initializer instead of hundreds of small eagerly dispatched random ops.
  return VisionMamba(config, rngs=rngs)
