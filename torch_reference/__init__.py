"""The PyTorch references: official CBAM code, timm, and the benchmark's PyTorch twins.

One module, shared by the parity and conversion tests (``tests/test_torch_parity_cbam.py``,
``tests/test_convert.py``, ``tests/test_nnx_convert.py``) and by the benchmark's PyTorch
columns (:mod:`experiments.bench.benchmark`), so that what is timed is the very code that
the parity tests hold cbam_jax against. It is a top-level package of its own, not part of
``cbam_jax`` (torch is only an optional extra; the library never imports this and the wheel
does not ship it), not under ``tests/`` (``experiments/`` must not import from the tests) and
not under ``experiments/`` (the library's tests must not import the scripts). torch is
imported here and nowhere else in ``experiments/``; test modules call
``pytest.importorskip('torch')`` before importing it.

Written from the public reference code, trimmed to what the forward pass and the parameter
names (state-dict layouts that :mod:`cbam_jax.convert` reads) need:

* official: Jongchan/attention-module ``MODELS/cbam.py`` (:class:`OfficialCBAM`, with every
  ``pool_types`` entry: ``avg``, ``max``, ``lp``, ``lse``; spatial pool ``[max, mean]``),
  ``MODELS/bam.py`` (:class:`OfficialBAM`) and ``MODELS/model_resnet.py``
  (:class:`OfficialResNet`: ``att_type='CBAM'``, ``'BAM'`` or ``None``; ``network_type``
  ``'ImageNet'`` or ``'CIFAR10'``). Its pooling is the official one: ``AvgPool2d(7)``
  (ImageNet) and ``avg_pool2d(x, 4)`` (CIFAR), global only for 224x224 and 32x32 inputs
  (four stages). With ``att_type=None`` the state dict has torchvision's layout.
  Three arguments the official ResNet lacks, each defaulting to the official behaviour:
  ``width`` (the hard-coded 64), ``global_pool`` (torchvision's global-mean head) and
  ``shortcut='zero_pad'`` (He et al.'s option A, as cbam_jax's CIFAR ResNet-20 has).
* timm: ``timm/layers/cbam.py`` ``CbamModule`` (:class:`TimmCbamModule`: bias-free 1x1-conv
  MLP, hidden ``make_divisible(C / 16, 1)``, spatial pool ``[mean, max]``, ``ConvNormAct``
  with BatchNorm momentum 0.1), ``layers/squeeze_excite.py`` (:class:`TimmSEModule`) and
  ``models/resnet.py`` with ``block_args=dict(attn_layer=...)`` (:class:`TimmResNet`,
  default 7x7 stem; ``cardinality`` and ``base_width`` make it timm's ResNeXt);
  ``models/efficientnet.py`` ``mobilenetv1_100`` and ``mobilenetv2_*`` as
  ``_efficientnet_builder.py`` builds them from ``_efficientnet_blocks.py``
  (:class:`TimmMobileNet`).
* :func:`benchmark_resnet`: the official ResNet configured as cbam_jax's ``resnet20`` and
  ``resnet50``, so that the two frameworks time the same network.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
  return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


# ----------------------------------------------------------------------------------------------
# Official CBAM code (Jongchan/attention-module, MODELS/cbam.py).


class BasicConv(nn.Module):
  """Conv (no bias) + BatchNorm(momentum=0.01), no ReLU: the official spatial gate's conv."""

  def __init__(self, in_planes: int, out_planes: int, kernel_size: int, padding: int):
    super().__init__()
    self.conv = nn.Conv2d(in_planes, out_planes, kernel_size, padding=padding, bias=False)
    self.bn = nn.BatchNorm2d(out_planes, eps=1e-5, momentum=0.01, affine=True)

  def forward(self, x):
    return self.bn(self.conv(x))


def logsumexp_2d(tensor):
  tensor_flatten = tensor.view(tensor.size(0), tensor.size(1), -1)
  s, _ = torch.max(tensor_flatten, dim=2, keepdim=True)
  return s + (tensor_flatten - s).exp().sum(dim=2, keepdim=True).log()


