"""CBAM (Woo et al., ECCV 2018) and its two branches, in both skins, on
:mod:`cbam_jax.functional`.

One file per member: the batched math (module-level functions both skins call), the linen
modules (:class:`CBAM`, :class:`ChannelAttention`, :class:`SpatialAttention`), their NNX
twins (:class:`NnxCBAM`, ... exported as ``cbam_jax.nnx.CBAM``, ...) and the registrations
(``'cbam'``, ``'channel'``, ``'spatial'``). Inputs are ``(B, *spatial, C)`` with 1 to 3
spatial dimensions; ``channel_axis`` accepts other layouts (``1`` for NCHW) and gives
exactly the transposed result.

Attention maps are sown (linen ``'intermediates'``, NNX ``nnx.Intermediate``), float32 in
[0, 1]: ``channel_map`` with shape ``(B, C)`` and ``spatial_map`` with shape
``(B, *spatial)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from cbam_jax import _validation
from cbam_jax import functional as F
from cbam_jax._base import (
  SHARED_FIELDS,
  AttentionModule,
  Dtype,
  Initializer,
  NnxAttentionModule,
  ParamShapes,
  PrecisionLike,
  batch_norm,
  channel_map_shape,
  check_has_batch,
  check_spatial_kernel_shape,
  declare_linen,
  declare_nnx,
  default_bias_init,
  default_kernel_init,
  nnx_batch_norm,
  nnx_values,
  num_spatial_dims_for,
  ones_init,
  sow_map,
  zeros_init,
)
from cbam_jax._fast.logits import batched_spatial_logits
from cbam_jax.attention._registry import Member, register

Array = jax.Array
Params = Mapping[str, Array]

__all__ = ['ChannelAttention', 'SpatialAttention', 'CBAM', 'NnxCBAM', 'NnxChannelAttention',
           'NnxSpatialAttention', 'channel_attention_map', 'channel_param_shapes',
           'spatial_attention_map', 'spatial_param_shapes']

# CBAM's fields that belong to each branch; the rest (SHARED_FIELDS) go to both.
CHANNEL_FIELDS = ('reduction_ratio', 'hidden_features', 'hidden_rounding', 'hidden_divisor',
                  'pool_types', 'mlp_bias', 'activation')
SPATIAL_FIELDS = ('kernel_size', 'spatial_norm', 'use_bias', 'norm_momentum', 'norm_epsilon',
                  'norm_scale_init', 'conv_impl')


def channel_param_shapes(channels: int, hidden: int, mlp_bias: bool) -> ParamShapes:
  """The channel branch's parameters (see :func:`cbam_jax.functional.shared_mlp`)."""
  shapes: ParamShapes = {'fc1_kernel': ('kernel', (channels, hidden)),
                         'fc2_kernel': ('kernel', (hidden, channels))}
  if mlp_bias:
    shapes.update(fc1_bias=('bias', (hidden,)), fc2_bias=('bias', (channels,)))
  return shapes


def spatial_use_bias(spatial_norm: bool, use_bias: bool | None) -> bool:
  """``use_bias=None`` means a conv bias only without the spatial BatchNorm."""
  return (not spatial_norm) if use_bias is None else use_bias


def spatial_param_shapes(kernel_size: Sequence[int], use_bias: bool,
                         in_channels: int = 2) -> ParamShapes:
  """The spatial branch's conv (see :func:`cbam_jax.functional.spatial_logits`)."""
  shapes: ParamShapes = {'conv_kernel': ('kernel', (*kernel_size, in_channels, 1))}
  if use_bias:
    shapes['conv_bias'] = ('bias', (1,))
  return shapes


def channel_attention_map(params: Params, x: Array, *, pool_types: Sequence[str],
                          activation: Callable[[Array], Array],
                          gate: Callable[[Array], Array], dtype: Dtype | None = None,
                          precision: PrecisionLike = None) -> Array:
  """``gate(sum_p MLP(pool_p(x)))`` of a checked channels-last batch ``(B, *spatial, C)``:
  ``(B, C)`` float32."""
  # The unchecked core: the module checked x (its boundary), pool types and channels.
  logits = jax.vmap(functools.partial(
      F._channel_logits, pool_types=tuple(pool_types), activation=activation, dtype=dtype,
      precision=precision), in_axes=(None, 0))(params, x)
  return gate(logits)


