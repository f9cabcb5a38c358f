"""scSE: concurrent spatial and channel squeeze & excitation (Roy, Navab and Wachinger,
MICCAI 2018)."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from cbam_jax import _validation
from cbam_jax import functional as F
from cbam_jax.attention import _base
from cbam_jax.attention._registry import Member, register
from cbam_jax.attention.cbam import ChannelAttention, NnxChannelAttention
from cbam_jax.attention.se import SE_POOL_TYPES

Array = jax.Array

AGGREGATIONS = ('add', 'max')
SCSE_CHANNEL_FIELDS = ('reduction_ratio', 'hidden_features', 'hidden_rounding', 'mlp_bias',
                       'activation')


def sse_map(kernel: Array, bias: Array, x: Array, *, gate, dtype=None,
            precision=None) -> Array:
  """``gate(x @ kernel + bias)`` per position of a channels-last batch: ``(B, *spatial)``."""
  dtype = dtype or jnp.result_type(x, kernel)
  # The projection sums over C: accumulate in float32 whatever the compute dtype.
  logits = jnp.dot(x.astype(dtype), kernel.astype(dtype), precision=precision,
                   preferred_element_type=jnp.float32)[..., 0]
  return gate(logits + bias.astype(jnp.float32)[0])


def scse_combine(x: Array, channel_map: Array, spatial_map: Array, aggregation: str) -> Array:
  """``x * cSE + x * sSE`` (``'add'``) or their maximum (``'max'``), in ``x.dtype``."""
  x32 = x.astype(jnp.float32)
  by_channel = x32 * _base.channel_map_shape(channel_map, x)
  by_position = x32 * spatial_map[..., None]
  if aggregation == 'add':
    out = by_channel + by_position
  else:
    out = jnp.maximum(by_channel, by_position)
  return out.astype(x.dtype)


class SpatialSqueezeExcitation(_base.AttentionModule):
  """sSE: ``x * sigmoid(conv1x1(x))``, a per-position gate from a ``C -> 1`` projection.

  Params ``conv_kernel (C, 1)`` and ``conv_bias (1,)``; sows ``spatial_map`` ``(B, *spatial)``.
  """

  gate: Callable[[Array], Array] = nn.sigmoid

  def attention_map(self, x: Array) -> Array:
    """``(B, *spatial)`` float32 spatial map of channels-last ``x``; sown as ``spatial_map``."""
    _validation.check_features(x, batched=True)
    return self._attention_map(x)

  @nn.compact
  def _attention_map(self, x: Array) -> Array:
    """:meth:`attention_map` of features checked by the caller (``__call__``'s boundary)."""
    channels = x.shape[-1]
    _base.check_stored_shape(self, ('conv_kernel',), (channels, 1), x)
    kernel = self.param('conv_kernel', self.kernel_init, (channels, 1), self.param_dtype)
    bias = self.param('conv_bias', self.bias_init, (1,), self.param_dtype)
    spatial_map = sse_map(kernel, bias, x, gate=self.gate, dtype=self.dtype,
                          precision=self.precision)
    self.sow('intermediates', 'spatial_map', spatial_map)
    return spatial_map

  def refine(self, x: Array, train: bool) -> Array:
    del train
    return F.apply_gate(x, self._attention_map(x)[..., None])


class ConcurrentSpatialChannelSE(_base.AttentionModule):
  """scSE: ``x * cSE(x) + x * sSE(x)`` (``aggregation='add'``, the paper's choice) or
  ``max(x * cSE(x), x * sSE(x))`` (``'max'``, also studied by the authors).

  cSE is :class:`cbam_jax.attention.SqueezeExcitation` (submodule ``channel``, sows
  ``channel_map`` ``(B, C)``); sSE is :class:`SpatialSqueezeExcitation` (submodule
  ``spatial``, sows ``spatial_map`` ``(B, *spatial)``). 1-D, 2-D and 3-D inputs.

  Attributes:
    reduction_ratio: cSE hidden width ``max(1, C // reduction_ratio)``; 16 as in SE and
      segmentation_models_pytorch (the paper used 2 for its small U-Nets).
    hidden_features, hidden_rounding, mlp_bias, activation: the cSE MLP's, as in SE.
    aggregation: ``'add'`` or ``'max'``.
    gate: squashing function of both maps.
  """

  reduction_ratio: float = 16
  hidden_features: int | None = None
  hidden_rounding: str = 'floor'
  mlp_bias: bool = True
  activation: Callable[[Array], Array] = nn.relu
  aggregation: str = 'add'
  gate: Callable[[Array], Array] = nn.sigmoid

  @nn.compact
  def refine(self, x: Array, train: bool) -> Array:
    del train
    _validation.check_choice('aggregation', self.aggregation, AGGREGATIONS)
    shared = {name: getattr(self, name) for name in _base.SHARED_FIELDS}
    channel_map = ChannelAttention(
        **{name: getattr(self, name) for name in SCSE_CHANNEL_FIELDS}, pool_types=SE_POOL_TYPES,
        **shared, name='channel')._attention_map(x)
    spatial_map = SpatialSqueezeExcitation(**shared, name='spatial')._attention_map(x)
    return scse_combine(x, channel_map, spatial_map, self.aggregation)


class NnxSpatialSqueezeExcitation(_base.NnxAttentionModule):
  """:class:`SpatialSqueezeExcitation` in NNX: params ``conv_kernel (C, 1)``, ``conv_bias
  (1,)``; records ``spatial_map``."""

  gate: Callable[[Array], Array]
  conv_kernel: nnx.Param[Array]
  conv_bias: nnx.Param[Array]

  def __init__(self, in_features: int, *, gate: Callable[[Array], Array] = nn.sigmoid,
               channel_axis: int = -1,
               identity_init: bool = False,
               dtype: _base.Dtype | None = None, param_dtype: _base.Dtype = jnp.float32,
               precision: _base.PrecisionLike = None,
               kernel_init: _base.Initializer = _base.default_kernel_init,
               bias_init: _base.Initializer = _base.default_bias_init, rngs: nnx.Rngs):
    self.set_fields(in_features, locals())
    _base.declare_nnx(self, {'conv_kernel': ('kernel', (in_features, 1)),
                             'conv_bias': ('bias', (1,))}, rngs)

  def attention_map(self, x: Array) -> Array:
    """``(B, *spatial)`` float32 spatial map of channels-last ``x``."""
    _validation.check_features(x, batched=True)
    return self._attention_map(x)

  def _attention_map(self, x: Array) -> Array:
    """:meth:`attention_map` of features checked by the caller (``__call__``'s boundary)."""
    _base.check_param_shape(type(self).__name__, ('conv_kernel',), self.conv_kernel.shape,
                            (x.shape[-1], 1), x)
    spatial_map = sse_map(self.conv_kernel[...], self.conv_bias[...], x, gate=self.gate,
                          dtype=self.dtype, precision=self.precision)
    _base.sow_map(self, 'spatial_map', spatial_map)
    return spatial_map

  def refine(self, x: Array) -> Array:
    return F.apply_gate(x, self._attention_map(x)[..., None])


class NnxConcurrentSpatialChannelSE(_base.NnxAttentionModule):
  """:class:`ConcurrentSpatialChannelSE` in NNX: submodules ``channel`` (cSE) and
  ``spatial`` (sSE)."""

  aggregation: str

  def __init__(self, in_features: int, *, reduction_ratio: float = 16,
               hidden_features: int | None = None, hidden_rounding: str = 'floor',
               mlp_bias: bool = True, activation: Callable[[Array], Array] = nn.relu,
               aggregation: str = 'add', gate: Callable[[Array], Array] = nn.sigmoid,
               channel_axis: int = -1,
               identity_init: bool = False,
               dtype: _base.Dtype | None = None, param_dtype: _base.Dtype = jnp.float32,
               precision: _base.PrecisionLike = None,
               kernel_init: _base.Initializer = _base.default_kernel_init,
               bias_init: _base.Initializer = _base.default_bias_init, rngs: nnx.Rngs):
    self.set_fields(in_features, locals())
    _validation.check_choice('aggregation', aggregation, AGGREGATIONS)
    shared = self.field_values(_base.SHARED_FIELDS)
    self.channel = NnxChannelAttention(in_features, **self.field_values(SCSE_CHANNEL_FIELDS),
                                       pool_types=SE_POOL_TYPES, **shared, rngs=rngs)
    self.spatial = NnxSpatialSqueezeExcitation(in_features, **shared, rngs=rngs)

  def refine(self, x: Array) -> Array:
    return scse_combine(x, self.channel._attention_map(x), self.spatial._attention_map(x),
                        self.aggregation)


register(Member('scse', ConcurrentSpatialChannelSE, NnxConcurrentSpatialChannelSE,
                maps=('channel_map', 'spatial_map')))
