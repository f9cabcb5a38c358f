"""MobileNet state dicts -> :class:`cbam_jax.models.MobileNetV2` / :class:`MobileNetV1`.

Three layouts (:func:`layout`):

* ``'torchvision_v2'``: torchvision's ``mobilenet_v2``: ``features.0.{0,1}`` (stem conv,
  BN), ``features.{i}.conv.*`` for the 17 inverted residual blocks (expansion 1:
  ``conv.0.{0,1}`` depthwise conv and BN, ``conv.1`` projection conv, ``conv.2`` its BN;
  otherwise ``conv.0.{0,1}`` expansion, ``conv.1.{0,1}`` depthwise, ``conv.2`` projection,
  ``conv.3`` its BN), ``features.18.{0,1}`` (last conv, BN) and ``classifier.1`` (the Linear
  after the dropout). Width 1.0, torchvision's only trained width.
* ``'timm_v2'``: timm's ``mobilenetv2_*`` (``models/efficientnet.py``, built by
  ``_efficientnet_builder.py``): ``conv_stem``, ``bn1``, ``blocks.{stage}.{index}`` in 7
  stages of 1, 2, 3, 4, 3, 3, 1 blocks (the first a ``DepthwiseSeparableConv``:
  ``conv_dw``, ``bn1``, ``conv_pw``, ``bn2``; the others ``InvertedResidual``: ``conv_pw``,
  ``bn1`` expansion, ``conv_dw``, ``bn2``, ``conv_pwl``, ``bn3`` projection), ``conv_head``,
  ``bn2``, ``classifier``. timm rounds widths as torchvision, so every timm width
  (``mobilenetv2_035`` .. ``_140``) is a ``width_multiplier`` of ours.
* ``'timm_v1'``: timm's ``mobilenetv1_*``: ``conv_stem``, ``bn1``, 13 depthwise-separable
  blocks with an activation after the pointwise conv (``dsa``: ``conv_dw``, ``bn1``,
  ``conv_pw``, ``bn2``) in 5 stages of 1, 2, 2, 6, 2, ``classifier``. timm rounds widths to
  multiples of 8, cbam_jax to the nearest integer: the two agree where every width is a
  multiple of 8 (``mobilenetv1_100``, ``_125``), and other widths are refused.

None of them has attention: the modules asked for (``attention=``; ``'auto'`` is ``'cbam'``)
are freshly initialised, configured as the source's models configure them (the official
preset for torchvision, as a torchvision ResNet; timm's ``CbamModule`` / ``SEModule`` for
timm: :mod:`cbam_jax.attention.presets`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from cbam_jax import attention as attention_registry
from cbam_jax.attention import presets
from cbam_jax.convert.architecture import torchvision_attention
from cbam_jax.convert.keys import _NORM_LEAVES, _conv, _identity, _linear
from cbam_jax.models import mobilenet_v1
from cbam_jax.models.mobilenet_v1 import MobileNetV1, scaled_width
from cbam_jax.models.mobilenet_v2 import (
    LAST_WIDTH,
    SETTINGS,
    STEM_WIDTH,
    MobileNetV2,
    block_plan,
    make_divisible,
)

STEM_KEY = 'features.0.0.weight'
HEAD_KEY = 'classifier.1.weight'
TIMM_STEM_KEY = 'conv_stem.weight'
TIMM_HEAD_KEY = 'classifier.weight'
# Blocks per stage of timm's arch_defs (_gen_mobilenet_v2, _gen_mobilenet_v1).
TIMM_V2_STAGES = tuple(n for _, _, n, _ in SETTINGS)
TIMM_V1_STAGES = (1, 2, 2, 6, 2)

_TIMM_BLOCK_KEY = re.compile(r'^blocks\.(\d+)\.(\d+)\.')


def _timm_stages(arrays: Mapping[str, np.ndarray]) -> tuple[int, ...]:
  """Blocks per stage of timm's ``blocks.{stage}.{index}`` keys; () if they are not
  numbered 0..n-1."""
  blocks: dict[int, set[int]] = {}
  for key in arrays:
    if match := _TIMM_BLOCK_KEY.match(key):
      blocks.setdefault(int(match[1]), set()).add(int(match[2]))
  if sorted(blocks) != list(range(len(blocks))) or any(
      sorted(indices) != list(range(len(indices))) for indices in blocks.values()):
    return ()
  return tuple(len(blocks[stage]) for stage in sorted(blocks))


def layout(arrays: Mapping[str, np.ndarray], source: str) -> str | None:
  """The MobileNet layout of the keys under ``source``, ``None`` for another network (a
  ResNet); a one-line error for a timm EfficientNet-builder network that is neither
  MobileNet."""
  if source == 'torchvision':
    return 'torchvision_v2' if STEM_KEY in arrays and HEAD_KEY in arrays else None
  if source != 'timm' or TIMM_STEM_KEY not in arrays:
    return None
  stages = _timm_stages(arrays)
  if stages == TIMM_V2_STAGES and 'conv_head.weight' in arrays:
    return 'timm_v2'
  if stages == TIMM_V1_STAGES and 'blocks.0.0.conv_pwl.weight' not in arrays:
    if 'conv_head.weight' in arrays:
      raise ValueError('conv_head.weight: timm\'s mobilenetv1_*h head conv (1x1 to 1024 '
                       'before the pooling) has no counterpart in cbam_jax\'s MobileNetV1; '
                       'only mobilenetv1_100 and mobilenetv1_125 convert.')
    return 'timm_v1'
  raise ValueError(
      f'The keys are a timm EfficientNet-builder network (conv_stem, blocks.S.I) with '
      f'{list(stages) or "unnumbered"} blocks per stage; only timm\'s mobilenetv2_* '
      f'({list(TIMM_V2_STAGES)}, conv_head) and mobilenetv1_* ({list(TIMM_V1_STAGES)}) '
      'convert (cbam_jax has no EfficientNet or MobileNetV3).')


def _attention(source: str, attention: Any, attention_fields: Mapping[str, Any]) -> Any:
  """The fresh attention: a registry name under the source's preset, or the factory given."""
  if source == 'timm' and isinstance(attention, str):
    name = 'cbam' if attention == 'auto' else attention
    return functools.partial(attention_registry.member(name).linen,
                             **presets.fields('timm', name, **attention_fields))
  return torchvision_attention(attention, attention_fields)


