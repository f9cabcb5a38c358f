"""The attention family behind one factory.

``create(name, **kwargs)`` returns a linen module that maps ``(B, *spatial, C)`` features
to refined features of the same shape and dtype, called as ``module(x, train=False)``.
The models' ``attention=`` argument accepts the same names. :mod:`cbam_jax.attention.presets`
names the paper's, the official code's and timm's fields of each; :mod:`cbam_jax.nnx` has
every member as a Flax NNX module under the same name.

==========  ==========================================================  ===========
name        module                                                      spatial dims
==========  ==========================================================  ===========
'cbam'      :class:`cbam_jax.CBAM` (Woo et al. 2018)                    1-3
'channel'   :class:`cbam_jax.ChannelAttention` (CBAM's channel branch)  1-3
'spatial'   :class:`cbam_jax.SpatialAttention` (CBAM's spatial branch)  1-3
'se'        :class:`SqueezeExcitation` (Hu et al. 2018)                 1-3
'eca'       :class:`EfficientChannelAttention` (Wang et al. 2020)       1-3
'bam'       :class:`BottleneckAttention` (Park et al. 2018)             1-3
'scse'      :class:`ConcurrentSpatialChannelSE` (Roy et al. 2018)       1-3
'coord'     :class:`CoordinateAttention` (Hou et al. 2021)              2
'triplet'   :class:`TripletAttention` (Misra et al. 2021)               2
'simam'     :class:`SimAM` (Yang et al. 2021), parameter-free           1-3
'lcbam'     :class:`LightCBAM` (timm's LightCbamModule)                 1-3
==========  ==========================================================  ===========
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn

from cbam_jax.attention import presets
from cbam_jax.attention.bam import BottleneckAttention
from cbam_jax.attention.coord import CoordinateAttention
from cbam_jax.attention.eca import EfficientChannelAttention, eca_kernel_size
from cbam_jax.attention.lcbam import LightCBAM, LightChannelAttention, LightSpatialAttention
from cbam_jax.attention.scse import ConcurrentSpatialChannelSE, SpatialSqueezeExcitation
from cbam_jax.attention.se import SqueezeExcitation
from cbam_jax.attention.simam import SimAM
from cbam_jax.attention.triplet import TripletAttention
from cbam_jax.layers import CBAM, ChannelAttention, SpatialAttention

ModuleFactory = Callable[..., nn.Module]

# name -> factory. Each factory takes keyword fields (dtype, param_dtype, ...) and returns
# a linen Module. Register new members with `register`.
_REGISTRY: dict[str, ModuleFactory] = {}


def register(name: str, factory: ModuleFactory) -> None:
  """Makes ``create(name)`` and ``attention=name`` build ``factory(**kwargs)``."""
  if name in _REGISTRY:
    raise ValueError(f'Attention {name!r} is already registered.')
  _REGISTRY[name] = factory


def available() -> tuple[str, ...]:
  """Names accepted by :func:`create`, sorted."""
  return tuple(sorted(_REGISTRY))


def create(name: str, **kwargs: Any) -> nn.Module:
  """Builds the attention module called ``name`` with the given fields."""
  return resolve(name)(**kwargs)


def name_of(factory: Any) -> str:
  """The registry name of ``factory`` (a registered class or a ``functools.partial`` of
  one); a clear error otherwise."""
  cls = factory
  while isinstance(cls, functools.partial):
    cls = cls.func
  for name, registered in _REGISTRY.items():
    if registered is cls:
      return name
  raise ValueError(f'{factory!r} is not a registered attention module; registered: '
                   f'{", ".join(available())}.')


def resolve(name: str) -> ModuleFactory:
  """The factory registered under ``name``; a clear error listing the names otherwise."""
  try:
    return _REGISTRY[name]
  except (KeyError, TypeError):
    raise ValueError(
        f'Unknown attention {name!r}. Valid names: {", ".join(available())}; or pass a '
        'module class or functools.partial.') from None


register('cbam', CBAM)
register('channel', ChannelAttention)
register('spatial', SpatialAttention)
register('se', SqueezeExcitation)
register('eca', EfficientChannelAttention)
register('bam', BottleneckAttention)
register('scse', ConcurrentSpatialChannelSE)
register('coord', CoordinateAttention)
register('triplet', TripletAttention)
register('simam', SimAM)
register('lcbam', LightCBAM)

__all__ = ['available', 'create', 'name_of', 'presets', 'register', 'resolve',
           'BottleneckAttention', 'CBAM',
           'ChannelAttention', 'ConcurrentSpatialChannelSE', 'CoordinateAttention',
           'EfficientChannelAttention', 'LightCBAM', 'LightChannelAttention',
           'LightSpatialAttention', 'SimAM', 'SpatialAttention', 'SpatialSqueezeExcitation',
           'SqueezeExcitation', 'TripletAttention', 'eca_kernel_size']
