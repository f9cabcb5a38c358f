"""The attention family as Flax NNX modules, behind ``create(name, in_features, rngs=...)``.

Each class has the fields, parameter names and math of its linen twin in
:mod:`cbam_jax.attention` (the same pure functions); names are those of the linen registry.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
from flax import nnx

from cbam_jax import _validation
from cbam_jax import attention as linen_attention
from cbam_jax import functional as F
from cbam_jax._base import channel_map_shape, check_param_shape
from cbam_jax.attention import bam, coord, eca, lcbam, scse, se, simam, triplet
from cbam_jax.nnx import _base
from cbam_jax.nnx.layers import CBAM, ChannelAttention, SpatialAttention

Array = jax.Array

__all__ = ['BAMChannelGate', 'BAMSpatialGate', 'BottleneckAttention', 'CBAM', 'ChannelAttention',
           'ConcurrentSpatialChannelSE', 'CoordinateAttention', 'EfficientChannelAttention',
           'LightCBAM', 'LightChannelAttention', 'LightSpatialAttention', 'SimAM',
           'SpatialAttention', 'SpatialSqueezeExcitation', 'SqueezeExcitation',
           'TripletAttention', 'ZPoolGate', 'available', 'create', 'resolve']

_MLP_PARAMS = ('fc1_kernel', 'fc1_bias', 'fc2_kernel', 'fc2_bias')


class SqueezeExcitation(_base.AttentionModule):
  """Squeeze-and-Excitation; submodule ``channel`` (:class:`ChannelAttention`, avg pool)."""

  linen_twin = se.SqueezeExcitation

  def __init__(self, in_features: int, *, rngs: nnx.Rngs, **fields: Any):
    self._set_fields(in_features, fields)
    self.channel = ChannelAttention(in_features, **self.field_values(se.SE_FIELDS),
                                    pool_types=se.SE_POOL_TYPES, rngs=rngs)

  def refine(self, x: Array) -> Array:
    return F.apply_gate(x, channel_map_shape(self.channel.attention_map(x), x))


class EfficientChannelAttention(_base.AttentionModule):
  """ECA: param ``conv_kernel (k, 1, 1)``; records ``channel_map``."""

  linen_twin = eca.EfficientChannelAttention

  def __init__(self, in_features: int, *, rngs: nnx.Rngs, **fields: Any):
    self._set_fields(in_features, fields)
    size = eca.eca_kernel_size_for(in_features, self.kernel_size, self.gamma, self.beta)
    self.conv_kernel = nnx.Param(self.kernel_init(rngs.params(), (size, 1, 1),
                                                  self.param_dtype))

  def attention_map(self, x: Array) -> Array:
    _validation.check_features(x, batched=True)
    channel_map = eca.eca_attention_map(self.conv_kernel[...], x, gate=self.gate,
                                        dtype=self.dtype, precision=self.precision)
    _base.sow_map(self, 'channel_map', channel_map)
    return channel_map

  def refine(self, x: Array) -> Array:
    return F.apply_gate(x, channel_map_shape(self.attention_map(x), x))


class _BAMBranch(nnx.Module):

  def _norm(self, features: int, fields: dict[str, Any], rngs: nnx.Rngs) -> nnx.BatchNorm:
    return _base.batch_norm(features, fields['norm_momentum'], fields['norm_epsilon'],
                            fields['param_dtype'], rngs)


class BAMChannelGate(_BAMBranch):
  """BAM's channel branch: params ``fc1_*``, ``fc2_*``, ``norm`` (and ``output_norm``)."""

  def __init__(self, in_features: int, hidden: int, fields: dict[str, Any], rngs: nnx.Rngs):
    self.hidden, self.activation = hidden, fields['activation']
    self.dtype, self.precision = fields['dtype'], fields['precision']
    self.kernel_init, self.bias_init = fields['kernel_init'], fields['bias_init']
    self.param_dtype = fields['param_dtype']
    _base.declare(self, {'fc1_kernel': ('kernel', (in_features, hidden)),
                         'fc1_bias': ('bias', (hidden,)),
                         'fc2_kernel': ('kernel', (hidden, in_features)),
                         'fc2_bias': ('bias', (in_features,))}, rngs)
    self.norm = self._norm(hidden, fields, rngs)
    self.has_output_norm = fields['output_norm']
    if self.has_output_norm:
      self.output_norm = self._norm(in_features, fields, rngs)

  def __call__(self, x: Array) -> Array:
    check_param_shape(type(self).__name__, ('fc1_kernel',), self.fc1_kernel.shape,
                      (x.shape[-1], self.hidden), x)
    logits = bam.bam_channel_logits(
        _base.values(self, _MLP_PARAMS), x, hidden_norm=self.norm,
        output_norm=self.output_norm if self.has_output_norm else None,
        activation=self.activation, dtype=self.dtype, precision=self.precision)
    _base.sow_map(self, 'channel_logits', logits)
    return logits


