"""Coordinate attention (Hou, Zhou and Feng, CVPR 2021)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from cbam_jax import functional as F
from cbam_jax.attention import _base
from cbam_jax.attention._registry import Member, register

Array = jax.Array


Layer = Callable[[Array], Array]


def coord_hidden_size(channels: int, reduction_ratio: float, min_hidden: int,
                      hidden_features: int | None) -> int:
  """``max(min_hidden, C // reduction_ratio)``, or ``hidden_features``."""
  if hidden_features is not None:
    if hidden_features < 1:
      raise ValueError(f'hidden_features must be >= 1, got {hidden_features}.')
    return hidden_features
  _base.check_positive('reduction_ratio', reduction_ratio)
  return max(min_hidden, int(channels // reduction_ratio))


def coord_attention(x: Array, *, conv1: Layer, bn1: Layer, conv_h: Layer, conv_w: Layer,
                    activation: Layer, gate: Layer) -> tuple[Array, Array, Array]:
  """Coordinate attention of a channels-last ``(B, H, W, C)`` batch from its four layers.

  Returns:
    The refined features, ``height_map`` ``(B, H, C)`` and ``width_map`` ``(B, W, C)``.
  """
  height = x.shape[1]
  x32 = x.astype(jnp.float32)
  pooled = jnp.concatenate([jnp.mean(x32, axis=2), jnp.mean(x32, axis=1)], axis=1)
  y = activation(bn1(conv1(pooled)))  # (B, H + W, hidden)
  y_h, y_w = y[:, :height], y[:, height:]
  height_map = gate(conv_h(y_h).astype(jnp.float32))
  width_map = gate(conv_w(y_w).astype(jnp.float32))
  out = F.apply_gate(x, height_map[:, :, None, :] * width_map[:, None, :, :])
  return out, height_map, width_map


class CoordinateAttention(_base.AttentionModule):
  """``x * a_h * a_w`` with direction-aware gates from pooling along H and along W.

  As the official code (github.com/houqb/CoordAttention): ``z_h = mean_W(x)`` ``(B, H, C)``
  and ``z_w = mean_H(x)`` ``(B, W, C)`` are concatenated along the position axis, passed
  through ONE ``1x1 conv (C -> mip, bias) -> BN -> h_swish`` (the BatchNorm's statistics
  cover both directions together), split, and projected back by ``conv_h`` / ``conv_w``
  (``mip -> C``, bias) and a sigmoid. ``mip = max(min_hidden, C // reduction_ratio)``.
  2-D input only: the gates are built per image axis.

  Params ``conv1``, ``bn1``, ``conv_h``, ``conv_w`` (PyTorch's names; 1x1 convs are Dense
  layers, kernel ``(in, out)``). Sows ``height_map`` ``(B, H, C)`` and ``width_map``
  ``(B, W, C)``.

  Attributes:
    reduction_ratio: 32 in the paper.
    min_hidden: lower bound of the hidden width (8).
    hidden_features: explicit hidden width; overrides both.
    norm_momentum: Flax BatchNorm momentum; 0.9 is PyTorch's default ``momentum=0.1``.
    norm_epsilon: BatchNorm epsilon.
    activation: hidden non-linearity (hard swish, ``x * relu6(x + 3) / 6``).
    gate: squashing function of both gates.
  """

  reduction_ratio: float = 32
  min_hidden: int = 8
  hidden_features: int | None = None
  norm_momentum: float = 0.9
  norm_epsilon: float = 1e-5
  activation: Callable[[Array], Array] = nn.hard_swish
  gate: Callable[[Array], Array] = nn.sigmoid

  supported_spatial_dims = (2,)

  @nn.compact
  def refine(self, x: Array, train: bool) -> Array:
    channels = x.shape[-1]
    hidden = coord_hidden_size(channels, self.reduction_ratio, self.min_hidden,
                               self.hidden_features)
    _base.check_stored_shape(self, ('conv1', 'kernel'), (channels, hidden), x)
    dense = functools.partial(
        nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
        kernel_init=self.kernel_init, bias_init=self.bias_init)
    out, height_map, width_map = coord_attention(
        x, conv1=dense(hidden, name='conv1'),
        bn1=_base.batch_norm(train, self.norm_momentum, self.norm_epsilon, self.param_dtype,
                             'bn1'),
        conv_h=dense(channels, name='conv_h'), conv_w=dense(channels, name='conv_w'),
        activation=self.activation, gate=self.gate)
    self.sow('intermediates', 'height_map', height_map)
    self.sow('intermediates', 'width_map', width_map)
    return out


class NnxCoordinateAttention(_base.NnxAttentionModule):
  """:class:`CoordinateAttention` in NNX: ``conv1``, ``bn1``, ``conv_h``, ``conv_w``; 2-D
  only."""

  supported_spatial_dims = (2,)

  reduction_ratio: float
  min_hidden: int
  hidden_features: int | None
  activation: Callable[[Array], Array]
  gate: Callable[[Array], Array]

  def __init__(self, in_features: int, *, reduction_ratio: float = 32, min_hidden: int = 8,
               hidden_features: int | None = None, norm_momentum: float = 0.9,
               norm_epsilon: float = 1e-5, activation: Callable[[Array], Array] = nn.hard_swish,
               gate: Callable[[Array], Array] = nn.sigmoid, channel_axis: int = -1,
               identity_init: bool = False,
               dtype: _base.Dtype | None = None, param_dtype: _base.Dtype = jnp.float32,
               precision: _base.PrecisionLike = None,
               kernel_init: _base.Initializer = _base.default_kernel_init,
               bias_init: _base.Initializer = _base.default_bias_init, rngs: nnx.Rngs):
    self.set_fields(in_features, locals())
    hidden = coord_hidden_size(in_features, reduction_ratio, min_hidden, hidden_features)
    dense = functools.partial(
        nnx.Linear, dtype=dtype, param_dtype=param_dtype, precision=precision,
        kernel_init=kernel_init, bias_init=bias_init, rngs=rngs)
    self.conv1 = dense(in_features, hidden)
    self.bn1 = _base.nnx_batch_norm(hidden, norm_momentum, norm_epsilon, param_dtype, rngs)
    self.conv_h = dense(hidden, in_features)
    self.conv_w = dense(hidden, in_features)

  def refine(self, x: Array) -> Array:
    channels = x.shape[-1]
    _base.check_param_shape(type(self).__name__, ('conv1', 'kernel'), self.conv1.kernel.shape,
                            (channels, coord_hidden_size(channels, self.reduction_ratio,
                                                         self.min_hidden,
                                                         self.hidden_features)), x)
    out, height_map, width_map = coord_attention(
        x, conv1=self.conv1, bn1=self.bn1, conv_h=self.conv_h, conv_w=self.conv_w,
        activation=self.activation, gate=self.gate)
    _base.sow_map(self, 'height_map', height_map)
    _base.sow_map(self, 'width_map', width_map)
    return out


register(Member('coord', CoordinateAttention, NnxCoordinateAttention,
                maps=('height_map', 'width_map')))
