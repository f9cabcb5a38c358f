"""ECA-Net: Efficient Channel Attention (Wang et al., CVPR 2020)."""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from cbam_jax import _validation
from cbam_jax import functional as F
from cbam_jax.attention import _base
from cbam_jax.attention._registry import Member, register

Array = jax.Array


def eca_kernel_size(channels: int, gamma: float = 2, beta: float = 1) -> int:
  """The paper's adaptive size: ``t = int(|(log2(C) + beta) / gamma|)``, made odd upwards.

  Exactly the official code's ``t if t % 2 else t + 1`` (C=64 -> 3, 256 -> 5, 512 -> 5).
  """
  _base.check_positive('gamma', gamma)
  t = int(abs((math.log2(channels) + beta) / gamma))
  return t if t % 2 else t + 1


def eca_kernel_size_for(channels: int, kernel_size: int | None, gamma: float,
                        beta: float) -> int:
  """The checked size of the channel convolution: ``kernel_size``, or adapted to ``C``."""
  if kernel_size is None:
    size = eca_kernel_size(channels, gamma, beta)
  else:
    size = kernel_size
    if isinstance(size, bool) or not isinstance(size, int):
      raise ValueError(f'ECA kernel_size must be one odd int (or None to adapt it to the '
                       f'channel count), got {size!r}.')
  _validation.check_kernel_size(size)
  return size


def eca_attention_map(kernel: Array, x: Array, *, gate: Callable[[Array], Array],
                      dtype=None, precision=None) -> Array:
  """``gate(conv1d_k(GAP(x)))`` across channels of a channels-last batch: ``(B, C)`` float32.

  ``kernel``: ``(k, 1, 1)``.
  """
  pooled = _base.spatial_pool(x, 'avg')  # (B, C)
  dtype = dtype or jnp.result_type(pooled, kernel)
  # Channels become the convolution's length axis: (B, C, 1) with one feature.
  logits = lax.conv_general_dilated(
      pooled.astype(dtype)[..., None], kernel.astype(dtype), window_strides=(1,),
      padding='SAME', dimension_numbers=('NWC', 'WIO', 'NWC'), precision=precision,
      preferred_element_type=jnp.float32)[..., 0]
  return gate(logits.astype(jnp.float32))


class EfficientChannelAttention(_base.AttentionModule):
  """``x * sigmoid(conv1d_k(GAP(x)))``: a bias-free 1-D convolution ACROSS channels.

  No dimensionality reduction: each channel's gate sees its ``k`` neighbouring channels.
  ``k`` adapts to ``C`` (:func:`eca_kernel_size`) unless ``kernel_size`` is given. Any
  number of spatial dimensions. Parameter: ``conv_kernel (k, 1, 1)`` (PyTorch's
  ``conv.weight (1, 1, k)`` transposed). Sows ``channel_map`` ``(B, C)``.

  Attributes:
    kernel_size: odd size of the channel convolution; ``None`` adapts it to ``C``.
    gamma, beta: the adaptive mapping's constants (2 and 1 in the paper).
    gate: the map's squashing function.
  """

  kernel_size: int | None = None
  gamma: float = 2
  beta: float = 1
  gate: Callable[[Array], Array] = nn.sigmoid

  def attention_map(self, x: Array) -> Array:
    """``(B, C)`` float32 channel map of channels-last ``x``; sown as ``channel_map``."""
    _validation.check_features(x, batched=True)
    return self._attention_map(x)

  @nn.compact
  def _attention_map(self, x: Array) -> Array:
    """:meth:`attention_map` of features checked by the caller (``__call__``'s boundary)."""
    if self.has_variable('params', 'conv_kernel'):
      size: int = self.get_variable('params', 'conv_kernel').shape[0]
      _validation.check_kernel_size(size)
    else:
      size = eca_kernel_size_for(x.shape[-1], self.kernel_size, self.gamma, self.beta)
    kernel = self.param('conv_kernel', self.kernel_init, (size, 1, 1), self.param_dtype)
    channel_map = eca_attention_map(kernel, x, gate=self.gate, dtype=self.dtype,
                                    precision=self.precision)
    self.sow('intermediates', 'channel_map', channel_map)
    return channel_map

  def refine(self, x: Array, train: bool) -> Array:
    del train  # No BatchNorm.
    return F.apply_gate(x, _base.channel_map_shape(self._attention_map(x), x))


class NnxEfficientChannelAttention(_base.NnxAttentionModule):
  """:class:`EfficientChannelAttention` in NNX: param ``conv_kernel (k, 1, 1)``; records
  ``channel_map``."""

  gate: Callable[[Array], Array]

  def __init__(self, in_features: int, *, kernel_size: int | None = None, gamma: float = 2,
               beta: float = 1, gate: Callable[[Array], Array] = nn.sigmoid,
               channel_axis: int = -1,
               identity_init: bool = False,
               dtype: _base.Dtype | None = None, param_dtype: _base.Dtype = jnp.float32,
               precision: _base.PrecisionLike = None,
               kernel_init: _base.Initializer = _base.default_kernel_init,
               bias_init: _base.Initializer = _base.default_bias_init, rngs: nnx.Rngs):
    self.set_fields(in_features, locals())
    size = eca_kernel_size_for(in_features, kernel_size, gamma, beta)
    self.conv_kernel = nnx.Param(kernel_init(rngs.params(), (size, 1, 1), param_dtype))

  def attention_map(self, x: Array) -> Array:
    """``(B, C)`` float32 channel map of channels-last ``x``."""
    _validation.check_features(x, batched=True)
    return self._attention_map(x)

  def _attention_map(self, x: Array) -> Array:
    """:meth:`attention_map` of features checked by the caller (``__call__``'s boundary)."""
    channel_map = eca_attention_map(self.conv_kernel[...], x, gate=self.gate,
                                    dtype=self.dtype, precision=self.precision)
    _base.sow_map(self, 'channel_map', channel_map)
    return channel_map

  def refine(self, x: Array) -> Array:
    return F.apply_gate(x, _base.channel_map_shape(self._attention_map(x), x))


register(Member('eca', EfficientChannelAttention, NnxEfficientChannelAttention,
                maps=('channel_map',)))