class BAMSpatialGate(_BAMBranch):
  """BAM's spatial branch: ``reduce_conv``, ``dilated_conv{i}``, ``final_conv`` and norms."""

  def __init__(self, in_features: int, hidden: int, num_spatial: int, fields: dict[str, Any],
               rngs: nnx.Rngs):
    self.hidden, self.activation = hidden, fields['activation']
    self.num_dilated_convs = fields['num_dilated_convs']
    conv = functools.partial(
        nnx.Conv, dtype=fields['dtype'], param_dtype=fields['param_dtype'],
        precision=fields['precision'], kernel_init=fields['kernel_init'],
        bias_init=fields['bias_init'], rngs=rngs)
    self.reduce_conv = conv(in_features, hidden, (1,) * num_spatial)
    self.reduce_norm = self._norm(hidden, fields, rngs)
    for i in range(self.num_dilated_convs):
      setattr(self, f'dilated_conv{i}', conv(
          hidden, hidden, (fields['dilated_kernel_size'],) * num_spatial, padding='SAME',
          kernel_dilation=(fields['dilation'],) * num_spatial))
      setattr(self, f'dilated_norm{i}', self._norm(hidden, fields, rngs))
    self.final_conv = conv(hidden, 1, (1,) * num_spatial)
    self.has_output_norm = fields['output_norm']
    if self.has_output_norm:
      self.output_norm = self._norm(1, fields, rngs)

  def __call__(self, x: Array) -> Array:
    check_param_shape(type(self).__name__, ('reduce_conv', 'kernel'),
                      self.reduce_conv.kernel.shape,
                      (1,) * (x.ndim - 2) + (x.shape[-1], self.hidden), x)
    logits = bam.bam_spatial_logits(
        x, reduce_conv=self.reduce_conv, reduce_norm=self.reduce_norm,
        dilated=[(getattr(self, f'dilated_conv{i}'), getattr(self, f'dilated_norm{i}'))
                 for i in range(self.num_dilated_convs)],
        final_conv=self.final_conv,
        output_norm=self.output_norm if self.has_output_norm else None,
        activation=self.activation)
    _base.sow_map(self, 'spatial_logits', logits)
    return logits


class BottleneckAttention(_base.AttentionModule):
  """BAM; submodules ``channel`` and ``spatial`` as in linen."""

  linen_twin = bam.BottleneckAttention

  def __init__(self, in_features: int, *, num_spatial_dims: int = 2, rngs: nnx.Rngs,
               **fields: Any):
    self._set_fields(in_features, fields)
    bam.check_bam_fields(self.combine, self.dilated_kernel_size, self.dilation)
    hidden = F.hidden_size(in_features, self.reduction_ratio, self.hidden_features,
                           self.hidden_rounding)
    resolved = _base.resolve_fields(self.linen_twin, fields)
    self.channel = BAMChannelGate(in_features, hidden, resolved, rngs)
    self.spatial = BAMSpatialGate(in_features, hidden, num_spatial_dims, resolved, rngs)

  def refine(self, x: Array) -> Array:
    return bam.bam_refine(x, self.channel(x), self.spatial(x), combine=self.combine,
                          gate=self.gate)


