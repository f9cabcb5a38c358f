"""The MobileNetV2 family: linen and NNX MobileNetV2s (Sandler et al. 2018, torchvision's
``mobilenet_v2``) with attention in every inverted residual block, their sizes and
registration.

torchvision's network: a 3x3/2 stem conv (32 channels), 17 inverted residual blocks
(:data:`SETTINGS`: expansion t, channels c, repeats n, first stride s), a 1x1 conv to 1280
channels, global average pooling, dropout and a Dense head; BatchNorm eps 1e-5 and momentum
0.1 (Flax 0.9), ReLU6, widths rounded as torchvision's ``_make_divisible`` (multiples of 8).
One size (:data:`SIZES`): ``mobilenet_v2`` (3,504,872 parameters at 1000 classes, as
torchvision's).

Attention (``attention=``) sits in every inverted residual block on the output of its
linear projection (after ``project_bn``), before the residual addition where there is one:
the ResNet placement (the residual branch after its last BatchNorm) carried over; see
docs/models.md. ``stage_attention=`` places a module before every downsampling block
(BAM's placement).

Module names: ``conv1``, ``bn1``; ``block{i}`` (1..17) with ``expand_conv``, ``expand_bn``
(absent when t = 1), ``dw_conv``, ``dw_bn``, ``project_conv``, ``project_bn``,
``attention``; ``stage_attention{k}``; ``last_conv``, ``last_bn``; ``fc``.

Dropout: torchvision trains with ``Dropout(0.2)`` before the classifier; here
``dropout_rate`` defaults to 0 so that a training step needs no dropout key (the trainer
passes none). Set ``dropout_rate=0.2`` and apply with ``rngs={'dropout': key}`` for
torchvision's recipe; evaluation is the same either way.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype, Initializer

from cbam_jax import _base
from cbam_jax.conv import MaterializedInputConv
from cbam_jax.models import Backbone, Field, register_backbone
from cbam_jax.models._attention import AttentionSpec
from cbam_jax.models._blocks import (
    add_stages,
    apply_stages,
    check_images,
    classifier_head,
    conv_kernel_init,
    dense_head_init,
    linen_factories,
    nnx_classifier_head,
    nnx_factories,
    nnx_logits,
    same_padding,
    stages_at_downsampling,
)
from cbam_jax.models.mobilenet_v1 import (
  check_dropout_rng,
  check_mobilenet_fields,
  head_kernel_init,
  mobilenet_dropout,
)

Array = jax.Array
ModuleDef = Any

__all__ = ['SETTINGS', 'SIZES', 'MobileNetV2', 'MobileNetV2NNX', 'make_divisible']

# torchvision's inverted_residual_setting: (expansion t, channels c, repeats n, stride s).
SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
    (6, 160, 3, 2), (6, 320, 1, 1))
STEM_WIDTH = 32
LAST_WIDTH = 1280


def make_divisible(value: float, divisor: int = 8) -> int:
  """torchvision's ``_make_divisible``: the nearest multiple of ``divisor`` (at least
  ``divisor``) that is not below 90% of ``value``."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * value else rounded


def block_plan(width_multiplier: float) -> list[tuple[int, int, int]]:
  """(expansion, output channels, stride) of every block, in order."""
  return [(t, make_divisible(c * width_multiplier), s if index == 0 else 1)
          for t, c, n, s in SETTINGS for index in range(n)]


def plan_stages(plan: list[tuple[int, int, int]]) -> list[list[int]]:
  """The indices of the blocks of ``plan`` by stage: a stage ends before every stride-2
  block (BAM's boundary)."""
  return stages_at_downsampling([stride for _, _, stride in plan])


