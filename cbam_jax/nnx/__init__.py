"""cbam_jax for Flax NNX: every attention module and model, on the same math as linen.

``cbam_jax.nnx.CBAM(in_features=64, rngs=nnx.Rngs(0))`` creates its parameters eagerly;
the keyword fields are those of the linen twin (:class:`cbam_jax.CBAM`), with the same
defaults. Modules start in training mode (``model.eval()`` / ``model.train()`` switch
BatchNorm); attention maps are recorded as ``nnx.Intermediate`` under ``nnx.capture``.
:func:`create_model` builds the registered backbones (:mod:`cbam_jax.models`, one registry
for both skins); :func:`to_linen`, :func:`from_linen` and :func:`load_linen` move weights
between the two APIs. See docs/nnx.md.

The model names load on first use (PEP 562): the backbone files import this package's
modules, so importing them here eagerly would be circular.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cbam_jax.nnx.attention import (
                                    BottleneckAttention,
                                    ConcurrentSpatialChannelSE,
                                    CoordinateAttention,
                                    EfficientChannelAttention,
                                    LightCBAM,
                                    LightChannelAttention,
                                    LightSpatialAttention,
                                    SimAM,
                                    SpatialSqueezeExcitation,
                                    SqueezeExcitation,
                                    TripletAttention,
                                    available,
                                    create,
                                    resolve,
)
from cbam_jax.nnx.layers import CBAM, ChannelAttention, SpatialAttention

# Name -> (module, attribute) of the names that need cbam_jax.models.
_LAZY = {
    'ResNet': ('cbam_jax.models.resnet', 'ResNetNNX'),
    'available_models': ('cbam_jax.models', 'available_models'),
    'count_params': ('cbam_jax.models', 'count_nnx_params'),
    'create_model': ('cbam_jax.models', 'create_nnx_model'),
    'resolve_attention': ('cbam_jax.models._attention', 'resolve_nnx_attention'),
    'from_linen': ('cbam_jax.nnx.transfer', 'from_linen'),
    'load_linen': ('cbam_jax.nnx.transfer', 'load_linen'),
    'to_linen': ('cbam_jax.nnx.transfer', 'to_linen'),
}

__all__ = ['CBAM', 'BottleneckAttention', 'ChannelAttention', 'ConcurrentSpatialChannelSE',
           'CoordinateAttention', 'EfficientChannelAttention', 'LightCBAM',
           'LightChannelAttention', 'LightSpatialAttention', 'SimAM', 'SpatialAttention',
           'SpatialSqueezeExcitation', 'SqueezeExcitation', 'TripletAttention', 'available',
           'create', 'resolve', 'ResNet', 'available_models', 'count_params', 'create_model',
           'resolve_attention', 'from_linen', 'load_linen', 'to_linen']


def __getattr__(name: str) -> Any:
  if name in _LAZY:
    module, attribute = _LAZY[name]
    return getattr(importlib.import_module(module), attribute)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:
  from cbam_jax.models import available_models
  from cbam_jax.models import count_nnx_params as count_params
  from cbam_jax.models import create_nnx_model as create_model
  from cbam_jax.models._attention import resolve_nnx_attention as resolve_attention
  from cbam_jax.models.resnet import ResNetNNX as ResNet
  from cbam_jax.nnx.transfer import from_linen, load_linen, to_linen
