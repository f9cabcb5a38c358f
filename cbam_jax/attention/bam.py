"""BAM: Bottleneck Attention Module (Park, Woo, Lee and Kweon, BMVC 2018).

The layers follow the official code (github.com/Jongchan/attention-module, ``MODELS/bam.py``):

* channel branch: ``GAP -> Linear(C, C/r) -> BN -> ReLU -> Linear(C/r, C)``;
* spatial branch: ``1x1 conv (C -> C/r) -> BN -> ReLU``, twice ``3x3 conv, dilation 4 ->
  BN -> ReLU``, then ``1x1 conv -> 1 channel`` (every conv with a bias);
* ``F' = F * (1 + sigmoid(M))``.

The paper combines the branches with a sum, ``M = Mc + Ms``; the official code with a
product, ``M = Mc * Ms``: ``combine='sum'`` (default) or ``'product'``. The paper also lists a
BatchNorm at the end of each branch that the official code does not have:
``output_norm=True`` adds them. In a ResNet BAM sits at the stage transitions
(``create_model(..., stage_attention='bam')``), not in every block.
"""

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
from cbam_jax.attention import _base
from cbam_jax.attention._registry import Member, register

Array = jax.Array
Layer = Callable[[Array], Array]

COMBINES = ('sum', 'product')


def check_bam_fields(combine: str, dilated_kernel_size: int, dilation: int) -> None:
  _validation.check_choice('combine', combine, COMBINES)
  _validation.check_kernel_size(dilated_kernel_size)
  _base.check_positive_int('dilation', dilation)


def bam_channel_logits(params: F.Params, x: Array, *, hidden_norm: Layer,
                       output_norm: Layer | None, activation: Layer, dtype=None,
                       precision=None) -> Array:
  """``MLP(GAP(x))`` with ``hidden_norm`` after the hidden layer: ``(B, C)`` float32 logits."""

  def norm_then_activation(h: Array) -> Array:
    return activation(hidden_norm(h)).astype(h.dtype)

  logits = F.shared_mlp(params, _base.spatial_pool(x, 'avg'), activation=norm_then_activation,
                        dtype=dtype, precision=precision)
  if output_norm is not None:
    logits = output_norm(logits)
  return logits


def bam_spatial_logits(x: Array, *, reduce_conv: Layer, reduce_norm: Layer,
                       dilated: Sequence[tuple[Layer, Layer]], final_conv: Layer,
                       output_norm: Layer | None, activation: Layer) -> Array:
  """Reduce, dilated ``(conv, norm)`` pairs, project to one channel: ``(B, *spatial)``
  float32 logits."""
  y = activation(reduce_norm(reduce_conv(x)))
  for conv, norm in dilated:
    y = activation(norm(conv(y)))
  y = final_conv(y).astype(jnp.float32)
  if output_norm is not None:
    y = output_norm(y)
  return y[..., 0]


def bam_refine(x: Array, channel_logits: Array, spatial_logits: Array, *, combine: str,
               gate: Layer) -> tuple[Array, Array]:
  """``x * (1 + M)`` with ``M = gate(Mc (+|*) Ms)``; returns it and ``M`` (``x``'s shape,
  float32), the map sown as ``attention_map``."""
  channel_part = _base.channel_map_shape(channel_logits, x)
  spatial_part = spatial_logits[..., None]
  if combine == 'sum':
    logits = channel_part + spatial_part
  else:
    logits = channel_part * spatial_part
  attention_map = gate(logits)
  return F.apply_gate(x, 1 + attention_map), attention_map


class _BAMBranch(nn.Module):
  """Fields shared by the two branches (set by :class:`BottleneckAttention`)."""

  hidden: int = 1
  activation: Callable[[Array], Array] = nn.relu
  output_norm: bool = False
  norm_momentum: float = 0.9
  norm_epsilon: float = 1e-5
  dtype: _base.Dtype | None = None
  param_dtype: _base.Dtype = jnp.float32
  precision: _base.PrecisionLike = None
  kernel_init: _base.Initializer = _base.default_kernel_init
  bias_init: _base.Initializer = _base.default_bias_init

  def _norm(self, train: bool, name: str) -> nn.BatchNorm:
    return _base.batch_norm(train, self.norm_momentum, self.norm_epsilon, self.param_dtype,
                            name)


