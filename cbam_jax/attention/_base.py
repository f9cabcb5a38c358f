"""What every member of the attention family shares: fields, layout handling, checks.

A member subclasses :class:`AttentionModule` and implements ``refine(x, train)`` on
channels-last ``(B, *spatial, C)`` features; ``__call__`` validates the input, moves
``channel_axis`` to the end and back, so every member accepts NCHW-style layouts too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from cbam_jax import _validation
from cbam_jax import functional as F
from cbam_jax.layers import Initializer, default_kernel_init

Array = jax.Array
Dtype = Any
Activation = Callable[[Array], Array]


class AttentionModule(nn.Module):
  """Base class: ``module(x, train=False)`` maps ``(B, *spatial, C)`` to the same shape/dtype.

  Attributes:
    channel_axis: the channel axis of the input (``-1`` NHWC, ``1`` NCHW).
    dtype: compute dtype of the convolutions and dense layers; ``None`` promotes the input
      and the parameters. Pooling, normalisation statistics and gates are float32 always.
    param_dtype: dtype of the parameters.
    precision: passed to every dot and convolution.
    kernel_init: initialiser of every dense and convolution kernel.
    bias_init: initialiser of every dense and convolution bias.
  """

  channel_axis: int = -1
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  precision: Any = None
  kernel_init: Initializer = default_kernel_init
  bias_init: Initializer = nn.initializers.zeros_init()

  # Spatial ranks the math is defined for; members that need an image override this.
  supported_spatial_dims: ClassVar[tuple[int, ...]] = (1, 2, 3)

  def refine(self, x: Array, train: bool) -> Array:
    """Channels-last ``(B, *spatial, C)`` -> refined features in ``x.dtype``."""
    raise NotImplementedError

  def __call__(self, x: Array, train: bool = False) -> Array:
    """Refines ``x`` (``(B, *spatial, C)`` along ``channel_axis``); same shape and dtype."""
    _validation.check_features(x, batched=True, channel_axis=self.channel_axis)
    check_spatial_dims(type(self).__name__, x, self.supported_spatial_dims)
    x = jnp.moveaxis(x, self.channel_axis, -1)
    out = self.refine(x, train)
    return jnp.moveaxis(out, -1, self.channel_axis)


def check_spatial_dims(what: str, x: Array, supported: tuple[int, ...]) -> None:
  num_spatial = x.ndim - 2
  if num_spatial not in supported:
    dims = ' or '.join(f'{d}-D' for d in supported)
    layout = '(B, H, W, C)' if supported == (2,) else '(B, *spatial, C)'
    raise ValueError(
        f'{what} is defined for {dims} feature maps {layout}; got shape {tuple(x.shape)} '
        f'with {num_spatial} spatial dimension(s). For 1-D or 3-D inputs use a member that '
        "supports them, e.g. 'cbam', 'se', 'eca', 'bam', 'scse', 'simam' or 'lcbam'.")


def spatial_pool(x: Array, kind: str) -> Array:
  """``(B, *spatial, C)`` -> ``(B, C)`` float32 global pooling of every example."""
  return jax.vmap(functools.partial(F.global_pool, kind=kind))(x)


def channel_map_shape(channel_map: Array, x: Array) -> Array:
  """``(B, C)`` -> ``(B, 1, ..., 1, C)`` so that it broadcasts against ``x``."""
  return channel_map.reshape(x.shape[:1] + (1,) * (x.ndim - 2) + x.shape[-1:])


_ONES = nn.initializers.ones_init()


def batch_norm(train: bool, momentum: float, epsilon: float, param_dtype: Dtype, name: str,
               scale_init: Initializer = _ONES) -> nn.BatchNorm:
  """A float32 BatchNorm over every axis but the last (statistics feed gates directly).

  ``momentum`` follows Flax: PyTorch's ``momentum=m`` is ``1 - m`` here. The variance is
  the two-pass ``mean((x - mean)**2)``: Flax's default ``E[x^2] - E[x]^2`` loses ~1e-4
  on small batches of large logits.
  """
  return nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=epsilon,
                      dtype=jnp.float32, param_dtype=param_dtype, scale_init=scale_init,
                      use_fast_variance=False, name=name)


def check_positive(what: str, value: float) -> None:
  if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
    raise ValueError(f'{what} must be a positive number, got {value!r}.')





def check_stored_shape(module: nn.Module, path: tuple[str, ...], expected: tuple[int, ...],
                       x: Array) -> None:
  """A clear error (instead of Flax's ScopeParamShapeError) when ``x`` does not fit the
  parameters ``module`` was initialised with; ``path`` leads to a param in ``'params'``."""
  stored: Any = module.variables.get('params', {})
  for key in path:
    if key not in stored:
      return  # Initialising.
    stored = stored[key]
  if tuple(stored.shape) != tuple(expected):
    raise ValueError(
        f'{type(module).__name__} was initialised for other input: parameter '
        f'{"/".join(path)} has shape {tuple(stored.shape)} but input of shape '
        f'{tuple(x.shape)} (channels last) needs {tuple(expected)}. Re-initialise the module '
        'for this input, or check channel_axis.')