class CoordinateAttention(_base.AttentionModule):
  """Coordinate attention: ``conv1``, ``bn1``, ``conv_h``, ``conv_w``; 2-D only."""

  linen_twin = coord.CoordinateAttention
  supported_spatial_dims = (2,)

  def __init__(self, in_features: int, *, rngs: nnx.Rngs, **fields: Any):
    self._set_fields(in_features, fields)
    hidden = coord.coord_hidden_size(in_features, self.reduction_ratio, self.min_hidden,
                                     self.hidden_features)
    dense = functools.partial(
        nnx.Linear, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
        kernel_init=self.kernel_init, bias_init=self.bias_init, rngs=rngs)
    self.conv1 = dense(in_features, hidden)
    self.bn1 = _base.batch_norm(hidden, self.norm_momentum, self.norm_epsilon,
                                self.param_dtype, rngs)
    self.conv_h = dense(hidden, in_features)
    self.conv_w = dense(hidden, in_features)

  def refine(self, x: Array) -> Array:
    channels = x.shape[-1]
    check_param_shape(type(self).__name__, ('conv1', 'kernel'), self.conv1.kernel.shape,
                      (channels, coord.coord_hidden_size(channels, self.reduction_ratio,
                                                         self.min_hidden,
                                                         self.hidden_features)), x)
    out, height_map, width_map = coord.coord_attention(
        x, conv1=self.conv1, bn1=self.bn1, conv_h=self.conv_h, conv_w=self.conv_w,
        activation=self.activation, gate=self.gate)
    _base.sow_map(self, 'height_map', height_map)
    _base.sow_map(self, 'width_map', width_map)
    return out


class ZPoolGate(nnx.Module):
  """Triplet attention's branch: param ``conv_kernel (k, k, 2, 1)`` and ``norm``."""

  def __init__(self, fields: dict[str, Any], rngs: nnx.Rngs):
    self.kernel_size = _validation.spatial_kernel_size(fields['kernel_size'], 2)
    self.gate, self.dtype = fields['gate'], fields['dtype']
    self.precision, self.conv_impl = fields['precision'], fields['conv_impl']
    self.conv_kernel = nnx.Param(fields['kernel_init'](
        rngs.params(), (*self.kernel_size, 2, 1), fields['param_dtype']))
    self.norm = _base.batch_norm(1, fields['norm_momentum'], fields['norm_epsilon'],
                                 fields['param_dtype'], rngs)

  def __call__(self, x: Array) -> Array:
    return triplet.zpool_gate_map(self.conv_kernel[...], x, norm=self.norm, gate=self.gate,
                                  dtype=self.dtype, precision=self.precision,
                                  impl=self.conv_impl)


class TripletAttention(_base.AttentionModule):
  """Triplet attention: branches ``cw``, ``hc`` (and ``hw``); 2-D only."""

  linen_twin = triplet.TripletAttention
  supported_spatial_dims = (2,)

  def __init__(self, in_features: int, *, rngs: nnx.Rngs, **fields: Any):
    self._set_fields(in_features, fields)
    resolved = _base.resolve_fields(self.linen_twin, fields)
    self.cw = ZPoolGate(resolved, rngs)
    self.hc = ZPoolGate(resolved, rngs)
    if self.use_spatial:
      self.hw = ZPoolGate(resolved, rngs)

  def refine(self, x: Array) -> Array:
    out, maps = triplet.triplet_attention(x, self.cw, self.hc,
                                          self.hw if self.use_spatial else None)
    for name, value in maps.items():
      _base.sow_map(self, name, value)
    return out


