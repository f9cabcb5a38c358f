"""The MobileNet (v1) family: linen and NNX MobileNets (Howard et al. 2017) with attention
after every convolution of every depthwise-separable block, their sizes and registration.

The network of the CBAM paper's Table 5: a 3x3/2 stem conv (32 channels), 13
depthwise-separable blocks (3x3 depthwise conv + BN + act, 1x1 pointwise conv + BN + act;
64, 128x2, 256x2, 512x6, 1024x2 channels, stride 2 in blocks 2, 4, 6 and 12), global
average pooling and a Dense head. The width multiplier scales every width to the nearest
integer, at least 8 (:func:`scaled_width`). Sizes (:data:`SIZES`): ``mobilenetv1_100``
(timm's name; 4,231,976 parameters at 1000 classes, as timm's ``mobilenetv1_100``) and
``mobilenetv1_070`` (the CBAM paper's 0.7; timm has none: its rounding to multiples of 8
would make a different network).

Attention (``attention=``) sits after the depthwise and after the pointwise conv of every
block (``attention_sites``), on the conv's output after BatchNorm and the activation: 26
modules. That is the placement whose parameter counts are the CBAM paper's Table 5 (SENet's
SE-MobileNet has one module per block, after the pointwise conv: ``attention_sites=
('pointwise',)``); see docs/models.md. ``stage_attention=`` places a module before every
downsampling block (BAM's placement).

Module names: ``conv1``, ``bn1``; ``block{i}`` (1..13) with ``dw_conv``, ``dw_bn``,
``dw_attention``, ``pw_conv``, ``pw_bn``, ``attention``; ``stage_attention{k}``; ``fc``.

BatchNorm: PyTorch's eps 1e-5 and momentum 0.1 (Flax 0.9); activation ReLU6 (timm's and
TF-slim's; the paper writes ReLU). ``dropout_rate`` (default 0, as timm) drops the pooled
features before ``fc`` in training mode; with a rate above 0, ``apply`` needs
``rngs={'dropout': key}``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype, Initializer

from cbam_jax import _base, _validation
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

Array = jax.Array
ModuleDef = Any

__all__ = ['ATTENTION_SITES', 'BLOCKS', 'DEFAULT_ATTENTION_SITES', 'SIZES', 'MobileNetV1',
           'MobileNetV1NNX', 'scaled_width']

# (output channels, stride) of the 13 depthwise-separable blocks at width 1.0.
BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))
# The blocks' indices by stage: a stage ends before every stride-2 block (BAM's boundary).
STAGES = stages_at_downsampling([stride for _, stride in BLOCKS])
STEM_WIDTH = 32
# Where a block's attention may go; the default is the last two (the paper's counts).
ATTENTION_SITES = ('input', 'depthwise', 'pointwise')
DEFAULT_ATTENTION_SITES = ('depthwise', 'pointwise')


def scaled_width(width: int, multiplier: float) -> int:
  """A layer's width at ``multiplier``: ``width * multiplier`` to the nearest integer, at
  least 8. Of the usual rules this is the one whose counts are every Table 5 count of the
  CBAM paper at 0.7 (TF-slim's truncation, ``int()``, gives + SE 2.70M where it prints
  2.71M; docs/models.md)."""
  return max(int(width * multiplier + 0.5), 8)


def check_mobilenet_fields(width_multiplier: float, dropout_rate: float,
                           attention_sites: Sequence[str] = DEFAULT_ATTENTION_SITES) -> None:
  if not width_multiplier > 0:
    raise ValueError(f'width_multiplier must be positive, got {width_multiplier!r}.')
  if not 0 <= dropout_rate < 1:
    raise ValueError(f'dropout_rate must be in [0, 1), got {dropout_rate!r}.')
  for site in attention_sites:
    _validation.check_choice('attention_sites entry', site, ATTENTION_SITES)


def check_dropout_rng(module: nn.Module, rate: float, train: bool) -> None:
  """A one-line error instead of Flax's when training with dropout lacks its key."""
  if train and rate > 0 and not module.has_rng('dropout'):
    raise ValueError(f'{type(module).__name__} has dropout_rate={rate} and trains with '
                     "dropout: pass rngs={'dropout': key} to apply, or set dropout_rate=0.")


# torchvision's MobileNets: nn.init.normal_(linear.weight, 0, 0.01), zero bias.
head_kernel_init: Initializer = nn.initializers.normal(0.01)


