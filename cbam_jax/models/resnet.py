"""The ResNet family: linen and NNX ResNets with attention in every residual block (in the
style of Flax's examples/imagenet), their sizes and their registration.

One :class:`ResNet` module per skin (:class:`ResNetNNX` is ``cbam_jax.nnx.ResNet``); the
named sizes (:data:`SIZES`, also ``functools.partial``s of the linen one):

* ImageNet (7x7/2 stem + 3x3/2 max-pool): ``ResNet18/34/50/101/152``, torchvision layout
  (projection shortcut = 1x1 conv with stride + BatchNorm; bottleneck stride on the 3x3 conv
  as in the official CBAM code and torchvision v1.5).
* ResNeXt and Wide ResNet (ImageNet, torchvision's ``resnet.py`` defines them the same way:
  ResNets whose bottleneck has ``groups`` and ``width_per_group``): ``resnext50_32x4d``,
  ``resnext101_32x4d`` (the CBAM paper's), ``resnext101_32x8d``, ``resnext101_64x4d``,
  ``wide_resnet50_2``, ``wide_resnet101_2`` (registry names only).
* CIFAR (32x32, He et al. 2016, 3 stages of 16/32/64 channels, option-A zero-padding
  shortcuts): ``ResNet20/32/44/56/110``.
* ``CifarResNet18``: the official CBAM code's CIFAR network (3x3/1 stem, no max-pool,
  64-128-256-512 basic blocks, projection shortcuts).
* ``ResNetTiny``: two 8/16-channel stages, for tests.

Attention (``attention=``) sits in EVERY residual block, on the residual branch after the
last BatchNorm, before the shortcut addition and the final ReLU (the official placement).
``stage_attention=`` places a module after every stage but the last (BAM's placement).

Module names mirror the torchvision / official PyTorch keys: ``conv1``, ``bn1``,
``layer{stage}_{index}`` (1-based stages) with ``conv1, bn1, conv2, bn2[, conv3, bn3],
downsample_conv, downsample_bn, attention``; ``stage_attention{stage}``; ``fc``.

Example::

  model = cbam_jax.models.create_model('resnet50', attention='cbam', num_classes=1000)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  logits, updates = model.apply(variables, images, train=True, mutable=['batch_stats'])
  _, state = model.apply(variables, images, mutable=['intermediates'])
  state['intermediates']['layer1_0']['attention']['spatial']['spatial_map']  # ((B, 56, 56),)
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
    head_kernel_init,
    linen_factories,
    nnx_classifier_head,
    nnx_factories,
    nnx_logits,
    pad_shortcut,
    same_padding,
)

Array = jax.Array
ModuleDef = Any

STEMS = ('imagenet', 'cifar')
SHORTCUTS = ('projection', 'pad')

__all__ = [
    'BLOCKS', 'SIZES', 'BasicBlock', 'BasicBlockNNX', 'Bottleneck', 'BottleneckNNX', 'ResNet',
    'ResNetNNX', 'ResNet18', 'ResNet34', 'ResNet50', 'ResNet101', 'ResNet152', 'ResNet20',
    'ResNet32', 'ResNet44', 'ResNet56', 'ResNet110', 'CifarResNet18', 'ResNetTiny',
]


class ResidualBlock(nn.Module):
  """The fields of every residual block: the layer factories the ResNet completes, the
  stride of its first strided conv, the attention on its residual branch (a factory, or
  ``None``), the shortcut kind, zero-init of its last BatchNorm scale and the bottleneck's
  grouping (``groups``, ``width_per_group``: 1 and 64 for a plain ResNet)."""

  features: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable[[Array], Array]
  strides: int = 1
  attention: Callable[..., nn.Module] | None = None
  shortcut: str = 'projection'
  zero_init_residual: bool = False
  groups: int = 1
  width_per_group: int = 64


class BasicBlock(ResidualBlock):
  """Two 3x3 convs (ResNet18/34, CIFAR ResNets); output has ``features`` channels.

  Input ``(B, H, W, C_in)`` -> ``(B, ceil(H / strides), ceil(W / strides), features)``.
  """

  expansion = 1

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    y = self.conv(self.features, (3, 3), self.strides, padding=same_padding(3), name='conv1')(x)
    y = self.act(self.norm(name='bn1')(y))
    y = self.conv(self.features, (3, 3), padding=same_padding(3), name='conv2')(y)
    y = self.norm(name='bn2', **last_norm_kwargs(self.zero_init_residual))(y)
    return _attend_and_add(self, x, y, self.features, train)


class Bottleneck(ResidualBlock):
  """1x1 -> 3x3 (stride, ``groups`` groups) -> 1x1 convs; output has ``4 * features``
  channels. The inner width is :func:`bottleneck_width` (``features`` for a plain ResNet).

  Input ``(B, H, W, C_in)`` -> ``(B, ceil(H / strides), ceil(W / strides), 4 * features)``.
  """

  expansion = 4

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    width = bottleneck_width(self.features, self.groups, self.width_per_group)
    y = self.conv(width, (1, 1), name='conv1')(x)
    y = self.act(self.norm(name='bn1')(y))
    y = self.conv(width, (3, 3), self.strides, padding=same_padding(3),
                  feature_group_count=self.groups, name='conv2')(y)
    y = self.act(self.norm(name='bn2')(y))
    y = self.conv(self.features * self.expansion, (1, 1), name='conv3')(y)
    y = self.norm(name='bn3', **last_norm_kwargs(self.zero_init_residual))(y)
    return _attend_and_add(self, x, y, self.features * self.expansion, train)


def bottleneck_width(features: int, groups: int, width_per_group: int) -> int:
  """The inner width of a bottleneck, torchvision's ``int(planes * (width_per_group / 64.))
  * groups``: ``features`` for a ResNet, ``2 * features`` for ResNeXt 32x4d and Wide ResNet-2."""
  return int(features * (width_per_group / 64.)) * groups


def last_norm_kwargs(zero_init_residual: bool) -> dict[str, Any]:
  # Zero-init of the last BN scale makes every block start as the identity (Goyal et al.).
  return {'scale_init': nn.initializers.zeros_init()} if zero_init_residual else {}


def _attend_and_add(block: ResidualBlock, x: Array, y: Array, features: int,
                    train: bool) -> Array:
  """A block's tail: attention on the residual branch ``y`` (after its last BatchNorm, as
  in the official CBAM code), then ``act(shortcut(x) + y)``."""
  if block.attention is not None:
    y = block.attention(name='attention')(y, train=train)
  return block.act(_shortcut(block, x, features, block.strides) + y)


def _shortcut(block: ResidualBlock, x: Array, features: int, strides: int) -> Array:
  """Identity, or (when the shape changes) a projection or option-A zero padding."""
  if strides == 1 and x.shape[-1] == features:
    return x
  if block.shortcut == 'pad':
    return pad_shortcut(x, features, strides)
  x = block.conv(features, (1, 1), strides, name='downsample_conv')(x)
  return block.norm(name='downsample_bn')(x)


@_base.check_fields_at_init
class ResNet(nn.Module):
  """ResNet v1 with optional attention in every block (and after stages).

  Attributes:
    stage_sizes: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet18.
    block_cls: :class:`BasicBlock` or :class:`Bottleneck`.
    num_filters: width of the first stage; stage ``i`` has ``num_filters * 2**i``.
    stem_features: channels of the stem conv; ``None`` (default): ``num_filters``. The CBAM
      paper's WideResNet-18 keeps a 64-channel stem before wider stages (its first block
      then has a projection shortcut).
    stem: ``'imagenet'`` (7x7/2 conv + 3x3/2 max-pool) or ``'cifar'`` (3x3/1 conv).
    num_classes: logits of the Dense head ``fc``.
    attention: ``None``, a registry name (``'cbam'``, ``'se'``, ``'channel'``,
      ``'spatial'``, ... see :func:`cbam_jax.attention.available`) or a module factory
      (class or ``functools.partial``), called ``factory(name=...)(y, train=train)``.
      ``'cbam'`` is the official configuration: ``CBAM(reduction_ratio=16, mlp_bias=True,
      spatial_norm=True)`` (spatial BatchNorm eps 1e-5, Flax momentum 0.99).
    stage_attention: same kinds, placed after stages ``1 .. n-1`` (BAM's placement); it
      sees the stage's channel count. Names ``stage_attention{stage}``.
    zero_init_spatial_gate: with ``'cbam'``/``'spatial'``, initialise the spatial
      BatchNorm scale to 0 so every spatial gate starts at sigmoid(0) = 0.5, as the
      official ResNet does. Factories are used as given.
    attention_fields: fields for the ``attention`` module (not ``stage_attention``), merged
      over the registry's configuration, e.g. ``{'reduction_ratio': 4}``; JSON-able, so it
      is saved with checkpoints (a ``flax.core.FrozenDict`` keeps the module hashable). A
      field the module does not take fails at ``init``.
    zero_init_residual: initialise the last BatchNorm scale of every block to 0.
    shortcut: ``'projection'`` (1x1 conv + BN when the shape changes) or ``'pad'`` (He et
      al. option A: subsample and zero-pad channels; parameter-free).
    groups: groups of every bottleneck's 3x3 conv (ResNeXt's cardinality; 1 for a ResNet).
    width_per_group: channels per group of the bottleneck's 3x3 conv at 64 ``features``;
      the inner width is ``int(features * width_per_group / 64) * groups`` (torchvision's:
      64 for a ResNet, 4 for ResNeXt 32x4d, 128 for Wide ResNet-2). ``BasicBlock`` takes
      only 1 and 64.
    dtype: compute dtype (e.g. ``jnp.bfloat16``); logits are always float32.
    param_dtype: parameter dtype.
    conv, norm, act: layer factories (partials are completed with the settings above).
      The default conv is :class:`cbam_jax.conv.MaterializedInputConv`: ``nn.Conv``'s
      numbers and parameters, with a training step about 0.8x as long on CPU.
    kernel_init: conv kernel initialiser (kaiming normal, fan_out).
  """

  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  num_filters: int = 64
  stem_features: int | None = None
  stem: str = 'imagenet'
  num_classes: int = 1000
  attention: AttentionSpec = None
  stage_attention: AttentionSpec = None
  zero_init_spatial_gate: bool = True
  attention_fields: Mapping[str, Any] | None = None
  zero_init_residual: bool = False
  shortcut: str = 'projection'
  groups: int = 1
  width_per_group: int = 64
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  conv: ModuleDef = MaterializedInputConv
  norm: ModuleDef = nn.BatchNorm
  act: Callable[[Array], Array] = nn.relu
  kernel_init: Initializer = conv_kernel_init

  @nn.compact
  def __call__(self, x: Array, train: bool = False, *, channels_last: bool = False) -> Array:
    """Logits ``(B, num_classes)`` float32 of NHWC images ``x`` ``(B, H, W, C)``.

    In train mode BatchNorm uses batch statistics and updates ``batch_stats`` (apply with
    ``mutable=['batch_stats']``); attention maps are sown into ``intermediates``. Images
    that look channels-first (see :func:`check_images`) are refused unless
    ``channels_last=True`` says they are NHWC.
    """
    self._check(x, channels_last)
    conv, norm, attention, stage_attention = linen_factories(self, train)

    stem_features = self.num_filters if self.stem_features is None else self.stem_features
    if self.stem == 'imagenet':
      x = conv(stem_features, (7, 7), (2, 2), padding=same_padding(7), name='conv1')(x)
      x = self.act(norm(name='bn1')(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=same_padding(3))  # -inf padding.
    else:
      x = conv(stem_features, (3, 3), padding=same_padding(3), name='conv1')(x)
      x = self.act(norm(name='bn1')(x))
    stages = [[functools.partial(
        self.block_cls, features=self.num_filters * 2**stage,
        strides=2 if stage > 0 and index == 0 else 1, conv=conv, norm=norm, act=self.act,
        attention=attention, shortcut=self.shortcut, zero_init_residual=self.zero_init_residual,
        groups=self.groups, width_per_group=self.width_per_group,
        name=f'layer{stage + 1}_{index}') for index in range(num_blocks)]
        for stage, num_blocks in enumerate(self.stage_sizes)]
    x = apply_stages(x, stages, stage_attention, train)
    return classifier_head(x, self.num_classes, self.param_dtype, head_kernel_init)

  def _check(self, x: Array, channels_last: bool = False) -> None:
    check_resnet_fields(self.stem, self.shortcut, self.stage_sizes, self.block_cls,
                        self.num_filters, self.groups, self.width_per_group,
                        self.stem_features)
    check_images(x, channels_last=channels_last)


def check_resnet_fields(stem: str, shortcut: str, stage_sizes: Sequence[int], block_cls: Any,
                        num_filters: int, groups: int, width_per_group: int,
                        stem_features: int | None = None) -> None:
  if stem_features is not None and (isinstance(stem_features, bool)
                                    or not isinstance(stem_features, int) or stem_features < 1):
    raise ValueError(f'stem_features must be a positive channel count or None (num_filters), '
                     f'got {stem_features!r}.')
  _validation.check_choice('stem', stem, STEMS)
  _validation.check_choice('shortcut', shortcut, SHORTCUTS)
  if not stage_sizes or any(int(n) < 1 for n in stage_sizes):
    raise ValueError(f'stage_sizes must be positive block counts, got {stage_sizes!r}.')
  if (groups, width_per_group) == (1, 64):
    return
  if block_cls in (BasicBlock, BasicBlockNNX):
    raise ValueError('BasicBlock takes only groups=1 and width_per_group=64 (as '
                     f'torchvision), got {groups} and {width_per_group}; use '
                     'block_cls=Bottleneck for a ResNeXt or Wide ResNet.')
  if groups < 1 or bottleneck_width(num_filters, groups, width_per_group) < 1:
    raise ValueError(f'groups={groups} and width_per_group={width_per_group} give the first '
                     f'stage (num_filters={num_filters}) no channels; use groups >= 1 and '
                     'width_per_group >= 64 / num_filters.')


_RESNEXT = dict(block_cls=Bottleneck, groups=32, width_per_group=4)   # 32x4d.
_WIDE = dict(block_cls=Bottleneck, width_per_group=128)             # Twice ResNet's width.
_CIFAR = dict(block_cls=BasicBlock, num_filters=16, stem='cifar', shortcut='pad', num_classes=10)
_RESNEXT29 = dict(block_cls=Bottleneck, stage_sizes=(3, 3, 3), stem='cifar', width_per_group=64,
                  num_classes=10)

# Model name -> the ResNet fields that make it.
SIZES: dict[str, dict[str, Any]] = {
    'resnet18': dict(stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock),
    'resnet34': dict(stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock),
    'resnet50': dict(stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck),
    'resnet101': dict(stage_sizes=(3, 4, 23, 3), block_cls=Bottleneck),
    'resnet152': dict(stage_sizes=(3, 8, 36, 3), block_cls=Bottleneck),
    'resnext50_32x4d': dict(_RESNEXT, stage_sizes=(3, 4, 6, 3)),
    'resnext101_32x4d': dict(_RESNEXT, stage_sizes=(3, 4, 23, 3)),
    'resnext101_32x8d': dict(_RESNEXT, stage_sizes=(3, 4, 23, 3), width_per_group=8),
    'resnext101_64x4d': dict(_RESNEXT, stage_sizes=(3, 4, 23, 3), groups=64),
    'wide_resnet50_2': dict(_WIDE, stage_sizes=(3, 4, 6, 3)),
    'wide_resnet101_2': dict(_WIDE, stage_sizes=(3, 4, 23, 3)),
    # The CBAM paper's WideResNet18 (Table 4): ResNet-18 with stage widths times 1.5 or 2
    # after the 64-channel stem (its counts: docs/models.md).
    'wide_resnet18_1_5': dict(stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock, num_filters=96,
                              stem_features=64),
    'wide_resnet18_2': dict(stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock, num_filters=128,
                            stem_features=64),
    'resnet20': dict(_CIFAR, stage_sizes=(3, 3, 3)),
    'resnet32': dict(_CIFAR, stage_sizes=(5, 5, 5)),
    'resnet44': dict(_CIFAR, stage_sizes=(7, 7, 7)),
    'resnet56': dict(_CIFAR, stage_sizes=(9, 9, 9)),
    'resnet110': dict(_CIFAR, stage_sizes=(18, 18, 18)),
    # ResNeXt-29 for CIFAR (Xie et al. 2017): 3x3 stem of 64, 3 stages of 3 bottlenecks.
    'resnext29_8x64d': dict(_RESNEXT29, groups=8),
    'resnext29_16x64d': dict(_RESNEXT29, groups=16),
    'cifar_resnet18': dict(stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock, stem='cifar',
                           num_classes=10),
    'resnet_tiny': dict(stage_sizes=(1, 1), block_cls=BasicBlock, num_filters=8, stem='cifar',
                        num_classes=10),
}

ResNet18 = functools.partial(ResNet, **SIZES['resnet18'])
ResNet34 = functools.partial(ResNet, **SIZES['resnet34'])
ResNet50 = functools.partial(ResNet, **SIZES['resnet50'])
ResNet101 = functools.partial(ResNet, **SIZES['resnet101'])
ResNet152 = functools.partial(ResNet, **SIZES['resnet152'])
ResNet20 = functools.partial(ResNet, **SIZES['resnet20'])
ResNet32 = functools.partial(ResNet, **SIZES['resnet32'])
ResNet44 = functools.partial(ResNet, **SIZES['resnet44'])
ResNet56 = functools.partial(ResNet, **SIZES['resnet56'])
ResNet110 = functools.partial(ResNet, **SIZES['resnet110'])
CifarResNet18 = functools.partial(ResNet, **SIZES['cifar_resnet18'])
ResNetTiny = functools.partial(ResNet, **SIZES['resnet_tiny'])

# The block types by the name a model description (cbam_jax.saving) gives them.
BLOCKS: dict[str, type[nn.Module]] = {'basic': BasicBlock, 'bottleneck': Bottleneck}


# --------------------------------------------------------------------------- NNX


class BasicBlockNNX(nnx.Module):
  """Two 3x3 convs; ``features`` output channels (as :class:`BasicBlock`)."""

  expansion = 1

  def __init__(self, in_features: int, features: int, *, strides: int, conv, norm,
               act: Callable[[Array], Array], attention, shortcut: str,
               zero_init_residual: bool, groups: int = 1, width_per_group: int = 64,
               rngs: nnx.Rngs):
    del groups, width_per_group  # 1 and 64 (check_resnet_fields).
    self.act, self.strides, self.shortcut = act, strides, shortcut
    pad = same_padding(3)
    self.conv1 = conv(in_features, features, (3, 3), strides, padding=pad)
    self.bn1 = norm(features)
    self.conv2 = conv(features, features, (3, 3), padding=pad)
    self.bn2 = norm(features, **last_norm_kwargs(zero_init_residual))
    _attach_attention_and_shortcut(self, in_features, features, conv, norm, attention, rngs)

  def __call__(self, x: Array) -> Array:
    y = self.act(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return _finish(self, x, y)


class BottleneckNNX(nnx.Module):
  """1x1 -> 3x3 (stride) -> 1x1; ``4 * features`` output channels (as :class:`Bottleneck`)."""

  expansion = 4

  def __init__(self, in_features: int, features: int, *, strides: int, conv, norm,
               act: Callable[[Array], Array], attention, shortcut: str,
               zero_init_residual: bool, groups: int = 1, width_per_group: int = 64,
               rngs: nnx.Rngs):
    self.act, self.strides, self.shortcut = act, strides, shortcut
    out = features * self.expansion
    width = bottleneck_width(features, groups, width_per_group)
    self.conv1 = conv(in_features, width, (1, 1))
    self.bn1 = norm(width)
    self.conv2 = conv(width, width, (3, 3), strides, padding=same_padding(3),
                      feature_group_count=groups)
    self.bn2 = norm(width)
    self.conv3 = conv(width, out, (1, 1))
    self.bn3 = norm(out, **last_norm_kwargs(zero_init_residual))
    _attach_attention_and_shortcut(self, in_features, out, conv, norm, attention, rngs)

  def __call__(self, x: Array) -> Array:
    y = self.act(self.bn1(self.conv1(x)))
    y = self.act(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return _finish(self, x, y)


def _attach_attention_and_shortcut(block, in_features, out, conv, norm, attention, rngs):
  block.out_features = out
  block.has_attention = attention is not None
  if block.has_attention:
    block.attention = attention(out, rngs=rngs)
  block.identity = block.strides == 1 and in_features == out
  if not block.identity and block.shortcut == 'projection':
    block.downsample_conv = conv(in_features, out, (1, 1), block.strides)
    block.downsample_bn = norm(out)


def _finish(block, x: Array, y: Array) -> Array:
  if block.has_attention:
    y = block.attention(y)
  if block.identity:
    residual = x
  elif block.shortcut == 'pad':
    residual = pad_shortcut(x, block.out_features, block.strides)
  else:
    residual = block.downsample_bn(block.downsample_conv(x))
  return block.act(residual + y)


_NNX_BLOCKS = {BasicBlock: BasicBlockNNX, Bottleneck: BottleneckNNX}


@_base.check_fields_at_init
class ResNetNNX(nnx.Module):
  """ResNet v1 with attention in every block, in NNX (``cbam_jax.nnx.ResNet``); the fields
  of :class:`ResNet`, with its defaults (but ``conv`` and ``norm``: the NNX ResNet uses
  ``nnx.Conv`` with a materialised input on CPU and ``nnx.BatchNorm``), plus
  ``in_features`` (image channels) and ``rngs``.

  The model starts in training mode; ``model.eval()`` switches BatchNorm to the running
  statistics.
  """

  def __init__(self, *, in_features: int = 3, stage_sizes: Sequence[int],
               block_cls: ModuleDef, num_filters: int = 64, stem: str = 'imagenet',
               num_classes: int = 1000, attention: AttentionSpec = None,
               stage_attention: AttentionSpec = None, zero_init_spatial_gate: bool = True,
               attention_fields: Mapping[str, Any] | None = None,
               zero_init_residual: bool = False, shortcut: str = 'projection',
               groups: int = 1, width_per_group: int = 64, stem_features: int | None = None,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               act: Callable[[Array], Array] = nn.relu,
               kernel_init: Initializer = conv_kernel_init, rngs: nnx.Rngs):
    check_resnet_fields(stem, shortcut, stage_sizes, block_cls, num_filters, groups,
                        width_per_group, stem_features)
    block_cls = _NNX_BLOCKS.get(block_cls, block_cls)
    self.stem, self.act, self.num_classes = stem, act, num_classes
    self.stage_sizes = tuple(int(n) for n in stage_sizes)
    conv, norm, attention, stage_attention = nnx_factories(
        attention, stage_attention, attention_fields,
        zero_init_spatial_gate=zero_init_spatial_gate, dtype=dtype, param_dtype=param_dtype,
        kernel_init=kernel_init, rngs=rngs)

    channels = num_filters if stem_features is None else stem_features
    if self.stem == 'imagenet':
      self.conv1 = conv(in_features, channels, (7, 7), (2, 2), padding=same_padding(7))
    else:
      self.conv1 = conv(in_features, channels, (3, 3), padding=same_padding(3))
    self.bn1 = norm(channels)
    stages = [[(f'layer{stage + 1}_{index}', functools.partial(
        block_cls, features=num_filters * 2**stage,
        strides=2 if stage > 0 and index == 0 else 1, conv=conv, norm=norm, act=self.act,
        attention=attention, shortcut=shortcut, zero_init_residual=zero_init_residual,
        groups=groups, width_per_group=width_per_group, rngs=rngs))
        for index in range(num_blocks)] for stage, num_blocks in enumerate(self.stage_sizes)]
    self.block_names, channels = add_stages(self, channels, stages, stage_attention, rngs)
    self.fc = nnx_classifier_head(channels, self.num_classes, param_dtype, head_kernel_init,
                                  rngs)

  def __call__(self, x: Array, *, channels_last: bool = False) -> Array:
    """Logits ``(B, num_classes)`` float32 of NHWC images ``x``; ``channels_last`` as in
    the linen :class:`ResNet`."""
    check_images(x, channels_last=channels_last)
    x = self.act(self.bn1(self.conv1(x)))
    if self.stem == 'imagenet':
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=same_padding(3))
    for name in self.block_names:
      x = getattr(self, name)(x)
    return nnx_logits(x, self.fc)


# --------------------------------------------------------------------------- registration


BACKBONE = register_backbone(Backbone(
    family='resnet', linen=ResNet, nnx=ResNetNNX, sizes=SIZES,
    fields={
        'stage_sizes': Field('tuple'),
        'block': Field('choice', attr='block_cls', choices=BLOCKS),
        'num_filters': Field(),
        'stem_features': Field(),
        'stem': Field(),
        'num_classes': Field(),
        'shortcut': Field(),
        'groups': Field(),
        'width_per_group': Field(),
        'attention': Field('attention'),
        'stage_attention': Field('attention'),
        'attention_fields': Field('mapping'),
        'zero_init_spatial_gate': Field(),
        'zero_init_residual': Field(),
        'dtype': Field('dtype'),
        'param_dtype': Field('dtype'),
    },
    linen_only=('conv', 'norm'), head='fc', head_init=dense_head_init(head_kernel_init)))
