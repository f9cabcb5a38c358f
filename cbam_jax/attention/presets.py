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
for the preset of the checkpoint's source. Each member declares its presets where it is
registered (``Member(..., presets={'timm': {...}})`` in its file); this module reads them.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from cbam_jax import _validation
from cbam_jax.attention import _registry

PRESETS = _registry.PRESETS


def available_presets() -> tuple[str, ...]:
  """Names accepted by :func:`fields`."""
  return PRESETS


def fields(preset: str, name: str, **overrides: Any) -> dict[str, Any]:
  """The fields of attention ``name`` under ``preset``, updated with ``overrides``."""
  _validation.check_choice('attention preset', preset, PRESETS)
  return {**_registry.member(name).presets.get(preset, {}), **overrides}


def table(preset: str) -> MappingProxyType:
  """Read-only ``{name: fields}`` of every module ``preset`` configures."""
  _validation.check_choice('attention preset', preset, PRESETS)
  return MappingProxyType({member.name: member.presets[preset]
                           for member in _registry.members() if preset in member.presets})