class OfficialChannelGate(nn.Module):

  def __init__(self, gate_channels: int, reduction_ratio: int = 16,
               pool_types: Sequence[str] = ('avg', 'max')):
    super().__init__()
    self.mlp = nn.Sequential(
        nn.Flatten(),
        nn.Linear(gate_channels, gate_channels // reduction_ratio),
        nn.ReLU(),
        nn.Linear(gate_channels // reduction_ratio, gate_channels))
    self.pool_types = pool_types

  def forward(self, x):
    size = (x.size(2), x.size(3))
    channel_att_sum = None
    for pool_type in self.pool_types:
      if pool_type == 'avg':
        channel_att_raw = self.mlp(F.avg_pool2d(x, size, stride=size))
      elif pool_type == 'max':
        channel_att_raw = self.mlp(F.max_pool2d(x, size, stride=size))
      elif pool_type == 'lp':
        channel_att_raw = self.mlp(F.lp_pool2d(x, 2, size, stride=size))
      elif pool_type == 'lse':
        channel_att_raw = self.mlp(logsumexp_2d(x))
      else:
        raise ValueError(f'pool_type {pool_type!r}: the official code knows avg, max, lp, lse.')
      channel_att_sum = (channel_att_raw if channel_att_sum is None
                         else channel_att_sum + channel_att_raw)
    scale = torch.sigmoid(channel_att_sum).unsqueeze(2).unsqueeze(3).expand_as(x)
    return x * scale


class OfficialChannelPool(nn.Module):

  def forward(self, x):
    # [max, mean]: the reverse of the paper's [AvgPool; MaxPool] (cbam_jax uses [mean, max]).
    return torch.cat((torch.max(x, 1)[0].unsqueeze(1), torch.mean(x, 1).unsqueeze(1)), dim=1)


class OfficialSpatialGate(nn.Module):

  def __init__(self, kernel_size: int = 7):
    super().__init__()
    self.compress = OfficialChannelPool()
    self.spatial = BasicConv(2, 1, kernel_size, padding=(kernel_size - 1) // 2)

  def forward(self, x):
    return x * torch.sigmoid(self.spatial(self.compress(x)))


class OfficialCBAM(nn.Module):

  def __init__(self, gate_channels: int, reduction_ratio: int = 16,
               pool_types: Sequence[str] = ('avg', 'max'), no_spatial: bool = False):
    super().__init__()
    self.ChannelGate = OfficialChannelGate(gate_channels, reduction_ratio, pool_types)
    self.no_spatial = no_spatial
    if not no_spatial:
      self.SpatialGate = OfficialSpatialGate()

  def forward(self, x):
    x_out = self.ChannelGate(x)
    if not self.no_spatial:
      x_out = self.SpatialGate(x_out)
    return x_out


# ----------------------------------------------------------------------------------------------
# Official BAM (MODELS/bam.py).


class OfficialBAMChannelGate(nn.Module):

  def __init__(self, gate_channel: int, reduction_ratio: int = 16):
    super().__init__()
    hidden = gate_channel // reduction_ratio
    self.gate_c = nn.Sequential()
    self.gate_c.add_module('flatten', nn.Flatten())
    self.gate_c.add_module('gate_c_fc_0', nn.Linear(gate_channel, hidden))
    self.gate_c.add_module('gate_c_bn_1', nn.BatchNorm1d(hidden))
    self.gate_c.add_module('gate_c_relu_1', nn.ReLU())
    self.gate_c.add_module('gate_c_fc_final', nn.Linear(hidden, gate_channel))

  def forward(self, x):
    avg_pool = F.avg_pool2d(x, x.size(2), stride=x.size(2))
    return self.gate_c(avg_pool).unsqueeze(2).unsqueeze(3).expand_as(x)


class OfficialBAMSpatialGate(nn.Module):

  def __init__(self, gate_channel: int, reduction_ratio: int = 16, dilation_conv_num: int = 2,
               dilation_val: int = 4):
    super().__init__()
    hidden = gate_channel // reduction_ratio
    self.gate_s = nn.Sequential()
    self.gate_s.add_module('gate_s_conv_reduce0', nn.Conv2d(gate_channel, hidden, 1))
    self.gate_s.add_module('gate_s_bn_reduce0', nn.BatchNorm2d(hidden))
    self.gate_s.add_module('gate_s_relu_reduce0', nn.ReLU())
    for i in range(dilation_conv_num):
      self.gate_s.add_module(f'gate_s_conv_di_{i}', nn.Conv2d(
          hidden, hidden, kernel_size=3, padding=dilation_val, dilation=dilation_val))
      self.gate_s.add_module(f'gate_s_bn_di_{i}', nn.BatchNorm2d(hidden))
      self.gate_s.add_module(f'gate_s_relu_di_{i}', nn.ReLU())
    self.gate_s.add_module('gate_s_conv_final', nn.Conv2d(hidden, 1, kernel_size=1))

  def forward(self, x):
    return self.gate_s(x).expand_as(x)


class OfficialBAM(nn.Module):
  """Official ``MODELS/bam.py``: ``x * (1 + sigmoid(Mc(x) * Ms(x)))``."""

  def __init__(self, gate_channel: int):
    super().__init__()
    self.channel_att = OfficialBAMChannelGate(gate_channel)
    self.spatial_att = OfficialBAMSpatialGate(gate_channel)

  def forward(self, x):
    return (1 + torch.sigmoid(self.channel_att(x) * self.spatial_att(x))) * x


# ----------------------------------------------------------------------------------------------
# Official ResNet (MODELS/model_resnet.py).


class ZeroPadShortcut(nn.Module):
  """He et al.'s option A: subsample by ``stride``, zero-pad the new channels (no weights)."""

  def __init__(self, stride: int, extra_channels: int):
    super().__init__()
    self.stride, self.extra_channels = stride, extra_channels

  def forward(self, x):
    x = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
    return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels)) if self.extra_channels else x


class OfficialBasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1, downsample=None, use_cbam=False,
               no_spatial=False):
    super().__init__()
    self.conv1 = conv3x3(inplanes, planes, stride)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = conv3x3(planes, planes)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample
    self.cbam = OfficialCBAM(planes, 16, no_spatial=no_spatial) if use_cbam else None

  def forward(self, x):
    residual = x if self.downsample is None else self.downsample(x)
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    if self.cbam is not None:
      out = self.cbam(out)
    return F.relu(out + residual)


class OfficialBottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, downsample=None, use_cbam=False,
               no_spatial=False, groups=1, width_per_group=64):
    super().__init__()
    # torchvision's ResNeXt / Wide ResNet inner width; the official code has groups=1, 64.
    width = int(planes * width_per_group / 64) * groups
    self.conv1 = nn.Conv2d(inplanes, width, kernel_size=1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1, groups=groups,
                           bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = nn.Conv2d(width, planes * 4, kernel_size=1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.downsample = downsample
    # Official: CBAM(planes * 4, 16), gating the expanded output.
    self.cbam = OfficialCBAM(planes * 4, 16, no_spatial=no_spatial) if use_cbam else None

  def forward(self, x):
    residual = x if self.downsample is None else self.downsample(x)
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.cbam is not None:
      out = self.cbam(out)
    return F.relu(out + residual)


class OfficialResNet(nn.Module):
  """The official ``ResNet(block, layers, network_type, num_classes, att_type)``.

  ``width`` replaces the hard-coded 64 (stages ``width * 2**i``); ``global_pool=True``
  replaces the fixed-size final pooling by a global mean (torchvision's head);
  ``shortcut='zero_pad'`` replaces the projection shortcuts by option A; ``groups`` and
  ``width_per_group`` (bottlenecks only) make it torchvision's ResNeXt or Wide ResNet.
  """

  def __init__(self, block: str, layers, network_type: str = 'ImageNet', num_classes: int = 10,
               att_type: str | None = 'CBAM', width: int = 64, no_spatial: bool = False,
               global_pool: bool = False, shortcut: str = 'projection', groups: int = 1,
               width_per_group: int = 64):
    super().__init__()
    if shortcut not in ('projection', 'zero_pad'):
      raise ValueError(f"shortcut={shortcut!r}: use 'projection' (official) or 'zero_pad'.")
    block_cls = {'basic': OfficialBasicBlock, 'bottleneck': OfficialBottleneck}[block]
    self.network_type = network_type
    self.global_pool = global_pool
    self.shortcut = shortcut
    self.inplanes = width
    if network_type == 'ImageNet':
      self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
      self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    else:
      self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    # Official: bam1..bam3 after layer1..layer3 (every stage but the last).
    self.use_bam = att_type == 'BAM'
    for stage in range(len(layers) - 1) if self.use_bam else ():
      setattr(self, f'bam{stage + 1}', OfficialBAM(width * 2**stage * block_cls.expansion))
    kw = dict(use_cbam=att_type == 'CBAM', no_spatial=no_spatial)
    if block == 'bottleneck':
      kw.update(groups=groups, width_per_group=width_per_group)
    elif (groups, width_per_group) != (1, 64):
      raise ValueError('groups and width_per_group need block="bottleneck".')
    for stage, num_blocks in enumerate(layers):
      setattr(self, f'layer{stage + 1}', self._make_layer(
          block_cls, width * 2**stage, num_blocks, stride=1 if stage == 0 else 2, **kw))
    self.fc = nn.Linear(width * 2**(len(layers) - 1) * block_cls.expansion, num_classes)
    self.num_stages = len(layers)

  def _make_layer(self, block, planes, blocks, stride, **kw):
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      if self.shortcut == 'zero_pad':
        downsample = ZeroPadShortcut(stride, planes * block.expansion - self.inplanes)
      else:
        downsample = nn.Sequential(
            nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride,
                      bias=False),
            nn.BatchNorm2d(planes * block.expansion))
    layers = [block(self.inplanes, planes, stride, downsample, **kw)]
    self.inplanes = planes * block.expansion
    layers += [block(self.inplanes, planes, **kw) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    if self.network_type == 'ImageNet':
      x = self.maxpool(x)
    for stage in range(self.num_stages):
      x = getattr(self, f'layer{stage + 1}')(x)
      if self.use_bam and stage < self.num_stages - 1:
        x = getattr(self, f'bam{stage + 1}')(x)
    if self.global_pool:
      x = x.mean((2, 3))
    elif self.network_type == 'ImageNet':
      x = F.avg_pool2d(x, 7)
    else:
      x = F.avg_pool2d(x, 4)
    return self.fc(x.flatten(1))


def benchmark_resnet(stage_sizes: Sequence[int], *, stem: str, attention: bool,
                     num_classes: int, groups: int = 1,
                     width_per_group: int = 64) -> OfficialResNet:
  """The official ResNet as cbam_jax's ``resnet20`` (``stem='cifar'``: 3x3 stem, BasicBlocks
  16-32-64, option-A shortcuts) or ``resnet50`` (``'imagenet'``: 7x7/2 stem + max-pool,
  Bottlenecks 64-128-256-512, projection shortcuts); both with a global-mean head and, with
  ``attention``, official CBAM in every block. ``groups`` / ``width_per_group`` (ImageNet
  only) give ``resnext50_32x4d`` (32, 4) or ``wide_resnet50_2`` (1, 128)."""
  if stem not in ('cifar', 'imagenet'):
    raise ValueError(f"stem={stem!r}: use 'cifar' or 'imagenet'.")
  cifar = stem == 'cifar'
  return OfficialResNet(
      'basic' if cifar else 'bottleneck', stage_sizes, 'CIFAR10' if cifar else 'ImageNet',
      num_classes=num_classes, att_type='CBAM' if attention else None,
      width=16 if cifar else 64, global_pool=True,
      shortcut='zero_pad' if cifar else 'projection', groups=groups,
      width_per_group=width_per_group)


class InvertedResidual(nn.Module):
  """cbam_jax's MobileNetV2 block: [1x1 expand + BN + ReLU6], 3x3 depthwise + BN + ReLU6,
  1x1 projection + BN [+ official CBAM] [+ the input when the shape is kept]."""

  def __init__(self, inplanes: int, planes: int, expansion: int, stride: int,
               use_cbam: bool):
    super().__init__()
    hidden = int(round(inplanes * expansion))
    layers = []
    if expansion != 1:
      layers += [nn.Conv2d(inplanes, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                 nn.ReLU6()]
    layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
               nn.BatchNorm2d(hidden), nn.ReLU6(),
               nn.Conv2d(hidden, planes, 1, bias=False), nn.BatchNorm2d(planes)]
    self.conv = nn.Sequential(*layers)
    self.cbam = OfficialCBAM(planes, 16) if use_cbam else None
    self.use_residual = stride == 1 and inplanes == planes

  def forward(self, x):
    out = self.conv(x)
    if self.cbam is not None:
      out = self.cbam(out)
    return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
  """cbam_jax's ``mobilenet_v2`` (torchvision's MobileNetV2 without dropout, width 1.0),
  with official CBAM in every inverted residual block when ``attention``."""

  def __init__(self, attention: bool, num_classes: int = 1000):
    super().__init__()
    from cbam_jax.models import mobilenet_v2
    plan = mobilenet_v2.block_plan(1.0)
    stem = mobilenet_v2.STEM_WIDTH
    layers = [nn.Conv2d(3, stem, 3, 2, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU6()]
    inplanes = stem
    for expansion, planes, stride in plan:
      layers.append(InvertedResidual(inplanes, planes, expansion, stride, attention))
      inplanes = planes
    last = mobilenet_v2.LAST_WIDTH
    layers += [nn.Conv2d(inplanes, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6()]
    self.features = nn.Sequential(*layers)
    self.classifier = nn.Linear(last, num_classes)

  def forward(self, x):
    return self.classifier(self.features(x).mean((2, 3)))


# ----------------------------------------------------------------------------------------------
# timm (huggingface/pytorch-image-models).


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None,
                   round_limit: float = 0.9) -> int:
  """timm.layers.helpers.make_divisible."""
  min_value = min_value or divisor
  new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
  if new_v < round_limit * v:
    new_v += divisor
  return new_v


class TimmChannelAttn(nn.Module):
  """timm ``layers/cbam.py`` ``ChannelAttn``."""

  def __init__(self, channels: int, rd_ratio: float = 1 / 16, rd_divisor: int = 1,
               mlp_bias: bool = False):
    super().__init__()
    rd_channels = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.)
    self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=mlp_bias)
    self.act = nn.ReLU(inplace=True)
    self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=mlp_bias)

  def forward(self, x):
    x_avg = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
    x_max = self.fc2(self.act(self.fc1(x.amax((2, 3), keepdim=True))))
    return x * torch.sigmoid(x_avg + x_max)