@_base.check_fields_at_init
class MobileNetV1(nn.Module):
  """MobileNet (v1) with optional attention after every conv of every block.

  Attributes:
    width_multiplier: the MobileNet paper's alpha (1.0, 0.75, 0.7, 0.5, ...).
    num_classes: logits of the Dense head ``fc``.
    attention: ``None``, a registry name (``'cbam'``, ``'se'``, ... see
      :func:`cbam_jax.attention.available`) or a module factory, as for
      :class:`cbam_jax.models.ResNet`; ``'cbam'`` is the official configuration.
    attention_sites: where a block's attention goes: after its ``'depthwise'`` conv
      (``dw_attention``), its ``'pointwise'`` conv (``attention``) or both (default; the
      CBAM paper's parameter counts), or on the block's ``'input'``, before the depthwise
      conv (``in_attention``; with ``'pointwise'`` also the paper's counts, and its CBAM
      GFLOPs to the last digit: docs/models.md).
    stage_attention: the same kinds, placed after every block that a stride-2 block
      follows (blocks 1, 3, 5 and 11; BAM's placement), ``stage_attention{k}``.
    zero_init_spatial_gate, attention_fields: as for :class:`cbam_jax.models.ResNet`.
    dropout_rate: dropout on the pooled features before ``fc`` in training mode.
    dtype, param_dtype: compute and parameter dtypes; logits are float32.
    conv, norm, act: layer factories (``act`` ReLU6 as timm).
    kernel_init: conv kernel initialiser (kaiming normal, fan_out).
  """

  width_multiplier: float = 1.0
  num_classes: int = 1000
  attention: AttentionSpec = None
  attention_sites: Sequence[str] = DEFAULT_ATTENTION_SITES
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
    check_mobilenet_fields(self.width_multiplier, self.dropout_rate, self.attention_sites)
    check_images(x, 'MobileNetV1', channels_last=channels_last)
    check_dropout_rng(self, self.dropout_rate, train)
    conv, norm, attention, stage_attention = linen_factories(self, train)

    x = conv(scaled_width(STEM_WIDTH, self.width_multiplier), (3, 3), (2, 2),
             padding=same_padding(3), name='conv1')(x)
    x = self.act(norm(name='bn1')(x))
    stages = [[functools.partial(
        _SeparableBlock, features=scaled_width(BLOCKS[index][0], self.width_multiplier),
        strides=BLOCKS[index][1], conv=conv, norm=norm, act=self.act, attention=attention,
        attention_sites=tuple(self.attention_sites), name=f'block{index + 1}')
        for index in stage] for stage in STAGES]
    x = apply_stages(x, stages, stage_attention, train)
    return classifier_head(x, self.num_classes, self.param_dtype, head_kernel_init,
                           dropout_rate=self.dropout_rate, train=train)


class _SeparableBlock(nn.Module):
  """[attention +] 3x3 depthwise conv (``strides``) + BN + act [+ attention], 1x1 pointwise
  conv to ``features`` + BN + act [+ attention]."""

  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable[[Array], Array]
  attention: Callable[..., nn.Module] | None
  attention_sites: tuple[str, ...]

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    channels = x.shape[-1]
    if self.attention is not None and 'input' in self.attention_sites:
      x = self.attention(name='in_attention')(x, train=train)
    x = self.conv(channels, (3, 3), self.strides, padding=same_padding(3),
                  feature_group_count=channels, name='dw_conv')(x)
    x = self.act(self.norm(name='dw_bn')(x))
    if self.attention is not None and 'depthwise' in self.attention_sites:
      x = self.attention(name='dw_attention')(x, train=train)
    x = self.conv(self.features, (1, 1), name='pw_conv')(x)
    x = self.act(self.norm(name='pw_bn')(x))
    if self.attention is not None and 'pointwise' in self.attention_sites:
      x = self.attention(name='attention')(x, train=train)
    return x


SIZES: dict[str, dict[str, Any]] = {
    'mobilenetv1_100': dict(width_multiplier=1.0),
    'mobilenetv1_070': dict(width_multiplier=0.7),
}


# --------------------------------------------------------------------------- NNX