@_base.check_fields_at_init
class MobileNetV2(nn.Module):
  """MobileNetV2 with optional attention in every inverted residual block.

  Attributes:
    width_multiplier: torchvision's ``width_mult`` (widths rounded to multiples of 8; the
      last conv keeps at least 1280 channels).
    num_classes: logits of the Dense head ``fc``.
    attention: ``None``, a registry name (``'cbam'``, ``'se'``, ...) or a module factory,
      as for :class:`cbam_jax.models.ResNet`; ``'cbam'`` is the official configuration.
    stage_attention: the same kinds, after every block that a stride-2 block follows
      (blocks 1, 3, 6 and 13; BAM's placement), ``stage_attention{k}``.
    zero_init_spatial_gate, attention_fields: as for :class:`cbam_jax.models.ResNet`.
    dropout_rate: dropout on the pooled features before ``fc`` in training mode
      (torchvision's 0.2 needs ``rngs={'dropout': key}``; default 0).
    dtype, param_dtype: compute and parameter dtypes; logits are float32.
    conv, norm, act: layer factories (``act`` ReLU6).
    kernel_init: conv kernel initialiser (kaiming normal, fan_out, as torchvision).
  """

  width_multiplier: float = 1.0
  num_classes: int = 1000
  attention: AttentionSpec = None
  stage_attention: AttentionSpec = None
  zero_init_spatial_gate: bool = True
  attention_fields: Mapping[str, Any] | None = None
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  conv: ModuleDef = MaterializedInputConv
  norm: ModuleDef = nn.BatchNorm
  act: Callable[[Array], Array] = nn.relu6
  kernel_init: Initializer = conv_kernel_init

  @nn.compact
  def __call__(self, x: Array, train: bool = False, *, channels_last: bool = False) -> Array:
    """Logits ``(B, num_classes)`` float32 of NHWC images ``x``; ``train`` and
    ``channels_last`` as for :class:`cbam_jax.models.ResNet`."""
    check_mobilenet_fields(self.width_multiplier, self.dropout_rate)
    check_images(x, 'MobileNetV2', channels_last=channels_last)
    check_dropout_rng(self, self.dropout_rate, train)
    conv, norm, attention, stage_attention = linen_factories(self, train)

    x = conv(make_divisible(STEM_WIDTH * self.width_multiplier), (3, 3), (2, 2),
             padding=same_padding(3), name='conv1')(x)
    x = self.act(norm(name='bn1')(x))
    plan = block_plan(self.width_multiplier)
    stages = [[functools.partial(
        _InvertedResidual, features=plan[index][1], expansion=plan[index][0],
        strides=plan[index][2], conv=conv, norm=norm, act=self.act, attention=attention,
        name=f'block{index + 1}') for index in stage] for stage in plan_stages(plan)]
    x = apply_stages(x, stages, stage_attention, train)
    x = conv(make_divisible(LAST_WIDTH * max(1.0, self.width_multiplier)), (1, 1),
             name='last_conv')(x)
    x = self.act(norm(name='last_bn')(x))
    return classifier_head(x, self.num_classes, self.param_dtype, head_kernel_init,
                           dropout_rate=self.dropout_rate, train=train)


class _InvertedResidual(nn.Module):
  """[1x1 expansion conv + BN + act], 3x3 depthwise conv (``strides``) + BN + act, 1x1
  linear projection + BN [+ attention] [+ the input, when the shape is kept]."""

  features: int
  expansion: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable[[Array], Array]
  attention: Callable[..., nn.Module] | None

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    hidden = int(round(x.shape[-1] * self.expansion))
    y = x
    if self.expansion != 1:
      y = self.act(self.norm(name='expand_bn')(
          self.conv(hidden, (1, 1), name='expand_conv')(y)))
    y = self.conv(hidden, (3, 3), self.strides, padding=same_padding(3),
                  feature_group_count=hidden, name='dw_conv')(y)
    y = self.act(self.norm(name='dw_bn')(y))
    y = self.norm(name='project_bn')(self.conv(self.features, (1, 1), name='project_conv')(y))
    if self.attention is not None:
      y = self.attention(name='attention')(y, train=train)
    return x + y if self.strides == 1 and x.shape[-1] == self.features else y


SIZES: dict[str, dict[str, Any]] = {'mobilenet_v2': dict(width_multiplier=1.0)}


# --------------------------------------------------------------------------- NNX


