"""cbam_jax: CBAM and visual attention modules for JAX and Flax.

Submodules and the top-level classes load on first use (PEP 562), so that
``from cbam_jax import perf`` stays free of JAX: scripts call
``perf.reexec_with_cpu_env()`` before importing anything heavy, and a restarted process
should not have paid for JAX twice.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = '0.1.0'

_SUBMODULES = frozenset({'attention', 'conv', 'convert', 'functional', 'inspect',
                         'models', 'nnx', 'perf'})
_LAYERS = frozenset({'CBAM', 'ChannelAttention', 'SpatialAttention'})

__all__ = ['CBAM', 'ChannelAttention', 'SpatialAttention', 'conv', 'functional', 'models',
           '__version__']


def __getattr__(name: str) -> Any:
  if name in _LAYERS:
    return getattr(importlib.import_module('cbam_jax.attention.cbam'), name)
  if name in _SUBMODULES:
    return importlib.import_module(f'cbam_jax.{name}')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__() -> list[str]:
  return sorted(set(__all__) | _SUBMODULES)


if TYPE_CHECKING:
  from cbam_jax import conv, functional, models
  from cbam_jax.attention.cbam import CBAM, ChannelAttention, SpatialAttention
