"""Coordinate attention (Hou, Zhou and Feng, CVPR 2021)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from cbam_jax import functional as F
from cbam_jax.attention import _base

Array = jax.Array


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
    _, height, width, channels = x.shape
    if self.hidden_features is not None:
      if self.hidden_features < 1:
        raise ValueError(f'hidden_features must be >= 1, got {self.hidden_features}.')
      hidden = self.hidden_features
    else:
      _base.check_positive('reduction_ratio', self.reduction_ratio)
      hidden = max(self.min_hidden, int(channels // self.reduction_ratio))
    _base.check_stored_shape(self, ('conv1', 'kernel'), (channels, hidden), x)
    dense = functools.partial(
        nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
        kernel_init=self.kernel_init, bias_init=self.bias_init)
    x32 = x.astype(jnp.float32)
    pooled = jnp.concatenate([jnp.mean(x32, axis=2), jnp.mean(x32, axis=1)], axis=1)
    y = dense(hidden, name='conv1')(pooled)  # (B, H + W, hidden)
    norm = _base.batch_norm(train, self.norm_momentum, self.norm_epsilon, self.param_dtype,
                            'bn1')
    y = self.activation(norm(y))
    y_h, y_w = y[:, :height], y[:, height:]
    height_map = self.gate(dense(channels, name='conv_h')(y_h).astype(jnp.float32))
    width_map = self.gate(dense(channels, name='conv_w')(y_w).astype(jnp.float32))
    self.sow('intermediates', 'height_map', height_map)
    self.sow('intermediates', 'width_map', width_map)
    return F.apply_gate(x, height_map[:, :, None, :] * width_map[:, None, :, :])
