"""Named configurations of the attention modules: the paper, the official code and timm.

``fields(preset, name)`` gives the keyword fields that make the module registered as
``name`` (see :func:`cbam_jax.attention.available`) follow ``preset``; the same dict
configures the linen module (``attention.create(name, **fields)``) and the NNX one
(``cbam_jax.nnx.create(name, in_features, rngs=..., **fields)``). A name the preset does
not mention gets ``{}``: the module's defaults.

=========== ==================================================================================
preset      what it is
=========== ==================================================================================
'paper'     the papers' descriptions: every module's defaults
'official'  Jongchan/attention-module's CBAM: a bias-free spatial conv + BatchNorm (PyTorch
            momentum 0.01, Flax 0.99) whose scale the official ResNet zero-initialises
'timm'      timm.layers: CbamModule (round(C / 16), no MLP bias, spatial BatchNorm with PyTorch
            momentum 0.1) and SEModule (make_divisible(C / 16, 8))
=========== ==================================================================================

The models (``create_model(..., attention='cbam')``) use ``'official'``; the converter asks
for the preset of the checkpoint's source.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import flax.linen as nn

from cbam_jax import _validation

_OFFICIAL_SPATIAL = dict(spatial_norm=True, norm_momentum=0.99, norm_epsilon=1e-5,
                         norm_scale_init=nn.initializers.zeros_init())
_TIMM_SPATIAL = dict(spatial_norm=True, norm_momentum=0.9, norm_epsilon=1e-5)

_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    'paper': {},
    'official': {
        'cbam': dict(reduction_ratio=16, mlp_bias=True, **_OFFICIAL_SPATIAL),
        'spatial': dict(_OFFICIAL_SPATIAL),
    },
    'timm': {
        'cbam': dict(reduction_ratio=16, hidden_rounding='round', mlp_bias=False,
                     **_TIMM_SPATIAL),
        'channel': dict(reduction_ratio=16, hidden_rounding='round', mlp_bias=False),
        'spatial': dict(_TIMM_SPATIAL),
        'se': dict(reduction_ratio=16, hidden_rounding='round', hidden_divisor=8),
        'lcbam': {},  # The module's defaults are timm's LightCbamModule.
    },
}

PRESETS = tuple(_PRESETS)


def available_presets() -> tuple[str, ...]:
  """Names accepted by :func:`fields`."""
  return PRESETS


def fields(preset: str, name: str, **overrides: Any) -> dict[str, Any]:
  """The fields of attention ``name`` under ``preset``, updated with ``overrides``."""
  _validation.check_choice('attention preset', preset, PRESETS)
  return {**_PRESETS[preset].get(name, {}), **overrides}


def table(preset: str) -> MappingProxyType:
  """Read-only ``{name: fields}`` of every module ``preset`` configures."""
  _validation.check_choice('attention preset', preset, PRESETS)
  return MappingProxyType({k: MappingProxyType(v) for k, v in _PRESETS[preset].items()})