class SimAM(_base.AttentionModule):
  """SimAM: no parameters; records ``attention_map``."""

  linen_twin = simam.SimAM

  def __init__(self, in_features: int, *, rngs: nnx.Rngs | None = None, **fields: Any):
    del rngs  # Parameter-free; accepted so every member is built alike.
    self._set_fields(in_features, fields)

  def refine(self, x: Array) -> Array:
    attention_map = simam.simam_map(x, e_lambda=self.e_lambda, gate=self.gate)
    _base.sow_map(self, 'attention_map', attention_map)
    return F.apply_gate(x, attention_map)


class SpatialSqueezeExcitation(_base.AttentionModule):
  """sSE: params ``conv_kernel (C, 1)``, ``conv_bias (1,)``; records ``spatial_map``."""

  linen_twin = scse.SpatialSqueezeExcitation

  def __init__(self, in_features: int, *, rngs: nnx.Rngs, **fields: Any):
    self._set_fields(in_features, fields)
    _base.declare(self, {'conv_kernel': ('kernel', (in_features, 1)),
                         'conv_bias': ('bias', (1,))}, rngs)

  def attention_map(self, x: Array) -> Array:
    check_param_shape(type(self).__name__, ('conv_kernel',), self.conv_kernel.shape,
                      (x.shape[-1], 1), x)
    spatial_map = scse.sse_map(self.conv_kernel[...], self.conv_bias[...], x, gate=self.gate,
                               dtype=self.dtype, precision=self.precision)
    _base.sow_map(self, 'spatial_map', spatial_map)
    return spatial_map

  def refine(self, x: Array) -> Array:
    return F.apply_gate(x, self.attention_map(x)[..., None])


class ConcurrentSpatialChannelSE(_base.AttentionModule):
  """scSE: submodules ``channel`` (cSE) and ``spatial`` (sSE)."""

  linen_twin = scse.ConcurrentSpatialChannelSE

  def __init__(self, in_features: int, *, rngs: nnx.Rngs, **fields: Any):
    self._set_fields(in_features, fields)
    _validation.check_choice('aggregation', self.aggregation, scse.AGGREGATIONS)
    shared = self.field_values(scse.SCSE_SHARED_FIELDS)
    self.channel = ChannelAttention(in_features, **self.field_values(scse.SCSE_CHANNEL_FIELDS),
                                    pool_types=se.SE_POOL_TYPES, **shared, rngs=rngs)
    self.spatial = SpatialSqueezeExcitation(in_features, **shared, rngs=rngs)

  def refine(self, x: Array) -> Array:
    return scse.scse_combine(x, self.channel.attention_map(x), self.spatial.attention_map(x),
                             self.aggregation)


class LightChannelAttention(_base.AttentionModule):
  """timm's LightChannelAttn; params as :class:`ChannelAttention`'s."""

  linen_twin = lcbam.LightChannelAttention

  def __init__(self, in_features: int, *, rngs: nnx.Rngs, **fields: Any):
    self._set_fields(in_features, fields)
    hidden = F.hidden_size(in_features, self.reduction_ratio, self.hidden_features,
                           self.hidden_rounding)
    _base.declare(self, lcbam.channel_param_shapes(in_features, hidden, self.mlp_bias), rngs)

  def attention_map(self, x: Array) -> Array:
    channels = x.shape[-1]
    check_param_shape(type(self).__name__, ('fc1_kernel',), self.fc1_kernel.shape,
                      (channels, F.hidden_size(channels, self.reduction_ratio,
                                               self.hidden_features, self.hidden_rounding)), x)
    channel_map = lcbam.light_channel_map(_base.values(self, _MLP_PARAMS), x,
                                          activation=self.activation, gate=self.gate,
                                          dtype=self.dtype, precision=self.precision)
    _base.sow_map(self, 'channel_map', channel_map)
    return channel_map

  def refine(self, x: Array) -> Array:
    return F.apply_gate(x, channel_map_shape(self.attention_map(x), x))