class ConvNorm(nn.Module):
  """timm ConvNormAct(apply_act=False): ``.conv`` (no bias) and ``.bn`` (momentum 0.1)."""

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
    super().__init__()
    self.conv = nn.Conv2d(in_channels, out_channels, kernel_size,
                          padding=(kernel_size - 1) // 2, bias=False)
    self.bn = nn.BatchNorm2d(out_channels)  # eps 1e-5, momentum 0.1.

  def forward(self, x):
    return self.bn(self.conv(x))


class TimmSpatialAttn(nn.Module):
  """timm ``layers/cbam.py`` ``SpatialAttn``."""

  def __init__(self, kernel_size: int = 7):
    super().__init__()
    self.conv = ConvNorm(2, 1, kernel_size)

  def forward(self, x):
    # timm pools [mean, max], like cbam_jax.
    x_attn = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
    return x * torch.sigmoid(self.conv(x_attn))


class TimmCbamModule(nn.Module):
  """timm ``layers/cbam.py`` ``CbamModule`` (default arguments but ``mlp_bias``)."""

  def __init__(self, channels: int, mlp_bias: bool = False, spatial_kernel_size: int = 7):
    super().__init__()
    self.channel = TimmChannelAttn(channels, mlp_bias=mlp_bias)
    self.spatial = TimmSpatialAttn(spatial_kernel_size)

  def forward(self, x):
    return self.spatial(self.channel(x))


class TimmSEModule(nn.Module):
  """timm ``layers/squeeze_excite.py`` ``SEModule``."""

  def __init__(self, channels: int, rd_ratio: float = 1 / 16, rd_divisor: int = 8):
    super().__init__()
    rd_channels = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.)
    self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=True)
    self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=True)

  def forward(self, x):
    x_se = self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True))))
    return x * torch.sigmoid(x_se)


