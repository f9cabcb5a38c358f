"""Architecture inference: the :class:`cbam_jax.models.ResNet` that a state dict describes.

Block type, stage sizes, width, stem and its width, ResNeXt's groups and width per group,
classes, attention and its hidden sizes, MLP bias, spatial BatchNorm and kernel size are read
from the keys and shapes.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cbam_jax import functional as F
from cbam_jax.attention import presets
from cbam_jax.attention.bam import BottleneckAttention
from cbam_jax.attention.cbam import CBAM
from cbam_jax.attention.se import SqueezeExcitation
from cbam_jax.models.resnet import BLOCKS, Bottleneck, ResNet, bottleneck_width

SOURCES = ('official', 'timm', 'torchvision')

_log = logging.getLogger(__name__)
_LAYER_KEY = re.compile(r'^layer(\d+)\.(\d+)\.')


def _shape(arrays: Mapping[str, np.ndarray], key: str, source: str) -> tuple[int, ...]:
  if key not in arrays:
    raise ValueError(
        f'Cannot infer the architecture: the state dict has no {key!r} (source={source!r}). '
        f'Keys start with: {", ".join(sorted(arrays)[:8])}. Is this a ResNet state dict of '
        f'this source (one of {SOURCES})?')
  return tuple(arrays[key].shape)


def _stage_sizes(arrays: Mapping[str, np.ndarray]) -> tuple[int, ...]:
  blocks: dict[int, set[int]] = {}
  for key in arrays:
    match = _LAYER_KEY.match(key)
    if match:
      blocks.setdefault(int(match[1]), set()).add(int(match[2]))
  if not blocks:
    raise ValueError('Cannot infer the architecture: no \'layer{stage}.{block}.\' keys.')
  stages = sorted(blocks)
  if stages != list(range(1, len(stages) + 1)):
    raise ValueError(f'Residual stages must be layer1..layerN, found layer{stages}.')
  sizes = []
  for stage in stages:
    indices = sorted(blocks[stage])
    if indices != list(range(len(indices))):
      raise ValueError(f'Blocks of layer{stage} must be numbered 0..n-1, found {indices}.')
    sizes.append(len(indices))
  return tuple(sizes)


def _hidden_rule(pairs: Sequence[tuple[int, int]], rules: Sequence[str],
                 what: str) -> tuple[str, float]:
  """The first (rule, reduction ratio) that gives every ``(channels, hidden)`` pair."""
  sizes = {
      'floor': lambda c, r: F.hidden_size(c, r, None, 'floor'),
      'round': lambda c, r: F.hidden_size(c, r, None, 'round'),
      'divisible8': lambda c, r: F.hidden_size(c, r, None, 'round', hidden_divisor=8),
  }
  channels, hidden = max(pairs)
  for ratio in dict.fromkeys((16, channels / hidden)):  # The default first, then the data's.
    for rule in rules:
      if all(sizes[rule](c, ratio) == h for c, h in pairs):
        return rule, int(ratio) if float(ratio).is_integer() else ratio
  raise ValueError(
      f'The {what} hidden sizes {sorted(set(pairs))} (channels, hidden) follow no supported '
      f'rule ({", ".join(rules)} of channels / ratio), so one attention module cannot '
      'describe every block. Build the model yourself and copy the weights by hand.')


def torchvision_attention(attention: Any, attention_fields: Mapping[str, Any]) -> Any:
  """The attention spec of a network converted from torchvision, which has none: the modules
  asked for (``'auto'`` = ``'cbam'``) are freshly initialised; ``attention_fields`` need
  ``attention`` to be a module class."""
  if attention == 'auto':
    attention = 'cbam'
  if attention_fields and not callable(attention):
    raise ValueError('attention_fields needs attention= to be a module class; use e.g. '
                     'attention=CBAM, attention_fields={...}.')
  if attention_fields:
    return functools.partial(attention, **attention_fields)
  return attention


def _infer_attention(arrays: Mapping[str, np.ndarray], source: str,
                     stage_sizes: Sequence[int], attention: Any,
                     attention_fields: Mapping[str, Any]) -> Any:
  """The attention spec of ``source``'s state dict (a functools.partial), or ``attention``."""
  blocks = [f'layer{s + 1}.{i}.' for s, n in enumerate(stage_sizes) for i in range(n)]
  if source == 'torchvision':
    return torchvision_attention(attention, attention_fields)
  if attention != 'auto':
    raise ValueError(
        f'attention= is read from the weights for source={source!r}; pass it only with '
        'source=\'torchvision\'. Use attention_fields= to set what weights cannot tell '
        '(e.g. pool_types).')

  if source == 'official':
    channel_keys = [b + 'cbam.ChannelGate.mlp.1.weight' for b in blocks]
    spatial_key = 'cbam.SpatialGate.spatial.conv.weight'
    spatial_bias = 'cbam.SpatialGate.spatial.conv.bias'
    mlp_bias_key = 'cbam.ChannelGate.mlp.1.bias'
    squeeze = False
    rules: tuple[str, ...] = ('floor',)
  else:
    se_keys = [b + 'se.fc1.weight' for b in blocks]
    channel_keys = [b + 'se.channel.fc1.weight' for b in blocks]
    spatial_key = 'se.spatial.conv.conv.weight'
    spatial_bias = 'se.spatial.conv.conv.bias'
    squeeze = any(k in arrays for k in se_keys)
    if squeeze:
      channel_keys = se_keys
      mlp_bias_key = 'se.fc1.bias'
      rules = ('divisible8', 'floor', 'round')
    else:
      mlp_bias_key = 'se.channel.fc1.bias'
      rules = ('round', 'floor')
  present = [b for b, k in zip(blocks, channel_keys, strict=True) if k in arrays]
  if not present:
    return None  # A plain ResNet.
  if len(present) != len(blocks):
    # Every block gets attention; the blocks without weights show up as missing keys.
    _log.warning('Only %d of %d blocks have attention weights.', len(present), len(blocks))
  pairs = []
  for block, key in zip(blocks, channel_keys, strict=True):
    if block in present:
      shape = arrays[key].shape  # Linear (h, C) or 1x1 conv (h, C, 1, 1).
      pairs.append((int(shape[1]), int(shape[0])))
  rule, ratio = _hidden_rule(pairs, rules, f'{source} attention MLP')
  mlp_bias = any(b + mlp_bias_key in arrays for b in present)

  if squeeze:
    fields: dict[str, Any] = dict(reduction_ratio=ratio, mlp_bias=mlp_bias)
    if rule == 'divisible8':  # timm's SEModule: make_divisible(C / r, 8).
      se_preset = presets.fields('timm', 'se')
      fields.update(hidden_rounding=se_preset['hidden_rounding'],
                    hidden_divisor=se_preset['hidden_divisor'])
    else:
      fields['hidden_rounding'] = rule
    return functools.partial(SqueezeExcitation, **{**fields, **attention_fields})

  spatial = [b + spatial_key for b in blocks if b + spatial_key in arrays]
  fields = dict(reduction_ratio=ratio, hidden_rounding=rule, mlp_bias=mlp_bias,
                use_spatial=bool(spatial))
  if spatial:
    kernel = arrays[spatial[0]].shape
    if len(kernel) != 4 or kernel[:2] != (1, 2):
      raise ValueError(
          f'{spatial[0]} has shape {kernel}; a CBAM spatial conv maps the 2 pooled channels '
          'to 1, i.e. (1, 2, k, k). Light/variant spatial gates are not supported.')
    has_norm = any(b + spatial_key.replace('conv.weight', 'bn.weight') in arrays
                   for b in blocks)
    fields.update(
        kernel_size=int(kernel[2]) if kernel[2] == kernel[3] else (int(kernel[2]),
                                                                   int(kernel[3])),
        spatial_norm=has_norm,
        use_bias=any(b + spatial_bias in arrays for b in blocks),
        # PyTorch momentum m is Flax momentum 1 - m: official BasicConv 0.01, timm 0.1.
        norm_momentum=presets.fields(source, 'cbam')['norm_momentum'],
        norm_epsilon=presets.fields(source, 'cbam')['norm_epsilon'])
  return functools.partial(CBAM, **{**fields, **attention_fields})