class LightSpatialAttention(_base.AttentionModule):
  """timm's LightSpatialAttn: param ``conv_kernel (*k, 1, 1)`` and ``norm``."""

  linen_twin = lcbam.LightSpatialAttention

  def __init__(self, in_features: int, *, num_spatial_dims: int | None = None,
               rngs: nnx.Rngs, **fields: Any):
    self._set_fields(in_features, fields)
    num_spatial = _base.num_spatial_dims_for(self.kernel_size, num_spatial_dims)
    kernel_size = _validation.spatial_kernel_size(self.kernel_size, num_spatial)
    self.conv_kernel = nnx.Param(self.kernel_init(rngs.params(), (*kernel_size, 1, 1),
                                                  self.param_dtype))
    self.norm = _base.batch_norm(1, self.norm_momentum, self.norm_epsilon, self.param_dtype,
                                 rngs, self.norm_scale_init)

  def attention_map(self, x: Array) -> Array:
    _validation.check_has_batch(type(self).__name__, x, self.conv_kernel.ndim - 2)
    kernel_size = _validation.spatial_kernel_size(self.kernel_size, x.ndim - 2)
    check_param_shape(type(self).__name__, ('conv_kernel',), self.conv_kernel.shape,
                      (*kernel_size, 1, 1), x)
    spatial_map = lcbam.light_spatial_map(self.conv_kernel[...], x, norm=self.norm,
                                          gate=self.gate, dtype=self.dtype,
                                          precision=self.precision, impl=self.conv_impl)
    _base.sow_map(self, 'spatial_map', spatial_map)
    return spatial_map

  def refine(self, x: Array) -> Array:
    return F.apply_gate(x, self.attention_map(x)[..., None])


class LightCBAM(_base.AttentionModule):
  """timm's LightCbamModule: submodules ``channel`` and ``spatial``."""

  linen_twin = lcbam.LightCBAM

  def __init__(self, in_features: int, *, num_spatial_dims: int | None = None,
               rngs: nnx.Rngs, **fields: Any):
    self._set_fields(in_features, fields)
    shared = self.field_values(lcbam.LIGHT_SHARED_FIELDS)
    self.channel = LightChannelAttention(
        in_features, **self.field_values(lcbam.LIGHT_CHANNEL_FIELDS), **shared, rngs=rngs)
    self.spatial = LightSpatialAttention(
        in_features, num_spatial_dims=num_spatial_dims,
        **self.field_values(lcbam.LIGHT_SPATIAL_FIELDS), **shared, rngs=rngs)

  def refine(self, x: Array) -> Array:
    refined = F.apply_gate(x, channel_map_shape(self.channel.attention_map(x), x))
    return F.apply_gate(refined, self.spatial.attention_map(refined)[..., None])


_REGISTRY: dict[str, type[_base.AttentionModule]] = {
    'cbam': CBAM, 'channel': ChannelAttention, 'spatial': SpatialAttention,
    'se': SqueezeExcitation, 'eca': EfficientChannelAttention, 'bam': BottleneckAttention,
    'scse': ConcurrentSpatialChannelSE, 'coord': CoordinateAttention,
    'triplet': TripletAttention, 'simam': SimAM, 'lcbam': LightCBAM,
}


def available() -> tuple[str, ...]:
  """Names accepted by :func:`create`: those of :func:`cbam_jax.attention.available`."""
  return tuple(sorted(_REGISTRY))


def resolve(name: str) -> type[_base.AttentionModule]:
  """The NNX class registered as ``name``; the linen registry's error otherwise."""
  if not isinstance(name, str) or name not in _REGISTRY:
    linen_attention.resolve(name)  # Raises its clear error for a name it does not know.
    raise ValueError(f'Attention {name!r} has no NNX module; NNX names: '
                     f'{", ".join(available())}.')
  return _REGISTRY[name]


def create(name: str, in_features: int, *, rngs: nnx.Rngs, **fields: Any) -> nnx.Module:
  """Builds the NNX attention module called ``name`` for ``in_features`` channels.

  ``fields`` are those of the linen module of that name, plus ``num_spatial_dims`` for the
  members whose parameters depend on the input rank (``cbam``, ``spatial``, ``bam``,
  ``lcbam``).
  """
  return resolve(name)(in_features, rngs=rngs, **fields)