class BAMChannelGate(_BAMBranch):
  """``MLP(GAP(x))`` with a BatchNorm after the hidden layer: ``(B, C)`` float32 logits."""

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    channels = x.shape[-1]
    _base.check_stored_shape(self, ('fc1_kernel',), (channels, self.hidden), x)
    params = {
        'fc1_kernel': self.param('fc1_kernel', self.kernel_init, (channels, self.hidden),
                                 self.param_dtype),
        'fc1_bias': self.param('fc1_bias', self.bias_init, (self.hidden,), self.param_dtype),
        'fc2_kernel': self.param('fc2_kernel', self.kernel_init, (self.hidden, channels),
                                 self.param_dtype),
        'fc2_bias': self.param('fc2_bias', self.bias_init, (channels,), self.param_dtype),
    }
    logits = bam_channel_logits(
        params, x, hidden_norm=self._norm(train, 'norm'),
        output_norm=self._norm(train, 'output_norm') if self.output_norm else None,
        activation=self.activation, dtype=self.dtype, precision=self.precision)
    self.sow('intermediates', 'channel_logits', logits)
    return logits


class BAMSpatialGate(_BAMBranch):
  """Reduce, dilated convs, project to one channel: ``(B, *spatial)`` float32 logits."""

  num_dilated_convs: int = 2
  dilation: int = 4
  dilated_kernel_size: int = 3

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    num_spatial = x.ndim - 2
    _base.check_stored_shape(self, ('reduce_conv', 'kernel'),
                             (1,) * num_spatial + (x.shape[-1], self.hidden), x)
    conv = functools.partial(
        nn.Conv, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
        kernel_init=self.kernel_init, bias_init=self.bias_init)
    dilated = [(conv(self.hidden, (self.dilated_kernel_size,) * num_spatial, padding='SAME',
                     kernel_dilation=(self.dilation,) * num_spatial, name=f'dilated_conv{i}'),
                self._norm(train, f'dilated_norm{i}')) for i in range(self.num_dilated_convs)]
    logits = bam_spatial_logits(
        x, reduce_conv=conv(self.hidden, (1,) * num_spatial, name='reduce_conv'),
        reduce_norm=self._norm(train, 'reduce_norm'), dilated=dilated,
        final_conv=conv(1, (1,) * num_spatial, name='final_conv'),
        output_norm=self._norm(train, 'output_norm') if self.output_norm else None,
        activation=self.activation)
    self.sow('intermediates', 'spatial_logits', logits)
    return logits