def infer_model(arrays: Mapping[str, np.ndarray], attention: Any,
                attention_fields: Mapping[str, Any], source: str = 'torchvision'
                ) -> tuple[MobileNetV1 | MobileNetV2, int]:
  """The MobileNet of ``arrays`` (layout as :func:`layout`) and its input channels."""
  found = layout(arrays, source)
  if found is None:
    raise ValueError(f'The keys are not a {source} MobileNet\'s.')
  attention = _attention(source, attention, attention_fields)
  if found == 'torchvision_v2':
    stem = arrays[STEM_KEY].shape
    last = arrays.get(f'features.{len(block_plan(1.0)) + 1}.0.weight')
    if stem[0] != STEM_WIDTH or last is None or last.shape[0] != LAST_WIDTH:
      raise ValueError(
          f'{STEM_KEY} has {stem[0]} filters and the last conv '
          f'{None if last is None else last.shape[0]}: only torchvision\'s mobilenet_v2 at '
          f'width 1.0 ({STEM_WIDTH} and {LAST_WIDTH}) converts.')
    return (MobileNetV2(num_classes=int(arrays[HEAD_KEY].shape[0]), attention=attention),
            int(stem[1]))

  num_classes = int(_timm_array(arrays, TIMM_HEAD_KEY).shape[0])
  in_channels = int(arrays[TIMM_STEM_KEY].shape[1])
  projection = 'conv_pwl' if found == 'timm_v2' else 'conv_pw'
  widths = [int(arrays[TIMM_STEM_KEY].shape[0])] + [
      int(_timm_array(arrays, f'{prefix}.{"conv_pw" if index == 1 else projection}.weight'
                      ).shape[0])
      for index, prefix in _timm_block_keys(found).items()]
  if found == 'timm_v2':
    multiplier = widths[-1] / SETTINGS[-1][1]
    expected = [make_divisible(STEM_WIDTH * multiplier)] + [c for _, c, _ in
                                                           block_plan(multiplier)]
    model: MobileNetV1 | MobileNetV2 = MobileNetV2(
        width_multiplier=multiplier, num_classes=num_classes, attention=attention)
  else:
    multiplier = widths[-1] / mobilenet_v1.BLOCKS[-1][0]
    expected = [scaled_width(w, multiplier)
                for w in (mobilenet_v1.STEM_WIDTH, *(w for w, _ in mobilenet_v1.BLOCKS))]
    model = MobileNetV1(width_multiplier=multiplier, num_classes=num_classes,
                        attention=attention)
  if widths != expected:
    raise ValueError(
        f'The timm mobilenetv{found[-1]} widths {widths} (stem, blocks) are not cbam_jax\'s at '
        f'width_multiplier={multiplier:g} ({expected}): timm rounds widths to multiples of 8, '
        'so only widths where that changes nothing convert.')
  return model, in_channels


