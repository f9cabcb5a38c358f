"""Squeeze-and-Excitation (Hu et al., CVPR 2018)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cbam_jax.layers import ChannelAttention, Initializer, default_kernel_init


class SqueezeExcitation(nn.Module):
  """``x * sigmoid(MLP(AvgPool(x)))``: CBAM's channel branch with average pooling only.

  Same MLP (``C -> C // reduction_ratio -> C``, biases) and fields as
  :class:`cbam_jax.ChannelAttention`; the map is sown as ``channel_map``. timm's
  ``SEModule`` is ``SqueezeExcitation(hidden_rounding='round', hidden_divisor=8)``.
  """

  reduction_ratio: float = 16
  hidden_features: int | None = None
  hidden_rounding: str = 'floor'
  hidden_divisor: int = 1
  mlp_bias: bool = True
  activation: Callable[[jax.Array], jax.Array] = nn.relu
  gate: Callable[[jax.Array], jax.Array] = nn.sigmoid
  channel_axis: int = -1
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Initializer = default_kernel_init
  bias_init: Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    return ChannelAttention(
        reduction_ratio=self.reduction_ratio, hidden_features=self.hidden_features,
        hidden_rounding=self.hidden_rounding, hidden_divisor=self.hidden_divisor,
        pool_types=('avg',), mlp_bias=self.mlp_bias,
        activation=self.activation, gate=self.gate, channel_axis=self.channel_axis,
        dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
        kernel_init=self.kernel_init, bias_init=self.bias_init, name='channel')(x, train)