class BottleneckAttention(_base.AttentionModule):
  """``x * (1 + sigmoid(Mc(x) (+|*) Ms(x)))``; 1-D, 2-D and 3-D inputs.

  Params: ``channel: {fc1_kernel, fc1_bias, fc2_kernel, fc2_bias, norm}``, ``spatial:
  {reduce_conv, reduce_norm, dilated_conv{i}, dilated_norm{i}, final_conv}`` and
  ``batch_stats`` for every ``norm``. Sows the map ``attention_map`` ``(B, *spatial, C)``
  (``gate(Mc (+|*) Ms)``, float32 in [0, 1]) and, from the branches, the pre-gate logits
  ``channel_logits`` ``(B, C)`` and ``spatial_logits`` ``(B, *spatial)`` (not maps: the gate
  acts on their combination).

  Attributes:
    reduction_ratio: hidden width of both branches is ``max(1, C // reduction_ratio)``.
    hidden_features: explicit hidden width; overrides ``reduction_ratio``.
    hidden_rounding: ``'floor'`` (official, ``C // r``) or ``'round'``.
    num_dilated_convs: dilated convolutions in the spatial branch (2).
    dilation: their dilation (4).
    dilated_kernel_size: their kernel size (3).
    combine: ``'sum'`` (the paper) or ``'product'`` (the official code).
    output_norm: the paper's BatchNorm at the end of each branch (absent in the official
      code).
    norm_momentum: Flax BatchNorm momentum; 0.9 is PyTorch's default ``momentum=0.1``.
    norm_epsilon: BatchNorm epsilon.
    activation: hidden non-linearity (ReLU).
    gate: squashing function of the combined logits.
  """

  reduction_ratio: float = 16
  hidden_features: int | None = None
  hidden_rounding: str = 'floor'
  num_dilated_convs: int = 2
  dilation: int = 4
  dilated_kernel_size: int = 3
  combine: str = 'sum'
  output_norm: bool = False
  norm_momentum: float = 0.9
  norm_epsilon: float = 1e-5
  activation: Callable[[Array], Array] = nn.relu
  gate: Callable[[Array], Array] = nn.sigmoid

  @nn.compact
  def refine(self, x: Array, train: bool) -> Array:
    check_bam_fields(self.combine, self.dilated_kernel_size, self.dilation)
    hidden = F.hidden_size(x.shape[-1], self.reduction_ratio, self.hidden_features,
                           self.hidden_rounding)
    shared: dict[str, Any] = dict(
        hidden=hidden, activation=self.activation, output_norm=self.output_norm,
        norm_momentum=self.norm_momentum, norm_epsilon=self.norm_epsilon,
        dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
        kernel_init=self.kernel_init, bias_init=self.bias_init)
    channel_logits = BAMChannelGate(**shared, name='channel')(x, train)
    spatial_logits = BAMSpatialGate(
        num_dilated_convs=self.num_dilated_convs, dilation=self.dilation,
        dilated_kernel_size=self.dilated_kernel_size, **shared, name='spatial')(x, train)
    out, attention_map = bam_refine(x, channel_logits, spatial_logits, combine=self.combine,
                                    gate=self.gate)
    self.sow('intermediates', 'attention_map', attention_map)
    return out


_MLP_PARAMS = ('fc1_kernel', 'fc1_bias', 'fc2_kernel', 'fc2_bias')


class _NnxBAMBranch(_base.NnxModule):

  def _norm(self, features: int, fields: dict[str, Any], rngs: nnx.Rngs) -> nnx.BatchNorm:
    return _base.nnx_batch_norm(features, fields['norm_momentum'], fields['norm_epsilon'],
                                fields['param_dtype'], rngs)


class NnxBAMChannelGate(_NnxBAMBranch):
  """BAM's channel branch: params ``fc1_*``, ``fc2_*``, ``norm`` (and ``output_norm``)."""

  fc1_kernel: nnx.Param[Array]

  def __init__(self, in_features: int, hidden: int, fields: dict[str, Any], rngs: nnx.Rngs):
    self.hidden, self.activation = hidden, fields['activation']
    self.dtype, self.precision = fields['dtype'], fields['precision']
    self.kernel_init, self.bias_init = fields['kernel_init'], fields['bias_init']
    self.param_dtype = fields['param_dtype']
    _base.declare_nnx(self, {'fc1_kernel': ('kernel', (in_features, hidden)),
                             'fc1_bias': ('bias', (hidden,)),
                             'fc2_kernel': ('kernel', (hidden, in_features)),
                             'fc2_bias': ('bias', (in_features,))}, rngs)
    self.norm = self._norm(hidden, fields, rngs)
    self.has_output_norm = fields['output_norm']
    if self.has_output_norm:
      self.output_norm = self._norm(in_features, fields, rngs)

  def __call__(self, x: Array) -> Array:
    _base.check_param_shape(type(self).__name__, ('fc1_kernel',), self.fc1_kernel.shape,
                            (x.shape[-1], self.hidden), x)
    logits = bam_channel_logits(
        _base.nnx_values(self, _MLP_PARAMS), x, hidden_norm=self.norm,
        output_norm=self.output_norm if self.has_output_norm else None,
        activation=self.activation, dtype=self.dtype, precision=self.precision)
    _base.sow_map(self, 'channel_logits', logits)
    return logits