def _timm_attn(attn_layer: str | None, channels: int) -> nn.Module | None:
  if attn_layer is None:
    return None
  return {'cbam': TimmCbamModule, 'se': TimmSEModule}[attn_layer](channels)


class TimmBasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1, downsample=None, attn_layer=None):
    super().__init__()
    self.conv1 = conv3x3(inplanes, planes, stride)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = conv3x3(planes, planes)
    self.bn2 = nn.BatchNorm2d(planes)
    self.se = _timm_attn(attn_layer, planes)
    self.downsample = downsample

  def forward(self, x):
    shortcut = x
    x = F.relu(self.bn1(self.conv1(x)))
    x = self.bn2(self.conv2(x))
    if self.se is not None:  # timm: after the last BN, before drop_path and the residual add.
      x = self.se(x)
    if self.downsample is not None:
      shortcut = self.downsample(shortcut)
    return F.relu(x + shortcut)


class TimmBottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, downsample=None, attn_layer=None,
               cardinality=1, base_width=64):
    super().__init__()
    # timm: ResNeXt's grouped 3x3 conv (cardinality groups, base_width channels per group at
    # 64 planes).
    width = int(math.floor(planes * (base_width / 64)) * cardinality)
    self.conv1 = nn.Conv2d(inplanes, width, kernel_size=1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1,
                           groups=cardinality, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = nn.Conv2d(width, planes * 4, kernel_size=1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.se = _timm_attn(attn_layer, planes * 4)
    self.downsample = downsample

  def forward(self, x):
    shortcut = x
    x = F.relu(self.bn1(self.conv1(x)))
    x = F.relu(self.bn2(self.conv2(x)))
    x = self.bn3(self.conv3(x))
    if self.se is not None:
      x = self.se(x)
    if self.downsample is not None:
      shortcut = self.downsample(shortcut)
    return F.relu(x + shortcut)


class TimmResNet(nn.Module):
  """timm ``ResNet(block, layers, cardinality=..., base_width=..., block_args=dict(
  attn_layer=...))`` with the default stem.

  ``width`` gives timm's ``channels=(width, 2 * width, ...)``; ``stem_width`` the 7x7 stem's
  channels, ``width`` when ``None`` (timm fixes the default stem at 64, so ``stem_width=64``
  is timm's network at any ``width``). ``cardinality`` and ``base_width`` (bottlenecks only)
  make it timm's ResNeXt: ``resnext50_32x4d`` is ``('bottleneck', [3, 4, 6, 3],
  cardinality=32, base_width=4)``, ``seresnext50_32x4d`` the same with ``attn_layer='se'``.
  """

  def __init__(self, block: str, layers, num_classes: int = 10, attn_layer: str | None = 'cbam',
               width: int = 64, stem_width: int | None = None, cardinality: int = 1,
               base_width: int = 64):
    super().__init__()
    block_cls = {'basic': TimmBasicBlock, 'bottleneck': TimmBottleneck}[block]
    grouping = {}
    if block == 'bottleneck':
      grouping = dict(cardinality=cardinality, base_width=base_width)
    elif (cardinality, base_width) != (1, 64):
      raise ValueError('cardinality and base_width need block="bottleneck" (as timm).')
    inplanes = width if stem_width is None else stem_width
    self.conv1 = nn.Conv2d(3, inplanes, kernel_size=7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(inplanes)
    self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    for stage, num_blocks in enumerate(layers):
      planes, stride = width * 2**stage, 1 if stage == 0 else 2
      downsample = None
      if stride != 1 or inplanes != planes * block_cls.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * block_cls.expansion, 1, stride=stride, bias=False),
            nn.BatchNorm2d(planes * block_cls.expansion))
      blocks = []
      for index in range(num_blocks):
        blocks.append(block_cls(inplanes, planes, stride if index == 0 else 1,
                                downsample if index == 0 else None, attn_layer=attn_layer,
                                **grouping))
        inplanes = planes * block_cls.expansion
      setattr(self, f'layer{stage + 1}', nn.Sequential(*blocks))
    self.num_stages = len(layers)
    self.fc = nn.Linear(inplanes, num_classes)

  def forward(self, x):
    x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
    for stage in range(self.num_stages):
      x = getattr(self, f'layer{stage + 1}')(x)
    return self.fc(x.mean((2, 3)))


# timm's MobileNets: models/efficientnet.py (_gen_mobilenet_v1, _gen_mobilenet_v2) built by
# _efficientnet_builder.py from _efficientnet_blocks.py, with timm's module names.

# The arch_defs of _gen_mobilenet_v1 and _gen_mobilenet_v2, as timm writes them: block type
# (ds: depthwise-separable, dsa: the same with an activation after the pointwise conv and no
# skip, ir: inverted residual), r repeats, k depthwise kernel, s first stride, e expansion,
# c output channels.
TIMM_MOBILENET_V1_ARCH = (
    ('dsa_r1_k3_s1_c64',), ('dsa_r2_k3_s2_c128',), ('dsa_r2_k3_s2_c256',),
    ('dsa_r6_k3_s2_c512',), ('dsa_r2_k3_s2_c1024',))
TIMM_MOBILENET_V2_ARCH = (
    ('ds_r1_k3_s1_c16',), ('ir_r2_k3_s2_e6_c24',), ('ir_r3_k3_s2_e6_c32',),
    ('ir_r4_k3_s2_e6_c64',), ('ir_r3_k3_s1_e6_c96',), ('ir_r3_k3_s2_e6_c160',),
    ('ir_r1_k3_s1_e6_c320',))


def _decode_block(block_str: str) -> dict:
  """timm ``_decode_block_str``, trimmed to the options the MobileNets' arch_defs use."""
  block_type, *ops = block_str.split('_')
  options = dict(re.split(r'(\d.*)', op)[:2] for op in ops)
  return dict(block_type=block_type, repeats=int(options['r']), kernel=int(options['k']),
              stride=int(options['s']), exp_ratio=float(options.get('e', 1.0)),
              out_chs=int(options['c']))


def _timm_conv(in_chs: int, out_chs: int, kernel: int, stride: int = 1,
               groups: int = 1) -> nn.Conv2d:
  """timm ``create_conv2d`` with ``pad_type=''``: PyTorch's symmetric padding, no bias."""
  return nn.Conv2d(in_chs, out_chs, kernel, stride, padding=((stride - 1) + (kernel - 1)) // 2,
                   groups=groups, bias=False)


class TimmBatchNormAct2d(nn.BatchNorm2d):
  """timm ``layers/norm_act.py`` ``BatchNormAct2d``: BatchNorm (eps 1e-5, momentum 0.1) and
  its activation; the state dict is BatchNorm's."""

  def __init__(self, channels: int, apply_act: bool = True):
    super().__init__(channels)
    self.drop = nn.Identity()
    self.act = nn.ReLU6() if apply_act else nn.Identity()

  def forward(self, x):
    return self.act(self.drop(super().forward(x)))


class TimmDepthwiseSeparableConv(nn.Module):
  """timm ``DepthwiseSeparableConv`` (no SE): ``conv_dw`` + ``bn1`` (act), ``conv_pw`` +
  ``bn2`` (act only with ``pw_act``: the ``dsa`` blocks)."""

  def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int, noskip: bool,
               pw_act: bool):
    super().__init__()
    self.has_skip = stride == 1 and in_chs == out_chs and not noskip
    self.conv_dw = _timm_conv(in_chs, in_chs, kernel, stride, groups=in_chs)
    self.bn1 = TimmBatchNormAct2d(in_chs)
    self.se = nn.Identity()
    self.conv_pw = _timm_conv(in_chs, out_chs, 1)
    self.bn2 = TimmBatchNormAct2d(out_chs, apply_act=pw_act)

  def forward(self, x):
    shortcut = x
    x = self.conv_pw(self.se(self.bn1(self.conv_dw(x))))
    x = self.bn2(x)
    return x + shortcut if self.has_skip else x