class _SeparableBlockNNX(nnx.Module):
  """:class:`_SeparableBlock` in NNX."""

  def __init__(self, in_features: int, features: int, *, strides: int, conv, norm,
               act: Callable[[Array], Array], attention, attention_sites: tuple[str, ...],
               rngs: nnx.Rngs):
    self.act, self.out_features = act, features
    self.dw_conv = conv(in_features, in_features, (3, 3), strides, padding=same_padding(3),
                        feature_group_count=in_features)
    self.dw_bn = norm(in_features)
    self.dw_attention = (attention(in_features, rngs=rngs)
                         if attention is not None and 'depthwise' in attention_sites else None)
    self.pw_conv = conv(in_features, features, (1, 1))
    self.pw_bn = norm(features)
    self.attention = (attention(features, rngs=rngs)
                      if attention is not None and 'pointwise' in attention_sites else None)
    self.in_attention = (attention(in_features, rngs=rngs)
                         if attention is not None and 'input' in attention_sites else None)

  def __call__(self, x: Array) -> Array:
    if self.in_attention is not None:
      x = self.in_attention(x)
    x = self.act(self.dw_bn(self.dw_conv(x)))
    if self.dw_attention is not None:
      x = self.dw_attention(x)
    x = self.act(self.pw_bn(self.pw_conv(x)))
    if self.attention is not None:
      x = self.attention(x)
    return x


@_base.check_fields_at_init
class MobileNetV1NNX(nnx.Module):
  """:class:`MobileNetV1` in NNX (``cbam_jax.nnx.MobileNetV1``): its fields, with its
  defaults (but ``conv`` and ``norm``: ``nnx.Conv`` with a materialised input on CPU and
  ``nnx.BatchNorm``), plus ``in_features`` (image channels) and ``rngs``. Starts in
  training mode (``model.eval()`` for the running statistics and no dropout)."""

  def __init__(self, *, in_features: int = 3, width_multiplier: float = 1.0,
               num_classes: int = 1000, attention: AttentionSpec = None,
               attention_sites: Sequence[str] = DEFAULT_ATTENTION_SITES,
               stage_attention: AttentionSpec = None, zero_init_spatial_gate: bool = True,
               attention_fields: Mapping[str, Any] | None = None, dropout_rate: float = 0.0,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               act: Callable[[Array], Array] = nn.relu6,
               kernel_init: Initializer = conv_kernel_init, rngs: nnx.Rngs):
    check_mobilenet_fields(width_multiplier, dropout_rate, attention_sites)
    self.act, self.num_classes = act, num_classes
    conv, norm, attention, stage_attention = nnx_factories(
        attention, stage_attention, attention_fields,
        zero_init_spatial_gate=zero_init_spatial_gate, dtype=dtype, param_dtype=param_dtype,
        kernel_init=kernel_init, rngs=rngs)

    channels = scaled_width(STEM_WIDTH, width_multiplier)
    self.conv1 = conv(in_features, channels, (3, 3), (2, 2), padding=same_padding(3))
    self.bn1 = norm(channels)
    stages = [[(f'block{index + 1}', functools.partial(
        _SeparableBlockNNX, features=scaled_width(BLOCKS[index][0], width_multiplier),
        strides=BLOCKS[index][1], conv=conv, norm=norm, act=self.act, attention=attention,
        attention_sites=tuple(attention_sites), rngs=rngs)) for index in stage]
        for stage in STAGES]
    self.block_names, channels = add_stages(self, channels, stages, stage_attention, rngs)
    self.dropout = mobilenet_dropout(dropout_rate, rngs)
    self.fc = nnx_classifier_head(channels, self.num_classes, param_dtype, head_kernel_init,
                                  rngs)

  def __call__(self, x: Array, *, channels_last: bool = False) -> Array:
    """Logits ``(B, num_classes)`` float32 of NHWC images ``x``."""
    check_images(x, 'MobileNetV1', channels_last=channels_last)
    x = self.act(self.bn1(self.conv1(x)))
    for name in self.block_names:
      x = getattr(self, name)(x)
    return nnx_logits(x, self.fc, self.dropout)


def mobilenet_dropout(rate: float, rngs: nnx.Rngs) -> nnx.Dropout | None:
  """The NNX MobileNets' dropout before ``fc``: none (and no random stream in the state) at
  rate 0."""
  return nnx.Dropout(rate, rngs=rngs) if rate > 0 else None


# --------------------------------------------------------------------------- registration


BACKBONE = register_backbone(Backbone(
    family='mobilenet_v1', linen=MobileNetV1, nnx=MobileNetV1NNX, sizes=SIZES,
    fields={
        'width_multiplier': Field(),
        'num_classes': Field(),
        'attention': Field('attention'),
        'attention_sites': Field('tuple'),
        'stage_attention': Field('attention'),
        'attention_fields': Field('mapping'),
        'zero_init_spatial_gate': Field(),
        'dropout_rate': Field(),
        'dtype': Field('dtype'),
        'param_dtype': Field('dtype'),
    },
    linen_only=('conv', 'norm'), head='fc', head_init=dense_head_init(head_kernel_init)))
