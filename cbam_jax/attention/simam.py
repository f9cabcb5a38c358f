"""SimAM: a simple, parameter-free attention module (Yang, Zhang, Li and Xie, ICML 2021)."""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from cbam_jax import functional as F
from cbam_jax.attention import _base
from cbam_jax.attention._registry import Member, register

Array = jax.Array


def simam_map(x: Array, *, e_lambda: float, gate) -> Array:
  """``gate(1 / e*)`` of a channels-last batch ``(B, *spatial, C)``: same shape, float32."""
  _base.check_positive('e_lambda', e_lambda)
  spatial_axes = tuple(range(1, x.ndim - 1))
  positions = math.prod(x.shape[1:-1])
  if positions < 2:
    raise ValueError(
        f'SimAM needs at least 2 spatial positions to estimate each channel\'s variance '
        f'(n = positions - 1 >= 1); got input of shape {tuple(x.shape)}. Use it before '
        'the feature map shrinks to 1x1, or pick another attention.')
  x32 = x.astype(jnp.float32)
  squared_deviation = jnp.square(x32 - jnp.mean(x32, axis=spatial_axes, keepdims=True))
  variance = jnp.sum(squared_deviation, axis=spatial_axes, keepdims=True) / (positions - 1)
  inverse_energy = squared_deviation / (4 * (variance + e_lambda)) + 0.5
  return gate(inverse_energy)


class SimAM(_base.AttentionModule):
  """``x * sigmoid(1 / e*)``, the inverse minimal energy of every neuron; no parameters.

  Per example and channel, with ``n = prod(spatial) - 1``::

    d = (x - mean(x))**2
    inv_energy = d / (4 * (sum(d) / n + e_lambda)) + 0.5

  as in the official code (github.com/ZjjConan/SimAM), computed in float32. Any number of
  spatial dimensions; at least two positions (``n >= 1``). The ``dtype``, ``param_dtype``,
  ``precision`` and init fields are accepted, like every member's, and unused. Sows
  ``attention_map`` ``(B, *spatial, C)``.

  Attributes:
    e_lambda: the energy's regulariser (1e-4 in the paper).
    gate: squashing function (sigmoid).
  """

  e_lambda: float = 1e-4
  gate: Callable[[Array], Array] = nn.sigmoid

  def refine(self, x: Array, train: bool) -> Array:
    del train
    attention_map = simam_map(x, e_lambda=self.e_lambda, gate=self.gate)
    self.sow('intermediates', 'attention_map', attention_map)
    return F.apply_gate(x, attention_map)


class NnxSimAM(_base.NnxAttentionModule):
  """:class:`SimAM` in NNX: no parameters; records ``attention_map``."""

  e_lambda: float
  gate: Callable[[Array], Array]

  def __init__(self, in_features: int, *, e_lambda: float = 1e-4,
               gate: Callable[[Array], Array] = nn.sigmoid, channel_axis: int = -1,
               identity_init: bool = False,
               dtype: _base.Dtype | None = None, param_dtype: _base.Dtype = jnp.float32,
               precision: _base.PrecisionLike = None,
               kernel_init: _base.Initializer = _base.default_kernel_init,
               bias_init: _base.Initializer = _base.default_bias_init,
               rngs: nnx.Rngs | None = None):
    del rngs  # Parameter-free; accepted so every member is built alike.
    self.set_fields(in_features, locals())

  def refine(self, x: Array) -> Array:
    attention_map = simam_map(x, e_lambda=self.e_lambda, gate=self.gate)
    _base.sow_map(self, 'attention_map', attention_map)
    return F.apply_gate(x, attention_map)


register(Member('simam', SimAM, NnxSimAM, maps=('attention_map',)))