def spatial_attention_map(params: Params, x: Array, *, norm: Callable[[Array], Array] | None,
                          gate: Callable[[Array], Array], dtype: Dtype | None = None,
                          precision: PrecisionLike = None, impl: str = 'auto') -> Array:
  """``gate(norm(conv_k([mean_c; max_c])))`` of a channels-last batch: ``(B, *spatial)``
  float32. ``norm`` (a BatchNorm over a trailing feature axis of size 1) may be ``None``."""
  # Same numbers as vmap(F.spatial_logits); pools into channel-major planes, the layout
  # the CPU 'shift' conv is fast on.
  logits = batched_spatial_logits(params, x, dtype=dtype, precision=precision, impl=impl)
  if norm is not None:
    logits = norm(logits[..., None])[..., 0]
  return gate(logits)


def check_cbam_fields(order: str, use_channel: bool, use_spatial: bool) -> None:
  _validation.check_choice('order', order, F.ORDERS)
  if not (use_channel or use_spatial):
    raise ValueError('CBAM with use_channel=False and use_spatial=False does nothing; '
                     'enable at least one branch.')


def cbam_in_order(x: Array, channel_map: Callable[[Array], Array] | None,
                  spatial_map: Callable[[Array], Array] | None, order: str) -> Array:
  """CBAM's composition of a batch ``x`` ``(B, *spatial, C)`` from the two branches' maps
  (``(B, C)`` and ``(B, *spatial)``; ``None`` switches a branch off). ``order`` is a
  checked field (:func:`check_cbam_fields`)."""

  # Each gate is passed on only when its map is given.
  def channel_gate(inp):
    return channel_map_shape(channel_map(inp), inp)  # type: ignore[misc]

  def spatial_gate(inp):
    return spatial_map(inp)[..., None]  # type: ignore[misc]

  return F._gate_in_order(x, channel_gate if channel_map else None,
                          spatial_gate if spatial_map else None, order)[0]