def _timm_array(arrays: Mapping[str, np.ndarray], key: str) -> np.ndarray:
  if key not in arrays:
    raise ValueError(f'Cannot infer the architecture: the timm MobileNet state dict has no '
                     f'{key!r}.')
  return arrays[key]


def _timm_block_keys(found: str) -> dict[int, str]:
  """Our block number (1..) -> timm's ``blocks.{stage}.{index}``."""
  stages = TIMM_V2_STAGES if found == 'timm_v2' else TIMM_V1_STAGES
  return dict(enumerate((f'blocks.{stage}.{index}' for stage, n in enumerate(stages)
                         for index in range(n)), start=1))


# Our block's module names -> timm's, by block kind.
_TIMM_NAMES = {
    'timm_v1': {'dw_conv': 'conv_dw', 'dw_bn': 'bn1', 'pw_conv': 'conv_pw', 'pw_bn': 'bn2'},
    'timm_v2_ds': {'dw_conv': 'conv_dw', 'dw_bn': 'bn1', 'project_conv': 'conv_pw',
                   'project_bn': 'bn2'},
    'timm_v2': {'expand_conv': 'conv_pw', 'expand_bn': 'bn1', 'dw_conv': 'conv_dw',
                'dw_bn': 'bn2', 'project_conv': 'conv_pwl', 'project_bn': 'bn3'},
}
_TIMM_TOP = {'conv1': 'conv_stem', 'bn1': 'bn1', 'last_conv': 'conv_head', 'last_bn': 'bn2',
             'fc': 'classifier'}


def torch_key(model: MobileNetV1 | MobileNetV2, found: str, path: tuple[str, ...]
              ) -> tuple[str, Callable[[np.ndarray], np.ndarray]] | None:
  """The key (layout ``found``) and layout change of the variable at ``path`` (no
  collection); ``None`` for attention (no counterpart in these layouts)."""
  module, leaf = path[0], path[-1]
  if module.startswith('stage_attention') or (len(path) > 2 and 'attention' in path[1]):
    return None
  if module.startswith('block'):
    index = int(module[len('block'):])
    if found == 'timm_v1':
      prefix = f'{_timm_block_keys(found)[index]}.{_TIMM_NAMES[found][path[1]]}'
    else:
      expanded = block_plan(model.width_multiplier)[index - 1][0] != 1
      if found == 'timm_v2':
        names = _TIMM_NAMES['timm_v2' if expanded else 'timm_v2_ds']
        prefix = f'{_timm_block_keys(found)[index]}.{names[path[1]]}'
      else:
        names = (
            {'expand_conv': '0.0', 'expand_bn': '0.1', 'dw_conv': '1.0', 'dw_bn': '1.1',
             'project_conv': '2', 'project_bn': '3'} if expanded else
            {'dw_conv': '0.0', 'dw_bn': '0.1', 'project_conv': '1', 'project_bn': '2'})
        prefix = f'features.{index}.conv.{names[path[1]]}'
  elif found != 'torchvision_v2':
    prefix = _TIMM_TOP[module]
  else:
    last = len(block_plan(model.width_multiplier)) + 1
    prefix = {'conv1': 'features.0.0', 'bn1': 'features.0.1', 'last_conv': f'features.{last}.0',
              'last_bn': f'features.{last}.1', 'fc': 'classifier.1'}[module]
  if leaf == 'kernel':
    return f'{prefix}.weight', _linear if module == 'fc' else _conv
  if leaf in _NORM_LEAVES:
    return f'{prefix}.{"bias" if leaf == "bias" else _NORM_LEAVES[leaf]}', _identity
  raise ValueError(f'No {found} key for the Flax variable {"/".join(path)}.')
