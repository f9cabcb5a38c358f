"""The attention family behind one factory.

``create(name, **kwargs)`` returns a linen module that maps ``(B, *spatial, C)`` features
to refined features of the same shape and dtype, called as ``module(x, train=False)``.
The models' ``attention=`` argument accepts the same names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn

from cbam_jax.attention.se import SqueezeExcitation
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

__all__ = ['available', 'create', 'register', 'resolve', 'SqueezeExcitation', 'CBAM',
           'ChannelAttention', 'SpatialAttention']
