"""Triplet attention (Misra, Nalamada, Arasanipalai and Hou, WACV 2021)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from cbam_jax import _validation
from cbam_jax import functional as F
from cbam_jax._fast.spatial_conv import resolve_impl
from cbam_jax.attention import _base
from cbam_jax.attention._registry import Member, register

Array = jax.Array


def zpool_gate_map(kernel: Array, x: Array, *, norm: Callable[[Array], Array],
                   gate: Callable[[Array], Array], dtype: _base.Dtype | None = None,
                   precision: _base.PrecisionLike = None, impl: str = 'auto') -> Array:
  """``gate(norm(conv_k([max; mean](x))))``: ``(B, H', W', C')`` -> ``(B, H', W')`` float32."""
  # functional.spatial_logits pools [mean; max]: swap the kernel's inputs to match.
  # x was checked at the module boundary: the unchecked core, impl resolved once.
  logits = jax.vmap(functools.partial(
      F._spatial_logits, dtype=dtype, precision=precision, impl=resolve_impl(impl)),
      in_axes=(None, 0))({'conv_kernel': kernel[..., ::-1, :]}, x)
  return gate(norm(logits[..., None])[..., 0])


def triplet_attention(x: Array, cw, hc, hw) -> tuple[Array, dict[str, Array]]:
  """The mean of the rotated gates of a channels-last ``(B, H, W, C)`` batch.

  ``cw``, ``hc``, ``hw``: ``(B, H', W', C')`` -> ``(B, H', W')`` maps (``hw`` may be
  ``None``). Returns the refined features and the maps by sow name.
  """
  maps = {'channel_width_map': cw(jnp.transpose(x, (0, 3, 2, 1))),
          'height_channel_map': hc(jnp.transpose(x, (0, 1, 3, 2)))}
  gates = [jnp.swapaxes(maps['channel_width_map'], 1, 2)[:, None, :, :],
           maps['height_channel_map'][:, :, None, :]]
  if hw is not None:
    maps['spatial_map'] = hw(x)
    gates.append(maps['spatial_map'][..., None])
  return F.apply_gate(x, sum(gates) / len(gates)), maps


class ZPoolGate(nn.Module):
  """``gate(BN(conv_k(ZPool(x))))``: ``(B, H', W', C')`` -> ``(B, H', W')`` float32 map.

  Z-pool is ``[max; mean]`` across the last axis, in that order (the official code's);
  CBAM's spatial branch is the same gate with ``[mean; max]`` pooling. The conv has no bias
  and is followed by BatchNorm. Param ``conv_kernel (k, k, 2, 1)``: input channel 0 sees
  the max and 1 the mean, as PyTorch's ``conv.weight (1, 2, k, k)`` transposed.
  """

  kernel_size: int | Sequence[int] = 7
  norm_momentum: float = 0.99
  norm_epsilon: float = 1e-5
  gate: Callable[[Array], Array] = nn.sigmoid
  conv_impl: str = 'auto'
  dtype: _base.Dtype | None = None
  param_dtype: _base.Dtype = jnp.float32
  precision: _base.PrecisionLike = None
  kernel_init: _base.Initializer = _base.default_kernel_init

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    kernel_size = _validation.spatial_kernel_size(self.kernel_size, 2)
    kernel = self.param('conv_kernel', self.kernel_init, (*kernel_size, 2, 1),
                        self.param_dtype)
    return zpool_gate_map(
        kernel, x, norm=_base.batch_norm(train, self.norm_momentum, self.norm_epsilon,
                                         self.param_dtype, 'norm'),
        gate=self.gate, dtype=self.dtype, precision=self.precision, impl=self.conv_impl)


class TripletAttention(_base.AttentionModule):
  """The mean of three rotated Z-pool gates: ``x * (g_cw + g_hc + g_hw) / 3``.

  * ``cw``: pools over H; its 7x7 conv runs over the (C, W) plane -> gate ``(B, C, W)``;
  * ``hc``: pools over W; conv over the (H, C) plane -> gate ``(B, H, C)``;
  * ``hw``: pools over C; conv over (H, W) -> gate ``(B, H, W)`` (CBAM's spatial gate with
    ``[max; mean]`` pooling).

  The branch names and plane orientations are the official code's
  (github.com/landskape-ai/triplet-attention), so its weights load directly. 2-D input only.
  Sows ``channel_width_map`` ``(B, C, W)``, ``height_channel_map`` ``(B, H, C)`` and
  ``spatial_map`` ``(B, H, W)``.

  Attributes:
    kernel_size: conv size of every branch (7).
    use_spatial: keep the ``hw`` branch (the official ``no_spatial=False``).
    norm_momentum: Flax BatchNorm momentum; 0.99 is the official ``momentum=0.01``.
    norm_epsilon: BatchNorm epsilon.
    conv_impl: ``'auto'``, ``'xla'`` or ``'shift'`` (see ``functional.spatial_conv``).
    gate: squashing function of every branch.
  """

  kernel_size: int | Sequence[int] = 7
  use_spatial: bool = True
  norm_momentum: float = 0.99
  norm_epsilon: float = 1e-5
  conv_impl: str = 'auto'
  gate: Callable[[Array], Array] = nn.sigmoid

  supported_spatial_dims = (2,)

  @nn.compact
  def refine(self, x: Array, train: bool) -> Array:
    branch = functools.partial(
        ZPoolGate, kernel_size=self.kernel_size, norm_momentum=self.norm_momentum,
        norm_epsilon=self.norm_epsilon, gate=self.gate, conv_impl=self.conv_impl,
        dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
        kernel_init=self.kernel_init)
    out, maps = triplet_attention(
        x, functools.partial(branch(name='cw'), train=train),
        functools.partial(branch(name='hc'), train=train),
        functools.partial(branch(name='hw'), train=train) if self.use_spatial else None)
    for name, value in maps.items():
      self.sow('intermediates', name, value)
    return out


class NnxZPoolGate(_base.NnxModule):
  """Triplet attention's branch in NNX: param ``conv_kernel (k, k, 2, 1)`` and ``norm``."""

  def __init__(self, fields: dict[str, Any], rngs: nnx.Rngs):
    self.kernel_size = _validation.spatial_kernel_size(fields['kernel_size'], 2)
    self.gate, self.dtype = fields['gate'], fields['dtype']
    self.precision, self.conv_impl = fields['precision'], fields['conv_impl']
    self.conv_kernel = nnx.Param(fields['kernel_init'](
        rngs.params(), (*self.kernel_size, 2, 1), fields['param_dtype']))
    self.norm = _base.nnx_batch_norm(1, fields['norm_momentum'], fields['norm_epsilon'],
                                     fields['param_dtype'], rngs)

  def __call__(self, x: Array) -> Array:
    return zpool_gate_map(self.conv_kernel[...], x, norm=self.norm, gate=self.gate,
                          dtype=self.dtype, precision=self.precision, impl=self.conv_impl)


class NnxTripletAttention(_base.NnxAttentionModule):
  """:class:`TripletAttention` in NNX: branches ``cw``, ``hc`` (and ``hw``); 2-D only."""

  supported_spatial_dims = (2,)

  use_spatial: bool

  def __init__(self, in_features: int, *, kernel_size: int | Sequence[int] = 7,
               use_spatial: bool = True, norm_momentum: float = 0.99,
               norm_epsilon: float = 1e-5, conv_impl: str = 'auto',
               gate: Callable[[Array], Array] = nn.sigmoid, channel_axis: int = -1,
               identity_init: bool = False,
               dtype: _base.Dtype | None = None, param_dtype: _base.Dtype = jnp.float32,
               precision: _base.PrecisionLike = None,
               kernel_init: _base.Initializer = _base.default_kernel_init,
               bias_init: _base.Initializer = _base.default_bias_init, rngs: nnx.Rngs):
    self.set_fields(in_features, locals())
    fields = self.field_values(_base.nnx_field_names(type(self)))
    self.cw = NnxZPoolGate(fields, rngs)
    self.hc = NnxZPoolGate(fields, rngs)
    if use_spatial:
      self.hw = NnxZPoolGate(fields, rngs)

  def refine(self, x: Array) -> Array:
    out, maps = triplet_attention(x, self.cw, self.hc, self.hw if self.use_spatial else None)
    for name, value in maps.items():
      _base.sow_map(self, name, value)
    return out


register(Member('triplet', TripletAttention, NnxTripletAttention,
                maps=('channel_width_map', 'height_channel_map', 'spatial_map')))
