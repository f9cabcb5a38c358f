"""The CIFAR Wide ResNet family (WRN-d-k, Zagoruyko and Komodakis 2016): linen and NNX
networks with attention in every residual block, their sizes and their registration.

A WRN-d-k is a 3x3 conv of 16 channels, three stages of ``(d - 4) / 6`` pre-activation
basic blocks (BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3) of ``16k``, ``32k`` and ``64k``
channels (stride 2 into stages 2 and 3), then BN-ReLU, global average pooling and a Dense
head, as in the authors' code (szagoruyko/wide-residual-networks). Where a block changes
the shape, its shortcut is a 1x1 conv (with the stride, no BatchNorm) of the block's
pre-activated input; otherwise the identity of the raw input. Convs have no bias.

Sizes (:data:`SIZES`, the names osmr/imgclsmob gives them): ``wrn16_4``, ``wrn16_8``,
``wrn28_10``, ``wrn40_4``; 10 classes by default. ``depth`` and ``widen_factor`` are
fields, so any WRN-d-k is ``create_model('wrn28_10', depth=d, widen_factor=k)``.

Attention (``attention=``) sits in EVERY block on the residual branch's output (after the
second conv; a pre-activation block has no BatchNorm there), before the shortcut addition.
``stage_attention=`` places a module after every stage but the last.

Module names: ``conv1``, ``layer{stage}_{index}`` (1-based stages) with ``bn1, conv1, bn2,
conv2, downsample_conv, attention``; ``stage_attention{stage}``; ``final_bn``; ``fc``.

Example::

  model = cbam_jax.models.create_model('wrn16_8', attention='cbam')
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  logits, updates = model.apply(variables, images, train=True, mutable=['batch_stats'],
                                rngs={'dropout': key})   # rngs only with dropout_rate > 0
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
    head_kernel_init,
    linen_factories,
    nnx_classifier_head,
    nnx_factories,
    nnx_logits,
    same_padding,
)

Array = jax.Array
ModuleDef = Any

# The stem's channels and the stages' widths at widen_factor 1 (the paper's 16, 32, 64).
STEM_FEATURES = 16
STAGE_FEATURES = (16, 32, 64)

__all__ = ['SIZES', 'WideBasicBlock', 'WideBasicBlockNNX', 'WideResNet', 'WideResNetNNX',
           'blocks_per_stage']


def blocks_per_stage(depth: int) -> int:
  """``(depth - 4) / 6``: the blocks of each of the three stages of a WRN of ``depth``."""
  return (depth - 4) // 6


def check_wide_resnet_fields(depth: Any, widen_factor: Any, dropout_rate: Any) -> None:
  if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
    raise ValueError(f'depth must be 6n + 4 with n >= 1 blocks per stage (10, 16, 22, 28, '
                     f'40, ...), got {depth!r}.')
  if isinstance(widen_factor, bool) or not isinstance(widen_factor, int) or widen_factor < 1:
    raise ValueError(f'widen_factor must be an integer >= 1 (the k of WRN-d-k), got '
                     f'{widen_factor!r}.')
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f'dropout_rate must be in [0, 1), got {dropout_rate!r}.')


class WideBasicBlock(nn.Module):
  """A pre-activation basic block: ``features`` output channels, ``strides`` on the first
  conv, attention on the residual branch before the addition (no final ReLU).

  Input ``(B, H, W, C_in)`` -> ``(B, ceil(H / strides), ceil(W / strides), features)``.
  """

  features: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable[[Array], Array]
  strides: int = 1
  dropout_rate: float = 0.0
  attention: Callable[..., nn.Module] | None = None

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    activated = self.act(self.norm(name='bn1')(x))
    y = self.conv(self.features, (3, 3), self.strides, padding=same_padding(3),
                  name='conv1')(activated)
    y = self.act(self.norm(name='bn2')(y))
    if self.dropout_rate > 0:
      y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = self.conv(self.features, (3, 3), padding=same_padding(3), name='conv2')(y)
    if self.attention is not None:
      y = self.attention(name='attention')(y, train=train)
    if self.strides == 1 and x.shape[-1] == self.features:
      return x + y
    # The projection sees the pre-activated input, as in the authors' code.
    return self.conv(self.features, (1, 1), self.strides, name='downsample_conv')(activated) + y


@_base.check_fields_at_init
class WideResNet(nn.Module):
  """A CIFAR Wide ResNet WRN-``depth``-``widen_factor`` with optional attention in every
  block (and after stages).

  Attributes:
    depth: ``6n + 4`` for ``n`` blocks per stage (16, 22, 28, 40, ...).
    widen_factor: ``k``: the stages have ``16k``, ``32k`` and ``64k`` channels.
    num_classes: logits of the Dense head ``fc``.
    dropout_rate: dropout between a block's two convs (the WRN paper's 0.3 in some runs;
      0 by default, its main setting). With a rate above 0, training applies need
      ``rngs={'dropout': key}``.
    attention, stage_attention, zero_init_spatial_gate, attention_fields: as in
      :class:`cbam_jax.models.ResNet` (``'cbam'`` is the official configuration).
    dtype: compute dtype; logits are always float32.
    param_dtype: parameter dtype.
    conv, norm, act: layer factories, as in :class:`cbam_jax.models.ResNet`.
    kernel_init: conv kernel initialiser (kaiming normal, fan_out).
  """

  depth: int = 28
  widen_factor: int = 10
  num_classes: int = 10
  dropout_rate: float = 0.0
  attention: AttentionSpec = None
  stage_attention: AttentionSpec = None
  zero_init_spatial_gate: bool = True
  attention_fields: Mapping[str, Any] | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  conv: ModuleDef = MaterializedInputConv
  norm: ModuleDef = nn.BatchNorm
  act: Callable[[Array], Array] = nn.relu
  kernel_init: Initializer = conv_kernel_init

  @nn.compact
  def __call__(self, x: Array, train: bool = False, *, channels_last: bool = False) -> Array:
    """Logits ``(B, num_classes)`` float32 of NHWC images ``x`` ``(B, H, W, C)``; ``train``
    and ``channels_last`` as in :class:`cbam_jax.models.ResNet`."""
    check_wide_resnet_fields(self.depth, self.widen_factor, self.dropout_rate)
    check_images(x, 'WideResNet', channels_last=channels_last)
    conv, norm, attention, stage_attention = linen_factories(self, train)

    x = conv(STEM_FEATURES, (3, 3), padding=same_padding(3), name='conv1')(x)
    stages = [[functools.partial(
        WideBasicBlock, features=features * self.widen_factor,
        strides=2 if stage > 0 and index == 0 else 1, conv=conv, norm=norm, act=self.act,
        dropout_rate=self.dropout_rate, attention=attention, name=f'layer{stage + 1}_{index}')
        for index in range(blocks_per_stage(self.depth))]
        for stage, features in enumerate(STAGE_FEATURES)]
    x = apply_stages(x, stages, stage_attention, train)
    x = self.act(norm(name='final_bn')(x))
    return classifier_head(x, self.num_classes, self.param_dtype, head_kernel_init)


# Model name -> the WideResNet fields that make it (WRN-d-k).
SIZES: dict[str, dict[str, Any]] = {
    'wrn16_4': dict(depth=16, widen_factor=4),
    'wrn16_8': dict(depth=16, widen_factor=8),
    'wrn28_10': dict(depth=28, widen_factor=10),
    'wrn40_4': dict(depth=40, widen_factor=4),
}


# --------------------------------------------------------------------------- NNX


class WideBasicBlockNNX(nnx.Module):
  """A pre-activation basic block in NNX (as :class:`WideBasicBlock`)."""

  def __init__(self, in_features: int, features: int, *, strides: int, conv, norm,
               act: Callable[[Array], Array], dropout_rate: float, attention,
               rngs: nnx.Rngs):
    self.act, self.out_features = act, features
    pad = same_padding(3)
    self.bn1 = norm(in_features)
    self.conv1 = conv(in_features, features, (3, 3), strides, padding=pad)
    self.bn2 = norm(features)
    # No RNG stream of its own: the model's state stays its linen twin's variables, and a
    # training call passes ``rngs``, as a linen apply passes ``rngs={'dropout': key}``.
    self.dropout = nnx.Dropout(dropout_rate) if dropout_rate > 0 else None
    self.conv2 = conv(features, features, (3, 3), padding=pad)
    self.attention = None if attention is None else attention(features, rngs=rngs)
    self.identity = strides == 1 and in_features == features
    if not self.identity:
      self.downsample_conv = conv(in_features, features, (1, 1), strides)

  def __call__(self, x: Array, rngs: nnx.Rngs | None = None) -> Array:
    activated = self.act(self.bn1(x))
    y = self.act(self.bn2(self.conv1(activated)))
    if self.dropout is not None:
      y = self.dropout(y, rngs=rngs)
    y = self.conv2(y)
    if self.attention is not None:
      y = self.attention(y)
    return x + y if self.identity else self.downsample_conv(activated) + y


@_base.check_fields_at_init
class WideResNetNNX(nnx.Module):
  """A CIFAR Wide ResNet in NNX (``cbam_jax.nnx.WideResNet``): the fields of
  :class:`WideResNet`, with its defaults (but ``conv`` and ``norm``: ``nnx.Conv`` with a
  materialised input on CPU and ``nnx.BatchNorm``), plus ``in_features`` (image channels)
  and ``rngs``.

  The model starts in training mode (BatchNorm on batch statistics, dropout on: with
  ``dropout_rate > 0`` call it as ``model(x, rngs=nnx.Rngs(dropout=key))``);
  ``model.eval()`` switches both off.
  """

  def __init__(self, *, in_features: int = 3, depth: int = 28, widen_factor: int = 10,
               num_classes: int = 10, dropout_rate: float = 0.0,
               attention: AttentionSpec = None, stage_attention: AttentionSpec = None,
               zero_init_spatial_gate: bool = True,
               attention_fields: Mapping[str, Any] | None = None,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               act: Callable[[Array], Array] = nn.relu,
               kernel_init: Initializer = conv_kernel_init, rngs: nnx.Rngs):
    check_wide_resnet_fields(depth, widen_factor, dropout_rate)
    self.act, self.num_classes = act, num_classes
    conv, norm, attention, stage_attention = nnx_factories(
        attention, stage_attention, attention_fields,
        zero_init_spatial_gate=zero_init_spatial_gate, dtype=dtype, param_dtype=param_dtype,
        kernel_init=kernel_init, rngs=rngs)

    self.conv1 = conv(in_features, STEM_FEATURES, (3, 3), padding=same_padding(3))
    stages = [[(f'layer{stage + 1}_{index}', functools.partial(
        WideBasicBlockNNX, features=features * widen_factor,
        strides=2 if stage > 0 and index == 0 else 1, conv=conv, norm=norm, act=self.act,
        dropout_rate=dropout_rate, attention=attention, rngs=rngs))
        for index in range(blocks_per_stage(depth))]
        for stage, features in enumerate(STAGE_FEATURES)]
    self.block_names, channels = add_stages(self, STEM_FEATURES, stages, stage_attention, rngs)
    self.final_bn = norm(channels)
    self.fc = nnx_classifier_head(channels, self.num_classes, param_dtype, head_kernel_init,
                                  rngs)

  def __call__(self, x: Array, *, channels_last: bool = False,
               rngs: nnx.Rngs | None = None) -> Array:
    """Logits ``(B, num_classes)`` float32 of NHWC images ``x``; ``channels_last`` as in
    the linen :class:`WideResNet`; ``rngs`` (a ``dropout`` stream) for dropout in training."""
    check_images(x, 'WideResNet', channels_last=channels_last)
    x = self.conv1(x)
    for name in self.block_names:
      block = getattr(self, name)
      x = block(x, rngs=rngs) if isinstance(block, WideBasicBlockNNX) else block(x)
    x = self.act(self.final_bn(x))
    return nnx_logits(x, self.fc)


# --------------------------------------------------------------------------- registration


BACKBONE = register_backbone(Backbone(
    family='wide_resnet', linen=WideResNet, nnx=WideResNetNNX, sizes=SIZES,
    fields={
        'depth': Field(),
        'widen_factor': Field(),
        'num_classes': Field(),
        'dropout_rate': Field(),
        'attention': Field('attention'),
        'stage_attention': Field('attention'),
        'attention_fields': Field('mapping'),
        'zero_init_spatial_gate': Field(),
        'dtype': Field('dtype'),
        'param_dtype': Field('dtype'),
    },
    linen_only=('conv', 'norm'), head='fc', head_init=dense_head_init(head_kernel_init)))
