"""Flax linen modules for CBAM, built on :mod:`cbam_jax.functional`.

Each module declares its parameters and ``jax.vmap``s the single-example math over the
batch. Inputs are ``(B, *spatial, C)`` with 1 to 3 spatial dimensions; ``channel_axis``
accepts other layouts (``1`` for NCHW) and gives exactly the transposed result.

Attention maps are sown into the ``'intermediates'`` collection, float32 in [0, 1]:
``channel_map`` with shape ``(B, C)`` and ``spatial_map`` with shape ``(B, *spatial)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cbam_jax import _validation
from cbam_jax import functional as F
from cbam_jax._fast_spatial import batched_spatial_logits

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

default_kernel_init = nn.initializers.lecun_normal()
# PyTorch's default for Linear and Conv: kaiming_uniform(a=sqrt(5)), i.e. U(+-1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')

__all__ = ['ChannelAttention', 'SpatialAttention', 'CBAM']


def _to_channels_last(x: Array, channel_axis: int) -> Array:
  return jnp.moveaxis(x, channel_axis, -1)


def _from_channels_last(x: Array, channel_axis: int) -> Array:
  return jnp.moveaxis(x, -1, channel_axis)


def _hidden_size(channels: int, reduction_ratio: float, hidden_features: int | None,
                 hidden_rounding: str, hidden_divisor: int = 1) -> int:
  if hidden_features is not None:
    if hidden_features < 1:
      raise ValueError(f'hidden_features must be >= 1, got {hidden_features}.')
    return hidden_features
  if reduction_ratio <= 0:
    raise ValueError(f'reduction_ratio must be positive, got {reduction_ratio}.')
  _validation.check_choice('hidden_rounding', hidden_rounding, ('floor', 'round'))
  if isinstance(hidden_divisor, bool) or not isinstance(hidden_divisor, int) or hidden_divisor < 1:
    raise ValueError(f'hidden_divisor must be a positive int, got {hidden_divisor!r}.')
  if hidden_rounding == 'floor':  # Official code: C // r.
    if hidden_divisor != 1:
      raise ValueError(f'hidden_divisor={hidden_divisor} needs hidden_rounding=\'round\' '
                       '(timm\'s make_divisible); \'floor\' is the official C // r.')
    return max(1, int(channels // reduction_ratio))
  # timm's make_divisible(C / r, hidden_divisor): the nearest multiple, at least one.
  value = channels / reduction_ratio
  return max(hidden_divisor, int(value + hidden_divisor / 2) // hidden_divisor * hidden_divisor)


class ChannelAttention(nn.Module):
  """``x * gate(sum_p MLP(pool_p(x)))`` with ONE MLP shared by every pool type.

  Attributes:
    reduction_ratio: hidden size is ``max(1, C // reduction_ratio)``.
    hidden_features: explicit hidden size; overrides ``reduction_ratio``.
    hidden_rounding: ``'floor'`` (official, ``C // r``) or ``'round'`` (timm,
      ``make_divisible(C / r, hidden_divisor)``: the nearest multiple of ``hidden_divisor``).
    hidden_divisor: with ``'round'``, the hidden size is a multiple of this (timm: 1 for
      CBAM, 8 for its SE module, so 64 channels get 8 hidden units, not 4).
    pool_types: any of ``'avg'``, ``'max'``, ``'lp'``, ``'lse'``.
    mlp_bias: biases in both MLP layers (official: True, timm: False).
    activation: hidden non-linearity.
    gate: the map's squashing function.
    channel_axis: the channel axis of the input.
  """

  reduction_ratio: float = 16
  hidden_features: int | None = None
  hidden_rounding: str = 'floor'
  hidden_divisor: int = 1
  pool_types: Sequence[str] = ('avg', 'max')
  mlp_bias: bool = True
  activation: Callable[[Array], Array] = nn.relu
  gate: Callable[[Array], Array] = nn.sigmoid
  channel_axis: int = -1
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  precision: Any = None
  kernel_init: Initializer = default_kernel_init
  bias_init: Initializer = nn.initializers.zeros_init()

  @nn.compact
  def attention_map(self, x: Array) -> Array:
    """``(B, C)`` float32 channel map of channels-last ``x``; sown as ``channel_map``."""
    _validation.check_features(x, batched=True)
    _validation.check_pool_types(self.pool_types)
    channels = x.shape[-1]
    hidden = _hidden_size(channels, self.reduction_ratio, self.hidden_features,
                          self.hidden_rounding, self.hidden_divisor)
    if self.has_variable('params', 'fc1_kernel'):
      _validation.check_channels(x, self.get_variable('params', 'fc1_kernel').shape[0],
                                 type(self).__name__)
    params = {
        'fc1_kernel': self.param('fc1_kernel', self.kernel_init, (channels, hidden),
                                 self.param_dtype),
        'fc2_kernel': self.param('fc2_kernel', self.kernel_init, (hidden, channels),
                                 self.param_dtype),
    }
    if self.mlp_bias:
      params['fc1_bias'] = self.param('fc1_bias', self.bias_init, (hidden,),
                                      self.param_dtype)
      params['fc2_bias'] = self.param('fc2_bias', self.bias_init, (channels,),
                                      self.param_dtype)
    logits = jax.vmap(functools.partial(
        F.channel_logits, pool_types=tuple(self.pool_types), activation=self.activation,
        dtype=self.dtype, precision=self.precision), in_axes=(None, 0))(params, x)
    channel_map = self.gate(logits)
    self.sow('intermediates', 'channel_map', channel_map)
    return channel_map

  def __call__(self, x: Array, train: bool = False) -> Array:
    """Refines ``x`` (``(B, *spatial, C)`` along ``channel_axis``); same shape and dtype."""
    del train  # No BatchNorm in this branch; kept so every attention module is called alike.
    _validation.check_features(x, batched=True, channel_axis=self.channel_axis)
    x = _to_channels_last(x, self.channel_axis)
    channel_map = self.attention_map(x)
    out = F.apply_gate(x, channel_map.reshape(x.shape[:1] + (1,) * (x.ndim - 2) + x.shape[-1:]))
    return _from_channels_last(out, self.channel_axis)


class SpatialAttention(nn.Module):
  """``x * gate(norm(conv_k([mean_c(x); max_c(x)])))``.

  Attributes:
    kernel_size: odd conv size (7 in the paper); an int or one per spatial dimension.
    spatial_norm: follow a bias-free conv with BatchNorm, as the official code and timm do.
    use_bias: conv bias; ``None`` means "only without ``spatial_norm``".
    norm_momentum: Flax BatchNorm momentum. PyTorch's ``momentum=m`` is ``1 - m`` here:
      official CBAM 0.01 -> 0.99 (the default), timm 0.1 -> 0.9.
    norm_epsilon: BatchNorm epsilon (1e-5 in both references).
    norm_scale_init: initialiser of the BatchNorm scale. The official ResNet sets it to
      zeros so every spatial gate starts at sigmoid(0) = 0.5.
    conv_impl: ``'auto'``, ``'xla'`` or ``'shift'``; all give the same numbers.
  """

  kernel_size: int | Sequence[int] = 7
  spatial_norm: bool = False
  use_bias: bool | None = None
  norm_momentum: float = 0.99
  norm_epsilon: float = 1e-5
  norm_scale_init: Initializer = nn.initializers.ones_init()
  gate: Callable[[Array], Array] = nn.sigmoid
  channel_axis: int = -1
  conv_impl: str = 'auto'
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  precision: Any = None
  kernel_init: Initializer = default_kernel_init
  bias_init: Initializer = nn.initializers.zeros_init()

  @nn.compact
  def attention_map(self, x: Array, train: bool = False) -> Array:
    """``(B, *spatial)`` float32 spatial map of channels-last ``x``; sown as ``spatial_map``."""
    _validation.check_features(x, batched=True)
    kernel_size = _validation.spatial_kernel_size(self.kernel_size, x.ndim - 2)
    if self.has_variable('params', 'conv_kernel'):
      # Checked here so that a clear message beats Flax's ScopeParamShapeError.
      stored = tuple(self.get_variable('params', 'conv_kernel').shape)
      if stored != (*kernel_size, 2, 1):
        raise ValueError(
            f'{type(self).__name__} was initialised with a conv kernel of shape {stored} '
            f'({len(stored) - 2} spatial dimensions) but got {x.ndim - 2}-D input of shape '
            f'{tuple(x.shape)} needing {(*kernel_size, 2, 1)}. Re-initialise the module for '
            'this input rank, or check kernel_size and channel_axis.')
    params = {'conv_kernel': self.param('conv_kernel', self.kernel_init,
                                        (*kernel_size, 2, 1), self.param_dtype)}
    use_bias = (not self.spatial_norm) if self.use_bias is None else self.use_bias
    if use_bias:
      params['conv_bias'] = self.param('conv_bias', self.bias_init, (1,), self.param_dtype)
    # Same numbers as vmap(F.spatial_logits); pools into channel-major planes, the layout
    # the CPU 'shift' conv is fast on.
    logits = batched_spatial_logits(params, x, dtype=self.dtype, precision=self.precision,
                                    impl=self.conv_impl)
    if self.spatial_norm:
      # float32 statistics whatever the compute dtype: they feed the sigmoid directly.
      # Two-pass variance (not E[x^2] - E[x]^2): logits have |mean| >> std after the
      # conv, and the one-pass form then drifts ~1e-4 from PyTorch in training.
      logits = nn.BatchNorm(
          use_running_average=not train, momentum=self.norm_momentum,
          epsilon=self.norm_epsilon, dtype=jnp.float32, param_dtype=self.param_dtype,
          scale_init=self.norm_scale_init, use_fast_variance=False,
          name='norm')(logits[..., None])[..., 0]
    spatial_map = self.gate(logits)
    self.sow('intermediates', 'spatial_map', spatial_map)
    return spatial_map

  def __call__(self, x: Array, train: bool = False) -> Array:
    """Refines ``x`` (``(B, *spatial, C)`` along ``channel_axis``); same shape and dtype."""
    _validation.check_features(x, batched=True, channel_axis=self.channel_axis)
    x = _to_channels_last(x, self.channel_axis)
    out = F.apply_gate(x, self.attention_map(x, train)[..., None])
    return _from_channels_last(out, self.channel_axis)


class CBAM(nn.Module):
  """Convolutional Block Attention Module (Woo et al., ECCV 2018).

  Defaults follow the paper. ``CBAM(spatial_norm=True)`` is the official code's module;
  see the README's options table for timm's.

  Attributes:
    order: ``'channel_first'`` (paper), ``'spatial_first'`` or ``'parallel'`` (both maps
      from the input, applied together).
    use_channel, use_spatial: switch a branch off (the official ``no_spatial`` is
      ``use_spatial=False``).
    The remaining fields are those of :class:`ChannelAttention` and
    :class:`SpatialAttention`.
  """

  reduction_ratio: float = 16
  hidden_features: int | None = None
  hidden_rounding: str = 'floor'
  hidden_divisor: int = 1
  pool_types: Sequence[str] = ('avg', 'max')
  mlp_bias: bool = True
  activation: Callable[[Array], Array] = nn.relu
  gate: Callable[[Array], Array] = nn.sigmoid
  kernel_size: int | Sequence[int] = 7
  spatial_norm: bool = False
  use_bias: bool | None = None
  norm_momentum: float = 0.99
  norm_epsilon: float = 1e-5
  norm_scale_init: Initializer = nn.initializers.ones_init()
  order: str = 'channel_first'
  use_channel: bool = True
  use_spatial: bool = True
  channel_axis: int = -1
  conv_impl: str = 'auto'
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  precision: Any = None
  kernel_init: Initializer = default_kernel_init
  bias_init: Initializer = nn.initializers.zeros_init()

  def setup(self):
    _validation.check_choice('order', self.order, F.ORDERS)
    if not (self.use_channel or self.use_spatial):
      raise ValueError('CBAM with use_channel=False and use_spatial=False does nothing; '
                       'enable at least one branch.')
    shared = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                  kernel_init=self.kernel_init, bias_init=self.bias_init, gate=self.gate)
    if self.use_channel:
      self.channel = ChannelAttention(
          reduction_ratio=self.reduction_ratio, hidden_features=self.hidden_features,
          hidden_rounding=self.hidden_rounding, hidden_divisor=self.hidden_divisor,
          pool_types=self.pool_types, mlp_bias=self.mlp_bias, activation=self.activation, **shared)
    if self.use_spatial:
      self.spatial = SpatialAttention(
          kernel_size=self.kernel_size, spatial_norm=self.spatial_norm,
          use_bias=self.use_bias, norm_momentum=self.norm_momentum,
          norm_epsilon=self.norm_epsilon, norm_scale_init=self.norm_scale_init,
          conv_impl=self.conv_impl, **shared)

  def __call__(self, x: Array, train: bool = False) -> Array:
    """Refines ``x`` (``(B, *spatial, C)`` along ``channel_axis``); same shape and dtype."""
    _validation.check_features(x, batched=True, channel_axis=self.channel_axis)
    x = _to_channels_last(x, self.channel_axis)
    batch_and_ones = x.shape[:1] + (1,) * (x.ndim - 2)

    def channel_gate(inp):
      return self.channel.attention_map(inp).reshape(batch_and_ones + x.shape[-1:])

    def spatial_gate(inp):
      return self.spatial.attention_map(inp, train)[..., None]

    if not self.use_spatial:
      out = F.apply_gate(x, channel_gate(x))
    elif not self.use_channel:
      out = F.apply_gate(x, spatial_gate(x))
    elif self.order == 'channel_first':
      refined = F.apply_gate(x, channel_gate(x))
      out = F.apply_gate(refined, spatial_gate(refined))
    elif self.order == 'spatial_first':
      refined = F.apply_gate(x, spatial_gate(x))
      out = F.apply_gate(refined, channel_gate(refined))
    else:
      out = F.apply_gate(x, channel_gate(x) * spatial_gate(x))
    return _from_channels_last(out, self.channel_axis)