class NnxBAMSpatialGate(_NnxBAMBranch):
  """BAM's spatial branch: ``reduce_conv``, ``dilated_conv{i}``, ``final_conv`` and norms."""

  def __init__(self, in_features: int, hidden: int, num_spatial: int, fields: dict[str, Any],
               rngs: nnx.Rngs):
    self.hidden, self.activation = hidden, fields['activation']
    self.num_dilated_convs = fields['num_dilated_convs']
    conv = functools.partial(
        nnx.Conv, dtype=fields['dtype'], param_dtype=fields['param_dtype'],
        precision=fields['precision'], kernel_init=fields['kernel_init'],
        bias_init=fields['bias_init'], rngs=rngs)
    self.reduce_conv = conv(in_features, hidden, (1,) * num_spatial)
    self.reduce_norm = self._norm(hidden, fields, rngs)
    for i in range(self.num_dilated_convs):
      setattr(self, f'dilated_conv{i}', conv(
          hidden, hidden, (fields['dilated_kernel_size'],) * num_spatial, padding='SAME',
          kernel_dilation=(fields['dilation'],) * num_spatial))
      setattr(self, f'dilated_norm{i}', self._norm(hidden, fields, rngs))
    self.final_conv = conv(hidden, 1, (1,) * num_spatial)
    self.has_output_norm = fields['output_norm']
    if self.has_output_norm:
      self.output_norm = self._norm(1, fields, rngs)

  def __call__(self, x: Array) -> Array:
    _base.check_param_shape(type(self).__name__, ('reduce_conv', 'kernel'),
                            self.reduce_conv.kernel.shape,
                            (1,) * (x.ndim - 2) + (x.shape[-1], self.hidden), x)
    logits = bam_spatial_logits(
        x, reduce_conv=self.reduce_conv, reduce_norm=self.reduce_norm,
        dilated=[(getattr(self, f'dilated_conv{i}'), getattr(self, f'dilated_norm{i}'))
                 for i in range(self.num_dilated_convs)],
        final_conv=self.final_conv,
        output_norm=self.output_norm if self.has_output_norm else None,
        activation=self.activation)
    _base.sow_map(self, 'spatial_logits', logits)
    return logits


class NnxBottleneckAttention(_base.NnxAttentionModule):
  """:class:`BottleneckAttention` in NNX: submodules ``channel`` and ``spatial`` as in linen;
  ``num_spatial_dims`` (2) is the input rank its convolutions are built for."""

  combine: str
  gate: Callable[[Array], Array]

  def __init__(self, in_features: int, *, reduction_ratio: float = 16,
               hidden_features: int | None = None, hidden_rounding: str = 'floor',
               num_dilated_convs: int = 2, dilation: int = 4, dilated_kernel_size: int = 3,
               combine: str = 'sum', output_norm: bool = False, norm_momentum: float = 0.9,
               norm_epsilon: float = 1e-5, activation: Callable[[Array], Array] = nn.relu,
               gate: Callable[[Array], Array] = nn.sigmoid, channel_axis: int = -1,
               identity_init: bool = False,
               dtype: _base.Dtype | None = None, param_dtype: _base.Dtype = jnp.float32,
               precision: _base.PrecisionLike = None,
               kernel_init: _base.Initializer = _base.default_kernel_init,
               bias_init: _base.Initializer = _base.default_bias_init,
               num_spatial_dims: int = 2, rngs: nnx.Rngs):
    self.set_fields(in_features, locals())
    check_bam_fields(combine, dilated_kernel_size, dilation)
    hidden = F.hidden_size(in_features, reduction_ratio, hidden_features, hidden_rounding)
    fields = self.field_values(_base.nnx_field_names(type(self)))
    self.channel = NnxBAMChannelGate(in_features, hidden, fields, rngs)
    self.spatial = NnxBAMSpatialGate(in_features, hidden, num_spatial_dims, fields, rngs)

  def refine(self, x: Array) -> Array:
    out, attention_map = bam_refine(x, self.channel(x), self.spatial(x), combine=self.combine,
                                    gate=self.gate)
    _base.sow_map(self, 'attention_map', attention_map)
    return out


register(Member('bam', BottleneckAttention, NnxBottleneckAttention, maps=('attention_map',)))