class ChannelAttention(AttentionModule):
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
    The remaining fields (``channel_axis``, ``dtype``, ...) are
    :class:`cbam_jax._base.AttentionModule`'s.
  """

  reduction_ratio: float = 16
  hidden_features: int | None = None
  hidden_rounding: str = 'floor'
  hidden_divisor: int = 1
  pool_types: Sequence[str] = ('avg', 'max')
  mlp_bias: bool = True
  activation: Callable[[Array], Array] = nn.relu
  gate: Callable[[Array], Array] = nn.sigmoid

  def attention_map(self, x: Array) -> Array:
    """``(B, C)`` float32 channel map of channels-last ``x``; sown as ``channel_map``."""
    _validation.check_features(x, batched=True)
    return self._attention_map(x)

  @nn.compact
  def _attention_map(self, x: Array) -> Array:
    """:meth:`attention_map` of features checked by the caller (``__call__``'s boundary)."""
    _validation.check_pool_types(self.pool_types)
    channels = x.shape[-1]
    hidden = F.hidden_size(channels, self.reduction_ratio, self.hidden_features,
                           self.hidden_rounding, self.hidden_divisor)
    if self.has_variable('params', 'fc1_kernel'):
      _validation.check_channels(x, self.get_variable('params', 'fc1_kernel').shape[0],
                                 type(self).__name__)
    params = declare_linen(self, channel_param_shapes(channels, hidden, self.mlp_bias))
    channel_map = channel_attention_map(
        params, x, pool_types=self.pool_types, activation=self.activation, gate=self.gate,
        dtype=self.dtype, precision=self.precision)
    self.sow('intermediates', 'channel_map', channel_map)
    return channel_map

  def refine(self, x: Array, train: bool) -> Array:
    del train  # No BatchNorm in this branch; kept so every attention module is called alike.
    return F.apply_gate(x, channel_map_shape(self._attention_map(x), x))


class SpatialAttention(AttentionModule):
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
    gate: the map's squashing function.
    conv_impl: ``'auto'``, ``'xla'`` or ``'shift'``; all give the same numbers.
  """

  kernel_size: int | Sequence[int] = 7
  spatial_norm: bool = False
  use_bias: bool | None = None
  norm_momentum: float = 0.99
  norm_epsilon: float = 1e-5
  norm_scale_init: Initializer = ones_init
  gate: Callable[[Array], Array] = nn.sigmoid
  conv_impl: str = 'auto'

  def attention_map(self, x: Array, train: bool = False) -> Array:
    """``(B, *spatial)`` float32 spatial map of channels-last ``x``; sown as ``spatial_map``."""
    _validation.check_features(x, batched=True)
    return self._attention_map(x, train)

  @nn.compact
  def _attention_map(self, x: Array, train: bool) -> Array:
    """:meth:`attention_map` of features checked by the caller (``__call__``'s boundary)."""
    check_has_batch(self, x)
    kernel_size = _validation.spatial_kernel_size(self.kernel_size, x.ndim - 2)
    if self.has_variable('params', 'conv_kernel'):
      # Checked here so that a clear message beats Flax's ScopeParamShapeError.
      check_spatial_kernel_shape(type(self).__name__,
                                 self.get_variable('params', 'conv_kernel').shape,
                                 kernel_size, 2, x)
    params = declare_linen(self, spatial_param_shapes(
        kernel_size, spatial_use_bias(self.spatial_norm, self.use_bias)))
    norm = None
    if self.spatial_norm:
      # float32 statistics whatever the compute dtype: they feed the sigmoid directly.
      # Two-pass variance (not E[x^2] - E[x]^2): logits have |mean| >> std after the
      # conv, and the one-pass form then drifts ~1e-4 from PyTorch in training.
      norm = batch_norm(train, self.norm_momentum, self.norm_epsilon, self.param_dtype,
                        'norm', self.norm_scale_init)
    spatial_map = spatial_attention_map(params, x, norm=norm, gate=self.gate,
                                        dtype=self.dtype, precision=self.precision,
                                        impl=self.conv_impl)
    self.sow('intermediates', 'spatial_map', spatial_map)
    return spatial_map

  def refine(self, x: Array, train: bool) -> Array:
    return F.apply_gate(x, self._attention_map(x, train)[..., None])


class CBAM(AttentionModule):
  """Convolutional Block Attention Module (Woo et al., ECCV 2018).

  Defaults follow the paper. ``CBAM(spatial_norm=True)`` is the official code's module;
  :mod:`cbam_jax.attention.presets` names the official and timm configurations.

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
  norm_scale_init: Initializer = ones_init
  order: str = 'channel_first'
  use_channel: bool = True
  use_spatial: bool = True
  conv_impl: str = 'auto'

  def setup(self):
    check_cbam_fields(self.order, self.use_channel, self.use_spatial)
    shared = {name: getattr(self, name) for name in SHARED_FIELDS}
    if self.use_channel:
      self.channel = ChannelAttention(
          **{name: getattr(self, name) for name in CHANNEL_FIELDS}, **shared)
    if self.use_spatial:
      self.spatial = SpatialAttention(
          **{name: getattr(self, name) for name in SPATIAL_FIELDS}, **shared)

  def refine(self, x: Array, train: bool) -> Array:
    return cbam_in_order(
        x, self.channel._attention_map if self.use_channel else None,
        functools.partial(self.spatial._attention_map, train=train) if self.use_spatial
        else None, self.order)


# The NNX skin: the same fields (as keywords, same defaults), parameters and math.

_CHANNEL_PARAMS = ('fc1_kernel', 'fc1_bias', 'fc2_kernel', 'fc2_bias')
_SPATIAL_PARAMS = ('conv_kernel', 'conv_bias')


class NnxChannelAttention(NnxAttentionModule):
  """:class:`ChannelAttention` in NNX (``cbam_jax.nnx.ChannelAttention``).

  Params ``fc1_kernel (C, hidden)``, ``fc2_kernel``, biases with ``mlp_bias``; records
  ``channel_map`` ``(B, C)`` under ``nnx.capture``.
  """

  pool_types: Sequence[str]
  activation: Callable[[Array], Array]
  gate: Callable[[Array], Array]

  def __init__(self, in_features: int, *, reduction_ratio: float = 16,
               hidden_features: int | None = None, hidden_rounding: str = 'floor',
               hidden_divisor: int = 1, pool_types: Sequence[str] = ('avg', 'max'),
               mlp_bias: bool = True, activation: Callable[[Array], Array] = nn.relu,
               gate: Callable[[Array], Array] = nn.sigmoid, channel_axis: int = -1,
               identity_init: bool = False,
               dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
               precision: PrecisionLike = None, kernel_init: Initializer = default_kernel_init,
               bias_init: Initializer = default_bias_init, rngs: nnx.Rngs):
    self.set_fields(in_features, locals())
    _validation.check_pool_types(self.pool_types)
    hidden = F.hidden_size(in_features, reduction_ratio, hidden_features, hidden_rounding,
                           hidden_divisor)
    declare_nnx(self, channel_param_shapes(in_features, hidden, mlp_bias), rngs)

  def attention_map(self, x: Array) -> Array:
    """``(B, C)`` float32 channel map of channels-last ``x``."""
    _validation.check_features(x, batched=True)
    return self._attention_map(x)

  def _attention_map(self, x: Array) -> Array:
    """:meth:`attention_map` of features checked by the caller (``__call__``'s boundary)."""
    _validation.check_channels(x, self.in_features, type(self).__name__)
    channel_map = channel_attention_map(
        nnx_values(self, _CHANNEL_PARAMS), x, pool_types=self.pool_types,
        activation=self.activation, gate=self.gate, dtype=self.dtype, precision=self.precision)
    sow_map(self, 'channel_map', channel_map)
    return channel_map

  def refine(self, x: Array) -> Array:
    return F.apply_gate(x, channel_map_shape(self._attention_map(x), x))


class NnxSpatialAttention(NnxAttentionModule):
  """:class:`SpatialAttention` in NNX (``cbam_jax.nnx.SpatialAttention``).

  Params ``conv_kernel (*k, 2, 1)``, ``conv_bias``, ``norm`` (an ``nnx.BatchNorm``) with
  ``spatial_norm``; records ``spatial_map`` ``(B, *spatial)`` under ``nnx.capture``. The
  parameters depend on the input rank: ``num_spatial_dims`` (default: the length of a
  sequence ``kernel_size``, else 2).
  """

  kernel_size: int | Sequence[int]
  spatial_norm: bool
  gate: Callable[[Array], Array]
  conv_impl: str
  conv_kernel: nnx.Param[Array]

  def __init__(self, in_features: int, *, kernel_size: int | Sequence[int] = 7,
               spatial_norm: bool = False, use_bias: bool | None = None,
               norm_momentum: float = 0.99, norm_epsilon: float = 1e-5,
               norm_scale_init: Initializer = ones_init,
               gate: Callable[[Array], Array] = nn.sigmoid, conv_impl: str = 'auto',
               channel_axis: int = -1, identity_init: bool = False, dtype: Dtype | None = None,
               param_dtype: Dtype = jnp.float32, precision: PrecisionLike = None,
               kernel_init: Initializer = default_kernel_init,
               bias_init: Initializer = default_bias_init,
               num_spatial_dims: int | None = None, rngs: nnx.Rngs):
    self.set_fields(in_features, locals())
    num_spatial = num_spatial_dims_for(self.kernel_size, num_spatial_dims)
    kernel_size = _validation.spatial_kernel_size(self.kernel_size, num_spatial)
    declare_nnx(self, spatial_param_shapes(kernel_size, spatial_use_bias(spatial_norm,
                                                                         use_bias)), rngs)
    if spatial_norm:
      self.norm = nnx_batch_norm(1, norm_momentum, norm_epsilon, param_dtype, rngs,
                                 norm_scale_init)

  def attention_map(self, x: Array) -> Array:
    """``(B, *spatial)`` float32 spatial map of channels-last ``x``."""
    _validation.check_features(x, batched=True)
    return self._attention_map(x)

  def _attention_map(self, x: Array) -> Array:
    """:meth:`attention_map` of features checked by the caller (``__call__``'s boundary)."""
    _validation.check_has_batch(type(self).__name__, x, self.conv_kernel.ndim - 2)
    kernel_size = _validation.spatial_kernel_size(self.kernel_size, x.ndim - 2)
    check_spatial_kernel_shape(type(self).__name__, self.conv_kernel.shape, kernel_size, 2, x)
    spatial_map = spatial_attention_map(
        nnx_values(self, _SPATIAL_PARAMS), x, norm=self.norm if self.spatial_norm else None,
        gate=self.gate, dtype=self.dtype, precision=self.precision, impl=self.conv_impl)
    sow_map(self, 'spatial_map', spatial_map)
    return spatial_map

  def refine(self, x: Array) -> Array:
    return F.apply_gate(x, self._attention_map(x)[..., None])


class NnxCBAM(NnxAttentionModule):
  """:class:`CBAM` in NNX (``cbam_jax.nnx.CBAM``).

  ``NnxCBAM(in_features=64, rngs=nnx.Rngs(0), spatial_norm=True)`` creates its parameters
  eagerly. Submodules ``channel`` (:class:`NnxChannelAttention`) and ``spatial``
  (:class:`NnxSpatialAttention`), as in linen; ``num_spatial_dims`` as the latter's.
  """

  order: str
  use_channel: bool
  use_spatial: bool

  def __init__(self, in_features: int, *, reduction_ratio: float = 16,
               hidden_features: int | None = None, hidden_rounding: str = 'floor',
               hidden_divisor: int = 1, pool_types: Sequence[str] = ('avg', 'max'),
               mlp_bias: bool = True, activation: Callable[[Array], Array] = nn.relu,
               gate: Callable[[Array], Array] = nn.sigmoid, kernel_size: int | Sequence[int] = 7,
               spatial_norm: bool = False, use_bias: bool | None = None,
               norm_momentum: float = 0.99, norm_epsilon: float = 1e-5,
               norm_scale_init: Initializer = ones_init, order: str = 'channel_first',
               use_channel: bool = True, use_spatial: bool = True, conv_impl: str = 'auto',
               channel_axis: int = -1, identity_init: bool = False, dtype: Dtype | None = None,
               param_dtype: Dtype = jnp.float32, precision: PrecisionLike = None,
               kernel_init: Initializer = default_kernel_init,
               bias_init: Initializer = default_bias_init,
               num_spatial_dims: int | None = None, rngs: nnx.Rngs):
    self.set_fields(in_features, locals())
    check_cbam_fields(order, use_channel, use_spatial)
    shared = self.field_values(SHARED_FIELDS)
    if use_channel:
      self.channel = NnxChannelAttention(
          in_features, **self.field_values(CHANNEL_FIELDS), **shared, rngs=rngs)
    if use_spatial:
      self.spatial = NnxSpatialAttention(
          in_features, num_spatial_dims=num_spatial_dims,
          **self.field_values(SPATIAL_FIELDS), **shared, rngs=rngs)

  def refine(self, x: Array) -> Array:
    return cbam_in_order(
        x, self.channel._attention_map if self.use_channel else None,
        self.spatial._attention_map if self.use_spatial else None, self.order)


# Jongchan/attention-module's CBAM: a bias-free spatial conv + BatchNorm (PyTorch momentum
# 0.01, Flax 0.99) whose scale the official ResNet zero-initialises.
_OFFICIAL_SPATIAL = dict(spatial_norm=True, norm_momentum=0.99, norm_epsilon=1e-5,
                         norm_scale_init=zeros_init)
# timm's CbamModule: round(C / 16), no MLP bias, spatial BatchNorm with PyTorch momentum 0.1.
_TIMM_SPATIAL = dict(spatial_norm=True, norm_momentum=0.9, norm_epsilon=1e-5)
_TIMM_CHANNEL = dict(reduction_ratio=16, hidden_rounding='round', mlp_bias=False)

register(Member('cbam', CBAM, NnxCBAM, maps=('channel_map', 'spatial_map'), presets={
    'official': dict(reduction_ratio=16, mlp_bias=True, **_OFFICIAL_SPATIAL),
    'timm': dict(**_TIMM_CHANNEL, **_TIMM_SPATIAL)}))
register(Member('channel', ChannelAttention, NnxChannelAttention, maps=('channel_map',),
                presets={'timm': _TIMM_CHANNEL}))
register(Member('spatial', SpatialAttention, NnxSpatialAttention, maps=('spatial_map',),
                presets={'official': _OFFICIAL_SPATIAL, 'timm': _TIMM_SPATIAL}))