class _InvertedResidualNNX(nnx.Module):
  """:class:`_InvertedResidual` in NNX."""

  def __init__(self, in_features: int, features: int, *, expansion: int, strides: int,
               conv, norm, act: Callable[[Array], Array], attention, rngs: nnx.Rngs):
    self.act, self.out_features = act, features
    self.residual = strides == 1 and in_features == features
    hidden = int(round(in_features * expansion))
    if expansion != 1:
      self.expand_conv = conv(in_features, hidden, (1, 1))
      self.expand_bn = norm(hidden)
    else:
      self.expand_conv = self.expand_bn = None
    self.dw_conv = conv(hidden, hidden, (3, 3), strides, padding=same_padding(3),
                        feature_group_count=hidden)
    self.dw_bn = norm(hidden)
    self.project_conv = conv(hidden, features, (1, 1))
    self.project_bn = norm(features)
    self.attention = None if attention is None else attention(features, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    y = x
    if self.expand_conv is not None:
      y = self.act(self.expand_bn(self.expand_conv(y)))
    y = self.act(self.dw_bn(self.dw_conv(y)))
    y = self.project_bn(self.project_conv(y))
    if self.attention is not None:
      y = self.attention(y)
    return x + y if self.residual else y


@_base.check_fields_at_init
class MobileNetV2NNX(nnx.Module):
  """:class:`MobileNetV2` in NNX (``cbam_jax.nnx.MobileNetV2``): its fields, with its
  defaults (but ``conv`` and ``norm``: ``nnx.Conv`` with a materialised input on CPU and
  ``nnx.BatchNorm``), plus ``in_features`` (image channels) and ``rngs``. Starts in
  training mode (``model.eval()`` for the running statistics and no dropout)."""

  def __init__(self, *, in_features: int = 3, width_multiplier: float = 1.0,
               num_classes: int = 1000, attention: AttentionSpec = None,
               stage_attention: AttentionSpec = None, zero_init_spatial_gate: bool = True,
               attention_fields: Mapping[str, Any] | None = None, dropout_rate: float = 0.0,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               act: Callable[[Array], Array] = nn.relu6,
               kernel_init: Initializer = conv_kernel_init, rngs: nnx.Rngs):
    check_mobilenet_fields(width_multiplier, dropout_rate)
    self.act, self.num_classes = act, num_classes
    conv, norm, attention, stage_attention = nnx_factories(
        attention, stage_attention, attention_fields,
        zero_init_spatial_gate=zero_init_spatial_gate, dtype=dtype, param_dtype=param_dtype,
        kernel_init=kernel_init, rngs=rngs)

    channels = make_divisible(STEM_WIDTH * width_multiplier)
    self.conv1 = conv(in_features, channels, (3, 3), (2, 2), padding=same_padding(3))
    self.bn1 = norm(channels)
    plan = block_plan(width_multiplier)
    stages = [[(f'block{index + 1}', functools.partial(
        _InvertedResidualNNX, features=plan[index][1], expansion=plan[index][0],
        strides=plan[index][2], conv=conv, norm=norm, act=self.act, attention=attention,
        rngs=rngs)) for index in stage] for stage in plan_stages(plan)]
    self.block_names, channels = add_stages(self, channels, stages, stage_attention, rngs)
    last = make_divisible(LAST_WIDTH * max(1.0, width_multiplier))
    self.last_conv = conv(channels, last, (1, 1))
    self.last_bn = norm(last)
    self.dropout = mobilenet_dropout(dropout_rate, rngs)
    self.fc = nnx_classifier_head(last, self.num_classes, param_dtype, head_kernel_init, rngs)

  def __call__(self, x: Array, *, channels_last: bool = False) -> Array:
    """Logits ``(B, num_classes)`` float32 of NHWC images ``x``."""
    check_images(x, 'MobileNetV2', channels_last=channels_last)
    x = self.act(self.bn1(self.conv1(x)))
    for name in self.block_names:
      x = getattr(self, name)(x)
    x = self.act(self.last_bn(self.last_conv(x)))
    return nnx_logits(x, self.fc, self.dropout)


# --------------------------------------------------------------------------- registration


BACKBONE = register_backbone(Backbone(
    family='mobilenet_v2', linen=MobileNetV2, nnx=MobileNetV2NNX, sizes=SIZES,
    fields={
        'width_multiplier': Field(),
        'num_classes': Field(),
        'attention': Field('attention'),
        'stage_attention': Field('attention'),
        'attention_fields': Field('mapping'),
        'zero_init_spatial_gate': Field(),
        'dropout_rate': Field(),
        'dtype': Field('dtype'),
        'param_dtype': Field('dtype'),
    },
    linen_only=('conv', 'norm'), head='fc', head_init=dense_head_init(head_kernel_init)))