class TimmInvertedResidual(nn.Module):
  """timm ``InvertedResidual`` (no SE): ``conv_pw`` + ``bn1`` (expansion), ``conv_dw`` +
  ``bn2``, ``conv_pwl`` + ``bn3`` (linear), the input added when the shape is kept."""

  def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int, exp_ratio: float):
    super().__init__()
    self.has_skip = in_chs == out_chs and stride == 1
    mid_chs = make_divisible(in_chs * exp_ratio)
    self.conv_pw = _timm_conv(in_chs, mid_chs, 1)
    self.bn1 = TimmBatchNormAct2d(mid_chs)
    self.conv_dw = _timm_conv(mid_chs, mid_chs, kernel, stride, groups=mid_chs)
    self.bn2 = TimmBatchNormAct2d(mid_chs)
    self.se = nn.Identity()
    self.conv_pwl = _timm_conv(mid_chs, out_chs, 1)
    self.bn3 = TimmBatchNormAct2d(out_chs, apply_act=False)

  def forward(self, x):
    shortcut = x
    x = self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))
    x = self.bn3(self.conv_pwl(self.se(x)))
    return x + shortcut if self.has_skip else x


class TimmMobileNet(nn.Module):
  """timm ``EfficientNet`` as ``mobilenetv1_100`` (``version=1``) or ``mobilenetv2_100``
  (``version=2``) builds it at ``channel_multiplier`` (``mobilenetv2_050``, ...): ReLU6,
  ``round_channels`` widths (multiples of 8), ``conv_head`` to 1280 (v2; v1 has none),
  global average pooling, ``classifier``."""

  def __init__(self, version: int, num_classes: int = 10, channel_multiplier: float = 1.0):
    super().__init__()
    arch = {1: TIMM_MOBILENET_V1_ARCH, 2: TIMM_MOBILENET_V2_ARCH}[version]

    def round_chs(channels):  # _efficientnet_builder.round_channels.
      return make_divisible(channels * channel_multiplier, 8, round_limit=0.9)

    stem = round_chs(32)
    self.conv_stem = _timm_conv(3, stem, 3, stride=2)
    self.bn1 = TimmBatchNormAct2d(stem)
    in_chs, stages = stem, []
    for stage in arch:
      args = _decode_block(stage[0])
      blocks = []
      for index in range(args['repeats']):
        out_chs, stride = round_chs(args['out_chs']), args['stride'] if index == 0 else 1
        if args['block_type'] == 'ir':
          blocks.append(TimmInvertedResidual(in_chs, out_chs, args['kernel'], stride,
                                             args['exp_ratio']))
        else:
          dsa = args['block_type'] == 'dsa'
          blocks.append(TimmDepthwiseSeparableConv(in_chs, out_chs, args['kernel'], stride,
                                                   noskip=dsa, pw_act=dsa))
        in_chs = out_chs
      stages.append(nn.Sequential(*blocks))
    self.blocks = nn.Sequential(*stages)
    if version == 2:
      features = max(1280, round_chs(1280))
      self.conv_head = _timm_conv(in_chs, features, 1)
      self.bn2 = TimmBatchNormAct2d(features)
    else:
      features = in_chs
      self.conv_head, self.bn2 = nn.Identity(), nn.Identity()
    self.classifier = nn.Linear(features, num_classes)

  def forward(self, x):
    x = self.blocks(self.bn1(self.conv_stem(x)))
    x = self.bn2(self.conv_head(x))
    return self.classifier(x.mean((2, 3)))


