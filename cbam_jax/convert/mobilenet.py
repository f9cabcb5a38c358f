"""torchvision's ``mobilenet_v2`` state dict -> :class:`cbam_jax.models.MobileNetV2`.

torchvision's keys: ``features.0.{0,1}`` (stem conv, BN), ``features.{i}.conv.*`` for the
17 inverted residual blocks (expansion 1: ``conv.0.{0,1}`` depthwise conv and BN,
``conv.1`` projection conv, ``conv.2`` its BN; otherwise ``conv.0.{0,1}`` expansion,
``conv.1.{0,1}`` depthwise, ``conv.2`` projection, ``conv.3`` its BN), ``features.18.{0,1}``
(last conv, BN) and ``classifier.1`` (the Linear after the dropout). torchvision has no
attention: the modules asked for (``attention=``, ``'auto'`` = ``'cbam'``) are freshly
initialised, as for a torchvision ResNet.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from cbam_jax.convert.architecture import torchvision_attention
from cbam_jax.convert.keys import _NORM_LEAVES, _conv, _identity, _linear
from cbam_jax.models.mobilenet_v2 import LAST_WIDTH, STEM_WIDTH, MobileNetV2, block_plan

STEM_KEY = 'features.0.0.weight'
HEAD_KEY = 'classifier.1.weight'

def is_mobilenet_v2(arrays: Mapping[str, np.ndarray]) -> bool:
  """Whether the keys are torchvision's MobileNetV2's."""
  return STEM_KEY in arrays and HEAD_KEY in arrays


def infer_model(arrays: Mapping[str, np.ndarray], attention: Any,
                attention_fields: Mapping[str, Any]) -> tuple[MobileNetV2, int]:
  """The MobileNetV2 of ``arrays`` (width 1.0, torchvision's only trained width) and its
  input channels."""
  stem = arrays[STEM_KEY].shape
  last = arrays.get(f'features.{len(block_plan(1.0)) + 1}.0.weight')
  if stem[0] != STEM_WIDTH or last is None or last.shape[0] != LAST_WIDTH:
    raise ValueError(
        f'{STEM_KEY} has {stem[0]} filters and the last conv '
        f'{None if last is None else last.shape[0]}: only torchvision\'s mobilenet_v2 at '
        f'width 1.0 ({STEM_WIDTH} and {LAST_WIDTH}) converts.')
  model = MobileNetV2(num_classes=int(arrays[HEAD_KEY].shape[0]),
                      attention=torchvision_attention(attention, attention_fields))
  return model, int(stem[1])


def torch_key(model: MobileNetV2, path: tuple[str, ...]
              ) -> tuple[str, Callable[[np.ndarray], np.ndarray]] | None:
  """torchvision's key and layout change of the variable at ``path`` (no collection);
  ``None`` for attention (no torchvision counterpart)."""
  module, leaf = path[0], path[-1]
  if module.startswith('stage_attention') or (len(path) > 2 and path[1] == 'attention'):
    return None
  if module.startswith('block'):
    index = int(module[len('block'):])
    expanded = block_plan(model.width_multiplier)[index - 1][0] != 1
    names = (
        {'expand_conv': '0.0', 'expand_bn': '0.1', 'dw_conv': '1.0', 'dw_bn': '1.1',
         'project_conv': '2', 'project_bn': '3'} if expanded else
        {'dw_conv': '0.0', 'dw_bn': '0.1', 'project_conv': '1', 'project_bn': '2'})
    prefix = f'features.{index}.conv.{names[path[1]]}'
  else:
    last = len(block_plan(model.width_multiplier)) + 1
    prefix = {'conv1': 'features.0.0', 'bn1': 'features.0.1', 'last_conv': f'features.{last}.0',
              'last_bn': f'features.{last}.1', 'fc': 'classifier.1'}[module]
  if leaf == 'kernel':
    return f'{prefix}.weight', _linear if module == 'fc' else _conv
  if leaf in _NORM_LEAVES:
    return f'{prefix}.{"bias" if leaf == "bias" else _NORM_LEAVES[leaf]}', _identity
  raise ValueError(f'No torchvision key for the Flax variable {"/".join(path)}.')
