"""CBAM and its two branches as Flax NNX modules: the math of :mod:`cbam_jax.layers`.

``CBAM(in_features=64, rngs=nnx.Rngs(0), spatial_norm=True)`` creates its parameters
eagerly; every other keyword is a field of :class:`cbam_jax.CBAM`, with the same default.
The spatial parameters depend on the input rank: ``num_spatial_dims`` (default: the length
of a sequence ``kernel_size``, else 2) says which.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from cbam_jax import _validation
from cbam_jax import functional as F
from cbam_jax import layers as linen_layers
from cbam_jax._base import channel_map_shape, check_spatial_kernel_shape
from cbam_jax.nnx import _base

Array = jax.Array

__all__ = ['CBAM', 'ChannelAttention', 'SpatialAttention']

_CHANNEL_PARAMS = ('fc1_kernel', 'fc1_bias', 'fc2_kernel', 'fc2_bias')
_SPATIAL_PARAMS = ('conv_kernel', 'conv_bias')


class ChannelAttention(_base.AttentionModule):
  """``x * gate(sum_p MLP(pool_p(x)))``; fields of :class:`cbam_jax.ChannelAttention`.

  Params ``fc1_kernel (C, hidden)``, ``fc2_kernel``, biases with ``mlp_bias``; records
  ``channel_map`` ``(B, C)`` under ``nnx.capture``.
  """

  linen_twin = linen_layers.ChannelAttention

  def __init__(self, in_features: int, *, rngs: nnx.Rngs, **fields: Any):
    self._set_fields(in_features, fields)
    _validation.check_pool_types(self.pool_types)
    hidden = F.hidden_size(in_features, self.reduction_ratio, self.hidden_features,
                           self.hidden_rounding, self.hidden_divisor)
    _base.declare(self, linen_layers.channel_param_shapes(in_features, hidden, self.mlp_bias),
                  rngs)

  def attention_map(self, x: Array) -> Array:
    """``(B, C)`` float32 channel map of channels-last ``x``."""
    _validation.check_features(x, batched=True)
    _validation.check_channels(x, self.in_features, type(self).__name__)
    channel_map = linen_layers.channel_attention_map(
        _base.values(self, _CHANNEL_PARAMS), x, pool_types=self.pool_types,
        activation=self.activation, gate=self.gate, dtype=self.dtype, precision=self.precision)
    _base.sow_map(self, 'channel_map', channel_map)
    return channel_map

  def refine(self, x: Array) -> Array:
    return F.apply_gate(x, channel_map_shape(self.attention_map(x), x))


class SpatialAttention(_base.AttentionModule):
  """``x * gate(norm(conv_k([mean_c; max_c])))``; fields of :class:`cbam_jax.SpatialAttention`.

  Params ``conv_kernel (*k, 2, 1)``, ``conv_bias``, ``norm`` (an ``nnx.BatchNorm``) with
  ``spatial_norm``; records ``spatial_map`` ``(B, *spatial)`` under ``nnx.capture``.
  """

  linen_twin = linen_layers.SpatialAttention

  def __init__(self, in_features: int, *, num_spatial_dims: int | None = None,
               rngs: nnx.Rngs, **fields: Any):
    self._set_fields(in_features, fields)
    num_spatial = _base.num_spatial_dims_for(self.kernel_size, num_spatial_dims)
    kernel_size = _validation.spatial_kernel_size(self.kernel_size, num_spatial)
    _base.declare(self, linen_layers.spatial_param_shapes(
        kernel_size, linen_layers.spatial_use_bias(self.spatial_norm, self.use_bias)), rngs)
    if self.spatial_norm:
      self.norm = _base.batch_norm(1, self.norm_momentum, self.norm_epsilon, self.param_dtype,
                                   rngs, self.norm_scale_init)

  def attention_map(self, x: Array) -> Array:
    """``(B, *spatial)`` float32 spatial map of channels-last ``x``."""
    _validation.check_features(x, batched=True)
    _validation.check_has_batch(type(self).__name__, x, self.conv_kernel.ndim - 2)
    kernel_size = _validation.spatial_kernel_size(self.kernel_size, x.ndim - 2)
    check_spatial_kernel_shape(type(self).__name__, self.conv_kernel.shape, kernel_size, 2, x)
    spatial_map = linen_layers.spatial_attention_map(
        _base.values(self, _SPATIAL_PARAMS), x, norm=self.norm if self.spatial_norm else None,
        gate=self.gate, dtype=self.dtype, precision=self.precision, impl=self.conv_impl)
    _base.sow_map(self, 'spatial_map', spatial_map)
    return spatial_map

  def refine(self, x: Array) -> Array:
    return F.apply_gate(x, self.attention_map(x)[..., None])


class CBAM(_base.AttentionModule):
  """Convolutional Block Attention Module; fields of :class:`cbam_jax.CBAM`.

  Submodules ``channel`` (:class:`ChannelAttention`) and ``spatial``
  (:class:`SpatialAttention`), as in linen.
  """

  linen_twin = linen_layers.CBAM

  def __init__(self, in_features: int, *, num_spatial_dims: int | None = None,
               rngs: nnx.Rngs, **fields: Any):
    self._set_fields(in_features, fields)
    linen_layers.check_cbam_fields(self.order, self.use_channel, self.use_spatial)
    shared = self.field_values(linen_layers.SHARED_FIELDS)
    if self.use_channel:
      self.channel = ChannelAttention(
          in_features, **self.field_values(linen_layers.CHANNEL_FIELDS), **shared, rngs=rngs)
    if self.use_spatial:
      self.spatial = SpatialAttention(
          in_features, num_spatial_dims=num_spatial_dims,
          **self.field_values(linen_layers.SPATIAL_FIELDS), **shared, rngs=rngs)

  def refine(self, x: Array) -> Array:
    return linen_layers.cbam_in_order(
        x, self.channel.attention_map if self.use_channel else None,
        self.spatial.attention_map if self.use_spatial else None, self.order)
