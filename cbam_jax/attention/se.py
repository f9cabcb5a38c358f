"""Squeeze-and-Excitation (Hu et al., CVPR 2018)."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax

from cbam_jax import functional as F
from cbam_jax.attention import _base
from cbam_jax.layers import ChannelAttention

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
    return F.apply_gate(x, _base.channel_map_shape(channel.attention_map(x), x))
