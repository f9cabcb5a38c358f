"""timm's "light" CBAM (``timm.layers.cbam.LightCbamModule``).

Each branch pools ``0.5 * avg + 0.5 * max`` BEFORE its learned layer, so the channel MLP runs
once (not once per pool) and the spatial conv has one input channel (not two).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from cbam_jax import _validation
from cbam_jax import functional as F
from cbam_jax._fast.spatial_conv import resolve_impl
from cbam_jax.attention import _base
from cbam_jax.attention._registry import Member, register
from cbam_jax.attention.cbam import channel_param_shapes

Array = jax.Array

# LightCBAM's fields that belong to each branch; the rest (_base.SHARED_FIELDS) go to both.
LIGHT_CHANNEL_FIELDS = ('reduction_ratio', 'hidden_features', 'hidden_rounding', 'mlp_bias',
                        'activation')
LIGHT_SPATIAL_FIELDS = ('kernel_size', 'norm_momentum', 'norm_epsilon', 'norm_scale_init',
                        'conv_impl')


def light_channel_map(params: F.Params, x: Array, *, activation, gate, dtype=None,
                      precision=None) -> Array:
  """``gate(MLP(0.5 * GAP(x) + 0.5 * GMP(x)))`` of a channels-last batch: ``(B, C)``."""
  pooled = 0.5 * _base.spatial_pool(x, 'avg') + 0.5 * _base.spatial_pool(x, 'max')
  return gate(F.shared_mlp(params, pooled, activation=activation, dtype=dtype,
                           precision=precision))


def light_spatial_map(kernel: Array, x: Array, *, norm, gate, dtype=None, precision=None,
                      impl: str = 'auto') -> Array:
  """``gate(norm(conv_k(0.5 * mean_c(x) + 0.5 * max_c(x))))``: ``(B, *spatial)``.

  ``kernel``: ``(*k, 1, 1)``; ``norm`` a BatchNorm over a trailing axis of size 1.
  """
  # conv(0.5 * mean + 0.5 * max, w) == conv([mean; max], [w / 2; w / 2]): reuse CBAM's
  # two-input spatial convolution rather than a second code path.
  two_input_kernel = 0.5 * jnp.concatenate([kernel, kernel], axis=-2)
  # x was checked at the module boundary: the unchecked core, impl resolved once.
  logits = jax.vmap(functools.partial(
      F._spatial_logits, dtype=dtype, precision=precision, impl=resolve_impl(impl)),
      in_axes=(None, 0))({'conv_kernel': two_input_kernel}, x)
  return gate(norm(logits[..., None])[..., 0])


class LightChannelAttention(_base.AttentionModule):
  """``x * sigmoid(MLP(0.5 * GAP(x) + 0.5 * GMP(x)))`` (timm's ``LightChannelAttn``).

  Params as :class:`cbam_jax.ChannelAttention`'s (``fc1_kernel (C, h)``, ``fc2_kernel (h,
  C)``, biases when ``mlp_bias``); sows ``channel_map`` ``(B, C)``. Defaults are timm's:
  ``hidden = round(C / 16)``, no MLP biases.
  """

  reduction_ratio: float = 16
  hidden_features: int | None = None
  hidden_rounding: str = 'round'
  mlp_bias: bool = False
  activation: Callable[[Array], Array] = nn.relu
  gate: Callable[[Array], Array] = nn.sigmoid

  def attention_map(self, x: Array) -> Array:
    """``(B, C)`` float32 channel map of channels-last ``x``; sown as ``channel_map``."""
    _validation.check_features(x, batched=True)
    return self._attention_map(x)

  @nn.compact
  def _attention_map(self, x: Array) -> Array:
    """:meth:`attention_map` of features checked by the caller (``__call__``'s boundary)."""
    channels = x.shape[-1]
    hidden = F.hidden_size(channels, self.reduction_ratio, self.hidden_features,
                           self.hidden_rounding)
    _base.check_stored_shape(self, ('fc1_kernel',), (channels, hidden), x)
    params = _base.declare_linen(self, channel_param_shapes(channels, hidden, self.mlp_bias))
    channel_map = light_channel_map(params, x, activation=self.activation, gate=self.gate,
                                    dtype=self.dtype, precision=self.precision)
    self.sow('intermediates', 'channel_map', channel_map)
    return channel_map

  def refine(self, x: Array, train: bool) -> Array:
    del train
    return F.apply_gate(x, _base.channel_map_shape(self._attention_map(x), x))


class LightSpatialAttention(_base.AttentionModule):
  """``x * sigmoid(BN(conv_k(0.5 * mean_c(x) + 0.5 * max_c(x))))`` (timm's
  ``LightSpatialAttn``: a bias-free 1-in, 1-out conv and BatchNorm).

  Param ``conv_kernel (*k, 1, 1)`` (PyTorch's ``conv.weight (1, 1, *k)`` transposed) and
  ``norm``; sows ``spatial_map`` ``(B, *spatial)``. Any number of spatial dimensions.

  Attributes:
    kernel_size: odd conv size, an int or one per spatial dimension (7).
    norm_momentum: Flax BatchNorm momentum; 0.9 is timm's (PyTorch ``momentum=0.1``).
    norm_epsilon: BatchNorm epsilon.
    norm_scale_init: initialiser of the BatchNorm scale.
    conv_impl: ``'auto'``, ``'xla'`` or ``'shift'`` (see ``functional.spatial_conv``).
  """

  kernel_size: int | Sequence[int] = 7
  norm_momentum: float = 0.9
  norm_epsilon: float = 1e-5
  norm_scale_init: _base.Initializer = _base.ones_init
  conv_impl: str = 'auto'
  gate: Callable[[Array], Array] = nn.sigmoid

  def attention_map(self, x: Array, train: bool = False) -> Array:
    """``(B, *spatial)`` float32 spatial map of channels-last ``x``; sown as ``spatial_map``."""
    _validation.check_features(x, batched=True)
    return self._attention_map(x, train)

  @nn.compact
  def _attention_map(self, x: Array, train: bool) -> Array:
    """:meth:`attention_map` of features checked by the caller (``__call__``'s boundary)."""
    _base.check_has_batch(self, x)
    kernel_size = _validation.spatial_kernel_size(self.kernel_size, x.ndim - 2)
    _base.check_stored_shape(self, ('conv_kernel',), (*kernel_size, 1, 1), x)
    kernel = self.param('conv_kernel', self.kernel_init, (*kernel_size, 1, 1),
                        self.param_dtype)
    spatial_map = light_spatial_map(
        kernel, x, norm=_base.batch_norm(train, self.norm_momentum, self.norm_epsilon,
                                         self.param_dtype, 'norm', self.norm_scale_init),
        gate=self.gate, dtype=self.dtype, precision=self.precision, impl=self.conv_impl)
    self.sow('intermediates', 'spatial_map', spatial_map)
    return spatial_map

  def refine(self, x: Array, train: bool) -> Array:
    return F.apply_gate(x, self._attention_map(x, train)[..., None])


class LightCBAM(_base.AttentionModule):
  """timm's ``LightCbamModule``: :class:`LightChannelAttention` then
  :class:`LightSpatialAttention` (submodules ``channel`` and ``spatial``), with timm's
  defaults. Fields are those of the two branches.
  """

  reduction_ratio: float = 16
  hidden_features: int | None = None
  hidden_rounding: str = 'round'
  mlp_bias: bool = False
  activation: Callable[[Array], Array] = nn.relu
  kernel_size: int | Sequence[int] = 7
  norm_momentum: float = 0.9
  norm_epsilon: float = 1e-5
  norm_scale_init: _base.Initializer = _base.ones_init
  conv_impl: str = 'auto'
  gate: Callable[[Array], Array] = nn.sigmoid

  @nn.compact
  def refine(self, x: Array, train: bool) -> Array:
    shared = {name: getattr(self, name) for name in _base.SHARED_FIELDS}
    channel_map = LightChannelAttention(
        **{name: getattr(self, name) for name in LIGHT_CHANNEL_FIELDS}, **shared,
        name='channel')._attention_map(x)
    refined = F.apply_gate(x, _base.channel_map_shape(channel_map, x))
    spatial_map = LightSpatialAttention(
        **{name: getattr(self, name) for name in LIGHT_SPATIAL_FIELDS}, **shared,
        name='spatial')._attention_map(refined, train)
    return F.apply_gate(refined, spatial_map[..., None])


_MLP_PARAMS = ('fc1_kernel', 'fc1_bias', 'fc2_kernel', 'fc2_bias')


class NnxLightChannelAttention(_base.NnxAttentionModule):
  """:class:`LightChannelAttention` in NNX; params as ``cbam_jax.nnx.ChannelAttention``'s."""

  reduction_ratio: float
  hidden_features: int | None
  hidden_rounding: str
  activation: Callable[[Array], Array]
  gate: Callable[[Array], Array]
  fc1_kernel: nnx.Param[Array]

  def __init__(self, in_features: int, *, reduction_ratio: float = 16,
               hidden_features: int | None = None, hidden_rounding: str = 'round',
               mlp_bias: bool = False, activation: Callable[[Array], Array] = nn.relu,
               gate: Callable[[Array], Array] = nn.sigmoid, channel_axis: int = -1,
               identity_init: bool = False,
               dtype: _base.Dtype | None = None, param_dtype: _base.Dtype = jnp.float32,
               precision: _base.PrecisionLike = None,
               kernel_init: _base.Initializer = _base.default_kernel_init,
               bias_init: _base.Initializer = _base.default_bias_init, rngs: nnx.Rngs):
    self.set_fields(in_features, locals())
    hidden = F.hidden_size(in_features, reduction_ratio, hidden_features, hidden_rounding)
    _base.declare_nnx(self, channel_param_shapes(in_features, hidden, mlp_bias), rngs)

  def attention_map(self, x: Array) -> Array:
    """``(B, C)`` float32 channel map of channels-last ``x``."""
    _validation.check_features(x, batched=True)
    return self._attention_map(x)

  def _attention_map(self, x: Array) -> Array:
    """:meth:`attention_map` of features checked by the caller (``__call__``'s boundary)."""
    channels = x.shape[-1]
    _base.check_param_shape(type(self).__name__, ('fc1_kernel',), self.fc1_kernel.shape,
                            (channels, F.hidden_size(channels, self.reduction_ratio,
                                                     self.hidden_features,
                                                     self.hidden_rounding)), x)
    channel_map = light_channel_map(_base.nnx_values(self, _MLP_PARAMS), x,
                                    activation=self.activation, gate=self.gate,
                                    dtype=self.dtype, precision=self.precision)
    _base.sow_map(self, 'channel_map', channel_map)
    return channel_map

  def refine(self, x: Array) -> Array:
    return F.apply_gate(x, _base.channel_map_shape(self._attention_map(x), x))


class NnxLightSpatialAttention(_base.NnxAttentionModule):
  """:class:`LightSpatialAttention` in NNX: param ``conv_kernel (*k, 1, 1)`` and ``norm``;
  ``num_spatial_dims`` as ``cbam_jax.nnx.SpatialAttention``'s."""

  kernel_size: int | Sequence[int]
  conv_impl: str
  gate: Callable[[Array], Array]

  def __init__(self, in_features: int, *, kernel_size: int | Sequence[int] = 7,
               norm_momentum: float = 0.9, norm_epsilon: float = 1e-5,
               norm_scale_init: _base.Initializer = _base.ones_init, conv_impl: str = 'auto',
               gate: Callable[[Array], Array] = nn.sigmoid, channel_axis: int = -1,
               identity_init: bool = False,
               dtype: _base.Dtype | None = None, param_dtype: _base.Dtype = jnp.float32,
               precision: _base.PrecisionLike = None,
               kernel_init: _base.Initializer = _base.default_kernel_init,
               bias_init: _base.Initializer = _base.default_bias_init,
               num_spatial_dims: int | None = None, rngs: nnx.Rngs):
    self.set_fields(in_features, locals())
    num_spatial = _base.num_spatial_dims_for(kernel_size, num_spatial_dims)
    sizes = _validation.spatial_kernel_size(kernel_size, num_spatial)
    self.conv_kernel = nnx.Param(kernel_init(rngs.params(), (*sizes, 1, 1), param_dtype))
    self.norm = _base.nnx_batch_norm(1, norm_momentum, norm_epsilon, param_dtype, rngs,
                                     norm_scale_init)

  def attention_map(self, x: Array) -> Array:
    """``(B, *spatial)`` float32 spatial map of channels-last ``x``."""
    _validation.check_features(x, batched=True)
    return self._attention_map(x)

  def _attention_map(self, x: Array) -> Array:
    """:meth:`attention_map` of features checked by the caller (``__call__``'s boundary)."""
    _validation.check_has_batch(type(self).__name__, x, self.conv_kernel.ndim - 2)
    kernel_size = _validation.spatial_kernel_size(self.kernel_size, x.ndim - 2)
    _base.check_param_shape(type(self).__name__, ('conv_kernel',), self.conv_kernel.shape,
                            (*kernel_size, 1, 1), x)
    spatial_map = light_spatial_map(self.conv_kernel[...], x, norm=self.norm, gate=self.gate,
                                    dtype=self.dtype, precision=self.precision,
                                    impl=self.conv_impl)
    _base.sow_map(self, 'spatial_map', spatial_map)
    return spatial_map

  def refine(self, x: Array) -> Array:
    return F.apply_gate(x, self._attention_map(x)[..., None])


class NnxLightCBAM(_base.NnxAttentionModule):
  """:class:`LightCBAM` in NNX: submodules ``channel`` and ``spatial``."""

  def __init__(self, in_features: int, *, reduction_ratio: float = 16,
               hidden_features: int | None = None, hidden_rounding: str = 'round',
               mlp_bias: bool = False, activation: Callable[[Array], Array] = nn.relu,
               kernel_size: int | Sequence[int] = 7, norm_momentum: float = 0.9,
               norm_epsilon: float = 1e-5, norm_scale_init: _base.Initializer = _base.ones_init,
               conv_impl: str = 'auto', gate: Callable[[Array], Array] = nn.sigmoid,
               channel_axis: int = -1,
               identity_init: bool = False,
               dtype: _base.Dtype | None = None, param_dtype: _base.Dtype = jnp.float32,
               precision: _base.PrecisionLike = None,
               kernel_init: _base.Initializer = _base.default_kernel_init,
               bias_init: _base.Initializer = _base.default_bias_init,
               num_spatial_dims: int | None = None, rngs: nnx.Rngs):
    self.set_fields(in_features, locals())
    shared = self.field_values(_base.SHARED_FIELDS)
    self.channel = NnxLightChannelAttention(
        in_features, **self.field_values(LIGHT_CHANNEL_FIELDS), **shared, rngs=rngs)
    self.spatial = NnxLightSpatialAttention(
        in_features, num_spatial_dims=num_spatial_dims,
        **self.field_values(LIGHT_SPATIAL_FIELDS), **shared, rngs=rngs)

  def refine(self, x: Array) -> Array:
    refined = F.apply_gate(x, _base.channel_map_shape(self.channel._attention_map(x), x))
    return F.apply_gate(refined, self.spatial._attention_map(refined)[..., None])


# The module's defaults are timm's LightCbamModule.
register(Member('lcbam', LightCBAM, NnxLightCBAM, maps=('channel_map', 'spatial_map'),
                presets={'timm': {}}))