# ----------------------------------------------------------------------------------------------
# Weights and outputs for comparisons.


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
  """Non-trivial weights and BatchNorm statistics (affine and running), in eval mode.

  Conv and Linear weights are ``N(0, 1 / fan_in)`` so that activations stay O(1) through the
  network; BatchNorm scale ``U(0.5, 1.5)``, bias / running mean ``N(0, 0.2)``, running
  variance ``U(0.5, 1.5)``.
  """
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, (nn.Conv2d, nn.Linear)):
        fan_in = module.weight[0].numel()
        module.weight.copy_(torch.randn(module.weight.shape, generator=gen) / fan_in**0.5)
        if module.bias is not None:
          module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=gen))
      elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        shape = module.weight.shape
        module.weight.copy_(0.5 + torch.rand(shape, generator=gen))
        module.bias.copy_(0.2 * torch.randn(shape, generator=gen))
        module.running_mean.copy_(0.2 * torch.randn(shape, generator=gen))
        module.running_var.copy_(0.5 + torch.rand(shape, generator=gen))
  return model.eval()


def nchw_logits(model: nn.Module, images_nhwc: np.ndarray) -> np.ndarray:
  """Eval-mode logits of NHWC numpy images, as float32 numpy."""
  with torch.no_grad():
    x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
    return model.eval()(x).numpy()
