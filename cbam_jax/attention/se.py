"""Squeeze-and-Excitation (Hu et al., CVPR 2018)."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from cbam_jax import functional as F
from cbam_jax.attention import _base
from cbam_jax.attention._registry import Member, register
from cbam_jax.attention.cbam import ChannelAttention, NnxChannelAttention

# SE is CBAM's channel branch with average pooling only.
SE_POOL_TYPES = ('avg',)
SE_FIELDS = ('reduction_ratio', 'hidden_features', 'hidden_rounding', 'hidden_divisor',
             'mlp_bias', 'activation', 'gate', 'dtype', 'param_dtype', 'precision',
             'kernel_init', 'bias_init')


class SqueezeExcitation(_base.AttentionModule):
  """``x * sigmoid(MLP(AvgPool(x)))``: CBAM's channel branch with average pooling only.

  Same MLP (``C -> C // reduction_ratio -> C``, biases) and fields as
  :class:`cbam_jax.ChannelAttention` (submodule ``channel``); the map is sown as
  ``channel_map``. timm's ``SEModule`` is ``presets.fields('timm', 'se')``:
  ``SqueezeExcitation(hidden_rounding='round', hidden_divisor=8)``.
  """

  reduction_ratio: float = 16
  hidden_features: int | None = None
  hidden_rounding: str = 'floor'
  hidden_divisor: int = 1
  mlp_bias: bool = True
  activation: Callable[[jax.Array], jax.Array] = nn.relu
  gate: Callable[[jax.Array], jax.Array] = nn.sigmoid

  @nn.compact
  def refine(self, x: jax.Array, train: bool) -> jax.Array:
    del train
    channel = ChannelAttention(**{name: getattr(self, name) for name in SE_FIELDS},
                               pool_types=SE_POOL_TYPES, name='channel')
    return F.apply_gate(x, _base.channel_map_shape(channel._attention_map(x), x))


class NnxSqueezeExcitation(_base.NnxAttentionModule):
  """:class:`SqueezeExcitation` in NNX: submodule ``channel``
  (:class:`cbam_jax.nnx.ChannelAttention`, average pooling)."""

  def __init__(self, in_features: int, *, reduction_ratio: float = 16,
               hidden_features: int | None = None, hidden_rounding: str = 'floor',
               hidden_divisor: int = 1, mlp_bias: bool = True,
               activation: Callable[[jax.Array], jax.Array] = nn.relu,
               gate: Callable[[jax.Array], jax.Array] = nn.sigmoid, channel_axis: int = -1,
               identity_init: bool = False,
               dtype: _base.Dtype | None = None, param_dtype: _base.Dtype = jnp.float32,
               precision: _base.PrecisionLike = None,
               kernel_init: _base.Initializer = _base.default_kernel_init,
               bias_init: _base.Initializer = _base.default_bias_init, rngs: nnx.Rngs):
    self.set_fields(in_features, locals())
    self.channel = NnxChannelAttention(in_features, **self.field_values(SE_FIELDS),
                                       pool_types=SE_POOL_TYPES, rngs=rngs)

  def refine(self, x: jax.Array) -> jax.Array:
    return F.apply_gate(x, _base.channel_map_shape(self.channel._attention_map(x), x))


register(Member('se', SqueezeExcitation, NnxSqueezeExcitation, maps=('channel_map',), presets={
    # timm's SEModule: make_divisible(C / 16, 8).
    'timm': dict(reduction_ratio=16, hidden_rounding='round', hidden_divisor=8)}))