def _infer_stage_attention(arrays: Mapping[str, np.ndarray], source: str,
                           num_stages: int) -> Any:
  """Official BAM (``bam{stage}.*`` after every stage but the last), or ``None``."""
  stages = sorted({int(m[1]) for k in arrays if (m := re.match(r'^bam(\d+)\.', k))})
  if not stages:
    return None
  if source != 'official':
    raise ValueError(f'bam{stages[0]}.* keys are the official code\'s BAM; use '
                     'source=\'official\'.')
  if stages != list(range(1, num_stages)):
    raise ValueError(
        f'BAM modules after stages {stages}; cbam_jax places stage attention after every '
        f'stage but the last, i.e. bam1..bam{num_stages - 1} for {num_stages} stages.')
  pairs = []
  for stage in stages:
    shape = _shape(arrays, f'bam{stage}.channel_att.gate_c.gate_c_fc_0.weight', source)
    pairs.append((int(shape[1]), int(shape[0])))
  _, ratio = _hidden_rule(pairs, ('floor',), 'BAM')
  num_dilated = len({m[1] for k in arrays
                     if (m := re.match(r'^bam1\.spatial_att\.gate_s\.gate_s_conv_di_(\d+)\.', k))})
  # Official: 1 + sigmoid(Mc * Ms), no output BatchNorms, PyTorch's default BN momentum 0.1.
  # The dilation (4) is not in the weights.
  return functools.partial(
      BottleneckAttention, reduction_ratio=ratio, hidden_rounding='floor', combine='product',
      output_norm=False, num_dilated_convs=num_dilated, norm_momentum=0.9, norm_epsilon=1e-5)


def _grouping(arrays: Mapping[str, np.ndarray], source: str, num_filters: int,
              num_stages: int) -> tuple[int, int]:
  """ResNeXt's ``(groups, width_per_group)`` of a bottleneck ResNet: the 3x3 convs' groups
  and the per-group width that gives every stage's inner width (``(1, 64)`` for a ResNet)."""
  widths = []  # (features, inner width) of every stage.
  groups = 0  # Not yet read.
  for stage in range(num_stages):
    out, per_group = _shape(arrays, f'layer{stage + 1}.0.conv2.weight', source)[:2]
    if per_group < 1 or out % per_group or groups not in (0, out // per_group):
      raise ValueError(
          f'layer{stage + 1}.0.conv2.weight has shape {(out, per_group)} (out, in / groups); '
          'every bottleneck\'s 3x3 conv must have the same number of groups.')
    groups = out // per_group
    widths.append((num_filters * 2**stage, out))
  # The first stage bounds width_per_group (int() floors); the others choose within it.
  per_group = widths[0][1] // groups
  # Every w with int(num_filters * w / 64) == per_group, the smallest first.
  for width_per_group in range(-(-per_group * 64 // num_filters),
                               -(-(per_group + 1) * 64 // num_filters)):
    if all(bottleneck_width(f, groups, width_per_group) == w for f, w in widths):
      return groups, width_per_group
  raise ValueError(
      f'The bottlenecks\' inner widths {[w for _, w in widths]} (stage features '
      f'{[f for f, _ in widths]}, {groups} groups) follow no width_per_group of '
      'int(features * width_per_group / 64) * groups (torchvision\'s and timm\'s ResNeXt rule).')


def infer_model(arrays: Mapping[str, np.ndarray], source: str, attention: Any,
                 attention_fields: Mapping[str, Any]) -> tuple[ResNet, int]:
  """The ResNet described by ``arrays`` and its number of input channels."""
  if 'conv1.0.weight' in arrays or 'conv1.weight' not in arrays and any(
      k.startswith('conv1.') for k in arrays):
    raise ValueError('Deep stems (timm resnet*c/d/s: conv1.0, conv1.1, ...) are not supported; '
                     'only the single-conv 7x7 (ImageNet) and 3x3 (CIFAR) stems.')
  stem_shape = _shape(arrays, 'conv1.weight', source)
  if len(stem_shape) != 4 or stem_shape[2] != stem_shape[3] or stem_shape[2] not in (3, 7):
    raise ValueError(
        f'conv1.weight has shape {stem_shape}; expected (filters, in_channels, 7, 7) for the '
        'ImageNet stem (7x7/2 conv + max-pool) or (filters, in_channels, 3, 3) for the CIFAR '
        'stem (3x3/1 conv, no pool).')
  stage_sizes = _stage_sizes(arrays)
  block = 'bottleneck' if 'layer1.0.conv3.weight' in arrays else 'basic'
  fc_shape = _shape(arrays, 'fc.weight', source)
  if len(fc_shape) != 2:
    raise ValueError(f'fc.weight has shape {fc_shape}; expected (num_classes, features).')
  if block == 'bottleneck':
    num_filters = _shape(arrays, 'layer1.0.conv3.weight', source)[0] // Bottleneck.expansion
    groups, width_per_group = _grouping(arrays, source, num_filters, len(stage_sizes))
  else:
    num_filters, groups, width_per_group = _shape(arrays, 'layer1.0.conv1.weight', source)[0], 1, 64
  model = ResNet(
      stage_sizes=stage_sizes, block_cls=BLOCKS[block], num_filters=int(num_filters),
      stem_features=None if stem_shape[0] == num_filters else int(stem_shape[0]),
      groups=groups, width_per_group=width_per_group,
      stem='imagenet' if stem_shape[2] == 7 else 'cifar', num_classes=int(fc_shape[0]),
      attention=_infer_attention(arrays, source, stage_sizes, attention, attention_fields),
      stage_attention=_infer_stage_attention(arrays, source, len(stage_sizes)),
      shortcut='projection')
  return model, int(stem_shape[1])
